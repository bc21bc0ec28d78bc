# Copyright (c) monai_wsss contributors
# Licensed under the Apache License, Version 2.0
"""Robust intensity normalisation of MR volumes inside their brain / body region (every voxel that differs from the
background value read on the volume's border)."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.transforms.utils_pytorch_numpy_unification import percentile
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor

__all__ = [
    "ScaleIntensityNonzeroPercentiles",
    "ScaleIntensityNonzeroPercentilesd",
    "background_value",
    "source_name",
]

logger = logging.getLogger(__name__)


def source_name(img: object, default: str = "<array>") -> str:
    """Return the file a (Meta)Tensor was loaded from, for error messages (``default`` when unknown)."""
    meta = getattr(img, "meta", None)
    if isinstance(meta, Mapping):
        name = meta.get("filename_or_obj")
        if name:
            return str(name)
    return default


def background_value(channel: torch.Tensor, min_fraction: float = 0.5) -> tuple[float | None, float]:
    """
    The background intensity of a masked volume, read from the data: the most frequent value on the volume's
    border (the faces of every spatial axis longer than 2 voxels; a one-slice volume ``(H, W, 1)`` uses the
    in-plane border). Skull-stripped or masked MR has a constant background there, 0 in BraTS and CHAOS but a
    negative constant after z-scoring (BraTS 2015 / DeepMedic preprocessing), whatever the body's intensities.

    Args:
        channel: one channel, spatial dims only.
        min_fraction: share of the border the most frequent value must cover to be called the background.

    Returns:
        ``(value, fraction)``: the background value (None when no value covers ``min_fraction`` of the border,
        e.g. an unmasked scan with noise) and the share of the border it covers.

    Example::

        >>> v = torch.full((8, 8, 4), -0.7); v[2:6, 2:6] = torch.rand(4, 4, 4)
        >>> background_value(v)[0]
        -0.699999988079071
    """
    axes = [a for a in range(channel.ndim) if channel.shape[a] > 2] or list(range(channel.ndim))
    faces = []
    for a in axes:
        moved = channel.movedim(a, 0)
        faces += [moved[0].flatten(), moved[-1].flatten()]
    border = torch.cat(faces)
    if border.numel() == 0:
        return None, 0.0
    values, counts = torch.unique(border, return_counts=True)
    best = int(torch.argmax(counts))
    fraction = float(counts[best]) / float(border.numel())
    if fraction < min_fraction:
        return None, fraction
    return float(values[best]), fraction


class ScaleIntensityNonzeroPercentiles(Transform):
    """
    Scale intensities to [0, 1] using percentiles computed only inside the non-zero region of each channel.

    Skull-stripped brain MR (BraTS) and masked abdominal MR (CHAOS) have a zero background that covers most of
    the volume, and raw scanner values with rare extreme outliers (some BraTS FLAIR volumes reach 32767).
    MONAI's ``ScaleIntensityRangePercentiles`` computes percentiles over the whole volume (dominated by the
    background) and min-max scaling is dominated by the outliers; this transform maps the ``lower`` and
    ``upper`` percentiles of the body voxels to 0 and 1, clips to [0, 1] and sets the background to 0.

    The body is every voxel that differs from the background value, which is read from the data
    (:py:func:`background_value`, ``background="border"``): the most frequent value of the volume's border. A
    z-scored volume (background a negative constant, some body voxels below it) therefore gets the same body, and
    the same output, as its unscaled original, where "non-zero" would take the whole volume as body. When the
    border has no dominant value the background is 0, as before. What was found is logged (at INFO; a non-zero
    background at WARNING, since every later step reads the body as the output's non-zero voxels).

    Args:
        lower: lower percentile in [0, 100), mapped to 0.
        upper: upper percentile in (lower, 100], mapped to 1.
        clip: clip the output to [0, 1]; without clipping the background is still 0.
        channel_wise: compute percentiles per channel (otherwise over all channels together).
        dtype: output dtype.
        background: ``"border"`` (read from the data, see above) or a fixed background value (e.g. 0).

    Returns:
        tensor of the input's type and shape (MetaTensor meta kept), background 0, foreground in [0, 1].

    Raises:
        ValueError: the image holds NaN or infinite values, or has no voxel besides its background, or the
            percentiles are invalid (the message names the source file when the input is a loaded MetaTensor).

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
        background: str | float = "border",
    ) -> None:
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got lower={lower}, upper={upper}.")
        if isinstance(background, str) and background != "border":
            raise ValueError(f"background must be 'border' or a number, got {background!r}.")
        self.background = background
        self.lower = float(lower)
        self.upper = float(upper)
        self.clip = clip
        self.channel_wise = channel_wise
        self.dtype = dtype

    def _background(self, channel: torch.Tensor, name: str) -> float:
        if not isinstance(self.background, str):
            return float(self.background)
        value, fraction = background_value(channel)
        if value is None:
            logger.info(f"{name}: no constant background on the border (most frequent value covers {fraction:.0%}); "
                        "background taken as 0.")
            return 0.0
        body = float((channel != value).float().mean())
        message = (f"{name}: background value {value:g} (from {fraction:.0%} of the volume's border), "
                   f"body {body:.1%} of the voxels")
        if value != 0.0:
            logger.warning(message + "; the background is not 0 (e.g. a z-scored volume): set to 0 in the output.")
        else:
            logger.info(message)
        return value

    def _scale(self, channel: torch.Tensor, background: float = 0.0) -> torch.Tensor:
        foreground = channel != background
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
        if self.channel_wise:
            channels = []
            for c in range(img_t.shape[0]):
                background = self._background(img_t[c], name if img_t.shape[0] == 1 else f"{name} channel {c}")
                if not bool((img_t[c] != background).any()):
                    raise ValueError(
                        f"image {name} channel {c} has no voxel besides its background ({background:g}); "
                        "nothing to normalise."
                    )
                channels.append(self._scale(img_t[c], background))
            out = torch.stack(channels)
        else:
            background = self._background(img_t, name)
            if not bool((img_t != background).any()):
                raise ValueError(f"image {name} has no voxel besides its background ({background:g}); nothing to normalise.")
            out = self._scale(img_t, background)
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
        background: ``"border"`` (the most frequent border value) or a fixed background value.

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
        background: str | float = "border",
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.scaler = ScaleIntensityNonzeroPercentiles(
            lower=lower, upper=upper, clip=clip, channel_wise=channel_wise, dtype=dtype, background=background
        )

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                d[key] = self.scaler(d[key])
            except ValueError as err:
                raise ValueError(f"key '{key}': {err}") from None
        return d
