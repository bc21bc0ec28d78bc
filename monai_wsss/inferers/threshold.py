# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""Intensity-threshold baseline: the image itself as the map, for targets brighter than the tissue around them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.inferers import Inferer
from monai.transforms import AsDiscrete
from monai.utils import convert_to_tensor

from monai_wsss.inferers.diffusion_map import DiffusionMapInferer
from monai_wsss.transforms.model_space import MODEL_INTENSITY_RANGE

__all__ = ["IntensityThresholdInferer", "masked_percentile"]


def masked_percentile(values: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """
    Per-row ``q``-th percentile of ``values`` over the entries where ``mask`` is True, batched.

    Same result as ``numpy.percentile(row[row_mask], q)`` (linear interpolation), with no size limit
    (``torch.quantile`` refuses more than 2**24 elements) and no Python loop over rows.

    Args:
        values: (N, M) float tensor.
        mask: (N, M) boolean tensor.
        q: percentile in [0, 100].

    Returns:
        (N,) tensor, NaN for rows without any masked entry.
    """
    count = mask.sum(1)
    # unmasked entries sort to the end of each row
    ordered = torch.where(mask, values, torch.full_like(values, float("inf"))).sort(dim=1).values
    pos = (q / 100.0) * (count - 1).clamp_min(0).to(values.dtype)
    low = pos.floor().long()
    high = pos.ceil().long()
    v_low = ordered.gather(1, low[:, None])[:, 0]
    v_high = ordered.gather(1, high[:, None])[:, 0]
    result = v_low + (pos - low.to(values.dtype)) * (v_high - v_low)
    return torch.where(count > 0, result, torch.full_like(result, float("nan")))


class IntensityThresholdInferer(Inferer):
    """
    Intensity baseline for hyperintense targets (e.g. tumours on FLAIR): the continuous map is the image
    intensity inside the body, optionally relative to a high percentile of the body's intensities, and the
    mask is that map above a fixed threshold. No network: the ``network`` argument only keeps the interface of
    the other inferers (``inferer(x0, network, ...) -> map``) and is ignored.

    With the defaults (``percentile=99``, ``threshold=0.7``) the mask keeps the pixels brighter than 0.7 times
    the 99th percentile of the body intensities: on BraTS FLAIR at 64 x 64 this already reaches a per-slice Dice
    of about 0.52-0.59, the bar the weakly supervised methods have to clear.

    Intensities are first mapped from ``intensity_range`` (model space, [-1, 1] by default) to [0, 1], so the
    background (the lower bound, the data pipeline's 0 outside the brain) is 0. Body = pixels above
    ``body_threshold`` on that scale; the map is 0 outside it.

    - ``percentile=None``: map = intensity in [0, 1]. The data pipeline already scales every volume by its own
      brain percentiles (``ScaleIntensityNonzeroPercentiles``), so this is relative to a per-volume percentile.
    - ``percentile=p``: map = intensity / (p-th percentile of the body intensities of each input item), i.e.
      per slice for (B, 1, H, W) input and per volume for (B, 1, H, W, D) input. Items without body
      pixels (or whose percentile is 0) get an all-zero map.

    Masks and the shared post-processing: :meth:`fixed_threshold_mask` is MONAI's ``AsDiscrete(threshold=threshold)``
    (``map >= threshold``) inside the body. Do not pass the
    map through ``NormalizeMap`` before a fixed threshold: it rescales each slice by its maximum and changes what
    the threshold means. For the protocol shared with the other methods (``NormalizeMap("signed")`` then Otsu)
    the map is treated like any other non-negative map.

    Args:
        percentile: reference percentile in (0, 100] of the body intensities, or None for no per-item reference.
        threshold: fixed threshold of :meth:`fixed_threshold_mask`, on the map's scale (> 0).
        intensity_range: (low, high) intensities of the model space, mapped to (0, 1).
        body_threshold: pixels with intensity above this (on the [0, 1] scale) form the body, in [0, 1).
        whole_volume: tell volume pipelines (:py:class:`~monai_wsss.apps.VolumeSegmentationPipeline`) to pass the
            whole volume ``(1, 1, H, W, D)`` at its own resolution instead of model-space slices, so the percentile
            is one per volume: the fixed per-volume threshold baseline (``intensity_range=(0, 1)`` for the
            pipeline's ``[0, 1]`` volumes).

    Returns (``__call__``):
        the map (>= 0, 0 outside the body), shape, device and dtype of the input.

    Raises:
        ValueError: ``percentile`` outside (0, 100], ``threshold <= 0``, ``intensity_range`` with high <= low,
            ``body_threshold`` outside [0, 1); at call time, an input that is not a float tensor of rank 4 or 5
            or holds NaN/inf values.

    Example::

        baseline = IntensityThresholdInferer(percentile=99.0, threshold=0.7)
        heat = baseline(x0, None)                     # continuous map, e.g. for AUROC
        mask = baseline.fixed_threshold_mask(x0)      # 0/1 mask, the fixed-threshold baseline
    """

    def __init__(
        self,
        percentile: float | None = 99.0,
        threshold: float = 0.7,
        intensity_range: Sequence[float] = MODEL_INTENSITY_RANGE,
        body_threshold: float = 0.0,
        whole_volume: bool = False,
    ) -> None:
        if percentile is not None and not 0.0 < float(percentile) <= 100.0:
            raise ValueError(f"percentile must be in (0, 100] or None, got {percentile!r}.")
        if not float(threshold) > 0.0:
            raise ValueError(f"threshold must be > 0 (on the map's scale), got {threshold!r}.")
        if len(intensity_range) != 2 or not float(intensity_range[1]) > float(intensity_range[0]):
            raise ValueError(f"intensity_range must be (low, high) with high > low, got {tuple(intensity_range)}.")
        if not 0.0 <= float(body_threshold) < 1.0:
            raise ValueError(f"body_threshold must be in [0, 1), got {body_threshold!r}.")
        self.percentile = None if percentile is None else float(percentile)
        self.threshold = float(threshold)
        self.intensity_range = (float(intensity_range[0]), float(intensity_range[1]))
        self.body_threshold = float(body_threshold)
        self.whole_volume = bool(whole_volume)

    def _map_and_body(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        DiffusionMapInferer.check_inputs(inputs, None)  # type: ignore[arg-type]  # float, rank 4/5, finite
        x = convert_to_tensor(inputs, track_meta=False)
        low, high = self.intensity_range
        unit = (x - low) / (high - low)
        body = unit > self.body_threshold
        heat = torch.where(body, unit, torch.zeros_like(unit))
        if self.percentile is not None:
            flat, flat_body = unit.flatten(1), body.flatten(1)
            ref = masked_percentile(flat, flat_body, self.percentile)
            valid = torch.isfinite(ref) & (ref > 0)
            scale = torch.where(valid, ref, torch.ones_like(ref)).reshape(-1, *([1] * (x.ndim - 1)))
            heat = torch.where(valid.reshape(scale.shape), heat / scale, torch.zeros_like(heat))
        return heat.to(inputs.dtype), body

    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: object = None, classifier: object = None
    ) -> torch.Tensor:
        """
        Args:
            inputs: images in model space (B, C, H, W) or (B, C, H, W, D).
            network: ignored (interface compatibility; None is fine).
            classifier: ignored (interface compatibility).

        Returns:
            the intensity map, shape, device and dtype of ``inputs``.
        """
        return self._map_and_body(inputs)[0]

    def fixed_threshold_mask(self, inputs: torch.Tensor) -> torch.Tensor:
        """
        The fixed-threshold baseline: MONAI's ``AsDiscrete(threshold=threshold)`` of the map, inside the body.

        Args:
            inputs: images in model space (B, C, H, W) or (B, C, H, W, D).

        Returns:
            a 0/1 mask with the shape, device and dtype of ``inputs``.
        """
        heat, body = self._map_and_body(inputs)
        mask = convert_to_tensor(AsDiscrete(threshold=self.threshold)(heat), track_meta=False)
        return (mask * body).to(inputs.dtype)
