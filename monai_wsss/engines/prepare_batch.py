# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""Prepare-batch callables that let MONAI's ``SupervisedTrainer`` train class-conditional diffusion models and
noisy classifiers with a plain ``SimpleInferer``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.engines.utils import DiffusionPrepareBatch, default_prepare_batch

__all__ = ["ClassConditionalDiffusionPrepareBatch", "NoisyClassifierPrepareBatch", "SegmentationPrepareBatch"]


def _labels_from(batchdata: Any, key: str, device, non_blocking: bool) -> torch.Tensor:
    if not isinstance(batchdata, Mapping) or key not in batchdata:
        raise ValueError(f"batch has no key {key!r} with the slice labels (keys: {list(batchdata) if isinstance(batchdata, Mapping) else type(batchdata).__name__}).")
    return torch.as_tensor(batchdata[key]).reshape(-1).long().to(device, non_blocking=non_blocking)


class ClassConditionalDiffusionPrepareBatch(DiffusionPrepareBatch):
    """
    MONAI's :class:`~monai.engines.utils.DiffusionPrepareBatch` for class-conditional noise prediction: the images
    are noised here (``scheduler.add_noise``) and the network is called as
    ``network(x_t, timesteps=t, class_labels=y)`` by a plain :class:`~monai.inferers.SimpleInferer`
    (MONAI's ``DiffusionInferer`` passes conditions as cross-attention context, not as class labels).

    With ``label_dropout > 0`` each label is replaced by ``null_class`` with that probability, which trains the
    unconditional branch needed by classifier-free guidance.

    Args:
        scheduler: the MONAI noise scheduler (its ``num_train_timesteps`` and ``add_noise`` are used).
        label_key: batch key of the integer class labels.
        label_dropout: probability of replacing a label by ``null_class``.
        null_class: index of the null class (``ConditionalDiffusionUNet(null_class=True).null_class``).

    Returns (``__call__``):
        ``(x_t, noise, (), {"timesteps": t, "class_labels": y})``: input, target, args and kwargs of the engine.

    Raises:
        ValueError: ``label_dropout`` outside [0, 1), dropout without ``null_class``, or a batch without ``label_key``.

    Example::

        prepare = ClassConditionalDiffusionPrepareBatch(scheduler, label_dropout=0.1, null_class=2)
        trainer = SupervisedTrainer(..., inferer=SimpleInferer(), prepare_batch=prepare, loss_function=MSELoss())
    """

    def __init__(
        self, scheduler, label_key: str = "label", label_dropout: float = 0.0, null_class: int | None = None
    ) -> None:
        super().__init__(num_train_timesteps=scheduler.num_train_timesteps, condition_name=label_key)
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}.")
        if label_dropout > 0 and null_class is None:
            raise ValueError("label_dropout > 0 needs null_class (the index labels are dropped to).")
        self.scheduler = scheduler
        self.label_key = label_key
        self.label_dropout = label_dropout
        self.null_class = null_class

    def __call__(  # type: ignore[override]
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        images, _ = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        labels = _labels_from(batchdata, self.label_key, images.device, non_blocking)
        noise = self.get_noise(images)
        timesteps = self.get_timesteps(images)
        if self.label_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.label_dropout
            labels = torch.where(drop, torch.full_like(labels, int(self.null_class)), labels)  # type: ignore[arg-type]
        noisy = self.scheduler.add_noise(original_samples=images, noise=noise, timesteps=timesteps)
        target = self.get_target(images, noise, timesteps)
        return noisy, target, (), {"timesteps": timesteps, "class_labels": labels}


class NoisyClassifierPrepareBatch(DiffusionPrepareBatch):
    """
    Batches for training a :class:`~monai_wsss.networks.nets.NoisyClassifier`: images noised at random timesteps
    in ``[0, max_timestep)``, the slice label as target, and the network called as ``classifier(x_t, timesteps=t)``
    by a :class:`~monai.inferers.SimpleInferer`; train with cross-entropy. Timestep 0 keeps the image clean, so
    the same classifier serves the CAM baselines at t = 0.

    Args:
        scheduler: the diffusion model's noise scheduler (the classifier must see the same noise levels).
        label_key: batch key of the integer class labels.
        max_timestep: exclusive upper bound of the sampled timesteps (default: all of them). Guidance only runs at
            levels up to the inferers' noise level, so a lower bound focuses the classifier there.

    Returns (``__call__``):
        ``(x_t, labels, (), {"timesteps": t})``.

    Raises:
        ValueError: for ``max_timestep`` outside [1, T] or a batch without ``label_key``.

    Example::

        prepare = NoisyClassifierPrepareBatch(scheduler, max_timestep=500)
        trainer = SupervisedTrainer(..., network=clf, inferer=SimpleInferer(), prepare_batch=prepare,
                                    loss_function=torch.nn.CrossEntropyLoss())
    """

    def __init__(self, scheduler, label_key: str = "label", max_timestep: int | None = None) -> None:
        super().__init__(num_train_timesteps=scheduler.num_train_timesteps)
        max_timestep = scheduler.num_train_timesteps if max_timestep is None else int(max_timestep)
        if not 1 <= max_timestep <= scheduler.num_train_timesteps:
            raise ValueError(f"max_timestep must be in [1, {scheduler.num_train_timesteps}], got {max_timestep}.")
        self.scheduler = scheduler
        self.label_key = label_key
        self.max_timestep = max_timestep

    def get_timesteps(self, images: torch.Tensor) -> torch.Tensor:
        return torch.randint(0, self.max_timestep, (images.shape[0],), device=images.device).long()

    def __call__(  # type: ignore[override]
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        images, _ = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        labels = _labels_from(batchdata, self.label_key, images.device, non_blocking)
        timesteps = self.get_timesteps(images)
        noisy = self.scheduler.add_noise(original_samples=images, noise=self.get_noise(images), timesteps=timesteps)
        return noisy, labels, (), {"timesteps": timesteps}


class SegmentationPrepareBatch(DiffusionPrepareBatch):
    """
    Evaluation batches for weakly supervised segmentation: the image as input and the pixel ground truth
    (``seg``, not the weak ``label``) as target, so that a MONAI ``SupervisedEvaluator`` running a map inferer
    (CDM, CG-Diff, a CAM ...) and post-processing can report Dice against the masks.

    With ``seed`` every batch gets its own ``torch.Generator`` seeded with it, passed to the inferer as
    ``generator=``: the diffusion noise of a volume then depends on the seed alone, not on the volumes before it.

    Args:
        target_key: batch key of the pixel ground truth.
        require_target: refuse a batch without ``target_key`` (evaluation); False passes ``None`` (inference).
        seed: seed of the per-batch generator (``None``: no generator is passed, for inferers without noise).

    Returns (``__call__``):
        ``(image, seg, (), {})``, or ``(image, seg, (), {"generator": g})`` with ``seed``.

    Raises:
        ValueError: for a batch without ``target_key`` when it is required.

    Example::

        evaluator = SupervisedEvaluator(..., inferer=ConditionDifferenceInferer(...),
                                        prepare_batch=SegmentationPrepareBatch(seed=0))
    """

    def __init__(self, target_key: str = "seg", require_target: bool = True, seed: int | None = None) -> None:
        super().__init__(num_train_timesteps=1)
        self.target_key = target_key
        self.require_target = bool(require_target)
        self.seed = None if seed is None else int(seed)

    def __call__(  # type: ignore[override]
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple, dict]:
        if not isinstance(batchdata, Mapping) or (self.require_target and self.target_key not in batchdata):
            raise ValueError(f"batch has no key {self.target_key!r} with the pixel ground truth.")
        images, _ = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        target = batchdata.get(self.target_key)
        if target is not None:
            target = torch.as_tensor(target).to(device=images.device, non_blocking=non_blocking)
        extra = {} if self.seed is None else {"generator": torch.Generator(device=images.device).manual_seed(self.seed)}
        return images, target, (), extra
