# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""The slice gate of volume-aware masks: a slice keeps its mask only when the noisy classifier, on the clean slice,
says it holds the target."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_tensor

from monai_wsss.inferers.segmenter import SliceProbabilityInferer
from monai_wsss.inferers.volume import VolumeInferer

__all__ = ["SliceGated"]


class SliceGated(MapTransform):
    """
    Empty the mask of every slice whose probability of holding the target, by ``classifier`` on the clean slice
    (timestep 0, in the classifier's own model space), is below ``threshold``; slices without body get 0.

    Args:
        keys: keys of the masks ``(1, H, W, D)`` to gate (in place).
        classifier: ``classifier(x, timesteps) -> logits``, e.g. :py:class:`~monai_wsss.networks.nets.NoisyClassifier`.
        threshold: smallest probability a slice needs to keep its mask, in ``[0, 1]``.
        slice_axis: spatial axis of the slices.
        roi_size: the classifier's input size (default: its ``input_shape``).
        image_key: key of the normalised image (``[0, 1]``, 0 outside the body).
        probability_key: also store the per-slice probabilities ``(n_slices,)`` under this key (``None``: no).
        allow_missing_keys: don't raise an exception if a key is missing.

    Raises:
        ValueError: ``threshold`` outside ``[0, 1]``, no classifier, or no ``roi_size`` and no ``input_shape``.

    Example::

        SliceGated("mask", classifier, threshold=0.5, slice_axis=2)({"image": image, "mask": mask})
    """

    def __init__(
        self,
        keys: KeysCollection,
        classifier: Callable[..., torch.Tensor],
        threshold: float = 0.5,
        slice_axis: int = 2,
        roi_size: Sequence[int] | None = None,
        image_key: str = "image",
        probability_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"`threshold` of the slice gate must be a probability in [0, 1], got {threshold!r}.")
        roi = roi_size if roi_size is not None else getattr(classifier, "input_shape", None)
        if roi is None:
            raise ValueError("SliceGated needs `roi_size` (the classifier's input size) or a classifier with `input_shape`.")
        self.gate = SliceProbabilityInferer(classifier)
        self.threshold = float(threshold)
        self.slice_axis = int(slice_axis) % 3
        self.model_space = VolumeInferer(roi_size=tuple(roi), slice_axis=self.slice_axis)
        self.image_key = image_key
        self.probability_key = probability_key

    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Per-slice target probability ``(n_slices,)`` of a normalised volume ``(1, H, W, D)`` (0 without body)."""
        slices = convert_to_tensor(image, track_meta=False)[0].movedim(self.slice_axis, 0).float()
        device = next((p.device for p in getattr(self.gate.classifier, "parameters", lambda: iter(()))()), torch.device("cpu"))
        prob = torch.zeros(slices.shape[0])
        todo = torch.nonzero(slices.flatten(1).ne(0).any(1)).flatten()
        for start in range(0, int(todo.numel()), 64):
            chunk = todo[start : start + 64]
            x = self.model_space.to_model_space(slices[chunk][:, None].to(device))
            prob[chunk] = self.gate.probabilities(x).cpu()
        return prob

    def keep(self, image: torch.Tensor) -> torch.Tensor:
        """``(1, H, W, D)``-broadcastable 0/1 tensor: the slices the gate keeps."""
        shape = [1, 1, 1, 1]
        shape[self.slice_axis + 1] = -1
        return (self.probabilities(image) >= self.threshold).float().reshape(shape)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        prob = self.probabilities(d[self.image_key])
        shape = [1, 1, 1, 1]
        shape[self.slice_axis + 1] = -1
        keep = (prob >= self.threshold).reshape(shape)
        for key in self.key_iterator(d):
            d[key] = d[key] * keep.to(device=d[key].device, dtype=d[key].dtype)
        if self.probability_key is not None:
            d[self.probability_key] = prob
        return d
