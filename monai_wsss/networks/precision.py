# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""
How a network runs on its device: bfloat16 autocast where the CPU computes it natively, and channels-last memory
for 2D networks on the CPU (float32 too: faster on AVX2-only CPUs, same results to float rounding; numbers and
commands in docs/performance.md).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

__all__ = [
    "MEMORY_FORMATS",
    "PRECISIONS",
    "AutocastNetwork",
    "channels_last_pays",
    "native_bfloat16",
    "to_memory_format",
    "with_precision",
]

logger = logging.getLogger(__name__)

#: values of the bundles' ``precision`` option
PRECISIONS = ("float32", "bfloat16", "auto")

#: values of the ``memory_format`` option: ``"auto"`` = channels-last where :py:func:`channels_last_pays`
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")

# attribute set on a network converted by to_memory_format (idempotence)
_CHANNELS_LAST_FLAG = "_monai_wsss_channels_last"


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


def channels_last_pays(device: torch.device | str) -> bool:
    """
    Whether a 2D network in float32 runs faster in channels-last memory on ``device``: True on the CPU (oneDNN's
    convolutions and PyTorch's GroupNorm have channels-last kernels; measured on an AVX2-only CPU, see
    docs/performance.md), False elsewhere (not measured; CUDA float32 gains little without tensor cores).

    Example::

        channels_last_pays("cpu")   # True
    """
    return torch.device(device).type == "cpu"


def _is_2d(network: nn.Module) -> bool:
    # only 2D networks: channels_last is defined for 4D tensors (a 5D weight would fail to convert)
    params = list(network.parameters())
    return bool(params) and all(p.ndim != 5 for p in params) and any(p.ndim == 4 for p in params)


def _channels_last_input(module: nn.Module, args: tuple, kwargs: dict):
    if args and isinstance(args[0], torch.Tensor) and args[0].ndim == 4:
        return (args[0].contiguous(memory_format=torch.channels_last),) + tuple(args[1:]), kwargs
    return None


def _contiguous_output(module: nn.Module, args: tuple, output):
    if isinstance(output, torch.Tensor) and output.ndim == 4:
        return output.contiguous()
    return None


def _contiguous_state_dict(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    # saved weights keep the plain (contiguous) layout whatever memory format the network computes in; with
    # keep_vars=True (Parameters in the dict) the caller wants the live parameters: torch.jit.trace and the ONNX
    # exporter map them to graph inputs and fail on copies ("Cannot insert a Tensor that requires grad as a constant")
    for key, value in state_dict.items():
        if key.startswith(prefix) and isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) \
                and not value.is_contiguous():
            state_dict[key] = value.contiguous()


def to_memory_format(network: nn.Module | None, memory_format: str = "auto") -> nn.Module | None:
    """
    ``network`` itself, converted in place to compute in channels-last memory (``"channels_last"``; ``"auto"``:
    where :py:func:`channels_last_pays` for its device and it is a 2D network), or left as it is (``"contiguous"``).

    The conversion: the 4D weights become channels-last (an input with one channel is both contiguous and
    channels-last, so only the weights decide the layout the convolutions pick), a 4D first input is converted
    on the way in, a 4D output is returned contiguous, and ``state_dict()`` returns contiguous tensors, so that
    saved checkpoints are the same plain state dicts (same keys, shapes and layout, loadable with
    ``torch.load(..., weights_only=True)`` into a network in either format). Training works unchanged: the
    optimizer updates the same parameter objects. Results equal the contiguous network's to float32 rounding
    (different summation order), not bit for bit. Converting twice is a no-op; ``"contiguous"`` does not undo an
    earlier conversion (build the network again for that).

    Args:
        network: a network (or ``None``, returned as is).
        memory_format: one of :py:data:`MEMORY_FORMATS`.

    Returns:
        the same module object.

    Raises:
        ValueError: an unknown ``memory_format``, or ``"channels_last"`` for a network that is not 2D.
        TypeError: ``network`` is not a ``torch.nn.Module``.

    Example::

        net = to_memory_format(ConditionalDiffusionUNet(**kwargs).to(device))   # channels-last on the CPU
        torch.save(net.state_dict(), "diffusion.pt")                           # contiguous tensors, as before
    """
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, got {memory_format!r}.")
    if network is None:
        return None
    if not isinstance(network, nn.Module):
        raise TypeError(f"network must be a torch.nn.Module, got {type(network).__name__}.")
    if memory_format == "contiguous" or getattr(network, _CHANNELS_LAST_FLAG, False):
        return network
    is_2d = _is_2d(network)
    if memory_format == "channels_last" and not is_2d:
        raise ValueError(
            f"memory_format='channels_last' needs a 2D network (4D weights, none 5D); {type(network).__name__} is not."
        )
    if memory_format == "auto":
        param = next(network.parameters(), None)
        if not is_2d or param is None or not channels_last_pays(param.device):
            return network
    network.to(memory_format=torch.channels_last)
    network.register_forward_pre_hook(_channels_last_input, with_kwargs=True)
    network.register_forward_hook(_contiguous_output)
    network.register_state_dict_post_hook(_contiguous_state_dict)
    object.__setattr__(network, _CHANNELS_LAST_FLAG, True)
    return network


