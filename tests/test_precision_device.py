"""The one parser of precision names and the one of device names, which every layer uses."""

import argparse
import contextlib

import pytest
import torch

from patchddm_fast.data import DataError
from patchddm_fast.device import resolve_device
from patchddm_fast.precision import autocast, parse_precision, precision_argument, precision_name


@pytest.mark.parametrize("names, dtype", [(("fp32", "float32", "FP32", torch.float32), torch.float32),
                                          (("bf16", "bfloat16", " BF16 ", torch.bfloat16), torch.bfloat16),
                                          (("fp16", "float16", "half", torch.float16), torch.float16)])
def test_every_spelling_gives_one_dtype(names, dtype):
    for name in names:
        assert parse_precision(name) == dtype
        assert precision_name(name) == str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("bad", ["fp8", "int8", "", None, torch.int32, 32])
def test_other_values_are_refused(bad):
    with pytest.raises(ValueError, match="precision must be one of"):
        parse_precision(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        precision_argument(bad if isinstance(bad, str) else "x")


def test_autocast_only_below_float32():
    assert isinstance(autocast("cpu", "fp32"), contextlib.nullcontext)
    with autocast("cpu", "bf16"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16


def test_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu0", "meta"):
        with pytest.raises(DataError, match="--device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(DataError, match="no CUDA device"):
            resolve_device("cuda:0")
