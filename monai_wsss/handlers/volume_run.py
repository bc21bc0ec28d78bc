# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""
Handlers that make a MONAI ``SupervisedEvaluator`` over whole volumes a segmentation run: one output folder per run
with its manifest (:py:class:`RunFolderHandler`), the CDM paper's dataset-level "average Otsu" threshold
(:py:class:`DatasetThresholdHandler`) and the evaluation reports (:py:class:`VolumeReportHandler`).

The evaluator's postprocessing writes the files (``SaveVolumed`` leaves ``<key>_path`` in the data); these handlers
record them, so a killed run resumes and a finished one lists only what is on disk. Attach them in the order
``RunFolderHandler``, ``DatasetThresholdHandler``, ``VolumeReportHandler``: at the end of the run the threshold
handler writes the masks, the report handler scores them, and the run folder handler writes ``predictions.csv``
last (it registers its end of run at ``Events.COMPLETED``, the others at ``Events.EPOCH_COMPLETED``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.transforms import LoadImage
from monai.utils import convert_to_tensor, min_version, optional_import

from monai_wsss.apps.reports import VolumeEvaluation, save_overlay, write_csv, write_summary_markdown
from monai_wsss.apps.run_folder import FailedVolumesError, RunFolder
from monai_wsss.data.fail_safe import FAILED_KEY
from monai_wsss.data.tasks import MAP_THRESHOLD_MODES
from monai_wsss.transforms import axis_codes, mask_of_map, otsu_thresholds, reoriented
from monai_wsss.utils import write_text_atomic

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", "0.4.11", min_version, "Engine")

__all__ = ["DatasetThresholdHandler", "RunFolderHandler", "VolumeReportHandler", "engine_items"]

logger = logging.getLogger(__name__)


def engine_items(engine: Engine, failed: bool = False) -> list[dict]:
    """
    The items of the engine's last iteration, one dict per volume: the decollated batch and output merged (MONAI's
    postprocessing puts new keys, such as ``pred`` and the written paths, into the output and keeps the loaded
    keys, such as ``seg`` and ``case``, in the batch).

    Args:
        engine: the evaluator.
        failed: return the failure records of volumes that could not be segmented
            (:py:class:`~monai_wsss.engines.VolumeEvaluator`) instead of the segmented volumes.
    """
    batch, output = engine.state.batch, engine.state.output
    if isinstance(output, Mapping):
        batch, output = [batch], [output]
    items = [{**dict(b), **dict(o)} for b, o in zip(batch, output)]
    return [it for it in items if bool(it.get(FAILED_KEY)) == failed]


def _load_map(path: Path, like: Any = None) -> torch.Tensor:
    """A written map or mask read back in the array order of ``like`` (the preprocessed image it was made from)."""
    img = LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32)(str(path))
    # written in the scan's own order, read back in the preprocessed (task) orientation
    return convert_to_tensor(reoriented(img, axis_codes(getattr(like, "affine", None))), track_meta=False)


#: the columns of ``predictions.csv``, in order (a column no row has is left out)
_PREDICTION_COLUMNS = (
    "case", "image", "orientation", "map", "mask", "seconds", "mask_voxels", "threshold", "overlay", "error",
)


def _orientations(image: Any) -> tuple[str | None, str | None]:
    """The axis codes of the scan as stored and as segmented (after the preprocessing's ``Orientationd``)."""
    meta = getattr(image, "meta", None) or {}
    return axis_codes(meta.get("original_affine")), axis_codes(getattr(image, "affine", None))


def _finite(x: Any) -> Any:
    return None if isinstance(x, float) and not math.isfinite(x) else x


