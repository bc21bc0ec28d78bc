# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""Class activation map (CAM) baselines behind the same ``inferer(x0, network, ...) -> map`` interface as CDM."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.inferers import Inferer
from monai.utils import OptionalImportError, convert_to_tensor, optional_import

from monai_wsss.inferers.diffusion_map import DiffusionMapInferer

__all__ = ["ClassActivationMapInferer", "TimestepClassifierWrapper", "CAM_METHODS", "default_cam_target_layer"]

#: CAM methods of ``grad-cam`` offered by :class:`ClassActivationMapInferer`.
CAM_METHODS = ("gradcam", "gradcam++", "scorecam", "layercam")

MISSING_GRAD_CAM = (
    "ClassActivationMapInferer needs the optional `grad-cam` package (module pytorch_grad_cam, which also needs "
    "torchvision built for the installed torch): install the extra with `pip install 'monai_wsss[baselines]'`."
)


class TimestepClassifierWrapper(nn.Module):
    """
    Single-argument view ``model(x) -> logits`` of a timestep-aware classifier ``classifier(x, t)``.

    ``grad-cam`` calls ``model(x)`` only; this module supplies a constant timestep of the right batch size
    and device on every call (ScoreCAM calls the model on batches of masked images of varying size).

    Args:
        classifier: ``classifier(x, timesteps) -> logits (B, K)``, e.g. a
            :class:`~monai_wsss.networks.nets.NoisyClassifier`; a plain ``classifier(x)`` when ``timestep`` is None.
        timestep: timestep index passed with every input (0 = clean images), or None to call ``classifier(x)``.
        target_class: when given, check that the logits have a column for this class.

    Raises:
        ValueError (at call time): the classifier does not return logits of shape (B, K) with K > ``target_class``.

    Example::

        model = TimestepClassifierWrapper(clf, timestep=0)
        logits = model(x)  # == clf(x, torch.zeros(len(x), dtype=torch.long))
    """

    def __init__(self, classifier: nn.Module, timestep: int | None = 0, target_class: int | None = None) -> None:
        super().__init__()
        self.classifier = classifier
        self.timestep = timestep
        self.target_class = target_class

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.timestep is None:
            logits = self.classifier(x)
        else:
            logits = self.classifier(x, torch.full((x.shape[0],), self.timestep, dtype=torch.long, device=x.device))
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"the classifier must return logits of shape (B, K) = ({x.shape[0]}, K), got {shape}.")
        if self.target_class is not None and self.target_class >= logits.shape[1]:
            last = logits.shape[1] - 1
            raise ValueError(f"target_class={self.target_class} is outside the classifier's classes 0..{last}.")
        return logits


def default_cam_target_layer(classifier: nn.Module) -> nn.Module:
    """
    Default CAM layer of a :class:`~monai_wsss.networks.nets.NoisyClassifier` (any MONAI
    ``DiffusionModelEncoder``): the last residual block of the last down block, ``down_blocks[-1].resnets[-1]``.

    It is the deepest convolutional feature map before the final downsampling and the fully connected head
    (16 x 16 for 64 x 64 inputs and three levels), i.e. the usual "last convolutional layer" of Grad-CAM.

    Args:
        classifier: the classifier (a wrapper with a ``classifier`` attribute is unwrapped).

    Raises:
        ValueError: the classifier has no ``down_blocks[-1].resnets``; pass ``target_layer`` explicitly.
    """
    inner = classifier.classifier if isinstance(classifier, TimestepClassifierWrapper) else classifier
    try:
        return inner.down_blocks[-1].resnets[-1]  # type: ignore[index,union-attr]
    except (AttributeError, IndexError, TypeError):
        raise ValueError(
            f"no default CAM target layer for {type(inner).__name__} (expected down_blocks[-1].resnets[-1] as in "
            "NoisyClassifier); pass target_layer= (a module or its name in classifier.named_modules())."
        ) from None


