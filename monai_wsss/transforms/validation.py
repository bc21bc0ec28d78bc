# Copyright (c) monai_wsss contributors
# Licensed under the Apache License, Version 2.0
"""Checks that a loaded image / mask pair is a usable volume, failing with the file's name."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import MapTransform
from monai.utils import convert_to_tensor

from monai_wsss.transforms.intensity import source_name

__all__ = ["ValidateVolumed"]


class ValidateVolumed(MapTransform):
    """
    Check a loaded image (and optional mask) before any processing.

    Checks: each array is channel-first with ``spatial_dims`` spatial dimensions (a 2D file is rejected where a
    volume is expected), the image has no NaN / infinite value, the mask has one channel and the image's
    spatial shape, and (for MetaTensors) both share the same affine within ``atol``.

    Args:
        image_key: key of the image.
        seg_key: key of the mask (``None`` or missing from the data: image checks only).
        spatial_dims: expected number of spatial dimensions.
        atol: absolute tolerance (mm) of the affine comparison.
        check_affine: compare image and mask affines.

    Returns:
        the input dictionary, unchanged.

    Raises:
        ValueError: any check fails; the message names the key and the source file.

    Example::

        >>> import torch
        >>> ValidateVolumed()({"image": torch.rand(1, 4, 4, 4), "seg": torch.zeros(1, 4, 4, 4)})["image"].shape
        torch.Size([1, 4, 4, 4])
    """

    def __init__(
        self,
        image_key: str = "image",
        seg_key: str | None = "seg",
        spatial_dims: int = 3,
        atol: float = 1e-3,
        check_affine: bool = True,
    ) -> None:
        super().__init__([image_key] + ([seg_key] if seg_key else []), allow_missing_keys=True)
        self.image_key = image_key
        self.seg_key = seg_key
        self.spatial_dims = spatial_dims
        self.atol = atol
        self.check_affine = check_affine

    def _check_rank(self, key: str, arr: NdarrayOrTensor) -> None:
        if arr.ndim != self.spatial_dims + 1:
            raise ValueError(
                f"key '{key}': {source_name(arr)} has shape {tuple(arr.shape[1:])} (channel-first {tuple(arr.shape)}), "
                f"expected a {self.spatial_dims}D volume."
            )

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> Mapping[Hashable, NdarrayOrTensor]:
        if self.image_key not in data:
            raise ValueError(f"key '{self.image_key}' is missing (keys: {list(data)}).")
        img = data[self.image_key]
        self._check_rank(self.image_key, img)
        img_t = convert_to_tensor(img, track_meta=False)
        if torch.is_floating_point(img_t) and not bool(torch.isfinite(img_t).all()):
            n_bad = int((~torch.isfinite(img_t)).sum())
            raise ValueError(
                f"key '{self.image_key}': {source_name(img)} contains {n_bad} NaN or infinite intensities."
            )
        if self.seg_key is None or self.seg_key not in data:
            return data
        seg = data[self.seg_key]
        self._check_rank(self.seg_key, seg)
        if seg.shape[0] != 1:
            raise ValueError(
                f"key '{self.seg_key}': {source_name(seg)} has {seg.shape[0]} channels, expected one label map."
            )
        if tuple(seg.shape[1:]) != tuple(img.shape[1:]):
            raise ValueError(
                f"image {source_name(img)} has spatial shape {tuple(img.shape[1:])} but mask {source_name(seg)} has "
                f"{tuple(seg.shape[1:])} (keys '{self.image_key}', '{self.seg_key}')."
            )
        seg_t = convert_to_tensor(seg, track_meta=False)
        if torch.is_floating_point(seg_t) and not bool(torch.isfinite(seg_t).all()):
            raise ValueError(f"key '{self.seg_key}': {source_name(seg)} contains NaN or infinite values.")
        img_affine, seg_affine = getattr(img, "affine", None), getattr(seg, "affine", None)
        if self.check_affine and img_affine is not None and seg_affine is not None:
            a = np.asarray(img_affine, dtype=np.float64)
            b = np.asarray(seg_affine, dtype=np.float64)
            if a.shape != b.shape or not np.allclose(a, b, atol=self.atol, rtol=1e-5):
                raise ValueError(
                    f"image {source_name(img)} and mask {source_name(seg)} have different affines "
                    f"(keys '{self.image_key}', '{self.seg_key}'):\n{a}\nvs\n{b}"
                )
        return data