class AutocastNetwork(nn.Module):
    """
    A 2D network run under ``torch.autocast`` (bfloat16 by default) with channels-last memory, returning
    float32, so that everything around it (the DDIM update in ``monai_wsss.inferers._ddim``, map accumulation,
    thresholds, a training loss) stays in float32. Only the network's convolutions, matmuls and attention run in
    reduced precision. Gradients flow through it, to the input (classifier guidance) and to the wrapped network's
    own float32 parameters (the training configs' ``precision``: an optimiser over ``network.parameters()`` trains
    the wrapped network).

    On this project's 2-core CPU (AVX512-BF16) it made the BraTS CDM and CG-CDM maps 1.8-1.9x faster with the
    same validation Dice to 0.001 (commands and numbers: the README's whole-volume speed section).

    Args:
        network: the trained network (its weights are converted to channels-last in place).
        dtype: autocast dtype.
        channels_last: run in channels-last memory (the measured fast path for bfloat16 on oneDNN).

    Raises:
        TypeError: ``network`` is not a ``torch.nn.Module``.

    Example::

        fast = AutocastNetwork(load_weights(net_def, "models/diffusion.pt", "cpu"))
        eps = fast(x, timesteps, class_labels)   # float32 tensor
    """

    def __init__(self, network: nn.Module, dtype: torch.dtype = torch.bfloat16, channels_last: bool = True) -> None:
        super().__init__()
        if not isinstance(network, nn.Module):
            raise TypeError(f"network must be a torch.nn.Module, got {type(network).__name__}.")
        self.channels_last = bool(channels_last) and _is_2d(network)
        self.network = network.to(memory_format=torch.channels_last) if self.channels_last else network
        self.dtype = dtype

    def __getattr__(self, name: str):
        # the inferers read the wrapped network's attributes and helpers (``embed_classes``, ``null_class``)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["network"], name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if x.ndim == 4 and self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=x.device.type, dtype=self.dtype):
            out = self.network(x, *args, **kwargs)
        return out.float().contiguous()


def with_precision(
    network: nn.Module | None, precision: str = "float32", memory_format: str = "auto"
) -> nn.Module | None:
    """
    ``network`` as it should run at ``precision``: for ``"float32"`` itself, in the memory format
    :py:func:`to_memory_format` gives it (``"auto"``: channels-last on the CPU for a 2D network); wrapped in
    :py:class:`AutocastNetwork` for ``"bfloat16"``; and for ``"auto"`` wrapped only where its device computes
    bfloat16 natively (:py:func:`native_bfloat16`), else as for ``"float32"``. ``"auto"`` logs what it chose and
    why; ``"bfloat16"`` on a device without native bfloat16 warns that it will be slow.

    Args:
        network: a network (in eval mode for inference, in train mode for the training configs), or ``None``
            (returned as is).
        precision: one of :py:data:`PRECISIONS`.
        memory_format: one of :py:data:`MEMORY_FORMATS`; ``"contiguous"`` turns channels-last off (float32 then
            runs exactly as the plain network; bfloat16 autocast keeps its own channels-last unless this is
            ``"contiguous"``).

    Raises:
        ValueError: an unknown ``precision`` or ``memory_format``.

    Example::

        network = with_precision(load_weights(net_def, path, "cpu"), "auto")          # float32 channels-last on AVX2
        plain = with_precision(load_weights(net_def, path, "cpu"), "float32", "contiguous")
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, got {memory_format!r}.")
    if network is None or isinstance(network, AutocastNetwork):
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
        precision = "float32"
    elif precision == "auto":
        logger.info(f"precision auto: {name} runs under bfloat16 autocast: {device} computes bfloat16 natively")
    elif precision == "bfloat16" and not native:
        logger.warning(
            f"precision bfloat16: {device} has no native bfloat16, so {name} runs emulated bfloat16, usually slower "
            "than float32; pass --precision auto or float32"
        )
    if precision == "float32":
        return to_memory_format(network, memory_format)
    return AutocastNetwork(network, channels_last=memory_format != "contiguous")
