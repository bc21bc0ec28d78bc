# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""Volume in, map + mask in the volume's space out: the inference / evaluation pipeline of the bundles."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import LoadImage, RemoveSmallObjects
from monai.utils import convert_to_tensor

import monai_wsss
from monai_wsss.apps.reports import VolumeEvaluation, save_overlay, write_csv, write_summary_markdown
from monai_wsss.apps.run_folder import RunFolder, state_dict_checksum, unique_output_stems
from monai_wsss.data import TASKS, TaskPreset, volume_preprocess
from monai_wsss.inferers import SliceProbabilityInferer, VolumeInferer
from monai_wsss.networks.precision import AutocastNetwork
from monai_wsss.transforms import NormalizeMap, OtsuThreshold, map_writer, otsu_thresholds, write_text_atomic

__all__ = ["VolumeSegmentationPipeline", "THRESHOLD_MODES"]

logger = logging.getLogger(__name__)

#: string values of ``threshold``: per-slice Otsu, or one dataset-level threshold (mean of the per-slice Otsu
#: thresholds of all maps of a run, the CDM paper's "average Otsu")
THRESHOLD_MODES = ("otsu", "average_otsu")

# inferer attributes worth reporting, in this order
_SETTINGS = ("noise_level", "num_steps", "tau", "guidance_scale", "mode", "cfg_scale", "percentile")


def _preset(task: str | TaskPreset) -> TaskPreset:
    if isinstance(task, TaskPreset):
        return task
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}, expected one of {sorted(TASKS)} or a TaskPreset.")
    return TASKS[task]