class RunFolderHandler:
    """
    The output folder of a run (:py:class:`~monai_wsss.apps.RunFolder`): opened when the run starts (a folder of
    another run is refused before any compute), every written map and mask recorded in ``run_manifest.json`` when
    its volume is done, and ``predictions.csv`` (one row per volume: paths, mask voxels, seconds including the
    writing, threshold) written last, from the files on disk, when the run completes.

    Pair it with ``dataset = Dataset(run_folder.pending(items), ...)`` so that a resumed run computes only the maps
    its interrupted predecessor did not write.

    Args:
        run_folder: the run's folder, made with every item of the run (``case``, ``image``, ``output_name``).
        map_key: data key of the map (its written path under ``<map_key>_path``); ``None``: the run writes no map.
        mask_key: data key of the mask.
        threshold: the threshold reported in ``predictions.csv`` (a dataset-level threshold set by
            :py:class:`DatasetThresholdHandler` replaces it).

    A volume that could not be segmented (a failure record of :py:class:`~monai_wsss.engines.VolumeEvaluator`) is
    logged, recorded with its reason (``error`` in ``predictions.csv`` and ``failed`` in the manifest) and retried
    by a rerun; the run ends with :py:class:`~monai_wsss.apps.FailedVolumesError` after every other volume is
    written. The folder's lock is released when the run ends, however it ends.

    Raises:
        RuntimeError: at the end of the run, a map or mask of an item is missing or changed on disk.
        FailedVolumesError: at the end of the run, some volumes could not be segmented.

    Example::

        folder = RunFolder("out", name_run_items(items), settings)
        RunFolderHandler(folder, threshold=0.5).attach(evaluator)
    """

    def __init__(
        self,
        run_folder: RunFolder,
        map_key: str | None = "pred",
        mask_key: str = "mask",
        threshold: str | float | None = None,
    ) -> None:
        self.folder = run_folder
        self.map_key = map_key
        self.mask_key = mask_key
        self.threshold = threshold
        # the files every volume of the run ends with (no map with map_key=None)
        self.names = tuple(name for key, name in ((map_key, "map"), (mask_key, "mask")) if key is not None)
        self._images = {str(it.get("case")): str(it.get("image", "")) for it in run_folder.items}
        self._started_at: float | None = None
        self._done = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_STARTED, self._iteration_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)

    def exception_raised(self, engine: Engine, err: BaseException) -> None:
        """Release the folder (a rerun resumes it) and let the error end the run."""
        self.folder.close()
        raise err

    def started(self, engine: Engine | None = None) -> None:
        """Open the folder (refusing another run's) unless the caller already did."""
        if not self.folder.opened:
            self.folder.open()
        # volumes kept from an interrupted run count as done; the recorded rows say which (no file is re-read)
        self._done = sum(1 for row in self.folder.rows() if any(name in row for name in self.names))

    def _iteration_started(self, engine: Engine) -> None:
        self._started_at = time.perf_counter()

    def iteration_completed(self, engine: Engine) -> None:
        seconds = None if self._started_at is None else time.perf_counter() - self._started_at
        items = engine_items(engine)
        for item in items:
            self.add(item, seconds=None if seconds is None else seconds / len(items))
        for item in engine_items(engine, failed=True):
            self.folder.fail(str(item["case"]), item[FAILED_KEY])
            self._done += 1

    def add(self, item: Mapping, seconds: float | None = None) -> None:
        """Record the files of one volume (``<key>_path`` entries) and its row; called per volume by the handlers."""
        case = str(item["case"])
        values: dict[str, Any] = {}
        for key, name in ((self.map_key, "map"), (self.mask_key, "mask")):
            path = item.get(f"{key}_path") if key is not None else None
            if path:
                self.folder.record(case, name, path)
                values[name] = str(path)
        if self.mask_key in item and f"{self.mask_key}_path" in item:
            values["mask_voxels"] = int(convert_to_tensor(item[self.mask_key]).sum())
        if seconds is not None:
            values["seconds"] = float(seconds)
        values["error"] = None  # segmented now, whatever an earlier run said
        values["image"] = self._images.get(case, "")
        stored, used = _orientations(item.get("image"))
        if stored is not None:
            values["orientation"] = stored
        self.folder.update_row(case, **values)
        if seconds is not None:
            self._done += 1
            turned = f"; stored {stored}, segmented as {used}" if stored != used else ""
            logger.info(f"{case}: map and mask written in {seconds:.1f} s ({self._done}/{len(self.folder.items)}){turned}")

    def completed(self, engine: Engine | None = None) -> None:
        """
        Check every result is on disk, write ``predictions.csv`` and mark the run finished.

        Raises:
            FailedVolumesError: some volumes could not be segmented (after every other one is written and listed).
        """
        threshold = getattr(getattr(engine, "state", None), "dataset_threshold", None)
        threshold = self.threshold if threshold is None else threshold
        failures = self.folder.failures()
        rows = []
        for item, row in zip(self.folder.items, self.folder.rows()):
            case = str(item["case"])
            row.setdefault("case", case)
            row.setdefault("image", self._images.get(case, ""))
            if case not in failures:
                for name in self.names:
                    if self.folder.recorded(case, name) is None:
                        raise RuntimeError(f"{case}: the {name} is missing or changed on disk; rerun.")
                row.setdefault("seconds", float("nan"))
                row["threshold"] = threshold if isinstance(threshold, (int, float)) else "otsu per slice"
            rows.append({k: row.get(k) for k in _PREDICTION_COLUMNS if k in row})
        path = write_csv(self.folder.path / "predictions.csv", rows)
        self.folder.record("_run", "predictions.csv", path)
        self.folder.finish()
        if engine is not None:
            engine.state.predictions = rows
        if failures:
            listed = "; ".join(f"{case} ({reason})" for case, reason in list(failures.items())[:3])
            raise FailedVolumesError(
                f"{len(failures)} of {len(rows)} volumes could not be segmented, the others were: {listed}"
                f"{' ...' if len(failures) > 3 else ''}. Their rows in {path} say why; fix them and rerun the same "
                "command to segment only those."
            )


