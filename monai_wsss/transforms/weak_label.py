# Copyright (c) monai_wsss contributors
# Licensed under the Apache License, Version 2.0
"""Label mapping of multi-label masks to a binary target, and the weak (image-level) label of a 2D slice."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor

from monai_wsss.transforms.intensity import source_name

__all__ = ["MapTargetLabels", "MapTargetLabelsd", "WeakSliceLabel", "WeakSliceLabeld"]


class MapTargetLabels(Transform):
    """
    Turn a multi-label mask into the binary target of the weakly supervised task.

    BraTS whole tumour is ``target_labels=None`` (every non-zero label) with ``allowed_labels=(0, 1, 2, 3, 4)``;
    CHAOS kidney is ``target_labels=(2, 3)`` with ``allowed_labels=(0, 1, 2, 3, 4)``. Any value outside
    ``allowed_labels`` (including non-integer values from an interpolated mask) is an error rather than
    being silently mapped to background.

    Args:
        target_labels: label values that form the target (1); ``None`` means every non-zero value.
        allowed_labels: every value the mask may contain; ``None`` accepts any value.
        dtype: output dtype (0/1 values).

    Returns:
        binary mask, same shape and type as the input (MetaTensor meta kept).

    Raises:
        ValueError: the mask contains values outside ``allowed_labels`` (they are listed, with the source file).

    Example::

        >>> import torch
        >>> MapTargetLabels(target_labels=(2, 3), allowed_labels=range(5))(torch.tensor([[0, 1, 2, 3, 4]]))
        tensor([[0., 0., 1., 1., 0.]])
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        target_labels: Sequence[int] | None = None,
        allowed_labels: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.target_labels = None if target_labels is None else tuple(int(v) for v in target_labels)
        self.allowed_labels = None if allowed_labels is None else tuple(int(v) for v in allowed_labels)
        if self.target_labels is not None and self.allowed_labels is not None:
            missing = set(self.target_labels) - set(self.allowed_labels)
            if missing:
                raise ValueError(f"target_labels {sorted(missing)} are not in allowed_labels {self.allowed_labels}.")
        self.dtype = dtype

    def __call__(self, mask: NdarrayOrTensor) -> NdarrayOrTensor:
        m = convert_to_tensor(mask, track_meta=False)
        if self.allowed_labels is not None:
            allowed = torch.as_tensor(self.allowed_labels, device=m.device, dtype=m.dtype)
            ok = torch.isin(m, allowed)
            if not bool(ok.all()):
                bad = torch.unique(m[~ok])
                shown = [round(float(v), 4) for v in bad[:10]]
                raise ValueError(
                    f"mask {source_name(mask)} contains unexpected label values {shown}"
                    f"{' ...' if bad.numel() > 10 else ''}; allowed labels are {list(self.allowed_labels)}."
                )
        if self.target_labels is None:
            out = m != 0
        else:
            out = torch.isin(m, torch.as_tensor(self.target_labels, device=m.device, dtype=m.dtype))
        return convert_to_dst_type(out, dst=mask, dtype=self.dtype)[0]


