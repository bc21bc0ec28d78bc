# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""What a segmentation run reads: the volumes to segment, the bundle folder, the trained weights and their
intensity profile."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from monai_wsss.bundle.options import config_files_from_argv
from monai_wsss.data import TaskPreset, get_task, load_datalist

__all__ = [
    "INTENSITY_PROFILE_NAME",
    "check_component_size",
    "intensity_profile_beside",
    "list_volumes",
    "locate_bundle_root",
    "load_weights",
]

logger = logging.getLogger(__name__)

_NIFTI = (".nii.gz", ".nii")


def _nifti_stem(path: Path) -> str | None:
    for ext in _NIFTI:
        if path.name.endswith(ext):
            return path.name[: -len(ext)]
    return None


def _single_volume(image: str | os.PathLike, seg: str | os.PathLike | None) -> list[dict]:
    path = Path(image)
    if not path.exists():
        raise FileNotFoundError(f"image not found: {path}")
    if path.is_file() and _nifti_stem(path) is None:
        raise ValueError(f"image must be a NIfTI file (.nii / .nii.gz) or a DICOM series folder, got {path}")
    item = {"image": str(path.resolve()), "case": _nifti_stem(path) or path.name}
    if seg is not None:
        seg_path = Path(seg)
        if not seg_path.exists():
            raise FileNotFoundError(f"seg (ground-truth mask) not found: {seg_path}")
        item["seg"] = str(seg_path.resolve())
    return [item]


def list_volumes(
    dataset_dir: str | os.PathLike | None = None,
    image: str | os.PathLike | None = None,
    seg: str | os.PathLike | None = None,
    task: str | TaskPreset = "brats",
    split: str | None = None,
    modality: str | None = None,
    require_seg: bool = False,
) -> list[dict]:
    """
    The volumes a segmentation run works on, as datalist items ``{"image": path, "case": id[, "seg": path]}``.

    Exactly one source is given:

    - ``dataset_dir`` a folder: every case in it, read by the task's layout in the task registry (``"brats"``:
      BraTS ``<case>/<case>_<modality>.nii.gz`` or Decathlon Task01 ``dataset.json`` + ``imagesTr/``; ``"chaos"``:
      ``image_<N>.nii.gz`` + ``label_<N>.nii.gz``); masks are picked up when present. A folder the layout names
      a volume (a CHAOS ``image_<N>`` DICOM series) is one volume.
    - ``dataset_dir`` a datalist JSON (e.g. the ``datalist.json`` a training run writes): the items of ``split``
      (default ``"test"``).
    - ``dataset_dir`` or ``image`` a single NIfTI file (``seg`` optionally gives its mask).

    Args:
        dataset_dir: dataset folder, datalist JSON or NIfTI file.
        image: a single NIfTI file (alternative to ``dataset_dir``).
        seg: ground-truth mask of a single file.
        task: a task name in :py:data:`~monai_wsss.data.TASKS` or a preset (folder layout).
        split: split of a datalist JSON (default ``"test"``); only for datalists.
        modality: image modality of the layout (BraTS: ``flair``, ``t1``, ``t1ce``, ``t2``; CHAOS: ``t2spir``);
            default: the layout's first.
        require_seg: every item must have a ground-truth mask (evaluation).

    Returns:
        list of items, in the folder's / datalist's order.

    Raises:
        ValueError: no source or two sources, an unknown task or a modality its layout does not hold, ``split`` or
            ``seg`` given where they do not apply, an empty split, a file that is not NIfTI / JSON, or a case without mask when ``require_seg``.
        FileNotFoundError: a path that does not exist (and the errors of the dataset readers).

    Example::

        items = list_volumes("../shared/data/brats2018", task="brats")       # a folder of cases
        items = list_volumes(image="BraTS_case_flair.nii.gz")                 # one volume
        items = list_volumes("outputs/train_diffusion/datalist.json", split="test")
    """
    preset = get_task(task)
    if dataset_dir is None and image is None:
        raise ValueError(
            "no input volumes: pass --dataset_dir <folder | datalist.json | NIfTI file> or --image <NIfTI file>."
        )
    if dataset_dir is not None and image is not None:
        raise ValueError(f"pass either dataset_dir ({dataset_dir}) or image ({image}), not both.")
    source = Path(dataset_dir if dataset_dir is not None else image)  # type: ignore[arg-type]
    if not source.exists():
        name = "dataset_dir" if dataset_dir is not None else "image"
        raise FileNotFoundError(f"{name} not found: {source}")
    if source.is_file() and source.name.endswith(".json"):
        kind = "datalist"
    elif source.is_dir() and image is None and not (preset.layout is not None and preset.layout.is_volume_folder(source)):
        kind = "folder"
    else:
        kind = "single"  # a NIfTI file (or a DICOM series folder given as --image)
    if split is not None and kind != "datalist":
        raise ValueError(f"split={split!r} applies to a datalist JSON only, but the input is {source}.")
    if seg is not None and kind != "single":
        raise ValueError(f"seg={seg} applies to a single image only, but the input is {source}.")

    if kind == "datalist":
        splits = load_datalist(source)
        name = "test" if split is None else split
        if name not in splits:
            raise ValueError(f"datalist {source} has no split {name!r} (splits: {sorted(splits)}); pass --datalist_split.")
        items = [dict(it) for it in splits[name]]
        if not items:
            raise ValueError(f"split {name!r} of datalist {source} is empty.")
        for i, item in enumerate(items):
            if "image" not in item:
                raise ValueError(f"datalist {source}: split {name!r} item {i} has no 'image'.")
            item.setdefault("case", _nifti_stem(Path(item["image"])) or Path(item["image"]).name)
    elif kind == "folder":
        items = preset.list_cases(source, require_seg=False, modality=modality)
    else:
        items = _single_volume(source, seg)

    if require_seg:
        missing = [str(it.get("case", it["image"])) for it in items if not it.get("seg")]
        if missing:
            raise ValueError(
                f"evaluation needs a ground-truth mask for every volume; none for case(s) {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''} (pass --seg for a single image, or use inference.json)."
            )
    return items


