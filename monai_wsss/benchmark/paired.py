# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""
Paired timing: several ways of doing the same work timed in one process, alternating A B A B ..., so that a
machine whose load changes during the run (shared cores, another job) slows every contender alike; the ratio of
the medians is the result, not the absolute seconds.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

__all__ = ["cpu_info", "paired_medians", "ratio_table"]

#: CPU flags that decide which fast paths exist (bfloat16 needs avx512_bf16 or amx to pay)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_info() -> dict:
    """
    The CPU model, the flags in :py:data:`CPU_FLAGS` it has, torch's version and thread count.

    Returns:
        a dict ``{"model", "flags", "torch", "threads"}``; ``model`` falls back to ``platform.processor()`` where
        ``/proc/cpuinfo`` is missing.

    Example::

        info = cpu_info()   # {'model': 'AMD EPYC', 'flags': ['avx2'], 'torch': '2.14.1', 'threads': 2}
    """
    model, flags = platform.processor() or "unknown", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("unknown", platform.processor()):
                model = value.strip()
            elif key.strip() == "flags":
                flags |= set(value.split())
    return {
        "model": model,
        "flags": [f for f in CPU_FLAGS if f in flags],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def paired_medians(fns: Mapping[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """
    Median wall time in seconds of each function, timed alternately: ``warmup`` untimed rounds, then ``repeats``
    rounds of one call of every function in turn.

    Args:
        fns: name -> function of no arguments.
        repeats: timed rounds (>= 1).
        warmup: untimed rounds first (>= 0).

    Returns:
        name -> median seconds.

    Raises:
        ValueError: ``fns`` is empty, ``repeats < 1`` or ``warmup < 0``.

    Example::

        med = paired_medians({"contiguous": lambda: net(x, t), "channels_last": lambda: fast(x, t)}, repeats=7)
        speedup = med["contiguous"] / med["channels_last"]
    """
    if not fns:
        raise ValueError("fns is empty: give at least one function to time.")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}.")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}.")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def ratio_table(medians: Mapping[str, float], reference: str, per: int = 1, unit: str = "s") -> list[str]:
    """
    Markdown rows ``| name | seconds / per | reference / name |`` (a ratio above 1 = faster than the reference).

    Raises:
        ValueError: ``reference`` is not among ``medians``.
    """
    if reference not in medians:
        raise ValueError(f"reference {reference!r} is not among the timed names {sorted(medians)}.")
    rows = [f"| variant | {unit} | x faster than {reference} |", "|---|---|---|"]
    for name, sec in medians.items():
        rows.append(f"| {name} | {sec / per:.4f} | {medians[reference] / sec:.2f} |")
    return rows
