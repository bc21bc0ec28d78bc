# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""The segmentation methods a bundle can run, by name, built from one set of hyper-parameters; their default
post-processing per task is read from the task registry (:py:mod:`monai_wsss.data.tasks`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from monai_wsss.data.tasks import MethodDefaults, TaskPreset, get_task
from monai_wsss.inferers import (
    ConditionDifferenceInferer,
    GuidedDiffusionAnomalyInferer,
    IntensityThresholdInferer,
    SegmentationProbabilityInferer,
)

__all__ = [
    "METHODS",
    "CLASSIFIER_METHODS",
    "NETWORK_METHODS",
    "SEGMENTER_METHODS",
    "build_method_inferer",
    "default_map_mode",
    "default_min_component_size",
    "default_normalize_per",
    "default_threshold",
    "method_defaults",
]

#: method names: the second-stage segmentation network trained on diffusion pseudo-masks, CDM, classifier-guided
#: CDM, classifier-guided diffusion (Wolleb et al.), classifier-free guided diffusion (Sanchez et al.), and two
#: intensity baselines without a network: per model-space slice (``threshold``) and the fixed per-volume
#: threshold at full resolution (``volume_threshold``: 0.7 x the 99th body percentile of each volume)
METHODS = ("segmenter", "cdm", "cg_cdm", "cg_diff", "cfg", "threshold", "volume_threshold")
#: methods that need the noisy classifier
CLASSIFIER_METHODS = ("cg_cdm", "cg_diff")
#: methods that need the diffusion network
NETWORK_METHODS = ("cdm", "cg_cdm", "cg_diff", "cfg")
#: methods that need the second-stage segmentation network (``train.json``, the bundles' default network)
SEGMENTER_METHODS = ("segmenter",)

# the per-volume intensity baseline is defined by its fixed threshold on intensity / 99th body percentile, on every
# task (the other methods' defaults are tuned per task, in the task registry)
_VOLUME_THRESHOLD = 0.7
_VOLUME_THRESHOLD_DEFAULTS = MethodDefaults(
    _VOLUME_THRESHOLD, "volume", None, 0, chosen_on="the baseline's definition (docs: DESIGN.md, intensity thresholding)"
)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}, expected one of {METHODS}.")


def method_defaults(method: str, task: str | TaskPreset = "brats") -> MethodDefaults:
    """
    A method's default post-processing on a task, read from the task registry
    (:py:attr:`TaskPreset.method_defaults <monai_wsss.data.TaskPreset>`), with where it was chosen (``chosen_on``).

    Args:
        method: one of :py:data:`METHODS`.
        task: a task name in :py:data:`~monai_wsss.data.TASKS` or a :py:class:`~monai_wsss.data.TaskPreset`.

    Returns:
        the :py:class:`~monai_wsss.data.MethodDefaults`.

    Raises:
        ValueError: unknown method or task, or a task without defaults for the method.

    Example::

        >>> method_defaults("segmenter", "chaos").min_component_size
        1000
    """
    _check_method(method)
    preset = get_task(task)
    if method == "volume_threshold":
        return _VOLUME_THRESHOLD_DEFAULTS
    if method not in preset.method_defaults:
        raise ValueError(
            f"task {preset.name!r} has no defaults for method {method!r} (it has {sorted(preset.method_defaults)}); "
            "add them to its TaskPreset.method_defaults in monai_wsss/data/tasks.py."
        )
    return preset.method_defaults[method]


def default_map_mode(method: str, task: str | TaskPreset = "brats") -> str | None:
    """
    How a method's raw map becomes a ``[0, 1]`` map before thresholding (``NormalizeMap`` mode), from the task
    registry.

    CDM and CG-CDM give a signed map, positive where the target class makes the image brighter: ``"signed"`` for
    hyperintense targets (BraTS FLAIR tumours), ``"abs"`` where the sign is not known to be one-sided (CHAOS
    kidney on T2-SPIR). CG-Diff and classifier-free maps are ``|x - x_hat| >= 0``: ``"abs"``. The threshold
    baselines and the segmenter are kept on their own scale (``None``: no normalisation, then a fixed threshold).

    Args:
        method: one of :py:data:`METHODS`.
        task: a task name or preset.

    Returns:
        ``"signed"``, ``"abs"`` or None.

    Raises:
        ValueError: unknown method or task.

    Example::

        >>> default_map_mode("cdm", "brats"), default_map_mode("cg_diff")
        ('signed', 'abs')
    """
    return method_defaults(method, task).map_mode


