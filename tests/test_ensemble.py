from __future__ import annotations

import pytest
import torch

from conftest import tiny_unet
from monai_wsss.inferers import ConditionDifferenceInferer
from monai_wsss.inferers import NoiseEnsembleInferer


def test_ensemble_is_the_mean_of_independent_draws(scheduler, images):
    net = tiny_unet()
    cdm = ConditionDifferenceInferer(scheduler, noise_level=60, num_steps=3)
    ens = NoiseEnsembleInferer(cdm, num_samples=3, return_variance=True)
    mean, var = ens(images, net, generator=torch.Generator().manual_seed(0))
    # the same draws, made explicit: noise for the 3 stacked copies from one generator
    noise = torch.randn((3 * images.shape[0],) + images.shape[1:], generator=torch.Generator().manual_seed(0))
    maps = torch.stack([cdm(images, net, noise=n) for n in noise.reshape(3, *images.shape)])
    # batch 9 vs batch 3 network calls round differently; the map divides trajectory differences by 1 - tau = 0.05,
    # so float32 rounding reaches ~1e-5 (1.07e-5 with one thread)
    torch.testing.assert_close(mean, maps.mean(0), rtol=1e-4, atol=3e-5)
    torch.testing.assert_close(var, maps.var(0), rtol=1e-3, atol=1e-6)
    assert var.max() > 0 and mean.shape == images.shape


def test_single_draw_has_zero_variance_and_bad_settings_fail(scheduler, images):
    cdm = ConditionDifferenceInferer(scheduler, noise_level=20, num_steps=2)
    mean, var = NoiseEnsembleInferer(cdm, num_samples=1, return_variance=True)(images, tiny_unet())
    assert torch.count_nonzero(var) == 0 and mean.abs().max() > 0
    with pytest.raises(ValueError, match="num_samples"):
        NoiseEnsembleInferer(cdm, num_samples=0)
    with pytest.raises(ValueError, match="generator, not noise"):
        NoiseEnsembleInferer(cdm, num_samples=2)(images, tiny_unet(), noise=torch.zeros_like(images))
