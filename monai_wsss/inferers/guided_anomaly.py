# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""CG-Diff and classifier-free guided anomaly maps: |x0 - healthy reconstruction|."""

from __future__ import annotations

import math

from collections.abc import Callable

import torch

from monai_wsss.inferers._ddim import (
    classifier_free_epsilon,
    classifier_log_prob_grad,
    ddim_move,
    epsilon_from_output,
    guide_epsilon,
    timestep_batch,
)
from monai_wsss.inferers.diffusion_map import DiffusionMapInferer

__all__ = ["GuidedDiffusionAnomalyInferer"]

GUIDANCE_MODES = ("classifier", "cfg")


class GuidedDiffusionAnomalyInferer(DiffusionMapInferer):
    """
    Anomaly map ``|x0 - x_hat|`` where ``x_hat`` is a "healthy" version of ``x0``: the image is DDIM-encoded
    (deterministic inversion, treating ``x0`` as the sample at t = 0) up to level L, then decoded back to
    t = 0 with guidance towards the healthy class.

    - ``mode="classifier"`` (CG-Diff, Wolleb et al., "Diffusion Models for Medical Anomaly Detection", MICCAI
      2022): encoding is unguided and conditioned on ``healthy_class`` (unconditioned for a network without
      classes); decoding uses ``eps - s * sqrt(1 - ab[t]) * grad_x log p(healthy | x_t, t)`` from a noisy
      classifier.
    - ``mode="cfg"`` (classifier-free guidance, Sanchez et al., 2022): encoding is conditioned on the null class,
      decoding uses ``eps_null + w * (eps_healthy - eps_null)``, both estimates from one batched call; needs a
      network trained with label dropout to a null class.

    With ``guidance_scale=0`` (or ``cfg_scale=1`` and ``encode_class=healthy_class``) decoding retraces the
    encoding and ``x_hat`` reproduces ``x0`` up to the DDIM inversion error.

    Args:
        scheduler: the MONAI scheduler the network was trained with.
        noise_level: L, the level the image is encoded to (unit stride: L encoder and L decoder steps).
        guidance_scale: s, classifier guidance scale (``mode="classifier"``).
        healthy_class: index of the healthy class.
        mode: ``"classifier"`` or ``"cfg"``.
        cfg_scale: w, classifier-free guidance weight (``mode="cfg"``).
        encode_class: class used while encoding; default: the null class for ``"cfg"``, ``healthy_class`` for
            ``"classifier"``.
        classifier: default noisy classifier, used when a call passes none (handy in bundle configs).
        verbose: show progress bars over the steps.

    Raises:
        ValueError: for ``noise_level`` outside [1, T - 1], an unknown ``mode``, a negative scale; at call time
            for a wrong input rank, NaN/inf inputs, a class outside the network's classes, classifier guidance
            without a classifier, ``mode="cfg"`` on a network without a null class.

    Example::

        cgd = GuidedDiffusionAnomalyInferer(sched, noise_level=400, guidance_scale=100.0, healthy_class=0)
        amap = cgd(x0, net, classifier=clf)
    """

    def __init__(
        self,
        scheduler,
        noise_level: int = 400,
        guidance_scale: float = 100.0,
        healthy_class: int = 0,
        mode: str = "classifier",
        cfg_scale: float = 3.0,
        encode_class: int | None = None,
        classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        verbose: bool = False,
    ) -> None:
        super().__init__(scheduler, noise_level, classifier=classifier, verbose=verbose)
        if mode not in GUIDANCE_MODES:
            raise ValueError(f"mode must be one of {GUIDANCE_MODES}, got {mode!r}.")
        # NaN passes "< 0" and gives NaN maps
        if not math.isfinite(float(guidance_scale)) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale}.")
        if not math.isfinite(float(cfg_scale)) or cfg_scale < 0:
            raise ValueError(f"cfg_scale must be a finite number >= 0, got {cfg_scale}.")
        self.guidance_scale = float(guidance_scale)
        self.healthy_class = int(healthy_class)
        self.mode = mode
        self.cfg_scale = float(cfg_scale)
        self.encode_class = encode_class

    def _encode_label(self, network: torch.nn.Module) -> int | None:
        if self.mode == "cfg":
            null_class = getattr(network, "null_class", None)
            if null_class is None:
                raise ValueError(
                    f"mode='cfg' needs a network with a null class (ConditionalDiffusionUNet(null_class=True)); "
                    f"{type(network).__name__} has none."
                )
            label = null_class if self.encode_class is None else self.encode_class
        elif getattr(network, "num_class_embeds", None) is None:
            if self.encode_class is not None:
                raise ValueError(f"encode_class={self.encode_class} given for a network without classes.")
            return None
        else:
            label = self.healthy_class if self.encode_class is None else self.encode_class
        self.check_class(network, label, "encode_class")
        return label

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: torch.nn.Module,
        classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        return_reconstruction: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            inputs: clean images x0 in model space (B, C, *spatial).
            network: the diffusion network, ``network(x, t, class_labels=...)`` (or ``network(x, t)`` when it has
                no classes, classifier mode only).
            classifier: noisy classifier ``classifier(x_t, t) -> logits``; required when
                ``mode="classifier"`` and ``guidance_scale > 0``.
            return_reconstruction: also return ``x_hat``.

        Returns:
            ``|x0 - x_hat|`` with the input's shape, device and dtype (and ``x_hat`` if requested).
        """
        self.check_inputs(inputs, network)
        classifier = classifier if classifier is not None else self.classifier
        if self.mode == "cfg" or getattr(network, "num_class_embeds", None) is not None:
            self.check_class(network, self.healthy_class, "healthy_class")
        encode_label = self._encode_label(network)
        guided = self.mode == "classifier" and self.guidance_scale > 0
        if guided and classifier is None:
            raise ValueError(f"guidance_scale={self.guidance_scale} in mode='classifier' needs a classifier; pass classifier=...")

        x0 = inputs
        b = x0.shape[0]
        ab = self._ab(x0)

        def labels(*classes: int) -> torch.Tensor:
            return torch.tensor([c for c in classes for _ in range(b)], device=x0.device, dtype=torch.long)

        def predict(x: torch.Tensor, t: int, cls: torch.Tensor | None) -> torch.Tensor:
            steps = timestep_batch(t, x.shape[0], x.device)
            out = network(x, steps) if cls is None else network(x, steps, class_labels=cls)
            return epsilon_from_output(out, x, ab, t, self.prediction_type)

        with self.grad_mode(guided):
            x = x0
            enc = None if encode_label is None else labels(encode_label)
            for t in self.progress(range(0, self.noise_level), "encode"):
                x = ddim_move(x, predict(x, t, enc), ab, t, t + 1)
            if self.mode == "cfg":
                both = labels(int(network.null_class), self.healthy_class)  # type: ignore[arg-type]
            dec = None if encode_label is None else labels(self.healthy_class)
            for t in self.progress(range(self.noise_level, 0, -1), "decode"):
                if self.mode == "cfg":
                    eps_null, eps_healthy = predict(torch.cat([x, x]), t, both).chunk(2)
                    eps = classifier_free_epsilon(eps_null, eps_healthy, self.cfg_scale)
                else:
                    eps = predict(x, t, dec)
                    if guided:
                        grad = classifier_log_prob_grad(classifier, x, t, labels(self.healthy_class))  # type: ignore[arg-type]
                        eps = guide_epsilon(eps, grad, ab, t, self.guidance_scale)
                x = ddim_move(x, eps, ab, t, t - 1)
            amap = (x0 - x).abs()
        if return_reconstruction:
            return amap.clone(), x.clone()
        return amap.clone()