def default_threshold(method: str, task: str | TaskPreset = "brats") -> str | float:
    """
    The bundles' default mask threshold of a method (the pipeline's ``threshold``), from the task registry: a
    probability for the segmenter (chosen from labels alone on each task's validation split), 0.7 for
    ``"volume_threshold"`` (its definition), and ``"average_otsu"`` or ``"otsu"`` for the map methods. Each value's
    ``chosen_on`` note (:py:func:`method_defaults`) names where it was chosen.

    Args:
        method: one of :py:data:`METHODS`.
        task: a task name or preset.

    Returns:
        a float, ``"average_otsu"`` or ``"otsu"``.

    Raises:
        ValueError: unknown method or task.

    Example::

        >>> default_threshold("segmenter"), default_threshold("cg_cdm", "brats"), default_threshold("cdm", "chaos")
        (0.5, 'average_otsu', 'otsu')
    """
    return method_defaults(method, task).threshold


def default_min_component_size(method: str, task: str | TaskPreset = "brats") -> int:
    """
    The bundles' default 3D component filter of a method (the pipeline's ``min_component_size``, in voxels), from
    the task registry: 1000 for the segmenter on both tasks, 0 (off) for the other methods.

    Args:
        method: one of :py:data:`METHODS`.
        task: a task name or preset.

    Returns:
        the smallest component kept, in voxels (0: no filter).

    Raises:
        ValueError: unknown method or task.

    Example::

        >>> default_min_component_size("segmenter"), default_min_component_size("cg_cdm")
        (1000, 0)
    """
    return method_defaults(method, task).min_component_size


def default_normalize_per(method: str, task: str | TaskPreset = "brats") -> str:
    """
    ``"volume"`` or ``"slice"``: the map normalisation scope that goes with :py:func:`default_threshold`, from the
    task registry.

    Args:
        method: one of :py:data:`METHODS`.
        task: a task name or preset.

    Returns:
        ``"volume"`` or ``"slice"``.

    Raises:
        ValueError: unknown method or task.

    Example::

        >>> default_normalize_per("cdm", "brats"), default_normalize_per("cdm", "chaos")
        ('volume', 'slice')
    """
    return method_defaults(method, task).normalize_per


