"""How much RAM this machine has available now: the data cache and the sampler's memory
plan both size themselves by it."""

from __future__ import annotations

import os

_UNKNOWN = 8 * 2**30  # no way to ask: assume a modest machine


def available_memory() -> int:
    """Bytes of RAM available now: Linux's MemAvailable, else free physical pages, else 8 GiB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return _UNKNOWN
