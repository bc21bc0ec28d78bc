from monai_wsss.networks.nets import ConditionalDiffusionUNet, NoisyClassifier

__all__ = ["ConditionalDiffusionUNet", "NoisyClassifier"]
