# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""Cumulative metrics whose buffer may stay in one process under ``torch.distributed``."""

from __future__ import annotations

import torch

__all__ = ["RankLocalOption"]


class RankLocalOption:
    """
    Mixin for a MONAI ``Cumulative`` metric: with ``all_ranks = False`` its buffer holds this process's data only.

    MONAI gathers a cumulative metric's buffer over every rank when it is read (``get_buffer``, a collective), which
    is what a metric of a whole sharded dataset needs. Scores of items that one process alone holds (the slices of
    one scan) must not be gathered: every rank would have to read the same number of such metrics in the same
    order, and the gathered buffer would mix scans. Set ``all_ranks`` (e.g. in ``__init__``) before reading.
    """

    all_ranks: bool = True

    def _sync(self) -> None:
        if self.all_ranks:
            super()._sync()  # type: ignore[misc]
            return
        if self._synced or self._buffers is None:  # type: ignore[attr-defined]
            return
        self._synced_tensors = [torch.stack(b, dim=0) for b in self._buffers]  # type: ignore[attr-defined]
        self._synced = True
