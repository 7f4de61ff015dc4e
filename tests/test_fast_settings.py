"""The device's fastest settings: native bfloat16 from the CPU's flags, a measured thread count."""

import time

import pytest
import torch

from patchddm_fast import fast_settings as fs


@pytest.mark.parametrize("flags,precision", [({"avx2"}, "fp32"), ({"avx512f", "avx512_bf16"}, "bf16"),
                                             ({"amx_bf16", "amx_tile"}, "bf16")])
def test_cpu_precision_follows_native_bfloat16(monkeypatch, flags, precision):
    monkeypatch.setattr(fs, "cpu_flags", lambda: frozenset(flags))
    settings = fs.fast_settings("cpu")
    assert settings.precision == precision and settings.channels_last
    assert fs.native_bfloat16("cpu") == (precision == "bf16")
    assert settings.precision in settings.describe()


def test_fastest_thread_count_measures_and_restores(monkeypatch):
    before = torch.get_num_threads()
    seen = []

    def workload():  # slower with more threads, as on a busy machine
        seen.append(torch.get_num_threads())
        time.sleep(0.002 * torch.get_num_threads() ** 2)

    threads, times = fs.fastest_thread_count(workload, candidates=(1, 2), rounds=2)
    assert threads == 1 and set(times) == {1, 2} and times[1] < times[2]
    assert seen == [1, 1, 1, 2, 2, 2]  # a warm-up and two timed runs each
    assert torch.get_num_threads() == before
