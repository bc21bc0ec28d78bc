# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""Scores of segmented volumes (per case and pooled), CSV / markdown reports and overlay pictures (every file written
under a temporary name and renamed into place, so a crash never leaves a half-written report)."""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.utils import convert_to_tensor, optional_import

from monai_wsss.metrics import SegmentationScores, SliceAUCMetric, compute_auroc_auprc
from monai_wsss.utils.atomic_files import atomic_write, write_text_atomic

plt, has_matplotlib = optional_import("matplotlib.pyplot")

__all__ = [
    "VolumeEvaluation",
    "write_csv",
    "format_summary_table",
    "write_summary_markdown",
    "select_overlay_slices",
    "save_overlay",
]


def _as_volume(x, name: str) -> torch.Tensor:
    """(1, H, W, D) or (H, W, D) -> plain float tensor (1, H, W, D) on the CPU."""
    t = convert_to_tensor(x, track_meta=False).detach().cpu()
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4 or t.shape[0] != 1:
        raise ValueError(f"`{name}` must be one volume (1, H, W, D) or (H, W, D), got shape {tuple(t.shape)}.")
    return t.float()


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std())


class VolumeEvaluation:
    """
    Scores of a set of segmented volumes against their ground truth, per case and pooled.

    Masks are scored per positive slice (the CDM paper's protocol: every slice with target is scored, the mean
    is over all such slices of all cases) and per volume, with
    :py:class:`~monai_wsss.metrics.SegmentationScores` (Dice, IoU, HD95 in pixels and, from the image spacing, mm;
    an empty prediction has no HD95 and is counted as missing). Continuous maps give the pixel AUROC / AUPRC of
    each case (inside the body) and the slice-level AUROC of the map's maximum, pooled over cases
    (:py:class:`~monai_wsss.metrics.SliceAUCMetric`): pass the raw map for these, not one normalised per slice.

    With ``eval_min_fraction`` (CHAOS: 0.05), slices whose target covers more than 0 but less than that fraction
    of the slice are left out of the slice-level scores, as the paper's protocol does.

    Args:
        slice_axis: spatial axis of the slices.
        eval_min_fraction: see above (``None``: keep every slice).

    Raises:
        ValueError: ``eval_min_fraction`` outside (0, 1); at call time, volumes of different shapes.

    Example::

        ev = VolumeEvaluation(slice_axis=-1)
        ev.add_map("case1", raw_map, seg, body=image)
        ev.add_mask("case1", mask, seg, spacing=(1.0, 1.0, 1.0))
        ev.rows["case1"]["slice_dice"], ev.aggregate()["slice_dice"]
    """

    def __init__(self, slice_axis: int = -1, eval_min_fraction: float | None = None) -> None:
        if eval_min_fraction is not None and not 0.0 < float(eval_min_fraction) < 1.0:
            raise ValueError(f"eval_min_fraction must be in (0, 1) or None, got {eval_min_fraction!r}.")
        self.slice_axis = int(slice_axis) % 3
        self.eval_min_fraction = None if eval_min_fraction is None else float(eval_min_fraction)
        self.reset()

    def reset(self) -> None:
        """Forget every case."""
        self.rows: dict[str, dict] = {}
        self._slice_values: dict[str, list[float]] = {k: [] for k in ("dice", "iou", "hd95", "hd95_mm")}
        self._volume_values: dict[str, list[float]] = {k: [] for k in ("dice", "iou", "hd95", "hd95_mm")}
        self._counts = {"num_hd95_missing": 0, "num_negative": 0, "num_negative_with_prediction": 0, "num_excluded": 0}
        # per-process buffers: aggregate() gathers the whole state of every rank at once
        self._slice_auc = SliceAUCMetric(slice_axis=self.slice_axis, all_ranks=False)

    def _kept_slices(self, seg: torch.Tensor) -> torch.Tensor:
        """Indices of the slices scored at slice level (all but the small-target ones under the CHAOS rule)."""
        moved = seg[0].movedim(self.slice_axis, 0).flatten(1)
        if self.eval_min_fraction is None:
            return torch.arange(moved.shape[0])
        fraction = moved.mean(1)
        return torch.nonzero(~((fraction > 0) & (fraction < self.eval_min_fraction))).flatten()

    def _select(self, t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return t.index_select(self.slice_axis + 1, keep)

    def add_map(self, case: str, score_map, seg, body=None) -> dict:
        """
        Add the continuous map of one case.

        Args:
            case: case id (a row of the report).
            score_map: raw map ``(1, H, W, D)`` (higher = more likely target).
            seg: binary ground truth, same shape.
            body: body / brain region (non-zero inside), same shape; pixels outside are not ranked.

        Returns:
            the case's ``pixel_auroc`` and ``pixel_auprc`` (``nan`` for a case without target).
        """
        m, y = _as_volume(score_map, "score_map"), _as_volume(seg, "seg")
        b = torch.ones_like(y, dtype=torch.bool) if body is None else _as_volume(body, "body") != 0
        if m.shape != y.shape or b.shape != y.shape:
            raise ValueError(f"case {case}: map {tuple(m.shape)}, seg {tuple(y.shape)} and body {tuple(b.shape)} differ.")
        inside = y[b] != 0
        if inside.any() and not inside.all():
            auc = compute_auroc_auprc(m[b], inside.to(torch.uint8))
        else:  # undefined with one class only (e.g. a lesion-free case)
            auc = {"auroc": float("nan"), "auprc": float("nan")}
        keep = self._kept_slices(y)
        self._slice_auc(self._select(m, keep)[None], self._select(y, keep)[None], body_mask=self._select(b, keep)[None])
        row = self.rows.setdefault(case, {"case": case})
        row.update(pixel_auroc=auc["auroc"], pixel_auprc=auc["auprc"])
        return {"pixel_auroc": auc["auroc"], "pixel_auprc": auc["auprc"]}

    def add_mask(self, case: str, mask, seg, spacing: Sequence[float] | None = None) -> dict:
        """
        Add the binary mask of one case.

        Args:
            case: case id.
            mask: binary prediction ``(1, H, W, D)``.
            seg: binary ground truth, same shape.
            spacing: voxel spacing in mm (3 values) for HD95 in mm.

        Returns:
            the case's row: slice-level means over its positive slices (``slice_dice``, ``slice_iou``,
            ``slice_hd95``, ``slice_hd95_mm``), counts, and volume-level ``volume_dice``, ``volume_iou``,
            ``volume_hd95``, ``volume_hd95_mm`` (``nan`` for a case without target).
        """
        p, y = _as_volume(mask, "mask"), _as_volume(seg, "seg")
        if p.shape != y.shape:
            raise ValueError(f"case {case}: mask {tuple(p.shape)} and seg {tuple(y.shape)} differ.")
        keep = self._kept_slices(y)
        sp = None if spacing is None else [float(s) for s in spacing]
        per_slice = SegmentationScores(level="slice", slice_axis=self.slice_axis, spacing=sp, all_ranks=False)
        per_slice(self._select(p, keep)[None], self._select(y, keep)[None])
        s_scores, s_agg = per_slice.get_scores(), per_slice.aggregate()
        for key in self._slice_values:
            self._slice_values[key].extend(s_scores[key].tolist())
        for key in ("num_hd95_missing", "num_negative", "num_negative_with_prediction"):
            self._counts[key] += int(s_agg[key])
        self._counts["num_excluded"] += int(y.shape[self.slice_axis + 1] - keep.numel())

        per_volume = SegmentationScores(level="volume", spacing=sp, all_ranks=False)
        per_volume(p[None], y[None])
        v_scores = per_volume.get_scores()
        for key in self._volume_values:
            self._volume_values[key].extend(v_scores[key].tolist())
        vol = {key: (float(v_scores[key][0]) if len(v_scores[key]) else float("nan")) for key in self._volume_values}

        row = self.rows.setdefault(case, {"case": case})
        row.update(
            num_slices=int(y.shape[self.slice_axis + 1]),
            num_positive_slices=int(s_agg["num_scored"]),
            slice_dice=s_agg["dice"],
            slice_iou=s_agg["iou"],
            slice_hd95=s_agg["hd95"],
            slice_hd95_mm=s_agg["hd95_mm"],
            slice_hd95_missing=int(s_agg["num_hd95_missing"]),
            false_positive_slices=int(s_agg["num_negative_with_prediction"]),
            volume_dice=vol["dice"],
            volume_iou=vol["iou"],
            volume_hd95=vol["hd95"],
            volume_hd95_mm=vol["hd95_mm"],
        )
        return row

    def _state(self) -> dict:
        """What the pooled scores are computed from (picklable): the rows, score lists, counts and slice scores."""
        slices = self._slice_auc.get_buffer()  # (score, label) of every scored slice of this process, or None
        return {"rows": self.rows, "slice": self._slice_values, "volume": self._volume_values, "counts": self._counts,
                "slice_scores": slices}

    def aggregate(self) -> dict:
        """
        Under ``torch.distributed`` (each rank scoring its shard of the cases), the cases of every rank are pooled
        first (a collective: every rank calls it once), so each rank returns the scores of the whole dataset.

        Returns:
            pooled scores: ``slice_*`` means and ``*_std`` over all positive slices, ``volume_*`` over all
            volumes with target, ``pixel_auroc`` / ``pixel_auprc`` means over the cases with target,
            ``slice_auroc`` / ``slice_auprc`` pooled over all slices with body, and the counts
            ``num_cases``, ``num_positive_slices``, ``num_hd95_missing``, ``num_negative_slices``,
            ``num_negative_with_prediction``, ``num_excluded_slices``.
        """
        states = [self._state()]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, self._state())
        rows = [r for st in states for r in st["rows"].values()]
        slice_values = {k: [v for st in states for v in st["slice"][k]] for k in self._slice_values}
        volume_values = {k: [v for st in states for v in st["volume"][k]] for k in self._volume_values}
        counts = {k: sum(st["counts"][k] for st in states) for k in self._counts}
        out: dict = {"num_cases": len(rows)}
        for key, values in slice_values.items():
            out[f"slice_{key}"], out[f"slice_{key}_std"] = _mean_std(values)
        for key, values in volume_values.items():
            out[f"volume_{key}"], out[f"volume_{key}_std"] = _mean_std(values)
        for key in ("pixel_auroc", "pixel_auprc"):
            out[key], out[f"{key}_std"] = _mean_std([r.get(key, float("nan")) for r in rows])
        out["num_positive_slices"] = len(slice_values["dice"])
        out["num_positive_volumes"] = len(volume_values["dice"])
        out["num_hd95_missing"] = counts["num_hd95_missing"]
        out["num_negative_slices"] = counts["num_negative"]
        out["num_negative_with_prediction"] = counts["num_negative_with_prediction"]
        out["num_excluded_slices"] = counts["num_excluded"]
        scored = [st["slice_scores"] for st in states if st["slice_scores"] is not None]
        out["slice_auroc"] = out["slice_auprc"] = float("nan")  # no map was added
        if scored:
            slices = torch.cat(scored, 0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # one class only: nan, said in the table
                auc = compute_auroc_auprc(slices[:, 0], slices[:, 1])
            out["slice_auroc"], out["slice_auprc"] = auc["auroc"], auc["auprc"]
        return out


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping]) -> Path:
    """
    Write rows (dicts) as a CSV file; columns in first-seen order, floats with 6 significant digits.

    Args:
        path: output file (parent folders are created).
        rows: the rows.

    Returns:
        the written path.

    Example::

        write_csv("out/metrics.csv", [{"case": "a", "slice_dice": 0.7}])
    """
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    target = Path(path)
    with atomic_write(target) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:  # never a half-written table under its name
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return target


def _fmt(summary: Mapping, key: str, std: bool = True, digits: int = 3) -> str:
    value = summary.get(key, float("nan"))
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    text = f"{value:.{digits}f}"
    spread = summary.get(f"{key}_std")
    if std and spread is not None and not (isinstance(spread, float) and math.isnan(spread)):
        text += f" ± {spread:.{digits}f}"
    return text


def format_summary_table(summaries: Mapping[str, Mapping]) -> str:
    """
    A markdown table with one row per method (or run): slice-level Dice / IoU / HD95 over positive slices,
    volume Dice, pixel and slice AUROC, counts and time.

    Args:
        summaries: name -> summary dict (from :py:meth:`VolumeEvaluation.aggregate`, optionally with
            ``seconds_per_volume``).

    Returns:
        the table as a string.

    Example::

        print(format_summary_table({"cdm": summary_cdm, "threshold": summary_thr}))
    """
    header = (
        "| method | cases | positive slices | slice Dice | slice IoU | slice HD95 (px) | HD95 missing "
        "| volume Dice | pixel AUROC | slice AUROC | s / volume |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, s in summaries.items():
        seconds = s.get("seconds_per_volume")
        lines.append(
            f"| {name} | {s.get('num_cases', 'n/a')} | {s.get('num_positive_slices', 'n/a')} "
            f"| {_fmt(s, 'slice_dice')} | {_fmt(s, 'slice_iou')} | {_fmt(s, 'slice_hd95', digits=1)} "
            f"| {s.get('num_hd95_missing', 'n/a')} | {_fmt(s, 'volume_dice')} | {_fmt(s, 'pixel_auroc', std=False)} "
            f"| {_fmt(s, 'slice_auroc', std=False)} | {'n/a' if seconds is None else f'{seconds:.1f}'} |"
        )
    return "\n".join(lines)


def write_summary_markdown(
    path: str | os.PathLike,
    summaries: Mapping[str, Mapping],
    rows: Sequence[Mapping] | None = None,
    title: str = "Segmentation results",
    notes: Sequence[str] = (),
) -> Path:
    """
    Write a markdown report: the :py:func:`format_summary_table`, notes, and a per-case table.

    Args:
        path: output file.
        summaries: name -> summary dict.
        rows: per-case rows (from :py:class:`VolumeEvaluation`), optional.
        title: heading.
        notes: lines written under the table (settings, protocol).

    Returns:
        the written path.

    Example::

        write_summary_markdown("out/summary.md", {"cdm": summary}, rows, notes=["Q=200, R=10"])
    """
    parts = [f"# {title}", "", format_summary_table(summaries), ""]
    parts += [f"- {n}" for n in notes]
    if rows:
        parts += ["", "## Per case", "", "| case | positive slices | slice Dice | slice HD95 (px) | volume Dice | pixel AUROC |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            parts.append(
                f"| {r.get('case')} | {r.get('num_positive_slices', 'n/a')} | {_fmt(r, 'slice_dice', std=False)} "
                f"| {_fmt(r, 'slice_hd95', std=False, digits=1)} | {_fmt(r, 'volume_dice', std=False)} "
                f"| {_fmt(r, 'pixel_auroc', std=False)} |"
            )
    return write_text_atomic(path, "\n".join(parts) + "\n")


def select_overlay_slices(
    image, seg=None, mask=None, num_slices: int = 3, slice_axis: int = -1
) -> list[int]:
    """
    Slices worth showing: spread evenly over the slices with ground truth (else with a predicted mask, else with
    body), inner ones first (the ends of a lesion are tiny).

    Args:
        image: volume ``(1, H, W, D)`` (0 outside the body).
        seg: optional ground truth.
        mask: optional predicted mask.
        num_slices: how many.
        slice_axis: spatial axis of the slices.

    Returns:
        sorted slice indices (fewer when the volume has fewer candidate slices).
    """
    axis = int(slice_axis) % 3
    for candidate in (seg, mask, image):
        if candidate is None:
            continue
        area = _as_volume(candidate, "volume")[0].movedim(axis, 0).flatten(1).ne(0).sum(1)
        idx = torch.nonzero(area).flatten().tolist()
        if idx:
            if len(idx) <= num_slices:
                return idx
            picks = np.linspace(0, len(idx) - 1, num_slices + 2)[1:-1]
            return sorted({idx[int(round(p))] for p in picks})
    return []


def save_overlay(
    path: str | os.PathLike,
    image,
    map01,
    mask,
    seg=None,
    slices: Sequence[int] | None = None,
    num_slices: int = 3,
    slice_axis: int = -1,
    title: str | None = None,
) -> Path:
    """
    Save a PNG with one row per slice: image, ground truth (when given), map, mask (predicted in green, ground
    truth contour in red).

    Args:
        path: output PNG.
        image: volume ``(1, H, W, D)``.
        map01: continuous map of the same shape (shown with its own colour scale).
        mask: binary prediction.
        seg: binary ground truth (optional).
        slices: slice indices (default: :py:func:`select_overlay_slices`).
        num_slices: number of slices when choosing them.
        slice_axis: spatial axis of the slices.
        title: figure title.

    Returns:
        the written path.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: volumes of different shapes.

    Example::

        save_overlay("out/overlays/case1.png", image, map01, mask, seg, title="case1 - cdm")
    """
    if not has_matplotlib:
        raise ImportError("overlay PNGs need matplotlib: pip install matplotlib (or monai_wsss[train]).")
    import matplotlib
    from matplotlib.colors import ListedColormap

    gt_colour, mask_colour = ListedColormap(["red"]), ListedColormap(["lime"])
    axis = int(slice_axis) % 3
    vols = {"image": _as_volume(image, "image"), "map": _as_volume(map01, "map01"), "mask": _as_volume(mask, "mask")}
    if seg is not None:
        vols["seg"] = _as_volume(seg, "seg")
    shapes = {k: tuple(v.shape) for k, v in vols.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"overlay volumes must share one shape, got {shapes}.")
    if slices is None:
        slices = select_overlay_slices(vols["image"], vols.get("seg"), vols["mask"], num_slices, axis)
    if not slices:
        slices = [vols["image"].shape[axis + 1] // 2]

    def plane(name: str, k: int) -> np.ndarray:
        # rows of the array along the screen's vertical axis, first axis up (radiological-like view of NIfTI)
        return np.rot90(vols[name][0].movedim(axis, 0)[k].numpy())

    columns = ["image"] + (["ground truth"] if "seg" in vols else []) + ["map", "mask"]
    with matplotlib.rc_context({"backend": "Agg"}):
        fig, axes = plt.subplots(len(slices), len(columns), figsize=(2.6 * len(columns), 2.6 * len(slices)), squeeze=False)
        for r, k in enumerate(slices):
            img = plane("image", k)
            for c, col in enumerate(columns):
                ax = axes[r, c]
                ax.axis("off")
                if col == "map":
                    ax.imshow(plane("map", k), cmap="inferno")
                else:
                    ax.imshow(img, cmap="gray")
                if col == "ground truth":
                    ax.imshow(np.ma.masked_equal(plane("seg", k), 0), cmap=gt_colour, alpha=0.45)
                if col == "mask":
                    ax.imshow(np.ma.masked_equal(plane("mask", k), 0), cmap=mask_colour, alpha=0.45)
                    if "seg" in vols and plane("seg", k).any():
                        ax.contour(plane("seg", k), levels=[0.5], colors="red", linewidths=0.8)
                if r == 0:
                    ax.set_title(col, fontsize=9)
            axes[r, 0].text(2, 2, f"slice {k}", color="yellow", fontsize=7, va="top")
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        target = Path(path)
        try:
            with atomic_write(target) as tmp:
                fig.savefig(tmp, dpi=80, format=target.suffix.lstrip(".") or "png")
        finally:
            plt.close(fig)
    return target
