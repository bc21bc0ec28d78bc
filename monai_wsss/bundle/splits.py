# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""Functions the bundle configs call to build their data: the labels file, the case-level splits, a fixed subset of
validation slices."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from monai.data import Dataset

from monai_wsss.data import (
    SliceLabels,
    TaskPreset,
    get_task,
    load_datalist,
    require_slice_labels,
    split_cases,
    write_datalist,
)
from monai_wsss.transforms.io import LoadVolumed, SaveVolumed

__all__ = ["attach_pseudo_masks", "load_slice_labels", "prepare_splits", "pseudo_mask_datalist", "select_slices"]

logger = logging.getLogger(__name__)


def load_slice_labels(labels: str | os.PathLike | SliceLabels | None) -> SliceLabels | None:
    """
    The ``labels`` option of a training config: a labels CSV path (``case,slice,label``), parsed, or ``None``.

    Args:
        labels: path of the labels file, an already parsed :py:class:`~monai_wsss.data.SliceLabels`, or ``None`` /
            ``""`` / ``"none"`` (no labels file: the slice labels come from the pixel masks by the task's rule).

    Returns:
        the labels, or ``None``.

    Raises:
        FileNotFoundError, ValueError: see :py:meth:`~monai_wsss.data.SliceLabels.from_csv` (file, line, value named).

    Example::

        >>> load_slice_labels(None) is None
        True
    """
    if labels is None or isinstance(labels, SliceLabels):
        return labels
    if str(labels).strip().lower() in ("", "none", "null"):
        return None
    return SliceLabels.from_csv(labels)


def attach_pseudo_masks(
    items: Sequence[Mapping], pseudo_dir: str | os.PathLike, key: str = "pseudo", argument: str = "pseudo_dir"
) -> list[dict]:
    """
    ``items`` with ``key`` set to each case's ``<case>_pseudo.nii.gz`` in ``pseudo_dir``, the file names a bundle's
    training run writes its pseudo-masks under (:py:class:`~monai_wsss.apps.PseudoMaskGenerator`).

    Args:
        items: datalist items, each with a ``case`` id.
        pseudo_dir: the pseudo-mask folder, e.g. ``<bundle_root>/outputs/pseudo_masks/brats_<digest>``.
        key: the item key that receives the path (``"seg"`` to score against the pseudo-masks).
        argument: the argument name the error messages give for ``pseudo_dir``.

    Returns:
        new items (the inputs are not changed).

    Raises:
        ValueError: an item without ``case``, or a case whose pseudo-mask file is missing (the path is named).

    Example::

        >>> attach_pseudo_masks([{"case": "c1", "image": "c1.nii.gz"}], "pm", key="seg")  # doctest: +SKIP
        [{'case': 'c1', 'image': 'c1.nii.gz', 'seg': 'pm/c1_pseudo.nii.gz'}]
    """
    out = []
    for item in items:
        if "case" not in item:
            raise ValueError(f"{argument}: item {dict(item)!r} has no 'case' id (the pseudo-mask file name).")
        path = Path(pseudo_dir) / f"{item['case']}_pseudo.nii.gz"
        if not path.is_file():
            raise ValueError(f"{argument}: no pseudo-mask {path} for case {item['case']}.")
        out.append({**dict(item), key: str(path)})
    return out


