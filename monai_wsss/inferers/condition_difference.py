# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""CDM and CG-CDM: segmentation maps from the derivative of a conditional diffusion model w.r.t. its condition."""

from __future__ import annotations

import math

from collections.abc import Callable

import torch

from monai_wsss.inferers._ddim import (
    classifier_log_prob_grad,
    ddim_move,
    epsilon_from_output,
    guide_epsilon,
    noise_to_level,
    timestep_batch,
)
from monai_wsss.inferers.diffusion_map import DiffusionMapInferer

__all__ = ["ConditionDifferenceInferer"]


class ConditionDifferenceInferer(DiffusionMapInferer):
    """
    Conditional diffusion model (CDM) segmentation, Algorithm 1 of Hu et al., "Conditional Diffusion Models for
    Weakly Supervised Medical Image Segmentation", MICCAI 2023; with ``guidance_scale > 0``, CG-CDM.

    The image is noised to level Q, then R deterministic DDIM steps run twice: once conditioned on the target
    class embedding ``f(y1)`` and once on ``tau * f(y1) + (1 - tau) * f(y0)``, an embedding moved a small step
    ``1 - tau`` towards the reference (healthy) class. The accumulated difference of the two trajectories,
    divided by ``1 - tau``, is a finite-difference derivative of the denoised image w.r.t. the condition; it
    is large where the target object is.

    Note on tau: the paper's Eq. 6 writes ``(1 - tau) f(y1) + tau f(y0)``, but its text ("tau too close to 1
    leaves no gap between x and x'") and the authors' code use ``tau f(y1) + (1 - tau) f(y0)`` with
    tau = 0.95; this class follows the code. Noise levels are MONAI timestep indices: the authors' Q = 400 of
    a 4000-step schedule (ab ~ 0.90) is about Q = 100 of a 1000-step linear schedule.

    Both branches run as one batched network call (and one classifier call) per step.

    Args:
        scheduler: the MONAI scheduler the network was trained with (only ``alphas_cumprod`` and
            ``prediction_type`` are used).
        noise_level: Q, timestep index the image is noised to, in [1, T - 1].
        num_steps: R, number of unit-stride DDIM steps (Q, Q - 1, ..., Q - R + 1), in [1, Q].
        tau: interpolation weight of the target embedding in the second branch, in (0, 1).
        target_class: y1, the class whose object is segmented.
        reference_class: y0, the class the second branch moves towards (healthy).
        guidance_scale: s, classifier guidance scale (0 = CDM, > 0 = CG-CDM, needs a classifier).
        classifier: default noisy classifier, used when a call passes none (handy in bundle configs).
        verbose: show a progress bar over the steps.

    Returns (``__call__``):
        the signed map ``a`` with the input's shape, device and dtype. Taking its sign or absolute value,
        normalising and thresholding are post-processing (see ``monai_wsss.transforms``).

    Raises:
        ValueError: for ``noise_level`` outside [1, T - 1], ``num_steps`` outside [1, noise_level], ``tau``
            outside (0, 1), a negative ``guidance_scale``, or ``target_class == reference_class``; at call time
            for a wrong input rank, NaN/inf inputs, a class outside the network's classes, guidance without a
            classifier, a network without ``embed_classes`` or a ``noise`` of the wrong shape.

    Example::

        sched = DDIMScheduler(num_train_timesteps=1000, schedule="linear_beta", clip_sample=False)
        cdm = ConditionDifferenceInferer(sched, noise_level=200, num_steps=10, tau=0.95)
        a = cdm(x0, net, generator=torch.Generator().manual_seed(0))   # x0 in [-1, 1], (B, 1, 64, 64)
    """

    def __init__(
        self,
        scheduler,
        noise_level: int = 200,
        num_steps: int = 10,
        tau: float = 0.95,
        target_class: int = 1,
        reference_class: int = 0,
        guidance_scale: float = 0.0,
        classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        verbose: bool = False,
    ) -> None:
        super().__init__(scheduler, noise_level, classifier=classifier, verbose=verbose)
        if int(num_steps) != num_steps or not 1 <= num_steps <= self.noise_level:
            raise ValueError(f"num_steps must be an integer in [1, noise_level={self.noise_level}], got {num_steps}.")
        if not 0.0 < tau < 1.0:
            raise ValueError(f"tau must be in the open interval (0, 1), got {tau}.")
        if not math.isfinite(float(guidance_scale)) or guidance_scale < 0:  # NaN passes "< 0" and gives NaN maps
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale}.")
        if target_class == reference_class:
            raise ValueError(f"target_class and reference_class must differ, both are {target_class}.")
        self.num_steps = int(num_steps)
        self.tau = float(tau)
        self.target_class = int(target_class)
        self.reference_class = int(reference_class)
        self.guidance_scale = float(guidance_scale)

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: torch.nn.Module,
        classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """
        Args:
            inputs: clean images x0 in model space (B, C, *spatial), e.g. scaled to [-1, 1].
            network: a :class:`~monai_wsss.networks.nets.ConditionalDiffusionUNet` (anything with
                ``embed_classes`` and ``forward(x, t, class_embedding=...)``).
            classifier: noisy classifier ``classifier(x_t, t) -> logits``, required when ``guidance_scale > 0``.
            noise: the N(0, I) noise of the forward diffusion; drawn from ``generator`` when None.
            generator: random generator for the noise (reproducible maps).

        Returns:
            the signed map, same shape, device and dtype as ``inputs``.
        """
        self.check_inputs(inputs, network)
        classifier = classifier if classifier is not None else self.classifier
        if not callable(getattr(network, "embed_classes", None)):
            raise ValueError(f"network {type(network).__name__} has no embed_classes(); use ConditionalDiffusionUNet.")
        self.check_class(network, self.target_class, "target_class")
        self.check_class(network, self.reference_class, "reference_class")
        guided = self.guidance_scale > 0
        if guided and classifier is None:
            raise ValueError(f"guidance_scale={self.guidance_scale} needs a classifier (CG-CDM); pass classifier=...")

        x0 = inputs
        b = x0.shape[0]
        ab = self._ab(x0)
        eps0 = self.initial_noise(x0, noise, generator)
        with self.grad_mode(guided):
            e1, e0 = network.embed_classes([self.target_class, self.reference_class]).to(x0.dtype)
            # both branches in one batch: first half conditioned on f(y1), second half on the interpolation
            condition = torch.cat([e1.expand(b, -1), (self.tau * e1 + (1 - self.tau) * e0).expand(b, -1)])
            guide_target = torch.tensor([self.target_class] * b + [self.reference_class] * b, device=x0.device)
            x = noise_to_level(x0, eps0, ab, self.noise_level).repeat(2, *([1] * (x0.ndim - 1)))
            a = torch.zeros_like(x0)
            last = self.noise_level - self.num_steps
            for t in self.progress(range(self.noise_level, last, -1), "CDM"):
                out = network(x, timestep_batch(t, 2 * b, x.device), class_embedding=condition)
                eps = epsilon_from_output(out, x, ab, t, self.prediction_type)
                if guided:
                    grad = classifier_log_prob_grad(classifier, x, t, guide_target)  # type: ignore[arg-type]
                    eps = guide_epsilon(eps, grad, ab, t, self.guidance_scale)
                x = ddim_move(x, eps, ab, t, t - 1)
                a = a + (x[:b] - x[b:]) / (1 - self.tau)
        # a normal tensor (not an inference-mode one) so that callers can modify it in place
        return a.clone()