@lru_cache(maxsize=None)
def _grad_cam_classes() -> dict[str, Any]:
    """Import ``pytorch_grad_cam`` on first use (it pulls in torchvision and OpenCV) and map method names to classes."""
    grad_cam, has_grad_cam = optional_import("pytorch_grad_cam")
    if not has_grad_cam:
        try:
            grad_cam()  # the stub raises the import failure
        except OptionalImportError as err:
            reason = str(err).split("\n")[0]
            raise OptionalImportError(f"{MISSING_GRAD_CAM} Cause: {reason}") from None
    classes: dict[str, Any] = {
        "gradcam": grad_cam.GradCAM,
        "gradcam++": grad_cam.GradCAMPlusPlus,
        "layercam": grad_cam.LayerCAM,
        "target": grad_cam.utils.model_targets.ClassifierOutputTarget,
    }
    # ScoreCAM: same weights as grad-cam's, computed batched across images and without a progress bar per image
    classes["scorecam"] = type("BatchedScoreCAM", (_BatchedScoreWeights, grad_cam.ScoreCAM), {})
    return classes


class _BatchedScoreWeights:
    """
    ScoreCAM channel weights (Wang et al., CVPR-W 2020) exactly as ``pytorch_grad_cam.ScoreCAM`` computes them:
    each activation channel, upsampled (bilinear, ``align_corners=True``) and min-max scaled to [0, 1], masks
    the input; the target's logit on the masked input is the channel's score; the weights are the softmax of
    the scores over channels. grad-cam runs the masked images of one image at a time with a progress bar;
    here all images' masked inputs go through the model in chunks of ``batch_size``.
    """

    batch_size: int = 64

    # grad-cam's signature; target_layer and grads are not used by ScoreCAM
    def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):
        with torch.no_grad():
            act = torch.as_tensor(activations, device=self.device)  # type: ignore[attr-defined]
            mode = "bilinear" if act.ndim == 4 else "trilinear"
            up = F.interpolate(act, size=input_tensor.shape[2:], mode=mode, align_corners=True)
            flat = up.flatten(2)
            vmin, vmax = flat.amin(-1), flat.amax(-1)
            up = (up - vmin[(...,) + (None,) * (up.ndim - 2)]) / (vmax - vmin + 1e-8)[(...,) + (None,) * (up.ndim - 2)]
            b, c = act.shape[:2]
            # (B, C, C_in, *spatial): image b masked by its activation channel c
            masked = (input_tensor[:, None] * up[:, :, None]).flatten(0, 1)
            model = self.model  # type: ignore[attr-defined]
            outputs = torch.cat([model(chunk) for chunk in masked.split(self.batch_size)])
            outputs = outputs.view(b, c, -1)
            scores = torch.stack([target(outputs[i]) for i, target in enumerate(targets)]).float()
            return torch.softmax(scores, dim=-1).cpu().numpy()


@contextlib.contextmanager
def _parameters_untouched(module: nn.Module, freeze: bool) -> Iterator[None]:
    """
    Keep the caller's classifier as it was: training flag, ``requires_grad`` and ``.grad`` of every parameter.

    grad-cam puts the model in eval mode and zeroes its gradients; with ``freeze`` the parameters also stop
    requiring gradients during the call, so the backward pass computes input-side gradients only (faster).
    """
    params = list(module.parameters())
    saved = [(p.requires_grad, p.grad) for p in params]
    modes = [(m, m.training) for m in module.modules()]
    try:
        if freeze:
            for p in params:
                p.requires_grad_(False)
        yield
    finally:
        for p, (requires_grad, grad) in zip(params, saved):
            p.requires_grad_(requires_grad)
            p.grad = grad
        for m, training in modes:
            m.training = training