class DatasetThresholdHandler:
    """
    The masks of a run's maps at the end of the run: by default one threshold for all volumes, the mean of the
    per-slice Otsu thresholds of every map (``"average_otsu"``, the CDM paper's "average Otsu"); ``"otsu"`` thresholds
    each slice at its own Otsu value, a float every map at that value. The evaluator's postprocessing writes the
    (normalised) maps without masks; at the end of the epoch this handler thresholds every map inside the body, runs
    ``postprocessing`` on the result (e.g. component filter, then ``SaveVolumed`` of the mask) and passes each volume
    to ``consumers`` (the run folder and report handlers' ``add``). A dataset-level threshold is left in
    ``engine.state.dataset_threshold``.

    Maps kept from an interrupted run are read back from the run folder, so a resumed run gets the same threshold.
    Run in several processes (``torch.distributed`` initialised, each with its shard of the scans), the per-slice
    values of every process are gathered first, so the threshold is that of the whole dataset.

    Args:
        run_folder: the run's folder (its items and recorded maps).
        preprocessing: the evaluator's preprocessing (to reload each volume's image, the body, and ``seg``).
        slice_axis: spatial axis of the slices.
        postprocessing: transform applied after thresholding (``None``: none).
        consumers: objects with ``add(item)`` given every thresholded volume.
        map_key: data key of the map.
        mask_key: data key the mask is written to.
        image_key: data key of the normalised image (non-zero inside the body).
        largest_component: keep the largest connected component of each slice's mask.
        threshold: ``"average_otsu"``, ``"otsu"`` or a float.

    Raises:
        ValueError: a ``threshold`` that is none of these (at construction); no map has contrast inside the body
            (the average Otsu threshold is undefined).

    Example::

        threshold = DatasetThresholdHandler(folder, preprocessing, slice_axis=2, postprocessing=save_mask,
                                            consumers=[run_handler])
    """

    def __init__(
        self,
        run_folder: RunFolder,
        preprocessing: Callable[[dict], dict],
        slice_axis: int = 2,
        postprocessing: Callable[[dict], dict] | None = None,
        consumers: Sequence[Any] = (),
        map_key: str = "pred",
        mask_key: str = "mask",
        image_key: str = "image",
        largest_component: bool = False,
        threshold: str | float = "average_otsu",
    ) -> None:
        if isinstance(threshold, str) and threshold not in MAP_THRESHOLD_MODES:
            raise ValueError(f"`threshold` must be one of {MAP_THRESHOLD_MODES} or a number, got {threshold!r}.")
        self.folder = run_folder
        self.preprocessing = preprocessing
        self.largest_component = bool(largest_component)
        self.threshold = threshold if isinstance(threshold, str) else float(threshold)
        self.slice_axis = int(slice_axis)
        self.postprocessing = postprocessing
        self.consumers = list(consumers)
        self.map_key = map_key
        self.mask_key = mask_key
        self.image_key = image_key
        self._thresholds: dict[str, np.ndarray] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def iteration_completed(self, engine: Engine) -> None:
        if self.threshold != "average_otsu":
            return
        for item in engine_items(engine):
            self._thresholds[str(item["case"])] = otsu_thresholds(
                item[self.map_key], item[self.image_key], slice_axis=self.slice_axis
            )

    def _item(self, item: Mapping) -> dict:
        data = self.preprocessing(dict(item))
        path = self.folder.recorded(str(item["case"]), "map")
        if path is None:
            raise RuntimeError(f"{item['case']}: the map is missing or changed on disk; rerun.")
        data[self.map_key] = _load_map(path, like=data[self.image_key])
        return data

    def _average_otsu(self) -> float:
        values = []
        failed = self.folder.failures()
        for item in self.folder.items:
            case = str(item["case"])
            if case in failed:
                continue
            if case not in self._thresholds:  # a map kept from an interrupted run
                data = self._item(item)
                self._thresholds[case] = otsu_thresholds(data[self.map_key], data[self.image_key], self.slice_axis)
            values.append(self._thresholds[case])
        flat = np.concatenate(values) if values else np.zeros(0)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # one threshold over the whole dataset, however it is sharded over processes (multi_gpu_inference.json)
            shards: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(shards, flat)
            flat = np.concatenate(shards)
        flat = flat[~np.isnan(flat)]
        if flat.size == 0:
            raise ValueError("threshold='average_otsu': no map has contrast inside the body; threshold undefined.")
        threshold = float(flat.mean())
        logger.info(f"average Otsu threshold over {flat.size} slices: {threshold:.4f}")
        return threshold

    def epoch_completed(self, engine: Engine | None = None) -> str | float:
        """Threshold every map of the run; returns the threshold (the average Otsu value, ``"otsu"`` or the float)."""
        threshold = self._average_otsu() if self.threshold == "average_otsu" else self.threshold

        failed = self.folder.failures()
        for item in self.folder.items:
            if str(item["case"]) in failed:
                continue
            data = self._item(item)
            data[self.mask_key] = mask_of_map(
                data[self.map_key], data[self.image_key], threshold, self.slice_axis, self.largest_component
            )
            if self.postprocessing is not None:
                data = self.postprocessing(data)
            for consumer in self.consumers:
                consumer.add(data)
        if engine is not None and self.threshold == "average_otsu":
            engine.state.dataset_threshold = threshold
        return threshold


