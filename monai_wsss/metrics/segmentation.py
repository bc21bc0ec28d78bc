# Copyright (c) monai_wsss contributors
# Licensed under the Apache License, Version 2.0
"""Dice, IoU and HD95 per positive slice and per volume, on top of MONAI's metric functions."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from monai.metrics import CumulativeIterationMetric
from monai.metrics.hausdorff_distance import compute_hausdorff_distance
from monai.metrics.meandice import compute_dice
from monai.metrics.meaniou import compute_iou
from monai.config.type_definitions import NdarrayOrTensor
from monai.utils import convert_to_tensor

from monai_wsss.metrics.cumulative import RankLocalOption

__all__ = ["SegmentationScores", "SEGMENTATION_LEVELS", "binary_dice", "check_binary", "slices_along"]

SEGMENTATION_LEVELS = ("slice", "volume")

# columns of the per-item buffer
_SCORED, _DICE, _IOU, _HD, _HD_MM, _PRED_EMPTY = range(6)
_NUM_COLUMNS = 6

SpacingLike = float | Sequence[float] | Sequence[Sequence[float]] | None


def check_binary(t: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless every value of ``t`` is 0 or 1."""
    if t.dtype == torch.bool:
        return
    if not bool(((t == 0) | (t == 1)).all()):
        bad = t[(t != 0) & (t != 1)]
        raise ValueError(
            f"`{name}` must be binary (0/1); found value(s) such as {bad.flatten()[:3].tolist()}. "
            "Threshold continuous maps first (e.g. OtsuThreshold)."
        )


def binary_dice(pred: NdarrayOrTensor, truth: NdarrayOrTensor, ignore_empty: bool = True) -> float:
    """
    Dice of two binary masks of one shape (a slice, a volume), as one item of MONAI's ``compute_dice``, the
    computation behind ``DiceMetric`` and :py:class:`SegmentationScores`.

    Args:
        pred: predicted mask (bool or 0/1), NumPy or torch, any shape.
        truth: ground-truth mask of the same shape.
        ignore_empty: MONAI's convention: True gives NaN where ``truth`` is empty (Dice undefined), False gives
            1 there for an empty ``pred`` and 0 otherwise.

    Returns:
        the Dice coefficient (NaN where undefined).

    Raises:
        ValueError: different shapes, or values other than 0/1.

    Example::

        >>> import numpy as np
        >>> binary_dice(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0]))
        0.6666666865348816
    """
    p = convert_to_tensor(pred, track_meta=False)
    t = convert_to_tensor(truth, track_meta=False)
    if p.shape != t.shape:
        raise ValueError(f"`pred` and `truth` must have the same shape, got {tuple(p.shape)} and {tuple(t.shape)}.")
    check_binary(p, "pred")
    check_binary(t, "truth")
    # the whole mask as one item with one channel: compute_dice reduces over everything after (B, C)
    one = compute_dice(p.reshape(1, 1, -1).float(), t.reshape(1, 1, -1).float(), include_background=True,
                       ignore_empty=ignore_empty)
    return float(one.reshape(()))


def _normalize_axis(slice_axis: int) -> int:
    if not isinstance(slice_axis, (int, np.integer)) or not -3 <= int(slice_axis) <= 2:
        raise ValueError(f"`slice_axis` must be a spatial axis in [-3, 2], got {slice_axis!r}.")
    return int(slice_axis) % 3


def slices_along(t: torch.Tensor, slice_axis: int) -> torch.Tensor:
    """``(B, C, H, W, D)`` -> ``(B * n_slices, C, a, b)``, item-major, slicing along spatial ``slice_axis``."""
    axis = _normalize_axis(slice_axis)
    moved = t.movedim(axis + 2, 1)  # (B, n, C, a, b)
    return moved.reshape(-1, *moved.shape[2:])


