# Copyright (c) monai_wsss contributors
# Licensed under the Apache License, Version 2.0
"""Process-wide memory settings an application may choose (never set by a library class on its own)."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["reuse_freed_memory"]

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def reuse_freed_memory(max_bytes: int = 1 << 30) -> bool:
    """
    Let this process reuse freed buffers of up to ``max_bytes`` instead of returning them to the OS (glibc only).

    Why: by default glibc serves every buffer above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and
    unmaps it on free, so each network call on a batch of slices page-faults its activations in again: at 32
    slices per CDM call (64 network inputs of 64 x 64) that kernel time was as large as the compute itself
    (56 vs 30 ms per slice on one core), which is why CPU cost per slice grew with the batch size. Raising
    the mmap and trim thresholds (``mallopt``) keeps freed memory in the heap for the next call. The process keeps
    its peak memory until it exits; that is the price. Process-wide; a no-op (False) where glibc is missing
    (macOS, Windows, musl).

    Args:
        max_bytes: largest allocation served from the heap (and the free heap kept before trimming).

    Returns:
        True if the thresholds were set.

    Raises:
        ValueError: ``max_bytes`` is not a positive int.

    Example::

        reuse_freed_memory()   # once, before a long inference or training loop on the CPU
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}.")
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, int(max_bytes))) and bool(mallopt(_M_TRIM_THRESHOLD, int(max_bytes)))
