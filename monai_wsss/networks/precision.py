# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""Inference precision: run a trained network under bfloat16 autocast where the CPU computes it natively."""

from __future__ import annotations

import logging

import torch
from torch import nn

__all__ = ["PRECISIONS", "AutocastNetwork", "native_bfloat16", "with_precision"]

logger = logging.getLogger(__name__)

#: values of the bundles' ``precision`` option
PRECISIONS = ("float32", "bfloat16", "auto")


def native_bfloat16(device: torch.device | str) -> bool:
    """
    Whether ``device`` computes bfloat16 convolutions natively: CUDA with bf16 support, or a CPU with AVX512-BF16
    or AMX (oneDNN). Elsewhere bfloat16 is emulated and slower than float32.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and (
            torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        )
    return False


class AutocastNetwork(nn.Module):
    """
    A trained 2D network run under ``torch.autocast`` (bfloat16 by default) with channels-last memory, returning
    float32, so that everything around it (the DDIM update in ``monai_wsss.inferers._ddim``, map accumulation,
    thresholds) stays in float32. Only the network's convolutions, matmuls and attention run in reduced precision.
    Gradients with respect to the input (classifier guidance) flow through it.

    On this project's 2-core CPU (AVX512-BF16) it made the BraTS CDM and CG-CDM maps 1.8-1.9x faster with the
    same validation Dice to 0.001 (commands and numbers: the README's whole-volume speed section).

    Args:
        network: the trained network (its weights are converted to channels-last in place).
        dtype: autocast dtype.

    Raises:
        TypeError: ``network`` is not a ``torch.nn.Module``.

    Example::

        fast = AutocastNetwork(load_weights(net_def, "models/diffusion.pt", "cpu"))
        eps = fast(x, timesteps, class_labels)   # float32 tensor
    """

    def __init__(self, network: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if not isinstance(network, nn.Module):
            raise TypeError(f"network must be a torch.nn.Module, got {type(network).__name__}.")
        self.network = network.to(memory_format=torch.channels_last)
        self.dtype = dtype

    def __getattr__(self, name: str):
        # the inferers read the wrapped network's attributes and helpers (``embed_classes``, ``null_class``)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["network"], name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=x.device.type, dtype=self.dtype):
            out = self.network(x, *args, **kwargs)
        return out.float().contiguous()


def with_precision(network: nn.Module | None, precision: str = "float32") -> nn.Module | None:
    """
    ``network`` as it should run at ``precision``: itself for ``"float32"`` (or ``None``), wrapped in
    :py:class:`AutocastNetwork` for ``"bfloat16"``, and for ``"auto"`` wrapped only where its device computes
    bfloat16 natively (:py:func:`native_bfloat16`). ``"auto"`` logs what it chose and why; ``"bfloat16"`` on a
    device without native bfloat16 warns that it will be slow.

    Args:
        network: a network in eval mode, or ``None`` (returned as is).
        precision: one of :py:data:`PRECISIONS`.

    Raises:
        ValueError: an unknown ``precision``.

    Example::

        network = with_precision(load_weights(net_def, path, "cpu"), "auto")
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    if network is None or precision == "float32" or isinstance(network, AutocastNetwork):
        return network
    param = next(network.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    native = param is not None and native_bfloat16(device)
    name = type(network).__name__
    if precision == "auto" and not native:
        logger.info(
            f"precision auto: {name} runs in float32: {device} has no native bfloat16 (AVX512-BF16 or AMX on a CPU, "
            "bf16 support on CUDA), where bfloat16 would be emulated and slower"
        )
        return network
    if precision == "auto":
        logger.info(f"precision auto: {name} runs under bfloat16 autocast: {device} computes bfloat16 natively")
    elif not native:
        logger.warning(
            f"precision bfloat16: {device} has no native bfloat16, so {name} runs emulated bfloat16, usually slower "
            "than float32; pass --precision auto or float32"
        )
    return AutocastNetwork(network)
