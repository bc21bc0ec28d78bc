# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""Which config files of a bundle run a method: ``inference.json`` (the default network), a method's override
``inference_<method>.json`` and, for evaluation, ``evaluate.json``, stacked in that order as
``--config_file "['configs/inference.json','configs/inference_cdm.json','configs/evaluate.json']"``."""

from __future__ import annotations

import os
from pathlib import Path

from monai.bundle import ConfigParser

__all__ = ["DEFAULT_METHOD", "bundle_methods", "method_config_files", "parse_bundle_config"]

#: the method of ``configs/inference.json`` alone: the second-stage segmentation network (``network_def``)
DEFAULT_METHOD = "segmenter"


def bundle_methods(bundle_root: str | os.PathLike) -> list[str]:
    """
    The methods a bundle can run: the default and one per ``configs/inference_<method>.json``.

    Example::

        >>> bundle_methods("bundles/brats_cdm")[:3]
        ['segmenter', 'cdm', 'cfg']
    """
    configs = Path(bundle_root) / "configs"
    return [DEFAULT_METHOD] + sorted(p.stem[len("inference_"):] for p in configs.glob("inference_*.json"))


def method_config_files(bundle_root: str | os.PathLike, method: str = DEFAULT_METHOD, evaluate: bool = False) -> list[str]:
    """
    The config files that run ``method`` with a bundle, in the order ``monai.bundle run`` stacks them.

    Args:
        bundle_root: the bundle folder.
        method: ``"segmenter"`` (the default network) or a method with a ``configs/inference_<method>.json``.
        evaluate: add ``configs/evaluate.json`` (scores against the ground truth, reports, overlays).

    Returns:
        paths as strings.

    Raises:
        FileNotFoundError: the bundle has no ``configs/inference.json``.
        ValueError: a method without its config file, naming the methods the bundle has.

    Example::

        >>> [Path(f).name for f in method_config_files("bundles/brats_cdm", "cdm", evaluate=True)]
        ['inference.json', 'inference_cdm.json', 'evaluate.json']
    """
    configs = Path(bundle_root) / "configs"
    base = configs / "inference.json"
    if not base.is_file():
        raise FileNotFoundError(f"bundle {bundle_root} has no configs/inference.json.")
    files = [base]
    if method != DEFAULT_METHOD:
        override = configs / f"inference_{method}.json"
        if not override.is_file():
            raise ValueError(f"unknown method {method!r} for bundle {bundle_root}: expected one of {bundle_methods(bundle_root)}.")
        files.append(override)
    if evaluate:
        files.append(configs / "evaluate.json")
    return [str(f) for f in files]


def parse_bundle_config(
    bundle_root: str | os.PathLike, method: str = DEFAULT_METHOD, evaluate: bool = False, **overrides: object
) -> ConfigParser:
    """
    A ``ConfigParser`` of a method's stacked configs with ``overrides`` applied (``"network_def#channels"`` keys
    work), as ``monai.bundle run`` reads them, with ``bundle_root`` set.

    Example::

        parser = parse_bundle_config("bundles/brats_cdm", "cdm", dataset_dir="my_scans/")
        parser.get_parsed_content("evaluator").run()
    """
    parser = ConfigParser()
    parser.read_config(method_config_files(bundle_root, method, evaluate))
    parser["bundle_root"] = str(bundle_root)
    for key, value in overrides.items():
        parser[key] = value
    return parser
