"""Workloads for benchmarks.memory that belong to no single benchmark."""

import torch


def allocate(mib: int):
    """Touches `mib` MiB once: the calibration workload of the memory measurement."""

    def run():
        buffer = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
        return float(buffer[-1])

    return run
