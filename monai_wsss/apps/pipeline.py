# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""Volume in, map + mask in the volume's space out: the inference / evaluation pipeline of the bundles."""

from __future__ import annotations

import inspect
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import DataLoader
from monai.transforms import Compose, RemoveSmallObjects
from monai.utils import convert_to_tensor

import monai_wsss
from monai_wsss.apps.run_folder import RunFolder, component_settings, name_run_items
from monai_wsss.data import MAP_THRESHOLD_MODES, FailSafeDataset, TaskPreset, get_task, volume_preprocess
from monai_wsss.engines import SegmentationPrepareBatch, VolumeEvaluator
from monai_wsss.handlers import DatasetThresholdHandler, RunFolderHandler, VolumeReportHandler
from monai_wsss.inferers import SliceProbabilityInferer, VolumeInferer
from monai_wsss.networks.precision import AutocastNetwork
from monai_wsss.transforms import CopyMetaFromd, NormalizeMap, SliceGated, in_source_orientation, map_writer, mask_of_map
from monai_wsss.utils import reuse_freed_memory

__all__ = ["VolumeSegmentationPipeline", "THRESHOLD_MODES"]

logger = logging.getLogger(__name__)

#: string values of ``threshold``: per-slice Otsu, or one dataset-level threshold (mean of the per-slice Otsu
#: thresholds of all maps of a run, the CDM paper's "average Otsu"); the task registry's modes
THRESHOLD_MODES = MAP_THRESHOLD_MODES

