# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""Timestep-aware classifier of noisy images, for classifier guidance."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets.diffusion_model_unet import DiffusionModelEncoder

from monai_wsss.networks.nets.conditional_diffusion_unet import check_conditioning_survives_norm

__all__ = ["NoisyClassifier"]


class NoisyClassifier(DiffusionModelEncoder):
    """
    Classifier of noised images ``x_t`` that also sees the timestep ``t``: the encoder half of the diffusion
    U-Net followed by a fully connected head (MONAI's ``DiffusionModelEncoder``, after Wolleb et al., MICCAI
    2022). Train it with cross-entropy on images noised at random timesteps; its gradient
    ``grad_x log p(y | x_t, t)`` guides CG-CDM and CG-Diff. At ``t = 0`` it is a plain slice classifier
    (used by the CAM baselines).

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        in_channels: number of input channels.
        num_classes: number of classes (logits).
        input_shape: spatial shape of the inputs (the head's size depends on it).
        channels: output channels of each encoder level (each level halves the resolution).
        attention_levels: levels with self-attention; defaults to the last one only.
        num_res_blocks: residual blocks per level.
        norm_num_groups: number of GroupNorm groups.
        num_head_channels: channels per attention head.
        use_flash_attention: attention through ``torch.nn.functional.scaled_dot_product_attention`` (default True,
            MONAI's default is False; same weights, same logits and input gradients to float32 rounding, faster).
        kwargs: any other :class:`DiffusionModelEncoder` argument.

    Raises:
        ValueError: when a level has exactly ``norm_num_groups`` channels (GroupNorm would erase the timestep
            embedding, see :func:`check_conditioning_survives_norm`) or ``input_shape`` does not match
            ``spatial_dims``, or ``use_flash_attention`` is not a bool.

    Example::

        clf = NoisyClassifier(spatial_dims=2, in_channels=1, num_classes=2, input_shape=(64, 64))
        logits = clf(x_t, torch.full((x_t.shape[0],), 100))
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_classes: int = 2,
        input_shape: Sequence[int] = (64, 64),
        channels: Sequence[int] = (32, 64, 64),
        attention_levels: Sequence[bool] | None = None,
        num_res_blocks: Sequence[int] | int = 1,
        norm_num_groups: int = 8,
        num_head_channels: int | Sequence[int] = 32,
        use_flash_attention: bool = True,
        **kwargs,
    ) -> None:
        if not isinstance(use_flash_attention, bool):
            raise ValueError(f"use_flash_attention must be a bool, got {use_flash_attention!r} ({type(use_flash_attention).__name__}).")
        if len(input_shape) != spatial_dims:
            raise ValueError(f"input_shape {tuple(input_shape)} must have spatial_dims={spatial_dims} entries.")
        check_conditioning_survives_norm(channels, norm_num_groups)
        if attention_levels is None:
            attention_levels = (False,) * (len(channels) - 1) + (True,)
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=num_classes,
            input_shape=input_shape,
            channels=channels,
            attention_levels=attention_levels,
            num_res_blocks=num_res_blocks,
            norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels,
            use_flash_attention=use_flash_attention,
            **kwargs,
        )
        self.spatial_dims = spatial_dims
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # type: ignore[override]
        """
        Args:
            x: noisy images (B, C, *input_shape).
            timesteps: timestep indices (B,).

        Returns:
            logits (B, num_classes).

        Raises:
            ValueError: if the spatial shape differs from ``input_shape``.
        """
        if tuple(x.shape[2:]) != self.input_shape:
            raise ValueError(f"NoisyClassifier expects inputs of spatial shape {self.input_shape}, got {tuple(x.shape[2:])}.")
        return super().forward(x, timesteps, *args, **kwargs)
