# Copyright (c) monai_wsss contributors
# Licensed under the Apache License, Version 2.0
"""
Post-processing of anomaly / condition-difference maps into binary masks.

The methods of this package return a continuous map per slice (signed for CDM, non-negative for
guided-diffusion reconstructions). The evaluation protocol of the CDM paper turns a map into a mask by

1. normalising it to ``[0, 1]`` (:py:class:`NormalizeMap`: positive part for signed maps where the
   target is brighter, absolute value, or min-max), optionally inside a body / brain mask;
2. thresholding it with Otsu's method per slice, or with one dataset-level threshold, the mean of the
   per-slice Otsu thresholds over a set of maps (the paper's "average Otsu": :py:func:`dataset_otsu_threshold`,
   then MONAI's ``AsDiscrete(threshold=...)``, which applies any fixed threshold);
3. optionally keeping the largest connected component (MONAI's ``KeepLargestConnectedComponent``).

All transforms take channel-first items as MONAI transforms do: a 2D map ``(C, H, W)`` is one slice per
channel; a 3D map ``(C, H, W, D)`` is processed slice by slice along ``slice_axis`` (the paper's 2D
protocol) or as a whole when ``slice_axis=None``. A batch of 2D maps ``(B, 1, H, W)`` is thresholded per
slice by transforming each item (``decollate_batch``) or, vectorised, ``batch[:, 0]`` seen as ``B`` channels.

A "unit" below is what gets one normalisation / one threshold: a (channel, slice) pair, or a channel of a
whole volume when ``slice_axis=None``. Units without contrast inside the body (constant maps, all-zero
maps, slices without body pixels) carry no localisation: they normalise to 0 and give an empty mask,
with threshold ``nan``; nothing raises for them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from skimage.filters import threshold_otsu

from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import AsDiscrete, Compose, KeepLargestConnectedComponent
from monai.transforms.transform import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor

from monai_wsss.transforms.io import SaveVolumed

__all__ = [
    "oriented_map",
    "MapSliceScore",
    "MapSliceScored",
    "NormalizeMap",
    "NormalizeMapd",
    "OtsuThreshold",
    "OtsuThresholdd",
    "keep_largest_component",
    "mask_of_map",
    "otsu_thresholds",
    "dataset_otsu_threshold",
    "CopyMetaFromd",
    "map_writer",
    "NORMALIZE_MODES",
]

NORMALIZE_MODES = ("signed", "abs", "minmax")


def oriented_map(values: torch.Tensor, mode: str | None) -> torch.Tensor:
    """
    The side of a map that marks the target, before any scaling: the positive part for ``"signed"``, the magnitude
    for ``"abs"``, the values unchanged otherwise (``"minmax"``, or ``None``: no reading).

    Example::

        >>> oriented_map(torch.tensor([-0.5, 0.2]), "abs")
        tensor([0.5000, 0.2000])
    """
    if mode == "signed":
        return values.clamp_min(0)
    if mode == "abs":
        return values.abs()
    return values


class MapSliceScore(Transform):
    """
    One score per 2D map: a high quantile of its oriented values (:py:func:`oriented_map`) inside the body, so that
    a map can be judged against the slice's image-level label alone (e.g. slice-level AUROC for model selection
    without pixel masks: a map that lights up slices with target and stays flat on healthy ones scores well).

    Args:
        mode: reading of the map, as :py:func:`oriented_map` (``"signed"``, ``"abs"``, ``None``).
        quantile: quantile in ``(0, 1]`` of the body values (0.99: robust to a few bright pixels).

    Returns:
        a ``(1,)`` float tensor (0 for a map without body pixels).

    Raises:
        ValueError: ``quantile`` outside ``(0, 1]``; a map that is not ``(1, H, W)``; a body of another shape.

    Example::

        >>> m = torch.zeros(1, 8, 8); m[0, :2, :2] = 1.0
        >>> MapSliceScore("signed", quantile=1.0)(m)
        tensor([1.])
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, mode: str | None = "signed", quantile: float = 0.99) -> None:
        if not 0.0 < float(quantile) <= 1.0:
            raise ValueError(f"quantile must lie in (0, 1], got {quantile}.")
        self.mode = mode
        self.quantile = float(quantile)

    def __call__(self, img: NdarrayOrTensor, body_mask: NdarrayOrTensor | None = None) -> torch.Tensor:
        values = convert_to_tensor(img, track_meta=False).float()
        if values.ndim != 3 or values.shape[0] != 1:
            raise ValueError(f"MapSliceScore expects a (1, H, W) map, got shape {tuple(values.shape)}.")
        values = oriented_map(values, self.mode)
        if body_mask is not None:
            body = convert_to_tensor(body_mask, track_meta=False, device=values.device) != 0
            if body.shape != values.shape:
                raise ValueError(f"body mask of shape {tuple(body.shape)} does not match the map {tuple(values.shape)}.")
            values = values[body]
        if values.numel() == 0:
            return torch.zeros(1)
        return torch.quantile(values.flatten(), self.quantile).reshape(1).cpu()


