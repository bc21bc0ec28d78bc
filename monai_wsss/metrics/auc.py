# Copyright (c) monai_wsss contributors
# Licensed under the Apache License, Version 2.0
"""AUROC / AUPRC of continuous maps: pixel level (the map as a pixel score) and slice level (its maximum)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from monai.metrics import CumulativeIterationMetric, IterationMetric
from monai.metrics.average_precision import compute_average_precision
from monai.metrics.rocauc import compute_roc_auc
from monai.utils import convert_to_tensor, optional_import

from monai_wsss.metrics.cumulative import RankLocalOption

from .segmentation import check_binary, slices_along

__all__ = ["compute_auroc_auprc", "PixelAUCMetric", "SliceAUCMetric"]

_sk_metrics, _has_sklearn = optional_import("sklearn.metrics")


def compute_auroc_auprc(scores: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> dict[str, float]:
    """
    Area under the ROC curve and average precision (area under the precision-recall curve, step-wise as
    in ``sklearn.metrics.average_precision_score``) of binary ``labels`` ranked by ``scores``.

    Uses scikit-learn when installed (sort-based, fast on millions of pixels), else MONAI's
    ``compute_roc_auc`` / ``compute_average_precision`` (same definitions, a Python loop per sample).

    Args:
        scores: 1D scores (higher = more likely positive).
        labels: 1D binary labels of the same length.

    Returns:
        ``{"auroc": float, "auprc": float}``; both ``nan`` (with a warning) when only one class is present.

    Raises:
        ValueError: different lengths, not 1D, NaN scores, or non-binary labels.

    Example::

        compute_auroc_auprc(torch.tensor([0.1, 0.9, 0.4]), torch.tensor([0, 1, 1]))  # {'auroc': 1.0, 'auprc': 1.0}
    """
    s = convert_to_tensor(scores, track_meta=False).detach().cpu()
    y = convert_to_tensor(labels, track_meta=False).detach().cpu()
    if s.ndim != 1 or y.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"`scores` and `labels` must be 1D of the same length, got {tuple(s.shape)} and {tuple(y.shape)}.")
    if torch.is_floating_point(s) and torch.isnan(s).any():
        raise ValueError("`scores` contains NaN.")
    check_binary(y, "labels")
    y = y.to(torch.int64)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.numel():
        warnings.warn(f"AUROC/AUPRC undefined with only one class among {y.numel()} samples: returning nan.", stacklevel=2)
        return {"auroc": float("nan"), "auprc": float("nan")}
    if _has_sklearn:
        s_np, y_np = s.double().numpy(), y.numpy()
        return {
            "auroc": float(_sk_metrics.roc_auc_score(y_np, s_np)),
            "auprc": float(_sk_metrics.average_precision_score(y_np, s_np)),
        }
    return {
        "auroc": float(compute_roc_auc(s.double(), y)),  # type: ignore[arg-type]
        "auprc": float(compute_average_precision(s.double(), y)),  # type: ignore[arg-type]
    }


def _check_body(body_mask: torch.Tensor | None, ref: torch.Tensor) -> torch.Tensor:
    if body_mask is None:
        return torch.ones_like(ref, dtype=torch.bool)
    body = convert_to_tensor(body_mask, track_meta=False, device=ref.device)
    if body.ndim != ref.ndim or body.shape[0] != ref.shape[0] or body.shape[2:] != ref.shape[2:] or body.shape[1] not in (
        1,
        ref.shape[1],
    ):
        raise ValueError(
            f"`body_mask` must match `y_pred` {tuple(ref.shape)} (channel may be 1), got {tuple(body.shape)}."
        )
    return (body != 0).expand_as(ref)


def _check_map_and_gt(y_pred: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if y is None:
        raise ValueError("`y` (ground truth) is required.")
    y_pred = convert_to_tensor(y_pred, track_meta=False)
    y = convert_to_tensor(y, track_meta=False, device=y_pred.device)
    if y_pred.ndim < 3:
        raise ValueError(f"`y_pred` must be batch-first and channel-first (B, C, *spatial), got shape {tuple(y_pred.shape)}.")
    if torch.is_floating_point(y_pred) and torch.isnan(y_pred).any():
        raise ValueError("`y_pred` contains NaN.")
    return y_pred, y


class PixelAUCMetric(IterationMetric):
    """
    Pixel-level AUROC and AUPRC of a continuous map against the pixel ground truth, pooled over all calls.

    Each call adds the pixels (inside ``body_mask`` when given) of a batch; ``aggregate()`` ranks all
    of them at once. The pixels are kept in memory (5 bytes each) until ``reset()``; with many full-size
    volumes pass a body mask to keep only the body. Buffers are local to the process (no distributed sync).
    Scores are pooled across slices and cases, so pass maps on a common scale (raw, or normalised per
    volume), not normalised per slice.

    Call: ``metric(y_pred, y, body_mask=None)`` with ``y_pred`` a map ``(B, C, *spatial)`` (any real
    values; higher = more likely target), ``y`` a binary mask of the same shape, ``body_mask`` of the same
    shape or with one channel.

    Returns (``aggregate``):
        ``{"auroc": float, "auprc": float, "num_pixels": int, "num_positive": int}``.

    Raises:
        ValueError: shape mismatch, NaN in the map, non-binary ``y``, bad ``body_mask``.

    Example::

        pixel_auc = PixelAUCMetric()
        pixel_auc(map3d, seg3d, body_mask=image3d)
        pixel_auc.aggregate()["auroc"]
    """

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        """Forget the accumulated pixels."""
        self._scores: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def __call__(  # type: ignore[override]
        self, y_pred: torch.Tensor, y: torch.Tensor | None = None, body_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        scores, labels = self._compute_tensor(y_pred, y, body_mask=body_mask)
        self._scores.append(scores)
        self._labels.append(labels)
        return scores

    def _compute_tensor(  # type: ignore[override]
        self, y_pred: torch.Tensor, y: torch.Tensor | None = None, body_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y_pred, y = _check_map_and_gt(y_pred, y)
        if y.shape != y_pred.shape:
            raise ValueError(f"`y_pred` and `y` must have the same shape, got {tuple(y_pred.shape)} and {tuple(y.shape)}.")
        check_binary(y, "y")
        body = _check_body(body_mask, y_pred)
        scores = y_pred.detach()[body].float().cpu()
        labels = (y[body] != 0).cpu()
        return scores, labels

    def aggregate(self) -> dict[str, float | int]:  # type: ignore[override]
        if not self._scores:
            raise ValueError("PixelAUCMetric.aggregate() called before any data was added.")
        scores, labels = torch.cat(self._scores), torch.cat(self._labels)
        out: dict[str, float | int] = dict(compute_auroc_auprc(scores, labels))
        out["num_pixels"] = int(labels.numel())
        out["num_positive"] = int(labels.sum())
        return out


class SliceAUCMetric(RankLocalOption, CumulativeIterationMetric):
    """
    Slice-level AUROC and AUPRC of the map's maximum as an anomaly score.

    Each 2D slice gets the score ``max(map)`` (inside ``body_mask`` when given) and the label "target
    present" (non-empty ground truth). Slices whose body mask is empty are left out (they are trivially
    negative and would flatter the score). Pass the raw map (or one normalised per volume or with a fixed
    scale), not a map normalised per slice: after per-slice normalisation every slice's maximum is 1 and
    the AUROC is 0.5 by construction.

    Call: ``metric(y_pred, y, body_mask=None)``, with ``y_pred`` a batch of 2D maps ``(B, 1, H, W)`` or of
    volumes ``(B, 1, H, W, D)`` (sliced along ``slice_axis``); ``y`` the binary ground truth of the same
    shape, or for 2D maps the slice labels ``(B,)`` / ``(B, 1)``; ``body_mask`` shaped like ``y_pred``.

    Args:
        slice_axis: spatial axis along which volumes are sliced.
        all_ranks: under ``torch.distributed``, gather the slices of every rank when they are read (MONAI's
            default); ``False``: this process's only.

    Returns (``aggregate``):
        ``{"auroc": float, "auprc": float, "num_slices": int, "num_positive": int}``.

    Raises:
        ValueError: wrong rank, more than one channel, shape mismatch, NaN in the map, non-binary ``y``.

    Example::

        slice_auc = SliceAUCMetric(slice_axis=-1)
        slice_auc(map3d, seg3d, body_mask=image3d)
        slice_auc.aggregate()["auroc"]
    """

    def __init__(self, slice_axis: int = -1, all_ranks: bool = True) -> None:
        super().__init__()
        self.all_ranks = bool(all_ranks)
        if not isinstance(slice_axis, (int, np.integer)) or not -3 <= int(slice_axis) <= 2:
            raise ValueError(f"`slice_axis` must be a spatial axis in [-3, 2], got {slice_axis!r}.")
        self.slice_axis = int(slice_axis) % 3

    def _compute_tensor(  # type: ignore[override]
        self, y_pred: torch.Tensor, y: torch.Tensor | None = None, body_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        y_pred, y = _check_map_and_gt(y_pred, y)
        if y_pred.ndim not in (4, 5) or y_pred.shape[1] != 1:
            raise ValueError(f"`y_pred` must be (B, 1, H, W) or (B, 1, H, W, D), got shape {tuple(y_pred.shape)}.")
        check_binary(y, "y")
        body = _check_body(body_mask, y_pred)
        if y_pred.ndim == 4 and y.ndim in (1, 2) and y.shape[0] == y_pred.shape[0] and y.numel() == y_pred.shape[0]:
            labels = y.reshape(-1) != 0
        elif y.shape == y_pred.shape:
            labels = None
        else:
            raise ValueError(
                f"`y` must have the shape of `y_pred` {tuple(y_pred.shape)}"
                f"{' or be slice labels (B,)' if y_pred.ndim == 4 else ''}, got {tuple(y.shape)}."
            )
        if y_pred.ndim == 5:
            y_pred, body = slices_along(y_pred, self.slice_axis), slices_along(body, self.slice_axis)
            y = slices_along(y, self.slice_axis)
        if labels is None:
            labels = y.flatten(1).any(1)
        flat = y_pred.detach().flatten(1).double()
        flat_body = body.flatten(1)
        scores = torch.where(flat_body, flat, torch.full_like(flat, -float("inf"))).amax(1)
        keep = flat_body.any(1)
        return torch.stack([scores[keep], labels[keep].double()], 1).cpu()

    def aggregate(self) -> dict[str, float | int]:  # type: ignore[override]
        if self._buffers is None or all(len(b) == 0 for b in self._buffers):
            raise ValueError("SliceAUCMetric.aggregate() called before any slice with body was added.")
        rows = self.get_buffer()
        out: dict[str, float | int] = dict(compute_auroc_auprc(rows[:, 0], rows[:, 1]))
        out["num_slices"] = int(rows.shape[0])
        out["num_positive"] = int(rows[:, 1].sum())
        return out
