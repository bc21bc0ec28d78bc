from monai_wsss.inferers.condition_difference import ConditionDifferenceInferer
from monai_wsss.inferers.diffusion_map import DiffusionMapInferer
from monai_wsss.inferers.guided_anomaly import GuidedDiffusionAnomalyInferer
from monai_wsss.inferers.volume import VolumeInferer

__all__ = ["ConditionDifferenceInferer", "DiffusionMapInferer", "GuidedDiffusionAnomalyInferer", "VolumeInferer"]
