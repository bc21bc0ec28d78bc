from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler

from conftest import tiny_classifier, tiny_unet
from monai_wsss.inferers import ConditionDifferenceInferer, GuidedDiffusionAnomalyInferer


class CallCounter:
    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        module.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1


def reference_scheduler() -> DDIMScheduler:
    sched = DDIMScheduler(num_train_timesteps=1000, schedule="linear_beta", clip_sample=False)
    sched.set_timesteps(1000)  # the grid on which MONAI's step/reversed_step are exact
    return sched


def classifier_grad(clf, x, t, target):
    """grad_x log p(target | x, t), computed sample by sample."""
    grads = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1].detach().requires_grad_(True)
        logp = torch.log_softmax(clf(xi, torch.tensor([t])), dim=1)[0, target]
        grads.append(torch.autograd.grad(logp, xi)[0])
    return torch.cat(grads)


def reference_cdm(x0, noise, net, q, r, tau, s=0.0, clf=None):
    """Algorithm 1 with MONAI's DDIMScheduler.step, two separate branches, per-sample guidance."""
    sched = reference_scheduler()
    ab = sched.alphas_cumprod
    x = ab[q].sqrt() * x0 + (1 - ab[q]).sqrt() * noise
    xp = x.clone()
    e1 = net.class_embedding.weight[1].expand(x0.shape[0], -1)
    ep = tau * net.class_embedding.weight[1] + (1 - tau) * net.class_embedding.weight[0]
    ep = ep.expand(x0.shape[0], -1)
    a = torch.zeros_like(x0)
    for t in range(q, q - r, -1):
        tt = torch.full((x0.shape[0],), t)
        with torch.no_grad():
            eps1 = net(x, tt, class_embedding=e1)
            eps0 = net(xp, tt, class_embedding=ep)
        if s > 0:
            eps1 = eps1 - s * (1 - ab[t]).sqrt() * classifier_grad(clf, x, t, 1)
            eps0 = eps0 - s * (1 - ab[t]).sqrt() * classifier_grad(clf, xp, t, 0)
        x, _ = sched.step(eps1, t, x)
        xp, _ = sched.step(eps0, t, xp)
        a = a + (x - xp) / (1 - tau)
    return a


def reference_cgdiff(x0, net, clf, level, s):
    sched = reference_scheduler()
    ab = sched.alphas_cumprod
    b = x0.shape[0]
    healthy = torch.zeros(b, dtype=torch.long)
    x = x0
    with torch.no_grad():
        for t in range(level):
            x, _ = sched.reversed_step(net(x, torch.full((b,), t), class_labels=healthy), t, x)
    for t in range(level, 0, -1):
        with torch.no_grad():
            eps = net(x, torch.full((b,), t), class_labels=healthy)
        if s > 0:
            eps = eps - s * (1 - ab[t]).sqrt() * classifier_grad(clf, x, t, 0)
        x, _ = sched.step(eps, t, x)
    return (x0 - x).abs()


def test_cdm_matches_independent_computation(scheduler, images):
    net = tiny_unet()
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(7))
    cdm = ConditionDifferenceInferer(scheduler, noise_level=120, num_steps=6, tau=0.9)
    a = cdm(images, net, noise=noise)
    expected = reference_cdm(images, noise, net, 120, 6, 0.9)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(a, expected, rtol=1e-3, atol=1e-4)  # float32 reference, amplified by 1 / (1 - tau)
    assert a.shape == images.shape and a.dtype == images.dtype


def test_cg_cdm_matches_independent_computation(scheduler, images):
    net, clf = tiny_unet(), tiny_classifier()
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(7))
    cg = ConditionDifferenceInferer(scheduler, noise_level=50, num_steps=4, tau=0.95, guidance_scale=30.0)
    a = cg(images, net, classifier=clf, noise=noise)
    expected = reference_cdm(images, noise, net, 50, 4, 0.95, s=30.0, clf=clf)
    torch.testing.assert_close(a, expected, rtol=1e-3, atol=1e-4)  # float32 reference, amplified by 1 / (1 - tau)
    plain = ConditionDifferenceInferer(scheduler, noise_level=50, num_steps=4, tau=0.95)(images, net, noise=noise)
    assert (a - plain).abs().max() > 1e-3  # guidance changes the map


def test_cdm_one_batched_call_per_step(scheduler, images):
    net, clf = tiny_unet(), tiny_classifier()
    net_calls, clf_calls = CallCounter(net), CallCounter(clf)
    ConditionDifferenceInferer(scheduler, noise_level=30, num_steps=7, guidance_scale=1.0)(images, net, classifier=clf)
    assert net_calls.calls == 7 and clf_calls.calls == 7


