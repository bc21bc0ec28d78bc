"""Inference / evaluation side of the bundles: inference.json and evaluate.json end to end on synthetic data with
tiny saved weights (outputs in the input space, reports), every input layout, and clear errors for bad inputs."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from conftest import BUNDLES, REPO, TINY_UNET, bundle_conditioning, perturb, tiny_unet
from forked_cli import run_module, run_ranks
from monai_wsss.data import make_synthetic_dataset
from monai_wsss.networks.nets import ConditionalDiffusionUNet, NoisyClassifier

SIZE = 16
# the bundles' diffusion and classifier definitions shrunk to the tiny test networks (the same overrides a user
# passes on the CLI)
TINY_NETS = {
    "diffusion_def#channels": list(TINY_UNET["channels"]),
    "diffusion_def#attention_levels": list(TINY_UNET["attention_levels"]),
    "diffusion_def#num_head_channels": TINY_UNET["num_head_channels"],
    "diffusion_def#norm_num_groups": TINY_UNET["norm_num_groups"],
}
TINY_CLASSIFIER = {
    "classifier_def#channels": [8, 16],
    "classifier_def#attention_levels": [False, False],
    "classifier_def#num_head_channels": 8,
    "classifier_def#norm_num_groups": 4,
}
# seconds-long settings: 16 x 16 slices, 2 CDM steps, 3 CG-Diff steps
FAST = {"spatial_size": [SIZE, SIZE], "noise_level": 20, "num_steps": 2, "progress": False}
FAST_METHOD = {"cg_diff": {"noise_level": 3}, "cfg": {"noise_level": 3}}


def _tiny_diffusion(null_class: bool = False, task: str = "brats") -> ConditionalDiffusionUNet:
    return tiny_unet(null_class=null_class, conditioning=bundle_conditioning(task))


def _tiny_classifier() -> NoisyClassifier:
    torch.manual_seed(1)
    clf = NoisyClassifier(
        spatial_dims=2, in_channels=1, num_classes=2, input_shape=(SIZE, SIZE), channels=(8, 16),
        attention_levels=(False, False), num_res_blocks=1, num_head_channels=8, norm_num_groups=4,
    )
    return perturb(clf, seed=1)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Synthetic BraTS-layout cases, the same volumes in the CHAOS layout, and tiny weights (with and without a
    null class; each bundle's conditioning) saved as the bundles' training writes them (bare state dicts)."""
    root = tmp_path_factory.mktemp("infer")
    items = make_synthetic_dataset(root / "brats", num_cases=3, shape=(40, 36, 12), seed=0)
    chaos = root / "chaos"
    chaos.mkdir()
    for i, item in enumerate(items):
        shutil.copy(item["image"], chaos / f"image_{i + 1}.nii.gz")
        seg = nib.load(item["seg"])
        kidney = (np.asarray(seg.dataobj) > 0).astype(np.uint8) * 2  # CHAOS right kidney label
        nib.save(nib.Nifti1Image(kidney, seg.affine), str(chaos / f"label_{i + 1}.nii.gz"))
    models = root / "models"
    models.mkdir()
    torch.save(_tiny_diffusion().state_dict(), models / "diffusion.pt")
    torch.save(_tiny_diffusion(null_class=True).state_dict(), models / "diffusion_null.pt")
    torch.save(_tiny_diffusion(null_class=True, task="chaos").state_dict(), models / "chaos_diffusion_null.pt")
    torch.save(_tiny_classifier().state_dict(), models / "classifier.pt")
    return {"root": root, "items": items, "brats": root / "brats", "chaos": chaos, "models": models}


def bundle_overrides(env, method: str, bundle: str = "brats", **overrides) -> dict:
    """The tiny weights and fast settings of a method (only the keys its configs have); the CHAOS bundle's diffusion
    network has a null class, so the tiny weights with one stand in for it."""
    from monai_wsss.bundle import DEFAULT_METHOD

    args: dict = {"progress": False}
    if method != DEFAULT_METHOD and method not in ("threshold", "volume_threshold"):
        weights = env["models"] / ("chaos_diffusion_null.pt" if bundle == "chaos" else "diffusion.pt")
        args.update({"diffusion_path": str(weights), **TINY_NETS, **FAST, **FAST_METHOD.get(method, {})})
        if method in ("cg_cdm", "cg_diff"):
            args.update(classifier_path=str(env["models"] / "classifier.pt"), **TINY_CLASSIFIER)
    elif method == "threshold":
        args["spatial_size"] = [SIZE, SIZE]
    args.update(overrides)
    return args


