"""Second stage and volume-aware masks on synthetic data: pseudo-masks (exactly empty on negative slices, cached,
atomic), a segmentation network that learns more than its noisy pseudo-masks, the classifier slice gate, the 3D
component filter, the per-volume threshold baseline, and the segmentation bundle configs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow, run
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from monai_wsss.apps import (
    METHODS,
    PseudoMaskGenerator,
    VolumeSegmentationPipeline,
    build_method_inferer,
    default_map_mode,
    default_threshold,
)
from monai_wsss.data import build_slice_dataset, make_synthetic_dataset, volume_preprocess
from monai_wsss.inferers import SegmentationProbabilityInferer, SliceProbabilityInferer
from monai_wsss.metrics import binary_dice
from monai_wsss.networks.nets import NoisyClassifier
from conftest import BUNDLES, perturb

SHAPE = (40, 40, 12)
SIZE = 32


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("segmenter")
    return make_synthetic_dataset(root / "brats", num_cases=10, shape=SHAPE, seed=5)


def _seg(item) -> np.ndarray:
    return np.asarray(nib.load(item["seg"]).dataobj) > 0



class _NoisyIntensity:
    """A deliberately poor source: the image intensity plus strong per-pixel noise (seeded), so that its masks
    are speckled where the lesion is clean."""

    def __call__(self, x: torch.Tensor, network=None, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        return ((x + 1) / 2 + 0.35 * noise) * (x > -1)


def _source(threshold: float = 0.7) -> VolumeSegmentationPipeline:
    return VolumeSegmentationPipeline(
        None, build_method_inferer("volume_threshold"), task="brats", map_mode=None, threshold=threshold
    )


# ---- pseudo-masks ------------------------------------------------------------------------------------------------
def test_pseudo_masks_are_empty_on_negative_slices_and_cached(cases, tmp_path):
    gen = PseudoMaskGenerator(_source(0.6), fill_holes=True, source_name="volume_threshold")
    items = gen.generate(cases[:3], tmp_path)
    assert [Path(it["pseudo"]).name for it in items] == [f"{it['case']}_pseudo.nii.gz" for it in cases[:3]]
    for item in items:
        pseudo, seg = np.asarray(nib.load(item["pseudo"]).dataobj), _seg(item)
        assert pseudo.shape == seg.shape
        np.testing.assert_allclose(nib.load(item["pseudo"]).affine, nib.load(item["image"]).affine, atol=1e-5)
        negative = ~seg.reshape(-1, seg.shape[2]).any(0)
        assert pseudo[..., negative].sum() == 0  # exact: the image-level label says there is nothing
        if (~negative).any():
            assert pseudo[..., ~negative].sum() > 0
            assert binary_dice(pseudo[..., ~negative] > 0, seg[..., ~negative], ignore_empty=False) > 0.3
    # same settings: reused, not recomputed; other settings: another folder
    stamp = [Path(it["pseudo"]).stat().st_mtime_ns for it in items]
    assert [Path(it["pseudo"]).stat().st_mtime_ns for it in gen.generate(cases[:3], tmp_path)] == stamp
    other = PseudoMaskGenerator(_source(0.8), fill_holes=True).generate(cases[:1], tmp_path)
    assert Path(other[0]["pseudo"]).parent != Path(items[0]["pseudo"]).parent
    # a source network with other weights (e.g. retrained) never reuses the masks of the old one
    nets = [UNet(2, 1, 2, channels=(4, 8), strides=(2,), num_res_units=1) for _ in range(2)]
    sources = [VolumeSegmentationPipeline(n, build_method_inferer("segmenter", network=n), map_mode=None, threshold=0.5)
               for n in nets]
    assert PseudoMaskGenerator(sources[0]).settings() != PseudoMaskGenerator(sources[1]).settings()
    assert not list(tmp_path.rglob(".*tmp*"))  # written under temporary names, renamed into place


def test_healthy_reference_keeps_only_voxels_brighter_than_the_healthy_slices(cases):
    item = cases[0]
    seg = _seg(item)
    positive = seg.reshape(-1, seg.shape[2]).any(0)
    assert positive.any() and (~positive).any()
    # a loose source threshold marks most of the brain on the positive slices
    plain = PseudoMaskGenerator(_source(0.3), fill_holes=False)(item)
    restricted_gen = PseudoMaskGenerator(_source(0.3), fill_holes=False, healthy_percentile=99.0)
    restricted = restricted_gen(item)
    plain_mask = np.asarray(plain["pseudo"])[0] > 0
    mask = np.asarray(restricted["pseudo"])[0] > 0
    # the reference, recomputed with numpy: the 99th percentile of the body on slices labelled healthy
    image = np.asarray(restricted["image"])[0]
    body_fraction = (image != 0).reshape(-1, image.shape[2]).mean(0)
    healthy = (restricted["slice_label"].numpy() == 0) & (body_fraction >= restricted_gen.preset.min_body_fraction)
    values = image[..., healthy]
    reference = np.percentile(values[values != 0], 99.0)
    np.testing.assert_allclose(
        restricted_gen.healthy_reference(restricted["image"], restricted["slice_label"] == 0), reference, rtol=1e-5
    )
    np.testing.assert_array_equal(mask, plain_mask & (image > reference))
    assert mask[..., ~positive].sum() == 0
    assert binary_dice(mask, seg, ignore_empty=False) > binary_dice(plain_mask, seg, ignore_empty=False) + 0.2
    assert restricted_gen.settings() != PseudoMaskGenerator(_source(0.3), fill_holes=False).settings()  # cache key
    with pytest.raises(ValueError, match="no slice labelled healthy"):
        restricted_gen.healthy_reference(restricted["image"], torch.zeros_like(restricted["slice_label"], dtype=torch.bool), case="c7")
    with pytest.raises(ValueError, match="healthy_percentile"):
        PseudoMaskGenerator(_source(), healthy_percentile=100)


def test_pseudo_masks_refuse_bad_inputs(cases, tmp_path):
    with pytest.raises(ValueError, match="average_otsu"):
        PseudoMaskGenerator(VolumeSegmentationPipeline(None, build_method_inferer("threshold"), threshold="average_otsu"))
    gen = PseudoMaskGenerator(_source())
    with pytest.raises(ValueError, match="--labels"):
        gen({"image": cases[0]["image"], "case": "x"})
    with pytest.raises(ValueError, match="repeat"):
        gen.generate([cases[0], dict(cases[1], case=cases[0]["case"])], tmp_path)


def test_slice_dataset_carries_pseudo_masks_with_labels_from_seg(cases, tmp_path):
    items = PseudoMaskGenerator(_source()).generate(cases[:2], tmp_path / "pseudo")
    ds = build_slice_dataset(items, "brats", (SIZE, SIZE), tmp_path / "cache", split="train", extra_mask_keys=("pseudo",))
    assert len(ds) > 0
    for s in ds:
        assert s["pseudo"].shape == (1, SIZE, SIZE) and s["seg"].shape == (1, SIZE, SIZE)
        if s["label"] == 0:
            assert float(s["pseudo"].sum()) == 0.0
    with pytest.raises(ValueError, match="pseudo"):
        build_slice_dataset(cases[:1], "brats", (SIZE, SIZE), split="train", extra_mask_keys=("pseudo",))


# ---- the segmentation network learns more than its noisy pseudo-masks ------------------------------------------
def test_segmenter_trained_on_noisy_pseudo_masks_beats_them_on_held_out_volumes(cases, tmp_path):
    noisy = VolumeSegmentationPipeline(None, _NoisyIntensity(), task="brats", roi_size=(SIZE, SIZE), map_mode=None,
                                       threshold=0.75, seed=0)
    gen = PseudoMaskGenerator(noisy, fill_holes=False, source_name="noisy intensity")
    train, held_out = cases[:7], cases[7:]
    items = gen.generate(train, tmp_path / "pseudo")
    ds = build_slice_dataset(items, "brats", (SIZE, SIZE), split="train", extra_mask_keys=("pseudo",))
    x = torch.stack([s["image"] for s in ds])
    y = torch.stack([s["pseudo"] for s in ds])
    torch.manual_seed(0)
    net = UNet(2, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    gen_batches = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(x), (16,), generator=gen_batches)
        opt.zero_grad()
        loss_fn(net(x[idx]), y[idx]).backward()
        opt.step()
    net.eval()
    seg_pipe = VolumeSegmentationPipeline(net, build_method_inferer("segmenter", network=net), task="brats",
                                          roi_size=(SIZE, SIZE), map_mode=None, threshold=0.5)
    held = gen.generate(held_out, tmp_path / "pseudo")
    net_dice, pseudo_dice = [], []
    for item in held:
        gt = _seg(item)
        if not gt.any():
            continue
        net_dice.append(binary_dice(np.asarray(seg_pipe.segment(item)["mask"])[0] > 0, gt, ignore_empty=False))
        pseudo_dice.append(binary_dice(np.asarray(nib.load(item["pseudo"]).dataobj) > 0, gt, ignore_empty=False))
    assert net_dice, "no held-out volume with a lesion"
    assert np.mean(net_dice) > np.mean(pseudo_dice) + 0.05, (net_dice, pseudo_dice)


# ---- volume-aware masks ---------------------------------------------------------------------------------------------
class _BrightSliceClassifier(torch.nn.Module):
    """Stands in for a trained noisy classifier: target logit from the slice's brightest pixel."""

    input_shape = (SIZE, SIZE)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        assert (timesteps == 0).all()  # the gate looks at the clean slice
        peak = x.flatten(1).amax(1)
        return torch.stack([torch.zeros_like(peak), 40 * (peak - 0.55)], 1)


