# Copyright (c) monai_wsss contributors
# Licensed under the Apache License, Version 2.0
"""The cached volume -> weakly labelled 2D slice dataset (the tasks it reads are in :py:mod:`monai_wsss.data.tasks`)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from monai.data import Dataset, PersistentDataset
from monai.transforms import AsDiscreted, Compose, MapTransform, Orientationd, Transform

from monai_wsss.data.slice_labels import UNLABELLED, SliceLabels
from monai_wsss.data.tasks import TaskPreset, get_task
from monai_wsss.transforms.intensity import ScaleIntensityNonzeroPercentilesd
from monai_wsss.transforms.io import LoadVolumed
from monai_wsss.transforms.model_space import model_space_transform
from monai_wsss.transforms.slicing import SliceVolumed, stack_neighbour_slices
from monai_wsss.transforms.validation import ValidateVolumed
from monai_wsss.transforms.weak_label import MapTargetLabelsd, WeakSliceLabeld
from monai_wsss.utils.errors import root_error

__all__ = [
    "ReadableErrorsCompose",
    "SLICE_SPLITS",
    "build_slice_dataset",
    "require_slice_labels",
    "orientation_steps",
    "volume_preprocess",
    "volume_to_slices",
]

#: ``split`` values of :py:func:`build_slice_dataset`
SLICE_SPLITS = ("train", "eval", "all")

# bump when the cached slice format changes, so old caches are not reused
_CACHE_VERSION = "1"


class ReadableErrorsCompose(Compose):
    """
    A MONAI ``Compose`` that re-raises bad-input errors (``ValueError``, ``FileNotFoundError``) of its transforms
    as they are, instead of nested ``RuntimeError("applying transform ...")`` wrappers, so a caller sees
    (and can catch) the error naming the file. Other errors keep MONAI's wrapping.
    """

    def __call__(self, input_, start=0, end=None, threading=False, lazy=None):
        try:
            return super().__call__(input_, start=start, end=end, threading=threading, lazy=lazy)
        except RuntimeError as err:
            root = root_error(err)
            if root is err or not isinstance(root, (ValueError, FileNotFoundError)):
                raise
            raise root.with_traceback(None) from None


def orientation_steps(keys: Sequence[str], task: str | TaskPreset) -> list:
    """
    The reorientation of a task's scans after loading: MONAI's ``Orientationd`` to ``task.orientation`` (a
    permutation and flips of the array axes, no resampling), or nothing for a task without one. Training,
    pseudo-masks, slice labels and inference all call it, so that a slice index means the same anatomical
    slice everywhere.

    Args:
        keys: keys of the loaded images (missing keys are skipped).
        task: task name or preset.

    Returns:
        a list of zero or one transform.

    Example::

        >>> [type(t).__name__ for t in orientation_steps(["image", "seg"], "brats")]
        ['Orientationd']
    """
    preset = get_task(task)
    if preset.orientation is None:
        return []
    return [Orientationd(list(keys), axcodes=preset.orientation, labels=None, allow_missing_keys=True)]


def volume_preprocess(task: str | TaskPreset = "brats", image_key: str = "image", seg_key: str = "seg") -> Compose:
    """
    Compose loading and normalising one case: ``{"image": path, "seg": path}`` to
    ``{"image": (1, H, W, D) in [0, 1], "seg": (1, H, W, D) binary}``, MetaTensors with the source affine.

    Steps: :py:class:`~monai_wsss.transforms.io.LoadVolumed` (NiBabel / ITK, so a DICOM series folder works),
    :py:class:`~monai_wsss.transforms.validation.ValidateVolumed` (3D, no NaN, same shape and affine),
    MONAI's ``Orientationd`` to the task's ``orientation`` (see :py:func:`orientation_steps`),
    :py:class:`~monai_wsss.transforms.weak_label.MapTargetLabelsd` (task label mapping) and
    :py:class:`~monai_wsss.transforms.intensity.ScaleIntensityNonzeroPercentilesd`. The mask is optional.

    Args:
        task: task name in :py:data:`~monai_wsss.data.TASKS` or a :py:class:`TaskPreset`.
        image_key: key of the image path.
        seg_key: key of the mask path.

    Returns:
        a :py:class:`ReadableErrorsCompose` (a MONAI ``Compose``).

    Raises:
        ValueError: unknown task (at build time); at call time, see the steps above (raised as themselves,
            naming the file, not wrapped in MONAI's ``RuntimeError``).

    Example::

        >>> pre = volume_preprocess("brats")
        >>> # pre({"image": ".../case_flair.nii.gz", "seg": ".../case_seg.nii.gz"})["image"].shape -> (1, 240, 240, 155)
    """
    preset = get_task(task)
    return ReadableErrorsCompose(
        [
            LoadVolumed([image_key, seg_key], channel=preset.image_channel, allow_missing_keys=True),
            ValidateVolumed(image_key=image_key, seg_key=seg_key, spatial_dims=3),
            *orientation_steps([image_key, seg_key], preset),
            MapTargetLabelsd(
                seg_key,
                target_labels=preset.target_labels,
                allowed_labels=preset.allowed_labels,
                allow_missing_keys=True,
            ),
            ScaleIntensityNonzeroPercentilesd(image_key, lower=preset.lower_percentile, upper=preset.upper_percentile),
        ]
    )


class _RequireKeysd(MapTransform):
    """Fail early, naming the case, when an item lacks a key the slice dataset needs."""

    def __call__(self, data):
        for key in self.keys:
            if key not in data:
                raise ValueError(f"case {data.get('case', '?')} has no '{key}' entry (keys: {list(data)}).")
        return data


def volume_to_slices(
    task: str | TaskPreset = "brats",
    spatial_size: Sequence[int] | int = (64, 64),
    extra_mask_keys: Sequence[str] = (),
) -> Compose:
    """
    Compose turning one case ``{"image": path, "seg": path, "case": id}`` into a list of model-space slice dicts.

    Each slice dict holds ``image`` (1, h, w) in [-1, 1], ``seg`` (1, h, w) binary, ``label`` (0/1, from the
    source-resolution mask), ``ambiguous`` (bool), ``slice_index``, ``body_fraction`` (non-zero fraction of the
    source slice), ``target_fraction`` and every other key of the item (``case`` ...). Nothing is filtered
    here; :py:func:`build_slice_dataset` filters per split. Image and mask are MetaTensors whose
    ``applied_operations`` let :py:func:`~monai_wsss.transforms.model_space.invert_model_space` map outputs back
    to the source slice.

    Args:
        task: task name or preset.
        spatial_size: model-space size.
        extra_mask_keys: keys of further binary masks of the case (paths, e.g. ``"pseudo"``: the pseudo-masks of
            :py:mod:`monai_wsss.apps.pseudo_masks`), loaded, checked against the image (shape, affine), sliced and
            moved to model space like ``seg``. The weak label always comes from ``seg``.

    Returns:
        a :py:class:`ReadableErrorsCompose` (its output is a list).

    Example::

        >>> to_slices = volume_to_slices("brats", (64, 64))
        >>> # to_slices(item) -> 155 dicts for a BraTS case
    """
    preset = get_task(task)
    extra = [str(k) for k in extra_mask_keys]
    if {"image", "seg"} & set(extra):
        raise ValueError(f"extra_mask_keys must not repeat 'image' or 'seg', got {extra}.")
    extra_steps: list = []
    if extra:
        extra_steps = [LoadVolumed(extra, channel=preset.image_channel), *orientation_steps(extra, preset)]
        extra_steps += [ValidateVolumed(image_key="image", seg_key=k, spatial_dims=3) for k in extra]
        extra_steps += [AsDiscreted(extra, threshold=0.5)]
    return ReadableErrorsCompose(
        [
            _RequireKeysd(["image", *extra]),
            volume_preprocess(preset),
            *extra_steps,
            SliceVolumed(
                ["image", "seg", *extra],
                slice_axis=preset.slice_axis,
                foreground_key="image",
                fraction_key="body_fraction",
                allow_missing_keys=True,
            ),
            WeakSliceLabeld(
                "seg",
                fraction_key="target_fraction",
                min_pixels=preset.positive_min_pixels,
                min_fraction=preset.positive_min_fraction,
                allow_missing_keys=True,
            ),
            model_space_transform(spatial_size, seg_keys=["seg", *extra], allow_missing_keys=True),
        ]
    )


def _identity(x):
    return x


class _UnwrappedErrors(torch.utils.data.Dataset):
    """Re-raise a case's bad-input error itself (naming the file), not MONAI's nested transform wrappers."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except RuntimeError as err:
            root = root_error(err)
            if root is err:
                raise
            raise root.with_traceback(None) from None


_SCALAR_KEYS = {"label": torch.int64, "ambiguous": torch.bool, "slice_index": torch.int64,
                "body_fraction": torch.float32, "target_fraction": torch.float32}
# the mask-derived scalars of a slice without mask: unlabelled until a labels file names it
_NO_MASK = {"label": UNLABELLED, "ambiguous": False, "target_fraction": float("nan")}


class _CaseToPackedSlices(Transform):
    """
    One case to its slices packed as stacked plain tensors: compact and fast to ``torch.load``
    (a cached list of per-slice MetaTensors loads slower than re-reading the NIfTI).
    A ``Transform`` subclass so that ``PersistentDataset`` treats it as deterministic and caches it.
    """

    def __init__(self, preset: TaskPreset, spatial_size: tuple[int, int], extra_mask_keys: Sequence[str] = ()) -> None:
        self.to_slices = volume_to_slices(preset, spatial_size, extra_mask_keys)
        self.arrays = ("image", "seg", *extra_mask_keys)

    def __call__(self, item: Mapping) -> dict:
        slices = self.to_slices(dict(item))
        if not slices:
            raise ValueError(f"case {item.get('case', '?')} produced no slice.")
        arrays = [k for k in self.arrays if k in slices[0]]  # no "seg" for a case known by its labels only
        packed = {k: v for k, v in slices[0].items() if k not in _SCALAR_KEYS and k not in self.arrays}
        packed["_arrays"] = arrays
        for key in arrays:
            packed[key] = torch.stack([torch.as_tensor(s[key]).as_subclass(torch.Tensor) for s in slices]).float()
        for key, dtype in _SCALAR_KEYS.items():
            packed[key] = torch.tensor([s[key] if key in s else _NO_MASK[key] for s in slices], dtype=dtype)
        return packed


def _unpack(packed: Mapping, context_slices: int = 0) -> list[dict]:
    arrays = packed.get("_arrays", ["image", "seg"])
    others = {k: v for k, v in packed.items() if k not in _SCALAR_KEYS and k not in arrays and k != "_arrays"}
    values = {key: packed[key].tolist() for key in _SCALAR_KEYS}
    # every slice of the case is packed in slice order, so its neighbours are the adjacent rows
    stacked = {**packed, "image": stack_neighbour_slices(packed["image"], context_slices)}
    out = []
    for i in range(packed["image"].shape[0]):
        item = dict(others)
        for key in arrays:
            item[key] = stacked[key][i]
        for key in _SCALAR_KEYS:
            item[key] = values[key][i]
        out.append(item)
    return out


def _keep(item: Mapping, preset: TaskPreset, split: str) -> bool:
    if split == "all":
        return True
    if item["label"] == UNLABELLED:  # no label: nothing to train on or to validate against
        return False
    if item["body_fraction"] <= 0 or item["body_fraction"] < preset.min_body_fraction:
        return False
    if split == "train":
        return not item["ambiguous"]
    if preset.eval_min_fraction is not None:
        return not 0 < item["target_fraction"] < preset.eval_min_fraction
    return True


# preset fields applied after caching (changing them reuses the cache)
_FILTER_ONLY_FIELDS = ("min_body_fraction", "eval_min_fraction")


def _cache_subdir(cache_dir: str | os.PathLike, preset: TaskPreset, spatial_size, extra_mask_keys=()) -> Path:
    # cached slices depend on the preset and the model size, except the fields used only to filter slices
    fields = {k: v for k, v in preset.slice_fields().items() if k not in _FILTER_ONLY_FIELDS}
    config = {"version": _CACHE_VERSION, "preset": fields, "spatial_size": list(spatial_size)}
    if extra_mask_keys:  # keeps the digest of existing caches unchanged
        config["extra_mask_keys"] = list(extra_mask_keys)
    digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{preset.name}_{'x'.join(map(str, spatial_size))}_{digest}"


def build_slice_dataset(
    items: Sequence[Mapping],
    task: str | TaskPreset = "brats",
    spatial_size: Sequence[int] | int = (64, 64),
    cache_dir: str | os.PathLike | None = None,
    split: str = "train",
    transform: Callable | None = None,
    num_workers: int = 0,
    extra_mask_keys: Sequence[str] = (),
    labels: SliceLabels | None = None,
    context_slices: int = 0,
) -> Dataset:
    """
    Build the weakly labelled 2D slice dataset of a list of cases.

    Every case is read once (NiBabel / ITK), normalised, sliced, labelled and moved to model space with
    :py:func:`volume_to_slices`; with ``cache_dir`` the per-case slices are stored by MONAI's
    ``PersistentDataset`` (keyed on the item and on the preset and size), so a later run does not re-read the
    NIfTI files. The returned dataset holds all slices in memory: no epoch re-reads anything. The cache is
    keyed on the item's paths, not on file contents: delete the cache folder after replacing files in place.

    Splits: ``"train"`` drops ambiguous slices and slices whose brain / body covers less than
    ``min_body_fraction``; ``"eval"`` drops only the latter (ambiguous slices keep ``label = 1``) and, when the
    preset sets ``eval_min_fraction`` (CHAOS), slices whose target covers less than that fraction;
    ``"all"`` keeps every slice.

    Args:
        items: datalist items ``{"image": path, "seg": path, "case": id}``.
        task: task name in :py:data:`~monai_wsss.data.TASKS` or a :py:class:`TaskPreset`.
        spatial_size: model-space size (int or (h, w)).
        cache_dir: folder of the persistent per-case cache (``None``: in memory only).
        split: ``"train"``, ``"eval"`` or ``"all"``.
        transform: optional per-slice transform applied on access (e.g. random augmentation).
        num_workers: worker processes reading cases (0: in this process).
        extra_mask_keys: further binary masks of each item to slice alongside ``seg`` (e.g. ``("pseudo",)``,
            pseudo-masks for a second-stage segmentation network); see :py:func:`volume_to_slices`.
        labels: the slices' image-level labels from a labels file (:py:class:`~monai_wsss.data.SliceLabels`). With
            them the items need no ``seg``: every slice takes its label from the file and slices it does not
            name are dropped from ``"train"`` and ``"eval"`` (``"all"`` keeps them with ``label = -1``). Without
            them the labels come from each item's ``seg`` by the task's rule (0.2 % of the slice: 1, none: 0, in
            between: ambiguous, dropped from training).
        context_slices: 2.5D input: ``image`` holds the slice with its ``k`` neighbours on either side of the same
            scan as ``2k + 1`` channels (slices ``j - k ... j + k``, the first and last slice repeated beyond the
            ends), as :py:class:`~monai_wsss.inferers.VolumeInferer` passes them with the same ``context_slices``;
            masks and labels stay those of the centre slice. The cache is the same for every ``k``.

    Returns:
        a MONAI ``Dataset`` of slice dicts: ``image`` (1, h, w) (``(2k + 1, h, w)`` with ``context_slices``) float32
        in [-1, 1], ``seg`` (1, h, w) float32 0/1, ``label`` 0/1 (int), ``slice_index`` (int), ``case`` (str), plus
        ``ambiguous`` (bool), ``body_fraction`` and ``target_fraction`` (float, of the source slice) and any other
        item key. Images are
        plain tensors (fast to collate); to invert model-space outputs per slice, use :py:func:`volume_to_slices`
        (MetaTensors) or work on volumes with ``VolumeInferer``.

    Raises:
        ValueError: unknown task or split, empty ``items``, an item without ``case`` / ``image``, an item without
            ``seg`` when no ``labels`` are given (the message names ``--labels``), a label row beyond the end of
            its scan (naming the labels file and line), and every bad-input error of :py:func:`volume_preprocess`
            (naming the file).

    Example::

        >>> from monai_wsss.data import build_brats_datalist, split_cases, build_slice_dataset
        >>> splits = split_cases(build_brats_datalist("../shared/data/brats2018"))  # doctest: +SKIP
        >>> ds = build_slice_dataset(splits["training"], "brats", cache_dir="/work/cache/slices")  # doctest: +SKIP
        >>> ds[0]["image"].shape  # doctest: +SKIP
        torch.Size([1, 64, 64])
    """
    preset = get_task(task)
    if split not in SLICE_SPLITS:
        raise ValueError(f"unknown split '{split}', expected one of {SLICE_SPLITS}.")
    size = (int(spatial_size),) * 2 if isinstance(spatial_size, int) else tuple(int(s) for s in spatial_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"spatial_size must be a positive int or (h, w), got {spatial_size}.")
    if not items:
        raise ValueError("items is empty: no case to build slices from.")
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or "case" not in item:
            raise ValueError(f"item {i} must be a dict with a 'case' key, got {item!r}.")
    if not isinstance(context_slices, int) or context_slices < 0:
        raise ValueError(f"context_slices must be an int >= 0, got {context_slices!r}.")
    require_slice_labels(items, labels)
    extra = tuple(str(k) for k in extra_mask_keys)
    per_case = Compose([_CaseToPackedSlices(preset, size, extra)])
    if cache_dir is not None:
        case_ds = PersistentDataset(
            data=[dict(it) for it in items],
            transform=per_case,
            cache_dir=_cache_subdir(cache_dir, preset, size, extra),
        )
    else:
        case_ds = Dataset(data=[dict(it) for it in items], transform=per_case)
    case_ds = _UnwrappedErrors(case_ds)
    slices: list[dict] = []
    if num_workers > 0:
        loader = torch.utils.data.DataLoader(
            case_ds, batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=_identity
        )
        case_iter = iter(loader)
    else:
        case_iter = (case_ds[i] for i in range(len(case_ds)))
    for packed in case_iter:
        case_slices = _unpack(packed, context_slices)
        if labels is not None:
            _apply_labels(case_slices, labels, str(packed["case"]))
        slices.extend(s for s in case_slices if _keep(s, preset, split))
    return Dataset(data=slices, transform=transform)


def _apply_labels(slices: list[dict], labels: SliceLabels, case: str) -> None:
    """Set each slice's ``label`` from a labels file (``ambiguous`` False: the file decides, slice by slice)."""
    values = labels.for_case(case, len(slices)).tolist()
    for s in slices:
        s["label"], s["ambiguous"] = values[s["slice_index"]], False


def require_slice_labels(items: Sequence[Mapping], labels: SliceLabels | None, what: str = "") -> None:
    """
    Refuse items that carry neither a pixel mask nor slice labels, with the message that names ``--labels``.

    Args:
        items: datalist items.
        labels: the slice labels (``None``: the labels must come from each item's ``seg`` mask).
        what: what the items are for, in the message.

    Raises:
        ValueError: ``labels`` is ``None`` and some item has no ``seg``.
    """
    if labels is not None:
        return
    missing = [str(it.get("case", it.get("image"))) for it in items if not it.get("seg")]
    if missing:
        raise ValueError(
            f"{len(missing)} {what + ' ' if what else ''}scan(s) have no pixel mask ('seg') and no slice labels were given, e.g. "
            f"{missing[:3]}: pass --labels labels.csv, a CSV with the header 'case,slice,label' (one row per "
            "labelled slice; an empty slice labels the whole scan). From masks: python -m monai_wsss.data.labels."
        )
