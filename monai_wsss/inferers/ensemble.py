# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""Noise-seed ensembles of stochastic map inferers: mean map and per-pixel variance as uncertainty."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from monai.inferers import Inferer

__all__ = ["NoiseEnsembleInferer"]


class NoiseEnsembleInferer(Inferer):
    """
    Run a stochastic map inferer (CDM, CG-CDM: the map depends on the forward-diffusion noise) with several
    noise draws and return the mean map, optionally with the per-pixel variance across draws as an
    uncertainty map. The draws run as one batched call: the input is repeated ``num_samples`` times along the
    batch, so each copy gets its own noise from a single generator.

    Args:
        inferer: ``inferer(x, network, *, generator=..., **kwargs) -> map``, e.g. ``ConditionDifferenceInferer``.
        num_samples: number of noise draws (>= 1).
        return_variance: also return the unbiased per-pixel variance (0 when ``num_samples == 1``).

    Raises:
        ValueError: ``num_samples < 1``.

    Example::

        ens = NoiseEnsembleInferer(ConditionDifferenceInferer(sched, noise_level=200, num_steps=10), num_samples=4,
                                   return_variance=True)
        mean_map, var_map = ens(x0, net, generator=torch.Generator().manual_seed(0))
    """

    def __init__(self, inferer: Callable[..., torch.Tensor], num_samples: int = 4, return_variance: bool = False) -> None:
        if int(num_samples) != num_samples or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples}.")
        self.inferer = inferer
        self.num_samples = int(num_samples)
        self.return_variance = return_variance

    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            inputs: images (B, C, *spatial).
            network: passed to the inner inferer, with ``args`` and ``kwargs`` (e.g. ``classifier``, ``generator``).

        Returns:
            the mean map (B, C, *spatial), and the variance map when ``return_variance``.
        """
        if "noise" in kwargs:
            raise ValueError("NoiseEnsembleInferer draws its own noise per sample; pass a generator, not noise.")
        repeated = inputs.repeat(self.num_samples, *([1] * (inputs.ndim - 1)))
        maps = self.inferer(repeated, network, *args, **kwargs)
        maps = maps.reshape(self.num_samples, *inputs.shape)
        mean = maps.mean(0)
        if not self.return_variance:
            return mean
        var = maps.var(0, unbiased=True) if self.num_samples > 1 else torch.zeros_like(mean)
        return mean, var
