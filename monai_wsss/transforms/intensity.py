# Copyright (c) monai_wsss contributors
# Licensed under the Apache License, Version 2.0
"""Robust intensity normalisation of MR volumes inside their non-zero (brain / body) region."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.transforms.utils_pytorch_numpy_unification import percentile
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor

__all__ = ["ScaleIntensityNonzeroPercentiles", "ScaleIntensityNonzeroPercentilesd", "source_name"]


def source_name(img: object, default: str = "<array>") -> str:
    """Return the file a (Meta)Tensor was loaded from, for error messages (``default`` when unknown)."""
    meta = getattr(img, "meta", None)
    if isinstance(meta, Mapping):
        name = meta.get("filename_or_obj")
        if name:
            return str(name)
    return default


class ScaleIntensityNonzeroPercentiles(Transform):
    """
    Scale intensities to [0, 1] using percentiles computed only inside the non-zero region of each channel.

    Skull-stripped brain MR (BraTS) and masked abdominal MR (CHAOS) have a zero background that covers most of
    the volume, and raw scanner values with rare extreme outliers (some BraTS FLAIR volumes reach 32767).
    MONAI's ``ScaleIntensityRangePercentiles`` computes percentiles over the whole volume (dominated by the
    background) and min-max scaling is dominated by the outliers; this transform maps the ``lower`` and
    ``upper`` percentiles of the non-zero voxels to 0 and 1, clips to [0, 1] and keeps the background at 0.

    Args:
        lower: lower percentile in [0, 100), mapped to 0.
        upper: upper percentile in (lower, 100], mapped to 1.
        clip: clip the output to [0, 1]; without clipping the background is still 0.
        channel_wise: compute percentiles per channel (otherwise over all channels together).
        dtype: output dtype.

    Returns:
        tensor of the input's type and shape (MetaTensor meta kept), background 0, foreground in [0, 1].

    Raises:
        ValueError: the image holds NaN or infinite values, or has no non-zero voxel, or the percentiles
            are invalid (the message names the source file when the input is a loaded MetaTensor).

    Example::

        >>> import torch
        >>> img = torch.zeros(1, 8, 8, 4); img[:, 2:6, 2:6] = torch.arange(64.0).reshape(4, 4, 4) + 1
        >>> out = ScaleIntensityNonzeroPercentiles(lower=0, upper=100)(img)
        >>> float(out.min()), float(out.max())
        (0.0, 1.0)
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        lower: float = 0.5,
        upper: float = 99.5,
        clip: bool = True,
        channel_wise: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got lower={lower}, upper={upper}.")
        self.lower = float(lower)
        self.upper = float(upper)
        self.clip = clip
        self.channel_wise = channel_wise
        self.dtype = dtype

    def _scale(self, channel: torch.Tensor) -> torch.Tensor:
        foreground = channel != 0
        values = channel[foreground].to(torch.float32)
        out = torch.zeros(channel.shape, dtype=torch.float32, device=channel.device)
        low, high = (float(v) for v in percentile(values, [self.lower, self.upper]))
        if high <= low:
            # constant foreground: nothing to stretch, keep it distinguishable from the background
            out[foreground] = 1.0
            return out
        scaled = (channel.to(torch.float32) - low) / (high - low)
        if self.clip:
            scaled = scaled.clamp_(0.0, 1.0)
        return torch.where(foreground, scaled, out)

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """
        Args:
            img: channel-first image, any spatial rank.
        """
        name = source_name(img)
        img_t = convert_to_tensor(img, track_meta=False)
        if not torch.is_floating_point(img_t):
            img_t = img_t.to(torch.float32)
        elif not bool(torch.isfinite(img_t).all()):
            raise ValueError(f"image {name} contains NaN or infinite intensities; fix or mask them before scaling.")
        if not bool((img_t != 0).any()):
            raise ValueError(f"image {name} has no non-zero voxel; nothing to normalise.")
        if self.channel_wise:
            channels = []
            for c in range(img_t.shape[0]):
                if not bool((img_t[c] != 0).any()):
                    raise ValueError(f"image {name} channel {c} has no non-zero voxel; nothing to normalise.")
                channels.append(self._scale(img_t[c]))
            out = torch.stack(channels)
        else:
            out = self._scale(img_t)
        return convert_to_dst_type(out, dst=img, dtype=self.dtype)[0]


class ScaleIntensityNonzeroPercentilesd(MapTransform):
    """
    Dictionary wrapper of :py:class:`ScaleIntensityNonzeroPercentiles`.

    Args:
        keys: keys of the images to scale.
        lower: lower percentile (mapped to 0).
        upper: upper percentile (mapped to 1).
        clip: clip the output to [0, 1].
        channel_wise: per-channel percentiles.
        dtype: output dtype.
        allow_missing_keys: do not raise if a key is missing.

    Returns:
        the dictionary with the scaled images.

    Raises:
        ValueError: see :py:class:`ScaleIntensityNonzeroPercentiles`; the message also names the key.

    Example::

        >>> import torch
        >>> d = {"image": torch.rand(1, 8, 8, 4) * 1000}
        >>> ScaleIntensityNonzeroPercentilesd("image")(d)["image"].max() <= 1
        tensor(True)
    """

    backend = ScaleIntensityNonzeroPercentiles.backend

    def __init__(
        self,
        keys: KeysCollection,
        lower: float = 0.5,
        upper: float = 99.5,
        clip: bool = True,
        channel_wise: bool = True,
        dtype: torch.dtype = torch.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.scaler = ScaleIntensityNonzeroPercentiles(
            lower=lower, upper=upper, clip=clip, channel_wise=channel_wise, dtype=dtype
        )

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                d[key] = self.scaler(d[key])
            except ValueError as err:
                raise ValueError(f"key '{key}': {err}") from None
        return d