def test_slice_gate_empties_masks_of_healthy_slices(cases):
    item = next(it for it in cases if _seg(it).any() and not _seg(it).reshape(-1, SHAPE[2]).any(0).all())
    loose = 0.3  # a threshold low enough to mark tissue on every slice with brain
    plain = _source(loose).segment(item)["mask"][0].numpy() > 0
    gated_pipe = VolumeSegmentationPipeline(
        None, build_method_inferer("volume_threshold"), task="brats", map_mode=None, threshold=loose,
        slice_gate=0.5, gate_classifier=_BrightSliceClassifier(),
    )
    data = gated_pipe.segment(item)
    gated = data["mask"][0].numpy() > 0
    prob = gated_pipe.slice_probabilities(data["image"]).numpy()
    assert prob.shape == (SHAPE[2],)
    healthy = ~_seg(item).reshape(-1, SHAPE[2]).any(0)
    assert plain[..., healthy].any()  # without the gate, healthy slices are masked
    assert not gated[..., prob < 0.5].any()
    assert (gated == (plain & (prob >= 0.5))).all()
    assert gated[..., ~healthy].any() and not gated[..., healthy].any()
    with pytest.raises(ValueError, match="gate_classifier"):
        VolumeSegmentationPipeline(None, build_method_inferer("threshold"), slice_gate=0.5)
    with pytest.raises(ValueError, match="slice_gate"):
        VolumeSegmentationPipeline(None, build_method_inferer("threshold"), slice_gate=1.5, gate_classifier=_BrightSliceClassifier())


