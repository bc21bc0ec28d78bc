# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""One forward pass per slice: the second stage of weakly supervised segmentation and the classifier slice gate."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.inferers import Inferer
from monai.utils import convert_to_tensor

from monai_wsss.inferers.diffusion_map import DiffusionMapInferer

__all__ = ["SegmentationProbabilityInferer", "SliceProbabilityInferer"]


class SegmentationProbabilityInferer(Inferer):
    """
    The target probability map of a 2D segmentation network (e.g. MONAI ``UNet`` trained on diffusion
    pseudo-masks with ``train.json``): one forward pass, then softmax over the output channels
    (``activation="softmax"``, the ``DiceCELoss(softmax=True, to_onehot_y=True)`` training) or a sigmoid
    (``"sigmoid"``), keeping the ``target_channel``. Runs under ``torch.inference_mode``.

    It has the interface of the diffusion inferers, ``inferer(x, network) -> map``, so
    :py:class:`~monai_wsss.inferers.VolumeInferer` and the bundles' pipeline run it like any other method.

    With ``flip_axes``, test-time augmentation by mirroring: each slice is also segmented flipped along each
    listed spatial axis, and the map is the mean of the probabilities of the slice and of every flipped copy
    (flipped back). One more forward pass per axis; use axes the network was trained to be mirrored along
    (the bundles' ``train.json`` flips spatial axis 0, left-right after their orientation).

    Args:
        activation: ``"softmax"`` or ``"sigmoid"``.
        target_channel: output channel of the target class (1 for a two-channel softmax network, 0 for a
            one-channel sigmoid network).
        flip_axes: spatial axes (0 = the first axis after the channel) to average mirrored copies over;
            empty: one forward pass.

    Returns (``__call__``):
        the probability map ``(B, 1, H, W)`` in ``[0, 1]``, the input's dtype and device.

    Raises:
        ValueError: unknown activation, negative channel, a negative or repeated flip axis; at call time an input
            that is not a finite float ``(B, C, H, W)`` / ``(B, C, H, W, D)`` tensor with at least one item, a
            flip axis beyond its spatial dimensions, or a network output with too few channels.

    Example::

        >>> import torch
        >>> from monai.networks.nets import UNet
        >>> net = UNet(2, 1, 2, channels=(8, 16), strides=(2,))
        >>> SegmentationProbabilityInferer()(torch.zeros(3, 1, 32, 32), net).shape
        torch.Size([3, 1, 32, 32])
        >>> SegmentationProbabilityInferer(flip_axes=(0,))(torch.zeros(3, 1, 32, 32), net).shape  # left-right TTA
        torch.Size([3, 1, 32, 32])
    """

    def __init__(self, activation: str = "softmax", target_channel: int = 1, flip_axes: Sequence[int] = ()) -> None:
        super().__init__()
        if activation not in ("softmax", "sigmoid"):
            raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}.")
        if int(target_channel) < 0:
            raise ValueError(f"target_channel must be >= 0, got {target_channel}.")
        axes = tuple(int(a) for a in (flip_axes or ()))
        if any(a < 0 for a in axes) or len(set(axes)) != len(axes):
            raise ValueError(f"flip_axes must be distinct spatial axes >= 0, got {list(flip_axes)}.")
        self.activation = activation
        self.target_channel = int(target_channel)
        self.flip_axes = axes

    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: Callable[[torch.Tensor], torch.Tensor], *args, **kwargs
    ) -> torch.Tensor:
        """
        Args:
            inputs: model-space images.
            network: the segmentation network.
            args: ignored (interface of the other inferers).
            kwargs: ignored (e.g. ``classifier=``, ``generator=`` passed by pipelines to every method).
        """
        if network is None:
            raise ValueError("SegmentationProbabilityInferer needs the segmentation network (model_path, trained with train.json).")
        DiffusionMapInferer.check_inputs(inputs, None)  # type: ignore[arg-type]
        x = convert_to_tensor(inputs, track_meta=False)
        beyond = [a for a in self.flip_axes if a >= x.ndim - 2]
        if beyond:
            raise ValueError(f"flip_axes {beyond} are beyond the {x.ndim - 2} spatial axes of the input {tuple(x.shape)}.")
        with torch.inference_mode():
            prob = self._probability(network(x))
            for axis in self.flip_axes:
                prob += self._probability(network(torch.flip(x, (axis + 2,)))).flip(axis + 2)
        return (prob / (1 + len(self.flip_axes))).to(inputs.dtype)

    def _probability(self, logits: torch.Tensor) -> torch.Tensor:
        """The float32 target probability ``(B, 1, ...)`` of a network output."""
        if logits.shape[1] <= self.target_channel:
            raise ValueError(
                f"the segmentation network returned {logits.shape[1]} channel(s); target_channel is {self.target_channel}."
            )
        prob = torch.softmax(logits.float(), 1) if self.activation == "softmax" else torch.sigmoid(logits.float())
        return prob[:, self.target_channel : self.target_channel + 1].clone()


