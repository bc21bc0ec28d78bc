from monai_wsss.inferers.cam import CAM_METHODS, ClassActivationMapInferer, TimestepClassifierWrapper, default_cam_target_layer
from monai_wsss.inferers.condition_difference import ConditionDifferenceInferer
from monai_wsss.inferers.diffusion_map import DiffusionMapInferer
from monai_wsss.inferers.ensemble import NoiseEnsembleInferer
from monai_wsss.inferers.guided_anomaly import GuidedDiffusionAnomalyInferer
from monai_wsss.inferers.segmenter import SegmentationProbabilityInferer, SliceProbabilityInferer
from monai_wsss.inferers.threshold import IntensityThresholdInferer
from monai_wsss.inferers.volume import VolumeInferer

__all__ = [
    "CAM_METHODS",
    "ClassActivationMapInferer",
    "ConditionDifferenceInferer",
    "DiffusionMapInferer",
    "GuidedDiffusionAnomalyInferer",
    "IntensityThresholdInferer",
    "NoiseEnsembleInferer",
    "SegmentationProbabilityInferer",
    "SliceProbabilityInferer",
    "TimestepClassifierWrapper",
    "VolumeInferer",
    "default_cam_target_layer",
]