def test_component_filter_drops_specks(tmp_path):
    image = np.zeros((32, 32, 8), np.float32)
    image[4:28, 4:28, :] = 100.0 + 50.0 * np.random.default_rng(0).random((24, 24, 8))  # body with texture
    image[10:18, 10:18, 2:6] = 400.0  # a lesion of 256 voxels
    for x, y, z in ((24, 24, 1), (6, 25, 6), (25, 6, 7)):
        image[x, y, z] = 400.0  # single-voxel specks
    path = tmp_path / "specks.nii.gz"
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(path))
    plain = _source().segment(str(path))["mask"][0].numpy() > 0
    filtered_pipe = VolumeSegmentationPipeline(None, build_method_inferer("volume_threshold"), task="brats",
                                               map_mode=None, threshold=0.7, min_component_size=10)
    filtered = filtered_pipe.segment(str(path))["mask"][0].numpy() > 0
    assert plain.sum() == 256 + 3
    assert filtered.sum() == 256 and filtered[10:18, 10:18, 2:6].all()
    with pytest.raises(ValueError, match="min_component_size"):
        VolumeSegmentationPipeline(None, build_method_inferer("threshold"), min_component_size=-1)


def test_volume_threshold_is_one_percentile_per_volume_at_full_resolution(cases):
    item = cases[0]
    data = _source(0.7).segment(item)
    image = np.asarray(volume_preprocess("brats")(dict(item))["image"])[0]
    body = image > 0
    expected = (image > 0.7 * np.percentile(image[body], 99)) & body
    mask = data["mask"][0].numpy() > 0
    assert mask.shape == SHAPE
    assert (mask != expected).mean() < 1e-3  # percentile interpolation may differ by a voxel at the boundary
    assert default_map_mode("volume_threshold") is None and default_threshold("volume_threshold") == 0.7


