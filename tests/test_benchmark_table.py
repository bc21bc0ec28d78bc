from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from conftest import tiny_classifier, tiny_unet
from monai_wsss.benchmark.table import build_methods, evaluate_method, load_eval_slices, maps_to_masks, write_table
from monai_wsss.data import make_synthetic_dataset
from monai_wsss.metrics import PixelAUCMetric


@pytest.fixture(scope="module")
def slices(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(root, num_cases=5, shape=(64, 64, 24), seed=0)
    return load_eval_slices(root, "brats", split="test", max_slices=6, spatial_size=(32, 32), test_fraction=0.4)


def test_eval_slices_are_a_seeded_positive_subset(slices, tmp_path):
    images, segs, info = slices
    assert images.shape == segs.shape and images.shape[1:] == (1, 32, 32)
    assert info["slices_used"] == images.shape[0] <= 6 and info["cases"] == 2
    assert (segs.flatten(1).sum(1) > 0).all()
    assert images.min() >= -1 and images.max() <= 1


def test_every_method_gives_a_scored_row(slices, scheduler):
    images, segs, _ = slices
    net, clf = tiny_unet(), tiny_classifier(input_shape=(32, 32))
    specs = build_methods(
        ["threshold", "threshold_fixed", "gradcam", "cdm", "cg_cdm", "cg_diff"], scheduler, clf, net,
        noise_level=30, num_steps=3, guidance_scale=5.0, cgdiff_level=4, cgdiff_guidance=5.0,
    )
    rows = [evaluate_method(s, net, clf, images, segs, repeats=2, batch_size=4) for s in specs]
    by_name = {r["method"]: r for r in rows}
    assert by_name["cdm"]["repeats"] == 2 and by_name["gradcam"]["repeats"] == 1
    assert by_name["cdm"]["dice_std"] > 0  # different noise seeds give different maps
    for r in rows:
        assert 0 <= r["dice"] <= 1 and 0 <= r["iou"] <= r["dice"] + 1e-9
        assert 0 <= r["auroc"] <= 1 and r["sec_per_slice"] > 0
    # a fixed threshold finds the bright synthetic lesions far better than chance
    assert by_name["threshold_fixed"]["dice"] > 0.3


def test_unknown_or_unavailable_methods_fail_clearly(scheduler):
    net = tiny_unet()
    with pytest.raises(ValueError, match="unknown method 'unet'"):
        build_methods(["unet"], scheduler, None, net)
    with pytest.raises(ValueError, match="needs the bundle's classifier"):
        build_methods(["cg_diff"], scheduler, None, net)
    with pytest.raises(ValueError, match="null class"):
        build_methods(["cfg"], scheduler, None, net)


def test_pixel_scores_follow_the_map_reading():
    from monai_wsss.transforms import oriented_map

    maps = torch.tensor([[[[-0.5, 0.2], [0.0, -0.1]]]])
    assert torch.equal(oriented_map(maps, "signed"), torch.tensor([[[[0.0, 0.2], [0.0, 0.0]]]]))
    assert torch.equal(oriented_map(maps, "abs"), maps.abs())
    assert torch.equal(oriented_map(maps, None), maps)
    # an "abs" method scores a strongly negative pixel as the most likely target
    seg = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    auc = PixelAUCMetric()
    auc(oriented_map(maps, "abs"), seg)
    assert auc.aggregate()["auroc"] == 1.0


def test_fixed_threshold_mask_ignores_background():
    images = torch.full((1, 1, 4, 4), -1.0)
    images[..., :2, :] = 0.5
    maps = torch.ones(1, 1, 4, 4)
    spec = build_methods(["threshold_fixed"], None, None, tiny_unet())[0]
    mask = maps_to_masks(maps, images, spec)
    assert mask[..., :2, :].all() and not mask[..., 2:, :].any()


def test_table_writer(tmp_path):
    rows = [
        {"method": "cdm", "setting": "Q=200", "repeats": 4, "slices": 8, "dice": 0.5, "dice_std": 0.01, "iou": 0.4,
         "iou_std": 0.02, "hd95": 7.0, "hd95_std": 1.0, "auroc": 0.9, "auroc_std": 0.0, "auprc": 0.6, "auprc_std": 0.0,
         "hd95_missing": 1, "sec_per_slice": 0.2},
        {"method": "threshold", "setting": "", "repeats": 1, "slices": 8, "dice": 0.6, "dice_std": 0.0, "iou": 0.45,
         "iou_std": 0.0, "hd95": math.nan, "hd95_std": 0.0, "auroc": 0.95, "auroc_std": 0.0, "auprc": 0.7,
         "auprc_std": 0.0, "hd95_missing": 8, "sec_per_slice": 0.001},
    ]
    info = {"split": "test", "cases": 2, "cases_used": 2, "positive_slices": 10, "slices_used": 8}
    md = write_table(rows, tmp_path, "synthetic", info)
    assert "| cdm | Q=200 | 0.500 ± 0.010 |" in md and "| threshold |  | 0.600 |" in md and "n/a" in md
    with open(tmp_path / "table.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["cdm", "threshold"]
    assert (tmp_path / "table.png").stat().st_size > 1000
    assert json.loads((tmp_path / "info.json").read_text())["slices_used"] == 8


def test_ablation_sweeps_one_parameter_at_a_time_and_writes_plots(tmp_path):
    from monai_wsss.benchmark.ablation import sweep_settings, write_ablation

    base = {"noise_level": 10, "num_steps": 5, "tau": 0.95, "guidance_scale": 0.0, "ensemble": 1}
    settings = sweep_settings(base, {"noise_level": [2, 10, 20], "tau": [0.9, 0.95]})
    assert [p for p, _ in settings] == ["noise_level", "noise_level", "tau", "tau"]  # Q=2 < R=5 is skipped
    for param, setting in settings:
        assert all(setting[k] == v for k, v in base.items() if k != param)
    rows = [{"parameter": p, **s, "repeats": 2, "dice": 0.1 * i, "dice_std": 0.01, "iou": 0.05, "hd95": 3.0, "auroc": 0.8}
            for i, (p, s) in enumerate(settings)]
    write_ablation(rows, tmp_path, {"slices_used": 4, "split": "validation", "cases_used": 1})
    assert (tmp_path / "ablation.png").stat().st_size > 1000
    assert "| 0.9 | 0.200 ± 0.010 |" in (tmp_path / "ablation.md").read_text()


def test_table_command_uses_the_bundles_inference_defaults(tmp_path):
    from pathlib import Path

    from monai_wsss.benchmark.table import METHOD_SETTINGS, bundle_method_settings, main

    bundle = Path(__file__).resolve().parents[1] / "bundles" / "brats_cdm"
    settings = bundle_method_settings(bundle)
    cdm = json.loads((bundle / "configs" / "inference_cdm.json").read_text())
    cg_cdm = json.loads((bundle / "configs" / "inference_cg_cdm.json").read_text())
    assert len(settings) == len(METHOD_SETTINGS) == 10
    assert (settings["noise_level"], settings["tau"], settings["num_steps"]) == (cdm["noise_level"], cdm["tau"], cdm["num_steps"])
    assert (settings["guidance_scale"], settings["guided_num_steps"]) == (cg_cdm["guidance_scale"], cg_cdm["num_steps"])
    assert (settings["guided_noise_level"], settings["guided_tau"]) == (cg_cdm["noise_level"], cg_cdm["tau"])
    data = tmp_path / "data"
    make_synthetic_dataset(data, num_cases=5, shape=(64, 64, 12), seed=1)
    args = ["--bundle_root", str(bundle), "--dataset_dir", str(data), "--methods", "threshold", "cdm",
            "--max_slices", "3", "--repeats", "1", "--out_dir", str(tmp_path / "out"), "--device", "cpu"]
    rows = main([*args, "--num_steps", "2"])
    cdm = {r["method"]: r for r in rows}["cdm"]
    # the bundle's Q and tau, the command line's R
    assert cdm["setting"] == f"Q={settings['noise_level']}, R=2, tau={settings['tau']}"
    # CG-CDM keeps its own Q and tau (the bundle's inference_cg_cdm.json), not CDM's
    from monai.networks.schedulers import DDIMScheduler

    specs = build_methods(["cdm", "cg_cdm"], DDIMScheduler(num_train_timesteps=100), tiny_classifier(), tiny_unet(), noise_level=30, num_steps=3, tau=0.9,
                          guided_noise_level=20, guided_tau=0.8, guided_num_steps=4)
    assert [(s.inferer.noise_level, s.inferer.tau, s.inferer.num_steps) for s in specs] == [(30, 0.9, 3), (20, 0.8, 4)]
    assert (tmp_path / "out" / "table.md").is_file()
    with pytest.raises(FileNotFoundError, match="inference_"):
        bundle_method_settings(tmp_path)


def test_ablation_command_reads_maps_in_the_requested_mode(tmp_path):
    from pathlib import Path

    from monai_wsss.benchmark.ablation import main

    bundle = Path(__file__).resolve().parents[1] / "bundles" / "brats_cdm"
    data = tmp_path / "data"
    make_synthetic_dataset(data, num_cases=5, shape=(64, 64, 12), seed=1)
    common = ["--bundle_root", str(bundle), "--dataset_dir", str(data), "--split", "test", "--params", "tau",
              "--grid", '{"tau": [0.8]}', "--max_slices", "3", "--repeats", "1", "--num_steps", "2", "--device", "cpu",
              "--criterion", "pixel_dice"]
    signed = main([*common, "--out_dir", str(tmp_path / "signed")])
    absolute = main([*common, "--out_dir", str(tmp_path / "abs"), "--map_mode", "abs"])
    assert "map mode 'signed'" in (tmp_path / "signed" / "ablation.md").read_text()  # the BraTS task's default
    assert "map mode 'abs'" in (tmp_path / "abs" / "ablation.md").read_text()
    assert len(signed) == len(absolute) == 1
    with pytest.raises(SystemExit):
        main([*common, "--map_mode", "square"])


def test_ablation_chooses_by_image_level_labels_and_refuses_pixel_masks_outside_test(tmp_path):
    import csv as csv_module
    from pathlib import Path

    from monai_wsss.benchmark.ablation import main

    bundle = Path(__file__).resolve().parents[1] / "bundles" / "brats_cdm"
    data = tmp_path / "data"
    make_synthetic_dataset(data, num_cases=5, shape=(64, 64, 12), seed=1)
    labels = tmp_path / "labels.csv"
    from monai_wsss.data.labels import main as write_labels

    write_labels(["--dataset_dir", str(data), "--task", "brats", "--out", str(labels)])
    with labels.open() as f:
        rows = list(csv_module.DictReader(f))
    flipped = tmp_path / "flipped.csv"
    with flipped.open("w", newline="") as f:  # the same slices with every label inverted
        writer = csv_module.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "label": str(1 - int(r["label"]))} for r in rows)
    common = ["--bundle_root", str(bundle), "--dataset_dir", str(data), "--split", "validation", "--joint",
              "--params", "noise_level", "tau", "--grid", '{"noise_level": [4, 8], "tau": [0.8]}', "--max_slices", "0",
              "--repeats", "1", "--num_steps", "2", "--device", "cpu", "--precision", "float32"]
    by_file = main([*common, "--labels", str(labels), "--out_dir", str(tmp_path / "file")])
    by_flipped = main([*common, "--labels", str(flipped), "--out_dir", str(tmp_path / "flipped")])
    assert [(r["parameter"], r["noise_level"]) for r in by_file] == [("joint", 4), ("joint", 8)]
    for r, f in zip(by_file, by_flipped):  # the score reads the labels file: inverted labels, 1 - AUROC
        assert 0.0 <= r["slice_auroc"] <= 1.0
        assert f["slice_auroc"] == pytest.approx(1.0 - r["slice_auroc"], abs=1e-9)
    md = (tmp_path / "file" / "ablation.md").read_text()
    assert "scored by slice AUROC" in md and str(labels) in md
    best = max(by_file, key=lambda r: r["slice_auroc"])
    assert md.index(f"| {best['noise_level']} | {best['slice_auroc']:.3f}") < md.index("| 4 |" if best["noise_level"] == 8 else "| 8 |")
    with pytest.raises(ValueError, match="only score the test split"):
        main([*common, "--criterion", "pixel_dice", "--out_dir", str(tmp_path / "pixels")])


