# Copyright (c) monai_wsss contributors
# Licensed under the Apache License, Version 2.0
"""Evaluation metrics: a thin layer over MONAI's (per positive slice / per volume Dice, IoU, HD95; AUROC, AUPRC)."""

from .auc import PixelAUCMetric, SliceAUCMetric, compute_auroc_auprc
from .segmentation import SEGMENTATION_LEVELS, SegmentationScores, binary_dice, check_binary, slices_along

__all__ = [
    "SegmentationScores",
    "SEGMENTATION_LEVELS",
    "PixelAUCMetric",
    "SliceAUCMetric",
    "binary_dice",
    "compute_auroc_auprc",
    "check_binary",
    "slices_along",
]