def build_method_inferer(
    method: str,
    scheduler=None,
    network: torch.nn.Module | None = None,
    classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    noise_level: int = 200,
    num_steps: int = 10,
    tau: float = 0.95,
    guidance_scale: float = 10.0,
    guided_num_steps: int | None = None,
    cgdiff_level: int = 400,
    cgdiff_guidance: float = 100.0,
    cfg_scale: float = 3.0,
    target_class: int = 1,
    reference_class: int = 0,
    threshold_percentile: float | None = 99.0,
    flip_axes: Sequence[int] = (),
    verbose: bool = False,
) -> Callable[..., torch.Tensor]:
    """
    The 2D inferer of a method, ``inferer(x0, network) -> map``, with its hyper-parameters.

    - ``"cdm"``: :py:class:`~monai_wsss.inferers.ConditionDifferenceInferer`, noise level ``noise_level`` (Q),
      ``num_steps`` (R), ``tau``, no guidance.
    - ``"cg_cdm"``: the same with classifier guidance ``guidance_scale`` (s > 0) and ``guided_num_steps`` steps
      when given, needs ``classifier``.
    - ``"cg_diff"``: :py:class:`~monai_wsss.inferers.GuidedDiffusionAnomalyInferer` in classifier mode, encoding
      level ``cgdiff_level`` (L), guidance ``cgdiff_guidance``, needs ``classifier``.
    - ``"cfg"``: the same in classifier-free mode with weight ``cfg_scale``; needs a network trained with a
      null class.
    - ``"threshold"``: :py:class:`~monai_wsss.inferers.IntensityThresholdInferer` (the image intensity relative
      to its ``threshold_percentile``; no network).
    - ``"volume_threshold"``: the same on whole volumes at full resolution (one percentile per volume).
    - ``"segmenter"``: :py:class:`~monai_wsss.inferers.SegmentationProbabilityInferer`, the softmax target
      probability of the second-stage segmentation network (passed as ``network``).

    The classifier is attached to the inferer as its default, so the inferer is called as
    ``inferer(x0, network)``.

    Args:
        method: one of :py:data:`METHODS`.
        scheduler: the MONAI scheduler the diffusion network was trained with (not needed for ``"threshold"``).
        network: the diffusion network, checked against the method (classes, null class).
        classifier: the noisy classifier (``"cg_cdm"``, ``"cg_diff"``).
        noise_level: CDM noise level Q (timestep index).
        num_steps: CDM DDIM steps R.
        tau: CDM interpolation weight.
        guidance_scale: CG-CDM classifier guidance scale s.
        guided_num_steps: CG-CDM DDIM steps R (``None``: ``num_steps``); guidance gains from more steps where
            plain CDM does not, so each can keep its own tuned R.
        cgdiff_level: CG-Diff / classifier-free encoding level L.
        cgdiff_guidance: CG-Diff classifier guidance scale.
        cfg_scale: classifier-free guidance weight w.
        target_class: class of the target (1).
        reference_class: healthy class (0).
        threshold_percentile: percentile of the threshold baseline (``None``: raw intensity).
        flip_axes: ``"segmenter"``: spatial axes of its mirrored test-time augmentation (empty: none).
        verbose: progress bars over the diffusion steps.

    Returns:
        the inferer.

    Raises:
        ValueError: unknown method; missing scheduler, network or classifier for the method; ``cg_cdm`` with
            ``guidance_scale <= 0``; ``cfg`` with a network without a null class; and the inferers' own
            hyper-parameter checks.

    Example::

        inferer = build_method_inferer("cdm", scheduler, net, noise_level=200, num_steps=10, tau=0.95)
        amap = inferer(x0, net)
    """
    _check_method(method)
    if method == "threshold":
        return IntensityThresholdInferer(percentile=threshold_percentile)
    if method == "volume_threshold":
        return IntensityThresholdInferer(
            percentile=threshold_percentile, threshold=_VOLUME_THRESHOLD, intensity_range=(0.0, 1.0), whole_volume=True
        )
    if method == "segmenter":
        if network is None:
            raise ValueError(
                "method 'segmenter' needs the segmentation network (model_path, trained with train.json)."
            )
        return SegmentationProbabilityInferer(activation="softmax", target_channel=1, flip_axes=flip_axes)
    if scheduler is None:
        raise ValueError(f"method {method!r} needs the diffusion scheduler the network was trained with.")
    if network is None:
        raise ValueError(f"method {method!r} needs the diffusion network (model_path).")
    if method in CLASSIFIER_METHODS and classifier is None:
        raise ValueError(
            f"method {method!r} needs the noisy classifier (classifier_path, trained with train_classifier.json)."
        )
    if method == "cfg" and getattr(network, "null_class", None) is None:
        raise ValueError(
            "method 'cfg' (classifier-free guidance) needs a diffusion network trained with a null class "
            "(train_diffusion.json with --null_class true --label_dropout 0.1, then infer with --null_class true); "
            f"this {type(network).__name__} has none (null_class=false). Use cdm, cg_cdm or cg_diff instead."
        )
    if method in ("cdm", "cg_cdm"):
        scale = 0.0 if method == "cdm" else float(guidance_scale)
        if method == "cg_cdm" and scale <= 0:
            raise ValueError(f"method 'cg_cdm' needs guidance_scale > 0, got {guidance_scale} (0 is plain 'cdm').")
        return ConditionDifferenceInferer(
            scheduler,
            noise_level=noise_level,
            num_steps=int(guided_num_steps) if method == "cg_cdm" and guided_num_steps is not None else num_steps,
            tau=tau,
            target_class=target_class,
            reference_class=reference_class,
            guidance_scale=scale,
            classifier=classifier if method == "cg_cdm" else None,
            verbose=verbose,
        )
    return GuidedDiffusionAnomalyInferer(
        scheduler,
        noise_level=cgdiff_level,
        guidance_scale=float(cgdiff_guidance),
        healthy_class=reference_class,
        mode="classifier" if method == "cg_diff" else "cfg",
        cfg_scale=cfg_scale,
        classifier=classifier if method == "cg_diff" else None,
        verbose=verbose,
    )
