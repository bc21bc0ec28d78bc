# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""Ignite handlers the training bundles need and MONAI lacks: EMA of weights, seeded evaluation rounds."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from monai.utils import IgniteInfo, min_version, optional_import

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["ExponentialMovingAverage", "SeededEvaluation", "ema_copy"]


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    # DataParallel / DistributedDataParallel / torch.compile wrappers keep the real module here
    for attr in ("module", "_orig_mod"):
        if hasattr(module, attr) and isinstance(getattr(module, attr), torch.nn.Module):
            return _unwrap(getattr(module, attr))
    return module


def ema_copy(network: torch.nn.Module) -> torch.nn.Module:
    """
    A frozen deep copy of ``network`` (unwrapped from DDP / ``torch.compile``) in eval mode, to hold EMA weights.

    Args:
        network: the trained network.

    Returns:
        the copy, with ``requires_grad=False`` parameters.

    Example::

        ema_net = ema_copy(net)
    """
    copied = copy.deepcopy(_unwrap(network)).eval()
    for p in copied.parameters():
        p.requires_grad_(False)
    return copied


class ExponentialMovingAverage:
    """
    Keep an exponential moving average of a network's weights during training (common for diffusion models):
    after every ``update_every`` iterations, ``ema = d * ema + (1 - d) * weights`` with
    ``d = min(decay, (1 + n) / (10 + n))`` for the n-th update, so that early averages are not dominated by the
    random initialisation. Buffers are copied. Validate and save ``ema_network`` for the averaged model; put
    this handler (it has ``state_dict``) in the checkpoint so a resumed run continues the same average.

    Args:
        network: the trained network (DDP / compiled wrappers are unwrapped).
        ema_network: the averaged copy, e.g. from :py:func:`ema_copy`; same architecture.
        decay: the largest decay d in [0, 1).
        update_every: update period in iterations.

    Raises:
        ValueError: ``decay`` outside [0, 1), ``update_every < 1``, or networks whose parameters differ.

    Example::

        ema_net = ema_copy(net)
        ExponentialMovingAverage(net, ema_net, decay=0.999).attach(trainer)
        evaluator = SupervisedEvaluator(..., network=ema_net)
    """

    def __init__(
        self, network: torch.nn.Module, ema_network: torch.nn.Module, decay: float = 0.999, update_every: int = 1
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}.")
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}.")
        self.network = _unwrap(network)
        self.ema_network = _unwrap(ema_network)
        src, dst = dict(self.network.named_parameters()), dict(self.ema_network.named_parameters())
        if src.keys() != dst.keys() or any(src[k].shape != dst[k].shape for k in src):
            raise ValueError("network and ema_network must have the same parameters (names and shapes).")
        self.decay = float(decay)
        self.update_every = int(update_every)
        self.num_updates = 0

    def attach(self, engine: Engine) -> None:
        """Update after every ``update_every`` training iterations of ``engine``."""
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.update_every), self)

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step from the network's current weights."""
        d = min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        for p_ema, p in zip(self.ema_network.parameters(), self.network.parameters()):
            p_ema.lerp_(p.detach().to(p_ema.dtype), 1.0 - d)
        for b_ema, b in zip(self.ema_network.buffers(), self.network.buffers()):
            b_ema.copy_(b)
        self.num_updates += 1

    def __call__(self, engine: Engine) -> None:
        self.update()

    def state_dict(self) -> dict:
        """The averaged weights and the update count (for ``CheckpointSaver`` / ``CheckpointLoader``)."""
        return {"ema_network": self.ema_network.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :py:meth:`state_dict` output."""
        self.ema_network.load_state_dict(state_dict["ema_network"])
        self.num_updates = int(state_dict["num_updates"])


class SeededEvaluation:
    """
    Run every round of an evaluator with the same random numbers, and leave the training random stream as it
    was: the RNG state is saved and ``torch.manual_seed(seed)`` set when the evaluator starts, and the state is
    restored when it completes. Diffusion maps (CDM, CG-Diff) and noisy-classifier validation draw noise, so
    without this the validation metric of successive rounds would differ by noise alone, and seeding the global
    stream inside training would replay the same training noise after every validation.

    Args:
        seed: seed of every evaluation round.

    Example::

        SeededEvaluation(seed=0).attach(evaluator)
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self._saved: tuple | None = None

    def attach(self, engine: Engine) -> None:
        """Seed at ``STARTED``, restore at ``COMPLETED`` (and on exceptions) of ``engine``."""
        engine.add_event_handler(Events.STARTED, self.seed_rng)
        engine.add_event_handler(Events.COMPLETED, self.restore_rng)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._restore_and_raise)

    def seed_rng(self, engine: Engine | None = None) -> None:
        """Save the CPU (and CUDA) RNG states, then seed."""
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self._saved = (torch.get_rng_state(), cuda)
        torch.manual_seed(self.seed)

    def restore_rng(self, engine: Engine | None = None) -> None:
        """Restore the states saved by :py:meth:`seed_rng`."""
        if self._saved is None:
            return
        cpu, cuda = self._saved
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        self._saved = None

    def _restore_and_raise(self, engine: Engine, e: Exception) -> None:
        self.restore_rng(engine)
        raise e