# inferer attributes worth reporting, in this order
_SETTINGS = ("noise_level", "num_steps", "tau", "guidance_scale", "mode", "cfg_scale", "percentile")


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
        context_slices: 2.5D input of the network: each slice with this many neighbours on either side as extra
            channels (:py:class:`~monai_wsss.inferers.VolumeInferer`); 0 for the slice alone.

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
        context_slices: int = 0,
    ) -> None:
        if not callable(inferer):
            raise ValueError(f"`inferer` must be callable as inferer(x, network, ...), got {type(inferer).__name__}.")
        self.preset = get_task(task)
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
        if self.device.type == "cpu":
            reuse_freed_memory()  # an application's process-wide choice: slice batches reuse their buffers
        self.seed = int(seed)
        self.volume_inferer = VolumeInferer(
            inferer=inferer,
            roi_size=roi_size,
            slice_axis=self.slice_axis,
            sw_batch_size=sw_batch_size,
            skip_empty=True,
            sw_device=self.device,
            progress=progress,
            context_slices=context_slices,
        )
        # kept as an attribute so that a run's manifest records its weights (run_settings)
        self.gate_classifier = gate_classifier if self.slice_gate is not None else None
        self.gate = None if self.slice_gate is None else SliceGated(
            "mask", SliceProbabilityInferer(gate_classifier), self.slice_gate, self.slice_axis,  # type: ignore[arg-type]
            roi_size=tuple(getattr(gate_classifier, "input_shape", None) or self.volume_inferer.roi_size),
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
        mask = mask_of_map(map01, image, threshold, self.slice_axis, self.largest_component)
        return self.gate_and_filter(mask, image)

    def gate_and_filter(self, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """The volume-aware steps after thresholding: the slice gate, then the 3D component filter (when set)."""
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
        return self.gate.probabilities(image)

    def slice_mask(self, image: torch.Tensor) -> torch.Tensor:
        """``(1, H, W, D)``-broadcastable 0/1 tensor: the slices the gate keeps (probability >= ``slice_gate``)."""
        if self.gate is None:
            raise ValueError("this pipeline has no slice gate (slice_gate=None).")
        return self.gate.keep(image)

    def segment(
        self, item: Mapping | str | os.PathLike, threshold: str | float | None = None, source_space: bool = True
    ) -> dict:
        """
        Segment one volume.

        Args:
            item: ``{"image": path[, "seg": path, "case": id]}`` or an image path.
            threshold: override of the pipeline's ``threshold`` (``"otsu"`` or a float).
            source_space: return the arrays in the input's own array order; ``False`` leaves them in the task's
                orientation (``TaskPreset.orientation``), where slice ``i`` along the slice axis is slice ``i`` of
                a labels file (``SaveVolumed`` still writes them in the input's order).

        Returns:
            the loaded data (``image`` normalised, ``seg`` when given) with ``raw_map`` (the method's output),
            ``map`` (normalised, ``[0, 1]``) and ``mask`` (0/1), all ``(1, H, W, D)`` MetaTensors in the input's
            space (its own array order and affine, also when the task reoriented it to slice it; see
            ``source_space``), and ``seconds`` (map computation time).
        """
        self.check_threshold(threshold)
        data = self.load(item)
        start = time.perf_counter()
        data["raw_map"] = self.predict(data["image"])
        data["map"] = self.normalize(data["raw_map"], data["image"])
        data["seconds"] = time.perf_counter() - start
        data["mask"] = self.binarize(data["map"], data["image"], threshold)
        keys = [k for k in ("raw_map", "map", "mask") if k in data]
        data = CopyMetaFromd(keys, source_key="image")(data)
        for key in ["image", "seg", *keys] if source_space else []:
            if key in data:
                data[key] = in_source_orientation(data[key])
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
        pipeline = component_settings(self)
        pipeline.pop("class", None)
        inferer = component_settings(self.inferer)
        return {
            "package": f"monai_wsss {monai_wsss.__version__}",
            "task": repr(self.preset),
            "pipeline": pipeline,
            "inferer": inferer,
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
        resumes (maps, and masks under a fixed threshold, already written are kept; reports are written again); a folder of another run is
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
            ValueError: no items; with ``evaluate``, an item without ``seg``; a threshold out of range.
            RunFolderError: ``output_dir`` is not writable, in use by another run or holds another run's results
                (a ``ValueError``).
            FailedVolumesError: after every other volume is written, the volumes that could not be segmented (a
                ``ValueError`` naming each with its bad-input error; ``predictions.csv`` lists them too).
        """
        items = name_run_items(items)
        if evaluate:
            missing = [str(it.get("case", it.get("image"))) for it in items if not it.get("seg")]
            if missing:
                raise ValueError(f"evaluate=True needs a ground-truth 'seg' for every volume; missing for {missing[:5]}.")
        self.check_threshold()
        num_overlays, overlay_slices = int(num_overlays), int(overlay_slices)
        if num_overlays < 0 or overlay_slices < 1:
            raise ValueError(f"`num_overlays` must be >= 0 and `overlay_slices` >= 1, got {num_overlays}, {overlay_slices}.")
        out = Path(output_dir)
        settings = self.run_settings(evaluate=bool(evaluate), num_overlays=num_overlays, overlay_slices=overlay_slices, title=title)
        folder = RunFolder(out, items, settings, overwrite=overwrite).open()
        try:
            evaluator = self.evaluator(folder, evaluate=evaluate, num_overlays=num_overlays, overlay_slices=overlay_slices, title=title)
            evaluator.run()
        finally:
            folder.close()  # the handlers release the folder when the run ends; this covers a failure before that
        state = evaluator.state
        threshold: str | float = getattr(state, "dataset_threshold", None) or self.threshold
        kept = len(items) - len(evaluator.data_loader.dataset) if evaluator.data_loader is not None else 0
        if folder.resumed and kept:
            logger.info(f"{out}: {kept} of {len(items)} maps kept from the interrupted run")
        files = {"predictions": str(out / "predictions.csv"), "manifest": str(folder.manifest_path)}
        if evaluate:
            files.update(metrics=str(out / "metrics.csv"), summary_md=str(out / "summary.md"), summary_json=str(out / "summary.json"))
        return {
            "rows": list(getattr(state, "predictions", [])),
            "summary": getattr(state, "summary", None),
            "threshold": threshold,
            "files": files,
            "resumed": folder.resumed,
        }

    def evaluator(
        self,
        folder: RunFolder,
        evaluate: bool = False,
        num_overlays: int = 0,
        overlay_slices: int = 3,
        title: str | None = None,
    ) -> VolumeEvaluator:
        """
        The :py:class:`~monai_wsss.engines.VolumeEvaluator` (a MONAI ``SupervisedEvaluator`` that records a scan it
        cannot segment and goes on) of a :py:meth:`run` into an opened ``folder``: the volumes still to compute
        (:py:meth:`RunFolder.pending`) loaded by :py:attr:`preprocess`, the map from :py:meth:`predict`, normalised
        and thresholded as :py:meth:`segment` does, written by ``SaveVolumed``; the run folder, dataset-level
        threshold and report handlers of :py:mod:`monai_wsss.handlers` (what the bundles' ``inference.json`` wires
        from the same classes).

        Returns:
            the evaluator (call ``.run()``).
        """
        dataset_level = self.threshold == "average_otsu"
        out = folder.path
        run_handler = RunFolderHandler(folder, map_key="map", threshold=None if dataset_level else self.threshold)
        handlers: list[Any] = [run_handler]
        report = None
        if evaluate:
            report = VolumeReportHandler(
                self.slice_axis, str(out), self.preset.eval_min_fraction, score_key="raw_map", map_key="map",
                num_overlays=num_overlays, overlay_slices=overlay_slices, title=title or type(self.inferer).__name__,
                notes=self.describe(), run_folder=folder, preprocessing=self.preprocess,
                threshold=None if dataset_level else self.threshold,
            )
        write_map = map_writer(out, map_key="map", mask_key=None)
        write_mask = map_writer(out, map_key=None, mask_key="mask")
        if dataset_level:
            consumers = [run_handler] + ([report] if report is not None else [])
            handlers.append(DatasetThresholdHandler(
                folder, self.preprocess, self.slice_axis, postprocessing=_Binarized(self, write_mask, threshold_set=True),
                consumers=consumers, map_key="map", largest_component=self.largest_component,
            ))
        if report is not None:
            handlers.append(report)
        postprocessing = Compose([_Normalized(self), write_map] + ([] if dataset_level else [_Binarized(self, write_mask)]))
        written = ("map",) if dataset_level else ("map", "mask")
        dataset = FailSafeDataset(folder.pending(names=written), transform=self.preprocess)
        loader = DataLoader(dataset, batch_size=1, num_workers=0)
        return VolumeEvaluator(
            device=self.device,
            val_data_loader=loader,
            network=self.network if isinstance(self.network, torch.nn.Module) else torch.nn.Identity(),
            inferer=self._infer_batch,  # type: ignore[arg-type]
            prepare_batch=SegmentationPrepareBatch(require_target=False),
            postprocessing=postprocessing,
            val_handlers=handlers,
            decollate=True,
        )

    def _infer_batch(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The evaluator's inferer: :py:meth:`predict` of each volume of the batch (seeded per volume)."""
        return torch.stack([self.predict(x) for x in inputs])


class _Normalized:
    """Postprocessing of :py:meth:`VolumeSegmentationPipeline.evaluator`: ``raw_map`` and its normalised ``map``."""

    def __init__(self, pipe: VolumeSegmentationPipeline) -> None:
        self.pipe = pipe

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        d["raw_map"] = convert_to_tensor(d.pop("pred"), track_meta=False).float().cpu()
        d["image"] = d["image"].cpu() if hasattr(d["image"], "cpu") else d["image"]
        d["map"] = self.pipe.normalize(d["raw_map"], d["image"])
        return d


class _Binarized:
    """Postprocessing: the pipeline's mask of ``map`` (threshold, slice gate, components), then written."""

    def __init__(self, pipe: VolumeSegmentationPipeline, write: Callable[[dict], dict], threshold_set: bool = False) -> None:
        self.pipe = pipe
        self.write = write
        self.threshold_set = threshold_set  # the mask was thresholded by the dataset-level handler

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        if self.threshold_set:
            d["mask"] = self.pipe.gate_and_filter(convert_to_tensor(d["mask"], track_meta=False), d["image"])
        else:
            d["mask"] = self.pipe.binarize(convert_to_tensor(d["map"], track_meta=False), d["image"])
        return self.write(d)
