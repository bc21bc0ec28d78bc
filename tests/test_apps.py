"""monai_wsss.apps pieces: input listing, weight loading, method selection, the volume pipeline, scores, reports."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import TINY_UNET, tiny_unet
from monai_wsss.apps import (
    METHODS,
    VolumeEvaluation,
    VolumeSegmentationPipeline,
    build_method_inferer,
    default_map_mode,
    format_summary_table,
    list_volumes,
    load_weights,
    save_overlay,
    select_overlay_slices,
    write_csv,
)
from monai_wsss.data import make_synthetic_dataset
from monai_wsss.inferers import ConditionDifferenceInferer, GuidedDiffusionAnomalyInferer, IntensityThresholdInferer
from monai_wsss.networks.nets import ConditionalDiffusionUNet


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("apps")
    return root, make_synthetic_dataset(root / "brats", num_cases=2, shape=(32, 28, 10), seed=1)


# ---- inputs ---------------------------------------------------------------------------------------------------
def test_list_volumes_sources_and_errors(cases, tmp_path):
    root, items = cases
    assert [it["case"] for it in list_volumes(root / "brats")] == ["synth_000", "synth_001"]
    single = list_volumes(image=items[0]["image"], seg=items[0]["seg"])
    assert single == [{"image": items[0]["image"], "case": "synth_000_flair", "seg": items[0]["seg"]}]
    assert list_volumes(items[1]["image"])[0]["image"] == items[1]["image"]
    with pytest.raises(ValueError, match="--dataset_dir"):
        list_volumes()
    with pytest.raises(ValueError, match="not both"):
        list_volumes(root / "brats", image=items[0]["image"])
    with pytest.raises(ValueError, match="datalist JSON only"):
        list_volumes(root / "brats", split="test")
    with pytest.raises(ValueError, match="single image only"):
        list_volumes(root / "brats", seg=items[0]["seg"])
    with pytest.raises(ValueError, match="unknown task"):
        list_volumes(root / "brats", task="liver")
    with pytest.raises(FileNotFoundError, match="missing_seg.nii.gz"):
        list_volumes(image=items[0]["image"], seg=tmp_path / "missing_seg.nii.gz")
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="NIfTI"):
        list_volumes(text)
    with pytest.raises(ValueError, match="ground-truth mask"):
        list_volumes(image=items[0]["image"], require_seg=True)


def test_load_weights_accepts_saver_formats_and_names_bad_files(tmp_path):
    net = tiny_unet(seed=3)
    torch.save({"model": net.state_dict()}, tmp_path / "wrapped.pt")
    torch.save(net.state_dict(), tmp_path / "bare.pt")
    for name in ("wrapped.pt", "bare.pt"):
        fresh = ConditionalDiffusionUNet(**TINY_UNET)
        loaded = load_weights(fresh, tmp_path / name, "cpu")
        assert not loaded.training
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pt"):
        load_weights(ConditionalDiffusionUNet(**TINY_UNET), tmp_path / "corrupt.pt")
    torch.save({"epoch": 3}, tmp_path / "trainer.pt")
    with pytest.raises(ValueError, match="no network weights"):
        load_weights(ConditionalDiffusionUNet(**TINY_UNET), tmp_path / "trainer.pt")
    with pytest.raises(ValueError, match="trained with a null class"):
        load_weights(ConditionalDiffusionUNet(**TINY_UNET), _save(tmp_path, tiny_unet(null_class=True)))


def _save(folder, net):
    path = folder / "null.pt"
    torch.save(net.state_dict(), path)
    return path


# ---- methods --------------------------------------------------------------------------------------------------
def test_build_method_inferer(scheduler):
    net, clf = tiny_unet(), object()
    cdm = build_method_inferer("cdm", scheduler, net, noise_level=30, num_steps=3, tau=0.9)
    assert isinstance(cdm, ConditionDifferenceInferer) and cdm.guidance_scale == 0 and cdm.num_steps == 3
    cg = build_method_inferer("cg_cdm", scheduler, net, clf, guidance_scale=5.0)
    assert cg.guidance_scale == 5.0 and cg.classifier is clf and cg.num_steps == 10  # R defaults to num_steps
    # each CDM variant keeps its own R: guided_num_steps reaches CG-CDM only
    kw = dict(noise_level=30, num_steps=3, guidance_scale=5.0, guided_num_steps=6)
    assert build_method_inferer("cg_cdm", scheduler, net, clf, **kw).num_steps == 6
    assert build_method_inferer("cdm", scheduler, net, clf, **kw).num_steps == 3
    cgd = build_method_inferer("cg_diff", scheduler, net, clf, cgdiff_level=40, cgdiff_guidance=50.0)
    assert isinstance(cgd, GuidedDiffusionAnomalyInferer) and (cgd.noise_level, cgd.mode) == (40, "classifier")
    cfg = build_method_inferer("cfg", scheduler, tiny_unet(null_class=True), cfg_scale=2.0)
    assert cfg.mode == "cfg" and cfg.cfg_scale == 2.0
    assert isinstance(build_method_inferer("threshold"), IntensityThresholdInferer)
    with pytest.raises(ValueError, match="unknown method"):
        build_method_inferer("gradcam", scheduler, net)
    with pytest.raises(ValueError, match="noisy classifier"):
        build_method_inferer("cg_diff", scheduler, net)
    with pytest.raises(ValueError, match="null class"):
        build_method_inferer("cfg", scheduler, net)
    with pytest.raises(ValueError, match="guidance_scale > 0"):
        build_method_inferer("cg_cdm", scheduler, net, clf, guidance_scale=0.0)
    with pytest.raises(ValueError, match="diffusion network"):
        build_method_inferer("cdm", scheduler, None)
    assert [default_map_mode(m) for m in METHODS] == [None, "signed", "signed", "abs", "abs", None, None]
    assert default_map_mode("cdm", "chaos") == "abs"


# ---- pipeline -------------------------------------------------------------------------------------------------
def test_pipeline_segment_and_run_with_the_threshold_baseline(cases, tmp_path):
    """The intensity baseline needs no network: the pipeline alone, end to end, with a fixed threshold."""
    _, items = cases
    pipe = VolumeSegmentationPipeline(None, IntensityThresholdInferer(), roi_size=(16, 16), map_mode=None, threshold=0.7)
    out = pipe.segment(items[0])
    image = nib.load(items[0]["image"])
    assert out["map"].shape == out["mask"].shape == (1, *image.shape)
    assert set(out["mask"].unique().tolist()) <= {0.0, 1.0}
    np.testing.assert_array_equal(out["mask"].numpy(), (out["map"] > 0.7).float().numpy())
    result = pipe.run(items, tmp_path, evaluate=True, num_overlays=1)
    assert result["summary"]["slice_dice"] > 0.3  # synthetic lesions are bright: the baseline finds them
    assert (tmp_path / "overlays" / "synth_000.png").is_file() and not (tmp_path / "overlays" / "synth_001.png").exists()
    with open(tmp_path / "metrics.csv") as f:
        assert [r["case"] for r in csv.DictReader(f)] == ["synth_000", "synth_001"]
    assert json.loads((tmp_path / "summary.json").read_text())["threshold"] == 0.7
    # one scale per volume: slice maxima differ, the volume's maximum is 1
    per_volume = VolumeSegmentationPipeline(
        None, IntensityThresholdInferer(percentile=None), roi_size=(16, 16), normalize_per="volume", threshold=0.9
    ).segment(items[0])
    slice_max = per_volume["map"][0].amax(dim=(0, 1))
    assert float(slice_max.max()) == pytest.approx(1.0) and float(slice_max[slice_max > 0].min()) < 0.95
    assert per_volume["mask"][0].sum(dim=(0, 1)).eq(0).any()  # slices whose map stays low: empty masks
    with pytest.raises(ValueError, match="normalize_per"):
        VolumeSegmentationPipeline(None, IntensityThresholdInferer(), normalize_per="case")
    with pytest.raises(ValueError, match="run\\(\\)"):
        VolumeSegmentationPipeline(None, IntensityThresholdInferer(), threshold="average_otsu").segment(items[0])
    with pytest.raises(ValueError, match="threshold"):
        VolumeSegmentationPipeline(None, IntensityThresholdInferer(), threshold="mean")
    with pytest.raises(ValueError, match="callable"):
        VolumeSegmentationPipeline(None, "cdm")
    with pytest.raises(ValueError, match="empty"):
        pipe.run([], tmp_path)


# ---- scores and reports -----------------------------------------------------------------------------------------
def test_volume_evaluation_scores_and_chaos_rule():
    seg = torch.zeros(1, 20, 20, 4)
    seg[0, 5:15, 5:15, 1] = 1  # 25 % of slice 1
    seg[0, 0:2, 0:2, 2] = 1  # 1 % of slice 2: dropped from slice scores under the 5 % rule
    mask = seg.clone()
    mask[0, 10:12, 10:12, 3] = 1  # a false alarm on a negative slice
    ev = VolumeEvaluation(slice_axis=-1)
    row = ev.add_mask("a", mask, seg, spacing=(2.0, 2.0, 5.0))
    assert row["num_positive_slices"] == 2 and row["slice_dice"] == pytest.approx(1.0)
    assert row["false_positive_slices"] == 1 and row["slice_hd95_mm"] == pytest.approx(0.0)
    assert row["volume_dice"] == pytest.approx(2 * 104 / (108 + 104))
    ev.add_map("a", seg * 2.0 + 0.1, seg)
    assert ev.rows["a"]["pixel_auroc"] == pytest.approx(1.0)
    chaos = VolumeEvaluation(slice_axis=-1, eval_min_fraction=0.05)
    assert chaos.add_mask("a", mask, seg)["num_positive_slices"] == 1
    assert chaos.aggregate()["num_excluded_slices"] == 1
    empty = VolumeEvaluation()
    empty.add_mask("b", torch.zeros_like(seg), seg)
    summary = empty.aggregate()
    assert summary["slice_dice"] == 0.0 and summary["num_hd95_missing"] == 2 and np.isnan(summary["slice_hd95"])
    table = format_summary_table({"m": summary})
    assert "| m | 1 | 2 | 0.000 ± 0.000" in table and "n/a" in table
    with pytest.raises(ValueError, match="eval_min_fraction"):
        VolumeEvaluation(eval_min_fraction=1.5)


def test_overlays_and_csv(tmp_path):
    image = torch.rand(1, 24, 24, 8)
    seg = torch.zeros_like(image)
    seg[..., 2:6] = 0
    seg[0, 8:14, 8:14, 2:7] = 1
    assert select_overlay_slices(image, seg, num_slices=3) == [3, 4, 5]
    assert select_overlay_slices(image, None, None, num_slices=2) == [2, 5]
    png = save_overlay(tmp_path / "o.png", image, torch.rand_like(image), seg, seg, title="t")
    assert png.is_file() and png.stat().st_size > 1000
    with pytest.raises(ValueError, match="one shape"):
        save_overlay(tmp_path / "bad.png", image, torch.rand(1, 24, 24, 7), seg)
    path = write_csv(tmp_path / "r.csv", [{"case": "a", "x": 0.1234567891}, {"case": "b", "y": 2}])
    assert path.read_text().splitlines() == ["case,x,y", "a,0.123457,", "b,,2"]
