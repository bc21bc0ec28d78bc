# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""
The intensity profile of a model's training scans: what a scan looks like to the network after normalisation,
so that inference can say when a scan does not look like any of them.

The statistic is the 90th percentile of the normalised intensity inside the body (the preprocessing maps the
body's 0.5th and 99.5th percentiles to 0 and 1). A scan with a large, very bright structure that is not the target
(a cyst, a fluid-filled organ) moves the upper percentile into that structure: everything else, the target
included, lands at a fraction of its usual normalised intensity, and the statistic falls with it. A network
trained on "the target is among the brightest tissue" then marks the bright structure instead. On this project's
scans the 90th percentile varies less between scans than the median (CHAOS training scans 0.40-0.56 against
0.10-0.22; BraTS 0.44-0.80 against 0.28-0.64), so a smaller change stands out.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from monai_wsss.data.tasks import TaskPreset, get_task
from monai_wsss.utils.atomic_files import write_text_atomic

__all__ = [
    "PROFILE_STATISTIC",
    "PROFILE_PERCENTILE",
    "body_percentile",
    "check_intensity_profile",
    "intensity_profile",
    "load_intensity_profile",
    "write_intensity_profile",
]

logger = logging.getLogger(__name__)

#: the percentile of the normalised body intensity that a profile records
PROFILE_PERCENTILE = 90.0
#: what the profile's values are
PROFILE_STATISTIC = "90th percentile of the normalised intensity inside the body"
#: largest number of body voxels the percentile is computed from (a seeded sample of larger bodies: a 240 x 240 x 155
#: brain has ~1.5 M, and ``torch.quantile`` refuses inputs above 16 M elements)
_MAX_VOXELS = 1_000_000


def body_percentile(image: Any, q: float = PROFILE_PERCENTILE) -> float:
    """
    The ``q``-th percentile of a normalised image's body voxels (those above 0, the preprocessing's background).

    Args:
        image: a normalised image, ``(C, H, W, D)`` or any shape, background 0, body in (0, 1].
        q: the percentile, in [0, 100].

    Returns:
        the percentile over the body voxels (over a seeded sample of 1 M of them for larger bodies).

    Raises:
        ValueError: the image has no body voxel.

    Example::

        >>> round(body_percentile(torch.tensor([[0.0, 0.2, 0.4, 0.6, 0.8, 1.0]]), 50), 3)
        0.6
    """
    values = torch.as_tensor(image).detach().flatten().float()
    body = values[values > 0]
    if body.numel() == 0:
        raise ValueError("the image has no body voxel (every value is <= 0): no intensity profile.")
    if body.numel() > _MAX_VOXELS:
        body = body[torch.randperm(body.numel(), generator=torch.Generator().manual_seed(0))[:_MAX_VOXELS]]
    return float(torch.quantile(body, float(q) / 100.0))


def intensity_profile(
    items: Sequence[Mapping], task: str | TaskPreset, preprocessing: Callable[[dict], dict] | None = None
) -> dict:
    """
    The intensity profile of a set of scans (a model's training scans): each scan's :py:func:`body_percentile` after
    the task's preprocessing, and their range. Only the images are read, never a mask.

    Args:
        items: datalist items with ``image`` (and ``case``).
        task: the task (its preprocessing normalises the scans as training and inference do).
        preprocessing: the preprocessing instead (default: :py:func:`~monai_wsss.data.volume_preprocess` of the
            task).

    Returns:
        ``{"statistic", "task", "num_scans", "low", "high", "values": {case: value}}``.

    Raises:
        ValueError: no items, or an item without ``image``.
    """
    from monai_wsss.data.slice_dataset import volume_preprocess

    if not items:
        raise ValueError("intensity_profile needs at least one scan.")
    preset = get_task(task)
    preprocess = preprocessing or volume_preprocess(preset)
    values: dict[str, float] = {}
    for k, item in enumerate(items):
        if "image" not in item:
            raise ValueError(f"item {k} of the intensity profile's scans has no 'image': {dict(item)}")
        case = str(item.get("case", Path(str(item["image"])).name))
        values[case] = body_percentile(preprocess({"image": item["image"]})["image"])
    return {
        "statistic": PROFILE_STATISTIC,
        "task": preset.name,
        "num_scans": len(values),
        "low": min(values.values()),
        "high": max(values.values()),
        "values": values,
    }


def write_intensity_profile(
    items: Sequence[Mapping], task: str | TaskPreset, path: str | os.PathLike
) -> Path:
    """
    Write :py:func:`intensity_profile` of ``items`` as JSON beside a model (written under a temporary name and
    renamed into place). The bundles' ``train.json`` writes ``models/intensity_profile.json`` from its training
    scans.

    Returns:
        the written path.

    Example::

        write_intensity_profile(splits["training"], "chaos", "models/intensity_profile.json")
    """
    profile = intensity_profile(items, task)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(target, json.dumps(profile, indent=2) + "\n")
    logger.info(
        f"intensity profile of {profile['num_scans']} training scans ({PROFILE_STATISTIC}: "
        f"{profile['low']:.3f}-{profile['high']:.3f}) written to {target}"
    )
    return target


def check_intensity_profile(profile: Any, where: str = "intensity profile") -> dict:
    """
    Check that ``profile`` is an intensity profile (``low`` <= ``high`` in (0, 1]); returns it as a dict.

    Raises:
        ValueError: it is not (the message starts with ``where`` and names the key).
    """
    if not isinstance(profile, Mapping):
        raise ValueError(f"{where}: must be a mapping with 'low' and 'high', got {type(profile).__name__}.")
    statistic = profile.get("statistic", PROFILE_STATISTIC)
    if statistic != PROFILE_STATISTIC:
        raise ValueError(f"{where}: 'statistic' must be {PROFILE_STATISTIC!r}, got {statistic!r}.")
    for key in ("low", "high"):
        value = profile.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 < value <= 1:
            raise ValueError(f"{where}: {key!r} must be a number in (0, 1], got {value!r}.")
    if profile["low"] > profile["high"]:
        raise ValueError(f"{where}: 'low' {profile['low']} is above 'high' {profile['high']}.")
    return dict(profile)


def load_intensity_profile(path: str | os.PathLike) -> dict:
    """
    Read a profile written by :py:func:`write_intensity_profile`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not such a profile (it names the file and the key).
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(
            f"intensity profile {source} not found (written by train.json beside the model, or by "
            "monai_wsss.data.write_intensity_profile; pass intensity_profile null to skip the check)."
        )
    try:
        profile = json.loads(source.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"intensity profile {source} is not JSON: {err}") from err
    return check_intensity_profile(profile, f"intensity profile {source}")
