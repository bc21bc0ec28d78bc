# Copyright (c) monai_wsss contributors
# Licensed under the Apache License, Version 2.0
"""Moving 2D slices into the networks' space (fixed size, intensities in [-1, 1]) and maps back to the source."""

from __future__ import annotations

from collections.abc import Sequence

from monai.transforms import AsDiscreted, Compose, Invertd, Resized, ScaleIntensityRanged

__all__ = ["model_space_transform", "invert_model_space"]


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
            Resized(image_keys, spatial_size, mode="bilinear", anti_aliasing=True, allow_missing_keys=missing),
            ScaleIntensityRanged(image_keys, a_min=0.0, a_max=1.0, b_min=-1.0, b_max=1.0, allow_missing_keys=missing),
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
