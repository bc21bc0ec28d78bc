# Copyright (c) monai_wsss contributors
# Licensed under the Apache License, Version 2.0
"""Writing files that a crash never leaves half-written under their final name, and cleaning up after a killed writer."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["TEMP_PREFIX", "atomic_write", "remove_stale_temporaries", "write_text_atomic"]

#: prefix of the temporary files :py:func:`atomic_write` creates next to their final name
TEMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """
    Write a file under a temporary name in its own folder and rename it into place only once it is complete, so
    that a crash (even SIGKILL) never leaves a truncated file under the final name: the final name holds either
    the previous complete file or the new one (``os.replace`` is atomic within one file system).

    The temporary name is ``.tmp-<random>-<final name>``: hidden, and ending like the final name so writers that
    pick the format from the extension (``.nii.gz``, ``.png``) still do. It is removed when the block raises.

    Args:
        path: the final file path (its folder is created).

    Returns:
        a context manager giving the temporary path to write to.

    Example::

        with atomic_write("out/predictions.csv") as tmp:
            tmp.write_text("case,map\\n")
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = final.parent / f"{TEMP_PREFIX}{uuid.uuid4().hex[:8]}-{final.name}"
    try:
        yield temp
        if not temp.is_file():
            raise FileNotFoundError(f"nothing was written to the temporary file {temp} of {final}.")
        # flush to disk before the rename, so that after a power cut the new name never points to a hole
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temp, final)
    finally:
        if temp.exists():
            temp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """
    Write ``text`` to ``path`` as UTF-8 through :py:func:`atomic_write`; returns the path.

    UTF-8 whatever the locale: ITK's image IO switches the process to the C locale (ASCII) when it loads, and
    the reports hold characters such as "±".
    """
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def remove_stale_temporaries(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """
    Delete the temporary files a killed writer left in ``folder`` (names starting with :py:data:`TEMP_PREFIX`).

    Returns:
        the removed paths.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    pattern = f"**/{TEMP_PREFIX}*" if recursive else f"{TEMP_PREFIX}*"
    removed = [p for p in root.glob(pattern) if p.is_file()]
    for p in removed:
        p.unlink()
    return removed