def test_inferers_of_the_second_stage():
    torch.manual_seed(0)
    net = UNet(2, 1, 2, channels=(4, 8), strides=(2,), num_res_units=1).eval()
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    prob = SegmentationProbabilityInferer()(x, net)
    assert prob.shape == (3, 1, 16, 16) and 0 <= float(prob.min()) and float(prob.max()) <= 1
    torch.testing.assert_close(prob, torch.softmax(net(x), 1)[:, 1:2])
    with pytest.raises(ValueError, match="target_channel"):
        SegmentationProbabilityInferer(target_channel=2)(x, net)
    with pytest.raises(ValueError, match="segmentation network"):
        SegmentationProbabilityInferer()(x, None)
    with pytest.raises(ValueError, match="segmentation network"):
        build_method_inferer("segmenter")
    gate = SliceProbabilityInferer(_BrightSliceClassifier())
    as_map, per_item = gate(x, None), gate.probabilities(x)
    assert as_map.shape == x.shape and per_item.shape == (3,)
    torch.testing.assert_close(as_map, per_item.reshape(3, 1, 1, 1).expand_as(x))
    with pytest.raises(ValueError, match="classifier"):
        SliceProbabilityInferer(None)
    assert "segmenter" in METHODS and "volume_threshold" in METHODS


def test_mirrored_test_time_augmentation_averages_the_flipped_copy_and_makes_the_map_mirror_symmetric():
    torch.manual_seed(0)
    net = perturb(UNet(2, 1, 2, channels=(4, 8), strides=(2,), num_res_units=1), scale=0.3)
    x = torch.rand(3, 1, 16, 12) * 2 - 1
    plain = SegmentationProbabilityInferer()
    mirrored = SegmentationProbabilityInferer(flip_axes=(0,))
    expected = (plain(x, net) + plain(x.flip(2), net).flip(2)) / 2
    torch.testing.assert_close(mirrored(x, net), expected)
    assert not torch.allclose(mirrored(x, net), plain(x, net))  # the network alone is not mirror-symmetric ...
    torch.testing.assert_close(mirrored(x.flip(2), net), mirrored(x, net).flip(2))  # ... its averaged map is
    both = SegmentationProbabilityInferer(flip_axes=(0, 1))(x, net)
    torch.testing.assert_close(both, (2 * expected + plain(x.flip(3), net).flip(3)) / 3)
    assert build_method_inferer("segmenter", network=net, flip_axes=[0]).flip_axes == (0,)
    with pytest.raises(ValueError, match="flip_axes must be distinct"):
        SegmentationProbabilityInferer(flip_axes=(0, 0))
    with pytest.raises(ValueError, match="flip_axes must be distinct"):
        SegmentationProbabilityInferer(flip_axes=(-1,))
    with pytest.raises(ValueError, match=r"flip_axes \[2\] are beyond the 2 spatial axes"):
        SegmentationProbabilityInferer(flip_axes=(2,))(x, net)


# ---- bundle configs -----------------------------------------------------------------------------------------------
TINY_SEGMENTER = {"network_def#channels": [4, 8, 16], "network_def#strides": [2, 2], "network_def#num_res_units": 1}


@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_segmentation_configs_match_between_training_and_inference(bundle):
    train = ConfigParser(json.loads((BUNDLES[bundle] / "configs" / "train.json").read_text()))
    infer = ConfigParser(json.loads((BUNDLES[bundle] / "configs" / "inference.json").read_text()))
    assert infer.get("network_def") == train.get("network_def")  # the default network is the segmenter
    assert infer.get("roi_size") == train.get("segmenter_spatial_size")
    assert infer.get("context_slices") == train.get("context_slices")  # 2.5D input: the same neighbours
    assert infer.get("task") == train.get("task")
    diffusion = ConfigParser(json.loads((BUNDLES[bundle] / "configs" / "train_diffusion.json").read_text()))
    assert train.get("source_network_def") == diffusion.get("network_def")
    assert train.get("null_class") == diffusion.get("null_class")