def test_cdm_is_reproducible_with_a_generator(scheduler, images):
    net = tiny_unet()
    cdm = ConditionDifferenceInferer(scheduler, noise_level=100, num_steps=3)
    a1 = cdm(images, net, generator=torch.Generator().manual_seed(1))
    a2 = cdm(images, net, generator=torch.Generator().manual_seed(1))
    a3 = cdm(images, net, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a1, a2, rtol=0, atol=0)
    assert (a1 - a3).abs().max() > 1e-5
    a1.add_(1.0)  # the map is an ordinary tensor, usable outside inference mode


def test_cdm_on_3d_inputs(scheduler):
    net = tiny_unet(spatial_dims=3)
    x = torch.rand(2, 1, 8, 8, 8) * 2 - 1
    a = ConditionDifferenceInferer(scheduler, noise_level=40, num_steps=2)(x, net)
    assert a.shape == x.shape and a.abs().max() > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"noise_level": 0}, "noise_level"),
        ({"noise_level": 1000}, "noise_level"),
        ({"noise_level": 10, "num_steps": 11}, "num_steps"),
        ({"num_steps": 0}, "num_steps"),
        ({"tau": 1.0}, "tau"),
        ({"tau": 0.0}, "tau"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"target_class": 0, "reference_class": 0}, "differ"),
    ],
)
def test_cdm_rejects_bad_settings(scheduler, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConditionDifferenceInferer(scheduler, **{"noise_level": 100, "num_steps": 5, **kwargs})


def test_cdm_rejects_bad_inputs(scheduler, images):
    net = tiny_unet()
    cdm = ConditionDifferenceInferer(scheduler, noise_level=20, num_steps=2)
    with pytest.raises(ValueError, match="rank"):
        cdm(images[0], net)
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        cdm(bad, net)
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        cdm(bad, net)
    with pytest.raises(ValueError, match="noise shape"):
        cdm(images, net, noise=torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="target_class=3"):
        ConditionDifferenceInferer(scheduler, noise_level=20, num_steps=2, target_class=3)(images, net)
    with pytest.raises(ValueError, match="needs a classifier"):
        ConditionDifferenceInferer(scheduler, noise_level=20, num_steps=2, guidance_scale=5.0)(images, net)
    with pytest.raises(ValueError, match="embed_classes"):
        cdm(images, torch.nn.Identity())


def test_cgdiff_matches_independent_computation(scheduler, images):
    net, clf = tiny_unet(), tiny_classifier()
    cgd = GuidedDiffusionAnomalyInferer(scheduler, noise_level=15, guidance_scale=50.0, healthy_class=0)
    amap = cgd(images, net, classifier=clf)
    expected = reference_cgdiff(images, net, clf, 15, 50.0)
    torch.testing.assert_close(amap, expected, rtol=1e-4, atol=1e-5)
    assert (amap >= 0).all() and amap.max() > 1e-3


def test_encode_decode_round_trip_without_guidance(scheduler, images):
    net = tiny_unet()
    cgd = GuidedDiffusionAnomalyInferer(scheduler, noise_level=100, guidance_scale=0.0)
    amap, x_hat = cgd(images, net, return_reconstruction=True)
    assert amap.max() < 2e-3
    torch.testing.assert_close(amap, (images - x_hat).abs())
    cfg_net = tiny_unet(null_class=True)
    cfg = GuidedDiffusionAnomalyInferer(scheduler, noise_level=100, mode="cfg", cfg_scale=1.0, encode_class=0)
    assert cfg(images, cfg_net).max() < 2e-3


def test_classifier_free_guidance_uses_one_call_per_decoding_step(scheduler, images):
    net = tiny_unet(null_class=True)
    calls = CallCounter(net)
    cfg = GuidedDiffusionAnomalyInferer(scheduler, noise_level=12, mode="cfg", cfg_scale=3.0)
    amap = cfg(images, net)
    assert calls.calls == 24  # 12 encoding + 12 decoding calls, null and healthy batched together
    assert amap.max() > 1e-3  # guidance w = 3 moves the reconstruction away from the input


def test_guided_anomaly_errors(scheduler, images):
    net = tiny_unet()
    with pytest.raises(ValueError, match="mode"):
        GuidedDiffusionAnomalyInferer(scheduler, noise_level=10, mode="clip")
    with pytest.raises(ValueError, match="noise_level"):
        GuidedDiffusionAnomalyInferer(scheduler, noise_level=1000)
    with pytest.raises(ValueError, match="null class"):
        GuidedDiffusionAnomalyInferer(scheduler, noise_level=10, mode="cfg")(images, net)
    with pytest.raises(ValueError, match="needs a classifier"):
        GuidedDiffusionAnomalyInferer(scheduler, noise_level=10, guidance_scale=10.0)(images, net)
    with pytest.raises(ValueError, match="healthy_class=4"):
        GuidedDiffusionAnomalyInferer(scheduler, noise_level=10, guidance_scale=0.0, healthy_class=4)(images, net)
    with pytest.raises(ValueError, match="rank"):
        GuidedDiffusionAnomalyInferer(scheduler, noise_level=10, guidance_scale=0.0)(images[:, 0], net)
