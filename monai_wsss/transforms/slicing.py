# Copyright (c) monai_wsss contributors
# Licensed under the Apache License, Version 2.0
"""Slicing channel-first 3D volumes into 2D slice dictionaries (one sample per slice)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import MapTransform, SplitDim
from monai.transforms.traits import MultiSampleTrait
from monai.utils import TransformBackends, convert_to_tensor

__all__ = ["SliceVolumed", "slice_foreground_fraction", "stack_neighbour_slices"]


def slice_foreground_fraction(img: NdarrayOrTensor, slice_axis: int = 2) -> torch.Tensor:
    """
    Fraction of non-zero pixels (in any channel) of every slice of a channel-first volume.

    Args:
        img: channel-first volume (C, H, W, D).
        slice_axis: spatial axis (0, 1 or 2) along which slices are taken.

    Returns:
        float tensor of length ``img.shape[slice_axis + 1]``.

    Example::

        >>> import torch
        >>> v = torch.zeros(1, 2, 2, 3); v[0, 0, 0, 1] = 5
        >>> slice_foreground_fraction(v).tolist()
        [0.0, 0.25, 0.0]
    """
    t = convert_to_tensor(img, track_meta=False)
    nonzero = (t != 0).any(dim=0)
    other = [a for a in range(nonzero.ndim) if a != slice_axis]
    plane = 1
    for a in other:
        plane *= nonzero.shape[a]
    return nonzero.sum(dim=other).to(torch.float32) / float(plane)


def stack_neighbour_slices(slices: torch.Tensor, context_slices: int) -> torch.Tensor:
    """
    The 2.5D input of every slice of a stack: slices ``(..., n, C, a, b)`` (``n`` along the slice axis) to
    ``(..., n, (2k + 1) C, a, b)`` holding, for slice ``j``, slices ``j - k ... j + k`` one after the other, the first
    and last slice repeated beyond the ends (``k = context_slices``). ``k = 0`` returns the input.

    Args:
        slices: a stack of slices, the slice axis third from last but one (``(n, C, a, b)`` or ``(B, n, C, a, b)``).
        context_slices: neighbours ``k`` on either side.

    Returns:
        the stacked neighbours, the input's dtype and device.

    Raises:
        ValueError: a negative ``context_slices`` or fewer than 4 dimensions.

    Example::

        >>> import torch
        >>> stack_neighbour_slices(torch.arange(3.0).reshape(3, 1, 1, 1), 1).flatten(1).tolist()
        [[0.0, 0.0, 1.0], [0.0, 1.0, 2.0], [1.0, 2.0, 2.0]]
    """
    if int(context_slices) < 0:
        raise ValueError(f"context_slices must be >= 0, got {context_slices}.")
    if slices.ndim < 4:
        raise ValueError(f"slices must be (..., n, C, a, b), got shape {tuple(slices.shape)}.")
    k = int(context_slices)
    if k == 0:
        return slices
    n = slices.shape[-4]
    offsets = torch.arange(-k, k + 1, device=slices.device)
    index = (torch.arange(n, device=slices.device)[:, None] + offsets[None]).clamp(0, n - 1)  # (n, 2k + 1)
    stacked = slices.index_select(-4, index.flatten())  # (..., n (2k + 1), C, a, b)
    return stacked.reshape(*slices.shape[:-4], n, (2 * k + 1) * slices.shape[-3], *slices.shape[-2:])


class SliceVolumed(MapTransform, MultiSampleTrait):
    """
    Split channel-first 3D volumes into a list of 2D slice dictionaries along one spatial axis.

    The volumes at ``keys`` are split with MONAI's :py:class:`monai.transforms.SplitDim` (views, no copy; the
    MetaTensor affine of each slice is shifted to the slice's position), every other key is copied by
    reference into each slice dictionary, and the slice's position along the axis is stored at
    ``index_key``. Optional filters keep a slice range and drop slices whose ``foreground_key`` image has too
    little non-zero area (no brain / body).

    Args:
        keys: volume keys to slice; all must have the same size along ``slice_axis``.
        slice_axis: spatial axis (0, 1 or 2; 2 is axial for BraTS / CHAOS NIfTI).
        slice_range: ``(start, stop)`` half-open range of slice indices to keep (``None``: all).
        foreground_key: key whose non-zero area measures how much content (brain / body) a slice has.
        min_foreground_fraction: with ``foreground_key``, keep only slices whose foreground covers at least
            this fraction of the slice (0: at least one non-zero pixel; ``None``: keep every slice).
        index_key: output key of the slice index in the source volume.
        fraction_key: output key of the slice's foreground fraction (``None``: not written; needs
            ``foreground_key``).
        allow_missing_keys: do not raise if a key is missing.

    Returns:
        list of dictionaries, one per kept slice, with (C, H, W)-style 2D tensors at ``keys``.

    Raises:
        ValueError: a volume is not 3D channel-first, the volumes disagree in size along the axis, the range
            is outside the volume, or ``foreground_key`` is missing.

    Example::

        >>> import torch
        >>> d = {"image": torch.rand(1, 8, 8, 5), "case": "c0"}
        >>> slices = SliceVolumed("image", slice_range=(1, 4), foreground_key="image", min_foreground_fraction=0.0)(d)
        >>> len(slices), slices[0]["image"].shape, slices[0]["slice_index"], slices[0]["case"]
        (3, torch.Size([1, 8, 8]), 1, 'c0')
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        keys: KeysCollection,
        slice_axis: int = 2,
        slice_range: tuple[int, int] | None = None,
        foreground_key: str | None = None,
        min_foreground_fraction: float | None = None,
        index_key: str = "slice_index",
        fraction_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if slice_axis not in (0, 1, 2, -1, -2, -3):
            raise ValueError(f"slice_axis must be a spatial axis of a 3D volume (0, 1, 2), got {slice_axis}.")
        self.slice_axis = slice_axis % 3
        if slice_range is not None and (
            len(slice_range) != 2 or slice_range[0] < 0 or slice_range[1] <= slice_range[0]
        ):
            raise ValueError(f"slice_range must be (start, stop) with 0 <= start < stop, got {slice_range}.")
        if min_foreground_fraction is not None and not 0.0 <= min_foreground_fraction <= 1.0:
            raise ValueError(f"min_foreground_fraction must be in [0, 1], got {min_foreground_fraction}.")
        if foreground_key is None and (fraction_key is not None or min_foreground_fraction is not None):
            raise ValueError("fraction_key and min_foreground_fraction need foreground_key.")
        self.slice_range = slice_range
        self.foreground_key = foreground_key
        self.min_foreground_fraction = min_foreground_fraction
        self.index_key = index_key
        self.fraction_key = fraction_key
        # SplitDim counts the channel dimension
        self.splitter = SplitDim(dim=self.slice_axis + 1, keepdim=False, update_meta=True)

    def __call__(  # type: ignore[override]
        self, data: Mapping[Hashable, NdarrayOrTensor]
    ) -> list[dict[Hashable, NdarrayOrTensor]]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return [d]
        sizes = {}
        for key in keys:
            if d[key].ndim != 4:
                raise ValueError(
                    f"key '{key}': expected a channel-first 3D volume (C, H, W, D), got shape {tuple(d[key].shape)}."
                )
            sizes[key] = int(d[key].shape[self.slice_axis + 1])
        if len(set(sizes.values())) > 1:
            raise ValueError(f"volumes disagree in size along slice axis {self.slice_axis}: {sizes}.")
        n_slices = next(iter(sizes.values()))
        start, stop = (0, n_slices) if self.slice_range is None else self.slice_range
        if stop > n_slices:
            raise ValueError(
                f"slice_range {self.slice_range} exceeds the {n_slices} slices along axis {self.slice_axis}."
            )
        fractions = None
        if self.foreground_key is not None:
            if self.foreground_key not in d:
                raise ValueError(f"foreground_key '{self.foreground_key}' is not in the data (keys: {list(d)}).")
            fractions = slice_foreground_fraction(d[self.foreground_key], self.slice_axis)
            if fractions.numel() != n_slices:
                raise ValueError(
                    f"foreground_key '{self.foreground_key}' has {fractions.numel()} slices, volumes have {n_slices}."
                )
        kept = []
        for i in range(start, stop):
            if self.min_foreground_fraction is not None and fractions is not None:
                if fractions[i] <= 0 or fractions[i] < self.min_foreground_fraction:
                    continue
            kept.append(i)
        split = {key: self.splitter(d[key]) for key in keys}
        others = {k: v for k, v in d.items() if k not in split}
        out = []
        for i in kept:
            item = dict(others)
            for key in keys:
                item[key] = split[key][i]
            item[self.index_key] = i
            if self.fraction_key is not None and fractions is not None:
                item[self.fraction_key] = float(fractions[i])
            out.append(item)
        return out
