# Copyright (c) monai_wsss contributors
# Licensed under the Apache License, Version 2.0
"""Moving 2D slices into the networks' space (fixed size, intensities in [-1, 1]) and maps back to the source."""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType

import torch
from monai.transforms import AsDiscreted, Compose, Invertd, Resize, Resized, ScaleIntensityRange, ScaleIntensityRanged
from monai.utils import convert_to_tensor

__all__ = [
    "IMAGE_INTERPOLATION",
    "MODEL_INTENSITY_RANGE",
    "invert_model_space",
    "model_space_transform",
    "resize_slices",
    "slices_to_model_space",
]

#: the networks' intensity range: images in ``[0, 1]`` are mapped linearly onto it (no clipping)
MODEL_INTENSITY_RANGE = (-1.0, 1.0)
#: how images (and maps, on the way back) are resized between source and model space
IMAGE_INTERPOLATION = MappingProxyType({"mode": "bilinear", "anti_aliasing": True})


def _intensity_steps() -> dict:
    return {"a_min": 0.0, "a_max": 1.0, "b_min": MODEL_INTENSITY_RANGE[0], "b_max": MODEL_INTENSITY_RANGE[1]}


def resize_slices(
    x: torch.Tensor,
    size: Sequence[int],
    mode: str = IMAGE_INTERPOLATION["mode"],
    anti_aliasing: bool = IMAGE_INTERPOLATION["anti_aliasing"],
) -> torch.Tensor:
    """
    Resize a batch of 2D slices ``(N, C, h, w)`` with MONAI ``Resize`` (batch and channels as its channels),
    keeping the input's dtype.

    Args:
        x: the slices.
        size: the target ``(h, w)``.
        mode: ``Resize`` interpolation.
        anti_aliasing: Gaussian anti-aliasing when shrinking.

    Returns:
        a plain tensor ``(N, C, *size)`` with ``x``'s dtype and device.

    Raises:
        ValueError: ``x`` is not ``(N, C, h, w)`` or ``size`` is not two positive ints.

    Example::

        >>> resize_slices(torch.rand(2, 1, 240, 240), (64, 64)).shape
        torch.Size([2, 1, 64, 64])
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"`x` must be a batch of slices (N, C, h, w), got {tuple(getattr(x, 'shape', ())) or type(x)}.")
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"`size` must be two positive ints, got {size!r}.")
    if tuple(x.shape[2:]) == size:
        return x
    n, c = x.shape[:2]
    # Resize computes in float32 / float64; the result keeps the caller's dtype (e.g. half networks)
    compute_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    resize = Resize(spatial_size=size, mode=mode, anti_aliasing=anti_aliasing, dtype=compute_dtype)
    out = resize(x.reshape(n * c, *x.shape[2:]))
    return convert_to_tensor(out, track_meta=False).to(x.dtype).reshape(n, c, *size)


def slices_to_model_space(
    x: torch.Tensor,
    spatial_size: Sequence[int],
    rescale: bool = True,
    mode: str = IMAGE_INTERPOLATION["mode"],
    anti_aliasing: bool = IMAGE_INTERPOLATION["anti_aliasing"],
) -> torch.Tensor:
    """
    A batch of slices ``(N, C, h, w)`` in ``[0, 1]`` as the networks see them: the steps of
    :py:func:`model_space_transform` on plain tensors (resized to ``spatial_size``, then mapped onto
    :py:data:`MODEL_INTENSITY_RANGE`), for inference on batches that carry no per-item metadata.

    Args:
        x: the slices.
        spatial_size: the model-space ``(h, w)``.
        rescale: map the intensities to ``[-1, 1]`` (False: the input is already in the network's range).
        mode: ``Resize`` interpolation.
        anti_aliasing: Gaussian anti-aliasing when shrinking.

    Returns:
        a plain tensor ``(N, C, *spatial_size)`` with ``x``'s dtype.

    Raises:
        ValueError: see :py:func:`resize_slices`.

    Example::

        >>> out = slices_to_model_space(torch.zeros(1, 1, 240, 240), (64, 64))
        >>> out.shape, float(out.max())
        (torch.Size([1, 1, 64, 64]), -1.0)
    """
    x = resize_slices(x, spatial_size, mode=mode, anti_aliasing=anti_aliasing)
    if not rescale:
        return x
    return convert_to_tensor(ScaleIntensityRange(**_intensity_steps(), dtype=None)(x), track_meta=False)


def model_space_transform(
    spatial_size: Sequence[int] | int = (64, 64),
    image_keys: str | Sequence[str] = ("image",),
    seg_keys: str | Sequence[str] = ("seg",),
    allow_missing_keys: bool = True,
) -> Compose:
    """
    Compose moving 2D (or 3D) images in [0, 1] and binary masks to model space, built from MONAI transforms.

    Images are resized with anti-aliased bilinear interpolation (``Resized``) and scaled from [0, 1] to
    [-1, 1] (``ScaleIntensityRanged``, no clipping); masks are area-resized and thresholded at 0.5 so that a
    thin structure is not lost by nearest-neighbour sampling. The ``Resized`` steps are recorded in each
    MetaTensor's ``applied_operations``, so :py:func:`invert_model_space` (MONAI's ``Invertd``) maps outputs
    computed in model space back to the source shape and affine. Intensities are not inverted there (a map
    is not an image); ``(x + 1) / 2`` undoes the scaling of an image.

    Args:
        spatial_size: model-space size per spatial dimension (an int is repeated).
        image_keys: keys of images in [0, 1].
        seg_keys: keys of binary masks.
        allow_missing_keys: do not raise when a key is absent (e.g. inference without masks).

    Returns:
        a ``Compose`` of MONAI transforms.

    Raises:
        ValueError: a key is both an image and a mask key.

    Example::

        >>> import torch
        >>> from monai.data import MetaTensor
        >>> to_model = model_space_transform((64, 64))
        >>> out = to_model({"image": MetaTensor(torch.rand(1, 240, 240)), "seg": MetaTensor(torch.zeros(1, 240, 240))})
        >>> out["image"].shape, bool(out["image"].min() >= -1)
        (torch.Size([1, 64, 64]), True)
    """
    image_keys = [image_keys] if isinstance(image_keys, str) else list(image_keys)
    seg_keys = [seg_keys] if isinstance(seg_keys, str) else list(seg_keys)
    overlap = set(image_keys) & set(seg_keys)
    if overlap:
        raise ValueError(f"keys {sorted(overlap)} are listed both as images and as masks.")
    missing = allow_missing_keys
    steps = []
    if image_keys:
        steps += [
            Resized(image_keys, spatial_size, **IMAGE_INTERPOLATION, allow_missing_keys=missing),
            ScaleIntensityRanged(image_keys, **_intensity_steps(), allow_missing_keys=missing),
        ]
    if seg_keys:
        steps += [
            Resized(seg_keys, spatial_size, mode="area", allow_missing_keys=missing),
            AsDiscreted(seg_keys, threshold=0.5, allow_missing_keys=missing),
        ]
    return Compose(steps)


def invert_model_space(
    transform: Compose,
    keys: str | Sequence[str] = ("map",),
    orig_key: str = "image",
    nearest_interp: bool = False,
    allow_missing_keys: bool = False,
) -> Invertd:
    """
    MONAI ``Invertd`` taking model-space outputs (maps, masks) back to the source slice or volume.

    Args:
        transform: the forward transform (from :py:func:`model_space_transform`, or any Compose containing it).
        keys: keys of the model-space outputs to invert; they take the spatial history of ``orig_key``.
        orig_key: key of the image the forward transform was applied to.
        nearest_interp: use nearest-neighbour interpolation (for binary masks).
        allow_missing_keys: do not raise when a key is absent.

    Returns:
        an ``Invertd`` transform; outputs come back with the source shape and affine.

    Example::

        >>> import torch
        >>> from monai.data import MetaTensor
        >>> to_model = model_space_transform((64, 64))
        >>> d = to_model({"image": MetaTensor(torch.rand(1, 240, 240))})
        >>> d["map"] = d["image"].clone()
        >>> invert_model_space(to_model)(d)["map"].shape
        torch.Size([1, 240, 240])
    """
    return Invertd(
        keys=keys,
        transform=transform,
        orig_keys=orig_key,
        nearest_interp=nearest_interp,
        allow_missing_keys=allow_missing_keys,
    )