class ClassActivationMapInferer(Inferer):
    """
    CAM baselines of the CDM paper's tables (Hu et al., MICCAI 2023): GradCAM, GradCAM++, ScoreCAM and LayerCAM
    maps of a slice classifier, computed with the ``grad-cam`` package (pytorch-grad-cam, as the paper did;
    MONAI's ``GradCAMpp`` fails for batches larger than one).

    The classifier is the :class:`~monai_wsss.networks.nets.NoisyClassifier` used for guidance, evaluated at
    ``timestep=0``: trained on noise levels that include t = 0, it is a plain classifier of clean slices, so no
    extra network has to be trained for the baselines. Any plain classifier ``classifier(x) -> logits`` works
    with ``timestep=None`` and an explicit ``target_layer``.

    The map is the CAM of ``target_class`` (1 = target present) at ``target_layer``, ReLU-ed, resized to the
    input resolution and min-max normalised per image to [0, 1] by grad-cam (an image whose CAM is
    nowhere positive gives an all-zero map). Larger = more target. ``grad-cam`` is an optional dependency
    (extra ``monai_wsss[baselines]``), imported when the inferer is created.

    Notes: the default layer's output is a residual stream with signed values, whereas GradCAM++'s weights
    assume non-negative (post-ReLU) activations; for some images it can then yield an all-zero map. ScoreCAM
    needs one classifier forward pass per channel of the target layer and image (64 for the default
    NoisyClassifier), about 20-40x the cost of GradCAM; its weights equal grad-cam's ``ScoreCAM`` but are
    computed batched across images. Inputs of other sizes than the classifier's ``input_shape`` raise.

    Args:
        method: ``"gradcam"``, ``"gradcam++"``, ``"scorecam"`` or ``"layercam"`` (case-insensitive).
        target_class: class whose evidence is mapped.
        timestep: timestep index given to the classifier with every input (0 = clean images); None calls
            ``classifier(x)`` for classifiers without a timestep input.
        target_layer: the layer whose activations are weighted: a module of the classifier, its name in
            ``classifier.named_modules()`` (e.g. ``"down_blocks.2.resnets.0"``, handy in bundle configs), or
            a sequence of those (grad-cam averages their maps). None = :func:`default_cam_target_layer`, the
            last residual block of the last down block of a NoisyClassifier.
        score_batch_size: ScoreCAM only: masked images per classifier call (ScoreCAM runs the classifier once
            per activation channel and image).

    Returns (``__call__``):
        the map in [0, 1], shape (B, 1, *spatial) of the input, on the input's device and dtype.

    Raises:
        OptionalImportError: ``grad-cam`` (``pytorch_grad_cam``) cannot be imported.
        ValueError: an unknown ``method``, a negative ``target_class`` or ``timestep``, ``score_batch_size < 1``;
            at call time: no classifier, an input that is not a float tensor of rank ``spatial_dims + 2``, a
            channel count other than the classifier's ``in_channels``, NaN/inf values, a ``target_class`` the classifier does not have, an unknown
            ``target_layer`` name, or no default layer for the classifier.

    Example::

        cam = ClassActivationMapInferer("gradcam++", target_class=1)
        heat = cam(x0, clf)                      # x0 (B, 1, 64, 64) in [-1, 1], clf a NoisyClassifier
        heat = cam(x0, net, classifier=clf)      # same call as the diffusion inferers; net is not used
    """

    def __init__(
        self,
        method: str = "gradcam",
        target_class: int = 1,
        timestep: int | None = 0,
        target_layer: str | nn.Module | Sequence[str | nn.Module] | None = None,
        score_batch_size: int = 64,
    ) -> None:
        if not isinstance(method, str) or method.lower() not in CAM_METHODS:
            raise ValueError(f"method must be one of {CAM_METHODS}, got {method!r}.")
        if isinstance(target_class, bool) or int(target_class) != target_class or target_class < 0:
            raise ValueError(f"target_class must be a non-negative integer, got {target_class!r}.")
        if timestep is not None and (isinstance(timestep, bool) or int(timestep) != timestep or timestep < 0):
            raise ValueError(f"timestep must be a non-negative integer or None, got {timestep!r}.")
        if isinstance(score_batch_size, bool) or int(score_batch_size) != score_batch_size or score_batch_size < 1:
            raise ValueError(f"score_batch_size must be a positive integer, got {score_batch_size!r}.")
        self.method = method.lower()
        self.target_class = int(target_class)
        self.timestep = None if timestep is None else int(timestep)
        self.target_layer = target_layer
        self.score_batch_size = int(score_batch_size)
        self._classes = _grad_cam_classes()

    def resolve_target_layers(self, classifier: nn.Module) -> list[nn.Module]:
        """
        The classifier's modules the CAM is computed at (see ``target_layer``).

        Raises:
            ValueError: a name that is not in ``classifier.named_modules()``, a module that is not part of the
                classifier, or no default layer.
        """
        if self.target_layer is None:
            return [default_cam_target_layer(classifier)]
        layers = [self.target_layer] if isinstance(self.target_layer, (str, nn.Module)) else list(self.target_layer)
        if not layers:
            raise ValueError("target_layer is an empty sequence; give at least one layer or None for the default.")
        named = dict(classifier.named_modules())
        owned = {id(m) for m in named.values()}
        resolved = []
        for layer in layers:
            if isinstance(layer, str):
                if layer not in named or layer == "":
                    examples = [n for n in named if n.endswith("resnets.0")][:4]
                    raise ValueError(
                        f"target_layer {layer!r} is not a module of {type(classifier).__name__} "
                        f"(names as in named_modules(), e.g. {examples})."
                    )
                resolved.append(named[layer])
            elif isinstance(layer, nn.Module) and id(layer) in owned:
                resolved.append(layer)
            else:
                raise ValueError(f"target_layer {type(layer).__name__} is not a module of {type(classifier).__name__}.")
        return resolved

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: nn.Module | None = None,
        classifier: nn.Module | None = None,
    ) -> torch.Tensor:
        """
        Args:
            inputs: images in model space (B, 1, *spatial), e.g. (B, 1, 64, 64) in [-1, 1].
            network: the classifier, when ``classifier`` is not given (``cam(x0, clf)``).
            classifier: the classifier; takes precedence over ``network``, so that ``cam(x0, net, classifier=clf)``
                works like the diffusion inferers (the diffusion network ``net`` is not used).

        Returns:
            CAM in [0, 1], shape (B, 1, *spatial), input's device and dtype.
        """
        model = classifier if classifier is not None else network
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"ClassActivationMapInferer needs a classifier (an nn.Module), got {type(model).__name__}; "
                "call cam(x0, classifier) or cam(x0, net, classifier=classifier)."
            )
        DiffusionMapInferer.check_inputs(inputs, model)
        in_channels = getattr(model, "in_channels", None)
        if isinstance(in_channels, int) and inputs.shape[1] != in_channels:
            raise ValueError(f"inputs have {inputs.shape[1]} channels, the classifier expects {in_channels}.")
        if self.method == "scorecam" and inputs.ndim not in (4, 5):
            raise ValueError(f"scorecam supports 2D or 3D images, got shape {tuple(inputs.shape)}.")
        num_classes = getattr(model, "num_classes", None)
        if isinstance(num_classes, int) and self.target_class >= num_classes:
            raise ValueError(
                f"target_class={self.target_class} is outside the classifier's classes 0..{num_classes - 1}."
            )
        layers = self.resolve_target_layers(model)

        wrapper = TimestepClassifierWrapper(model, self.timestep, self.target_class)
        uses_gradients = self.method != "scorecam"
        # works under a caller's no_grad / inference_mode: the gradient methods need autograd on a normal tensor.
        # Not torch.set_grad_enabled(flag) built before the `with`: it switches the mode at construction, so its
        # exit "restores" the mode it switched to and grad stays off for the caller after ScoreCAM
        grad_context = torch.enable_grad() if uses_gradients else torch.no_grad()
        with torch.inference_mode(False), grad_context, _parameters_untouched(model, freeze=True):
            x = convert_to_tensor(inputs, track_meta=False).detach().clone()
            cam = self._classes[self.method](wrapper, target_layers=layers)
            try:
                if uses_gradients:
                    # the parameters are frozen, so autograd must start from the input
                    cam.compute_input_gradient = True
                else:
                    cam.batch_size = self.score_batch_size
                targets = [self._classes["target"](self.target_class)] * x.shape[0]
                maps = cam(input_tensor=x, targets=targets)  # numpy (B, *spatial), per image in [0, 1], input size
            finally:
                cam.activations_and_grads.release()
        out = torch.from_numpy(np.ascontiguousarray(maps)).unsqueeze(1)
        return out.to(device=inputs.device, dtype=inputs.dtype)
