"""Baselines behind the inferer interface: CAM methods (grad-cam) and the intensity threshold."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
import torch
from conftest import perturb, tiny_classifier, tiny_unet
from monai.utils import OptionalImportError, optional_import

from monai_wsss.inferers.cam import (
    CAM_METHODS,
    ClassActivationMapInferer,
    TimestepClassifierWrapper,
    default_cam_target_layer,
)
from monai_wsss.inferers.threshold import IntensityThresholdInferer, masked_percentile
from monai_wsss.metrics import binary_dice
from monai_wsss.networks.nets import NoisyClassifier

_, has_grad_cam = optional_import("pytorch_grad_cam")
requires_grad_cam = pytest.mark.skipif(not has_grad_cam, reason="needs the baselines extra (grad-cam)")

# ScoreCAM runs the classifier once per activation channel: keep its chunks small but batched
SCORE_BATCH = 8


def cam_inferer(method: str, **kwargs) -> ClassActivationMapInferer:
    return ClassActivationMapInferer(method, score_batch_size=SCORE_BATCH, **kwargs)


@pytest.fixture(scope="module")
def clf() -> NoisyClassifier:
    return tiny_classifier()


# ---------------------------------------------------------------- CAM baselines


@requires_grad_cam
@pytest.mark.parametrize("method", CAM_METHODS)
@pytest.mark.parametrize("batch", [1, 3])
def test_cam_shape_range_dtype(clf, images, method, batch):
    # GradCAM++ gives image 0 an all-zero map with this tiny net (its weights assume non-negative activations,
    # the residual stream is signed): start the batch at an image with a non-empty map for every method
    x = images.roll(-1, dims=0)[:batch]
    heat = cam_inferer(method)(x, clf)
    assert heat.shape == x.shape and heat.dtype == x.dtype and heat.device == x.device
    assert torch.isfinite(heat).all()
    assert heat.min() >= 0 and heat.max() <= 1
    # normalised per image: every non-empty map reaches ~1
    per_image_max = heat.flatten(1).amax(1)
    assert ((per_image_max > 0.99) | (per_image_max == 0)).all()
    assert (per_image_max > 0.99).any()


@requires_grad_cam
@pytest.mark.parametrize("method", CAM_METHODS)
def test_cam_batch_equals_single_images(clf, images, method):
    """Batching must not mix images (MONAI's GradCAMpp breaks for batch > 1)."""
    cam = cam_inferer(method)
    full = cam(images, clf)
    for i in range(images.shape[0]):
        torch.testing.assert_close(full[i : i + 1], cam(images[i : i + 1], clf), atol=1e-4, rtol=0)


@requires_grad_cam
@pytest.mark.parametrize("method", CAM_METHODS)
def test_cam_depends_on_target_class_and_input(clf, images, method):
    target = cam_inferer(method, target_class=1)(images, clf)
    other = cam_inferer(method, target_class=0)(images, clf)
    assert (target - other).abs().max() > 1e-2
    assert (target[0] - target[1]).abs().max() > 1e-2


@requires_grad_cam
def test_scorecam_matches_grad_cam_reference(clf, images):
    """The batched ScoreCAM weights equal grad-cam's own per-image ScoreCAM."""
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    ours = cam_inferer("scorecam")(images, clf)
    reference = ScoreCAM(TimestepClassifierWrapper(clf, 0), [default_cam_target_layer(clf)])
    expected = reference(images, [ClassifierOutputTarget(1)] * images.shape[0])
    reference.activations_and_grads.release()
    np.testing.assert_allclose(ours[:, 0].numpy(), expected, atol=1e-5)


@requires_grad_cam
def test_wrapper_passes_timestep(clf, images):
    for t in (0, 250):
        expected = clf(images, torch.full((images.shape[0],), t, dtype=torch.long))
        torch.testing.assert_close(TimestepClassifierWrapper(clf, t)(images), expected)
    # the timestep reaches the classifier through the inferer as well
    early = cam_inferer("gradcam", timestep=0)(images, clf)
    late = cam_inferer("gradcam", timestep=900)(images, clf)
    assert (early - late).abs().max() > 1e-3


@requires_grad_cam
def test_cam_calling_conventions_and_target_layer_names(clf, images):
    cam = cam_inferer("gradcam")
    direct = cam(images, clf)
    # same call as the diffusion inferers: the diffusion network is not used
    torch.testing.assert_close(cam(images, tiny_unet(), classifier=clf), direct)
    by_name = cam_inferer("gradcam", target_layer="down_blocks.1.resnets.0")(images, clf)
    torch.testing.assert_close(by_name, direct)
    shallow = cam_inferer("gradcam", target_layer=clf.down_blocks[0].resnets[0])(images, clf)
    assert (shallow - direct).abs().max() > 1e-2


@requires_grad_cam
def test_cam_leaves_classifier_untouched(images):
    clf = tiny_classifier()
    clf.train()
    clf.down_blocks[1].eval()  # a mixed train/eval state must survive as it is
    clf.down_blocks[0].resnets[0].conv1.conv.weight.requires_grad_(False)
    marker = torch.ones_like(clf.out[-1].weight)
    clf.out[-1].weight.grad = marker
    before = {n: (p.requires_grad, p.detach().clone()) for n, p in clf.named_parameters()}
    cam_inferer("gradcam++")(images, clf)
    assert clf.training and clf.down_blocks[0].training and not clf.down_blocks[1].training
    assert clf.out[-1].weight.grad is marker
    for name, p in clf.named_parameters():
        assert p.requires_grad == before[name][0], name
        assert torch.equal(p, before[name][1]), name
        if p is not clf.out[-1].weight:
            assert p.grad is None, name


@requires_grad_cam
def test_cam_under_inference_mode(clf, images):
    expected = cam_inferer("layercam")(images, clf)
    with torch.inference_mode():
        heat = cam_inferer("layercam")(images, clf)
    torch.testing.assert_close(heat, expected)


@requires_grad_cam
@pytest.mark.parametrize("method", CAM_METHODS)
def test_cam_3d(method):
    torch.manual_seed(0)
    clf3d = NoisyClassifier(
        spatial_dims=3,
        in_channels=1,
        num_classes=2,
        input_shape=(8, 8, 8),
        channels=(8, 16),
        attention_levels=(False, False),
        norm_num_groups=4,
    )
    perturb(clf3d)
    x = torch.rand(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    heat = cam_inferer(method)(x, clf3d)
    assert heat.shape == x.shape and heat.min() >= 0 and heat.max() <= 1 and heat.max() > 0.99


@requires_grad_cam
def test_cam_errors(clf, images):
    with pytest.raises(ValueError, match="method must be one of"):
        ClassActivationMapInferer("gradcam+++")
    with pytest.raises(ValueError, match="target_class"):
        ClassActivationMapInferer("gradcam", target_class=-1)
    with pytest.raises(ValueError, match="timestep"):
        ClassActivationMapInferer("gradcam", timestep=-5)
    with pytest.raises(ValueError, match="score_batch_size"):
        ClassActivationMapInferer("scorecam", score_batch_size=0)
    cam = ClassActivationMapInferer("gradcam")
    with pytest.raises(ValueError, match="rank 4"):
        cam(images[:, 0], clf)
    with pytest.raises(ValueError, match="NaN"):
        bad = images.clone()
        bad[0, 0, 0, 0] = float("nan")
        cam(bad, clf)
    with pytest.raises(ValueError, match="needs a classifier"):
        cam(images, None)
    with pytest.raises(ValueError, match="channels"):
        cam(images.repeat(1, 2, 1, 1), clf)
    with pytest.raises(ValueError, match="target_class=2 is outside"):
        ClassActivationMapInferer("gradcam", target_class=2)(images, clf)
    with pytest.raises(ValueError, match="not a module"):
        ClassActivationMapInferer("gradcam", target_layer="down_blocks.9")(images, clf)
    with pytest.raises(ValueError, match="not a module"):
        ClassActivationMapInferer("gradcam", target_layer=torch.nn.Conv2d(1, 1, 1))(images, clf)
    with pytest.raises(ValueError, match="no default CAM target layer"):
        plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 2))
        ClassActivationMapInferer("gradcam", timestep=None)(images, plain)