class MapSliceScored(MapTransform):
    """
    Dictionary wrapper of :py:class:`MapSliceScore`: replaces each map at ``keys`` by its ``(1,)`` score.

    Args:
        keys: keys of the maps.
        mode: see :py:class:`MapSliceScore`.
        quantile: see :py:class:`MapSliceScore`.
        body_key: optional key of the body region (non-zero = inside).
        allow_missing_keys: do not raise if a key is missing.

    Raises:
        ValueError: when ``body_key`` is given but missing, and as :py:class:`MapSliceScore`.

    Example::

        >>> MapSliceScored("pred", quantile=1.0)({"pred": torch.ones(1, 4, 4)})["pred"]
        tensor([1.])
    """

    backend = MapSliceScore.backend

    def __init__(
        self,
        keys: KeysCollection,
        mode: str | None = "signed",
        quantile: float = 0.99,
        body_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.scorer = MapSliceScore(mode=mode, quantile=quantile)
        self.body_key = body_key

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.scorer(d[key], body_mask=_body_from(d, self.body_key))
        return d


def _check_item(img: NdarrayOrTensor, name: str) -> None:
    if img.ndim not in (3, 4):
        raise ValueError(
            f"`{name}` must be a channel-first 2D (C, H, W) or 3D (C, H, W, D) map, got shape {tuple(img.shape)}."
        )


def _normalize_slice_axis(slice_axis: int | None) -> int | None:
    if slice_axis is None:
        return None
    if not isinstance(slice_axis, (int, np.integer)) or not -3 <= int(slice_axis) <= 2:
        raise ValueError(f"`slice_axis` must be a spatial axis in [-3, 2] or None, got {slice_axis!r}.")
    return int(slice_axis) % 3


def _to_units(img: torch.Tensor, slice_axis: int | None) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """View a channel-first map as ``(N, *unit_spatial)`` units and return the inverse reshaping.

    2D ``(C, H, W)`` -> ``(C, H, W)``; 3D with ``slice_axis`` -> ``(C * D, a, b)``; 3D without -> ``(C, H, W, D)``.
    """
    if img.ndim == 3 or slice_axis is None:
        return img, lambda u: u
    moved = img.movedim(slice_axis + 1, 1)  # (C, D, a, b)
    moved_shape = moved.shape
    units = moved.reshape(-1, *moved_shape[2:])

    def restore(u: torch.Tensor) -> torch.Tensor:
        return u.reshape(moved_shape).movedim(1, slice_axis + 1)

    return units, restore


def _body_units(
    body_mask: NdarrayOrTensor | None, img: torch.Tensor, slice_axis: int | None, name: str = "body_mask"
) -> torch.Tensor:
    """Boolean body region broadcast to ``img``'s channels, in unit layout."""
    if body_mask is None:
        body = torch.ones_like(img, dtype=torch.bool)
    else:
        body = convert_to_tensor(body_mask, track_meta=False, device=img.device)
        if body.ndim != img.ndim or tuple(body.shape[1:]) != tuple(img.shape[1:]) or body.shape[0] not in (1, img.shape[0]):
            raise ValueError(
                f"`{name}` must have 1 or {img.shape[0]} channels and the map's spatial shape {tuple(img.shape[1:])}, "
                f"got shape {tuple(body.shape)}."
            )
        if torch.is_floating_point(body) and torch.isnan(body).any():
            raise ValueError(f"`{name}` contains NaN.")
        body = (body != 0).expand_as(img)
    return _to_units(body, slice_axis)[0]


def _as_float_tensor(img: NdarrayOrTensor, name: str) -> torch.Tensor:
    t = convert_to_tensor(img, track_meta=False)
    if not torch.is_floating_point(t):
        t = t.float()
    if torch.isnan(t).any():
        raise ValueError(f"`{name}` contains NaN values.")
    return t


def _unit_has_contrast(units: torch.Tensor, body: torch.Tensor) -> torch.Tensor:
    """True for units whose values inside the body are not all equal (and the body is not empty)."""
    flat, flat_body = units.flatten(1), body.flatten(1)
    inf = torch.tensor(float("inf"), dtype=units.dtype, device=units.device)
    vmax = torch.where(flat_body, flat, -inf).amax(1)
    vmin = torch.where(flat_body, flat, inf).amin(1)
    return flat_body.any(1) & (vmax > vmin)


class NormalizeMap(Transform):
    """
    Normalise a continuous map to ``[0, 1]`` per unit (per channel and slice, see the module docstring).

    Modes:

    - ``"signed"``: positive part divided by its maximum. For signed maps where the target is the positive
      side (e.g. the condition-difference map of CDM on FLAIR, where lesions are bright).
    - ``"abs"``: ``|a| / max |a|``, for maps where either sign marks the target.
    - ``"minmax"``: ``(a - min) / (max - min)``.

    Statistics are computed inside ``body_mask`` when given, and the output is 0 outside it.
    Units without contrast inside the body (constant, or no body pixel) become all 0, and so does a
    ``"signed"`` unit without positive values.

    Args:
        mode: one of ``"signed"``, ``"abs"``, ``"minmax"``.
        slice_axis: spatial axis (0, 1, 2 or negative) along which a 3D map is normalised slice by slice;
            ``None`` normalises each channel of a 3D map as a whole. Ignored for 2D maps.

    Returns:
        A float map of the same shape and type as the input (MetaTensor metadata kept), values in ``[0, 1]``.

    Raises:
        ValueError: for an unknown ``mode``, a bad ``slice_axis``, a map that is not 2D/3D channel-first,
            a map containing NaN, or a ``body_mask`` whose shape does not match.

    Example::

        norm = NormalizeMap(mode="signed", slice_axis=-1)
        map01 = norm(cdm_map, body_mask=image)  # image is 0 outside the brain
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, mode: str = "signed", slice_axis: int | None = -1) -> None:
        if mode not in NORMALIZE_MODES:
            raise ValueError(f"`mode` must be one of {NORMALIZE_MODES}, got {mode!r}.")
        self.mode = mode
        self.slice_axis = _normalize_slice_axis(slice_axis)

    def __call__(self, img: NdarrayOrTensor, body_mask: NdarrayOrTensor | None = None) -> NdarrayOrTensor:
        """
        Args:
            img: channel-first map ``(C, H, W)`` or ``(C, H, W, D)``.
            body_mask: optional region (non-zero = inside) with 1 or ``C`` channels and the map's spatial shape.
        """
        _check_item(img, "img")
        t = _as_float_tensor(img, "img")
        units, restore = _to_units(t, self.slice_axis)
        body = _body_units(body_mask, t, self.slice_axis)
        contrast = _unit_has_contrast(units, body)

        flat, flat_body = units.flatten(1), body.flatten(1)
        zero = torch.zeros((), dtype=flat.dtype, device=flat.device)
        if self.mode == "minmax":
            inf = torch.tensor(float("inf"), dtype=flat.dtype, device=flat.device)
            vmin = torch.where(flat_body, flat, inf).amin(1, keepdim=True)
            shifted = torch.where(flat_body, flat - torch.where(torch.isinf(vmin), zero, vmin), zero)
        else:
            shifted = torch.where(flat_body, oriented_map(flat, self.mode), zero)
        scale = shifted.amax(1, keepdim=True)
        valid = contrast[:, None] & (scale > 0)
        out = torch.where(valid, shifted / torch.where(valid, scale, torch.ones_like(scale)), zero)
        out = restore(out.reshape(units.shape))
        return convert_to_dst_type(out, img, dtype=t.dtype)[0]


def _otsu_per_unit(units: np.ndarray, body: np.ndarray, contrast: np.ndarray, nbins: int) -> np.ndarray:
    thresholds = np.full(units.shape[0], np.nan, dtype=np.float64)
    # skimage's threshold_otsu works on one image at a time; this loop runs once per slice, not per pixel
    for i in np.flatnonzero(contrast):
        thresholds[i] = float(threshold_otsu(units[i][body[i]], nbins=nbins))
    return thresholds


def otsu_thresholds(
    img: NdarrayOrTensor, body_mask: NdarrayOrTensor | None = None, slice_axis: int | None = -1, nbins: int = 256
) -> np.ndarray:
    """
    Otsu threshold (``skimage.filters.threshold_otsu``) of every unit of a channel-first map.

    Args:
        img: channel-first map ``(C, H, W)`` or ``(C, H, W, D)``.
        body_mask: optional region (non-zero = inside); thresholds use only the pixels inside it.
        slice_axis: as in :py:class:`OtsuThreshold`.
        nbins: number of histogram bins of ``threshold_otsu``.

    Returns:
        float64 array of shape ``(C,)`` for 2D maps or 3D maps with ``slice_axis=None``, ``(C * D,)``
        (channel-major) for 3D maps sliced along an axis of length ``D``. ``nan`` for units without
        contrast inside the body.

    Raises:
        ValueError: for a map that is not 2D/3D channel-first, NaN values, a bad ``slice_axis`` or ``body_mask``.

    Example::

        thr = otsu_thresholds(map01, body_mask=image, slice_axis=-1)  # one threshold per axial slice
    """
    _check_item(img, "img")
    axis = _normalize_slice_axis(slice_axis)
    t = _as_float_tensor(img, "img")
    units, _ = _to_units(t, axis)
    body = _body_units(body_mask, t, axis)
    contrast = _unit_has_contrast(units, body)
    return _otsu_per_unit(units.cpu().numpy(), body.cpu().numpy(), contrast.cpu().numpy(), nbins)


def dataset_otsu_threshold(
    maps: Iterable[NdarrayOrTensor],
    body_masks: Iterable[NdarrayOrTensor | None] | None = None,
    slice_axis: int | None = -1,
    nbins: int = 256,
) -> float:
    """
    Dataset-level ("average") Otsu threshold: the mean of the per-unit Otsu thresholds over a set of maps.

    Compute it once on (normalised) maps of a calibration / validation set, then apply it as a fixed
    threshold with MONAI's ``AsDiscrete(threshold=value)``. Units without contrast do not contribute.

    Args:
        maps: iterable of channel-first maps ``(C, H, W)`` / ``(C, H, W, D)``; a batch tensor ``(B, C, H, W)``
            works too (it iterates over its items).
        body_masks: optional iterable of body masks, one per map (``None`` entries allowed).
        slice_axis: as in :py:class:`OtsuThreshold`.
        nbins: number of histogram bins of ``threshold_otsu``.

    Returns:
        the mean threshold, a Python float.

    Raises:
        ValueError: when ``maps`` is empty, ``body_masks`` has a different length, or no unit has contrast.

    Example::

        norm = NormalizeMap("signed")
        thr = dataset_otsu_threshold([norm(m, body_mask=b) for m, b in val_pairs], [b for _, b in val_pairs])
        binarise = AsDiscrete(threshold=thr)  # monai.transforms
    """
    maps = list(maps)
    if len(maps) == 0:
        raise ValueError("`maps` is empty: need at least one map to compute a dataset-level Otsu threshold.")
    bodies = [None] * len(maps) if body_masks is None else list(body_masks)
    if len(bodies) != len(maps):
        raise ValueError(f"`body_masks` has {len(bodies)} entries but `maps` has {len(maps)}.")
    all_thresholds = [otsu_thresholds(m, b, slice_axis=slice_axis, nbins=nbins) for m, b in zip(maps, bodies)]
    values = np.concatenate(all_thresholds)
    values = values[~np.isnan(values)]
    if values.size == 0:
        raise ValueError("no map in `maps` has contrast (all constant or outside the body): threshold undefined.")
    return float(values.mean())


def _largest_per_unit(mask: torch.Tensor, connectivity: int | None) -> torch.Tensor:
    """The largest connected component of each unit of a boolean ``(N, *unit_spatial)`` stack."""
    if not mask.any():
        return mask
    # each unit is one channel of a one-hot stack, so MONAI keeps the largest component per unit
    klcc = KeepLargestConnectedComponent(applied_labels=list(range(mask.shape[0])), is_onehot=True, connectivity=connectivity)
    return convert_to_tensor(klcc(mask.to(torch.uint8)), track_meta=False) > 0


def mask_of_map(
    values: NdarrayOrTensor,
    body_mask: NdarrayOrTensor,
    threshold: str | float = "otsu",
    slice_axis: int | None = -1,
    largest_component: bool = False,
) -> torch.Tensor:
    """
    The binary mask of a map inside the body: each slice at its own Otsu threshold (``"otsu"``, with
    :py:class:`OtsuThreshold`) or every voxel at a fixed value (MONAI's ``AsDiscrete(threshold=...)``, ``>=``), then
    optionally the largest connected component of each slice.

    Args:
        values: the map ``(C, H, W[, D])``.
        body_mask: non-zero inside the body, same shape.
        threshold: ``"otsu"`` or a number (e.g. a run's average Otsu threshold, a probability).
        slice_axis: spatial axis of the slices (``None``: the whole map as one unit).
        largest_component: keep only the largest component of each slice's mask.

    Returns:
        a plain 0/1 tensor of the map's shape.

    Example::

        mask = mask_of_map(prob_map, image, threshold=0.5, slice_axis=2)
    """
    body = convert_to_tensor(body_mask, track_meta=False)
    if threshold == "otsu":
        otsu = OtsuThreshold(slice_axis=slice_axis, largest_component=largest_component)
        return convert_to_tensor(otsu(values, body_mask=body), track_meta=False)
    fixed = convert_to_tensor(AsDiscrete(threshold=float(threshold))(values), track_meta=False) * (body != 0)
    return convert_to_tensor(keep_largest_component(fixed, slice_axis), track_meta=False) if largest_component else fixed


def keep_largest_component(
    mask: NdarrayOrTensor, slice_axis: int | None = -1, connectivity: int | None = None
) -> NdarrayOrTensor:
    """
    Keep the largest connected component of each channel of a binary mask, per slice along ``slice_axis`` (the
    paper's 2D protocol) or per channel of a whole volume (``slice_axis=None``), with MONAI's
    ``KeepLargestConnectedComponent``; what :py:class:`OtsuThreshold` does with ``largest_component``, for masks
    from a fixed threshold (``AsDiscrete``).

    Args:
        mask: channel-first binary mask ``(C, H, W)`` or ``(C, H, W, D)``.
        slice_axis: as in :py:class:`OtsuThreshold`.
        connectivity: connectivity of the components.

    Returns:
        the mask with the map's shape and type.

    Raises:
        ValueError: a mask that is not 2D/3D channel-first or not binary, or a bad ``slice_axis``.

    Example::

        mask = keep_largest_component(AsDiscrete(threshold=0.3)(prob_map), slice_axis=-1)
    """
    _check_item(mask, "mask")
    t = _as_float_tensor(mask, "mask")
    if not bool(((t == 0) | (t == 1)).all()):
        raise ValueError("`mask` must be binary (0/1): threshold the map first (OtsuThreshold or AsDiscrete).")
    units, restore = _to_units(t, _normalize_slice_axis(slice_axis))
    out = restore(_largest_per_unit(units > 0, connectivity).to(t.dtype))
    return convert_to_dst_type(out, mask, dtype=t.dtype)[0]


class OtsuThreshold(Transform):
    """
    Binarise a continuous map with Otsu's method: ``mask = map > t`` inside the body, with ``t`` the Otsu threshold
    (``skimage.filters.threshold_otsu``) of each unit's (channel and slice) pixels inside the body.

    Units without contrast inside the body (constant or all-zero maps, slices without body) give an empty mask.
    Optionally only the largest connected component of each unit is kept (:py:func:`keep_largest_component`).
    A fixed threshold (e.g. from :py:func:`dataset_otsu_threshold`) is not Otsu's: MONAI's
    ``AsDiscrete(threshold=...)`` applies it.

    Args:
        slice_axis: spatial axis (0, 1, 2 or negative) along which a 3D map is thresholded slice by slice;
            ``None`` thresholds each channel of a 3D map as a whole. Ignored for 2D maps.
        largest_component: keep only the largest connected component of each unit.
        connectivity: connectivity for the connected components (see ``KeepLargestConnectedComponent``).
        nbins: number of histogram bins of ``threshold_otsu``.

    Returns:
        a binary (0/1) float mask with the map's shape and type (MetaTensor metadata kept).

    Raises:
        ValueError: for a bad ``slice_axis`` / ``nbins``, a map that is not 2D/3D channel-first, NaN values, or a
            mismatched ``body_mask``.

    Example::

        to_mask = OtsuThreshold(slice_axis=-1, largest_component=False)
        mask = to_mask(NormalizeMap("signed")(cdm_map_3d, body_mask=image), body_mask=image)
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        slice_axis: int | None = -1,
        largest_component: bool = False,
        connectivity: int | None = None,
        nbins: int = 256,
    ) -> None:
        if not isinstance(nbins, (int, np.integer)) or isinstance(nbins, bool) or nbins < 2:
            raise ValueError(f"`nbins` must be an integer >= 2, got {nbins!r}.")
        self.slice_axis = _normalize_slice_axis(slice_axis)
        self.largest_component = largest_component
        self.connectivity = connectivity
        self.nbins = int(nbins)

    def thresholds(self, img: NdarrayOrTensor, body_mask: NdarrayOrTensor | None = None) -> np.ndarray:
        """The threshold used for each unit (``nan`` where the unit gets an empty mask); see :py:func:`otsu_thresholds`."""
        _check_item(img, "img")
        t = _as_float_tensor(img, "img")
        units, _ = _to_units(t, self.slice_axis)
        body = _body_units(body_mask, t, self.slice_axis)
        return self._unit_thresholds(units, body)

    def _unit_thresholds(self, units: torch.Tensor, body: torch.Tensor) -> np.ndarray:
        contrast = _unit_has_contrast(units, body).cpu().numpy()
        return _otsu_per_unit(units.cpu().numpy(), body.cpu().numpy(), contrast, self.nbins)

    def __call__(self, img: NdarrayOrTensor, body_mask: NdarrayOrTensor | None = None) -> NdarrayOrTensor:
        """
        Args:
            img: channel-first map ``(C, H, W)`` or ``(C, H, W, D)``, typically normalised by :py:class:`NormalizeMap`.
            body_mask: optional region (non-zero = inside) with 1 or ``C`` channels and the map's spatial shape.
        """
        _check_item(img, "img")
        t = _as_float_tensor(img, "img")
        units, restore = _to_units(t, self.slice_axis)
        body = _body_units(body_mask, t, self.slice_axis)
        thr = torch.as_tensor(self._unit_thresholds(units, body), dtype=t.dtype, device=t.device)
        thr = thr.reshape(-1, *([1] * (units.ndim - 1)))
        # nan thresholds compare False everywhere: units without contrast give empty masks
        mask = (units > thr) & body
        if self.largest_component:
            mask = _largest_per_unit(mask, self.connectivity)
        out = restore(mask.to(t.dtype))
        return convert_to_dst_type(out, img, dtype=t.dtype)[0]


def _body_from(d: Mapping[Hashable, NdarrayOrTensor], body_key: str | None) -> NdarrayOrTensor | None:
    if body_key is None:
        return None
    if body_key not in d:
        raise ValueError(f"`body_key` {body_key!r} is not in the data dictionary (keys: {list(d.keys())}).")
    return d[body_key]


class NormalizeMapd(MapTransform):
    """
    Dictionary-based wrapper of :py:class:`NormalizeMap`.

    Args:
        keys: keys of the maps to normalise (in place).
        mode: ``"signed"``, ``"abs"`` or ``"minmax"``.
        slice_axis: see :py:class:`NormalizeMap`.
        body_key: optional key of a body / brain region (non-zero = inside), e.g. ``"image"`` when the
            normalised image is 0 outside the brain.
        allow_missing_keys: don't raise an exception if a key in ``keys`` is missing.

    Raises:
        ValueError: when ``body_key`` is given but missing, and as :py:class:`NormalizeMap`.

    Example::

        NormalizeMapd(keys="map", mode="signed", body_key="image")(data)
    """

    backend = NormalizeMap.backend

    def __init__(
        self,
        keys: KeysCollection,
        mode: str = "signed",
        slice_axis: int | None = -1,
        body_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.normalizer = NormalizeMap(mode=mode, slice_axis=slice_axis)
        self.body_key = body_key

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.normalizer(d[key], body_mask=_body_from(d, self.body_key))
        return d


class OtsuThresholdd(MapTransform):
    """
    Dictionary-based wrapper of :py:class:`OtsuThreshold`.

    Args:
        keys: keys of the maps to binarise.
        slice_axis: see :py:class:`OtsuThreshold`.
        largest_component: keep only the largest connected component of each unit.
        connectivity: connectivity for the connected components.
        nbins: number of histogram bins of ``threshold_otsu``.
        body_key: optional key of a body / brain region (non-zero = inside).
        output_keys: keys to write the masks to (same length as ``keys``); ``None`` overwrites ``keys``.
            Use e.g. ``keys="map", output_keys="mask"`` to keep the continuous map.
        allow_missing_keys: don't raise an exception if a key in ``keys`` is missing.

    Raises:
        ValueError: when ``output_keys`` and ``keys`` differ in length, ``body_key`` is missing, and as
            :py:class:`OtsuThreshold`.

    Example::

        OtsuThresholdd(keys="map", output_keys="mask", body_key="image")(data)
    """

    backend = OtsuThreshold.backend

    def __init__(
        self,
        keys: KeysCollection,
        slice_axis: int | None = -1,
        largest_component: bool = False,
        connectivity: int | None = None,
        nbins: int = 256,
        body_key: str | None = None,
        output_keys: KeysCollection | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.thresholder = OtsuThreshold(
            slice_axis=slice_axis,
            largest_component=largest_component,
            connectivity=connectivity,
            nbins=nbins,
        )
        self.body_key = body_key
        if output_keys is None:
            self.output_keys = tuple(self.keys)
        else:
            self.output_keys = tuple(output_keys) if isinstance(output_keys, Sequence) and not isinstance(
                output_keys, str
            ) else (output_keys,)
            if len(self.output_keys) != len(self.keys):
                raise ValueError(
                    f"`output_keys` must have one key per entry of `keys` ({len(self.keys)}), got {self.output_keys}."
                )

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key, out_key in self.key_iterator(d, self.output_keys):
            d[out_key] = self.thresholder(d[key], body_mask=_body_from(d, self.body_key))
        return d


class CopyMetaFromd(MapTransform):
    """
    Give outputs (maps, masks) the metadata of the image they were computed from, so that MONAI's
    ``SaveImaged`` writes them in that image's space (its affine, file name and, for ``Invertd``, its
    transform history).

    Args:
        keys: keys of the outputs; each must have the spatial shape of ``source_key`` (channels may differ).
        source_key: key of the reference image, a MetaTensor (e.g. from ``LoadImaged``).
        allow_missing_keys: don't raise an exception if a key in ``keys`` is missing.

    Returns:
        the dictionary with ``keys`` turned into MetaTensors carrying a copy of the source's metadata.

    Raises:
        ValueError: ``source_key`` missing or not a MetaTensor, or a spatial shape differing from the source's.

    Example::

        CopyMetaFromd(keys=["map", "mask"], source_key="image")(data)
    """

    def __init__(self, keys: KeysCollection, source_key: str = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.source_key = source_key

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        if self.source_key not in d:
            raise ValueError(f"`source_key` {self.source_key!r} is not in the data dictionary (keys: {list(d.keys())}).")
        source = d[self.source_key]
        if not isinstance(source, MetaTensor):
            raise ValueError(
                f"`source_key` {self.source_key!r} must hold a MetaTensor with the image's metadata "
                f"(e.g. from LoadImaged), got {type(source).__name__}."
            )
        for key in self.key_iterator(d):
            value = convert_to_tensor(d[key], track_meta=False)
            if tuple(value.shape[1:]) != tuple(source.shape[1:]):
                raise ValueError(
                    f"`{key}` has spatial shape {tuple(value.shape[1:])} but the source {self.source_key!r} has "
                    f"{tuple(source.shape[1:])}; bring it back to the source space first."
                )
            d[key] = MetaTensor(
                value.to(source.device),
                meta=copy.deepcopy(source.meta),
                applied_operations=copy.deepcopy(source.applied_operations),
            )
        return d


def map_writer(
    output_dir: str | Path,
    map_key: str | None = "map",
    mask_key: str | None = "mask",
    source_key: str = "image",
    output_ext: str = ".nii.gz",
    resample: bool = False,
    separate_folder: bool = False,
    print_log: bool = False,
    allow_missing_keys: bool = False,
    name_key: str | None = "output_name",
) -> Compose:
    """
    Transform chain writing a continuous map and its binary mask as images in the source image's space.

    ``CopyMetaFromd`` gives both the source's metadata, then one :py:class:`~monai_wsss.transforms.io.SaveVolumed`
    per key (MONAI's ``SaveImage``, through a temporary file renamed into place, so a killed run never leaves a
    truncated file under the final name) writes ``<name>_<key><output_ext>`` into ``output_dir`` (float32 map,
    uint8 mask) with the source's affine; ``<name>`` is the data's ``name_key`` entry when present (a name unique
    per case), else the source file's name. Trailing singleton dimensions are kept: a one-slice volume is written
    ``(H, W, 1)``, as read. With ``resample=False`` (default) the arrays are written as they are, which is the input's
    space when no spatial transform was applied after loading (``volume_preprocess`` applies none); with
    ``resample=True`` ``SaveImaged`` resamples to the source file's original affine and shape (e.g. after
    an ``Orientationd``; nearest neighbour for the mask).

    Args:
        output_dir: folder to write into (created when missing).
        map_key: key of the continuous map, or None to skip it.
        mask_key: key of the binary mask, or None to skip it.
        source_key: key of the source image (a MetaTensor from ``LoadImaged``).
        output_ext: file extension (``".nii.gz"``, ``".nii"``, ...).
        resample: resample to the original affine / shape before writing.
        separate_folder: write each case into its own sub-folder (``SaveImaged`` option).
        print_log: unused (kept for compatibility; the pipeline logs what it wrote).
        name_key: data key holding the output name of the case (see above).
        allow_missing_keys: don't raise an exception if ``map_key`` or ``mask_key`` is missing.

    Returns:
        a ``Compose`` applied to a data dictionary (returns the dictionary).

    Raises:
        ValueError: both keys None, or as :py:class:`CopyMetaFromd` when called.

    Example::

        write = map_writer("out/", map_key="map", mask_key="mask", source_key="image")
        write({"image": image, "map": map3d, "mask": mask3d})  # out/<case>_flair_map.nii.gz, ..._mask.nii.gz
    """
    keys = [k for k in (map_key, mask_key) if k is not None]
    if not keys:
        raise ValueError("`map_key` and `mask_key` are both None: nothing to write.")
    common: dict = dict(
        output_dir=output_dir,
        output_ext=output_ext,
        resample=resample,
        separate_folder=separate_folder,
        name_key=name_key,
        allow_missing_keys=allow_missing_keys,
    )
    steps: list[Callable] = [CopyMetaFromd(keys, source_key=source_key, allow_missing_keys=allow_missing_keys)]
    if map_key is not None:
        steps.append(SaveVolumed(map_key, output_postfix=map_key, mode="bilinear", output_dtype=np.float32, **common))
    if mask_key is not None:
        steps.append(SaveVolumed(mask_key, output_postfix=mask_key, mode="nearest", output_dtype=np.uint8, **common))
    return Compose(steps)