def test_train_segmentation_then_evaluate_with_gate_and_components(cases, tmp_path):
    dataset = str(Path(cases[0]["image"]).parents[1])
    fast = {"max_epochs": 1, "epoch_length": 3, "batch_size": 4, "val_batch_size": 16, "progress_bar": False,
            "segmenter_spatial_size": [SIZE, SIZE], "spatial_size": [SIZE, SIZE], "val_fraction": 0.2,
            "test_fraction": 0.2}
    run(config_file=str(BUNDLES["brats"] / "configs" / "train.json"), bundle_root=str(tmp_path),
        dataset_dir=dataset, **fast, **TINY_SEGMENTER)
    models = tmp_path / "models"
    assert (models / "model.pt").exists() and (models / "model_final.pt").exists()
    state = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    pseudo = list((tmp_path / "outputs" / "pseudo_masks").rglob("*_pseudo.nii.gz"))
    datalist = json.loads((tmp_path / "outputs" / "train" / "datalist.json").read_text())
    # training scans (what the network learns from) and validation scans (what selects its checkpoint, without masks)
    assert len(pseudo) == len(datalist["training"]) + len(datalist["validation"])
    # beside the weights: the intensity profile of the training scans, which inference compares each scan with
    profile = json.loads((models / "intensity_profile.json").read_text())
    assert sorted(profile["values"]) == sorted(item["case"] for item in datalist["training"])
    assert 0 < profile["low"] <= profile["high"] <= 1
    # perturb the trained weights so the tiny network gives a real (non-constant) map, then evaluate
    gen = torch.Generator().manual_seed(0)
    torch.save({k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                for k, v in state.items()}, models / "model.pt")
    torch.manual_seed(1)
    clf = NoisyClassifier(spatial_dims=2, in_channels=1, num_classes=2, input_shape=(SIZE, SIZE), channels=(8, 16),
                          attention_levels=(False, False), num_res_blocks=1, num_head_channels=8, norm_num_groups=4)
    torch.save(perturb(clf).state_dict(), models / "classifier.pt")
    overrides = {
        "model_path": str(models / "model.pt"), "roi_size": [SIZE, SIZE], "spatial_size": [SIZE, SIZE],
        **TINY_SEGMENTER, "min_component_size": 5, "progress": False, "num_overlays": 0, "slice_gate": 0.5,
        "classifier_path": str(models / "classifier.pt"), "classifier_def#channels": [8, 16],
        "classifier_def#attention_levels": [False, False], "classifier_def#num_head_channels": 8,
        "classifier_def#norm_num_groups": 4,
    }
    configs = [str(BUNDLES["brats"] / "configs" / n) for n in ("inference.json", "slice_gate.json", "evaluate.json")]
    workflow = ConfigWorkflow(config_file=configs, logging_file=False, workflow_type="infer", dataset_dir=dataset,
                              output_dir=str(tmp_path / "eval"), **overrides)
    workflow.initialize()
    workflow.run()
    state = workflow.evaluator.state
    assert workflow.parser.get_parsed_content("mask_threshold") == default_threshold("segmenter", "brats") == 0.7
    assert workflow.parser.get_parsed_content("volume_aware").transforms[0].threshold == 0.5  # the gate is on
    workflow.finalize()
    assert state.summary["num_positive_volumes"] >= 1
    masks = sorted((tmp_path / "eval").glob("*_mask.nii.gz"))
    assert len(masks) == len(cases)
    assert nib.load(str(masks[0])).shape == SHAPE
    # a second round: the trained segmenter relabels the training split (pseudo_source segmenter)
    round2 = tmp_path / "round2"
    run(config_file=str(BUNDLES["brats"] / "configs" / "train.json"), bundle_root=str(round2),
        dataset_dir=dataset, pseudo_source="segmenter", pseudo_threshold=0.5,
        source_segmenter_path=str(models / "model.pt"), **fast, **TINY_SEGMENTER)
    settings = [json.loads(p.read_text()) for p in (round2 / "outputs" / "pseudo_masks").rglob("settings.json")]
    assert [s["source"] for s in settings] == ["segmenter at 0.5"]
    assert settings[0]["pipeline"]["inferer"]["class"] == "SegmentationProbabilityInferer"
    round2_masks = sorted((round2 / "outputs" / "pseudo_masks").rglob("*_pseudo.nii.gz"))
    assert len(round2_masks) == len(pseudo) and (round2 / "models" / "model.pt").exists()