def check_component_size(items: Sequence[Mapping], min_component_size: int) -> int:
    """
    Refuse, before any compute, a ``min_component_size`` that no component of some scan can reach: one at least
    as large as a scan's voxel count would empty its mask. The sizes come from the NIfTI headers (nothing is read
    beyond them); scans in other formats (DICOM series) are checked when they are segmented, not here.

    Args:
        items: the run's items with ``image`` paths.
        min_component_size: the option's value (voxels).

    Returns:
        ``min_component_size``.

    Raises:
        ValueError: naming the option, its value and the smallest scan.

    Example::

        "min_size": "$monai_wsss.apps.check_component_size(@run_items, @min_component_size)"
    """
    size = int(min_component_size)
    smallest: tuple[int, str] | None = None
    for item in items:
        path = str(item.get("image", ""))
        if not path.endswith((".nii", ".nii.gz")) or not os.path.isfile(path):
            continue
        shape = nib.load(path).shape[:3]
        voxels = int(np.prod(shape))
        if smallest is None or voxels < smallest[0]:
            smallest = (voxels, path)
    if smallest is not None and size >= smallest[0]:
        raise ValueError(
            f"--min_component_size {size}: {smallest[1]} has only {smallest[0]} voxels, so every mask component would "
            "be dropped; use a smaller value (0 keeps every component)."
        )
    return size


def _config_file_from_argv(argv: Sequence[str]) -> Path | None:
    """The first ``--config_file`` path of a ``python -m monai.bundle run`` command line (lists allowed)."""
    files = config_files_from_argv(argv)
    return files[0] if files else None


def _source_checkout() -> Path | None:
    """The repository root when the package is imported from a source checkout (an installed wheel has none)."""
    root = Path(__file__).resolve().parents[2]  # <root>/monai_wsss/apps/inputs.py
    return root if (root / "setup.cfg").is_file() and (root / "bundles").is_dir() else None


def locate_bundle_root(name: str, argv: Sequence[str] | None = None) -> str:
    """
    The folder of a bundle of this repository, so that ``python -m monai.bundle run --config_file
    bundles/<name>/configs/inference.json`` finds ``models/`` wherever it is started from.

    In order: the bundle of the ``--config_file`` on the command line (``<bundle>/configs/*.json``); the working
    directory when it is a bundle (``configs/`` inside, the MONAI model-zoo convention); the repository copy
    ``bundles/<name>`` when the package runs from a source checkout. ``--bundle_root`` on the command line
    overrides all of this, as in every MONAI bundle (this function is then not called).

    Args:
        name: the bundle's folder name, e.g. ``"brats_cdm"``.
        argv: command line to read ``--config_file`` from (default ``sys.argv``).

    Returns:
        the bundle folder as a string.

    Raises:
        FileNotFoundError: none of the above holds (e.g. an installed package run outside its bundle): the
            message says to pass ``--bundle_root``.

    Example::

        "bundle_root": "$monai_wsss.apps.locate_bundle_root('brats_cdm')"
    """
    config_file = _config_file_from_argv(sys.argv if argv is None else argv)
    if config_file is not None and config_file.parent.name == "configs" and config_file.parent.is_dir():
        return str(config_file.parent.parent)
    if Path("configs").is_dir():
        return "."
    checkout = _source_checkout()
    if checkout is not None and (checkout / "bundles" / name / "configs").is_dir():
        return str(checkout / "bundles" / name)
    raise FileNotFoundError(
        f"cannot find the bundle folder of {name!r}: no --config_file inside a <bundle>/configs/ folder, the working "
        f"directory {Path.cwd()} has no configs/, and monai_wsss is not run from a source checkout holding "
        f"bundles/{name}; pass --bundle_root <the bundle folder>."
    )


