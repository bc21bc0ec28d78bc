# Copyright (c) monai_wsss contributors
# Licensed under the Apache License, Version 2.0
"""Checks that a loaded image / mask pair is a usable volume, failing with the file's name; and a warning when a
normalised scan looks like none of the model's training scans."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_tensor

from monai_wsss.transforms.intensity import source_name

__all__ = ["CheckIntensityProfile", "CheckIntensityProfiled", "ValidateVolumed"]

logger = logging.getLogger(__name__)


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


class CheckIntensityProfile(Transform):
    """
    Warn when a normalised scan does not look like any of the model's training scans: its
    :py:func:`~monai_wsss.data.body_percentile` (the 90th percentile of the normalised intensity inside the body)
    lies outside the
    training scans' range (:py:func:`~monai_wsss.data.write_intensity_profile`) by more than ``tolerance``. The
    image passes unchanged; the warning names the scan, its value and the range, and is kept in the image's
    meta data (``intensity_warning``). A large bright structure that is not the target pulls the value down, and
    masks of such a scan deserve a look.

    Args:
        profile: the profile (a dict or the path of its JSON file).
        tolerance: relative margin: a value counts as outside below ``low / (1 + tolerance)`` or above
            ``high * (1 + tolerance)``.

    Returns:
        the input image, unchanged.

    Raises:
        ValueError: ``tolerance`` < 0, or a profile file that is not one (see
            :py:func:`~monai_wsss.data.load_intensity_profile`).
        FileNotFoundError: the profile file does not exist.

    Example::

        >>> check = CheckIntensityProfile({"low": 0.3, "high": 0.6, "num_scans": 2})
        >>> check(torch.tensor([[0.0, 0.5, 0.5]])).shape  # within the range: no warning
        torch.Size([1, 3])
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, profile: Mapping | str | os.PathLike, tolerance: float = 0.25) -> None:
        from monai_wsss.data.intensity_profile import check_intensity_profile, load_intensity_profile

        if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
            raise ValueError(f"`tolerance` must be a number >= 0, got {tolerance!r}.")
        self.profile = (
            check_intensity_profile(profile) if isinstance(profile, Mapping) else load_intensity_profile(profile)
        )
        self.tolerance = float(tolerance)
        self.low = float(self.profile["low"]) / (1.0 + self.tolerance)
        self.high = float(self.profile["high"]) * (1.0 + self.tolerance)

    def warning(self, img: NdarrayOrTensor) -> str | None:
        """The warning for a normalised image, or ``None`` when it lies within the training scans' range."""
        from monai_wsss.data.intensity_profile import PROFILE_PERCENTILE, body_percentile

        value = body_percentile(convert_to_tensor(img, track_meta=False))
        if self.low <= value <= self.high:
            return None
        side = "below" if value < self.low else "above"
        return (
            f"{source_name(img)}: {PROFILE_PERCENTILE:g}th percentile of the normalised body intensity "
            f"{value:.3f}, {side} the "
            f"{self.profile['low']:.3f}-{self.profile['high']:.3f} of the model's "
            f"{self.profile.get('num_scans', '?')} training scans (margin {self.tolerance:g}): the scan's "
            "intensities are unlike any it was trained on (e.g. a large bright structure that is not the target); "
            "check its mask"
        )

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        message = self.warning(img)
        if message is not None:
            logger.warning(message)
            if isinstance(img, MetaTensor):
                img.meta["intensity_warning"] = message
        return img


class CheckIntensityProfiled(MapTransform):
    """
    Dictionary version of :py:class:`CheckIntensityProfile` (after the intensity normalisation).

    Args:
        keys: key(s) of the normalised image.
        profile: the profile (a dict, the path of its JSON file, or ``None``: no check).
        tolerance: see :py:class:`CheckIntensityProfile`.
        allow_missing_keys: don't raise for missing keys.

    Example::

        {"_target_": "monai_wsss.transforms.CheckIntensityProfiled", "keys": "image",
         "profile": "$@bundle_root + '/models/intensity_profile.json'"}
    """

    def __init__(
        self,
        keys: KeysCollection,
        profile: Mapping | str | os.PathLike | None,
        tolerance: float = 0.25,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.checker = None if profile is None else CheckIntensityProfile(profile, tolerance)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        if self.checker is not None:
            for key in self.key_iterator(d):
                d[key] = self.checker(d[key])
        return d
