# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""
The only place with DDIM and guidance arithmetic in monai_wsss.

Everything is computed from a scheduler's ``alphas_cumprod`` (``ab``) for any step sequence. MONAI 1.6's
``DDIMScheduler.set_timesteps`` rounds a linspace while ``step`` assumes a fixed stride, so only its
1000-step grid is exact; the functions here take the two levels of a step explicitly instead.
Timesteps are MONAI indices 0..T-1; ``ab[-1]`` (the level "before" t = 0) is taken as 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = [
    "alphas_cumprod_from",
    "alpha_bar",
    "noise_to_level",
    "ddim_move",
    "epsilon_from_output",
    "classifier_log_prob_grad",
    "guide_epsilon",
    "classifier_free_epsilon",
    "timestep_batch",
]


def alphas_cumprod_from(scheduler, device: torch.device | str | None = None) -> torch.Tensor:
    """
    The scheduler's cumulative alpha products, in float64 on ``device`` (double precision keeps the
    DDIM round trip exact to float32 rounding).

    Args:
        scheduler: a MONAI scheduler (anything with an ``alphas_cumprod`` tensor).
        device: target device.

    Raises:
        ValueError: if the scheduler has no ``alphas_cumprod``.
    """
    ab = getattr(scheduler, "alphas_cumprod", None)
    if ab is None:
        raise ValueError(f"scheduler {type(scheduler).__name__} has no alphas_cumprod.")
    return torch.as_tensor(ab).detach().to(device=device, dtype=torch.float64)


def alpha_bar(ab: torch.Tensor, t: int) -> torch.Tensor:
    """``ab[t]`` with ``ab[-1] = 1`` (a clean image)."""
    return ab.new_ones(()) if t < 0 else ab[t]


def noise_to_level(x0: torch.Tensor, noise: torch.Tensor, ab: torch.Tensor, t: int) -> torch.Tensor:
    """Forward diffusion ``sqrt(ab[t]) * x0 + sqrt(1 - ab[t]) * noise``."""
    a = alpha_bar(ab, t)
    return (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(x0.dtype)


def ddim_move(x: torch.Tensor, eps: torch.Tensor, ab: torch.Tensor, t_from: int, t_to: int) -> torch.Tensor:
    """
    Deterministic DDIM (eta = 0) move of ``x`` at level ``t_from`` to level ``t_to`` given the noise estimate:
    ``sqrt(ab[t_to]) * (x - sqrt(1 - ab[t_from]) * eps) / sqrt(ab[t_from]) + sqrt(1 - ab[t_to]) * eps``.

    ``t_to < t_from`` denoises (sampling), ``t_to > t_from`` encodes (DDIM inversion).
    """
    a_from, a_to = alpha_bar(ab, t_from), alpha_bar(ab, t_to)
    x0_pred = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
    return (a_to.sqrt() * x0_pred + (1 - a_to).sqrt() * eps).to(x.dtype)


def epsilon_from_output(output: torch.Tensor, x: torch.Tensor, ab: torch.Tensor, t: int, prediction_type: str) -> torch.Tensor:
    """
    The noise estimate from a network output of the given MONAI ``prediction_type``.

    Raises:
        ValueError: for an unknown prediction type.
    """
    if prediction_type == "epsilon":
        return output
    a = alpha_bar(ab, t)
    if prediction_type == "v_prediction":
        return (a.sqrt() * output + (1 - a).sqrt() * x).to(x.dtype)
    if prediction_type == "sample":
        return ((x - a.sqrt() * output) / (1 - a).sqrt()).to(x.dtype)
    raise ValueError(f"unknown scheduler prediction_type {prediction_type!r}.")


def timestep_batch(t: int, batch: int, device: torch.device) -> torch.Tensor:
    """A (batch,) long tensor filled with ``t``."""
    return torch.full((batch,), t, dtype=torch.long, device=device)


def classifier_log_prob_grad(
    classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    t: int,
    target: torch.Tensor,
) -> torch.Tensor:
    """
    ``grad_x log softmax(classifier(x, t))[target]`` per sample, in one classifier call for the whole batch.

    Samples are independent (the classifier must be in eval mode), so the gradient of the summed
    log-probabilities gives every sample's own gradient.

    Args:
        classifier: ``classifier(x, timesteps) -> logits``.
        x: noisy images (B, C, *spatial).
        t: timestep of ``x``.
        target: class index per sample (B,).
    """
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        logits = classifier(x_in, timestep_batch(t, x.shape[0], x.device))
        log_probs = torch.log_softmax(logits.float(), dim=1)
        selected = log_probs.gather(1, target.view(-1, 1).to(log_probs.device)).sum()
        (grad,) = torch.autograd.grad(selected, x_in)
    return grad.detach()


def guide_epsilon(eps: torch.Tensor, grad_log_prob: torch.Tensor, ab: torch.Tensor, t: int, scale: float) -> torch.Tensor:
    """Classifier guidance of a noise estimate: ``eps - s * sqrt(1 - ab[t]) * grad_x log p(y | x_t, t)``."""
    return (eps - scale * (1 - alpha_bar(ab, t)).sqrt() * grad_log_prob).to(eps.dtype)


def classifier_free_epsilon(eps_null: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance ``eps_null + w * (eps_cond - eps_null)``."""
    return eps_null + scale * (eps_cond - eps_null)