def test_ablation_scores_extent_against_pseudo_masks_made_from_labels(tmp_path):
    import shutil
    from pathlib import Path

    import nibabel as nib
    import numpy as np

    from monai_wsss.benchmark.ablation import load_pseudo_mask_slices, main
    from monai_wsss.benchmark.table import load_eval_slices
    from monai_wsss.bundle import prepare_splits
    from monai_wsss.data.labels import main as write_labels

    bundle = Path(__file__).resolve().parents[1] / "bundles" / "brats_cdm"
    data = tmp_path / "data"
    items = make_synthetic_dataset(data, num_cases=5, shape=(64, 64, 12), seed=1)
    labels = tmp_path / "labels.csv"
    write_labels(["--dataset_dir", str(data), "--task", "brats", "--out", str(labels), "--quiet"])
    pseudo = tmp_path / "pseudo"
    pseudo.mkdir()
    for item in items:  # pseudo-masks equal to the masks stand in for a run's; one positive slice made empty below
        shutil.copy(item["seg"], pseudo / f"{item['case']}_pseudo.nii.gz")
    images, masks, info = load_pseudo_mask_slices(data, "brats", labels, pseudo, split="validation", max_slices=0,
                                                  spatial_size=(32, 32))
    assert info["criterion"] == "pseudo_dice" and images.shape == masks.shape and images.shape[1:] == (1, 32, 32)
    assert (masks.flatten(1).sum(1) > 0).all()
    # slices with target, each with its own mask (pseudo-masks = masks here); unlabelled ones (under 0.2 %) left out
    val_images, val_segs, _ = load_eval_slices(data, "brats", split="validation", max_slices=0, spatial_size=(32, 32))
    pairs = {(a.numpy().tobytes(), m.numpy().tobytes()) for a, m in zip(val_images, val_segs)}
    assert 0 < images.shape[0] <= val_images.shape[0]
    assert all((a.numpy().tobytes(), m.numpy().tobytes()) in pairs for a, m in zip(images, masks))
    # a slice labelled 1 whose pseudo-mask is empty has no extent to score: it is left out
    case = prepare_splits(data, "brats", 0.1, 0.2, 0)["validation"][0]["case"]
    path = pseudo / f"{case}_pseudo.nii.gz"
    img = nib.load(path)
    arr = np.asarray(img.dataobj).copy()
    z = int(np.argmax((arr > 0).reshape(-1, arr.shape[2]).sum(0)))  # the largest target: surely labelled 1
    arr[..., z] = 0
    nib.save(nib.Nifti1Image(arr, img.affine), path)
    fewer, _, _ = load_pseudo_mask_slices(data, "brats", labels, pseudo, max_slices=0, spatial_size=(32, 32))
    assert fewer.shape[0] == images.shape[0] - 1
    common = ["--bundle_root", str(bundle), "--dataset_dir", str(data), "--split", "validation", "--joint",
              "--params", "noise_level", "--grid", '{"noise_level": [4, 8]}', "--max_slices", "0", "--repeats", "1",
              "--num_steps", "2", "--device", "cpu", "--precision", "float32", "--size", "32", "--labels", str(labels),
              "--criterion", "pseudo_dice"]
    rows = main([*common, "--pseudo_dir", str(pseudo), "--out_dir", str(tmp_path / "out")])
    assert [r["noise_level"] for r in rows] == [4, 8] and all(0.0 <= r["dice"] <= 1.0 for r in rows)
    md = (tmp_path / "out" / "ablation.md").read_text()
    assert "scored by Dice against their pseudo-masks" in md and str(pseudo) in md
    with pytest.raises(ValueError, match="needs --labels"):
        main([*common, "--out_dir", str(tmp_path / "none")])
    path.unlink()
    with pytest.raises(ValueError, match=f"{case}_pseudo.nii.gz"):
        main([*common, "--pseudo_dir", str(pseudo), "--out_dir", str(tmp_path / "missing")])


