from monai_wsss.engines.evaluator import VolumeEvaluator, batch_failures
from monai_wsss.engines.prepare_batch import (
    ClassConditionalDiffusionPrepareBatch,
    NoisyClassifierPrepareBatch,
    SegmentationPrepareBatch,
)

__all__ = [
    "ClassConditionalDiffusionPrepareBatch",
    "NoisyClassifierPrepareBatch",
    "SegmentationPrepareBatch",
    "VolumeEvaluator",
    "batch_failures",
]
