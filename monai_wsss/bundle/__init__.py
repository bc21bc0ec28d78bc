# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""Helpers the MONAI bundles (``bundles/*/configs``) call by name; usable from Python as well."""

from monai_wsss.bundle.configs import DEFAULT_METHOD, bundle_methods, method_config_files, parse_bundle_config
from monai_wsss.bundle.handlers import ExponentialMovingAverage, SeededEvaluation, ema_copy
from monai_wsss.bundle.options import (
    OPTION_KINDS,
    RUN_ARGUMENTS,
    check_command_line,
    parse_context_slices,
    parse_option,
    parse_write_map,
)
from monai_wsss.bundle.checkpoints import latest_checkpoint, verify_bundle_networks
from monai_wsss.bundle.distributed import distributed_rank, init_distributed, release_distributed
from monai_wsss.bundle.splits import (
    attach_pseudo_masks,
    load_slice_labels,
    prepare_splits,
    pseudo_mask_datalist,
    select_slices,
)

__all__ = [
    "DEFAULT_METHOD",
    "bundle_methods",
    "method_config_files",
    "parse_bundle_config",
    "OPTION_KINDS",
    "RUN_ARGUMENTS",
    "check_command_line",
    "parse_option",
    "parse_write_map",
    "parse_context_slices",
    "ExponentialMovingAverage",
    "attach_pseudo_masks",
    "pseudo_mask_datalist",
    "SeededEvaluation",
    "distributed_rank",
    "ema_copy",
    "init_distributed",
    "latest_checkpoint",
    "load_slice_labels",
    "prepare_splits",
    "release_distributed",
    "select_slices",
    "verify_bundle_networks",
]