def _finite(x: Any) -> Any:
    """JSON-friendly value: nan / inf floats become None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


class VolumeSegmentationPipeline:
    """
    Weakly supervised segmentation of whole volumes with any 2D inferer of this package (CDM, CG-CDM,
    CG-Diff, classifier-free guidance, CAMs, intensity threshold): a volume file in, a continuous map and a
    binary mask out, both in the input's space (same shape and affine), plus optional evaluation reports.

    Per volume: :py:func:`~monai_wsss.data.volume_preprocess` (load, task label mapping, ``[0, 1]`` inside the
    body by percentiles), :py:class:`~monai_wsss.inferers.VolumeInferer` (batches of model-space slices, slices
    without body skipped), :py:class:`~monai_wsss.transforms.NormalizeMap` inside the body (per slice), then
    :py:class:`~monai_wsss.transforms.OtsuThreshold` per slice, or one threshold for all volumes of a
    :py:meth:`run` (``threshold="average_otsu"``), or a fixed float.

    Args:
        network: the 2D network passed to the inferer (None for the intensity-threshold baseline).
        inferer: ``inferer(x, network, **kwargs) -> map`` on model-space slice batches, e.g. from
            :py:func:`~monai_wsss.apps.build_method_inferer`.
        task: ``"brats"``, ``"chaos"`` or a :py:class:`~monai_wsss.data.TaskPreset` (label mapping, slice axis,
            the CHAOS rule of leaving small-target slices out of the slice scores).
        roi_size: model-space slice size, the size the network was trained at.
        sw_batch_size: slices per inferer call.
        map_mode: ``NormalizeMap`` mode (``"signed"``, ``"abs"``, ``"minmax"``) or None to keep the raw map (for
            a fixed threshold on the map's own scale, e.g. the intensity baseline).
        normalize_per: ``"slice"`` (the paper's protocol: every slice's map is scaled to a maximum of 1, so a
            per-slice threshold finds something in every slice with body) or ``"volume"`` (one scale per volume:
            with ``"average_otsu"`` or a fixed threshold, slices whose map stays low get an empty mask).
        threshold: ``"otsu"`` (per slice), ``"average_otsu"`` (one threshold per :py:meth:`run`) or a float.
        largest_component: keep only the largest connected component of each slice's mask.
        slice_gate: volume-aware masks: empty the mask of every slice whose probability of holding the target,
            by ``gate_classifier`` on the clean slice (timestep 0), is below this value (``None``: no gate).
        gate_classifier: the noisy classifier of the slice gate (needed with ``slice_gate``, ignored without it).
        min_component_size: volume-aware masks: drop 3D connected components (26-connectivity) smaller than this
            many voxels, with MONAI ``RemoveSmallObjects`` (0: keep all).
        classifier: passed as ``classifier=`` to every inferer call (not needed when the inferer holds one).
        device: device of the inference (default: the network's, else CPU).
        seed: seed of the diffusion noise, re-seeded for each volume (results do not depend on the order).
        progress: show progress bars over slice batches.

    Raises:
        ValueError: unknown task, ``map_mode``, ``normalize_per`` or ``threshold``; a non-callable inferer;
            ``slice_gate`` outside [0, 1] or without ``gate_classifier``; a negative ``min_component_size``.

    Example::

        inferer = build_method_inferer("cdm", scheduler, net, noise_level=200, num_steps=10, tau=0.95)
        pipe = VolumeSegmentationPipeline(net, inferer, task="brats", roi_size=(64, 64))
        out = pipe.segment({"image": "case_flair.nii.gz"})     # out["map"], out["mask"]: (1, 240, 240, 155)
        result = pipe.run(list_volumes("brats_folder/"), "outputs/eval", evaluate=True, num_overlays=3)
        result["summary"]["slice_dice"]
    """

    def __init__(
        self,
        network: torch.nn.Module | None,
        inferer: Callable[..., torch.Tensor],
        task: str | TaskPreset = "brats",
        roi_size: Sequence[int] | int = (64, 64),
        sw_batch_size: int = 32,
        map_mode: str | None = "signed",
        normalize_per: str = "slice",
        threshold: str | float = "otsu",
        largest_component: bool = False,
        classifier: Callable[..., torch.Tensor] | None = None,
        device: torch.device | str | None = None,
        seed: int = 0,
        progress: bool = False,
        slice_gate: float | None = None,
        gate_classifier: Callable[..., torch.Tensor] | None = None,
        min_component_size: int = 0,
    ) -> None:
        if not callable(inferer):
            raise ValueError(f"`inferer` must be callable as inferer(x, network, ...), got {type(inferer).__name__}.")
        self.preset = _preset(task)
        if isinstance(threshold, str):
            if threshold not in THRESHOLD_MODES:
                raise ValueError(f"`threshold` must be one of {THRESHOLD_MODES} or a number, got {threshold!r}.")
        elif not isinstance(threshold, (int, float)) or not math.isfinite(float(threshold)):
            raise ValueError(f"`threshold` must be one of {THRESHOLD_MODES} or a finite number, got {threshold!r}.")
        if normalize_per not in ("slice", "volume"):
            raise ValueError(f"`normalize_per` must be 'slice' or 'volume', got {normalize_per!r}.")
        self.network = network
        self.inferer = inferer
        self.slice_axis = self.preset.slice_axis
        self.normalize_per = normalize_per
        scope = self.slice_axis if normalize_per == "slice" else None
        self.normalizer = None if map_mode in (None, "none") else NormalizeMap(mode=map_mode, slice_axis=scope)
        self.map_mode = None if self.normalizer is None else map_mode
        self.threshold = threshold if isinstance(threshold, str) else float(threshold)
        self.largest_component = bool(largest_component)
        if slice_gate is not None:
            if not 0.0 <= float(slice_gate) <= 1.0:
                raise ValueError(f"`slice_gate` must be a probability in [0, 1] or None, got {slice_gate!r}.")
            if gate_classifier is None:
                raise ValueError("`slice_gate` needs `gate_classifier` (the noisy classifier, classifier_path).")
        if int(min_component_size) < 0:
            raise ValueError(f"`min_component_size` must be >= 0 voxels, got {min_component_size!r}.")
        self.slice_gate = None if slice_gate is None else float(slice_gate)
        self.min_component_size = int(min_component_size)
        self.component_filter = (
            RemoveSmallObjects(min_size=self.min_component_size, connectivity=3) if self.min_component_size else None
        )
        self.classifier = classifier
        if device is None:
            params = [] if network is None else list(network.parameters())
            device = params[0].device if params else torch.device("cpu")
        self.device = torch.device(device)
        self.seed = int(seed)
        self.volume_inferer = VolumeInferer(
            inferer=inferer,
            roi_size=roi_size,
            slice_axis=self.slice_axis,
            sw_batch_size=sw_batch_size,
            skip_empty=True,
            sw_device=self.device,
            progress=progress,
        )
        # kept as an attribute so that a run's manifest records its weights (run_settings)
        self.gate_classifier = gate_classifier if self.slice_gate is not None else None
        self.gate = None if self.slice_gate is None else SliceProbabilityInferer(gate_classifier)  # type: ignore[arg-type]
        # the classifier's own model space (its input size), with the slices' resize and scaling rules
        self.gate_space = VolumeInferer(
            roi_size=tuple(getattr(gate_classifier, "input_shape", None) or self.volume_inferer.roi_size),
            slice_axis=self.slice_axis,
        )
        self.preprocess = volume_preprocess(self.preset)
        try:
            self._takes_generator = "generator" in inspect.signature(inferer).parameters
        except (TypeError, ValueError):  # builtins without a signature
            self._takes_generator = False

    # ---- one volume ---------------------------------------------------------------------------------------
    def load(self, item: Mapping | str | os.PathLike) -> dict:
        """
        Load and normalise one case: ``{"image": path[, "seg": path]}`` (or a path) to MetaTensors
        ``image`` ``(1, H, W, D)`` in ``[0, 1]`` (0 outside the body) and binary ``seg`` (when given).

        Raises:
            ValueError, FileNotFoundError: from :py:func:`~monai_wsss.data.volume_preprocess`, naming the file.
        """
        data = {"image": str(item)} if isinstance(item, (str, os.PathLike)) else dict(item)
        if "image" not in data:
            raise ValueError(f"item {data!r} has no 'image'.")
        data.setdefault("case", Path(str(data["image"])).name.split(".")[0])
        return self.preprocess(data)

    def predict(self, image: torch.Tensor) -> torch.Tensor:
        """
        The method's raw map of a normalised volume ``(1, H, W, D)``: same shape, on the CPU, zero on slices
        without body.
        """
        x = convert_to_tensor(image, track_meta=False)[None].to(self.device)
        if getattr(self.inferer, "whole_volume", False):  # e.g. the per-volume intensity threshold
            return convert_to_tensor(self.inferer(x, self.network), track_meta=False)[0].detach().float().cpu()
        kwargs: dict[str, Any] = {}
        if self.classifier is not None:
            kwargs["classifier"] = self.classifier
        if self._takes_generator:
            kwargs["generator"] = torch.Generator(device=self.device).manual_seed(self.seed)
        out = self.volume_inferer(x, self.network, **kwargs)
        return convert_to_tensor(out, track_meta=False)[0].detach().float().cpu()

    def normalize(self, raw_map: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """``NormalizeMap`` inside the body (``image != 0``), per slice or volume; the raw map when ``map_mode`` is None."""
        if self.normalizer is None:
            return raw_map
        return convert_to_tensor(self.normalizer(raw_map, body_mask=convert_to_tensor(image, track_meta=False)), track_meta=False)

    def binarize(self, map01: torch.Tensor, image: torch.Tensor, threshold: str | float | None = None) -> torch.Tensor:
        """
        The binary mask of a map, inside the body: per-slice Otsu (``"otsu"``) or a fixed float.

        Raises:
            ValueError: ``"average_otsu"``, which needs every map of a run (see :py:meth:`run`).
        """
        threshold = self.threshold if threshold is None else threshold
        if threshold == "average_otsu":
            raise ValueError("threshold='average_otsu' is computed over all volumes of a run: use run(), or pass a float.")
        thresholder = OtsuThreshold(
            threshold=None if threshold == "otsu" else float(threshold),
            slice_axis=self.slice_axis,
            largest_component=self.largest_component,
        )
        body = convert_to_tensor(image, track_meta=False)
        mask = convert_to_tensor(thresholder(map01, body_mask=body), track_meta=False)
        if self.gate is not None:
            mask = mask * self.slice_mask(image).to(mask.dtype)
        if self.component_filter is not None:
            mask = convert_to_tensor(self.component_filter(mask), track_meta=False).to(mask.dtype)
        return mask

    def slice_probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """
        The gate classifier's probability that each slice of a normalised volume ``(1, H, W, D)`` holds the
        target (clean slice, timestep 0); 0 for slices without body. Shape ``(n_slices,)`` along the slice axis.

        Raises:
            ValueError: the pipeline has no slice gate.
        """
        if self.gate is None:
            raise ValueError("this pipeline has no slice gate (slice_gate=None).")
        slices = convert_to_tensor(image, track_meta=False)[0].movedim(self.slice_axis, 0).float()  # (n, a, b)
        prob = torch.zeros(slices.shape[0])
        todo = torch.nonzero(slices.flatten(1).ne(0).any(1)).flatten()
        for start in range(0, int(todo.numel()), 64):
            chunk = todo[start : start + 64]
            x = self.gate_space.to_model_space(slices[chunk][:, None].to(self.device))
            prob[chunk] = self.gate.probabilities(x).cpu()
        return prob

    def slice_mask(self, image: torch.Tensor) -> torch.Tensor:
        """``(1, H, W, D)``-broadcastable 0/1 tensor: the slices the gate keeps (probability >= ``slice_gate``)."""
        keep = (self.slice_probabilities(image) >= self.slice_gate).float()
        shape = [1, 1, 1, 1]
        shape[self.slice_axis + 1] = -1
        return keep.reshape(shape)

    def segment(self, item: Mapping | str | os.PathLike, threshold: str | float | None = None) -> dict:
        """
        Segment one volume.

        Args:
            item: ``{"image": path[, "seg": path, "case": id]}`` or an image path.
            threshold: override of the pipeline's ``threshold`` (``"otsu"`` or a float).

        Returns:
            the loaded data with ``raw_map`` (the method's output), ``map`` (normalised, ``[0, 1]``) and ``mask``
            (0/1), all ``(1, H, W, D)`` in the input's space, and ``seconds`` (map computation time).
        """
        self.check_threshold(threshold)
        data = self.load(item)
        start = time.perf_counter()
        data["raw_map"] = self.predict(data["image"])
        data["map"] = self.normalize(data["raw_map"], data["image"])
        data["seconds"] = time.perf_counter() - start
        data["mask"] = self.binarize(data["map"], data["image"], threshold)
        return data

    # ---- a set of volumes ---------------------------------------------------------------------------------
    def describe(self) -> list[str]:
        """Lines describing the method and post-processing (for reports)."""
        settings = {k: getattr(self.inferer, k) for k in _SETTINGS if hasattr(self.inferer, k)}
        parts = ", ".join(f"{k}={v}" for k, v in settings.items())
        threshold = {"otsu": "Otsu per slice", "average_otsu": "average Otsu over the run"}.get(
            self.threshold, f"fixed {self.threshold}"  # type: ignore[arg-type]
        )
        volume_aware = []
        if self.slice_gate is not None:
            volume_aware.append(f"slices gated by the classifier at p >= {self.slice_gate}")
        if self.min_component_size:
            volume_aware.append(f"3D components below {self.min_component_size} voxels dropped")
        precision = "bfloat16 autocast" if isinstance(self.network, AutocastNetwork) else "float32"
        return [
            f"inferer: {type(self.inferer).__name__}({parts})",
            f"model-space slices {self.volume_inferer.roi_size[0]} x {self.volume_inferer.roi_size[1]}, "
            f"slice axis {self.slice_axis}, slices without body skipped, network in {precision}",
            f"map normalisation: {self.map_mode or 'none'} (inside the body, per {self.normalize_per}); "
            f"threshold: {threshold}"
            f"{'; largest component per slice' if self.largest_component else ''}"
            f"{''.join('; ' + v for v in volume_aware)}",
            "scores: Dice / IoU / HD95 per positive slice (mean over all positive slices of all cases) and per "
            "volume; HD95 is missing (not 0) where the mask is empty; AUROC from the raw map",
        ]

    def check_threshold(self, threshold: str | float | None = None) -> None:
        """
        Refuse a fixed threshold that cannot separate anything, before any compute: a normalised map
        (``map_mode`` set) lies in ``[0, 1]``, so a threshold outside ``(0, 1)`` gives a whole-body or an empty mask.

        Raises:
            ValueError: naming ``threshold`` and the valid range.
        """
        threshold = self.threshold if threshold is None else threshold
        if isinstance(threshold, str):
            if threshold not in THRESHOLD_MODES:
                raise ValueError(f"`threshold` must be one of {THRESHOLD_MODES} or a number, got {threshold!r}.")
            return
        value = float(threshold)
        if not math.isfinite(value):
            raise ValueError(f"`threshold` must be a finite number, got {threshold!r}.")
        if self.map_mode is not None and not 0.0 < value < 1.0:
            raise ValueError(
                f"`threshold` {threshold!r} is outside (0, 1): the maps are normalised to [0, 1] (map_mode="
                f"{self.map_mode!r}), so it would give {'empty' if value >= 1 else 'whole-body'} masks; use a value "
                f"in (0, 1), 'otsu' or 'average_otsu' (or map_mode=None to threshold the raw map)."
            )

    def run_settings(self, **extra: Any) -> dict:
        """
        Everything a run's results depend on, for its manifest (see :py:class:`~monai_wsss.apps.RunFolder`): the
        pipeline's and the inferer's plain settings, the slice size, and a checksum of every network's weights.

        Args:
            extra: further settings of the run (``evaluate``, ``num_overlays`` ...).

        Returns:
            a JSON-able dict.
        """
        plain = (bool, int, float, str, type(None))

        def settings_of(obj: Any) -> dict:
            out: dict[str, Any] = {}
            for key, value in sorted(vars(obj).items()):
                if key.startswith("_"):
                    continue
                if isinstance(value, plain) or (
                    isinstance(value, (tuple, list)) and all(isinstance(v, plain) for v in value)
                ):
                    out[key] = value
                elif isinstance(value, torch.nn.Module):
                    out[f"{key}_sha256"] = state_dict_checksum(value)
                elif isinstance(value, torch.Tensor) and value.numel() <= 1 << 16:
                    out[f"{key}_sha256"] = hashlib.sha256(value.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
            return out

        return {
            "package": f"monai_wsss {monai_wsss.__version__}",
            "task": repr(self.preset),
            "pipeline": settings_of(self),
            "inferer": {"class": type(self.inferer).__name__, **settings_of(self.inferer)},
            "roi_size": list(self.volume_inferer.roi_size),
            "sw_batch_size": int(self.volume_inferer.sw_batch_size),
            "device": self.device.type,
            **extra,
        }

    def run(
        self,
        items: Sequence[Mapping | str | os.PathLike],
        output_dir: str | os.PathLike,
        evaluate: bool = False,
        num_overlays: int = 0,
        overlay_slices: int = 3,
        title: str | None = None,
        overwrite: bool = False,
    ) -> dict:
        """
        Segment every volume and write, into ``output_dir``, ``<name>_map.nii.gz`` (normalised map, float32) and
        ``<name>_mask.nii.gz`` (uint8), in each input's space, then ``predictions.csv`` (one row per volume,
        written last, from the files on disk). ``<name>`` is the image file's name, with the case id appended
        where two images of the run share a file name. With ``evaluate``: ``metrics.csv`` (per case),
        ``summary.md`` and ``summary.json`` (pooled scores, see :py:class:`~monai_wsss.apps.VolumeEvaluation`).
        Overlays (image, ground truth, map, mask) of the first ``num_overlays`` volumes (with ``evaluate``: the first
        ones whose ground truth is not empty) go to ``output_dir/overlays/<case>.png``.

        Every file is written under a temporary name and renamed into place, so a killed run never leaves a
        truncated file under a final name. ``run_manifest.json`` records the inputs (with checksums), the settings
        and each file written (:py:class:`~monai_wsss.apps.RunFolder`): a rerun with the same inputs and settings
        resumes (maps already written are kept; masks and reports are written again); a folder of another run is
        refused unless ``overwrite``, which deletes that run's files first. The folder is checked (writable, owned
        by this run) and the settings are checked before any volume is computed.

        Args:
            items: datalist items (e.g. from :py:func:`~monai_wsss.apps.list_volumes`) or image paths.
            output_dir: output folder (created).
            evaluate: score the masks against each item's ``seg``.
            num_overlays: number of volumes to draw overlays of (volumes with an empty ground truth are skipped).
            overlay_slices: slices per overlay.
            title: heading of ``summary.md``.
            overwrite: replace the results of another run in ``output_dir``.

        Returns:
            ``{"rows": per-volume rows, "summary": pooled scores or None, "threshold": the threshold used
            (float or "otsu"), "files": {name: path}, "resumed": bool}``.

        Raises:
            ValueError: no items; with ``evaluate``, an item without ``seg``; a threshold out of range; and every
                bad-input error of the steps (naming the file).
            RunFolderError: ``output_dir`` is not writable or holds another run's results (a ``ValueError``).
        """
        items = [{"image": str(it)} if isinstance(it, (str, os.PathLike)) else dict(it) for it in items]
        if not items:
            raise ValueError("no volume to segment (items is empty).")
        for i, item in enumerate(items):
            if "image" not in item:
                raise ValueError(f"item {i} {item!r} has no 'image'.")
        if evaluate:
            missing = [str(it.get("case", it.get("image"))) for it in items if not it.get("seg")]
            if missing:
                raise ValueError(f"evaluate=True needs a ground-truth 'seg' for every volume; missing for {missing[:5]}.")
        self.check_threshold()
        num_overlays, overlay_slices = int(num_overlays), int(overlay_slices)
        if num_overlays < 0 or overlay_slices < 1:
            raise ValueError(f"`num_overlays` must be >= 0 and `overlay_slices` >= 1, got {num_overlays}, {overlay_slices}.")
        # output names and case ids unique within the run: two images with one file name must not share a file
        stems = unique_output_stems(items)
        for item, stem in zip(items, stems):
            item.setdefault("case", stem)
        cases = [str(it["case"]) for it in items]
        if len(set(cases)) != len(cases):
            cases = stems
            for item, stem in zip(items, stems):
                item["case"] = stem
        out = Path(output_dir)
        folder = RunFolder(
            out, items, self.run_settings(evaluate=bool(evaluate), num_overlays=num_overlays,
                                          overlay_slices=overlay_slices, title=title), overwrite=overwrite,
        ).open()
        dataset_level = self.threshold == "average_otsu"
        evaluation = VolumeEvaluation(self.slice_axis, self.preset.eval_min_fraction) if evaluate else None
        # with evaluation the raw map is scored (AUROC); it is on disk only when the map is not normalised
        reuse_maps = evaluation is None or self.normalizer is None
        write_map = map_writer(out, map_key="map", mask_key=None)
        write_mask = map_writer(out, map_key=None, mask_key="mask")
        load_map = LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32)
        rows: list[dict] = []
        unit_thresholds: list[np.ndarray] = []
        drawn = [0]  # overlays drawn so far
        seconds_of = folder.manifest.setdefault("seconds", {})

        def finish(index: int, data: dict, threshold: str | float) -> None:
            data["mask"] = self.binarize(data["map"], data["image"], threshold)
            row = rows[index]
            written = write_mask({"image": data["image"], "mask": data["mask"], "output_name": stems[index]})
            folder.record(row["case"], "mask", written["mask_path"])
            row["mask"] = written["mask_path"]
            row["mask_voxels"] = int(data["mask"].sum())
            if evaluation is not None:
                spacing = [float(s) for s in convert_to_tensor(data["image"].pixdim).tolist()]
                evaluation.add_mask(row["case"], data["mask"], data["seg"], spacing=spacing)
            # with ground truth, draw the cases that have a target (a lesion-free overlay shows nothing)
            worth_drawing = data.get("seg") is None or bool(convert_to_tensor(data["seg"]).any())
            if drawn[0] < num_overlays and worth_drawing:
                drawn[0] += 1
                overlay = out / "overlays" / f"{row['case']}.png"
                save_overlay(
                    overlay, data["image"], data["map"], data["mask"], data.get("seg"),
                    num_slices=overlay_slices, slice_axis=self.slice_axis, title=f"{row['case']}",
                )
                folder.record(row["case"], "overlay", overlay)
                row["overlay"] = str(overlay)

        num_reused = 0
        for i, item in enumerate(items):
            case = cases[i]
            data = self.load(item)
            kept = folder.recorded(case, "map") if reuse_maps else None
            if kept is not None:  # resumed: this map was written completely by the same run
                data["map"] = convert_to_tensor(load_map(str(kept)), track_meta=False)
                raw = data["map"]
                seconds = float(seconds_of.get(case, float("nan")))
                map_path = str(kept)
                num_reused += 1
            else:
                start = time.perf_counter()
                raw = self.predict(data["image"])
                data["map"] = self.normalize(raw, data["image"])
                seconds = time.perf_counter() - start
                seconds_of[case] = seconds
                map_path = write_map({"image": data["image"], "map": data["map"], "output_name": stems[i]})["map_path"]
                folder.record(case, "map", map_path)
            rows.append({"case": case, "image": str(item["image"]), "map": map_path, "seconds": seconds})
            if evaluation is not None:
                evaluation.add_map(case, raw, data["seg"], body=data["image"])
            if dataset_level:
                unit_thresholds.append(otsu_thresholds(data["map"], data["image"], slice_axis=self.slice_axis))
            else:
                finish(i, data, self.threshold)
            logger.info(
                f"{case}: map {'kept from the interrupted run' if kept is not None else f'in {seconds:.1f} s'} "
                f"({i + 1}/{len(items)})"
            )

        threshold: str | float = self.threshold
        if dataset_level:
            values = np.concatenate(unit_thresholds) if unit_thresholds else np.zeros(0)
            values = values[~np.isnan(values)]
            if values.size == 0:
                raise ValueError("threshold='average_otsu': no map has contrast inside the body; threshold undefined.")
            threshold = float(values.mean())
            logger.info(f"average Otsu threshold over {values.size} slices: {threshold:.4f}")
            for i, item in enumerate(items):
                data = self.load(item)
                data["map"] = convert_to_tensor(load_map(rows[i]["map"]), track_meta=False)
                finish(i, data, threshold)
        for row in rows:
            row["threshold"] = threshold if isinstance(threshold, float) else "otsu per slice"

        files: dict[str, str] = {}
        summary = None
        if evaluation is not None:
            summary = evaluation.aggregate()
            summary["seconds_per_volume"] = float(np.nanmean([r["seconds"] for r in rows])) if any(
                math.isfinite(r["seconds"]) for r in rows) else float("nan")
            summary["threshold"] = threshold
            metric_rows = [{**evaluation.rows.get(r["case"], {}), **{k: r[k] for k in ("image", "seconds")}} for r in rows]
            files["metrics"] = str(write_csv(out / "metrics.csv", metric_rows))
            name = type(self.inferer).__name__ if title is None else title
            files["summary_md"] = str(
                write_summary_markdown(
                    out / "summary.md", {name: summary}, metric_rows, title=f"Segmentation results: {name}",
                    notes=self.describe(),
                )
            )
            files["summary_json"] = str(
                write_text_atomic(
                    out / "summary.json", json.dumps({k: _finite(v) for k, v in summary.items()}, indent=2)
                )
            )
            logger.info(
                f"slice Dice {summary['slice_dice']:.3f} over {summary['num_positive_slices']} positive slices, "
                f"volume Dice {summary['volume_dice']:.3f} over {summary['num_positive_volumes']} volumes"
            )
        # last: the list of results, from what is on disk (a file missing or changed since it was written is an error)
        for row in rows:
            for key in ("map", "mask"):
                if folder.recorded(row["case"], key) is None:
                    raise RuntimeError(f"{row['case']}: the {key} {row[key]} is missing or changed on disk; rerun.")
        for key, path in files.items():
            folder.record("_run", Path(path).name, path)
        files["predictions"] = str(write_csv(out / "predictions.csv", rows))
        folder.record("_run", "predictions.csv", files["predictions"])
        folder.finish()
        files["manifest"] = str(folder.manifest_path)
        if num_reused:
            logger.info(f"{out}: {num_reused} of {len(items)} maps kept from the interrupted run")
        return {"rows": rows, "summary": summary, "threshold": threshold, "files": files, "resumed": folder.resumed}
