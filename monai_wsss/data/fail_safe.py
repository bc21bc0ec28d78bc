# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""A MONAI ``Dataset`` for runs over many scans: an item whose preprocessing fails comes back as a failure record."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence

from monai.data import Dataset

from monai_wsss.utils.errors import describe_error

__all__ = ["FAILED_KEY", "FailSafeDataset", "failure_record"]

logger = logging.getLogger(__name__)

#: the key of a failure record's reason
FAILED_KEY = "failed"


def failure_record(item: Mapping, reason: str) -> dict:
    """
    What is kept of an item that failed: its plain identifying entries (``case``, paths, ``output_name`` ...) and
    ``failed``: the reason. Tensors and arrays are dropped, so the record collates and costs no memory.

    Example::

        >>> failure_record({"case": "a", "image": "a.nii.gz"}, "ValueError: all zero")
        {'case': 'a', 'image': 'a.nii.gz', 'failed': 'ValueError: all zero'}
    """
    keep = (str, int, float, bool, os.PathLike)
    record = {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in item.items() if isinstance(v, keep)}
    record[FAILED_KEY] = str(reason)
    return record


class FailSafeDataset(Dataset):
    """
    A MONAI :py:class:`~monai.data.Dataset` whose items that fail their transform (an unreadable file, a 2D image,
    an all-zero or NaN scan ...) are returned as a :py:func:`failure_record` instead of raising, so that one bad
    scan does not end a run over a folder of scans. :py:class:`~monai_wsss.engines.VolumeEvaluator` skips such
    records and the run folder lists them with their reason.

    Only ``Exception`` subclasses are caught (``KeyboardInterrupt`` still stops the run); with
    ``fail_safe=False`` it is a plain ``Dataset``.

    Args:
        data: the items (dicts, e.g. ``{"case", "image", "output_name"}``).
        transform: the preprocessing.
        fail_safe: return failure records (``True``) or raise (``False``).

    Example::

        dataset = FailSafeDataset(items, transform=preprocessing)
        dataset[0]   # {"case": "bad", "image": "bad.nii.gz", "failed": "ValueError: key 'image': ... is all zero"}
    """

    def __init__(self, data: Sequence, transform: Callable | None = None, fail_safe: bool = True) -> None:
        super().__init__(data=data, transform=transform)
        self.fail_safe = bool(fail_safe)

    def _transform(self, index: int):
        try:
            return super()._transform(index)
        except Exception as err:
            item = self.data[index]
            if not self.fail_safe or not isinstance(item, Mapping):
                raise
            reason = describe_error(err)
            logger.error(f"{item.get('case', item.get('image', index))}: cannot be segmented: {reason}")
            return failure_record(item, reason)
