# Copyright (c) monai_wsss contributors
# Licensed under the Apache License, Version 2.0
"""
The task registry: everything this package knows about a dataset task, in one place.

A task (``"brats"``, ``"chaos"``) is one :py:class:`TaskPreset` in :py:data:`TASKS`: its label mapping, image
modality, slice axis, dataset folder layout (:py:class:`DatasetLayout`), the weak-label rule that turns a pixel
mask into slice labels, and the defaults each method was tuned to on that task (:py:class:`MethodDefaults`, each
with a ``chosen_on`` note naming where it was chosen). Datalists, slice datasets, the apps, the bundle helpers
and the scripts read this registry, and command lines take their ``--task`` choices from ``sorted(TASKS)``.

To add a dataset: write its layout's case-listing function (see :py:mod:`monai_wsss.data.datalist`) and add a
``TaskPreset`` here.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from monai_wsss.data.datalist import build_brats_datalist, build_chaos_datalist
from monai_wsss.transforms.postprocess import NORMALIZE_MODES

__all__ = [
    "MAP_THRESHOLD_MODES",
    "NORMALIZE_SCOPES",
    "DatasetLayout",
    "MethodDefaults",
    "TASKS",
    "TaskPreset",
    "get_task",
]

#: thresholds computed from the maps themselves: per-slice Otsu, or one Otsu threshold averaged over a run
MAP_THRESHOLD_MODES = ("otsu", "average_otsu")
#: the scopes a map is normalised to ``[0, 1]`` over before thresholding
NORMALIZE_SCOPES = ("slice", "volume")
_MAP_MODES = (None, *NORMALIZE_MODES)  # None: the map is kept on its own scale


class _ReadOnlyMapping(Mapping):
    """A read-only mapping that pickles (``MappingProxyType`` does not, and presets travel to worker processes)."""

    def __init__(self, data: Mapping) -> None:
        self._data = dict(data)

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return repr(self._data)


@dataclass(frozen=True)
class MethodDefaults:
    """
    The post-processing a method's map gets by default on one task, and where those values were chosen.

    Args:
        threshold: a fixed threshold in ``[0, 1]`` or one of :py:data:`MAP_THRESHOLD_MODES`.
        normalize_per: ``"slice"`` or ``"volume"``: the scope of the map normalisation that goes with the threshold.
        map_mode: how the raw map becomes a ``[0, 1]`` map (``NormalizeMap`` mode), None for no normalisation.
        min_component_size: 3D components smaller than this (voxels) are dropped; 0 turns the filter off.
        chosen_on: where the values were chosen (a doc and section, or "definition" for a method's own rule).

    Raises:
        ValueError: a value out of range, naming the field.

    Example::

        >>> MethodDefaults(threshold=0.5, normalize_per="volume", min_component_size=1000, chosen_on="docs").threshold
        0.5
    """

    threshold: float | str
    normalize_per: str
    map_mode: str | None = None
    min_component_size: int = 0
    chosen_on: str = ""

    def __post_init__(self) -> None:
        t = self.threshold
        if isinstance(t, str):
            if t not in MAP_THRESHOLD_MODES:
                raise ValueError(f"MethodDefaults.threshold must be a float or one of {MAP_THRESHOLD_MODES}, got {t!r}.")
        elif isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= float(t) <= 1.0 or math.isnan(t):
            raise ValueError(f"MethodDefaults.threshold must be in [0, 1] or one of {MAP_THRESHOLD_MODES}, got {t!r}.")
        if self.normalize_per not in NORMALIZE_SCOPES:
            raise ValueError(f"MethodDefaults.normalize_per must be one of {NORMALIZE_SCOPES}, got {self.normalize_per!r}.")
        if self.map_mode not in _MAP_MODES:
            raise ValueError(f"MethodDefaults.map_mode must be one of {_MAP_MODES}, got {self.map_mode!r}.")
        size = self.min_component_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"MethodDefaults.min_component_size must be an int >= 0, got {size!r}.")
        if not isinstance(self.chosen_on, str) or not self.chosen_on.strip():
            raise ValueError("MethodDefaults.chosen_on must say where the values were chosen (a doc and section).")


@dataclass(frozen=True)
class DatasetLayout:
    """
    How the cases of a task's dataset folder are found.

    Args:
        description: the layout in words, for error messages and ``--help``.
        list_cases: ``list_cases(root, require_seg=..., [modality=...]) -> items`` with ``"image"``, ``"case"`` and,
            where present, ``"seg"``.
        modalities: image modalities the folder may hold, the default first. With more than one, ``list_cases``
            takes ``modality=`` (a file suffix); with one, it takes none.
        volume_folder: regular expression of a folder name that is one volume rather than a dataset (a DICOM series
            folder given as the input); None: every folder is a dataset.

    Raises:
        ValueError: no modality.

    Example::

        >>> TASKS["chaos"].layout.is_volume_folder("image_3")
        True
    """

    description: str
    list_cases: Callable[..., list[dict]]
    modalities: tuple[str, ...]
    volume_folder: str | None = None

    def __post_init__(self) -> None:
        if not self.modalities:
            raise ValueError("DatasetLayout.modalities must name at least one modality (the default first).")

    @property
    def default_modality(self) -> str:
        """The modality read when none is asked for."""
        return self.modalities[0]

    def is_volume_folder(self, path: str | os.PathLike) -> bool:
        """Whether a folder of this name is one volume (e.g. a DICOM series), not a dataset folder."""
        return self.volume_folder is not None and re.fullmatch(self.volume_folder, Path(path).name) is not None

    def find_cases(self, root: str | os.PathLike, require_seg: bool = True, modality: str | None = None) -> list[dict]:
        """
        The cases of a dataset folder of this layout.

        Args:
            root: the dataset folder.
            require_seg: every case must have a mask.
            modality: the image modality (default: :py:attr:`default_modality`).

        Returns:
            datalist items, in the layout's order.

        Raises:
            ValueError: ``modality`` is not one this layout holds (and the errors of ``list_cases``).
        """
        if len(self.modalities) == 1:
            if modality is not None and modality.lower() != self.default_modality:
                raise ValueError(
                    f"modality {modality!r}: the {self.description} layout holds {self.default_modality!r} images only."
                )
            return self.list_cases(root, require_seg=require_seg)
        return self.list_cases(root, require_seg=require_seg, modality=modality or self.default_modality)


def _valid_axcodes(codes: object) -> bool:
    if not isinstance(codes, str) or len(codes) != 3:
        return False
    axes = [next((i for i, pair in enumerate(("LR", "PA", "IS")) if c in pair), None) for c in codes.upper()]
    return None not in axes and sorted(axes) == [0, 1, 2]


@dataclass(frozen=True)
class TaskPreset:
    """
    Everything task-specific between a dataset folder and masks: labels, modality, slices, layout, tuned defaults.

    The fields that shape the slices come first; their ``repr`` is what caches and run folders record, so the
    descriptive fields after them (``modality``, ``layout``, ``method_defaults``) are left out of it.

    Args:
        name: task name.
        target_labels: mask values forming the target (``None``: every non-zero value).
        allowed_labels: every value the mask may contain (others are an error).
        lower_percentile: intensity percentile (inside the non-zero region) mapped to 0.
        upper_percentile: intensity percentile mapped to 1.
        positive_min_pixels: weak-label rule, smallest target area (source pixels) of a positive slice
            (``None``: unused).
        positive_min_fraction: weak-label rule, smallest target fraction of the (source) slice area of a positive
            slice (``None``: unused). The default 0.002 is about 115 pixels of a 240 x 240 BraTS slice and 8 pixels
            at 64 x 64; slices with less target are ambiguous (excluded from training).
        min_body_fraction: smallest non-zero (brain / body) fraction of a slice kept for training / evaluation.
        eval_min_fraction: at evaluation, drop slices whose target covers more than 0 but less than this
            fraction of the slice (the CDM paper's CHAOS protocol, 5 %); ``None``: keep them.
        slice_axis: spatial axis of the slices, counted after reorientation to ``orientation`` (2: axial for
            BraTS / CHAOS).
        orientation: axis codes (nibabel / MONAI ``Orientationd`` convention, e.g. ``"LPS"``) every scan is
            reoriented to after loading, for training, pseudo-masks and inference alike, so that a scan stored
            in another axis order is sliced along the same anatomical axis; outputs are written back in the
            scan's own order. The datasets' own orientation (their masks do not change); ``None``: slice the
            array as stored.
        image_channel: channel kept from multi-channel images (Decathlon Task01: 0 = FLAIR).
        modality: the image the task is defined on, in words (e.g. ``"MRI FLAIR"``).
        layout: how its dataset folders are read (None: the task cannot read folders, only datalists).
        method_defaults: method name -> :py:class:`MethodDefaults` tuned on this task.

    Raises:
        ValueError: an empty name, a ``slice_axis`` outside 0-2, or ``method_defaults`` values that are not
            :py:class:`MethodDefaults`.

    Example::

        >>> TASKS["chaos"].target_labels, TASKS["chaos"].method_defaults["segmenter"].threshold
        ((2, 3), 0.3)
    """

    name: str
    target_labels: tuple[int, ...] | None
    allowed_labels: tuple[int, ...]
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    positive_min_pixels: int | None = None
    positive_min_fraction: float | None = 0.002
    min_body_fraction: float = 0.05
    eval_min_fraction: float | None = None
    slice_axis: int = 2
    orientation: str | None = None
    image_channel: int = 0
    # descriptive fields: not in repr (the cache / run-folder fingerprint), equality or hash
    modality: str = field(default="", repr=False, compare=False)
    layout: DatasetLayout | None = field(default=None, repr=False, compare=False)
    method_defaults: Mapping[str, MethodDefaults] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"TaskPreset.name must be a non-empty string, got {self.name!r}.")
        if self.slice_axis not in (0, 1, 2):
            raise ValueError(f"TaskPreset.slice_axis must be a spatial axis 0, 1 or 2, got {self.slice_axis!r}.")
        if self.orientation is not None and not _valid_axcodes(self.orientation):
            raise ValueError(
                f"TaskPreset.orientation must be three axis codes, one of L/R, P/A, I/S each (e.g. 'LPS'), "
                f"got {self.orientation!r}."
            )
        if self.orientation is not None:
            object.__setattr__(self, "orientation", self.orientation.upper())
        for method, defaults in self.method_defaults.items():
            if not isinstance(defaults, MethodDefaults):
                raise ValueError(
                    f"TaskPreset.method_defaults[{method!r}] must be a MethodDefaults, got {type(defaults).__name__}."
                )
        # read-only, so a preset shared by every caller cannot be changed by one of them
        object.__setattr__(self, "method_defaults", _ReadOnlyMapping(self.method_defaults))

    def replace(self, **changes) -> TaskPreset:
        """A copy with some fields changed, e.g. ``TASKS["brats"].replace(positive_min_pixels=50)``."""
        return dataclasses.replace(self, **changes)

    def slice_fields(self) -> dict:
        """The fields that shape the slices (what a slice cache is keyed on), as a plain dict."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.repr}

    def weak_label_rule(self) -> str:
        """
        The weak-label rule in words, as logs and labels files quote it.

        Example::

            >>> TASKS["brats"].weak_label_rule()
            'brats rule: >= 0.2 % of the slice: 1, none: 0, in between: unlabelled'
        """
        parts = []
        if self.positive_min_fraction:
            parts.append(f"{100 * self.positive_min_fraction:g} % of the slice")
        if self.positive_min_pixels:
            parts.append(f"{self.positive_min_pixels} pixels")
        least = " and ".join(parts) or "any target pixel"
        return f"{self.name} rule: >= {least}: 1, none: 0, in between: unlabelled"

    def list_cases(self, root: str | os.PathLike, require_seg: bool = True, modality: str | None = None) -> list[dict]:
        """
        The cases of a dataset folder of this task's layout (see :py:meth:`DatasetLayout.find_cases`).

        Raises:
            ValueError: the task has no folder layout (and the errors of the layout).
        """
        if self.layout is None:
            raise ValueError(f"task {self.name!r} has no dataset folder layout: pass a datalist JSON instead.")
        return self.layout.find_cases(root, require_seg=require_seg, modality=modality)


_BRATS_DOCS = "bundles/brats_cdm/docs"
_CHAOS_DOCS = "bundles/chaos_kidney_cdm/docs"


def _map_methods(threshold: str, normalize_per: str, cdm_map_mode: str, chosen_on: str) -> dict[str, MethodDefaults]:
    """The map methods' defaults of a task: the diffusion maps and the per-slice intensity baseline share them."""
    return {
        "cdm": MethodDefaults(threshold, normalize_per, cdm_map_mode, chosen_on=chosen_on),
        "cg_cdm": MethodDefaults(threshold, normalize_per, cdm_map_mode, chosen_on=chosen_on),
        # |x - x_hat| >= 0 has no sign to read
        "cg_diff": MethodDefaults(threshold, normalize_per, "abs", chosen_on=chosen_on),
        "cfg": MethodDefaults(threshold, normalize_per, "abs", chosen_on=chosen_on),
        "threshold": MethodDefaults(threshold, normalize_per, None, chosen_on=chosen_on),
    }


#: the tasks: BraTS whole tumour (labels 1, 2, 4 of BraTS 2018 and 1, 2, 3 of Decathlon Task01) on FLAIR, and CHAOS
#: kidney (right 2 + left 3; liver 1 and spleen 4 are background) on T2-SPIR
TASKS: dict[str, TaskPreset] = {
    "brats": TaskPreset(
        name="brats",
        target_labels=None,
        # BraTS 2018 NIfTI are stored LPS (nibabel codes; axis 2 axial): scans stored otherwise
        # are flipped or permuted to match the training slices
        orientation="LPS",
        allowed_labels=(0, 1, 2, 3, 4),
        modality="MRI FLAIR",
        layout=DatasetLayout(
            "BraTS (<case>/<case>_<modality>.nii.gz) or Decathlon Task01 (dataset.json, imagesTr/)",
            build_brats_datalist,
            modalities=("flair", "t1", "t1ce", "t2"),
        ),
        method_defaults={
            # the tumour is hyperintense on FLAIR: the signed CDM map; one average Otsu threshold over per-volume
            # maps leaves tumour-free slices empty
            **_map_methods("average_otsu", "volume", "signed", f"{_BRATS_DOCS}/README.md, average Otsu (validation)"),
            "segmenter": MethodDefaults(
                0.7, "volume", None, 1000,
                chosen_on=f"{_BRATS_DOCS}/training.md, '128 x 128 slices (bundle 0.9.0)', post-processing: "
                "labels-only validation, volume Dice 0.893 vs 0.888 at 0.5 and 0.872 at 0.3; slice F1 0.986 vs "
                "0.953 without the component filter",
            ),
        },
    ),
    "chaos": TaskPreset(
        name="chaos",
        target_labels=(2, 3),
        allowed_labels=(0, 1, 2, 3, 4),
        eval_min_fraction=0.05,
        # the CHAOS NIfTI conversion is stored LAS: axis 2 is axial
        orientation="LAS",
        modality="MRI T2-SPIR",
        layout=DatasetLayout(
            "CHAOS NIfTI (image_<N>.nii.gz, label_<N>.nii.gz)",
            build_chaos_datalist,
            modalities=("t2spir",),
            volume_folder=r"image_\d+",  # the raw release's DICOM series folders
        ),
        method_defaults={
            # the kidney's change on T2-SPIR is not known to be one-sided: |a|; per-slice Otsu (no difference there)
            **_map_methods("otsu", "slice", "abs", f"{_CHAOS_DOCS}/training.md, 'Inference defaults'"),
            "segmenter": MethodDefaults(
                0.3, "volume", None, 0,
                chosen_on=f"{_CHAOS_DOCS}/training.md, 'Synthetic bright distractors (bundle 0.10.0)', "
                "post-processing: labels-only validation, volume Dice against the pseudo-masks 0.819 at 0.3 without "
                "the component filter vs 0.810 with it (>= 1000 voxels), 0.803 at 0.5, 0.752 at 0.7; the slice "
                "gate 0.817",
            ),
        },
    ),
}


def get_task(task: str | TaskPreset) -> TaskPreset:
    """
    The preset of a task name (or the preset itself).

    Args:
        task: a name in :py:data:`TASKS` or a :py:class:`TaskPreset`.

    Returns:
        the preset.

    Raises:
        ValueError: an unknown name, naming the known ones.

    Example::

        >>> get_task("brats").slice_axis
        2
    """
    if isinstance(task, TaskPreset):
        return task
    if not isinstance(task, str) or task not in TASKS:
        raise ValueError(f"unknown task {task!r}, expected one of {sorted(TASKS)} or a TaskPreset.")
    return TASKS[task]
