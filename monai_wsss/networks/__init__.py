from monai_wsss.networks.nets import ConditionalDiffusionUNet, NoisyClassifier
from monai_wsss.networks.precision import PRECISIONS, AutocastNetwork, native_bfloat16, with_precision

__all__ = ["PRECISIONS", "AutocastNetwork", "ConditionalDiffusionUNet", "NoisyClassifier", "native_bfloat16", "with_precision"]
