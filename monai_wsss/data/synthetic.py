# Copyright (c) monai_wsss contributors
# Licensed under the Apache License, Version 2.0
"""
Brain-like synthetic FLAIR volumes with lesions, for tests and the demo (no download).

By default the lesions are the brightest structure of the image and uniformly hyperintense, so a plain intensity
threshold finds them. ``bright_anatomy=True`` adds a bright cortical band on every slice and ``dark_core=True``
gives the lesions a necrotic core that is not hyperintense (a bright ring around a tissue-like centre), as on
real FLAIR scans: the brightest voxels of a slice are then not simply the target, and the target is not simply
its brightest voxels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy.ndimage import gaussian_filter

__all__ = ["synthetic_brain_volume", "make_synthetic_dataset"]


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma: float, factor: int = 4) -> np.ndarray:
    """Unit-variance smooth noise, drawn at ``1/factor`` resolution and trilinearly upsampled (fast on big volumes)."""
    small = [max(2, int(np.ceil(s / factor))) for s in shape]
    noise = gaussian_filter(rng.standard_normal(small), sigma=max(sigma / factor, 0.5), mode="wrap")
    noise /= noise.std() + 1e-8
    up = torch.nn.functional.interpolate(
        torch.from_numpy(noise.astype(np.float32))[None, None], size=tuple(shape), mode="trilinear", align_corners=False
    )
    return up[0, 0].numpy()


def synthetic_brain_volume(
    shape: Sequence[int] = (96, 96, 48),
    seed: int | np.random.Generator = 0,
    num_lesions: int | None = None,
    outliers: bool = False,
    bright_anatomy: bool = False,
    lesion_contrast: float = 1.0,
    dark_core: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """
    One synthetic skull-stripped FLAIR-like volume with its BraTS-style mask.

    The brain is an ellipsoid with smooth tissue texture, a slightly brighter cortical rim and two darker
    ventricles, on an exact-zero background. Lesions are irregular ellipsoids with a label-2 rim (oedema)
    around a label-1 or label-4 core, brighter than tissue as in FLAIR, with varied sizes and positions; they
    never cover every slice, so lesion-free slices exist in every volume.

    With ``bright_anatomy`` the brain also holds normal anatomy brighter than tissue on every slice (healthy
    slices included), never labelled: a band along the brain's outer boundary (about 7 % of the brain's voxels,
    like bright cortex), dimmer than the lesions' oedema but above most of the tissue. With ``dark_core`` the
    lesions' core is larger (its squared normalised radius up to 0.5 instead of 0.35) and gets no hyperintensity
    (necrosis: tissue-like intensity inside the bright oedema ring), still labelled (1 or 4). ``lesion_contrast``
    scales the lesions' hyperintensity over tissue (1: the default). With the options off, the volumes are exactly
    those of earlier versions (the options add no random draw then).

    Args:
        shape: (H, W, D) volume shape; H, W at least 16, D at least 4.
        seed: integer seed or a NumPy generator (deterministic output for a given seed).
        num_lesions: number of lesions (``None``: 1 to 3 drawn from the seed; 0: a lesion-free volume).
        outliers: put a few voxels at 32767 inside the brain (as in some raw BraTS FLAIR volumes).
        bright_anatomy: add a bright cortical band on every slice (normal anatomy, never labelled).
        lesion_contrast: factor (> 0) on the lesions' intensity above tissue.
        dark_core: give each lesion a larger core without hyperintensity (necrosis inside a bright ring).

    Returns:
        ``(image, seg, affine)``: int16 image (H, W, D), uint8 mask with labels {0, 1, 2, 4}, 4 x 4 affine
        (1 mm voxels, BraTS-like orientation).

    Raises:
        ValueError: a too small shape, a negative ``num_lesions`` or a ``lesion_contrast`` that is not > 0.

    Example::

        >>> image, seg, affine = synthetic_brain_volume((64, 64, 32), seed=1)
        >>> image.shape, sorted(set(np.unique(seg)) - {0}) != []
        ((64, 64, 32), True)
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape[:2]) < 16 or shape[2] < 4:
        raise ValueError(f"shape must be (H, W, D) with H, W >= 16 and D >= 4 voxels, got {shape}.")
    if num_lesions is not None and num_lesions < 0:
        raise ValueError(f"num_lesions must be >= 0, got {num_lesions}.")
    if not (np.isfinite(lesion_contrast) and lesion_contrast > 0):
        raise ValueError(f"lesion_contrast must be a finite number > 0, got {lesion_contrast!r}.")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    size = np.asarray(shape, dtype=np.float32)
    grids = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij", sparse=True)

    def radius_map(centre, radii, box=None):
        # squared normalised distance to an ellipsoid centre, on the whole volume or inside a bounding box
        box = box or tuple(slice(None) for _ in shape)
        return sum(
            ((g[tuple(box[a] if a == axis else slice(None) for a in range(3))] - np.float32(c)) / np.float32(r)) ** 2
            for axis, (g, c, r) in enumerate(zip(grids, centre, radii))
        )

    def bounding_box(centre, radii, margin=1.3):
        return tuple(
            slice(max(0, int(c - margin * r)), min(n, int(np.ceil(c + margin * r)) + 1))
            for c, r, n in zip(centre, radii, shape)
        )

    centre = size / 2 + rng.uniform(-0.03, 0.03, 3) * size
    radii = size * np.array([0.40, 0.36, 0.44]) * rng.uniform(0.92, 1.05, 3)
    shape_noise = _smooth_noise(rng, shape, sigma=min(shape) / 6)
    r_brain = radius_map(centre, radii) + 0.04 * shape_noise
    brain = r_brain <= 1.0

    image = 300.0 + 25.0 * _smooth_noise(rng, shape, sigma=2.0) + 15.0 * shape_noise
    image += 40.0 * np.clip((r_brain - 0.75) / 0.25, 0.0, 1.0)  # brighter cortical rim
    for side in (-1.0, 1.0):  # ventricles: dark (CSF is suppressed in FLAIR)
        v_centre = centre + np.array([-0.05, side * 0.11, 0.05]) * size
        v_radii = size * np.array([0.16, 0.05, 0.14])
        box = bounding_box(v_centre, v_radii, margin=1.0)
        ventricle = radius_map(v_centre, v_radii, box) <= 1.0
        image[box][ventricle] = 110.0 + 10.0 * shape_noise[box][ventricle]

    seg = np.zeros(shape, dtype=np.uint8)
    n_lesions = int(rng.integers(1, 4)) if num_lesions is None else num_lesions
    lesion_noise = _smooth_noise(rng, shape, sigma=3.0)
    for _ in range(n_lesions):
        # radius from small (a few voxels) to large (a sixth of the smallest side); centre well inside the brain
        radius = rng.uniform(2.5, max(3.0, min(shape) / 6.0)) * rng.uniform(0.8, 1.25, 3)
        radius[2] = min(radius[2], 0.3 * shape[2])  # never spans the whole depth: lesion-free slices remain
        l_centre = centre + rng.uniform(-0.5, 0.5, 3) * radii
        box = bounding_box(l_centre, radius)  # the noise term can only shrink r by 0.25 * |noise|, covered by 1.3
        r_lesion = radius_map(l_centre, radius, box) + 0.25 * lesion_noise[box]
        oedema = (r_lesion <= 1.0) & brain[box]
        core = (r_lesion <= (0.5 if dark_core else 0.35)) & brain[box]
        # hyperintense like FLAIR oedema, brightest in the centre, edges still well above tissue
        added = (
            oedema * (230.0 + 90.0 * rng.uniform()) * float(lesion_contrast) * np.clip(1.4 - 0.6 * r_lesion, 0.7, 1.0)
        )
        if dark_core:  # necrosis: no hyperintensity inside the ring
            added = np.where(core, np.float32(0.0), added)
        image[box] += added
        seg_box = seg[box]
        seg_box[oedema & (seg_box == 0)] = 2
        seg_box[core] = 4 if rng.uniform() < 0.5 else 1

    image += rng.standard_normal(shape, dtype=np.float32) * 8.0
    if bright_anatomy:
        # a bright band along the brain's outer boundary, on every slice (its brightness is drawn only here, so
        # volumes without the option are unchanged)
        band = (r_brain > 0.90) & (r_brain <= 0.95)
        image += np.float32(120.0 * rng.uniform(0.9, 1.1)) * band
    image = np.where(brain, np.clip(image, 1.0, None), 0.0)
    seg[~brain] = 0
    if outliers:
        inside = np.argwhere(brain)
        picks = inside[rng.choice(len(inside), size=5, replace=False)]
        image[tuple(picks.T)] = 32767
    affine = np.array(
        [[-1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, shape[1] - 1.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    )
    return np.round(image).astype(np.int16), seg, affine


def make_synthetic_dataset(
    out_dir: str | os.PathLike,
    num_cases: int = 6,
    shape: Sequence[int] = (96, 96, 48),
    seed: int = 0,
    lesion_free_every: int = 4,
    bright_anatomy: bool = False,
    lesion_contrast: float = 1.0,
    dark_core: bool = False,
) -> list[dict]:
    """
    Write a synthetic BraTS-layout dataset: ``out_dir/<case>/<case>_flair.nii.gz`` and ``<case>_seg.nii.gz``.

    Case ``i`` is drawn from ``numpy.random.default_rng([seed, i])``, so a case does not change when
    ``num_cases`` does. Every ``lesion_free_every``-th case (indices 3, 7, ... by default) has no lesion; the
    second case has intensity outliers at 32767 like some raw BraTS FLAIR volumes.

    Args:
        out_dir: output folder (created).
        num_cases: number of cases.
        shape: (H, W, D) of every volume.
        seed: dataset seed.
        lesion_free_every: period of lesion-free cases (0: none).
        bright_anatomy: add a bright cortical band on every slice (see :py:func:`synthetic_brain_volume`).
        lesion_contrast: factor (> 0) on the lesions' hyperintensity (see :py:func:`synthetic_brain_volume`).
        dark_core: lesions with a necrotic core that is not hyperintense (see :py:func:`synthetic_brain_volume`).

    Returns:
        datalist items ``{"image": path, "seg": path, "case": id}``, as :py:func:`build_brats_datalist` lists them.

    Raises:
        ValueError: ``num_cases`` < 1 (and see :py:func:`synthetic_brain_volume`).

    Example::

        >>> items = make_synthetic_dataset("/tmp/synthetic_brats", num_cases=2, shape=(32, 32, 16))  # doctest: +SKIP
        >>> items[0]["case"]  # doctest: +SKIP
        'synth_000'
    """
    if num_cases < 1:
        raise ValueError(f"num_cases must be >= 1, got {num_cases}.")
    root = Path(out_dir)
    items = []
    for i in range(num_cases):
        case = f"synth_{i:03d}"
        lesion_free = lesion_free_every > 0 and i % lesion_free_every == lesion_free_every - 1
        image, seg, affine = synthetic_brain_volume(
            shape,
            seed=np.random.default_rng([seed, i]),
            num_lesions=0 if lesion_free else None,
            outliers=i == 1,
            bright_anatomy=bright_anatomy,
            lesion_contrast=lesion_contrast,
            dark_core=dark_core,
        )
        case_dir = root / case
        case_dir.mkdir(parents=True, exist_ok=True)
        image_path = case_dir / f"{case}_flair.nii.gz"
        seg_path = case_dir / f"{case}_seg.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), str(image_path))
        nib.save(nib.Nifti1Image(seg, affine), str(seg_path))
        items.append({"image": str(image_path.resolve()), "seg": str(seg_path.resolve()), "case": case})
    return items