def test_joint_settings_are_every_combination_with_R_at_most_Q():
    from monai_wsss.benchmark.ablation import joint_settings

    base = {"noise_level": 10, "num_steps": 5, "tau": 0.95, "guidance_scale": 0.0, "ensemble": 1}
    settings = joint_settings(base, {"noise_level": [2, 10, 20], "tau": [0.8, 0.95]})
    assert [(s["noise_level"], s["tau"]) for _, s in settings] == [(10, 0.8), (10, 0.95), (20, 0.8), (20, 0.95)]
    assert all(p == "joint" and s["num_steps"] == 5 for p, s in settings)


def test_keep_small_targets_brings_back_what_the_5_percent_rule_drops(tmp_path):
    import nibabel as nib
    import numpy as np

    # the synthetic lesions as CHAOS kidneys (label 2): all cover less than 5 % of a slice, as on CHAOS validation
    for i, item in enumerate(make_synthetic_dataset(tmp_path / "brats", num_cases=6, shape=(64, 64, 24), seed=0)):
        seg = nib.load(item["seg"])
        nib.save(nib.load(item["image"]), tmp_path / f"image_{i + 1}.nii.gz")
        kidney = (np.asarray(seg.dataobj) > 0).astype(np.uint8) * 2
        nib.save(nib.Nifti1Image(kidney, seg.affine), tmp_path / f"label_{i + 1}.nii.gz")
    kwargs = dict(split="validation", max_slices=None, spatial_size=(32, 32), val_fraction=0.3, test_fraction=0.3)
    with pytest.raises(ValueError, match="no slice with target"):
        load_eval_slices(tmp_path, "chaos", **kwargs)
    _, segs, info = load_eval_slices(tmp_path, "chaos", keep_small_targets=True, **kwargs)
    fractions = segs.flatten(1).mean(1)
    assert info["eval_min_fraction"] is None and info["slices_used"] == segs.shape[0] > 0
    assert (fractions > 0).all() and (fractions < 0.05).all()