class SliceProbabilityInferer(Inferer):
    """
    The probability that a clean slice holds the target, from the noisy classifier at timestep 0, broadcast to
    the slice's pixels: with :py:class:`~monai_wsss.inferers.VolumeInferer` it gives one value per slice of a
    volume, the slice gate of the volume-aware masks (slices below a probability get an empty mask).

    Args:
        classifier: ``classifier(x, timesteps) -> logits`` (e.g. :py:class:`~monai_wsss.networks.nets.NoisyClassifier`).
        target_class: logit index of the target class.
        timestep: the classifier's timestep (0: the clean image).

    Returns (``__call__``):
        ``(B, 1, H, W)``, constant per item, the softmax probability of ``target_class``.

    Raises:
        ValueError: no classifier, negative ``target_class`` / ``timestep``, invalid input.

    Example::

        gate = SliceProbabilityInferer(clf)
        p = gate.probabilities(x)                 # (B,): one value per model-space slice
        as_map = gate(x)                          # (B, 1, H, W): the same value at every pixel
    """

    def __init__(self, classifier: Callable[..., torch.Tensor], target_class: int = 1, timestep: int = 0) -> None:
        super().__init__()
        if classifier is None or not callable(classifier):
            raise ValueError("SliceProbabilityInferer needs the noisy classifier (classifier_path).")
        if int(target_class) < 0 or int(timestep) < 0:
            raise ValueError(f"target_class and timestep must be >= 0, got {target_class} and {timestep}.")
        self.classifier = classifier
        self.target_class = int(target_class)
        self.timestep = int(timestep)

    def __call__(self, inputs: torch.Tensor, network: object = None, *args, **kwargs) -> torch.Tensor:  # type: ignore[override]
        """
        Args:
            inputs: model-space images ``(B, C, H, W)``.
            network: ignored (interface of the other inferers).
            args: ignored.
            kwargs: ignored.
        """
        x = convert_to_tensor(inputs, track_meta=False)
        prob = self.probabilities(x)
        shape = (x.shape[0], 1, *x.shape[2:])
        return prob.reshape(-1, 1, *([1] * (x.ndim - 2))).expand(shape).to(inputs.dtype).clone()

    def probabilities(self, inputs: torch.Tensor) -> torch.Tensor:
        """
        The target probability of each item of a model-space batch ``(B, C, H, W)``: a float32 tensor ``(B,)``.

        Raises:
            ValueError: an invalid input.
        """
        DiffusionMapInferer.check_inputs(inputs, None)  # type: ignore[arg-type]
        x = convert_to_tensor(inputs, track_meta=False)
        t = torch.full((x.shape[0],), self.timestep, device=x.device, dtype=torch.long)
        with torch.inference_mode():
            return torch.softmax(self.classifier(x, t).float(), 1)[:, self.target_class].clone()
