# Copyright (c) monai_wsss contributors
# Licensed under the Apache License, Version 2.0
"""Training augmentation that breaks the shortcut "the target is the brightest tissue" (issue 15)."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor

from monai_wsss.transforms.model_space import MODEL_INTENSITY_RANGE

__all__ = ["RandBrightDistractor", "RandBrightDistractord"]


def _pair(value: float | Sequence[float], name: str, low: float) -> tuple[float, float]:
    pair = (float(value), float(value)) if isinstance(value, (int, float)) else tuple(float(v) for v in value)
    if len(pair) != 2 or not low <= pair[0] <= pair[1]:
        raise ValueError(f"{name} must be a number or a (min, max) pair with {low} <= min <= max, got {value!r}.")
    return pair  # type: ignore[return-value]


class RandBrightDistractor(RandomizableTransform):
    """
    Paint homogeneous, saturated ellipses ("distractors") into a 2D slice where the target is absent, and dim the
    rest of the body towards the background, as a scan with a large bright structure looks after per-volume
    percentile normalisation.

    Fluid-filled organs and cysts in abdominal MR are brighter than the kidneys; the 99.5th-percentile
    normalisation lands inside them, so the kidneys end up at about half their usual normalised intensity. A
    segmenter trained only on scans without such structures learns "target = the brightest tissue" and marks
    the bright structure. With this augmentation some training slices show a brighter non-target region (the
    label is unchanged: the distractor never covers the target) and a dimmer target.

    The slice is ``(C, H, W)`` in ``value_range`` (model space by default, background at its minimum); every
    channel gets the same ellipses (with 2.5D input they are a structure crossing the neighbouring slices).
    Distractors are drawn only on body pixels (above the background) at least ``margin`` pixels from the target.

    Args:
        prob: probability of augmenting a slice.
        num_distractors: number of ellipses, an int or an inclusive ``(min, max)`` range.
        radius_fraction: semi-axis lengths as a fraction of the slice's shorter side, ``(min, max)``.
        dimming: the body outside the distractors is scaled towards the background by ``1 / f``, ``f`` drawn
            from this ``(min, max)`` range (1: no dimming).
        texture: standard deviation of the distractor's multiplicative texture, as a fraction of its intensity.
        margin: minimum distance in pixels between a distractor and the target.
        value_range: the slice's intensity range; distractors are painted at its maximum.

    Raises:
        ValueError: an argument out of range; at call time, a slice that is not ``(C, H, W)`` or a target mask of
            another spatial shape.

    Example::

        >>> import torch
        >>> img = torch.full((1, 32, 32), -1.0); img[:, 4:28, 4:28] = 0.0
        >>> out = RandBrightDistractor(prob=1.0, dimming=1.0)(img, target=torch.zeros(1, 32, 32))
        >>> bool((out > 0.9).any())
        True
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        prob: float = 0.1,
        num_distractors: int | Sequence[int] = (1, 2),
        radius_fraction: float | Sequence[float] = (0.05, 0.2),
        dimming: float | Sequence[float] = (1.0, 2.0),
        texture: float = 0.03,
        margin: int = 2,
        value_range: Sequence[float] = MODEL_INTENSITY_RANGE,
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        counts = _pair(num_distractors, "num_distractors", 1)
        if counts != tuple(int(c) for c in counts):
            raise ValueError(f"num_distractors must be whole numbers, got {num_distractors!r}.")
        self.num_distractors = (int(counts[0]), int(counts[1]))
        self.radius_fraction = _pair(radius_fraction, "radius_fraction", 0.0)
        if self.radius_fraction[1] > 1.0 or self.radius_fraction[0] <= 0.0:
            raise ValueError(f"radius_fraction must lie in (0, 1], got {radius_fraction!r}.")
        self.dimming = _pair(dimming, "dimming", 1.0)
        if texture < 0:
            raise ValueError(f"texture must be >= 0, got {texture}.")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}.")
        if len(value_range) != 2 or not float(value_range[0]) < float(value_range[1]):
            raise ValueError(f"value_range must be (low, high) with low < high, got {value_range!r}.")
        self.texture = float(texture)
        self.margin = int(margin)
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self._region: torch.Tensor | None = None

    @property
    def region(self) -> torch.Tensor | None:
        """The ``(H, W)`` distractor mask of the last slice augmented (None before the first)."""
        return self._region

    def _draw_region(self, body: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Union of random ellipses centred on allowed pixels, restricted to them (``(H, W)`` bool)."""
        h, w = body.shape
        region = torch.zeros_like(body)
        centres = torch.nonzero(allowed)
        if len(centres) == 0:
            return region
        rows = torch.arange(h, dtype=torch.float32)[:, None]
        cols = torch.arange(w, dtype=torch.float32)[None, :]
        side = min(h, w)
        for _ in range(self.R.randint(self.num_distractors[0], self.num_distractors[1] + 1)):
            cy, cx = (float(v) for v in centres[self.R.randint(len(centres))])
            a, b = (max(self.R.uniform(*self.radius_fraction) * side, 1.0) for _ in range(2))
            angle = self.R.uniform(0.0, math.pi)
            dy, dx = rows - cy, cols - cx
            u = dx * math.cos(angle) + dy * math.sin(angle)
            v = -dx * math.sin(angle) + dy * math.cos(angle)
            region |= (u / a) ** 2 + (v / b) ** 2 <= 1.0
        return region & allowed

    def __call__(
        self, img: NdarrayOrTensor, target: NdarrayOrTensor | None = None, randomize: bool = True
    ) -> NdarrayOrTensor:
        """
        Args:
            img: the slice, ``(C, H, W)``.
            target: the target mask (``(1, H, W)`` or ``(H, W)``, non-zero = target) that distractors avoid;
                None: no target on the slice.
            randomize: draw new parameters (False: reuse the last draw's, e.g. for a second key).

        Returns:
            the augmented slice (the input unchanged when not applied), same type as ``img``.
        """
        image = convert_to_tensor(img, track_meta=False, dtype=torch.float32)
        if image.ndim != 3:
            raise ValueError(f"RandBrightDistractor expects a (C, H, W) slice, got shape {tuple(image.shape)}.")
        if randomize:
            self.randomize(None)
        if not self._do_transform:
            return img
        low, high = self.value_range
        body = (image > low + 1e-6).any(dim=0)
        target_mask = torch.zeros_like(body)
        if target is not None:
            target_mask = convert_to_tensor(target, track_meta=False) != 0
            if target_mask.ndim == 3:
                target_mask = target_mask.any(dim=0)
            if target_mask.shape != body.shape:
                raise ValueError(
                    f"RandBrightDistractor: target mask of spatial shape {tuple(target_mask.shape)} does not match "
                    f"the slice's {tuple(body.shape)}."
                )
        if randomize or self._region is None or self._region.shape != body.shape:
            near = target_mask
            if self.margin > 0 and target_mask.any():
                k = 2 * self.margin + 1
                near = F.max_pool2d(target_mask[None, None].float(), k, stride=1, padding=self.margin)[0, 0] > 0
            self._region = self._draw_region(body, body & ~near)
            self._factor = self.R.uniform(*self.dimming)
            self._noise_seed = int(self.R.randint(2**31 - 1))
        region = self._region
        out = low + (image - low) / self._factor
        out = torch.where(body[None], out, image)
        if region.any():
            noise = torch.randn(region.shape, generator=torch.Generator().manual_seed(self._noise_seed))
            painted = (high - (high - low) * self.texture * noise.abs()).clamp(low, high)
            out = torch.where(region[None], painted[None].expand_as(out), out)
        result, *_ = convert_to_dst_type(out, img, dtype=out.dtype)
        return result


class RandBrightDistractord(RandomizableTransform, MapTransform):
    """
    Dictionary wrapper of :py:class:`RandBrightDistractor`: augments the image ``keys`` (the same ellipses and
    dimming for every key) and keeps distractors off the target read from ``target_key``, which is not changed.

    Args:
        keys: image keys to augment.
        target_key: the key of the target (pseudo-)mask the distractors avoid; None: none.
        prob, num_distractors, radius_fraction, dimming, texture, margin, value_range: see
            :py:class:`RandBrightDistractor`.
        allow_missing_keys: do not raise if a key is missing.

    Raises:
        KeyError: ``target_key`` is given but missing from the data.

    Example::

        >>> import torch
        >>> d = {"image": torch.zeros(1, 16, 16), "pseudo": torch.zeros(1, 16, 16)}
        >>> RandBrightDistractord("image", "pseudo", prob=1.0)(d)["image"].shape
        torch.Size([1, 16, 16])
    """

    backend = RandBrightDistractor.backend

    def __init__(
        self,
        keys: KeysCollection,
        target_key: str | None = None,
        prob: float = 0.1,
        num_distractors: int | Sequence[int] = (1, 2),
        radius_fraction: float | Sequence[float] = (0.05, 0.2),
        dimming: float | Sequence[float] = (1.0, 2.0),
        texture: float = 0.03,
        margin: int = 2,
        value_range: Sequence[float] = MODEL_INTENSITY_RANGE,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.target_key = target_key
        self.distractor = RandBrightDistractor(
            1.0, num_distractors, radius_fraction, dimming, texture, margin, value_range
        )

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.distractor.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        target = None
        if self.target_key is not None:
            if self.target_key not in d:
                raise KeyError(f"RandBrightDistractord: target_key '{self.target_key}' is not in the data.")
            target = d[self.target_key]
        first = True
        for key in self.key_iterator(d):
            d[key] = self.distractor(d[key], target=target, randomize=first)
            first = False
        return d
