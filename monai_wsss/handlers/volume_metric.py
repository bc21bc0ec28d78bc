# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""The evaluator's key metric over whole scans: MONAI's ``MeanDice`` for runs in which a scan may fail or be done."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from monai.handlers import MeanDice
from monai.utils import min_version, optional_import

from monai_wsss.handlers.volume_run import engine_items

Engine, _ = optional_import("ignite.engine", "0.4.11", min_version, "Engine")

__all__ = ["VolumeMeanDice"]

logger = logging.getLogger(__name__)


class VolumeMeanDice(MeanDice):
    """
    MONAI's :py:class:`~monai.handlers.MeanDice` as the ``key_metric`` of a whole-scan evaluation
    (:py:class:`~monai_wsss.engines.VolumeEvaluator`): the mean over scans of the volume Dice of the binary mask
    against the target mask, both in the preprocessed scan's space.

    It differs from ``MeanDice`` where a run over scans differs from a pass over a test set:

    - the mask and the target are read from the merged batch and output (:py:func:`engine_items`: MONAI's
      postprocessing leaves the loaded ``seg`` in the batch and puts the ``mask`` in the output); the map methods,
      whose masks are thresholded over the whole run at its end, pass them to :py:meth:`add` (the metric is one of
      the ``consumers`` of :py:class:`~monai_wsss.handlers.DatasetThresholdHandler`);
    - a scan that could not be segmented (a failure record) is not scored, instead of ending the run;
    - it scores the scans this run segments: a rerun that resumes a run folder scores only the scans it redoes
      (the report of :py:class:`VolumeReportHandler` scores every scan of the folder). When no scan was scored, in
      this process or (under ``torch.distributed``) in any rank, it is NaN and says why, instead of raising;
    - as ``MeanDice``, it pools the scans of every rank (MONAI gathers the per-scan scores), so a sharded run
      (``multi_gpu_inference.json``) reports one mean over all its scans.

    Args:
        mask_key: key of the binary mask (``(1, H, W, D)``).
        label_key: key of the target mask (same shape, 0/1).
        kwargs: the other arguments of ``MeanDice`` (``include_background`` defaults to ``True``: one foreground
            channel).

    Example::

        "key_metric": {"val_mean_dice": {"_target_": "monai_wsss.handlers.VolumeMeanDice", "mask_key": "mask",
                                         "label_key": "seg"}},
        "evaluator": {..., "key_val_metric": "@key_metric"}
    """

    def __init__(self, mask_key: str = "mask", label_key: str = "seg", **kwargs: Any) -> None:
        kwargs.setdefault("include_background", True)
        super().__init__(**kwargs)
        self.mask_key = mask_key
        self.label_key = label_key
        self.num_scored = 0

    def reset(self) -> None:
        """Start a run: no scan scored."""
        super().reset()
        self.num_scored = 0

    def iteration_completed(self, engine: Engine) -> None:
        """Score the iteration's segmented scans that have their mask (none for failure records; the map methods'
        masks come at the end of the run, through :py:meth:`add`)."""
        for item in engine_items(engine):
            if self.mask_key in item:
                self.add(item)

    def add(self, item: Mapping) -> None:
        """
        Score one segmented scan: a consumer of :py:class:`~monai_wsss.handlers.DatasetThresholdHandler`, which
        makes the map methods' masks at the end of the run.

        Raises:
            KeyError: the item has no ``mask_key`` or ``label_key`` (evaluation needs the target mask).
        """
        for key in (self.mask_key, self.label_key):
            if key not in item:
                raise KeyError(f"{self._name or 'mean Dice'}: scan {item.get('case', '?')} has no {key!r} to score.")
        self.update(([item[self.mask_key]], [item[self.label_key]]))
        self.num_scored += 1

    def compute(self) -> Any:
        """The mean volume Dice over every scored scan of every rank, or NaN when a process scored none."""
        scored = torch.tensor(min(self.num_scored, 1))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank takes the same branch: MONAI's gather below is a collective
            torch.distributed.all_reduce(scored, op=torch.distributed.ReduceOp.MIN)
        if not int(scored):
            logger.warning(
                f"{self._name or 'mean Dice'}: no scan was segmented in this run (every scan done or failed, in at "
                "least one process): NaN; the evaluation report scores every scan of the run folder"
            )
            self._is_reduced = True
            return float("nan")
        return super().compute()
