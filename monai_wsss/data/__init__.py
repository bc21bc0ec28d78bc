# Copyright (c) monai_wsss contributors
# Licensed under the Apache License, Version 2.0
"""The task registry (:py:mod:`monai_wsss.data.tasks`), dataset layouts (BraTS, Decathlon Task01, CHAOS), case-level
splits, datalists, slice labels, slice datasets, synthetic data."""

from monai_wsss.data.datalist import (
    SPLIT_KEYS,
    build_brats_datalist,
    build_chaos_datalist,
    load_datalist,
    split_cases,
    write_datalist,
)
from monai_wsss.data.fail_safe import FAILED_KEY, FailSafeDataset, failure_record
from monai_wsss.data.intensity_profile import (
    PROFILE_PERCENTILE,
    PROFILE_STATISTIC,
    body_percentile,
    check_intensity_profile,
    intensity_profile,
    load_intensity_profile,
    write_intensity_profile,
)
from monai_wsss.data.tasks import MAP_THRESHOLD_MODES, NORMALIZE_SCOPES, TASKS, DatasetLayout, MethodDefaults, TaskPreset, get_task
from monai_wsss.data.slice_dataset import (
    SLICE_SPLITS,
    build_slice_dataset,
    require_slice_labels,
    orientation_steps,
    volume_preprocess,
    volume_to_slices,
)
from monai_wsss.data.slice_labels import LABELS_HEADER, UNLABELLED, SliceLabels, labels_from_masks, mask_slice_labels
from monai_wsss.data.synthetic import make_synthetic_dataset, synthetic_brain_volume

__all__ = [
    "PROFILE_PERCENTILE",
    "PROFILE_STATISTIC",
    "body_percentile",
    "check_intensity_profile",
    "intensity_profile",
    "load_intensity_profile",
    "write_intensity_profile",
    "FAILED_KEY",
    "FailSafeDataset",
    "failure_record",
    "DatasetLayout",
    "MAP_THRESHOLD_MODES",
    "MethodDefaults",
    "NORMALIZE_SCOPES",
    "LABELS_HEADER",
    "UNLABELLED",
    "SliceLabels",
    "labels_from_masks",
    "SLICE_SPLITS",
    "SPLIT_KEYS",
    "TASKS",
    "TaskPreset",
    "build_brats_datalist",
    "build_chaos_datalist",
    "build_slice_dataset",
    "get_task",
    "load_datalist",
    "make_synthetic_dataset",
    "mask_slice_labels",
    "require_slice_labels",
    "split_cases",
    "synthetic_brain_volume",
    "orientation_steps",
    "volume_preprocess",
    "volume_to_slices",
    "write_datalist",
]