def run_bundle(env, config: str, bundle: str = "brats", method: str = "segmenter", **overrides) -> dict:
    """
    Run a method as `python -m monai.bundle run --config_file "[inference.json, inference_<method>.json
    (, evaluate.json)]"` does, with the tiny networks and fast settings; returns what the run left in the
    evaluator's state (rows of predictions.csv, the summary, the threshold).
    """
    from monai_wsss.bundle import method_config_files

    files = method_config_files(BUNDLES[bundle], method, evaluate=config == "evaluate.json")
    workflow = ConfigWorkflow(
        config_file=files, logging_file=False, workflow_type="infer", **bundle_overrides(env, method, bundle, **overrides)
    )
    workflow.initialize()
    workflow.run()
    state = workflow.evaluator.state
    workflow.finalize()
    threshold = getattr(state, "dataset_threshold", None)
    return {
        "rows": state.predictions,
        "summary": getattr(state, "summary", None),
        "metrics": dict(state.metrics),
        "threshold": workflow.parser.get_parsed_content("mask_threshold") if threshold is None else threshold,
    }


def root_cause(err: BaseException) -> BaseException:
    """MONAI wraps errors of config expressions in RuntimeError('Failed to evaluate ...'): the user's error is the cause."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def assert_input_space(image_path: str, *outputs: str) -> None:
    ref = nib.load(image_path)
    for path in outputs:
        out = nib.load(path)
        assert out.shape == ref.shape[:3], path
        np.testing.assert_allclose(out.affine, ref.affine, atol=1e-5)


def read_csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


# ---- configuration consistency -------------------------------------------------------------------------------
def _raw(bundle: str, name: str) -> dict:
    return json.loads((BUNDLES[bundle] / "configs" / name).read_text())


@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_networks_match_the_training_configs(bundle):
    """The inference configs must build exactly the trained networks, or the committed weights do not load."""
    infer = ConfigParser(_raw(bundle, "inference.json"))
    segmentation = ConfigParser(_raw(bundle, "train.json"))
    assert infer.get("network_def") == segmentation.get("network_def")  # the default network: the segmenter
    assert infer.get("roi_size") == segmentation.get("segmenter_spatial_size")
    diffusion = ConfigParser(_raw(bundle, "train_diffusion.json"))
    classifier = ConfigParser(_raw(bundle, "train_classifier.json"))
    for method in ("cdm", "cg_cdm", "cg_diff", "cfg"):
        override = ConfigParser(_raw(bundle, f"inference_{method}.json"))
        assert override.get("diffusion_def") == diffusion.get("network_def"), method
        assert override.get("scheduler") == diffusion.get("scheduler") == classifier.get("scheduler"), method
        for key in ("num_classes", "null_class", "spatial_size"):
            assert override.get(key) == diffusion.get(key), (method, key)
        if method in ("cg_cdm", "cg_diff"):
            assert override.get("classifier_def") == classifier.get("network_def"), method
    stacked = ConfigParser()
    stacked.read_config([str(BUNDLES[bundle] / "configs" / n) for n in ("inference.json", "inference_cdm.json")])
    net = stacked.get_parsed_content("diffusion_def")
    ref = diffusion.get_parsed_content("network_def")
    assert net.state_dict().keys() == ref.state_dict().keys()


def test_evaluate_is_a_small_override_and_the_bundles_differ_in_task_facts_only():
    for bundle in BUNDLES:
        evaluate = _raw(bundle, "evaluate.json")
        assert set(evaluate) == {"evaluate", "output_dir", "num_overlays", "report_handler", "eval_handlers",
                                 "key_metric", "evaluator#key_val_metric", "mask_metrics"}
    brats, chaos = _raw("brats", "inference.json"), _raw("chaos", "inference.json")
    # the tuned values come from the task registry (monai_wsss.data.TASKS), not from the configs; roi_size is a fact
    # of each bundle's weights (the size they were trained at: BraTS 128 x 128 since 0.9.0, CHAOS 96 x 96)
    assert {k for k in brats if brats[k] != chaos.get(k)} == {"bundle_root", "task", "modality", "roi_size"}
    assert (brats["roi_size"], chaos["roi_size"]) == ([128, 128], [96, 96])
    # the CHAOS weights were trained with a null class (classifier-free guidance, method cfg), the BraTS ones not;
    # BraTS maps are normalised per volume with one average Otsu threshold (chosen on validation), CHAOS per slice;
    # bfloat16 inference was validated on BraTS only, so CHAOS stays float32
    brats_cdm, chaos_cdm = _raw("brats", "inference_cdm.json"), _raw("chaos", "inference_cdm.json")
    assert (brats_cdm["null_class"], chaos_cdm["null_class"]) == (False, True)
    assert (brats_cdm["precision"], chaos_cdm["precision"]) == ("auto", "float32")
    parsed = {}
    for bundle in BUNDLES:
        parser = ConfigParser()
        parser.read_config([str(BUNDLES[bundle] / "configs" / n) for n in ("inference.json", "inference_cdm.json")])
        parsed[bundle] = parser.get_parsed_content("mask_threshold")
    assert (parsed["brats"], parsed["chaos"]) == ("average_otsu", "otsu")


@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_every_method_passes_monai_property_checks(bundle, env):
    """What MONAI's own tools (model-zoo CI, MONAI Label) check: the infer workflow's required properties."""
    from monai_wsss.bundle import bundle_methods, method_config_files

    for method in bundle_methods(BUNDLES[bundle]):
        for evaluate in (False, True):
            workflow = ConfigWorkflow(
                config_file=method_config_files(BUNDLES[bundle], method, evaluate), logging_file=False,
                workflow_type="infer", dataset_dir=str(env["brats"] if bundle == "brats" else env["chaos"]),
                output_dir=str(env["root"] / "unused"), **bundle_overrides(env, method, bundle),
            )
            workflow.initialize()
            assert workflow.check_properties() == [], (method, evaluate)
            assert workflow.parser.get("dataset#transform") == "@preprocessing"
            assert workflow.parser.get("evaluator#postprocessing") == "@postprocessing"


def test_default_bundle_root_is_the_bundle_wherever_the_command_runs(tmp_path, monkeypatch):
    from monai_wsss.apps import locate_bundle_root

    monkeypatch.chdir(tmp_path)  # not a bundle: falls back to the repository copy
    assert Path(locate_bundle_root("brats_cdm", argv=["x"])).resolve() == BUNDLES["brats"]
    argv = ["run", "--config_file", "bundles/chaos_kidney_cdm/configs/inference.json"]
    monkeypatch.chdir(REPO)
    assert Path(locate_bundle_root("brats_cdm", argv=argv)).resolve() == BUNDLES["chaos"]
    listed = ["run", "--config_file=['bundles/brats_cdm/configs/inference.json','extra.json']"]
    assert Path(locate_bundle_root("chaos_kidney_cdm", argv=listed)).resolve() == BUNDLES["brats"]
    monkeypatch.chdir(BUNDLES["chaos"])  # inside a bundle (model-zoo convention)
    assert locate_bundle_root("brats_cdm", argv=["x"]) == "."


def test_installed_package_outside_a_bundle_asks_for_bundle_root(tmp_path, monkeypatch):
    import monai_wsss.apps.inputs as inputs

    # a wheel install: no repository next to the package, so no bundles/ to fall back to
    monkeypatch.setattr(inputs, "_source_checkout", lambda: None)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="'brats_cdm'.*pass --bundle_root"):
        inputs.locate_bundle_root("brats_cdm", argv=["x"])
    (tmp_path / "configs").mkdir()  # run from inside the bundle: found without the repository
    assert inputs.locate_bundle_root("brats_cdm", argv=["x"]) == "."


# ---- end to end ----------------------------------------------------------------------------------------------
def test_inference_on_a_folder_writes_map_and_mask_in_input_space(env, tmp_path):
    out = tmp_path / "infer"
    result = run_bundle(env, "inference.json", dataset_dir=str(env["brats"]), output_dir=str(out), method="cdm")
    assert result["summary"] is None  # inference does not score
    assert len(result["rows"]) == len(env["items"])
    rows = read_csv(out / "predictions.csv")
    assert [r["case"] for r in rows] == [it["case"] for it in env["items"]]
    for item, row in zip(env["items"], rows):
        assert_input_space(item["image"], row["map"], row["mask"])
        mask = np.asarray(nib.load(row["mask"]).dataobj)
        assert set(np.unique(mask)) <= {0, 1} and mask.sum() == int(row["mask_voxels"]) > 0
        image = np.asarray(nib.load(item["image"]).dataobj)
        assert not mask[image == 0].any()  # never outside the brain
        heat = np.asarray(nib.load(row["map"]).dataobj)
        assert heat.min() >= 0 and heat.max() <= 1 and heat.max() > 0
    assert not (out / "metrics.csv").exists() and not (out / "overlays").exists()


def test_inference_is_reproducible_with_its_seed(env, tmp_path):
    # a diffusion method: its maps depend on the noise seed (the default segmenter has no noise)
    run = {"image": env["items"][0]["image"], "method": "cg_cdm"}
    a = run_bundle(env, "inference.json", output_dir=str(tmp_path / "a"), **run)
    b = run_bundle(env, "inference.json", output_dir=str(tmp_path / "b"), **run)
    c = run_bundle(env, "inference.json", output_dir=str(tmp_path / "c"), seed=5, **run)
    maps = [np.asarray(nib.load(r["rows"][0]["map"]).dataobj) for r in (a, b, c)]
    assert maps[0].any()
    np.testing.assert_array_equal(maps[0], maps[1])
    assert not np.array_equal(maps[0], maps[2])


def test_mirrored_test_time_augmentation_from_the_command_line_is_left_right_on_the_scan(env, tmp_path):
    """``--inferer#inferer#flip_axes "[0]"`` averages the segmenter over the scan and its left-right mirror: the map
    of the mirrored scan is then the mirror of the scan's map (the plain network's is not)."""
    item = env["items"][0]
    scan = nib.load(item["image"])
    mirrored = tmp_path / "mirrored.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(scan.dataobj)[::-1].copy(), scan.affine, scan.header), str(mirrored))

    def segmenter_map(image, name, **overrides):
        result = run_bundle(env, "inference.json", image=str(image), output_dir=str(tmp_path / name), **overrides)
        return np.asarray(nib.load(result["rows"][0]["map"]).dataobj)

    tta = {"inferer#inferer#flip_axes": [0]}
    plain, plain_mirrored = segmenter_map(item["image"], "plain"), segmenter_map(mirrored, "plain_mirrored")
    averaged, averaged_mirrored = segmenter_map(item["image"], "tta", **tta), segmenter_map(mirrored, "tta_mirrored", **tta)
    assert not np.allclose(plain_mirrored, plain[::-1], atol=1e-3)
    np.testing.assert_allclose(averaged_mirrored, averaged[::-1], atol=1e-4)
    assert not np.allclose(averaged, plain, atol=1e-3)


@pytest.mark.parametrize("source", ["image", "dataset_dir_file"])
def test_single_nifti_file(env, tmp_path, source):
    item = env["items"][1]
    key = "image" if source == "image" else "dataset_dir"
    result = run_bundle(env, "evaluate.json", output_dir=str(tmp_path), seg=item["seg"], **{key: item["image"]})
    row = result["rows"][0]
    assert_input_space(item["image"], row["map"], row["mask"])
    assert result["summary"]["num_cases"] == 1 and (tmp_path / "overlays" / f"{row['case']}.png").is_file()


@pytest.mark.parametrize("method", ["cg_cdm", "cg_diff"])
def test_evaluate_writes_csv_markdown_summary_and_overlays(env, tmp_path, method):
    out = tmp_path / method
    result = run_bundle(env, "evaluate.json", dataset_dir=str(env["brats"]), output_dir=str(out), method=method, num_overlays=2)
    summary = result["summary"]
    assert summary["num_cases"] == 3 and summary["num_positive_slices"] > 0
    for key in ("slice_dice", "slice_iou", "volume_dice", "pixel_auroc", "slice_auroc"):
        assert 0.0 <= summary[key] <= 1.0, key
    rows = read_csv(out / "metrics.csv")
    assert len(rows) == 3 and {"slice_dice", "slice_hd95", "slice_hd95_mm", "volume_dice", "pixel_auroc"} <= set(rows[0])
    # the lesion-free case (every 4th synthetic case has lesions here, so check via the ground truth)
    scored = [r for r in rows if int(r["num_positive_slices"]) > 0]
    assert scored and all(0.0 <= float(r["slice_dice"]) <= 1.0 for r in scored)
    assert json.loads((out / "summary.json").read_text())["num_cases"] == 3
    # the evaluator's key metric (MONAI's MeanDice on the masks in model orientation) is the report's volume Dice
    # (scored on the masks written back in each scan's space), over the scans with a target
    volume_dice = [float(r["volume_dice"]) for r in rows if int(r["num_positive_slices"]) > 0]
    assert result["metrics"]["val_mean_dice"] == pytest.approx(sum(volume_dice) / len(volume_dice), abs=1e-4)
    text = (out / "summary.md").read_text()
    assert f"| {method} |" in text and "## Per case" in text
    pngs = sorted(p.name for p in (out / "overlays").glob("*.png"))
    assert pngs == sorted(f"{it['case']}.png" for it in env["items"][:2])
    for item, row in zip(env["items"], result["rows"]):
        assert_input_space(item["image"], row["map"], row["mask"])


def test_average_otsu_uses_one_threshold_for_all_volumes(env, tmp_path):
    result = run_bundle(env, "evaluate.json", dataset_dir=str(env["brats"]), output_dir=str(tmp_path), threshold="average_otsu", num_overlays=0, method="cg_cdm")
    assert isinstance(result["threshold"], float) and 0.0 < result["threshold"] < 1.0
    for row in result["rows"]:
        heat = np.asarray(nib.load(row["map"]).dataobj)
        mask = np.asarray(nib.load(row["mask"]).dataobj)
        np.testing.assert_array_equal(mask, (heat > result["threshold"]).astype(mask.dtype))


def test_a_fixed_threshold_is_honoured_by_the_map_methods(env, tmp_path):
    result = run_bundle(env, "inference.json", dataset_dir=str(env["brats"]), output_dir=str(tmp_path), threshold=0.4, method="cdm")
    assert result["threshold"] == 0.4
    for item, row in zip(env["items"], result["rows"]):
        heat = np.asarray(nib.load(row["map"]).dataobj)
        body = np.asarray(nib.load(item["image"]).dataobj) != 0
        mask = np.asarray(nib.load(row["mask"]).dataobj)
        np.testing.assert_array_equal(mask, ((heat > 0.4) & body).astype(mask.dtype))
    with pytest.raises(RuntimeError) as err:  # a normalised map lies in [0, 1]
        run_bundle(env, "inference.json", dataset_dir=str(env["brats"]), output_dir=str(tmp_path / "x"), threshold=1.5, method="cdm")
    assert "threshold" in str(root_cause(err.value))


def test_classifier_free_guidance_needs_a_null_class(env, tmp_path):
    with pytest.raises(RuntimeError) as err:
        run_bundle(env, "inference.json", dataset_dir=str(env["brats"]), output_dir=str(tmp_path), method="cfg")
    assert isinstance(root_cause(err.value), ValueError) and "null class" in str(root_cause(err.value))
    # the network asks for a null class but the weights have none: the loader says so
    with pytest.raises(RuntimeError) as err:
        run_bundle(env, "inference.json", dataset_dir=str(env["brats"]), output_dir=str(tmp_path), method="cfg", null_class=True)
    assert "null class" in str(root_cause(err.value)) and "diffusion.pt" in str(root_cause(err.value))
    result = run_bundle(
        env, "inference.json", dataset_dir=str(env["brats"]), output_dir=str(tmp_path / "cfg"), method="cfg",
        null_class=True, diffusion_path=str(env["models"] / "diffusion_null.pt"),
    )
    assert_input_space(env["items"][0]["image"], result["rows"][0]["mask"])


def test_chaos_bundle_on_a_chaos_folder(env, tmp_path):
    # the CHAOS bundle's weights have a null class: the tiny test weights with one stand in for them, and cfg runs
    result = run_bundle(
        env, "evaluate.json", bundle="chaos", dataset_dir=str(env["chaos"]), output_dir=str(tmp_path), num_overlays=1,
        method="cfg",
    )
    assert [r["case"] for r in result["rows"]] == ["1", "2", "3"]
    assert result["summary"]["num_cases"] == 3
    for i, row in enumerate(result["rows"]):
        assert_input_space(str(env["chaos"] / f"image_{i + 1}.nii.gz"), row["map"], row["mask"])
        assert Path(row["map"]).name == f"image_{i + 1}_map.nii.gz"


def test_decathlon_layout_four_channel_images(env, tmp_path):
    """Decathlon Task01: 4D images (FLAIR first); outputs take the image's spatial shape and affine."""
    root = tmp_path / "Task01_BrainTumour"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    item = env["items"][0]
    img, seg = nib.load(item["image"]), nib.load(item["seg"])
    flair = np.asarray(img.dataobj)
    stacked = np.stack([flair, flair // 2, flair // 3, flair // 4], axis=-1)
    nib.save(nib.Nifti1Image(stacked, img.affine), str(root / "imagesTr" / "BRATS_001.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(seg.dataobj), seg.affine), str(root / "labelsTr" / "BRATS_001.nii.gz"))
    meta = {"training": [{"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}]}
    (root / "dataset.json").write_text(json.dumps(meta))
    result = run_bundle(env, "evaluate.json", dataset_dir=str(root), output_dir=str(tmp_path / "out"), num_overlays=0)
    assert_input_space(item["image"], result["rows"][0]["map"], result["rows"][0]["mask"])
    assert result["summary"]["num_positive_slices"] > 0


def test_datalist_split_of_a_training_run(env, tmp_path):
    from monai_wsss.data import split_cases, write_datalist

    datalist = write_datalist(tmp_path / "datalist.json", split_cases(env["items"], 0.0, 0.34, seed=0))
    result = run_bundle(env, "inference.json", dataset_dir=str(datalist), output_dir=str(tmp_path / "out"))
    test_cases = [it["case"] for it in json.loads(datalist.read_text())["test"]]
    assert [r["case"] for r in result["rows"]] == test_cases
    with pytest.raises(RuntimeError) as err:
        run_bundle(env, "inference.json", dataset_dir=str(datalist), datalist_split="holdout", output_dir=str(tmp_path))
    assert "holdout" in str(root_cause(err.value))


# ---- bad inputs ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, error, words",
    [
        ({}, ValueError, "--dataset_dir"),
        ({"dataset_dir": "/nonexistent/brats"}, FileNotFoundError, "/nonexistent/brats"),
        ({"image": "/nonexistent/case.nii.gz"}, FileNotFoundError, "/nonexistent/case.nii.gz"),
        ({"diffusion_path": "/nonexistent/diffusion.pt", "method": "cdm"}, FileNotFoundError, "/nonexistent/diffusion.pt"),
        ({"method": "cg_cdm", "classifier_path": "/nonexistent/clf.pt"}, FileNotFoundError, "/nonexistent/clf.pt"),
        ({"threshold": "median"}, ValueError, "threshold"),
        ({"threshold": 1.5}, ValueError, "threshold"),
        ({"diffusion_def#channels": [8, 32], "method": "cdm"}, ValueError, "does not fit"),
        ({"model_path": "/nonexistent/model.pt"}, FileNotFoundError, "/nonexistent/model.pt"),
        ({"network_def#channels": [8, 16, 32, 64]}, ValueError, "does not fit"),
    ],
)
def test_bad_inputs_give_clear_errors(env, tmp_path, overrides, error, words):
    args = dict(overrides)
    if overrides and not {"image", "dataset_dir"} & set(overrides):
        args["dataset_dir"] = str(env["brats"])
    with pytest.raises(RuntimeError) as err:
        run_bundle(env, "inference.json", output_dir=str(tmp_path), **args)
    cause = root_cause(err.value)
    assert isinstance(cause, error) and words in str(cause), repr(cause)


def test_unknown_method_names_the_bundles_methods():
    from monai_wsss.bundle import method_config_files

    with pytest.raises(ValueError, match="unknown method 'gradcam'.*cg_cdm"):
        method_config_files(BUNDLES["brats"], "gradcam")


def test_evaluate_needs_ground_truth(env, tmp_path):
    item = env["items"][0]
    with pytest.raises(RuntimeError) as err:
        run_bundle(env, "evaluate.json", image=item["image"], output_dir=str(tmp_path))
    assert "ground-truth" in str(root_cause(err.value))


def test_command_line(env, tmp_path):
    """The documented command (``python -m monai.bundle run``, forked: tests/forked_cli.py), with list overrides the
    way a shell passes them."""
    cmd = [
        "run",
        "--config_file", str([str(BUNDLES["brats"] / "configs" / f) for f in ("inference.json", "inference_cdm.json")]),
        "--dataset_dir", str(env["brats"]), "--output_dir", str(tmp_path),
        "--diffusion_path", str(env["models"] / "diffusion.pt"),
    ]
    for key, value in {**TINY_NETS, **FAST}.items():
        cmd += [f"--{key}", repr(value)]  # Python literals, as fire parses them
    proc = run_module("monai.bundle", cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_csv(tmp_path / "predictions.csv")
    assert len(rows) == 3
    assert_input_space(env["items"][2]["image"], rows[2]["map"], rows[2]["mask"])


def test_preprocessing_inferer_postprocessing_make_the_workflows_mask_as_monai_label_runs_them(env, tmp_path):
    """MONAI Label's bundle task runs the config's `preprocessing`, `inferer` and `postprocessing` itself (no
    evaluator, no run folder): by hand they must turn a scan into the mask the workflow writes, in the scan's space."""
    from monai_wsss.bundle import method_config_files

    item = env["items"][0]
    workflow = ConfigWorkflow(
        config_file=method_config_files(BUNDLES["brats"]), logging_file=False, workflow_type="infer",
        image=item["image"], output_dir=str(tmp_path / "by_hand"), progress=False, min_component_size=5,
    )
    workflow.initialize()
    pre, inferer, post, net = (workflow.parser.get_parsed_content(k) for k in ("preprocessing", "inferer", "postprocessing", "network"))
    data = pre({"image": item["image"], "output_name": "by_hand"})
    with torch.no_grad():
        data["pred"] = inferer(data["image"][None], net)[0]
    out = post(data)
    assert float(out["pred"].max()) > 0  # the committed segmenter gives a real probability map
    result = run_bundle(env, "inference.json", image=item["image"], output_dir=str(tmp_path / "workflow"), min_component_size=5)
    assert_input_space(item["image"], out["mask_path"], out["pred_path"])
    np.testing.assert_array_equal(
        np.asarray(nib.load(out["mask_path"]).dataobj), np.asarray(nib.load(result["rows"][0]["mask"]).dataobj)
    )


def test_each_scan_is_compared_with_the_intensity_profile_beside_the_model(env, tmp_path, caplog):
    from monai_wsss.apps import intensity_profile_beside

    # the bundle's own weights come with the profile of their training scans
    assert intensity_profile_beside(BUNDLES["brats"] / "models" / "model.pt") == str(
        BUNDLES["brats"] / "models" / "intensity_profile.json")
    with caplog.at_level("WARNING", logger="monai_wsss.apps.inputs"):
        assert intensity_profile_beside(tmp_path / "model.pt") is None
    assert "no intensity_profile.json beside" in caplog.text
    # a profile no synthetic scan falls in: every scan is named in a warning, and the run still segments them all
    profile = tmp_path / "narrow_profile.json"
    profile.write_text(json.dumps({"low": 0.99, "high": 1.0, "num_scans": 1}))
    caplog.clear()
    with caplog.at_level("WARNING", logger="monai_wsss.transforms.validation"):
        result = run_bundle(env, "inference.json", method="threshold", dataset_dir=str(env["brats"]),
                            output_dir=str(tmp_path / "out"), intensity_profile=str(profile))
    assert len(result["rows"]) == len(env["items"])
    for item in env["items"]:
        assert f"{Path(item['image']).name}: 90th percentile of the normalised body intensity" in caplog.text


def test_the_key_metric_scores_this_runs_scans_and_is_nan_when_a_rerun_has_none_left(env, tmp_path, caplog):
    first = run_bundle(env, "evaluate.json", dataset_dir=str(env["brats"]), output_dir=str(tmp_path), num_overlays=0)
    assert 0.0 <= first["metrics"]["val_mean_dice"] <= 1.0
    with caplog.at_level("WARNING", logger="monai_wsss.handlers.volume_metric"):
        rerun = run_bundle(env, "evaluate.json", dataset_dir=str(env["brats"]), output_dir=str(tmp_path), num_overlays=0)
    assert math.isnan(rerun["metrics"]["val_mean_dice"]) and "no scan was segmented in this run" in caplog.text
    assert rerun["summary"]["volume_dice"] == pytest.approx(first["summary"]["volume_dice"])  # the report: every scan


@pytest.mark.slow
def test_two_process_inference_shards_the_scans_and_shares_one_threshold(env, tmp_path):
    """multi_gpu_inference.json on two ranks as torchrun starts them (2 CPU processes, gloo; tests/forked_cli.py
    ``run_ranks``), here with evaluate.json: each rank segments its share of the scans into <output_dir>/rank<k>/;
    the dataset-level average Otsu threshold, the key metric and the report's pooled scores are those of the whole
    dataset."""
    single = run_bundle(env, "evaluate.json", method="threshold", dataset_dir=str(env["brats"]),
                        output_dir=str(tmp_path / "single"), spatial_size=[SIZE, SIZE], num_overlays=0)
    configs = [str(BUNDLES["brats"] / "configs" / f) for f in
               ("inference.json", "inference_threshold.json", "evaluate.json", "multi_gpu_inference.json")]
    cmd = [
        "run", "--config_file", str(configs), "--dataset_dir", str(env["brats"]), "--output_dir", str(tmp_path / "multi"),
        "--progress", "false", "--spatial_size", repr([SIZE, SIZE]), "--num_overlays", "0",
    ]
    proc = run_ranks("monai.bundle", cmd, nproc=2, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = [read_csv(tmp_path / "multi" / f"rank{k}" / "predictions.csv") for k in (0, 1)]
    cases = [r["case"] for rows in shards for r in rows]
    assert all(shards) and sorted(cases) == sorted(r["case"] for r in single["rows"])
    for rows in shards:
        for row in rows:
            assert float(row["threshold"]) == pytest.approx(single["threshold"], abs=1e-6)
            assert_input_space(next(it["image"] for it in env["items"] if it["case"] == row["case"]), row["mask"])
    # each rank's key metric (MONAI gathers the per-scan Dice of every rank) is the one-process run's mean
    pooled = [float(v) for v in re.findall(r"best metric of val_mean_dice: (\S+)", proc.stdout + proc.stderr)]
    assert len(pooled) == 2 and pooled == pytest.approx([single["metrics"]["val_mean_dice"]] * 2, abs=1e-6)
    # and each rank's report pools the cases of both (its metrics.csv lists its own shard)
    for k in (0, 1):
        report = json.loads((tmp_path / "multi" / f"rank{k}" / "summary.json").read_text())
        for key in ("num_cases", "num_positive_slices", "slice_dice", "volume_dice", "slice_auroc", "pixel_auroc"):
            assert report[key] == pytest.approx(single["summary"][key], abs=1e-6), (k, key)
        assert len(read_csv(tmp_path / "multi" / f"rank{k}" / "metrics.csv")) == len(shards[k])
