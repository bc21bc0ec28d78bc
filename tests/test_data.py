"""Dataset builders, case-level splits, datalist JSON and the cached slice dataset, on synthetic data only."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_wsss.data import (
    TASKS,
    build_brats_datalist,
    build_chaos_datalist,
    build_slice_dataset,
    load_datalist,
    make_synthetic_dataset,
    split_cases,
    synthetic_brain_volume,
    write_datalist,
)

SHAPE = (48, 48, 20)


@pytest.fixture(scope="module")
def brats_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic_brats")
    make_synthetic_dataset(root, num_cases=4, shape=SHAPE, seed=0)
    return root


# ---------------------------------------------------------------- synthetic data


def test_synthetic_volume_deterministic_and_brain_like():
    img_a, seg_a, aff = synthetic_brain_volume((48, 48, 24), seed=3, num_lesions=2)
    img_b, seg_b, _ = synthetic_brain_volume((48, 48, 24), seed=3, num_lesions=2)
    img_c, _, _ = synthetic_brain_volume((48, 48, 24), seed=4, num_lesions=2)
    np.testing.assert_array_equal(img_a, img_b)
    np.testing.assert_array_equal(seg_a, seg_b)
    assert not np.array_equal(img_a, img_c)
    brain = img_a > 0
    assert 0.1 < brain.mean() < 0.6  # an ellipsoid brain on a zero background
    assert set(np.unique(seg_a)) <= {0, 1, 2, 4} and (seg_a > 0).any()
    assert not (seg_a[~brain] > 0).any()  # lesions stay inside the brain
    lesion, tissue = img_a[seg_a > 0].mean(), img_a[brain & (seg_a == 0)].mean()
    assert lesion > 1.3 * tissue  # FLAIR-bright lesions
    per_slice = (seg_a > 0).sum(axis=(0, 1))
    assert (per_slice == 0).any() and (per_slice > 0).any()  # lesion-free and lesion slices
    assert aff.shape == (4, 4)
    _, seg_free, _ = synthetic_brain_volume((32, 32, 16), seed=0, num_lesions=0)
    assert not seg_free.any()


def test_synthetic_realism_options_make_the_target_not_simply_the_brightest():
    """bright_anatomy and dark_core (the demo's data): bright unlabelled anatomy on healthy slices, non-bright cores."""
    shape = (48, 48, 24)
    plain, seg, _ = synthetic_brain_volume(shape, seed=3, num_lesions=2)
    image, seg_b, _ = synthetic_brain_volume(shape, seed=3, num_lesions=2, bright_anatomy=True)
    np.testing.assert_array_equal(seg_b, seg)  # the anatomy is never labelled and moves no lesion
    brain = plain > 0
    healthy = brain & (seg == 0)
    added = image.astype(float) - plain
    # the band: a few per cent of the brain, every slice with brain has some, all of it unlabelled tissue
    band = added > 100
    assert 0.02 < band[brain].mean() < 0.15 and not (band & (seg > 0)).any()
    assert band.any(axis=(0, 1))[brain.any(axis=(0, 1))].all()
    # brighter than 99 % of the other healthy tissue, so that a slice's high percentile is often normal anatomy
    assert np.median(image[band]) > np.percentile(image[healthy & ~band], 99)

    cored, seg_c, _ = synthetic_brain_volume(shape, seed=3, num_lesions=2, dark_core=True)
    core, ring = np.isin(seg_c, (1, 4)), seg_c == 2
    assert core.any() and ring.any()
    tissue = cored[brain & (seg_c == 0)].astype(float)
    # the necrotic core is tissue-like, the ring around it FLAIR-bright
    assert np.median(cored[core]) < np.percentile(tissue, 90) < np.median(cored[ring])
    assert core.sum() > (np.isin(seg, (1, 4))).sum()  # a larger core than by default
    with pytest.raises(ValueError, match="lesion_contrast"):
        synthetic_brain_volume(shape, seed=3, lesion_contrast=0.0)
    faint, _, _ = synthetic_brain_volume(shape, seed=3, num_lesions=2, lesion_contrast=0.5)
    assert tissue.mean() < faint[seg > 0].mean() < plain[seg > 0].mean()


def test_make_synthetic_dataset_is_brats_layout(brats_root):
    items = build_brats_datalist(brats_root)
    assert [it["case"] for it in items] == [f"synth_{i:03d}" for i in range(4)]
    img = nib.load(items[1]["image"])
    assert img.shape == SHAPE and np.asarray(img.dataobj).max() == 32767  # the raw-outlier case
    assert not np.asarray(nib.load(items[3]["seg"]).dataobj).any()  # every 4th case is lesion-free


# ---------------------------------------------------------------- datalists and splits


def test_decathlon_layout(tmp_path):
    image, seg, affine = synthetic_brain_volume((32, 32, 16), seed=0)
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    four_d = np.stack([image, image // 2, image // 3, image // 4], axis=-1)  # FLAIR is channel 0
    entries = []
    for case in ("BRATS_001", "BRATS_002"):
        nib.save(nib.Nifti1Image(four_d, affine), str(tmp_path / "imagesTr" / f"{case}.nii.gz"))
        nib.save(nib.Nifti1Image(seg, affine), str(tmp_path / "labelsTr" / f"{case}.nii.gz"))
        entries.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "BRATS", "training": entries, "test": []}))
    items = build_brats_datalist(tmp_path)
    assert [it["case"] for it in items] == ["BRATS_001", "BRATS_002"]
    assert items[0]["channel"] == 0
    ds = build_slice_dataset(items[:1], "brats", spatial_size=(16, 16), split="all")
    assert len(ds) == 16 and ds[0]["image"].shape == (1, 16, 16)
    t2 = build_brats_datalist(tmp_path, modality="t2")
    assert t2[0]["channel"] == 3