def test_missing_grad_cam_names_the_extra(monkeypatch):
    """The module imports without grad-cam; creating a CAM inferer then says which extra to install."""
    import monai_wsss.inferers as inferers_pkg

    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)  # makes `import pytorch_grad_cam` fail
    monkeypatch.delitem(sys.modules, "monai_wsss.inferers.cam")
    monkeypatch.setattr(inferers_pkg, "cam", inferers_pkg.cam)  # restored after the fresh import rebinds it
    fresh = importlib.import_module("monai_wsss.inferers.cam")
    with pytest.raises(OptionalImportError, match=r"monai_wsss\[baselines\]"):
        fresh.ClassActivationMapInferer("gradcam")


# ---------------------------------------------------------------- intensity threshold


def blob_image(size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A noisy grey "brain" disk with a bright blob on a zero background, scaled to model space [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    axis = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    c = (size - 1) / 2
    body = (yy - c) ** 2 + (xx - c) ** 2 <= (0.45 * size) ** 2
    blob = (yy - c + 0.15 * size) ** 2 + (xx - c - 0.1 * size) ** 2 <= (0.15 * size) ** 2
    unit = torch.where(body, 0.45 + 0.05 * torch.randn(size, size, generator=gen), torch.zeros(size, size))
    unit = torch.where(blob, 0.9 + 0.05 * torch.randn(size, size, generator=gen), unit).clamp(0, 1)
    return (unit * 2 - 1)[None, None], blob[None, None], body[None, None]


@pytest.mark.parametrize("percentile", [99.0, None])
def test_intensity_threshold_localises_a_bright_blob(percentile):
    x, blob, body = blob_image()
    baseline = IntensityThresholdInferer(percentile=percentile, threshold=0.7)
    heat = baseline(x, None)
    assert heat.shape == x.shape and heat.dtype == x.dtype
    assert (heat[~body] == 0).all() and (heat >= 0).all()
    assert heat[blob].mean() > 1.5 * heat[body & ~blob].mean()
    mask = baseline.fixed_threshold_mask(x)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert binary_dice(mask, blob) > 0.9


def test_intensity_map_reference_per_item():
    """The percentile is taken per slice for 2D input and per volume for 3D input, inside the body only."""
    x2d = torch.stack([blob_image(seed=s)[0][0] for s in range(3)])  # (3, 1, 32, 32)
    x2d[1] = x2d[1] * 0.5 - 0.5  # a darker slice: its per-slice map must not get darker
    baseline = IntensityThresholdInferer(percentile=99.0)
    heat = baseline(x2d)
    unit = (x2d + 1) / 2
    for i in range(3):
        values = unit[i][unit[i] > 0].numpy()
        np.testing.assert_allclose(heat[i][unit[i] > 0].numpy(), values / np.percentile(values, 99), rtol=1e-5)
    volume = x2d[:, 0].permute(1, 2, 0)[None, None]  # (1, 1, 32, 32, 3)
    heat3d = baseline(volume)
    values = ((volume + 1) / 2)[volume > -1].numpy()
    np.testing.assert_allclose(heat3d[volume > -1].numpy(), values / np.percentile(values, 99), rtol=1e-5)
    # the darker slice is darker relative to the volume, not relative to itself
    assert heat3d[..., 1].max() < 0.8 * heat[1].max()


def test_intensity_empty_body_gives_empty_map():
    x, _, _ = blob_image()
    batch = torch.cat([x, torch.full_like(x, -1.0)])
    baseline = IntensityThresholdInferer()
    heat = baseline(batch)
    assert (heat[1] == 0).all() and heat[0].max() > 0
    assert (baseline.fixed_threshold_mask(batch)[1] == 0).all()


def test_masked_percentile_matches_numpy():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(5, 40, generator=gen, dtype=torch.float64)
    mask = torch.rand(5, 40, generator=gen) > 0.5
    mask[3] = False
    mask[4] = False
    mask[4, 7] = True
    for q in (0.0, 37.5, 99.0, 100.0):
        got = masked_percentile(values, mask, q)
        for i in range(5):
            if mask[i].any():
                assert got[i].item() == pytest.approx(np.percentile(values[i][mask[i]].numpy(), q))
            else:
                assert torch.isnan(got[i])


def test_intensity_threshold_errors():
    for kwargs, match in [
        (dict(percentile=0.0), "percentile"),
        (dict(percentile=101.0), "percentile"),
        (dict(threshold=0.0), "threshold"),
        (dict(intensity_range=(1.0, -1.0)), "intensity_range"),
        (dict(body_threshold=1.0), "body_threshold"),
    ]:
        with pytest.raises(ValueError, match=match):
            IntensityThresholdInferer(**kwargs)
    baseline = IntensityThresholdInferer()
    x, _, _ = blob_image()
    with pytest.raises(ValueError, match="rank"):
        baseline(x[0])
    bad = x.clone()
    bad[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        baseline(bad)
    with pytest.raises(ValueError, match="NaN"):
        baseline.fixed_threshold_mask(bad)


@pytest.mark.parametrize("method", ["scorecam", "gradcam"])
def test_cam_leaves_the_callers_grad_mode_as_it_was(clf, images, method):
    """ScoreCAM runs without gradients: the caller's autograd must be on again afterwards (a leak here broke every
    later training step in the same process)."""
    ClassActivationMapInferer(method=method, target_class=1, timestep=0)(images, clf)
    assert torch.is_grad_enabled()
    with torch.no_grad():
        ClassActivationMapInferer(method=method, target_class=1, timestep=0)(images, clf)
        assert not torch.is_grad_enabled()