class VolumeReportHandler:
    """
    Evaluation reports of a run against each volume's ground truth (:py:class:`~monai_wsss.apps.VolumeEvaluation`):
    ``metrics.csv`` (per case), ``summary.md`` and ``summary.json`` (pooled slice and volume scores, seconds per
    volume, the threshold) and overlays of the first ``num_overlays`` volumes with a target
    (``overlays/<case>.png``), all recorded in the run folder when one is given.

    Args:
        slice_axis: spatial axis of the slices.
        output_dir: folder of the reports.
        eval_min_fraction: slices whose target covers less than this fraction are left out of slice scores
            (CHAOS rule; ``None``: none).
        score_key: key of the raw map scored by AUROC (falls back to ``map_key`` when absent).
        map_key: key of the (normalised) map drawn in overlays.
        mask_key: key of the binary mask.
        label_key: key of the ground truth (the engine's ``label``, or the datalist's ``seg``).
        image_key: key of the normalised image.
        num_overlays: volumes to draw.
        overlay_slices: slices per overlay.
        title: heading of ``summary.md``.
        notes: lines describing the method under the table.
        run_folder: the run's folder: reports are recorded there, and volumes kept from an interrupted run
            (not computed by this run) are read back from it (with ``preprocessing``; their AUROC is then that of
            the map on disk).
        preprocessing: reloads a kept volume's image and ground truth.
        threshold: the threshold reported in the summary (a dataset-level threshold set by
            :py:class:`DatasetThresholdHandler` replaces it).

    Raises:
        ValueError: a volume without ground truth.

    Example::

        report = VolumeReportHandler(slice_axis=2, output_dir="out", title="segmenter", run_folder=folder,
                                     preprocessing=preprocessing)
        report.attach(evaluator)
    """

    def __init__(
        self,
        slice_axis: int,
        output_dir: str,
        eval_min_fraction: float | None = None,
        score_key: str = "raw_map",
        map_key: str = "pred",
        mask_key: str = "mask",
        label_key: str = "seg",
        image_key: str = "image",
        num_overlays: int = 0,
        overlay_slices: int = 3,
        title: str | None = None,
        notes: Sequence[str] = (),
        run_folder: RunFolder | None = None,
        preprocessing: Callable[[dict], dict] | None = None,
        threshold: str | float | None = None,
    ) -> None:
        if int(num_overlays) < 0 or int(overlay_slices) < 1:
            raise ValueError(f"`num_overlays` must be >= 0 and `overlay_slices` >= 1, got {num_overlays}, {overlay_slices}.")
        self.evaluation = VolumeEvaluation(slice_axis, eval_min_fraction)
        self.slice_axis = int(slice_axis) % 3
        self.output_dir = Path(output_dir)
        self.score_key, self.map_key, self.mask_key = score_key, map_key, mask_key
        self.label_key, self.image_key = label_key, image_key
        self.num_overlays, self.overlay_slices = int(num_overlays), int(overlay_slices)
        self.title = title
        self.notes = list(notes)
        self.folder = run_folder
        self.preprocessing = preprocessing
        self.threshold = threshold
        self._mapped: set[str] = set()
        self._masked: set[str] = set()
        self._drawn = 0
        self.summary: dict | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def iteration_completed(self, engine: Engine) -> None:
        for item in engine_items(engine):
            self.add(item)

    def _label(self, item: Mapping) -> Any:
        seg = item.get(self.label_key)
        if seg is None:
            seg = item.get("seg", item.get("label"))
        if seg is None:
            raise ValueError(f"{item.get('case')}: no ground truth ('{self.label_key}') to evaluate against.")
        return seg

    def add(self, item: Mapping) -> None:
        """Score one volume's map (once) and mask (when present), and draw its overlay while overlays are due."""
        case = str(item["case"])
        seg = self._label(item)
        score = item.get(self.score_key, item.get(self.map_key))
        if case not in self._mapped and score is not None:
            self.evaluation.add_map(case, score, seg, body=item[self.image_key])
            self._mapped.add(case)
        if self.mask_key not in item:
            return
        spacing = [float(s) for s in convert_to_tensor(item[self.image_key].pixdim).tolist()]
        self.evaluation.add_mask(case, item[self.mask_key], seg, spacing=spacing)
        self._masked.add(case)
        if self._drawn < self.num_overlays and bool(convert_to_tensor(seg).any()):
            self._drawn += 1
            overlay = self.output_dir / "overlays" / f"{case}.png"
            save_overlay(
                overlay, item[self.image_key], item[self.map_key], item[self.mask_key], seg,
                num_slices=self.overlay_slices, slice_axis=self.slice_axis, title=case,
            )
            if self.folder is not None:
                self.folder.record(case, "overlay", overlay)
                self.folder.update_row(case, overlay=str(overlay))

    def _add_kept(self) -> None:
        """Volumes of the run not computed by it (kept from an interrupted run): read back from the run folder."""
        if self.folder is None or self.preprocessing is None:
            return
        failed = self.folder.failures()
        for item in self.folder.items:
            case = str(item["case"])
            if case in self._masked or case in failed:
                continue
            data = self.preprocessing(dict(item))
            for key, name in ((self.map_key, "map"), (self.mask_key, "mask")):
                path = self.folder.recorded(case, name)
                if path is None and name == "map" and self.folder.recorded(case, "mask") is not None:
                    logger.warning(f"{case}: kept from an interrupted run without a map; its pixel AUROC is left out")
                    continue
                if path is None:
                    raise RuntimeError(f"{case}: the {name} is missing or changed on disk; rerun.")
                data[key] = _load_map(path, like=data[self.image_key])
            self.add(data)

    def epoch_completed(self, engine: Engine | None = None) -> dict:
        """Write ``metrics.csv``, ``summary.md`` and ``summary.json``; returns the pooled scores."""
        self._add_kept()
        rows = self.folder.rows() if self.folder is not None else [{"case": c} for c in self.evaluation.rows]
        threshold = getattr(getattr(engine, "state", None), "dataset_threshold", None)
        threshold = self.threshold if threshold is None else threshold
        summary = self.evaluation.aggregate()
        seconds = [float(r["seconds"]) for r in rows if r.get("seconds") is not None]
        summary["seconds_per_volume"] = float(np.nanmean(seconds)) if seconds else float("nan")
        if threshold is not None:
            summary["threshold"] = threshold
        failed = self.folder.failures() if self.folder is not None else {}
        summary["num_failed_volumes"] = len(failed)
        notes = self.notes + [f"not scored, could not be segmented: {case} ({why})" for case, why in failed.items()]
        metric_rows = [
            {**self.evaluation.rows.get(str(r.get("case")), {}), "image": r.get("image"), "seconds": r.get("seconds")}
            for r in rows
        ]
        name = self.title or "segmentation"
        written = [
            write_csv(self.output_dir / "metrics.csv", metric_rows),
            write_summary_markdown(
                self.output_dir / "summary.md", {name: summary}, metric_rows, title=f"Segmentation results: {name}",
                notes=notes,
            ),
            write_text_atomic(
                self.output_dir / "summary.json", json.dumps({k: _finite(v) for k, v in summary.items()}, indent=2)
            ),
        ]
        if self.folder is not None:
            for path in written:
                self.folder.record("_run", Path(path).name, path)
        logger.info(
            f"slice Dice {summary['slice_dice']:.3f} over {summary['num_positive_slices']} positive slices, "
            f"volume Dice {summary['volume_dice']:.3f} over {summary['num_positive_volumes']} volumes"
        )
        self.summary = summary
        if engine is not None:
            engine.state.summary = summary
        return summary
