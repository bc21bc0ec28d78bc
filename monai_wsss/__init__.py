"""monai_wsss: weakly supervised medical image segmentation with conditional diffusion models, as a MONAI plugin."""

__version__ = "0.1.0"
__all__ = ["__version__"]
