# Copyright (c) monai_wsss contributors
# Licensed under the Apache License, Version 2.0
"""Dataset folders to MONAI datalists: BraTS / Decathlon Task01 / CHAOS layouts, case-level splits, JSON I/O."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from monai_wsss.utils.atomic_files import write_text_atomic

__all__ = [
    "build_brats_datalist",
    "build_chaos_datalist",
    "split_cases",
    "write_datalist",
    "load_datalist",
    "SPLIT_KEYS",
]

#: the split names of a MONAI (Decathlon-format) datalist, in the order they are written
SPLIT_KEYS = ("training", "validation", "test")

_NIFTI = (".nii.gz", ".nii")


def _strip_nifti(name: str) -> str | None:
    for ext in _NIFTI:
        if name.endswith(ext):
            return name[: -len(ext)]
    return None


def _find_nifti(folder: Path, stem: str) -> Path | None:
    for ext in _NIFTI:
        p = folder / f"{stem}{ext}"
        if p.is_file():
            return p
    return None


def _check_root(root: str | os.PathLike) -> Path:
    path = Path(root)
    if not path.exists():
        raise FileNotFoundError(f"dataset folder not found: {path}")
    if not path.is_dir():
        raise ValueError(f"dataset root must be a folder, got the file {path}")
    return path


def _decathlon_datalist(root: Path, modality_channel: int | None) -> list[dict]:
    """Medical Segmentation Decathlon Task01 layout: dataset.json + imagesTr/ + labelsTr/ (4D images)."""
    with open(root / "dataset.json", encoding="utf-8") as f:
        meta = json.load(f)
    entries = meta.get("training")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{root / 'dataset.json'} has no 'training' entries.")
    items = []
    for entry in entries:
        if not isinstance(entry, Mapping) or "image" not in entry or "label" not in entry:
            raise ValueError(f"{root / 'dataset.json'}: training entry {entry!r} lacks 'image' or 'label'.")
        image = (root / entry["image"]).resolve()
        seg = (root / entry["label"]).resolve()
        for p in (image, seg):
            if not p.is_file():
                raise FileNotFoundError(f"{root / 'dataset.json'} names a missing file: {p}")
        case = _strip_nifti(image.name) or image.name
        item = {"image": str(image), "seg": str(seg), "case": case}
        if modality_channel is not None:
            item["channel"] = modality_channel
        items.append(item)
    return sorted(items, key=lambda it: it["case"])


def build_brats_datalist(
    root: str | os.PathLike, modality: str = "flair", require_seg: bool = True
) -> list[dict]:
    """
    List the cases of a BraTS folder, in the BraTS challenge layout or the Decathlon Task01 layout.

    BraTS layout: ``root/<case>/<case>_<modality>.nii.gz`` and ``root/<case>/<case>_seg.nii.gz``.
    Decathlon Task01 (what ``monai.apps.DecathlonDataset`` downloads): ``root/dataset.json`` with
    ``imagesTr/BRATS_xxx.nii.gz`` 4D images (channels FLAIR, T1w, T1gd, T2w) and ``labelsTr/BRATS_xxx.nii.gz``;
    items then carry ``"channel"`` (the modality's channel, FLAIR = 0) for the loader.

    Args:
        root: dataset folder.
        modality: BraTS file suffix of the image (``flair``, ``t1``, ``t1ce``, ``t2``).
        require_seg: raise when a case has no mask (otherwise such items have no ``"seg"``).

    Returns:
        items ``{"image": path, "seg": path, "case": id}`` (absolute paths), sorted by case.

    Raises:
        FileNotFoundError: ``root`` does not exist, or a case lacks its image / mask.
        ValueError: ``root`` holds no case, or ``modality`` is unknown for the Decathlon layout.

    Example::

        >>> items = build_brats_datalist("../shared/data/brats2018")  # doctest: +SKIP
        >>> items[0]["case"], items[0]["image"].endswith("_flair.nii.gz")  # doctest: +SKIP
        ('Brats18_2013_11_1', True)
    """
    path = _check_root(root)
    if (path / "dataset.json").is_file() and (path / "imagesTr").is_dir():
        channels = {"flair": 0, "t1": 1, "t1gd": 2, "t1ce": 2, "t2": 3}
        if modality.lower() not in channels:
            raise ValueError(f"unknown Decathlon Task01 modality '{modality}', expected one of {sorted(channels)}.")
        return _decathlon_datalist(path, channels[modality.lower()])
    items = []
    for case_dir in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        case = case_dir.name
        image = _find_nifti(case_dir, f"{case}_{modality}")
        seg = _find_nifti(case_dir, f"{case}_seg")
        if image is None:
            if seg is None and not any(_strip_nifti(f.name) for f in case_dir.iterdir()):
                continue  # a folder without any NIfTI is not a case (e.g. notes, caches)
            raise FileNotFoundError(f"case folder {case_dir} has no {case}_{modality}.nii.gz")
        item = {"image": str(image.resolve()), "case": case}
        if seg is not None:
            item["seg"] = str(seg.resolve())
        elif require_seg:
            raise FileNotFoundError(f"case folder {case_dir} has no mask {case}_seg.nii.gz")
        items.append(item)
    if not items:
        raise ValueError(
            f"no BraTS case found in {path}: expected <case>/<case>_{modality}.nii.gz folders "
            "or a Decathlon Task01 folder (dataset.json, imagesTr/, labelsTr/)."
        )
    return items


def build_chaos_datalist(root: str | os.PathLike, require_seg: bool = True) -> list[dict]:
    """
    List the cases of a CHAOS folder in the NIfTI release layout: ``image_<N>.nii.gz`` and ``label_<N>.nii.gz``.

    ``image_<N>`` may also be a DICOM series folder (the raw CHAOS release), read later by ITK.

    Args:
        root: dataset folder.
        require_seg: raise when a case has no ``label_<N>`` (otherwise such items have no ``"seg"``).

    Returns:
        items ``{"image": path, "seg": path, "case": "<N>"}``, sorted by the patient number.

    Raises:
        FileNotFoundError: ``root`` does not exist, or a case lacks its mask.
        ValueError: no ``image_<N>`` in ``root``.

    Example::

        >>> items = build_chaos_datalist("../shared/data/chaos_t2spir")  # doctest: +SKIP
        >>> items[0]["case"]  # doctest: +SKIP
        '1'
    """
    path = _check_root(root)
    pattern = re.compile(r"^image_(\d+)(\.nii\.gz|\.nii)?$")
    items = []
    for entry in path.iterdir():
        m = pattern.match(entry.name)
        if m is None or (m.group(2) is None and not entry.is_dir()):
            continue
        case = m.group(1)
        item = {"image": str(entry.resolve()), "case": case}
        seg = _find_nifti(path, f"label_{case}")
        if seg is None and (path / f"label_{case}").is_dir():
            seg = path / f"label_{case}"
        if seg is not None:
            item["seg"] = str(seg.resolve())
        elif require_seg:
            raise FileNotFoundError(f"CHAOS case {case} in {path} has no label_{case}.nii.gz")
        items.append(item)
    if not items:
        raise ValueError(f"no CHAOS case found in {path}: expected image_<N>.nii.gz and label_<N>.nii.gz files.")
    return sorted(items, key=lambda it: int(it["case"]))


def split_cases(
    items: Sequence[Mapping], val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0
) -> dict[str, list[dict]]:
    """
    Deterministic case-level split: every item of one case (patient) lands in the same set.

    Cases are sorted, shuffled with ``numpy.random.default_rng(seed)``, and cut into test
    (``round(test_fraction * n)``, at least one when the fraction is positive), validation (likewise) and
    training (the rest).

    Args:
        items: datalist items with a ``"case"`` key.
        val_fraction: fraction of cases for validation, in [0, 1).
        test_fraction: fraction of cases for testing, in [0, 1).
        seed: shuffling seed.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}`` (copies of the items, input order kept).

    Raises:
        ValueError: bad fractions, an item without ``"case"``, or too few cases to give training one case.

    Example::

        >>> items = [{"image": f"{i}.nii.gz", "case": str(i)} for i in range(10)]
        >>> {k: len(v) for k, v in split_cases(items, 0.1, 0.2, seed=0).items()}
        {'training': 7, 'validation': 1, 'test': 2}
    """
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {frac}.")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}.")
    for i, item in enumerate(items):
        if "case" not in item:
            raise ValueError(f"datalist item {i} has no 'case' key (needed to keep a patient in one set): {item!r}")
    cases = sorted({str(item["case"]) for item in items})
    n = len(cases)
    n_test = max(1, round(test_fraction * n)) if test_fraction > 0 else 0
    n_val = max(1, round(val_fraction * n)) if val_fraction > 0 else 0
    if n - n_test - n_val < 1:
        raise ValueError(
            f"{n} cases cannot be split into {n_test} test + {n_val} validation cases and leave one for training."
        )
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [cases[i] for i in order]
    assignment = {c: "test" for c in shuffled[:n_test]}
    assignment.update({c: "validation" for c in shuffled[n_test : n_test + n_val]})
    assignment.update({c: "training" for c in shuffled[n_test + n_val :]})
    splits: dict[str, list[dict]] = {k: [] for k in SPLIT_KEYS}
    for item in items:
        splits[assignment[str(item["case"])]].append(dict(item))
    return splits


def write_datalist(
    path: str | os.PathLike, splits: Mapping[str, Sequence[Mapping]], relative_to: str | os.PathLike | None = None
) -> Path:
    """
    Write a MONAI (Decathlon-format) datalist JSON: ``{"training": [...], "validation": [...], "test": [...]}``.

    Args:
        path: output JSON file (parent folders are created).
        splits: split name to items, e.g. from :py:func:`split_cases`.
        relative_to: write ``image`` / ``seg`` paths relative to this folder (``None``: as given).

    Returns:
        the written path.

    Raises:
        ValueError: ``splits`` is not a mapping of lists of dicts.

    Example::

        >>> splits = {"training": [{"image": "/data/a.nii.gz", "case": "a"}]}
        >>> write_datalist("/tmp/datalist.json", splits)  # doctest: +SKIP
    """
    if not isinstance(splits, Mapping):
        raise ValueError(f"splits must map split names to lists of items, got {type(splits).__name__}.")
    out: dict[str, list] = {}
    for name, items in splits.items():
        if not isinstance(items, Sequence) or isinstance(items, str):
            raise ValueError(f"split '{name}' must be a list of items, got {type(items).__name__}.")
        rows = []
        for item in items:
            if not isinstance(item, Mapping):
                raise ValueError(f"split '{name}' holds a non-dict item: {item!r}")
            row = dict(item)
            if relative_to is not None:
                for key in ("image", "seg"):
                    if isinstance(row.get(key), str):
                        row[key] = os.path.relpath(row[key], relative_to)
            rows.append(row)
        out[str(name)] = rows
    return write_text_atomic(path, json.dumps(out, indent=2))


def load_datalist(
    path: str | os.PathLike, base_dir: str | os.PathLike | None = None, check_files: bool = True
) -> dict[str, list[dict]]:
    """
    Load a datalist JSON written by :py:func:`write_datalist` (or any MONAI Decathlon-format datalist).

    Relative ``image`` / ``seg`` / ``label`` (Decathlon) paths are resolved against ``base_dir`` (default: the
    JSON's folder); Decathlon ``"label"`` entries are renamed ``"seg"`` and plain-path ``"test"`` entries
    become ``{"image": path}``.

    Args:
        path: the JSON file.
        base_dir: folder that relative paths are relative to.
        check_files: verify that every named file exists.

    Returns:
        split name to list of items with absolute paths.

    Raises:
        FileNotFoundError: the JSON, or a file it names, does not exist (the split, item and file are named).
        ValueError: the JSON is not a datalist.

    Example::

        >>> splits = load_datalist("/work/cache/brats/datalist.json")  # doctest: +SKIP
        >>> sorted(splits)  # doctest: +SKIP
        ['test', 'training', 'validation']
    """
    json_path = Path(path)
    if not json_path.is_file():
        raise FileNotFoundError(f"datalist not found: {json_path}")
    try:
        with open(json_path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"datalist {json_path} is not valid JSON: {err}") from None
    if not isinstance(raw, Mapping):
        raise ValueError(f"datalist {json_path} must hold a JSON object of splits.")
    base = Path(base_dir) if base_dir is not None else json_path.parent
    splits: dict[str, list[dict]] = {}
    for name, entries in raw.items():
        if not isinstance(entries, list):
            continue  # Decathlon dataset.json also holds descriptive fields (name, labels, ...)
        rows = []
        for i, entry in enumerate(entries):
            row = {"image": entry} if isinstance(entry, str) else dict(entry) if isinstance(entry, Mapping) else None
            if row is None:
                raise ValueError(f"datalist {json_path}: split '{name}' item {i} is neither a path nor a dict.")
            if "label" in row and "seg" not in row and isinstance(row["label"], str):
                row["seg"] = row.pop("label")
            for key in ("image", "seg"):
                value = row.get(key)
                if not isinstance(value, str):
                    continue
                full = Path(value) if os.path.isabs(value) else (base / value)
                full = Path(os.path.normpath(full))
                if check_files and not full.exists():
                    raise FileNotFoundError(
                        f"datalist {json_path}: split '{name}' item {i} (case {row.get('case', '?')}) "
                        f"names a missing {key} file: {full}"
                    )
                row[key] = str(full)
            rows.append(row)
        splits[name] = rows
    if not splits:
        raise ValueError(f"datalist {json_path} has no list of items (expected keys like {SPLIT_KEYS}).")
    return splits
