# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""The slice gate of volume-aware masks: a slice keeps its mask only when the noisy classifier, on the clean slice,
says it holds the target."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_tensor

from monai_wsss.transforms.model_space import slices_to_model_space

__all__ = ["SliceGated"]


class SliceGated(MapTransform):
    """
    Empty the mask of every slice whose probability of holding the target, by a classifier on the clean slice
    (in the classifier's own model space), is below ``threshold``; slices without body get 0.

    Args:
        keys: keys of the masks ``(1, H, W, D)`` to gate (in place).
        slice_probability: ``(N, 1, h, w)`` model-space slices -> ``(N,)`` target probabilities, e.g.
            :py:class:`~monai_wsss.inferers.SliceProbabilityInferer` (the noisy classifier at timestep 0).
        threshold: smallest probability a slice needs to keep its mask, in ``[0, 1]``.
        slice_axis: spatial axis of the slices.
        roi_size: the classifier's input size (default: ``slice_probability.classifier.input_shape``).
        image_key: key of the normalised image (``[0, 1]``, 0 outside the body).
        probability_key: also store the per-slice probabilities ``(n_slices,)`` under this key (``None``: no).
        allow_missing_keys: don't raise an exception if a key is missing.

    Raises:
        ValueError: ``threshold`` outside ``[0, 1]``, ``slice_probability`` not callable, or no ``roi_size`` and no
            ``input_shape``.

    Example::

        gate = SliceGated("mask", SliceProbabilityInferer(classifier), threshold=0.5, slice_axis=2)
        gate({"image": image, "mask": mask})
    """

    def __init__(
        self,
        keys: KeysCollection,
        slice_probability: Callable[[torch.Tensor], torch.Tensor],
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
        if not callable(slice_probability):
            raise ValueError(f"`slice_probability` must be callable, got {type(slice_probability).__name__}.")
        classifier = getattr(slice_probability, "classifier", None)
        roi = roi_size if roi_size is not None else getattr(classifier, "input_shape", None)
        if roi is None:
            raise ValueError("SliceGated needs `roi_size` (the classifier's input size) or a classifier with `input_shape`.")
        self.slice_probability = slice_probability
        self.classifier = classifier  # recorded by a run's manifest (its weights' checksum)
        self.threshold = float(threshold)
        self.slice_axis = int(slice_axis) % 3
        self.roi_size = tuple(int(r) for r in roi)
        self.image_key = image_key
        self.probability_key = probability_key

    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Per-slice target probability ``(n_slices,)`` of a normalised volume ``(1, H, W, D)`` (0 without body)."""
        slices = convert_to_tensor(image, track_meta=False)[0].movedim(self.slice_axis, 0).float()
        device = next((p.device for p in getattr(self.classifier, "parameters", lambda: iter(()))()), torch.device("cpu"))
        prob = torch.zeros(slices.shape[0])
        todo = torch.nonzero(slices.flatten(1).ne(0).any(1)).flatten()
        for start in range(0, int(todo.numel()), 64):
            chunk = todo[start : start + 64]
            x = slices_to_model_space(slices[chunk][:, None].to(device), self.roi_size)
            probability = getattr(self.slice_probability, "probabilities", self.slice_probability)
            prob[chunk] = probability(x).float().cpu()
        return prob

    def keep(self, image: torch.Tensor, probabilities: torch.Tensor | None = None) -> torch.Tensor:
        """``(1, H, W, D)``-broadcastable 0/1 tensor: the slices the gate keeps (from ``probabilities`` when given)."""
        prob = self.probabilities(image) if probabilities is None else probabilities
        shape = [1, 1, 1, 1]
        shape[self.slice_axis + 1] = -1
        return (prob >= self.threshold).float().reshape(shape)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        prob = self.probabilities(d[self.image_key])
        keep = self.keep(d[self.image_key], prob)
        for key in self.key_iterator(d):
            d[key] = d[key] * keep.to(device=d[key].device, dtype=d[key].dtype)
        if self.probability_key is not None:
            d[self.probability_key] = prob
        return d