def pseudo_mask_datalist(
    datalist: str | os.PathLike | Mapping[str, Sequence[Mapping]],
    pseudo_dir: str | os.PathLike,
    datalist_file: str | os.PathLike | None = None,
    split: str = "validation",
    task: str | TaskPreset = "brats",
    reference_dir: str | os.PathLike | None = None,
) -> dict[str, list[dict]]:
    """
    A datalist of one split whose ``seg`` is each scan's pseudo-mask, so that a bundle's ``evaluate.json`` scores
    whole volumes against the references made from the image-level labels alone: a labels-only criterion for
    choosing inference settings that, unlike slice AUROC or Dice on the labelled slices, also charges a mask on a
    slice labelled 0 (its pseudo-mask is empty, as the second stage's training target).

    The pseudo-masks are 0 / 1. A task whose target is not "every non-zero value" (CHAOS kidney: values 2 and 3;
    1 is the liver) reads ``seg`` through its ``target_labels``, so for such a task the masks are first written, with
    the target as its first target label, into ``reference_dir``.

    Args:
        datalist: a datalist JSON file (e.g. from :py:func:`prepare_splits`) or its splits.
        pseudo_dir: the folder of ``<case>_pseudo.nii.gz`` (``train.json``'s ``outputs/pseudo_masks/<task>_<digest>``;
            ``--run_id pseudo_val_items`` writes the validation ones alone).
        datalist_file: optional JSON file to write the result to (atomically).
        split: the split to keep; its pixel masks, if any, are replaced and never read.
        task: the task name or preset, for its mask label convention.
        reference_dir: where relabelled references go (default: ``pseudo_references`` beside ``datalist_file``);
            only used for tasks with ``target_labels``.

    Returns:
        ``{split: [...]}`` of items whose ``seg`` is the reference path.

    Raises:
        ValueError: ``split`` missing or empty in ``datalist``, a case without its pseudo-mask file, or a task that
            needs relabelled references with neither ``reference_dir`` nor ``datalist_file``.

    Example::

        >>> pseudo_mask_datalist("datalist.json", "pm/outputs/pseudo_masks/brats_a713ce1ff87d", "val_pseudo.json")  # doctest: +SKIP
        # then: monai.bundle run ... evaluate.json --dataset_dir val_pseudo.json --datalist_split validation
    """
    preset = get_task(task)
    splits = load_datalist(datalist) if isinstance(datalist, (str, os.PathLike)) else datalist
    if not splits.get(split):
        source = f"datalist {datalist}" if isinstance(datalist, (str, os.PathLike)) else "the datalist"
        raise ValueError(f"{source} has no '{split}' scans (splits: {sorted(splits)}).")
    items = attach_pseudo_masks(splits[split], pseudo_dir, key="seg")
    if preset.target_labels is not None:
        if reference_dir is None and datalist_file is None:
            raise ValueError(f"task '{preset.name}' reads masks through target_labels {preset.target_labels}: "
                             "pass reference_dir (or datalist_file) for the relabelled pseudo-masks.")
        folder = Path(reference_dir) if reference_dir is not None else Path(datalist_file).parent / "pseudo_references"
        load = LoadVolumed("pseudo")
        saver = SaveVolumed("pseudo", folder, output_dtype=np.uint8, name_key="case")  # atomic, the mask's affine
        for item in items:
            mask = load({"pseudo": item["seg"]})["pseudo"]
            saver({"pseudo": (mask > 0) * preset.target_labels[0], "case": str(item["case"])})
            item["seg"] = str(saver.output_path({"case": str(item["case"])}, "pseudo"))
    out = {split: items}
    if datalist_file is not None:
        write_datalist(datalist_file, out)
    return out


