# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""Ignite event handlers of a whole-volume segmentation run (MONAI ``SupervisedEvaluator``): the run folder and its
manifest, the dataset-level threshold, the evaluation reports and the key metric."""

from monai_wsss.handlers.volume_metric import VolumeMeanDice
from monai_wsss.handlers.volume_run import DatasetThresholdHandler, RunFolderHandler, VolumeReportHandler

__all__ = ["DatasetThresholdHandler", "RunFolderHandler", "VolumeMeanDice", "VolumeReportHandler"]
