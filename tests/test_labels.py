"""Image-level labels from a labels file: parsing and its errors, the mask rule, and every stage trained without masks."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow, run

from conftest import BUNDLES
from monai_wsss.apps import PseudoMaskGenerator, VolumeSegmentationPipeline, build_method_inferer
from monai_wsss.bundle import load_slice_labels, prepare_splits
from monai_wsss.data import (
    UNLABELLED,
    SliceLabels,
    build_slice_dataset,
    labels_from_masks,
    make_synthetic_dataset,
)
from monai_wsss.data.labels import main as labels_main
from monai_wsss.transforms import MapSliceScore, MapSliceScored

SHAPE = (40, 40, 12)
SIZE = 32
TINY_SEGMENTER = {"network_def#channels": [4, 8, 16], "network_def#strides": [2, 2], "network_def#num_res_units": 1}


@pytest.fixture(scope="module")
def with_masks(tmp_path_factory):
    """Synthetic BraTS-layout cases with masks (the seed gives scans with healthy slices, as test_segmenter's)."""
    root = tmp_path_factory.mktemp("labels")
    items = make_synthetic_dataset(root / "brats", num_cases=10, shape=SHAPE, seed=5)
    return {"root": root / "brats", "items": items}


@pytest.fixture(scope="module")
def without_masks(with_masks, tmp_path_factory):
    """The same scans with every mask removed, and their labels file written from the masks by the rule."""
    root = tmp_path_factory.mktemp("weak") / "brats"
    shutil.copytree(with_masks["root"], root)
    labels = root.parent / "labels.csv"
    assert labels_main(["--dataset_dir", str(root), "--task", "brats", "--out", str(labels), "--quiet"]) == 0
    for seg in root.rglob("*_seg.nii.gz"):
        seg.unlink()
    assert not list(root.rglob("*_seg*"))
    return {"root": root, "labels": labels}


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---- the file ----------------------------------------------------------------------------------------------------
def test_labels_file_slice_and_scan_rows_round_trip(tmp_path):
    path = _write(
        tmp_path / "labels.csv",
        "\ufeffcase,slice,label\n"  # a byte-order mark, as spreadsheet programs write it
        "a,0,0\n"
        "a,2,1\n"
        "\n"
        "a,2,1\n"  # the same row twice agrees with itself
        "control,,0\n"
        "b, 1 ,1\n",
    )
    labels = SliceLabels.from_csv(path)
    assert labels.cases == ["a", "b", "control"] and "control" in labels and "zzz" not in labels
    assert labels.for_case("a", 4).tolist() == [0, UNLABELLED, 1, UNLABELLED]
    assert labels.for_case("control", 3).tolist() == [0, 0, 0]  # a scan-level row labels every slice
    assert labels.for_case("unknown", 2).tolist() == [UNLABELLED] * 2
    again = SliceLabels.from_csv(labels.to_csv(tmp_path / "out" / "copy.csv"))
    assert again.digest() == labels.digest()
    assert (tmp_path / "out" / "copy.csv").read_text(encoding="utf-8").splitlines()[:2] == ["case,slice,label", "a,0,0"]
    assert not list((tmp_path / "out").glob(".tmp-*"))
    other = SliceLabels.from_tensors({"a": [0, -1, 0, -1], "b": [-1, 1], "control": [0, 0, 0]})
    assert other.digest() != labels.digest()


@pytest.mark.parametrize(
    "text, message",
    [
        ("case,slice,label\na,0,2\n", r"line 2: label must be 0 or 1, got '2'"),
        ("case,slice,label\na,0,yes\n", r"line 2: label must be 0 or 1"),
        ("case,slice,label\na,x,1\n", r"line 2: slice must be a 0-based integer index or empty .* got 'x'"),
        ("case,slice,label\na,-1,1\n", r"line 2: slice must be a 0-based index >= 0"),
        ("case,slice,label\na,3,1\na,3,0\n", r"line 3 labels slice 3 of case 'a' 0, but line 2 labels it 1"),
        ("case,slice,label\na,,0\na,3,1\n", r"line 3 labels slice 3 of case 'a' 1, but line 2 labels every slice"),
        ("case,slice,label\na,3,1\na,,0\n", r"line 3 labels every slice of case 'a' 0, but line 2 labels slice 3"),
        ("case,slice,label\n,3,1\n", r"line 2: the case is empty"),
        ("case,slice,label\na,3\n", r"line 2: expected 3 fields"),
        ("case,slice,label,extra\na,3,1,0\n", r"line 1: expected the CSV header 'case,slice,label'"),
        ('{"a": [0, 1]}\n', r"line 1: expected the CSV header"),
        ("case,slice,label\n\n", r"has a header but no label row"),
        ("", r"is empty"),
    ],
)
def test_labels_file_errors_name_the_file_line_and_value(tmp_path, text, message):
    path = _write(tmp_path / "my_labels.csv", text)
    with pytest.raises(ValueError, match=message) as err:
        SliceLabels.from_csv(path)
    assert str(path) in str(err.value)


def test_labels_file_that_is_not_text_or_missing(tmp_path):
    binary = tmp_path / "scan.nii.gz"
    binary.write_bytes(b"\x1f\x8b\x08\x00\xff\xfe\xfa" * 10)
    with pytest.raises(ValueError, match="not a text"):
        SliceLabels.from_csv(binary)
    with pytest.raises(FileNotFoundError, match="--labels"):
        SliceLabels.from_csv(tmp_path / "nope.csv")
    assert load_slice_labels(None) is None and load_slice_labels("none") is None


def test_labels_checked_against_the_dataset(tmp_path, caplog):
    labels = SliceLabels.from_csv(_write(tmp_path / "l.csv", "case,slice,label\na,0,1\nb,,0\nghost,4,1\n"))
    with pytest.raises(ValueError, match=r"l.csv: line 4: unknown case 'ghost'"):
        labels.check_cases(["a", "b", "c"])
    labels = SliceLabels.from_csv(_write(tmp_path / "l.csv", "case,slice,label\na,0,1\nb,,0\n"))
    with pytest.raises(ValueError, match=r"names no slice of 1 training/validation scan.*\['c'\].*--allow_unlabelled_scans"):
        labels.check_cases(["a", "b", "c"], required_cases=["a", "c"])
    with caplog.at_level(logging.WARNING):
        labels.check_cases(["a", "b", "c"], required_cases=["a", "c"], allow_unlabelled_scans=True)
    assert "left out of training" in caplog.text
    labels.check_cases(["a", "b", "c"], required_cases=["a", "b"])  # test scans need no labels
    assert labels.label_values(["a"]) == {1} and labels.label_values(["a", "b"]) == {0, 1}
    with pytest.raises(ValueError, match=r"l.csv: line 2: slice 0 of case 'a' is out of range.*0 slices"):
        labels.for_case("a", 0)


# ---- the rule ----------------------------------------------------------------------------------------------------
def test_labels_written_from_masks_follow_the_rule(with_masks, tmp_path):
    items = with_masks["items"]
    labels = labels_from_masks(items, "brats")
    for item in items:
        seg = np.asarray(nib.load(item["seg"]).dataobj) > 0
        area = seg.reshape(-1, seg.shape[2]).sum(0)
        expected = np.where(area == 0, 0, np.where(area >= 0.002 * SHAPE[0] * SHAPE[1], 1, UNLABELLED))
        np.testing.assert_array_equal(labels.for_case(item["case"], SHAPE[2]).numpy(), expected)
    assert len(labels) == len(items)
    # what the slice dataset derives from the masks is the same labelling (ambiguous = unlabelled)
    for s in build_slice_dataset(items[:3], "brats", (SIZE, SIZE), split="all"):
        value = int(labels.for_case(s["case"], SHAPE[2])[s["slice_index"]])
        assert value == (UNLABELLED if s["ambiguous"] else s["label"])
    # the command writes exactly that file; scans without a mask are left out, and said so
    out = tmp_path / "cli.csv"
    (with_masks["root"] / "unmasked").mkdir()
    shutil.copy(items[0]["image"], with_masks["root"] / "unmasked" / "unmasked_flair.nii.gz")
    try:
        assert labels_main(["--dataset_dir", str(with_masks["root"]), "--task", "brats", "--out", str(out), "--quiet"]) == 0
    finally:
        shutil.rmtree(with_masks["root"] / "unmasked")
    assert SliceLabels.from_csv(out).digest() == labels.digest()


# ---- training data without masks ---------------------------------------------------------------------------------
def test_slice_dataset_from_labels_alone(without_masks, tmp_path):
    root = without_masks["root"]
    items = [{"image": str(p), "case": p.parent.name} for p in sorted(root.rglob("*_flair.nii.gz"))]
    with pytest.raises(ValueError, match=r"no pixel mask .* pass --labels labels.csv"):
        build_slice_dataset(items, "brats", (SIZE, SIZE))
    case = items[0]["case"]
    partial = SliceLabels([(case, 3, 1, 2), (case, 5, 0, 3), (items[1]["case"], None, 0, 4)], source="hand.csv")
    ds = build_slice_dataset(items[:3], "brats", (SIZE, SIZE), tmp_path / "cache", split="train", labels=partial)
    got = sorted((s["case"], s["slice_index"], s["label"]) for s in ds)
    body = build_slice_dataset(items[1:2], "brats", (SIZE, SIZE), split="all", labels=partial)
    with_body = [s["slice_index"] for s in body if s["body_fraction"] >= 0.05]
    # only the named slices: two of the first scan, every slice with brain of the scan-level control, none of the third
    assert got == sorted([(case, 3, 1), (case, 5, 0)] + [(items[1]["case"], i, 0) for i in with_body])
    assert all("seg" not in s for s in ds)
    assert [s["label"] for s in build_slice_dataset(items[2:3], "brats", (SIZE, SIZE), split="all", labels=partial)] == (
        [UNLABELLED] * SHAPE[2]
    )
    beyond = SliceLabels([(case, SHAPE[2], 1, 7)], source="hand.csv")
    with pytest.raises(ValueError, match=rf"hand.csv: line 7: slice {SHAPE[2]} of case '{case}' is out of range"):
        build_slice_dataset(items[:1], "brats", (SIZE, SIZE), split="train", labels=beyond)


def test_prepare_splits_reads_no_mask_with_labels(with_masks, without_masks, tmp_path):
    labels = SliceLabels.from_csv(without_masks["labels"])
    # a folder without masks: refused without labels, with a message naming --labels
    with pytest.raises(ValueError, match="pass --labels"):
        prepare_splits(without_masks["root"], "brats", 0.2, 0.2, 0)
    weak = prepare_splits(without_masks["root"], "brats", 0.2, 0.2, 0, datalist_file=tmp_path / "d.json", labels=labels)
    full = prepare_splits(with_masks["root"], "brats", 0.2, 0.2, 0)
    for name in ("training", "validation", "test"):  # the same cases with or without masks on disk
        assert [it["case"] for it in weak[name]] == [it["case"] for it in full[name]]
    # with masks on disk, labels still mean: no mask of a training or validation scan is passed on
    mixed = prepare_splits(with_masks["root"], "brats", 0.2, 0.2, 0, labels=labels)
    assert all("seg" not in it for name in ("training", "validation") for it in mixed[name])
    assert all("seg" in it for it in mixed["test"])  # the test split keeps its masks, to score it
    kept = prepare_splits(with_masks["root"], "brats", 0.2, 0.2, 0, labels=labels, keep_validation_masks=True)
    assert all("seg" in it for it in kept["validation"]) and all("seg" not in it for it in kept["training"])
    with pytest.raises(ValueError, match="select_with_pixel_masks"):
        prepare_splits(without_masks["root"], "brats", 0.2, 0.2, 0, labels=labels, keep_validation_masks=True)
    # a scan nobody labelled: an error, or left out with allow_unlabelled_scans
    dropped = full["training"][0]["case"]
    rows = [r for r in without_masks["labels"].read_text().splitlines() if not r.startswith(f"{dropped},")]
    partial = _write(tmp_path / "partial.csv", "\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=rf"partial.csv names no slice .*{dropped}"):
        prepare_splits(without_masks["root"], "brats", 0.2, 0.2, 0, labels=partial)
    left = prepare_splits(without_masks["root"], "brats", 0.2, 0.2, 0, labels=partial, allow_unlabelled_scans=True)
    assert dropped not in [it["case"] for it in left["training"]]


def test_pseudo_masks_from_labels_read_no_mask(with_masks, tmp_path):
    item = next(it for it in with_masks["items"] if (np.asarray(nib.load(it["seg"]).dataobj) > 0).any())
    labels = labels_from_masks([item], "brats")
    values = labels.for_case(item["case"], SHAPE[2])
    source = VolumeSegmentationPipeline(None, build_method_inferer("volume_threshold"), task="brats", map_mode=None,
                                        threshold=0.3)
    no_seg = {"image": item["image"], "case": item["case"]}
    from_labels = PseudoMaskGenerator(source, fill_holes=False, labels=labels)(no_seg)
    from_masks = PseudoMaskGenerator(source, fill_holes=False)(item)
    np.testing.assert_array_equal(from_labels["slice_label"].numpy(), values.numpy())
    np.testing.assert_array_equal(np.asarray(from_labels["pseudo"]), np.asarray(from_masks["pseudo"]))
    pseudo = np.asarray(from_labels["pseudo"])[0]
    assert pseudo[..., values.numpy() == 0].sum() == 0
    # a slice the labels leave out keeps the source's mask (training drops it); a slice they call healthy is emptied
    hand = SliceLabels([(item["case"], int(i), 0, 0) for i in np.flatnonzero(values.numpy() == 1)[:1]])
    emptied = np.asarray(PseudoMaskGenerator(source, fill_holes=False, labels=hand)(no_seg)["pseudo"])[0]
    first = int(np.flatnonzero(values.numpy() == 1)[0])
    assert emptied[..., first].sum() == 0 and pseudo[..., first].sum() > 0
    assert PseudoMaskGenerator(source, labels=labels).settings() != PseudoMaskGenerator(source).settings()


def test_map_slice_score():
    m = torch.zeros(1, 10, 10)
    m[0, :3, :3] = 2.0
    m[0, 5, 5] = -4.0
    assert float(MapSliceScore("signed", quantile=1.0)(m)) == 2.0
    assert float(MapSliceScore("abs", quantile=1.0)(m)) == 4.0
    body = torch.zeros(1, 10, 10)
    body[0, 5:, 5:] = 1
    assert float(MapSliceScore("abs", quantile=1.0)(m, body)) == 4.0
    assert float(MapSliceScore("signed", quantile=1.0)(m, body)) == 0.0
    assert float(MapSliceScore()(m, torch.zeros(1, 10, 10))) == 0.0
    out = MapSliceScored("pred", quantile=0.5, body_key="body")({"pred": m, "body": torch.ones(1, 10, 10)})
    assert out["pred"].shape == (1,) and float(out["pred"]) == 0.0
    with pytest.raises(ValueError, match="quantile"):
        MapSliceScore(quantile=0)
    with pytest.raises(ValueError, match=r"\(1, H, W\)"):
        MapSliceScore()(torch.zeros(2, 4, 4))


# ---- every training config of both bundles from --labels, on a folder without masks --------------------------------
FAST = {"max_epochs": 1, "epoch_length": 2, "batch_size": 4, "progress_bar": False, "spatial_size": [SIZE, SIZE],
        "val_fraction": 0.2, "test_fraction": 0.2, "num_workers": 0}
PER_CONFIG = {
    "train_classifier.json": {"val_batch_size": 16},
    "train_diffusion.json": {"val_interval": 1, "val_max_slices": 8, "validate#num_steps": 2,
                             "validate#noise_level": 20},
    "train.json": {"val_batch_size": 16, "segmenter_spatial_size": [SIZE, SIZE], **TINY_SEGMENTER},
}


def _chaos_layout(without_masks, tmp_path) -> Path:
    """The mask-free scans in the CHAOS layout, with the labels file renamed to its case ids."""
    folder = tmp_path / "chaos"
    folder.mkdir()
    scans = sorted(without_masks["root"].rglob("*_flair.nii.gz"))
    rename = {}
    for i, path in enumerate(scans, start=1):
        shutil.copy(path, folder / f"image_{i}.nii.gz")
        rename[path.parent.name] = str(i)
    lines = without_masks["labels"].read_text().splitlines()
    out = [lines[0]] + [",".join([rename[r.split(",")[0]], *r.split(",")[1:]]) for r in lines[1:]]
    _write(tmp_path / "chaos_labels.csv", "\n".join(out) + "\n")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_every_training_config_runs_from_labels_without_masks(bundle, without_masks, tmp_path):
    if bundle == "chaos":
        dataset, labels = _chaos_layout(without_masks, tmp_path), tmp_path / "chaos_labels.csv"
    else:
        dataset, labels = without_masks["root"], without_masks["labels"]
    configs = BUNDLES[bundle] / "configs"
    root = tmp_path / "bundle"
    # without labels and without masks: refused, naming the option
    with pytest.raises(RuntimeError) as refused:
        run(config_file=str(configs / "train_classifier.json"), bundle_root=str(root), dataset_dir=str(dataset),
            **FAST, **PER_CONFIG["train_classifier.json"])
    cause = refused.value
    while cause.__cause__ is not None:  # under MONAI's "Failed to evaluate ConfigExpression" wrapper
        cause = cause.__cause__
    assert isinstance(cause, ValueError) and "pass --labels labels.csv" in str(cause)
    for name, overrides in PER_CONFIG.items():
        # the multi-GPU override leaves the labels and the data they select untouched
        multi = json.loads((configs / "multi_gpu_train.json").read_text())
        assert not {"labels", "slice_labels", "splits", "pseudo_val_items"} & set(multi)
        assert not any(k.endswith("#dataset") or k.endswith("#prepare_batch") for k in multi)
        run(config_file=str(configs / name), bundle_root=str(root), dataset_dir=str(dataset), labels=str(labels),
            **FAST, **overrides)
    models = root / "models"
    assert {"classifier.pt", "diffusion.pt", "model.pt"} <= {p.name for p in models.iterdir()}
    # the segmenter was validated against the validation scans' pseudo-masks (made from labels), not against masks
    datalist = json.loads((root / "outputs" / "train" / "datalist.json").read_text())
    assert not any("seg" in it for name in ("training", "validation") for it in datalist[name])
    pseudo = {p.name for p in (root / "outputs" / "pseudo_masks").rglob("*_pseudo.nii.gz")}
    assert {f"{it['case']}_pseudo.nii.gz" for it in datalist["validation"]} <= pseudo
    # the segmenter it trained runs through inference.json on the same mask-free folder
    state = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    gen = torch.Generator().manual_seed(0)
    torch.save({k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                for k, v in state.items()}, models / "model.pt")
    workflow = ConfigWorkflow(
        config_file=str(configs / "inference.json"), logging_file=False, workflow_type="infer",
        dataset_dir=str(dataset), output_dir=str(tmp_path / "masks"), model_path=str(models / "model.pt"),
        roi_size=[SIZE, SIZE], progress=False, **TINY_SEGMENTER,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    assert len(list((tmp_path / "masks").glob("*_mask.nii.gz"))) == len(list(Path(dataset).rglob("*.nii.gz")))


def test_selection_with_pixel_masks_is_an_explicit_option():
    for bundle in BUNDLES:
        for name in ("train_diffusion.json", "train.json"):
            parser = ConfigParser(json.loads((BUNDLES[bundle] / "configs" / name).read_text()))
            assert parser.get("select_with_pixel_masks") is False and parser.get("labels") is None
            assert "keep_validation_masks=@pixel_validation" in parser.get("splits")
            assert parser.get("validate#prepare_batch#target_key") == "$'seg' if @pixel_validation else " + (
                "'pseudo'" if name == "train.json" else "'label'"
            )
