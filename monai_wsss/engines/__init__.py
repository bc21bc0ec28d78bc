from monai_wsss.engines.prepare_batch import (
    ClassConditionalDiffusionPrepareBatch,
    NoisyClassifierPrepareBatch,
    SegmentationPrepareBatch,
)

__all__ = ["ClassConditionalDiffusionPrepareBatch", "NoisyClassifierPrepareBatch", "SegmentationPrepareBatch"]
