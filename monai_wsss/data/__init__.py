# Copyright (c) monai_wsss contributors
# Licensed under the Apache License, Version 2.0
"""Dataset builders (BraTS, Decathlon Task01, CHAOS), case-level splits, datalists, slice datasets, synthetic data."""

from monai_wsss.data.datalist import (
    DATASET_LAYOUTS,
    SPLIT_KEYS,
    build_brats_datalist,
    build_chaos_datalist,
    load_datalist,
    split_cases,
    write_datalist,
)
from monai_wsss.data.slice_dataset import (
    SLICE_SPLITS,
    TASKS,
    TaskPreset,
    build_slice_dataset,
    require_slice_labels,
    volume_preprocess,
    volume_to_slices,
)
from monai_wsss.data.slice_labels import LABELS_HEADER, UNLABELLED, SliceLabels, labels_from_masks, mask_slice_labels
from monai_wsss.data.synthetic import make_synthetic_dataset, synthetic_brain_volume

__all__ = [
    "DATASET_LAYOUTS",
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
    "load_datalist",
    "make_synthetic_dataset",
    "mask_slice_labels",
    "require_slice_labels",
    "split_cases",
    "synthetic_brain_volume",
    "volume_preprocess",
    "volume_to_slices",
    "write_datalist",
]