def _state_dict_of(obj: object, path: Path) -> dict:
    """The network weights inside a checkpoint: a bare state dict, or one under a usual key."""
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict.")
    for key in ("model", "network", "state_dict", "net"):
        if key in obj and isinstance(obj[key], dict):
            return obj[key]
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise ValueError(f"checkpoint {path} has no network weights (keys: {sorted(obj)[:8]}).")


def load_weights(
    network: torch.nn.Module,
    path: str | os.PathLike,
    device: torch.device | str | None = None,
    name: str = "network",
) -> torch.nn.Module:
    """
    Load trained weights into a network built from a bundle's ``network_def`` and return it in eval mode.

    Accepts what MONAI's ``CheckpointSaver`` writes (a bare state dict for one saved object, or a dict with
    ``"model"`` / ``"network"``). A checkpoint that does not fit the network raises an error naming the file,
    and a class-embedding mismatch says whether the weights were trained with a null class (needed by the
    classifier-free ``cfg`` method).

    Args:
        network: the network to fill.
        path: checkpoint file (``torch.load(..., weights_only=True)``).
        device: device to load onto (default: CPU).
        name: what the network is, for error messages (``"diffusion model"``, ``"noisy classifier"``).

    Returns:
        ``network`` on ``device``, in eval mode.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a checkpoint of a network of this architecture, or holds NaN / infinite weights.

    Example::

        net = load_weights(ConditionalDiffusionUNet(...), "bundles/brats_cdm/models/diffusion.pt", "cpu")
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"{name} weights not found: {file} (train them with the bundle's train config, or pass the path "
            "with --model_path / --classifier_path)."
        )
    device = torch.device("cpu") if device is None else torch.device(device)
    try:
        obj = torch.load(file, map_location=device, weights_only=True)
    except Exception as err:  # a corrupt or foreign file: one line naming it
        raise ValueError(f"cannot read {name} checkpoint {file}: {type(err).__name__}: {err}") from None
    state = _state_dict_of(obj, file)
    # NaN / inf weights (a diverged training) would run the whole diffusion and fail only at thresholding
    bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(
            f"{name} checkpoint {file} has NaN or infinite weights in {len(bad)} tensor(s) ({', '.join(bad[:3])}"
            f"{' ...' if len(bad) > 3 else ''}): the training diverged or the file is damaged; use another checkpoint."
        )
    own = network.state_dict()
    key = "class_embedding.weight"
    if key in own and key in state and own[key].shape[0] != state[key].shape[0]:
        n_net, n_ckpt = own[key].shape[0], state[key].shape[0]
        null_net = getattr(network, "null_class", None) is not None
        raise ValueError(
            f"{name} checkpoint {file} has {n_ckpt} class embeddings but the network has {n_net} "
            f"(null_class={'true' if null_net else 'false'}): the weights were trained "
            f"{'without' if n_ckpt < n_net else 'with'} a null class; set --null_class "
            f"{'false' if n_ckpt < n_net else 'true'} to match (method 'cfg' needs weights trained with one)."
        )
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(line.strip() for line in str(err).strip().splitlines()[1:3])[:400]
        raise ValueError(
            f"{name} checkpoint {file} does not fit {type(network).__name__} as configured ({detail} ...); "
            "the network definition must match the one it was trained with."
        ) from None
    return network.to(device).eval()


#: file name of a model's intensity profile, beside its weights (written by the bundles' train.json)
INTENSITY_PROFILE_NAME = "intensity_profile.json"


def intensity_profile_beside(model_path: str | os.PathLike | None) -> str | None:
    """
    The intensity profile (:py:func:`~monai_wsss.data.write_intensity_profile`) that sits beside a model's weights,
    for the inference's check that each scan looks like the training scans
    (:py:class:`~monai_wsss.transforms.CheckIntensityProfiled`), or ``None`` (with a warning) when there is none:
    weights trained elsewhere run unchecked rather than refused.

    Args:
        model_path: the weights' path (``None``: no check).

    Returns:
        the profile's path, or ``None``.
    """
    if model_path is None:
        return None
    profile = Path(model_path).parent / INTENSITY_PROFILE_NAME
    if not profile.is_file():
        logger.warning(
            f"no {INTENSITY_PROFILE_NAME} beside {model_path}: scans are not compared with the model's training scans "
            "(train.json writes it; or monai_wsss.data.write_intensity_profile)"
        )
        return None
    return str(profile)
