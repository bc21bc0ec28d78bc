# Copyright (c) monai_wsss contributors
# Licensed under the Apache License, Version 2.0
"""Slice-by-slice inference of a 2D inferer or network over 3D volumes, in batches of slices."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from monai.inferers import Inferer
from monai.utils import convert_to_dst_type, convert_to_tensor, optional_import

from monai_wsss.transforms.model_space import IMAGE_INTERPOLATION, resize_slices, slices_to_model_space
from monai_wsss.transforms.slicing import stack_neighbour_slices

tqdm, has_tqdm = optional_import("tqdm", name="tqdm")

__all__ = ["VolumeInferer"]


class VolumeInferer(Inferer):
    """
    Run a 2D inferer of this package (or a plain 2D network) over 3D volumes, slice by slice, in batches.

    For every batch of slices taken along ``slice_axis`` the slices are moved to model space exactly as the
    training slices were (MONAI ``Resize`` to ``roi_size``, bilinear with anti-aliasing, then ``[0, 1]`` to
    ``[-1, 1]``, the steps of ``monai_wsss.transforms.model_space_transform``), passed to
    ``inferer(x, network, *args, **kwargs)`` (or ``network(x, *args, **kwargs)`` when ``inferer`` is None),
    and the resulting maps are resized back to the slice size with the same interpolation (as ``Invertd``
    would). Slices without body (all zero, e.g. above the head) are skipped when ``skip_empty`` and their
    map is 0; the remaining slices of all volumes in the batch are packed into full batches of
    ``sw_batch_size``, so a diffusion inferer runs on as few, as full, batches as possible.

    With ``context_slices = k`` (2.5D input) each slice goes in with its ``k`` neighbours on either side as
    further channels, ordered along ``slice_axis`` (slices ``j - k ... j + k``; the volume's first and last slice
    repeat beyond its ends), so a network trained on such stacks (``build_slice_dataset(context_slices=k)``; both
    stack with :py:func:`~monai_wsss.transforms.stack_neighbour_slices`) sees the context across slices; its output
    is still the map of the centre slice.

    Why not MONAI's ``SliceInferer``: it is a ``SlidingWindowInferer`` on native-size windows, so the
    model-space resize would have to live in a network wrapper anyway, its batches are formed before
    body-free slices can be dropped (ragged, partly empty batches; about 40 % of BraTS slices have no
    brain), and its overlap / importance-map aggregation is pointless when each slice is visited once.

    Args:
        inferer: a callable ``inferer(x, network, *args, **kwargs) -> map`` taking a model-space batch
            ``(N, C, *roi_size)`` (e.g. ``ConditionDifferenceInferer``), or None to call ``network`` directly.
        roi_size: model-space slice size (an int is repeated).
        slice_axis: spatial axis of the volume (0, 1, 2 or negative) along which slices are taken;
            -1 gives axial slices of a BraTS ``(H, W, D)`` volume.
        sw_batch_size: number of slices per call of the inner inferer. CPU cost per slice is not flat in the
            batch size (cache and memory traffic of larger activations; CDM doubles the batch for its two
            branches): 8 was the fastest of 8/16/32 for the bundles' 64 x 64 CDM on 2 CPU cores.
        skip_empty: skip slices whose input is all zero (their map is left 0).
        rescale: map the input from ``[0, 1]`` to ``[-1, 1]`` before the inner call (the model space of
            this package); set False if the volume is already in the network's range.
        mode: interpolation of ``Resize`` (both directions).
        anti_aliasing: Gaussian anti-aliasing of ``Resize`` when shrinking (both directions, as ``Invertd``).
        sw_device: device for the inner calls (default: the input's device); maps come back to the input's.
        progress: show a tqdm progress bar over the batches of slices.
        context_slices: neighbours on either side of each slice passed as extra channels (0: the slice alone).

    On a CPU, an application running many batches should call :py:func:`monai_wsss.utils.reuse_freed_memory`
    once first (process-wide, so the inferer leaves that choice to its caller): batches of slices then stop
    page-faulting their activations in on every network call.

    Returns:
        ``__call__`` returns the map ``(B, C_out, H, W, D)`` with the input's device and dtype (a MetaTensor
        with the input's metadata when the input is one).

    Raises:
        ValueError: bad constructor arguments; an input that is not ``(B, C, H, W, D)`` or contains NaN;
            an inner result that is not a tensor of shape ``(N, C_out, *roi_size)``.

    Example::

        vi = VolumeInferer(inferer=cdm, roi_size=(64, 64), slice_axis=-1, sw_batch_size=8)
        with torch.no_grad():  # unless the inner inferer needs gradients (it enables them itself)
            map3d = vi(volume, net)  # volume (1, 1, 240, 240, 155) in [0, 1] -> (1, 1, 240, 240, 155)
    """

    def __init__(
        self,
        inferer: Callable[..., torch.Tensor] | None = None,
        roi_size: Sequence[int] | int = (64, 64),
        slice_axis: int = -1,
        sw_batch_size: int = 8,
        skip_empty: bool = True,
        rescale: bool = True,
        mode: str = IMAGE_INTERPOLATION["mode"],
        anti_aliasing: bool = IMAGE_INTERPOLATION["anti_aliasing"],
        sw_device: torch.device | str | None = None,
        progress: bool = False,
        context_slices: int = 0,
    ) -> None:
        super().__init__()
        if inferer is not None and not callable(inferer):
            raise ValueError(f"`inferer` must be callable as inferer(x, network, ...) or None, got {type(inferer)}.")
        roi = (roi_size, roi_size) if isinstance(roi_size, (int, np.integer)) else tuple(roi_size)
        if len(roi) != 2 or not all(isinstance(r, (int, np.integer)) and r > 0 for r in roi):
            raise ValueError(f"`roi_size` must be two positive ints (a 2D model size), got {roi_size!r}.")
        if not isinstance(slice_axis, (int, np.integer)) or not -3 <= int(slice_axis) <= 2:
            raise ValueError(f"`slice_axis` must be a spatial axis in [-3, 2], got {slice_axis!r}.")
        if not isinstance(sw_batch_size, (int, np.integer)) or sw_batch_size < 1:
            raise ValueError(f"`sw_batch_size` must be a positive int, got {sw_batch_size!r}.")
        if not isinstance(context_slices, (int, np.integer)) or context_slices < 0:
            raise ValueError(f"`context_slices` must be an int >= 0, got {context_slices!r}.")
        self.inferer = inferer
        self.context_slices = int(context_slices)
        self.roi_size = tuple(int(r) for r in roi)
        self.slice_axis = int(slice_axis) % 3
        self.sw_batch_size = int(sw_batch_size)
        self.skip_empty = skip_empty
        self.rescale = rescale
        self.mode = mode
        self.anti_aliasing = anti_aliasing
        self.sw_device = sw_device
        self.progress = progress

    def _resize(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return resize_slices(x, size, mode=self.mode, anti_aliasing=self.anti_aliasing)

    def to_model_space(self, x: torch.Tensor) -> torch.Tensor:
        """
        Slices ``(N, C, h, w)`` in ``[0, 1]`` as the network sees them:
        :py:func:`~monai_wsss.transforms.model_space.slices_to_model_space` with this inferer's size and resizing.
        """
        return slices_to_model_space(x, self.roi_size, self.rescale, mode=self.mode, anti_aliasing=self.anti_aliasing)

    def _call_inner(self, x: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.inferer(x, network, *args, **kwargs) if self.inferer is not None else network(x, *args, **kwargs)
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"the inner inferer/network must return a tensor, got {type(out)}.")
        if out.ndim != 4 or out.shape[0] != x.shape[0] or tuple(out.shape[2:]) != self.roi_size:
            raise ValueError(
                f"the inner inferer/network returned shape {tuple(out.shape)} for input {tuple(x.shape)}; "
                f"expected (N, C_out, {self.roi_size[0]}, {self.roi_size[1]})."
            )
        return convert_to_tensor(out, track_meta=False)

    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """
        Args:
            inputs: volumes ``(B, C, H, W, D)``, intensities in ``[0, 1]`` (0 outside the body).
            network: the 2D network, passed to the inner inferer (or called directly).
            args: positional arguments passed unchanged to every inner call.
            kwargs: keyword arguments passed unchanged to every inner call (e.g. ``classifier=clf``).
        """
        if not isinstance(inputs, torch.Tensor) or inputs.ndim != 5:
            shape = tuple(inputs.shape) if hasattr(inputs, "shape") else type(inputs)
            raise ValueError(f"`inputs` must be a batch of volumes (B, C, H, W, D) as a tensor, got {shape}.")
        x = convert_to_tensor(inputs, track_meta=False)
        if x.shape[0] == 0 or x.numel() == 0:
            raise ValueError(f"`inputs` hold no voxel (shape {tuple(x.shape)}): nothing to infer.")
        if not torch.is_floating_point(x):
            x = x.float()
        if torch.isnan(x).any():
            raise ValueError("`inputs` contains NaN values.")
        batch, axis = x.shape[0], self.slice_axis
        volume_slices = x.movedim(axis + 2, 1)  # (B, n, C, a, b)
        n_slices, slice_size = volume_slices.shape[1], tuple(volume_slices.shape[3:])
        slices = volume_slices.reshape(batch * n_slices, *volume_slices.shape[2:])
        if self.skip_empty:  # judged on the centre slice alone
            todo = torch.nonzero(slices.flatten(1).ne(0).any(1)).flatten()
        else:
            todo = torch.arange(slices.shape[0], device=slices.device)
        if self.context_slices:
            slices = stack_neighbour_slices(volume_slices, self.context_slices).flatten(0, 1)

        out: torch.Tensor | None = None
        starts = range(0, int(todo.numel()), self.sw_batch_size)
        if self.progress and has_tqdm:
            starts = tqdm(starts, desc="slice batches")
        for start in starts:
            chunk = todo[start : start + self.sw_batch_size]
            model_in = slices[chunk]
            if self.sw_device is not None:
                model_in = model_in.to(self.sw_device)
            model_in = self.to_model_space(model_in)
            pred = self._resize(self._call_inner(model_in, network, *args, **kwargs), slice_size)
            if out is None:
                out = torch.zeros((slices.shape[0], pred.shape[1], *slice_size), dtype=x.dtype, device=x.device)
            out[chunk.to(out.device)] = pred.to(device=out.device, dtype=out.dtype)
        if out is None:  # no slice with body anywhere: the map is all zero
            out = torch.zeros((slices.shape[0], x.shape[1], *slice_size), dtype=x.dtype, device=x.device)
        out = out.reshape(batch, n_slices, out.shape[1], *slice_size).movedim(1, axis + 2)
        return convert_to_dst_type(out, inputs, dtype=x.dtype)[0]  # type: ignore[return-value]
