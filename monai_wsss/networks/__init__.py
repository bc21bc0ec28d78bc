from monai_wsss.networks.nets import ConditionalDiffusionUNet, CoordinateChannelsNetwork, NoisyClassifier
from monai_wsss.networks.precision import (
    MEMORY_FORMATS,
    PRECISIONS,
    AutocastNetwork,
    channels_last_pays,
    native_bfloat16,
    to_memory_format,
    with_precision,
)

__all__ = [
    "MEMORY_FORMATS",
    "PRECISIONS",
    "AutocastNetwork",
    "ConditionalDiffusionUNet",
    "CoordinateChannelsNetwork",
    "NoisyClassifier",
    "channels_last_pays",
    "native_bfloat16",
    "to_memory_format",
    "with_precision",
]