def test_speed_benchmark_takes_the_bundles_settings_unless_overridden():
    import argparse
    from pathlib import Path

    from monai_wsss.benchmark.speed import SPEED_SETTINGS, resolve_speed_settings
    from monai_wsss.benchmark.table import bundle_method_settings

    bundle = Path(__file__).resolve().parents[1] / "bundles" / "brats_cdm"
    unset = {option: None for option in SPEED_SETTINGS}
    args = resolve_speed_settings(argparse.Namespace(bundle_root=str(bundle), **{**unset, "cgdiff_guidance": 7.0}))
    settings = bundle_method_settings(bundle)
    assert (args.cdm_steps, args.cg_cdm_steps) == (settings["num_steps"], settings["guided_num_steps"])
    assert (args.cdm_noise_level, args.cdm_guidance) == (settings["noise_level"], settings["guidance_scale"])
    assert args.cgdiff_guidance == 7.0  # the command line wins
    plain = resolve_speed_settings(argparse.Namespace(bundle_root=None, **unset))
    assert (plain.cdm_steps, plain.cg_cdm_steps, plain.cgdiff_level) == (10, None, 400)


def test_table_rows_name_each_cdm_variants_own_steps(scheduler):
    specs = build_methods(["cdm", "cg_cdm"], scheduler, tiny_classifier(input_shape=(32, 32)), tiny_unet(),
                          noise_level=30, num_steps=3, guidance_scale=5.0, guided_num_steps=6)
    assert [s.setting for s in specs] == ["Q=30, R=3, tau=0.95", "Q=30, R=6, tau=0.95, s=5.0"]
    assert [s.inferer.num_steps for s in specs] == [3, 6]


def test_speed_benchmark_takes_one_source_of_networks(tmp_path):
    from monai_wsss.benchmark.speed import run_speed_benchmark

    with pytest.raises(ValueError, match="either bundle_root"):
        run_speed_benchmark(bundle_root=str(tmp_path), weights=str(tmp_path / "model.pt"))


def test_bundle_networks_are_loaded_by_the_apps_weight_loader(tmp_path):
    import shutil
    from pathlib import Path

    from monai_wsss.benchmark.table import load_bundle_networks

    bundle = tmp_path / "bundle"
    shutil.copytree(Path(__file__).resolve().parents[1] / "bundles" / "brats_cdm" / "configs", bundle / "configs")
    (bundle / "models").mkdir()
    (bundle / "models" / "diffusion.pt").write_bytes(b"not a checkpoint")
    # the same refusal as inference's load_weights: the file and what it should hold are named
    with pytest.raises(ValueError, match="cannot read diffusion model checkpoint .*diffusion.pt"):
        load_bundle_networks(bundle, torch.device("cpu"))
