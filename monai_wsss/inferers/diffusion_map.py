# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""Shared checks and plumbing of the inferers that turn a diffusion model into a pixel map."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from monai.inferers import Inferer
from monai.utils import optional_import

from monai_wsss.inferers._ddim import alphas_cumprod_from

tqdm, has_tqdm = optional_import("tqdm", name="tqdm")

__all__ = ["DiffusionMapInferer"]


class DiffusionMapInferer(Inferer):
    """
    Base class of the diffusion map inferers: holds the scheduler's ``alphas_cumprod`` and validates inputs.

    Args:
        scheduler: a MONAI scheduler (e.g. ``DDIMScheduler``) whose ``alphas_cumprod`` the model was trained with.
        noise_level: the timestep index the image is noised (or encoded) to, in [1, T - 1].
        classifier: default noisy classifier ``classifier(x_t, t) -> logits`` for guidance, used when a call
            passes none.
        verbose: show a tqdm progress bar over the steps.

    Raises:
        ValueError: if ``noise_level`` is outside [1, T - 1] or the scheduler's prediction type is unknown.
    """

    def __init__(
        self,
        scheduler,
        noise_level: int,
        classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        verbose: bool = False,
    ) -> None:
        self.scheduler = scheduler
        self.classifier = classifier
        self.alphas_cumprod = alphas_cumprod_from(scheduler)
        self.num_train_timesteps = int(self.alphas_cumprod.shape[0])
        if int(noise_level) != noise_level or not 1 <= noise_level <= self.num_train_timesteps - 1:
            raise ValueError(
                f"noise_level must be an integer in [1, {self.num_train_timesteps - 1}] (T = {self.num_train_timesteps}), "
                f"got {noise_level}."
            )
        self.noise_level = int(noise_level)
        self.prediction_type = str(getattr(scheduler, "prediction_type", "epsilon"))
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"scheduler prediction_type {self.prediction_type!r} is not supported.")
        self.verbose = verbose

    def _ab(self, like: torch.Tensor) -> torch.Tensor:
        if self.alphas_cumprod.device != like.device:
            self.alphas_cumprod = self.alphas_cumprod.to(like.device)
        return self.alphas_cumprod

    @staticmethod
    def check_inputs(x0: torch.Tensor, network: torch.nn.Module) -> None:
        """
        Raise a ``ValueError`` for a non-tensor, wrong rank, empty batch, a dtype other than the network's, a
        spatial size the U-Net cannot halve at every level, or a non-finite input (each would otherwise surface as a
        raw torch error from deep inside the network).

        Args:
            x0: images (B, C, H, W) or (B, C, H, W, D).
            network: the diffusion network (its ``spatial_dims``, parameter dtype and number of levels are checked
                when it has them).
        """
        if not isinstance(x0, torch.Tensor) or not x0.is_floating_point():
            raise ValueError(f"inputs must be a floating-point tensor, got {type(x0).__name__} {getattr(x0, 'dtype', '')}.")
        spatial_dims = getattr(network, "spatial_dims", None)
        expected = (spatial_dims + 2,) if spatial_dims else (4, 5)
        if x0.ndim not in expected:
            raise ValueError(
                f"inputs must have shape (B, C, *spatial) with rank {' or '.join(map(str, expected))}, "
                f"got shape {tuple(x0.shape)}."
            )
        if x0.shape[0] == 0:
            raise ValueError(f"inputs are an empty batch (shape {tuple(x0.shape)}): nothing to infer.")
        params = next(iter(network.parameters()), None) if isinstance(network, torch.nn.Module) else None
        if params is not None and params.is_floating_point() and x0.dtype != params.dtype:
            raise ValueError(
                f"inputs are {x0.dtype} but the network's weights are {params.dtype}; convert with "
                f"inputs.to({params.dtype}) (e.g. a float64 NumPy volume) or the network with network.to({x0.dtype})."
            )
        levels = getattr(network, "block_out_channels", None)
        if levels is not None and len(levels) > 1:
            factor = 2 ** (len(levels) - 1)
            if any(int(s) % factor for s in x0.shape[2:]):
                raise ValueError(
                    f"inputs of spatial size {tuple(x0.shape[2:])} cannot pass the network's {len(levels)} levels: "
                    f"every spatial size must be a multiple of {factor} (resize or pad the slices, e.g. with "
                    "VolumeInferer's roi_size)."
                )
        if not torch.isfinite(x0).all():
            raise ValueError("inputs contain NaN or infinite values.")

    @staticmethod
    def check_class(network: torch.nn.Module, index: int, name: str) -> None:
        """Raise a ``ValueError`` naming ``name`` if ``index`` is not a class of ``network``."""
        n = getattr(network, "num_class_embeds", None)
        if n is None:
            raise ValueError(f"{name}={index} needs a class-conditional network; {type(network).__name__} has no classes.")
        if not 0 <= index < n:
            raise ValueError(f"{name}={index} is outside the network's classes 0..{n - 1}.")

    @staticmethod
    def initial_noise(
        x0: torch.Tensor, noise: torch.Tensor | None, generator: torch.Generator | None
    ) -> torch.Tensor:
        """The given ``noise`` (checked against ``x0``'s shape) or fresh N(0, I) noise from ``generator``."""
        if noise is None:
            gen_device = generator.device if generator is not None else x0.device
            return torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must equal the input shape {tuple(x0.shape)}.")
        return noise.to(device=x0.device, dtype=x0.dtype)

    @staticmethod
    def grad_mode(needs_grad: bool) -> contextlib.AbstractContextManager:
        """``inference_mode`` when no classifier gradient is needed (fastest), else ``no_grad``."""
        return torch.no_grad() if needs_grad else torch.inference_mode()

    def progress(self, steps: Iterable[int], desc: str) -> Iterable[int]:
        """Wrap ``steps`` in a tqdm bar when ``verbose``."""
        if self.verbose and has_tqdm:
            return tqdm(steps, desc=desc, leave=False)
        return steps