def test_train_json_use_ema_saves_the_averaged_segmenter_and_keeps_the_average_in_checkpoints(cases, tmp_path):
    """
    ``--use_ema True``: model.pt / model_final.pt hold the EMA of the weights, the checkpoint carries the average
    (the CHAOS train.json has the same keys, checked in test_bundle_train.py with the augmentation recipe).
    """
    bundle, dataset = "brats", str(Path(cases[0]["image"]).parents[1])
    fast = {"max_epochs": 1, "epoch_length": 3, "batch_size": 4, "val_batch_size": 16, "progress_bar": False,
            "segmenter_spatial_size": [SIZE, SIZE], "spatial_size": [SIZE, SIZE], "val_fraction": 0.2,
            "test_fraction": 0.2, "bright_distractor_prob": 0.0}
    run(config_file=str(BUNDLES[bundle] / "configs" / "train.json"), bundle_root=str(tmp_path / "run"),
        dataset_dir=dataset, use_ema=True, ema_decay=0.5, **fast, **TINY_SEGMENTER)
    models, out = tmp_path / "run" / "models", tmp_path / "run" / "outputs" / "train"
    checkpoint = torch.load(out / "checkpoints" / "checkpoint_epoch=1.pt", map_location="cpu", weights_only=True)
    assert checkpoint["ema"]["num_updates"] == 3
    ema_weight = checkpoint["ema"]["ema_network"]["model.0.conv.unit0.conv.weight"]
    final = torch.load(models / "model_final.pt", map_location="cpu", weights_only=True)
    assert torch.equal(final["model.0.conv.unit0.conv.weight"], ema_weight)
    assert not torch.equal(checkpoint["network"]["model.0.conv.unit0.conv.weight"], ema_weight)
    assert set(torch.load(models / "model.pt", map_location="cpu", weights_only=True)) == set(final)
    with pytest.raises(RuntimeError, match="ema_decay"):
        run(config_file=str(BUNDLES[bundle] / "configs" / "train.json"), bundle_root=str(tmp_path / "bad"),
            dataset_dir=dataset, use_ema=True, ema_decay=1.5, **fast, **TINY_SEGMENTER)


def test_a_2_5d_segmenter_trains_and_segments_with_its_neighbouring_slices_as_channels(cases, tmp_path):
    """``--context_slices 1`` in train.json and inference.json: a 3-channel segmenter, trained on stacks of
    neighbouring slices and run on the same stacks; the other methods refuse the option."""
    from monai_wsss.bundle import parse_context_slices

    dataset = str(Path(cases[0]["image"]).parents[1])
    run(config_file=str(BUNDLES["brats"] / "configs" / "train.json"), bundle_root=str(tmp_path), dataset_dir=dataset,
        max_epochs=1, epoch_length=2, batch_size=4, val_batch_size=16, progress_bar=False, context_slices=1,
        segmenter_spatial_size=[SIZE, SIZE], spatial_size=[SIZE, SIZE], val_fraction=0.2, test_fraction=0.2,
        **TINY_SEGMENTER)
    state = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    first_conv = next(v for k, v in state.items() if k.endswith("weight") and v.ndim == 4)
    assert first_conv.shape[1] == 3
    gen = torch.Generator().manual_seed(0)
    torch.save({k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                for k, v in state.items()}, tmp_path / "models" / "model.pt")
    workflow = ConfigWorkflow(
        config_file=str(BUNDLES["brats"] / "configs" / "inference.json"), logging_file=False, workflow_type="infer",
        dataset_dir=dataset, output_dir=str(tmp_path / "eval"), model_path=str(tmp_path / "models" / "model.pt"),
        roi_size=[SIZE, SIZE], context_slices=1, progress=False, **TINY_SEGMENTER,
    )
    workflow.initialize()
    workflow.run()
    assert workflow.parser.get_parsed_content("inferer").context_slices == 1
    workflow.finalize()
    masks = sorted((tmp_path / "eval").glob("*_mask.nii.gz"))
    assert len(masks) == len(cases) and nib.load(str(masks[0])).shape == SHAPE
    assert parse_context_slices(0, "cdm") == 0 and parse_context_slices("2", "segmenter") == 2
    with pytest.raises(ValueError, match="--context_slices 1: method 'cdm' segments single slices"):
        parse_context_slices(1, "cdm")
    with pytest.raises(ValueError, match="context_slices"):
        parse_context_slices(-1, "segmenter")


