"""Precision: the one parser from the names people write ("fp32", "bfloat16", a torch.dtype)
to the torch dtype the network runs in, and the autocast context of that dtype.

Sampling, inference, the training config, the trainer and the command line all go through
parse_precision, so every layer accepts the same spellings and rejects the same mistakes.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

# Every accepted spelling; the short ones are what the command line offers.
_ALIASES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}
SHORT_NAMES = ("fp32", "bf16", "fp16")


def parse_precision(value: str | torch.dtype) -> torch.dtype:
    """The dtype of a precision name (case-insensitive) or dtype; ValueError for anything else."""
    if isinstance(value, torch.dtype):
        if value in _ALIASES.values():
            return value
    elif isinstance(value, str) and value.strip().lower() in _ALIASES:
        return _ALIASES[value.strip().lower()]
    raise ValueError(f"precision must be one of {', '.join(SHORT_NAMES)} (or float32, bfloat16, float16), "
                     f"got {value!r}")


def precision_name(value: str | torch.dtype) -> str:
    """torch's name of the precision's dtype: "float32", "bfloat16" or "float16"."""
    return str(parse_precision(value)).removeprefix("torch.")


def precision_argument(text: str) -> str:
    """An argparse type: the precision as written (lower case), checked by parse_precision."""
    try:
        parse_precision(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text.strip().lower()


def autocast(device: torch.device | str, precision: str | torch.dtype):
    """torch.autocast to the precision's dtype on `device`; no context for float32."""
    dtype = parse_precision(precision)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


__all__ = ["SHORT_NAMES", "autocast", "parse_precision", "precision_argument", "precision_name"]
