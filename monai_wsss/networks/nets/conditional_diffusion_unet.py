# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""Class-conditional diffusion U-Net on top of MONAI's ``DiffusionModelUNet``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
from monai.networks.nets.diffusion_model_unet import DiffusionModelUNet, DiffusionUNetResnetBlock

__all__ = ["ConditionalDiffusionUNet", "ClassEmbedding", "ScaleShiftResnetBlock", "check_conditioning_survives_norm"]

CONDITIONING_MODES = ("add", "scale_shift")


class ClassEmbedding(nn.Embedding):
    """
    ``nn.Embedding`` that also accepts ready-made embedding vectors.

    Integer tensors of shape (B,) are looked up as usual; floating-point tensors of shape (B, E) are
    returned unchanged. Subclassing keeps the state-dict key (``class_embedding.weight``) identical to
    MONAI's, so weights move freely between the two networks.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.Embedding's own name)
        if input.is_floating_point():
            return input
        return super().forward(input)


class ScaleShiftResnetBlock(DiffusionUNetResnetBlock):
    """
    Residual block with adaptive GroupNorm conditioning, as in guided-diffusion (``use_scale_shift_norm``):
    ``h = GroupNorm(h) * (1 + scale) + shift`` with ``(scale, shift)`` projected from the time/class embedding.

    Because the embedding acts *after* the normalisation, no GroupNorm can erase it. Built from a
    :class:`monai.networks.nets.diffusion_model_unet.DiffusionUNetResnetBlock` by
    :meth:`from_resnet_block`; ``time_emb_proj`` then has ``2 * out_channels`` outputs.
    """

    @classmethod
    def from_resnet_block(cls, block: DiffusionUNetResnetBlock) -> ScaleShiftResnetBlock:
        """Convert a MONAI residual block in place (keeps every other weight) and return it."""
        block.__class__ = cls
        block.time_emb_proj = nn.Linear(block.emb_channels, 2 * block.out_channels)
        return block  # type: ignore[return-value]

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.nonlinearity(self.norm1(x))
        if self.upsample is not None:
            x, h = self.upsample(x), self.upsample(h)
        elif self.downsample is not None:
            x, h = self.downsample(x), self.downsample(h)
        h = self.conv1(h)
        emb_out = self.time_emb_proj(self.nonlinearity(emb))
        emb_out = emb_out.reshape(emb_out.shape + (1,) * self.spatial_dims)
        scale, shift = emb_out.chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.nonlinearity(h))
        return self.skip_connection(x) + h


def check_conditioning_survives_norm(channels: Sequence[int], norm_num_groups: int) -> None:
    """
    Raise if MONAI's additive conditioning would be erased by GroupNorm.

    MONAI adds the time/class embedding per channel right before a GroupNorm. With one channel per group
    the norm subtracts each channel's own mean, which removes any per-channel constant: the network then
    ignores the timestep and the class (a label change moves the output by ~1e-6).

    Args:
        channels: output channels of each U-Net level.
        norm_num_groups: number of GroupNorm groups.

    Raises:
        ValueError: when some level has exactly ``norm_num_groups`` channels.
    """
    erased = [c for c in channels if c == norm_num_groups]
    if erased:
        raise ValueError(
            f"conditioning='add' with norm_num_groups={norm_num_groups} and channels={tuple(channels)}: levels with "
            f"{erased[0]} channels have one channel per GroupNorm group, which erases the added time/class "
            "embedding (the output would ignore the label). Use fewer groups (e.g. norm_num_groups=8) or "
            "conditioning='scale_shift'."
        )


class ConditionalDiffusionUNet(DiffusionModelUNet):
    """
    Class-conditional diffusion U-Net for conditional diffusion models (CDM, Hu et al., MICCAI 2023) and
    classifier-(free-)guided anomaly detection (Wolleb et al., MICCAI 2022; Sanchez et al., 2022).

    A :class:`monai.networks.nets.DiffusionModelUNet` with ``num_class_embeds`` classes whose class condition
    can also be given as a continuous embedding vector, so that CDM can condition on interpolated
    embeddings ``tau * f(y1) + (1 - tau) * f(y0)``. With ``conditioning="add"`` (default) the state dict is
    exactly MONAI's: weights of a ``DiffusionModelUNet(num_class_embeds=...)`` load unchanged, and weights of
    the old MONAI Generative Models package load through :meth:`load_old_state_dict`.

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        in_channels: number of input channels.
        out_channels: number of output channels.
        num_classes: number of real classes (0 = healthy / no target, 1 = target present, ...).
        null_class: if True, add one more embedding, index ``num_classes`` (the last), used as the "no
            condition" class for classifier-free guidance (train with label dropout to it).
        conditioning: ``"add"`` adds the time+class embedding before a GroupNorm as MONAI does;
            ``"scale_shift"`` uses adaptive GroupNorm as guided-diffusion (the authors' code) does.
        channels: output channels of each level.
        norm_num_groups: number of GroupNorm groups.
        use_flash_attention: compute attention with ``torch.nn.functional.scaled_dot_product_attention`` (PyTorch's
            fused kernel, CPU included) instead of MONAI's einsum-softmax-einsum. Default True here (MONAI's default
            is False): same weights and state dict, same output to float32 rounding, faster (docs/performance.md).
            False gives MONAI's own attention.
        kwargs: any other :class:`DiffusionModelUNet` argument (``attention_levels``, ``num_res_blocks``,
            ``num_head_channels``, ...).

    Raises:
        ValueError: ``null_class`` not a bool or ``num_classes`` not an int (text such as ``"true"`` included: configs
            read command-line options with :py:func:`monai_wsss.bundle.parse_option`), ``num_classes < 1``, an
            unknown ``conditioning``, ``num_class_embeds`` passed in kwargs, or
            ``conditioning="add"`` with a level whose channel count equals ``norm_num_groups`` (the GroupNorm
            would erase the condition, see :func:`check_conditioning_survives_norm`), or ``use_flash_attention``
            not a bool.

    Example::

        net = ConditionalDiffusionUNet(spatial_dims=2, in_channels=1, out_channels=1, num_classes=2,
                                       channels=(32, 64, 64), attention_levels=(False, False, True),
                                       num_res_blocks=1, num_head_channels=32, norm_num_groups=8)
        eps = net(x, timesteps, class_labels=torch.tensor([1, 0]))
        eps = net(x, timesteps, class_embedding=net.embed_classes(torch.tensor([1, 0])))  # same result
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        num_classes: int = 2,
        null_class: bool = False,
        conditioning: str = "add",
        channels: Sequence[int] = (32, 64, 64),
        norm_num_groups: int = 8,
        use_flash_attention: bool = True,
        **kwargs,
    ) -> None:
        # strict types: a config that passes command-line text ('true') reads it first with
        # monai_wsss.bundle.parse_option; the network does not guess what text means
        if not isinstance(null_class, (bool, np.bool_)):
            raise ValueError(
                f"null_class must be a bool, got {null_class!r} ({type(null_class).__name__}); a bundle config reads a "
                "typed option with $monai_wsss.bundle.parse_option('null_class', @null_class, 'bool')."
            )
        if isinstance(num_classes, (bool, np.bool_)) or not isinstance(num_classes, (int, np.integer)):
            raise ValueError(f"num_classes must be an int, got {num_classes!r} ({type(num_classes).__name__}).")
        null_class, num_classes = bool(null_class), int(num_classes)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        if not isinstance(use_flash_attention, (bool, np.bool_)):
            raise ValueError(f"use_flash_attention must be a bool, got {use_flash_attention!r} ({type(use_flash_attention).__name__}).")
        if conditioning not in CONDITIONING_MODES:
            raise ValueError(f"conditioning must be one of {CONDITIONING_MODES}, got {conditioning!r}.")
        if "num_class_embeds" in kwargs:
            raise ValueError("pass num_classes (and null_class) instead of num_class_embeds.")
        if conditioning == "add":
            check_conditioning_survives_norm(channels, norm_num_groups)
        # MONAI's defaults assume four levels; derive them from ``channels`` instead
        kwargs.setdefault("attention_levels", (False,) * (len(channels) - 1) + (True,))
        kwargs.setdefault("num_res_blocks", 2)
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=channels,
            norm_num_groups=norm_num_groups,
            num_class_embeds=num_classes + int(null_class),
            use_flash_attention=bool(use_flash_attention),
            **kwargs,
        )
        self.spatial_dims = spatial_dims
        self.num_classes = num_classes
        self.null_class: int | None = num_classes if null_class else None
        self.conditioning = conditioning
        # swap the module class only: the weight keeps MONAI's name and initialisation
        self.class_embedding.__class__ = ClassEmbedding
        if conditioning == "scale_shift":
            for module in list(self.modules()):
                if isinstance(module, DiffusionUNetResnetBlock):
                    ScaleShiftResnetBlock.from_resnet_block(module)

    @property
    def embedding_dim(self) -> int:
        """Length E of a class embedding vector."""
        return int(self.class_embedding.embedding_dim)

    def check_class_labels(self, labels: torch.Tensor | Sequence[int] | int, name: str = "class_labels") -> None:
        """
        Raise a ``ValueError`` naming ``name`` if any label is not a valid class index of this network.

        Args:
            labels: integer class indices.
            name: argument name used in the error message.
        """
        labels_t = torch.as_tensor(labels)
        if labels_t.is_floating_point():
            raise ValueError(f"{name} must be integer class indices, got dtype {labels_t.dtype}.")
        n = int(self.class_embedding.num_embeddings)
        if labels_t.numel() and (int(labels_t.min()) < 0 or int(labels_t.max()) >= n):
            valid = f"0..{n - 1}" + (f" (null class {self.null_class})" if self.null_class is not None else "")
            raise ValueError(f"{name} must be in {valid}, got {labels_t.unique().tolist()}.")

    def embed_classes(self, labels: torch.Tensor | Sequence[int] | int) -> torch.Tensor:
        """
        Class embedding vectors f(y).

        Args:
            labels: integer class indices, shape (B,) (or a single int).

        Returns:
            tensor of shape (B, E) on the network's device.

        Raises:
            ValueError: if a label is outside the network's classes.
        """
        self.check_class_labels(labels)
        weight = self.class_embedding.weight
        labels_t = torch.as_tensor(labels, device=weight.device).long().reshape(-1)
        return weight[labels_t]

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        class_embedding: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        down_block_additional_residuals: tuple[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            x: noisy input (B, C, *spatial).
            timesteps: timestep indices (B,).
            class_labels: integer class indices (B,). Exactly one of ``class_labels`` / ``class_embedding``.
            class_embedding: float class embedding vectors (B, E), e.g. from :meth:`embed_classes`.
            context: cross-attention context, as in :class:`DiffusionModelUNet`.
            down_block_additional_residuals: ControlNet residuals, as in :class:`DiffusionModelUNet`.
            mid_block_additional_residual: ControlNet residual, as in :class:`DiffusionModelUNet`.

        Returns:
            the network output (the predicted noise for an epsilon-trained model), shape of ``x``.

        Raises:
            ValueError: both or neither condition given, labels out of range, or a wrong embedding shape.
        """
        if (class_labels is None) == (class_embedding is None):
            raise ValueError("give exactly one of class_labels (integer indices) or class_embedding (float vectors).")
        if class_labels is not None:
            self.check_class_labels(class_labels)
            condition = class_labels
        else:
            assert class_embedding is not None
            if not class_embedding.is_floating_point() or class_embedding.shape != (x.shape[0], self.embedding_dim):
                raise ValueError(
                    f"class_embedding must be a float tensor of shape (B, E) = ({x.shape[0]}, {self.embedding_dim}), "
                    f"got {tuple(class_embedding.shape)} {class_embedding.dtype}."
                )
            condition = class_embedding
        return super().forward(
            x,
            timesteps,
            context=context,
            class_labels=condition,
            down_block_additional_residuals=down_block_additional_residuals,
            mid_block_additional_residual=mid_block_additional_residual,
        )