def prepare_splits(
    dataset_dir: str | os.PathLike,
    task: str | TaskPreset = "brats",
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    datalist_file: str | os.PathLike | None = None,
    labels: str | os.PathLike | SliceLabels | None = None,
    allow_unlabelled_scans: bool = False,
    keep_validation_masks: bool = False,
) -> dict[str, list[dict]]:
    """
    Case-level training / validation / test splits of a dataset, as the bundle configs use them.

    ``dataset_dir`` is either a dataset folder (BraTS or Decathlon Task01 layout for ``task="brats"``, the CHAOS
    NIfTI layout for ``task="chaos"``), split with :py:func:`~monai_wsss.data.split_cases`, or a datalist JSON
    (e.g. one written by an earlier run), loaded as is. With ``datalist_file`` the splits are written there, so
    that inference and evaluation can reuse exactly the same cases.

    Args:
        dataset_dir: dataset folder or datalist JSON file.
        task: a task name in :py:data:`~monai_wsss.data.TASKS` (its folder layout is read), or a
            :py:class:`~monai_wsss.data.TaskPreset`
            of one of them (its ``name`` is used).
        val_fraction: fraction of cases for validation.
        test_fraction: fraction of cases for testing.
        seed: split seed.
        datalist_file: optional JSON file to write the splits to (parent folders are created).
        labels: the slice labels (a labels CSV path or :py:class:`~monai_wsss.data.SliceLabels`): the weak
            supervision. With them, no pixel mask of a training or validation scan is needed or read: their
            ``seg`` entries are dropped (test scans keep theirs, to score the test split). Without them every
            training and validation scan needs a mask, from which the labels are derived by the task's rule.
        allow_unlabelled_scans: with ``labels``, a training or validation scan that no row names is left out
            with a warning instead of being an error.
        keep_validation_masks: with ``labels``, keep the validation scans' masks: model selection against pixel
            masks (the configs' ``select_with_pixel_masks``), which is then no longer weakly supervised.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}`` of ``{"image", "seg", "case"}`` items.

    Raises:
        ValueError: unknown ``task``, a datalist JSON without a ``"training"`` split, a labels file that names a
            case the dataset does not hold (or, without ``allow_unlabelled_scans``, misses a training or
            validation scan), or neither labels nor masks for a training or validation scan (the message names
            ``--labels``).
        FileNotFoundError: ``dataset_dir`` does not exist (and the errors of the datalist builders).

    Example::

        >>> splits = prepare_splits("../shared/data/brats2018", "brats", seed=0)  # doctest: +SKIP
        >>> {k: len(v) for k, v in splits.items()}  # doctest: +SKIP
        {'training': 21, 'validation': 3, 'test': 6}
    """
    preset = get_task(task)
    path = Path(dataset_dir)
    if not path.exists():
        raise FileNotFoundError(f"dataset_dir not found: {path} (pass --dataset_dir <folder or datalist.json>).")
    if path.is_file():
        splits = load_datalist(path)
        if "training" not in splits:
            raise ValueError(f"datalist {path} has no 'training' split (splits: {sorted(splits)}).")
        for name in ("validation", "test"):
            splits.setdefault(name, [])
    else:
        items = preset.list_cases(path, require_seg=False)
        splits = split_cases(items, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    labels = load_slice_labels(labels)
    trained = [it for name in ("training", "validation") for it in splits[name]]
    if labels is None:
        require_slice_labels(trained, None, what="training/validation")
        logger.info(
            f"slice labels: derived from the pixel masks of the {len(trained)} training/validation scans "
            f"({preset.weak_label_rule()}); no --labels given."
        )
    else:
        labels.check_cases(
            [str(it["case"]) for items in splits.values() for it in items],
            required_cases=[str(it["case"]) for it in trained],
            allow_unlabelled_scans=allow_unlabelled_scans,
        )
        for name in ("training", "validation"):  # labels only: no mask of these scans is read
            drop = ("seg",) if name == "training" or not keep_validation_masks else ()
            splits[name] = [{k: v for k, v in it.items() if k not in drop} for it in splits[name] if it["case"] in labels]
        present = labels.label_values(it["case"] for it in splits["validation"])
        if present != {0, 1}:
            logger.warning(
                f"the {len(splits['validation'])} validation scans carry only label(s) {sorted(present)} in "
                f"{labels.source}: checkpoints chosen from labels alone need slices of both labels there (the slice "
                "AUROC is undefined, the pseudo-mask Dice says little); change --split_seed or --val_fraction."
            )
        read = "validation masks kept for selection (select_with_pixel_masks)" if keep_validation_masks else (
            "pixel masks of the training and validation scans are not read")
        logger.info(f"slice labels: {labels.source} ({len(labels)} scans); {read}.")
    if keep_validation_masks:
        require_slice_labels(splits["validation"], None, what="validation (select_with_pixel_masks)")
    if datalist_file is not None:
        write_datalist(datalist_file, splits)
    return splits


def select_slices(
    dataset: Sequence[Mapping],
    label: int | None = None,
    max_slices: int | None = None,
    seed: int = 0,
    balanced: bool = False,
) -> Dataset:
    """
    A fixed subset of a slice dataset, e.g. the positive validation slices that the weakly supervised Dice is
    computed on (Dice is undefined on slices without target, and running a diffusion map on every slice each
    validation round is slow on a CPU), or, with ``balanced``, as many slices of each label as possible up to half
    of ``max_slices`` each (a slice-level AUROC against the labels needs both).

    Args:
        dataset: slice dicts with a ``"label"`` entry (e.g. from :py:func:`~monai_wsss.data.build_slice_dataset`).
        label: keep only slices with this weak label (``None``: all).
        max_slices: keep at most this many, drawn without replacement with ``seed`` (``None`` or 0: all), in
            their original order.
        seed: seed of the draw, so every validation round sees the same slices.
        balanced: with ``label=None``, draw the labels 0 and 1 separately, ``max_slices // 2`` each at most.

    Returns:
        a MONAI ``Dataset`` of the selected slice dicts.

    Raises:
        ValueError: a negative ``max_slices``, a slice without ``"label"`` when filtering by label, or nothing
            left to select.

    Example::

        >>> ds = [{"label": i % 2} for i in range(10)]
        >>> len(select_slices(ds, label=1, max_slices=3))
        3
    """
    if max_slices is not None and max_slices < 0:
        raise ValueError(f"max_slices must be >= 0 or None, got {max_slices}.")
    items = [dataset[i] for i in range(len(dataset))]
    if label is not None:
        for i, item in enumerate(items):
            if "label" not in item:
                raise ValueError(f"slice {i} has no 'label' entry to select label={label} by.")
        items = [item for item in items if int(item["label"]) == int(label)]
    if not items:
        raise ValueError(f"no slice to select (label={label}, dataset of {len(dataset)} slices).")
    if balanced and label is None and max_slices:
        groups = [[i for i, it in enumerate(items) if int(it["label"]) == v] for v in (0, 1)]
        rng = np.random.default_rng(seed)
        keep = [g if len(g) <= max_slices // 2 else list(rng.choice(g, size=max_slices // 2, replace=False)) for g in groups]
        return Dataset(data=[items[i] for i in sorted(int(i) for g in keep for i in g)])
    if max_slices and len(items) > max_slices:
        keep = np.sort(np.random.default_rng(seed).choice(len(items), size=max_slices, replace=False))
        items = [items[i] for i in keep]
    return Dataset(data=items)
