# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""Functions the bundle configs call about trained networks: the checkpoint to resume from, and MONAI's check of
both networks against the bundle metadata."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch

__all__ = ["latest_checkpoint", "verify_bundle_networks"]

_STEP = re.compile(r"_(epoch|iteration)=(\d+)\.pt$")


def latest_checkpoint(ckpt_dir: str | os.PathLike, prefix: str = "checkpoint", check: bool = True) -> str | None:
    """
    The newest interval checkpoint written by MONAI's ``CheckpointSaver`` (``<prefix>_epoch=N.pt`` or
    ``<prefix>_iteration=N.pt``) in a folder, to resume a run from.

    ignite's ``Checkpoint`` removes the oldest file *before* writing the new one, so the bundles keep two
    (``n_saved=2``): a run killed while saving still leaves the previous complete checkpoint. An unreadable
    file (truncated, or foreign) is skipped with ``check``, with a warning, and the previous checkpoint is returned.

    Args:
        ckpt_dir: folder of the checkpoints (may not exist yet).
        prefix: file name prefix (``CheckpointSaver`` names interval checkpoints ``checkpoint_epoch=N.pt``).
        check: load each candidate (``weights_only=True``) and skip unreadable ones.

    Returns:
        the path of the readable checkpoint with the highest step number, or ``None`` when there is none
        (a fresh run).

    Example::

        >>> latest_checkpoint("/nonexistent") is None
        True
    """
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return None
    found = []
    for path in folder.glob(f"{prefix}_*.pt"):
        match = _STEP.search(path.name)
        if match:
            found.append((int(match.group(2)), path.stat().st_mtime, str(path)))
    for _, _, path in sorted(found, reverse=True):
        if not check:
            return path
        try:
            torch.load(path, map_location="cpu", weights_only=True)
            return path
        except Exception as err:  # a truncated or foreign file: fall back to the previous checkpoint
            warnings.warn(f"skipping unreadable checkpoint {path}: {err}", stacklevel=2)
    return None


def verify_bundle_networks(bundle_dir: str | os.PathLike, device: str | torch.device = "cpu") -> None:
    """
    Run MONAI's ``verify_net_in_out`` on the three networks of a monai_wsss bundle: the default network
    (``network_def`` of ``inference.json``, the segmenter) against ``network_data_format``, the diffusion network of
    ``train_diffusion.json`` against ``diffusion_data_format`` (with the extra forward arguments ``timesteps`` and
    ``class_labels``), and the noisy classifier of ``train_classifier.json`` against ``classifier_data_format``
    (with ``timesteps``).

    Args:
        bundle_dir: the bundle folder (holding ``configs/``).
        device: device of the check.

    Raises:
        FileNotFoundError: a config file is missing.
        ValueError: a data format is missing from ``metadata.json``, or a network's output channels or dtype differ
            from it (from ``verify_net_in_out``).

    Example::

        >>> verify_bundle_networks("bundles/brats_cdm")  # doctest: +SKIP
    """
    from monai.bundle import ConfigParser, verify_net_in_out

    configs = Path(bundle_dir) / "configs"
    meta_file = configs / "metadata.json"
    for name in ("metadata.json", "inference.json", "train_diffusion.json", "train_classifier.json"):
        if not (configs / name).is_file():
            raise FileNotFoundError(f"bundle config not found: {configs / name}")
    meta = ConfigParser.load_config_file(meta_file)
    for key in ("network_data_format", "diffusion_data_format", "classifier_data_format"):
        if key not in meta:
            raise ValueError(f"{meta_file} has no {key!r}.")
    one = torch.ones(1, dtype=torch.long, device=device)
    verify_net_in_out(net_id="network_def", meta_file=str(meta_file), config_file=str(configs / "inference.json"), device=device)
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(meta_file),
        config_file=str(configs / "train_diffusion.json"),
        device=device,
        extra_forward_args={"timesteps": one * 10, "class_labels": one},
        **{"_meta_#network_data_format": meta["diffusion_data_format"]},
    )
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(meta_file),
        config_file=str(configs / "train_classifier.json"),
        device=device,
        extra_forward_args={"timesteps": one * 10},
        **{"_meta_#network_data_format": meta["classifier_data_format"]},
    )
