# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""A network that also sees where each pixel is: coordinate channels appended to its input (input-only CoordConv)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CoordinateChannelsNetwork"]


class CoordinateChannelsNetwork(nn.Module):
    """
    ``network`` fed with its input plus one channel per spatial axis holding that axis' coordinate, from -0.5 at the
    first pixel to 0.5 at the last (the values of MONAI's ``AddCoordinateChannels``, applied to every item of the
    batch). A convolutional network is translation-equivariant, so without them it cannot learn *where* a target
    lies, only what it looks like; kidneys sit in the posterior half of an axial slice, left and right of the spine,
    while other bright abdominal structures (fluid, cysts, the spleen) look alike elsewhere.

    The coordinates are those of the network's input grid (the slice in model space, after any augmentation), and
    they are added inside ``forward``, so training, validation and every inferer see the same input without a
    transform of their own. ``network`` must take ``in_channels + spatial_dims`` channels.

    Liu, R. et al. An Intriguing Failing of Convolutional Neural Networks and the CoordConv Solution, NeurIPS 2018.

    Args:
        network: the wrapped network, its first layer taking the extra channels.
        spatial_dims: number of spatial dimensions of the input (2 for slices, 3 for volumes).

    Raises:
        TypeError: ``network`` is not a ``torch.nn.Module``.
        ValueError: ``spatial_dims`` is not 2 or 3; in ``forward``, an input whose dimensions are not
            ``(batch, channels, *spatial_dims)``.

    Example::

        net = CoordinateChannelsNetwork(UNet(spatial_dims=2, in_channels=3, out_channels=2, channels=(16, 32),
                                             strides=(2,)))
        logits = net(torch.rand(4, 1, 96, 96))   # the UNet sees (4, 3, 96, 96)
    """

    def __init__(self, network: nn.Module, spatial_dims: int = 2) -> None:
        super().__init__()
        if not isinstance(network, nn.Module):
            raise TypeError(f"network must be a torch.nn.Module, got {type(network).__name__}.")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
        self.network = network
        self.spatial_dims = int(spatial_dims)

    def coordinates(self, x: torch.Tensor) -> torch.Tensor:
        """
        The coordinate channels for input ``x``: ``(batch, spatial_dims, *spatial)``, same dtype and device.

        Raises:
            ValueError: ``x`` does not have ``2 + spatial_dims`` dimensions.
        """
        if x.ndim != 2 + self.spatial_dims:
            raise ValueError(
                f"CoordinateChannelsNetwork(spatial_dims={self.spatial_dims}) takes (batch, channels, "
                f"{', '.join(['size'] * self.spatial_dims)}) input, got shape {tuple(x.shape)}."
            )
        axes = [torch.linspace(-0.5, 0.5, int(s), dtype=x.dtype, device=x.device) for s in x.shape[2:]]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
        return grid.unsqueeze(0).expand(x.shape[0], *grid.shape)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.network(torch.cat([x, self.coordinates(x)], dim=1), *args, **kwargs)