def _per_item_spacing(spacing: SpacingLike, batch: int, spatial_dims: int) -> list[tuple[float, ...]] | None:
    """Normalise ``spacing`` to one tuple of ``spatial_dims`` floats per item, or None."""
    if spacing is None:
        return None
    if isinstance(spacing, torch.Tensor):
        spacing = spacing.tolist()
    if isinstance(spacing, np.ndarray):
        spacing = spacing.tolist()
    if isinstance(spacing, (int, float)):
        per_item = [(float(spacing),) * spatial_dims] * batch
    elif len(spacing) > 0 and all(isinstance(s, (int, float)) for s in spacing):
        per_item = [tuple(float(s) for s in spacing)] * batch
    else:
        per_item = [tuple(float(v) for v in (s.tolist() if hasattr(s, "tolist") else s)) for s in spacing]
        if len(per_item) != batch:
            raise ValueError(f"`spacing` has {len(per_item)} per-item entries but the batch has {batch} items.")
    for s in per_item:
        if len(s) != spatial_dims or not all(np.isfinite(v) and v > 0 for v in s):
            raise ValueError(f"`spacing` must give {spatial_dims} positive finite values per item, got {s}.")
    return per_item


class SegmentationScores(RankLocalOption, CumulativeIterationMetric):
    """
    Dice, IoU and HD95 (pixels and mm) of binary masks, per positive slice or per volume.

    ``level="slice"`` follows the CDM paper's protocol: every 2D slice whose ground truth is non-empty is
    scored and the scores are averaged over those slices; slices with empty ground truth are not scored
    but counted (``num_negative``, and ``num_negative_with_prediction`` for false alarms). Inputs may be
    batches of 2D slices ``(B, 1, H, W)`` or of volumes ``(B, 1, H, W, D)``, sliced along ``slice_axis``.
    ``level="volume"`` scores each 3D volume ``(B, 1, H, W, D)`` with non-empty ground truth as a whole.

    Dice and IoU come from MONAI's ``compute_dice`` / ``compute_iou`` (the computations behind
    ``DiceMetric`` and ``MeanIoU``; an empty prediction scores 0). HD95 comes from MONAI's
    ``compute_hausdorff_distance(percentile=95)`` (behind ``HausdorffDistanceMetric``), symmetric, in
    pixels and, when a spacing is known, in mm. An empty prediction has no surface, so its HD95 is
    undefined: it is recorded as ``nan`` and counted in ``num_hd95_missing`` (never scored as 0), and the
    HD95 means are over the items where it is defined.

    Args:
        level: ``"slice"`` or ``"volume"``.
        slice_axis: spatial axis of a volume along which slices are taken for ``level="slice"``.
        spacing: default pixel / voxel spacing in mm for HD95 in mm: a number (isotropic), one value per
            spatial dimension of the *input* (3 for volumes, also when scoring their slices; 2 for 2D
            slices), or one such sequence per batch item. ``None``: HD95 in mm is ``nan``.
        percentile: Hausdorff distance percentile (95 for HD95).
        distance_metric: ``"euclidean"``, ``"chessboard"`` or ``"taxicab"`` (MONAI's options).
        all_ranks: under ``torch.distributed``, gather the scores of every rank when they are read (MONAI's
            default); ``False``: this process's only (e.g. the slices of one scan).

    Call with ``scores(y_pred, y, spacing=None)``: binary ``y_pred`` and ``y`` of the same shape;
    ``spacing`` overrides the default for that batch. ``aggregate()`` returns a dict; ``get_scores()``
    the per-item values.

    Raises:
        ValueError: unknown ``level``, wrong rank (``(B, 1, H, W)`` or ``(B, 1, H, W, D)`` for slices,
            ``(B, 1, H, W, D)`` for volumes), more than one channel, shapes of ``y_pred`` and ``y`` that
            differ, non-binary inputs, a bad ``spacing``.

    Example::

        scores = SegmentationScores(level="slice", slice_axis=-1, spacing=(1.0, 1.0, 1.0))
        for mask, seg in cases:              # (1, 1, 240, 240, 155) each
            scores(mask, seg)
        scores.aggregate()  # {'dice': ..., 'iou': ..., 'hd95': ..., 'hd95_mm': ..., 'num_scored': ..., ...}
    """

    def __init__(
        self,
        level: str = "slice",
        slice_axis: int = -1,
        spacing: SpacingLike = None,
        percentile: float = 95.0,
        distance_metric: str = "euclidean",
        all_ranks: bool = True,
    ) -> None:
        super().__init__()
        self.all_ranks = bool(all_ranks)
        if level not in SEGMENTATION_LEVELS:
            raise ValueError(f"`level` must be one of {SEGMENTATION_LEVELS}, got {level!r}.")
        self.level = level
        self.slice_axis = _normalize_axis(slice_axis)
        if not 0 < float(percentile) <= 100:
            raise ValueError(f"`percentile` must be in (0, 100], got {percentile!r}.")
        self.spacing = spacing
        self.percentile = float(percentile)
        self.distance_metric = distance_metric

    def _prepare(self, y_pred: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if y is None:
            raise ValueError("`y` (ground truth) is required.")
        # plain tensors: MetaTensor bookkeeping is useless here and slows indexing down
        y_pred = convert_to_tensor(y_pred, track_meta=False)
        y = convert_to_tensor(y, track_meta=False, device=y_pred.device)
        if y_pred.shape != y.shape:
            raise ValueError(f"`y_pred` and `y` must have the same shape, got {tuple(y_pred.shape)} and {tuple(y.shape)}.")
        allowed = (4, 5) if self.level == "slice" else (5,)
        if y_pred.ndim not in allowed:
            expected = "(B, 1, H, W) or (B, 1, H, W, D)" if self.level == "slice" else "(B, 1, H, W, D)"
            raise ValueError(f"`y_pred` must be {expected} for level={self.level!r}, got shape {tuple(y_pred.shape)}.")
        if y_pred.shape[1] != 1:
            raise ValueError(f"`y_pred` must have one channel (a binary target mask), got {y_pred.shape[1]}.")
        check_binary(y_pred, "y_pred")
        check_binary(y, "y")
        return y_pred.float(), y.float()

    def _compute_tensor(  # type: ignore[override]
        self, y_pred: torch.Tensor, y: torch.Tensor | None = None, spacing: SpacingLike = None, **kwargs: Any
    ) -> torch.Tensor:
        """Per-item rows ``(n_items, 6)``: scored flag, Dice, IoU, HD95 px, HD95 mm, empty-prediction flag."""
        y_pred, y = self._prepare(y_pred, y)
        batch, input_dims = y_pred.shape[0], y_pred.ndim - 2
        item_spacing = _per_item_spacing(self.spacing if spacing is None else spacing, batch, input_dims)
        if self.level == "slice" and input_dims == 3:
            n_slices = y_pred.shape[2 + self.slice_axis]
            y_pred, y = slices_along(y_pred, self.slice_axis), slices_along(y, self.slice_axis)
            if item_spacing is not None:
                in_plane = [tuple(v for i, v in enumerate(s) if i != self.slice_axis) for s in item_spacing]
                item_spacing = [s for s in in_plane for _ in range(n_slices)]

        rows = torch.full((y_pred.shape[0], _NUM_COLUMNS), float("nan"), dtype=torch.float64)
        gt_nonempty = y.flatten(1).any(1).cpu()
        pred_nonempty = y_pred.flatten(1).any(1).cpu()
        rows[:, _SCORED] = gt_nonempty.double()
        rows[:, _PRED_EMPTY] = (~pred_nonempty).double()
        scored = torch.nonzero(gt_nonempty).flatten()
        if scored.numel() == 0:
            return rows
        p, g = y_pred[scored.to(y_pred.device)], y[scored.to(y.device)]
        rows[scored, _DICE] = compute_dice(p, g, include_background=True, ignore_empty=True)[:, 0].double().cpu()
        rows[scored, _IOU] = compute_iou(p, g, include_background=True, ignore_empty=True)[:, 0].double().cpu()

        # HD95 only where both surfaces exist; an empty prediction keeps nan (missing), never 0
        with_surface = scored[pred_nonempty[scored]]
        if with_surface.numel() > 0:
            rows[with_surface, _HD], rows[with_surface, _HD_MM] = self._hd95(y_pred, y, with_surface, item_spacing)
        return rows

    def _hd95(
        self, y_pred: torch.Tensor, y: torch.Tensor, items: torch.Tensor, item_spacing: list[tuple[float, ...]] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """HD95 in pixels and in mm (nan without spacing) of the given items."""
        idx = items.to(y_pred.device)
        hd_args = dict(include_background=True, distance_metric=self.distance_metric, percentile=self.percentile)
        with warnings.catch_warnings():
            # MONAI 1.5-1.6 warns about its own internal use of a deprecated argument on every call
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
            hd_px = compute_hausdorff_distance(y_pred[idx], y[idx], **hd_args)[:, 0].double().cpu()  # type: ignore[arg-type]
            hd_mm = torch.full_like(hd_px, float("nan"))
            if item_spacing is not None:
                sp = [item_spacing[int(i)] for i in items]
                hd_mm = compute_hausdorff_distance(y_pred[idx], y[idx], spacing=sp, **hd_args)[:, 0]  # type: ignore[arg-type]
                hd_mm = hd_mm.double().cpu()
        return hd_px, hd_mm

    def _rows(self) -> torch.Tensor:
        buffer = self.get_buffer()
        if buffer is None or (isinstance(buffer, torch.Tensor) and buffer.numel() == 0):
            return torch.zeros((0, _NUM_COLUMNS), dtype=torch.float64)
        if isinstance(buffer, (list, tuple)):
            return torch.cat([b.reshape(-1, _NUM_COLUMNS) for b in buffer], 0)
        return buffer.reshape(-1, _NUM_COLUMNS)

    def get_scores(self) -> dict[str, torch.Tensor]:
        """
        Per scored item (positive slice or volume, in call order) values.

        Returns:
            dict of 1D float64 tensors ``dice``, ``iou``, ``hd95``, ``hd95_mm`` (``nan`` where missing) and
            a bool tensor ``pred_empty``.
        """
        rows = self._rows()
        rows = rows[rows[:, _SCORED] == 1]
        return {
            "dice": rows[:, _DICE],
            "iou": rows[:, _IOU],
            "hd95": rows[:, _HD],
            "hd95_mm": rows[:, _HD_MM],
            "pred_empty": rows[:, _PRED_EMPTY] == 1,
        }

    def aggregate(self) -> dict[str, float | int]:  # type: ignore[override]
        """
        Returns:
            dict with ``dice``, ``iou`` (means over scored items), ``hd95``, ``hd95_mm`` (means over scored
            items with a non-empty prediction; ``nan`` if none), their standard deviations ``*_std``,
            ``num_scored``, ``num_hd95_missing`` (scored items with an empty prediction), ``num_negative``
            (items with empty ground truth, not scored) and ``num_negative_with_prediction``.
        """
        rows = self._rows()
        scored = rows[rows[:, _SCORED] == 1]
        negative = rows[rows[:, _SCORED] == 0]

        def mean_std(values: torch.Tensor) -> tuple[float, float]:
            values = values[~torch.isnan(values)]
            if values.numel() == 0:
                return float("nan"), float("nan")
            return float(values.mean()), float(values.std(unbiased=False))

        out: dict[str, float | int] = {}
        for name, col in (("dice", _DICE), ("iou", _IOU), ("hd95", _HD), ("hd95_mm", _HD_MM)):
            out[name], out[f"{name}_std"] = mean_std(scored[:, col])
        out["num_scored"] = int(scored.shape[0])
        out["num_hd95_missing"] = int((scored[:, _PRED_EMPTY] == 1).sum())
        out["num_negative"] = int(negative.shape[0])
        out["num_negative_with_prediction"] = int((negative[:, _PRED_EMPTY] == 0).sum())
        return out