@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_coordinate_channels_override_gives_training_and_inference_the_same_network(bundle):
    """``configs/coordinate_channels.json`` layered on train.json and on inference.json: the same wrapped network
    in both (MONAI Label and ``ckpt_export`` read ``network_def``)."""
    from monai_wsss.networks.nets import CoordinateChannelsNetwork

    configs = BUNDLES[bundle] / "configs"
    override = str(configs / "coordinate_channels.json")
    parsed = {}
    for name in ("train.json", "inference.json"):
        parser = ConfigParser()
        parser.read_config([str(configs / name), override])
        parsed[name] = parser.get_parsed_content("network_def")
        assert isinstance(parsed[name], CoordinateChannelsNetwork)
    assert set(parsed["train.json"].state_dict()) == set(parsed["inference.json"].state_dict())
    # the override copies the bundle's segmenter UNet; only its input channels (+2 coordinates) may differ
    inner = json.loads(Path(override).read_text())["network_def"]["network"]
    for name in ("train.json", "inference.json"):
        base = json.loads((configs / name).read_text())["network_def"]
        assert {k: v for k, v in inner.items() if k != "in_channels"} == {k: v for k, v in base.items() if k != "in_channels"}
        assert inner["in_channels"] == base["in_channels"].replace("+ 1", "+ 3")


def test_coordinate_channels_override_trains_and_segments_with_location_channels(cases, tmp_path):
    """The override trains a segmenter with two coordinate channels beside the image, and inference runs it on
    whole scans from its own weights."""
    configs = BUNDLES["brats"] / "configs"
    override = str(configs / "coordinate_channels.json")
    tiny = {f"network_def#network#{k.split('#')[1]}": v for k, v in TINY_SEGMENTER.items()}
    dataset = str(Path(cases[0]["image"]).parents[1])
    run(config_file=[str(configs / "train.json"), override], bundle_root=str(tmp_path), dataset_dir=dataset,
        max_epochs=1, epoch_length=2, batch_size=4, val_batch_size=16, progress_bar=False,
        segmenter_spatial_size=[SIZE, SIZE], spatial_size=[SIZE, SIZE], val_fraction=0.2, test_fraction=0.2, **tiny)
    state = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    first_conv = next(v for k, v in state.items() if k.endswith("weight") and v.ndim == 4)
    assert first_conv.shape[1] == 3 and all(k.startswith("network.") for k in state)
    workflow = ConfigWorkflow(
        config_file=[str(configs / "inference.json"), override], logging_file=False, workflow_type="infer",
        dataset_dir=dataset, output_dir=str(tmp_path / "eval"), model_path=str(tmp_path / "models" / "model.pt"),
        roi_size=[SIZE, SIZE], progress=False, **tiny,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    masks = sorted((tmp_path / "eval").glob("*_mask.nii.gz"))
    assert len(masks) == len(cases) and nib.load(str(masks[0])).shape == SHAPE


def test_the_fully_supervised_ceiling_trains_on_the_target_masks_beside_the_weak_model(cases, tmp_path):
    """train_fully_supervised.json: the same network and recipe on the training scans' true target masks (the
    "fully supervised" row of the tables), written to its own folder so the weak model is never replaced."""
    from monai_wsss.apps import write_target_masks

    dataset = str(Path(cases[0]["image"]).parents[1])
    fast = {"max_epochs": 1, "epoch_length": 2, "batch_size": 4, "val_batch_size": 16, "progress_bar": False,
            "segmenter_spatial_size": [SIZE, SIZE], "spatial_size": [SIZE, SIZE], "val_fraction": 0.2,
            "test_fraction": 0.2}
    configs = [str(BUNDLES["brats"] / "configs" / n) for n in ("train.json", "train_fully_supervised.json")]
    run(config_file=configs, bundle_root=str(tmp_path), dataset_dir=dataset, **fast, **TINY_SEGMENTER)
    out = tmp_path / "outputs" / "train_fully_supervised"
    assert (out / "models" / "model.pt").is_file() and not (tmp_path / "models").exists()
    training = json.loads((out / "datalist.json").read_text())["training"]
    masks = sorted((tmp_path / "outputs" / "pseudo_masks" / "brats_target_masks").glob("*_pseudo.nii.gz"))
    assert len(masks) == len(training)
    for item in training:  # the whole tumour (labels 1, 2, 4) of each training scan, nothing else
        mask = np.asarray(nib.load(str(masks[0].parent / f"{item['case']}_pseudo.nii.gz")).dataobj)
        np.testing.assert_array_equal(mask, (np.asarray(nib.load(item["seg"]).dataobj) > 0).astype(np.uint8))
    with pytest.raises(ValueError, match="'case' and 'seg'"):
        write_target_masks([{"case": "x", "image": cases[0]["image"]}], "brats", tmp_path)
