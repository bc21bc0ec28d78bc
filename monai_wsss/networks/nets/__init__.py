from monai_wsss.networks.nets.conditional_diffusion_unet import (
    ClassEmbedding,
    ConditionalDiffusionUNet,
    ScaleShiftResnetBlock,
    check_conditioning_survives_norm,
)
from monai_wsss.networks.nets.coordinate_input import CoordinateChannelsNetwork
from monai_wsss.networks.nets.noisy_classifier import NoisyClassifier

__all__ = [
    "ClassEmbedding",
    "ConditionalDiffusionUNet",
    "CoordinateChannelsNetwork",
    "NoisyClassifier",
    "ScaleShiftResnetBlock",
    "check_conditioning_survives_norm",
]
