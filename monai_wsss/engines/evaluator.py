# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""A MONAI ``SupervisedEvaluator`` over whole scans in which one scan's failure does not end the run."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.data import decollate_batch
from monai.engines import SupervisedEvaluator
from monai.utils import min_version, optional_import

from monai_wsss.data.fail_safe import FAILED_KEY, failure_record
from monai_wsss.utils.errors import describe_error

__all__ = ["VolumeEvaluator", "batch_failures", "out_of_memory"]

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")

logger = logging.getLogger(__name__)


def out_of_memory(err: BaseException) -> bool:
    """Whether an error is a scan too large for the device's memory (CUDA or CPU allocation failure)."""
    oom = getattr(torch, "OutOfMemoryError", None)
    if isinstance(err, MemoryError) or (oom is not None and isinstance(err, oom)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def batch_failures(batch: Any, failed_key: str = FAILED_KEY) -> list[str] | None:
    """
    The reasons of the failure records in a collated batch (from :py:class:`~monai_wsss.data.FailSafeDataset`),
    or ``None`` when no item of the batch failed.
    """
    if not isinstance(batch, Mapping) or failed_key not in batch:
        return None
    reasons = batch[failed_key]
    return [str(r) for r in (reasons if isinstance(reasons, (list, tuple)) else [reasons])]


class VolumeEvaluator(SupervisedEvaluator):
    """
    MONAI's :py:class:`~monai.engines.SupervisedEvaluator` for a run over whole scans, where a scan that cannot be
    segmented is recorded and skipped instead of ending the run:

    - a batch of failure records (its preprocessing failed in a :py:class:`~monai_wsss.data.FailSafeDataset`: an
      unreadable, 2D, all-zero or NaN scan) runs no network and no postprocessing;
    - running out of memory while the batch is inferred or post-processed (a scan too large for the device)
      turns the batch into failure records.

    Any other error in inference or postprocessing (the network does not fit the method, a bug, a full disk) would
    repeat on every scan: it ends the run, as in ``SupervisedEvaluator``.

    Either way ``engine.state.batch`` and ``engine.state.output`` become the list of failure records (``case``,
    paths and ``failed``: the reason in one line), which the handlers of :py:mod:`monai_wsss.handlers` read: the
    run folder lists the failures in ``predictions.csv`` and its manifest, and the run ends with
    :py:class:`~monai_wsss.apps.FailedVolumesError` after every other scan is written. ``KeyboardInterrupt`` and
    other non-``Exception`` errors end the run as usual.

    The key metric and additional metrics are attached after ``val_handlers``, so that a metric that also takes the
    masks a handler makes at the end of the run (:py:class:`~monai_wsss.handlers.VolumeMeanDice` as a consumer of
    :py:class:`~monai_wsss.handlers.DatasetThresholdHandler`) is computed once they are all in.

    Args:
        args, kwargs: those of ``SupervisedEvaluator``.
        skip_failed: record and skip failing scans (``False``: any error ends the run, as in
            ``SupervisedEvaluator``).
        failed_key: key of a failure record's reason.

    Example::

        evaluator = VolumeEvaluator(device, FailSafeDataset(items, preprocessing) ..., network=net, inferer=inferer,
                                    postprocessing=post, val_handlers=[RunFolderHandler(folder)])
        evaluator.run()
    """

    def __init__(self, *args: Any, skip_failed: bool = True, failed_key: str = FAILED_KEY, **kwargs: Any) -> None:
        # the metrics are attached after the handlers (MONAI attaches them first): their end-of-epoch values then
        # include the masks that handlers make at the end of the run (DatasetThresholdHandler's consumers)
        key_val_metric = kwargs.pop("key_val_metric", None)
        additional_metrics = kwargs.pop("additional_metrics", None)
        super().__init__(*args, **kwargs)
        if key_val_metric is not None:
            self._register_metrics(key_val_metric, additional_metrics)
        self.skip_failed = bool(skip_failed)
        self.failed_key = failed_key

    def run(self, global_epoch: int = 1) -> None:  # type: ignore[override]
        """
        Evaluate every volume of the data loader. With none left (a rerun after an interrupted run wrote every
        map), MONAI's ``Workflow.run`` would skip the run and with it its end; here the run's start and end events
        still fire, so the handlers make the dataset-level masks, the reports and ``predictions.csv``.
        """
        if self.state.epoch_length != 0:
            super().run(global_epoch)
            return
        self.state.max_epochs = max(global_epoch, 1)
        self.state.epoch, self.state.iteration = global_epoch, 0
        try:
            for event in (Events.STARTED, Events.EPOCH_STARTED, Events.EPOCH_COMPLETED, Events.COMPLETED):
                self._fire_event(event)
        except Exception as err:  # as ignite does: the run's exception handlers (which release the folder) see it
            if Events.EXCEPTION_RAISED not in self._event_handlers:
                raise
            self._fire_event(Events.EXCEPTION_RAISED, err)

    def _iteration(self, engine: SupervisedEvaluator, batchdata: dict[str, torch.Tensor]) -> dict | list:
        reasons = batch_failures(batchdata, self.failed_key)
        if reasons is None:
            try:
                return super()._iteration(engine, batchdata)
            except Exception as err:
                if not self.skip_failed or not out_of_memory(err):
                    raise
                reason = describe_error(err)
                logger.error(f"{_cases(batchdata)}: cannot be segmented: {reason}")
                reasons = [reason]
        items = decollate_batch(batchdata, detach=True) if isinstance(batchdata, Mapping) else list(batchdata)
        if len(reasons) == 1 and len(items) > 1:
            reasons = reasons * len(items)
        records = [failure_record(dict(item), reason) for item, reason in zip(items, reasons)]
        engine.state.batch = records
        engine.state.output = [dict(r) for r in records]
        return engine.state.output


def _cases(batch: Any) -> str:
    cases = batch.get("case") if isinstance(batch, Mapping) else None
    if isinstance(cases, Sequence) and not isinstance(cases, str):
        return ", ".join(str(c) for c in cases)
    return str(cases if cases is not None else "a batch")