def test_chaos_layout(tmp_path):
    image, _, affine = synthetic_brain_volume((32, 32, 16), seed=0)
    label = np.zeros(image.shape, np.uint8)
    label[8:14, 8:14, 4:9] = 2  # right kidney
    label[18:24, 8:14, 4:7] = 3  # left kidney
    label[10:20, 18:28, 2:12] = 1  # liver: background for the kidney task
    for n in (10, 2):
        nib.save(nib.Nifti1Image(image.astype(np.float64), affine), str(tmp_path / f"image_{n}.nii.gz"))
        nib.save(nib.Nifti1Image(label.astype(np.float64), affine), str(tmp_path / f"label_{n}.nii.gz"))
    items = build_chaos_datalist(tmp_path)
    assert [it["case"] for it in items] == ["2", "10"]  # numeric order
    ds = build_slice_dataset(items[:1], "chaos", spatial_size=(16, 16), split="all")
    labels = {d["slice_index"]: d["label"] for d in ds}
    assert [i for i, v in labels.items() if v] == [4, 5, 6, 7, 8]  # kidneys only, liver slices 2, 3, 9-11 negative
    (tmp_path / "label_2.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="label_2"):
        build_chaos_datalist(tmp_path)


def test_empty_folder_and_missing_root(tmp_path):
    with pytest.raises(ValueError, match="no BraTS case"):
        build_brats_datalist(tmp_path)
    with pytest.raises(ValueError, match="no CHAOS case"):
        build_chaos_datalist(tmp_path)
    with pytest.raises(FileNotFoundError, match="not_there"):
        build_brats_datalist(tmp_path / "not_there")
    (tmp_path / "case_a").mkdir()
    (tmp_path / "case_a" / "case_a_seg.nii.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="case_a_flair"):
        build_brats_datalist(tmp_path)


def test_split_cases_keeps_patients_together_and_is_deterministic():
    # two items per patient (e.g. two timepoints): they must never be separated
    items = [{"image": f"{c}_{t}.nii.gz", "case": f"p{c:02d}"} for c in range(20) for t in range(2)]
    splits = split_cases(items, val_fraction=0.1, test_fraction=0.2, seed=0)
    cases = {k: {it["case"] for it in v} for k, v in splits.items()}
    assert len(cases["test"]) == 4 and len(cases["validation"]) == 2 and len(cases["training"]) == 14
    assert not cases["test"] & cases["training"]
    assert not cases["test"] & cases["validation"]
    assert not cases["validation"] & cases["training"]
    assert sum(len(v) for v in splits.values()) == len(items)
    assert split_cases(items, seed=0) == splits
    assert split_cases(list(reversed(items)), seed=0)["test"][0]["case"] in cases["test"]  # order-independent
    assert {it["case"] for it in split_cases(items, seed=1)["test"]} != cases["test"]
    with pytest.raises(ValueError, match="leave one for training"):
        split_cases(items[:4], val_fraction=0.3, test_fraction=0.5)
    with pytest.raises(ValueError, match="'case'"):
        split_cases([{"image": "a.nii.gz"}])
    with pytest.raises(ValueError, match="test_fraction"):
        split_cases(items, test_fraction=1.5)


def test_datalist_roundtrip_and_missing_file(brats_root, tmp_path):
    splits = split_cases(build_brats_datalist(brats_root), val_fraction=0.25, test_fraction=0.25)
    path = write_datalist(tmp_path / "lists" / "datalist.json", splits, relative_to=brats_root)
    raw = json.loads(path.read_text())
    assert set(raw) == {"training", "validation", "test"} and not raw["training"][0]["image"].startswith("/")
    loaded = load_datalist(path, base_dir=brats_root)
    assert loaded == splits
    abs_path = write_datalist(tmp_path / "abs.json", splits)
    assert load_datalist(abs_path) == splits
    # a datalist naming a missing file fails with that file's name
    missing = dict(splits)
    missing["test"] = [dict(splits["test"][0], seg=str(brats_root / "gone_seg.nii.gz"))]
    write_datalist(tmp_path / "bad.json", missing)
    with pytest.raises(FileNotFoundError, match="gone_seg.nii.gz"):
        load_datalist(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        load_datalist(tmp_path / "nothing.json")


# ---------------------------------------------------------------- slice dataset


def test_build_slice_dataset_train_eval_all(brats_root):
    items = build_brats_datalist(brats_root)
    everything = build_slice_dataset(items, "brats", spatial_size=(32, 32), split="all")
    assert len(everything) == len(items) * SHAPE[2]
    s = everything[5]
    assert s["image"].shape == (1, 32, 32) and s["seg"].shape == (1, 32, 32)
    assert isinstance(s["slice_index"], int) and isinstance(s["case"], str) and s["label"] in (0, 1)
    images = torch.stack([d["image"] for d in everything])
    assert images.min() >= -1 and images.max() <= 1 and images.max() > 0.9  # outliers did not squash the range
    assert set(torch.unique(torch.stack([d["seg"] for d in everything])).tolist()) <= {0.0, 1.0}
    # weak labels follow the source-resolution mask: positive slices have >= positive_min_fraction of tumour
    threshold = TASKS["brats"].positive_min_fraction * SHAPE[0] * SHAPE[1]
    for d in everything:
        seg = np.asarray(nib.load(items[[it["case"] for it in items].index(d["case"])]["seg"]).dataobj)
        area = int((seg[:, :, d["slice_index"]] > 0).sum())
        assert d["label"] == int(area > 0) and d["ambiguous"] == (0 < area < threshold)
    train = build_slice_dataset(items, "brats", spatial_size=(32, 32), split="train")
    assert 0 < len(train) < len(everything)
    assert not any(d["ambiguous"] for d in train)
    assert all(d["body_fraction"] >= TASKS["brats"].min_body_fraction for d in train)
    assert {d["label"] for d in train} == {0, 1}
    evaluation = build_slice_dataset(items, "brats", spatial_size=(32, 32), split="eval")
    assert len(train) <= len(evaluation) <= len(everything)
    with pytest.raises(ValueError, match="unknown split"):
        build_slice_dataset(items, "brats", split="valid")
    with pytest.raises(ValueError, match="unknown task"):
        build_slice_dataset(items, "liver")


def test_context_slices_stack_each_slices_neighbours_of_the_same_scan_as_channels(brats_root, tmp_path):
    items = build_brats_datalist(brats_root)
    single = build_slice_dataset(items, "brats", spatial_size=(32, 32), split="all", cache_dir=tmp_path)
    stacked = build_slice_dataset(items, "brats", spatial_size=(32, 32), split="all", cache_dir=tmp_path, context_slices=1)
    assert len(list(tmp_path.iterdir())) == 1  # one cache for every context
    by_slice = {(d["case"], d["slice_index"]): d for d in single}
    n = SHAPE[2]
    assert len(stacked) == len(single)
    for d in stacked:
        j, case = d["slice_index"], d["case"]
        assert d["image"].shape == (3, 32, 32)
        for channel, k in enumerate((max(j - 1, 0), j, min(j + 1, n - 1))):  # the scan's own neighbours, edges repeated
            torch.testing.assert_close(d["image"][channel], by_slice[(case, k)]["image"][0])
        torch.testing.assert_close(d["seg"], by_slice[(case, j)]["seg"])  # the target stays the centre slice's
        assert d["label"] == by_slice[(case, j)]["label"]
    train = build_slice_dataset(items, "brats", spatial_size=(32, 32), split="train", cache_dir=tmp_path, context_slices=2)
    assert len(train) == len(build_slice_dataset(items, "brats", spatial_size=(32, 32), split="train", cache_dir=tmp_path))
    assert train[0]["image"].shape == (5, 32, 32)
    with pytest.raises(ValueError, match="context_slices must be an int >= 0"):
        build_slice_dataset(items, "brats", spatial_size=(32, 32), context_slices=-1)


def test_slice_cache_avoids_rereading(brats_root, tmp_path):
    case_dir = tmp_path / "copy"
    shutil.copytree(brats_root, case_dir)
    items = build_brats_datalist(case_dir)[:2]
    first = build_slice_dataset(items, "brats", spatial_size=(32, 32), cache_dir=tmp_path / "cache", split="train")
    for it in items:  # a second build must come from the cache alone
        open(it["image"], "wb").close()
        open(it["seg"], "wb").close()
    second = build_slice_dataset(items, "brats", spatial_size=(32, 32), cache_dir=tmp_path / "cache", split="train")
    assert len(first) == len(second) > 0
    for a, b in zip(first, second):
        assert torch.equal(a["image"], b["image"]) and a["label"] == b["label"] and a["case"] == b["case"]
    # another model size is another cache entry, so the corrupted files are read and fail, naming the file
    with pytest.raises(ValueError, match="synth_000_flair.nii.gz"):
        build_slice_dataset(items, "brats", spatial_size=(16, 16), cache_dir=tmp_path / "cache")


def test_brats_sized_volume_to_slices(tmp_path):
    """A BraTS-sized 240 x 240 x 155 volume gives 155 model-space slices (speed is measured by the benchmark, not here)."""
    image, seg, affine = synthetic_brain_volume((240, 240, 155), seed=0)
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "v_flair.nii.gz"))
    nib.save(nib.Nifti1Image(seg, affine), str(tmp_path / "v_seg.nii.gz"))
    item = {"image": str(tmp_path / "v_flair.nii.gz"), "seg": str(tmp_path / "v_seg.nii.gz"), "case": "v"}
    ds = build_slice_dataset([item], "brats", spatial_size=(64, 64), split="all")
    assert len(ds) == 155 and ds[77]["image"].shape == (1, 64, 64)
    assert sorted(int(ds[i]["slice_index"]) for i in range(len(ds))) == list(range(155))


def test_prepare_data_script(brats_root, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "prepare_data.py"
    spec = importlib.util.spec_from_file_location("prepare_data", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out_dir = tmp_path / "prepared"
    summary = module.main(
        ["--task", "brats", "--data_dir", str(brats_root), "--out_dir", str(out_dir), "--spatial_size", "32",
         "--val_fraction", "0.25", "--test_fraction", "0.25"]
    )
    printed = capsys.readouterr().out
    assert "training" in printed and "positive" in printed
    splits = load_datalist(out_dir / "datalist.json")
    assert {k: len(v) for k, v in splits.items()} == {"training": 2, "validation": 1, "test": 1}
    train = build_slice_dataset(splits["training"], "brats", spatial_size=(32, 32), cache_dir=out_dir / "slices")
    assert summary["splits"]["training"]["slices"] == len(train)
    assert summary["splits"]["training"]["positive"] == sum(d["label"] for d in train)
    assert json.loads((out_dir / "summary.json").read_text())["splits"] == summary["splits"]