class MapTargetLabelsd(MapTransform):
    """
    Dictionary wrapper of :py:class:`MapTargetLabels`.

    Args:
        keys: mask keys.
        target_labels: label values of the target; ``None`` = every non-zero value.
        allowed_labels: values the mask may contain; ``None`` = anything.
        dtype: output dtype.
        allow_missing_keys: do not raise if a key is missing.

    Returns:
        the dictionary with binary masks.

    Raises:
        ValueError: unexpected label values (the key and the source file are named).

    Example::

        >>> import torch
        >>> MapTargetLabelsd("seg", allowed_labels=(0, 1, 2, 4))({"seg": torch.tensor([[0, 4]])})["seg"]
        tensor([[0., 1.]])
    """

    backend = MapTargetLabels.backend

    def __init__(
        self,
        keys: KeysCollection,
        target_labels: Sequence[int] | None = None,
        allowed_labels: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mapper = MapTargetLabels(target_labels=target_labels, allowed_labels=allowed_labels, dtype=dtype)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                d[key] = self.mapper(d[key])
            except ValueError as err:
                raise ValueError(f"key '{key}': {err}") from None
        return d


class WeakSliceLabel(Transform):
    """
    The weak (image-level) label of a 2D slice from its binary target mask.

    A slice is positive when its target covers at least ``min_pixels`` pixels and at least ``min_fraction``
    of the slice (each criterion applies when not ``None``), negative when the target covers at most
    ``max_negative_pixels`` pixels, and ambiguous in between. Ambiguous slices (a few tumour pixels) get
    ``label = 1`` (the target is present) and ``ambiguous = True`` so that training can exclude them while
    evaluation still sees the truth.

    Args:
        min_pixels: smallest target area (pixels) of a positive slice, or ``None``.
        min_fraction: smallest target fraction of the slice area of a positive slice, or ``None``.
        max_negative_pixels: largest target area of a negative slice (0: negatives are empty).

    Returns:
        ``(label, ambiguous)``: ``label`` is 0 or 1, ``ambiguous`` a bool.

    Raises:
        ValueError: invalid thresholds, or a mask that is not 2D with one channel.

    Example::

        >>> import torch
        >>> m = torch.zeros(1, 10, 10); m[0, :2, :2] = 1
        >>> WeakSliceLabel(min_pixels=4)(m), WeakSliceLabel(min_pixels=5)(m), WeakSliceLabel()(m * 0)
        ((1, False), (1, True), (0, False))
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self, min_pixels: int | None = 1, min_fraction: float | None = None, max_negative_pixels: int = 0
    ) -> None:
        if min_pixels is not None and min_pixels < 1:
            raise ValueError(f"min_pixels must be >= 1 or None, got {min_pixels}.")
        if min_fraction is not None and not 0.0 < min_fraction <= 1.0:
            raise ValueError(f"min_fraction must be in (0, 1] or None, got {min_fraction}.")
        if max_negative_pixels < 0:
            raise ValueError(f"max_negative_pixels must be >= 0, got {max_negative_pixels}.")
        if min_pixels is not None and max_negative_pixels >= min_pixels:
            raise ValueError(f"max_negative_pixels ({max_negative_pixels}) must be < min_pixels ({min_pixels}).")
        self.min_pixels = min_pixels
        self.min_fraction = min_fraction
        self.max_negative_pixels = int(max_negative_pixels)

    def from_counts(self, target_pixels: int, total_pixels: int) -> tuple[int, bool]:
        """Label from the target area and the slice area (shared with vectorised callers)."""
        if target_pixels <= self.max_negative_pixels:
            return 0, False
        positive = True
        if self.min_pixels is not None:
            positive &= target_pixels >= self.min_pixels
        if self.min_fraction is not None:
            positive &= target_pixels >= self.min_fraction * total_pixels
        return 1, not positive

    def __call__(self, mask: NdarrayOrTensor) -> tuple[int, bool]:
        m = convert_to_tensor(mask, track_meta=False)
        if m.ndim != 3 or m.shape[0] != 1:
            raise ValueError(f"expected a (1, H, W) slice mask, got shape {tuple(m.shape)} from {source_name(mask)}.")
        return self.from_counts(int((m != 0).sum()), int(m[0].numel()))


class WeakSliceLabeld(MapTransform):
    """
    Dictionary wrapper of :py:class:`WeakSliceLabel`: reads the binary mask at ``keys`` and writes
    ``label_key`` (0/1) and ``ambiguous_key`` (bool).

    Args:
        keys: the mask key (exactly one).
        label_key: output key of the weak label.
        ambiguous_key: output key of the ambiguity flag (``None``: not written).
        fraction_key: output key of the target's fraction of the slice area (``None``: not written).
        min_pixels: see :py:class:`WeakSliceLabel`.
        min_fraction: see :py:class:`WeakSliceLabel`.
        max_negative_pixels: see :py:class:`WeakSliceLabel`.
        allow_missing_keys: do not raise if the mask is missing.

    Returns:
        the dictionary with the weak label added.

    Raises:
        ValueError: more than one key, or a mask that is not (1, H, W).

    Example::

        >>> import torch
        >>> WeakSliceLabeld("seg")({"seg": torch.ones(1, 4, 4)})["label"]
        1
    """

    backend = WeakSliceLabel.backend

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str = "label",
        ambiguous_key: str | None = "ambiguous",
        fraction_key: str | None = None,
        min_pixels: int | None = 1,
        min_fraction: float | None = None,
        max_negative_pixels: int = 0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"WeakSliceLabeld reads exactly one mask key, got {self.keys}.")
        self.label_key = label_key
        self.ambiguous_key = ambiguous_key
        self.fraction_key = fraction_key
        self.labeller = WeakSliceLabel(min_pixels, min_fraction, max_negative_pixels)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                label, ambiguous = self.labeller(d[key])
            except ValueError as err:
                raise ValueError(f"key '{key}': {err}") from None
            d[self.label_key] = label
            if self.ambiguous_key is not None:
                d[self.ambiguous_key] = ambiguous
            if self.fraction_key is not None:
                mask = convert_to_tensor(d[key], track_meta=False)
                d[self.fraction_key] = float((mask != 0).sum()) / float(mask[0].numel())
        return d
