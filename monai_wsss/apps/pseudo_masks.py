# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""
Pseudo-masks of a training split, the input of the second stage of weakly supervised segmentation.

Positive slices (image-level label 1) take the mask of a source method (any method a bundle runs); negative slices
get an exact empty mask (the image-level label says there is nothing to find); unlabelled slices (no row of the
labels file, or, with labels derived from masks, a few target pixels under the task's 0.2 % rule) keep the source's
mask and are left out of training by :py:func:`~monai_wsss.data.build_slice_dataset`, which applies the same labels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, FillHoles
from monai.utils import convert_to_tensor, optional_import

from monai_wsss.apps.pipeline import VolumeSegmentationPipeline
from monai_wsss.data.slice_labels import SliceLabels, mask_slice_labels
from monai_wsss.data.tasks import TaskPreset, get_task
from monai_wsss.transforms.weak_label import MapTargetLabelsd
from monai_wsss.inferers.threshold import masked_percentile
from monai_wsss.transforms.io import LoadVolumed, SaveVolumed
from monai_wsss.utils.atomic_files import write_text_atomic
from monai_wsss.transforms.slicing import slice_foreground_fraction

tqdm, has_tqdm = optional_import("tqdm", name="tqdm")

__all__ = ["PseudoMaskGenerator", "write_target_masks"]

logger = logging.getLogger(__name__)

# bump when the pseudo-mask rule changes, so a cache folder is never reused across rules
_PSEUDO_VERSION = "3"


class PseudoMaskGenerator:
    """
    Pseudo-masks of whole training volumes from a source method and the slices' image-level labels.

    Per volume: ``pipeline.segment(item)`` gives the source's mask in the volume's space; every negative slice
    (image-level label 0) is set to empty; with ``fill_holes`` the holes of each slice's mask are filled (MONAI
    ``FillHoles``: a bright rim around a darker core, such as oedema around necrosis on FLAIR, becomes one
    object). The slice labels come from ``labels`` (a labels file; no pixel mask is read), or, without them, from
    the item's ``seg`` by the task's rule, read only through those labels.

    With ``healthy_percentile`` the source's mask is also restricted to voxels brighter than that percentile of the
    body intensities on the same volume's healthy slices (image-level label 0, body fraction at least the task's
    ``min_body_fraction``): an intensity reference per patient, learned from the image-level labels. It adapts to
    volumes whose normal tissue is bright after normalisation, where a fixed fraction of a high percentile marks
    far more than the target (BraTS validation: pseudo-mask volume Dice 0.796 with the threshold at 0.6 alone, 0.844
    with the threshold at 0.5 and the healthy reference at 98; ``scripts/pseudo_mask_quality.py``).

    :py:meth:`generate` writes ``<case>_pseudo.nii.gz`` (uint8, the image's affine) per volume into a folder
    named by the settings' digest (so two settings never share files, and the same settings reuse them) with a
    ``settings.json``; every file is written under a temporary name and renamed into place, so a killed run
    leaves only complete files and a rerun continues where it stopped.

    Args:
        pipeline: the source method as a :py:class:`~monai_wsss.apps.VolumeSegmentationPipeline` with a
            per-volume threshold (a float or ``"otsu"``; the run-level ``"average_otsu"`` is not available volume
            by volume). Its ``seed`` makes diffusion sources reproducible.
        fill_holes: fill the holes of each slice's mask.
        source_name: name of the source (``settings.json``, log lines), e.g. the method name.
        healthy_percentile: percentile in ``(0, 100)`` of the healthy slices' body intensities a voxel must exceed
            to stay in the mask (``None``: the source's mask alone). A volume without any healthy slice keeps the
            source's mask alone, with a warning naming it.
        labels: the slices' image-level labels (:py:class:`~monai_wsss.data.SliceLabels`); ``None``: derived from
            each item's ``seg``.

    Raises:
        ValueError: a pipeline with ``threshold="average_otsu"``, ``healthy_percentile`` outside ``(0, 100)``.

    Example::

        source = VolumeSegmentationPipeline(None, build_method_inferer("volume_threshold"), task="brats",
                                            map_mode=None, threshold=0.6)
        gen = PseudoMaskGenerator(source, fill_holes=True, source_name="volume_threshold@0.6", healthy_percentile=98.5)
        items = gen.generate(splits["training"], "/work/cache/pseudo")   # items gain "pseudo": path
        ds = build_slice_dataset(items, "brats", (96, 96), split="train", extra_mask_keys=("pseudo",))
    """

    def __init__(
        self,
        pipeline: VolumeSegmentationPipeline,
        fill_holes: bool = True,
        source_name: str = "source",
        healthy_percentile: float | None = None,
        labels: SliceLabels | None = None,
    ) -> None:
        if healthy_percentile is not None and not 0 < float(healthy_percentile) < 100:
            raise ValueError(f"healthy_percentile must lie in (0, 100) or be None, got {healthy_percentile!r}.")
        self.healthy_percentile = None if healthy_percentile is None else float(healthy_percentile)
        if pipeline.threshold == "average_otsu":
            raise ValueError(
                "pseudo-masks are made volume by volume: give the source pipeline a fixed threshold or 'otsu', "
                "not 'average_otsu'."
            )
        self.pipeline = pipeline
        self.labels = labels
        self.preset = pipeline.preset
        self.fill_holes = bool(fill_holes)
        self.source_name = str(source_name)
        self.hole_filler = FillHoles()

    def settings(self) -> dict:
        """
        Everything a pseudo-mask depends on (its digest names the output folder): the source pipeline's
        :py:meth:`~monai_wsss.apps.VolumeSegmentationPipeline.run_settings` (task preset with the slice-label rule,
        inferer settings, seed and a checksum of every network's weights, so retrained source weights never
        reuse old masks), the hole filling and the healthy-slice reference.
        """
        return {
            "version": _PSEUDO_VERSION,
            "source": self.source_name,
            "pipeline": self.pipeline.run_settings(),
            "fill_holes": self.fill_holes,
            "healthy_percentile": self.healthy_percentile,
            "labels": None if self.labels is None else self.labels.digest(),
        }

    def healthy_reference(self, image: torch.Tensor, healthy: torch.Tensor, case: str = "") -> float:
        """
        The ``healthy_percentile``-th percentile of the body intensities (``image != 0``) on the healthy slices.

        Args:
            image: ``(1, H, W, D)`` image as the pipeline loads it (0 outside the body).
            healthy: bool ``(n_slices,)`` along the task's slice axis: the slices labelled 0 (no target).
            case: case id for the error message.

        Raises:
            ValueError: ``healthy_percentile`` is None, or the volume has no healthy slice with enough body.
        """
        if self.healthy_percentile is None:
            raise ValueError("healthy_reference needs healthy_percentile.")
        slices = convert_to_tensor(image, track_meta=False)[0].movedim(self.preset.slice_axis, 0).float()
        body = slices != 0
        enough_body = slice_foreground_fraction(image, self.preset.slice_axis) >= self.preset.min_body_fraction
        healthy = healthy.bool() & enough_body
        if not healthy.any():
            raise ValueError(
                f"case {case}: no slice labelled healthy with body fraction >= {self.preset.min_body_fraction}, so "
                "there is no healthy intensity reference; set healthy_percentile=None (bundles: "
                "--pseudo_healthy_percentile null) for this data."
            )
        values, inside = slices[healthy].reshape(1, -1), body[healthy].reshape(1, -1)
        return float(masked_percentile(values, inside, self.healthy_percentile)[0])

    def slice_labels(self, data: Mapping, case: str) -> torch.Tensor:
        """
        The image-level labels of a loaded volume's slices along the task's slice axis: from ``labels`` when given,
        else from the binary ``data["seg"]`` by the task's rule.

        Returns:
            int64 ``(n_slices,)``: 0, 1, or :py:data:`~monai_wsss.data.UNLABELLED` (-1; ambiguous under the rule).
        """
        if self.labels is not None:
            return self.labels.for_case(case, int(data["image"].shape[self.preset.slice_axis + 1]))
        return mask_slice_labels(convert_to_tensor(data["seg"], track_meta=False), self.preset)

    def __call__(self, item: Mapping) -> dict:
        """
        The pseudo-mask of one case.

        Args:
            item: ``{"image": path, "case": id[, "seg": path]}`` (``seg`` only without ``labels``).

        Returns:
            the pipeline's loaded data with ``pseudo`` (uint8 ``(1, H, W, D)``, in the task's orientation like the
            loaded image; :py:meth:`generate` writes it in the image's own array order and affine) and
            ``slice_label`` (int64 ``(n_slices,)``: 0, 1, -1 unlabelled).

        Raises:
            ValueError: without ``labels``, an item without ``seg`` (the message names ``--labels``); with them, a
                label beyond the scan's last slice; and the pipeline's errors.
        """
        case = str(item.get("case", item.get("image")))
        if self.labels is None and not item.get("seg"):
            raise ValueError(
                f"case {case}: no slice labels and no pixel mask ('seg') to derive them from: pass --labels labels.csv."
            )
        # in the task's orientation, where the labels' slice indices count (the saved mask goes back to the scan's)
        data = self.pipeline.segment(
            item if self.labels is None else {k: v for k, v in item.items() if k != "seg"}, source_space=False
        )
        values = self.slice_labels(data, case)
        not_negative = values != 0  # unlabelled slices keep the source's mask; training leaves them out
        axis = self.preset.slice_axis
        mask = convert_to_tensor(data["mask"], track_meta=False).clone()
        keep_shape = [1, 1, 1, 1]
        keep_shape[axis + 1] = -1
        mask = mask * not_negative.to(mask.dtype).reshape(keep_shape)  # negative slices: exactly empty
        if self.healthy_percentile is not None:
            image = convert_to_tensor(data["image"], track_meta=False)
            try:
                reference = self.healthy_reference(image, values == 0, case)
            except ValueError as err:  # e.g. a target on every slice: this volume keeps the source's mask alone
                logger.warning(f"{err} Using the source's mask without a healthy reference for case {case}.")
            else:
                mask = mask * (image > reference).to(mask.dtype)
        if self.fill_holes:
            per_slice = mask.movedim(axis + 1, 0)  # (n, 1, a, b)
            filled = [convert_to_tensor(self.hole_filler(s), track_meta=False) if s.any() else s for s in per_slice]
            mask = torch.stack(filled).movedim(0, axis + 1)
        data["pseudo"] = mask.to(torch.uint8)
        data["slice_label"] = values
        return data

    def generate(
        self, items: Sequence[Mapping], output_dir: str | os.PathLike, progress: bool = True
    ) -> list[dict]:
        """
        Write the pseudo-masks of ``items`` (missing ones only) and return the items with ``"pseudo"`` paths.

        Args:
            items: datalist items with ``image`` and ``case`` (and ``seg`` without ``labels``), e.g. a bundle's
                training split.
            output_dir: cache folder; the masks go to ``output_dir/<task>_<settings digest>/``.
            progress: tqdm bar over the volumes.

        Returns:
            copies of the items with ``"pseudo"``: the mask path.

        Raises:
            ValueError: no items, an item without ``case`` (or ``seg`` without ``labels``), two items with the same
                case id.
        """
        if not items:
            raise ValueError("no training volume to make pseudo-masks for (items is empty).")
        cases = [str(it.get("case", "")) for it in items]
        if "" in cases:
            raise ValueError("every item needs a 'case' id (the pseudo-mask file name).")
        if len(set(cases)) != len(cases):
            raise ValueError(f"case ids repeat in items: {sorted({c for c in cases if cases.count(c) > 1})}.")
        settings = self.settings()
        digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        folder = Path(output_dir) / f"{self.preset.name}_{digest}"
        folder.mkdir(parents=True, exist_ok=True)
        settings_path = folder / "settings.json"
        if not settings_path.exists():
            write_text_atomic(settings_path, json.dumps(settings, indent=2))
        # <case>_pseudo.nii.gz, uint8, the image's affine, written atomically
        saver = SaveVolumed("pseudo", folder, output_dtype=np.uint8, name_key="case")
        out = []
        todo = [(it, saver.output_path({"case": case}, "pseudo")) for it, case in zip(items, cases)]
        missing = [(it, p) for it, p in todo if not p.exists()]
        logger.info(f"pseudo-masks ({self.source_name}) in {folder}: {len(todo) - len(missing)} cached, {len(missing)} to make")
        bar = tqdm(missing, desc=f"pseudo-masks ({self.source_name})") if progress and has_tqdm else missing
        for item, _ in bar:
            data = self(item)
            meta = dict(getattr(data["image"], "meta", {}))
            saver({"pseudo": MetaTensor(data["pseudo"], meta=meta), "case": str(item["case"])})
        for item, path in todo:
            out.append({**dict(item), "pseudo": str(path)})
        return out


def write_target_masks(
    items: Sequence[Mapping], task: str | TaskPreset, output_dir: str | os.PathLike
) -> list[dict]:
    """
    The task's target masks of ``items`` (their ``seg`` mapped to 0/1 by the task's labels, e.g. CHAOS kidneys
    2 and 3) written as ``pseudo`` masks: what the second stage trains on for the **fully supervised** ceiling row
    (the same network and recipe on pixel labels), never for a weakly supervised model. Masks already written are
    reused.

    Args:
        items: datalist items with ``case`` and ``seg``.
        task: task name or preset.
        output_dir: folder; the masks go to ``output_dir/<task>_target_masks/<case>_pseudo.nii.gz``.

    Returns:
        copies of the items with ``"pseudo"``: the mask path.

    Raises:
        ValueError: an item without ``case`` or ``seg``; the errors of loading a mask (naming the file).

    Example::

        "pseudo_items": "$monai_wsss.apps.write_target_masks(@splits['training'], @task, @pseudo_dir)"
    """
    preset = get_task(task)
    folder = Path(output_dir) / f"{preset.name}_target_masks"
    load = Compose([
        LoadVolumed("seg", channel=preset.image_channel),
        MapTargetLabelsd("seg", target_labels=preset.target_labels, allowed_labels=preset.allowed_labels),
    ])
    saver = SaveVolumed("pseudo", folder, output_dtype=np.uint8, name_key="case")
    out = []
    for i, item in enumerate(items):
        if not item.get("case") or not item.get("seg"):
            raise ValueError(f"item {i}: the fully supervised ceiling needs 'case' and 'seg', got keys {list(item)}.")
        path = saver.output_path({"case": str(item["case"])}, "pseudo")
        if not path.exists():
            seg = load({"seg": item["seg"]})["seg"]
            saver({"pseudo": seg.to(torch.uint8), "case": str(item["case"])})
        out.append({**dict(item), "pseudo": str(path)})
    logger.info(f"fully supervised ceiling: target masks of {len(out)} volumes in {folder}")
    return out
