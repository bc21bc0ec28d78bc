"""Preprocessing transforms: normalisation, labels, weak labels, slicing, model space + inverse, loading, bad input."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import SplitDim

from monai_wsss.data import build_chaos_datalist, build_slice_dataset, synthetic_brain_volume, volume_preprocess
from monai_wsss.transforms import (
    LoadVolumed,
    MapTargetLabels,
    MapTargetLabelsd,
    ScaleIntensityNonzeroPercentiles,
    ScaleIntensityNonzeroPercentilesd,
    SliceVolumed,
    ValidateVolumed,
    WeakSliceLabel,
    WeakSliceLabeld,
    invert_model_space,
    model_space_transform,
    slice_foreground_fraction,
)

AFFINE = np.array([[-1.2, 0, 0, 30.0], [0, -1.1, 0, 20.0], [0, 0, 2.5, -7.0], [0, 0, 0, 1]])


def _save(path, array, affine=AFFINE):
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


@pytest.fixture
def case_files(tmp_path):
    image, seg, _ = synthetic_brain_volume((40, 36, 12), seed=2, num_lesions=2)
    image_path = _save(tmp_path / "c_flair.nii.gz", image)
    return {"image": image_path, "seg": _save(tmp_path / "c_seg.nii.gz", seg), "case": "c"}


# ---------------------------------------------------------------- intensity


def test_nonzero_percentile_scaling_is_robust_to_outliers():
    values = torch.arange(1, 1001, dtype=torch.float32)  # foreground 1..1000
    img = torch.zeros(1, 40, 40, 2)
    img.view(-1)[:1000] = values
    img.view(-1)[1000] = 32767  # one raw-FLAIR outlier
    out = ScaleIntensityNonzeroPercentiles(lower=0.5, upper=99.5)(img)
    assert out.shape == img.shape and out.dtype == torch.float32
    assert bool((out[img == 0] == 0).all())  # background stays exactly 0
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    median = float(out.view(-1)[499])  # value 500: mid-range after scaling (min-max would give ~0.015)
    assert 0.45 < median < 0.55
    # the background does not shift the percentiles: more zeros, same foreground mapping
    bigger = torch.zeros(1, 80, 80, 2)
    bigger.view(-1)[:1001] = img.view(-1)[:1001]
    assert torch.allclose(ScaleIntensityNonzeroPercentiles()(bigger).view(-1)[:1001], out.view(-1)[:1001])
    # numpy in, numpy out
    assert isinstance(ScaleIntensityNonzeroPercentiles()(img.numpy()), np.ndarray)


def test_nonzero_percentile_scaling_keeps_meta_and_rejects_bad_input():
    meta = {"filename_or_obj": "case7_flair.nii.gz"}
    img = MetaTensor(torch.rand(1, 8, 8, 4) + 0.1, affine=torch.as_tensor(AFFINE), meta=meta)
    out = ScaleIntensityNonzeroPercentilesd("image")({"image": img})["image"]
    assert isinstance(out, MetaTensor) and torch.allclose(out.affine, img.affine)
    bad = img.clone()
    bad[0, 1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"key 'image'.*case7_flair.nii.gz.*NaN"):
        ScaleIntensityNonzeroPercentilesd("image")({"image": bad})
    with pytest.raises(ValueError, match="no voxel besides its background"):
        ScaleIntensityNonzeroPercentiles()(torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="percentiles"):
        ScaleIntensityNonzeroPercentiles(lower=60, upper=40)


# ---------------------------------------------------------------- labels


def test_map_target_labels_brats_and_chaos():
    seg = torch.tensor([[[0, 1, 2, 3, 4]]])
    assert MapTargetLabels(None, (0, 1, 2, 3, 4))(seg).tolist() == [[[0, 1, 1, 1, 1]]]  # BraTS whole tumour
    assert MapTargetLabels((2, 3), (0, 1, 2, 3, 4))(seg).tolist() == [[[0, 0, 1, 1, 0]]]  # CHAOS kidneys
    named = MetaTensor(torch.tensor([[[0.0, 5.0, 2.0, 0.5]]]), meta={"filename_or_obj": "label_9.nii.gz"})
    with pytest.raises(ValueError, match=r"key 'seg'.*label_9.nii.gz.*\[0.5, 5.0\]"):
        MapTargetLabelsd("seg", (2, 3), (0, 1, 2, 3, 4))({"seg": named})
    with pytest.raises(ValueError, match="not in allowed_labels"):
        MapTargetLabels((7,), (0, 1))


def test_weak_slice_label_thresholds():
    mask = torch.zeros(1, 20, 20)
    mask[0, :3, :3] = 1  # 9 pixels = 2.25 % of the slice
    assert WeakSliceLabel(min_pixels=9)(mask) == (1, False)
    assert WeakSliceLabel(min_pixels=10)(mask) == (1, True)  # present but too small: ambiguous
    assert WeakSliceLabel(min_pixels=None, min_fraction=0.02)(mask) == (1, False)
    assert WeakSliceLabel(min_pixels=None, min_fraction=0.03)(mask) == (1, True)
    assert WeakSliceLabel(min_pixels=5, min_fraction=0.03)(mask) == (1, True)  # both criteria must hold
    assert WeakSliceLabel(min_pixels=20, max_negative_pixels=9)(mask) == (0, False)
    assert WeakSliceLabel()(torch.zeros(1, 20, 20)) == (0, False)
    d = WeakSliceLabeld("seg", min_pixels=4, fraction_key="target_fraction")({"seg": mask})
    assert d["label"] == 1 and d["ambiguous"] is False and d["target_fraction"] == pytest.approx(9 / 400)
    with pytest.raises(ValueError, match=r"\(1, H, W\)"):
        WeakSliceLabel()(torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="max_negative_pixels"):
        WeakSliceLabel(min_pixels=3, max_negative_pixels=3)


# ---------------------------------------------------------------- slicing


def test_slice_volume_indices_meta_and_filters():
    vol = torch.zeros(1, 6, 5, 7)
    vol[0, 1:5, 1:4, 2:6] = torch.arange(1, 5, dtype=torch.float32)[None, None, :].repeat(4, 3, 1)
    image = MetaTensor(vol, affine=torch.as_tensor(AFFINE), meta={"filename_or_obj": "v.nii.gz"})
    seg = MetaTensor((vol > 2).float(), affine=torch.as_tensor(AFFINE))
    data = {"image": image, "seg": seg, "case": "v"}
    slices = SliceVolumed(["image", "seg"], slice_axis=2)(data)
    assert len(slices) == 7 and [s["slice_index"] for s in slices] == list(range(7))
    for s in slices:
        i = s["slice_index"]
        assert s["image"].shape == (1, 6, 5) and s["case"] == "v"
        assert torch.equal(s["image"].as_tensor(), vol[..., i])
        assert torch.equal(s["seg"].as_tensor(), (vol[..., i] > 2).float())
        # the slice's affine places voxel (x, y) where voxel (x, y, i) of the volume is
        expected = torch.as_tensor(AFFINE) @ torch.tensor([2.0, 3.0, i, 1.0], dtype=torch.float64)
        assert torch.allclose(s["image"].affine @ torch.tensor([2.0, 3.0, 0.0, 1.0], dtype=torch.float64), expected)
        assert s["image"].meta["filename_or_obj"] == "v.nii.gz"
    kept = SliceVolumed(["image", "seg"], foreground_key="image", min_foreground_fraction=0.0, fraction_key="bf")(data)
    assert [s["slice_index"] for s in kept] == [2, 3, 4, 5] and kept[0]["bf"] == pytest.approx(12 / 30)
    ranged = SliceVolumed("image", slice_range=(1, 3))(data)
    assert [s["slice_index"] for s in ranged] == [1, 2]
    along_x = SliceVolumed("image", slice_axis=0)(data)
    assert len(along_x) == 6 and along_x[0]["image"].shape == (1, 5, 7)
    assert slice_foreground_fraction(vol, 2).tolist() == pytest.approx([0, 0, 0.4, 0.4, 0.4, 0.4, 0])
    with pytest.raises(ValueError, match="disagree"):
        SliceVolumed(["image", "seg"])({"image": image, "seg": seg[..., :5]})
    with pytest.raises(ValueError, match="channel-first 3D volume"):
        SliceVolumed("image")({"image": torch.zeros(1, 4, 4)})
    with pytest.raises(ValueError, match="exceeds"):
        SliceVolumed("image", slice_range=(0, 9))(data)


# ---------------------------------------------------------------- model space and inverse


@pytest.mark.parametrize("source_hw", [(240, 240), (200, 176)])
def test_model_space_round_trip_restores_shape_and_affine(source_hw):
    h, w = source_hw
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    smooth = (0.5 + 0.4 * torch.sin(3 * xx) * torch.cos(2 * yy))[None, ..., None].repeat(1, 1, 1, 3)
    volume = MetaTensor(smooth, affine=torch.as_tensor(AFFINE))
    source = SplitDim(dim=3, keepdim=False)(volume)[1]  # a slice as SliceVolumed produces it
    to_model = model_space_transform((64, 64))
    d = to_model({"image": source, "seg": (source > 0.5).float()})
    assert d["image"].shape == (1, 64, 64) and d["seg"].shape == (1, 64, 64)
    assert -1.0 <= float(d["image"].min()) and float(d["image"].max()) <= 1.0
    assert set(torch.unique(d["seg"]).tolist()) <= {0.0, 1.0}
    # a map computed in model space goes back to the source slice's grid
    d["map"] = (d["image"] + 1) / 2
    back = invert_model_space(to_model, keys="map")(d)["map"]
    assert back.shape == source.shape
    assert torch.allclose(back.affine, source.affine, atol=1e-6)
    assert float((back - source).abs().mean()) < 0.01  # a smooth image survives the round trip
    # the image itself is inverted the same way (after undoing the [-1, 1] scaling)
    img_back = invert_model_space(to_model, keys="image")(d)["image"]
    assert img_back.shape == source.shape and torch.allclose(img_back.affine, source.affine, atol=1e-6)
    with pytest.raises(ValueError, match="both as images and as masks"):
        model_space_transform(image_keys="image", seg_keys=("image",))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_batched_model_space_is_the_training_transform_on_plain_tensors(dtype):
    # inference (VolumeInferer) and training (model_space_transform) share one model-space rule
    from monai_wsss.inferers import VolumeInferer
    from monai_wsss.transforms import resize_slices, slices_to_model_space

    slices = torch.rand(3, 1, 100, 90, generator=torch.Generator().manual_seed(0))
    to_model = model_space_transform((32, 32), seg_keys=())
    expected = torch.stack([torch.as_tensor(to_model({"image": MetaTensor(s)})["image"]) for s in slices])
    batched = slices_to_model_space(slices.to(dtype), (32, 32))
    assert batched.dtype == dtype and type(batched) is torch.Tensor
    torch.testing.assert_close(batched.float(), expected, atol=1e-2 if dtype == torch.float16 else 1e-6, rtol=0)
    torch.testing.assert_close(VolumeInferer(roi_size=(32, 32)).to_model_space(slices), expected, atol=1e-6, rtol=0)
    assert torch.equal(slices_to_model_space(slices, (100, 90), rescale=False), slices)
    with pytest.raises(ValueError, match="`x` must be a batch of slices"):
        resize_slices(slices[0], (32, 32))
    with pytest.raises(ValueError, match="`size` must be two positive ints"):
        resize_slices(slices, (32, 0))


# ---------------------------------------------------------------- loading and validation


def test_volume_preprocess_outputs(case_files):
    out = volume_preprocess("brats")(dict(case_files))
    assert out["image"].shape == (1, 40, 36, 12) and out["seg"].shape == (1, 40, 36, 12)
    assert float(out["image"].min()) == 0.0 and float(out["image"].max()) == 1.0
    assert set(torch.unique(out["seg"]).tolist()) == {0.0, 1.0}
    assert np.allclose(out["image"].affine.numpy(), AFFINE) and np.allclose(out["seg"].affine.numpy(), AFFINE)
    raw_seg = np.asarray(nib.load(case_files["seg"]).dataobj)
    assert int(out["seg"].sum()) == int((raw_seg > 0).sum())


def _write_dicom_series(folder, volume_zyx: np.ndarray, spacing_xyz, origin_xyz):
    """A DICOM series written by ITK, one file per slice, with the geometry tags ITK reads back."""
    import itk

    folder.mkdir()
    for k in range(volume_zyx.shape[0]):
        sl = itk.image_from_array(np.ascontiguousarray(volume_zyx[k]))
        sl.SetSpacing(spacing_xyz[:2])
        sl.SetOrigin(origin_xyz[:2])
        tags = sl.GetMetaDataDictionary()
        tags["0020|0032"] = f"{origin_xyz[0]}\\{origin_xyz[1]}\\{origin_xyz[2] + k * spacing_xyz[2]}"
        tags["0020|0037"] = "1\\0\\0\\0\\1\\0"
        tags["0020|0013"] = str(k + 1)
        tags["0020|000d"] = "1.2.826.0.1.3680043.2.1125.7.1"
        tags["0020|000e"] = "1.2.826.0.1.3680043.2.1125.7.2"
        tags["0008|0018"] = f"1.2.826.0.1.3680043.2.1125.7.3.{k + 1}"
        tags["0008|0060"] = "MR"
        io = itk.GDCMImageIO.New()
        io.KeepOriginalUIDOn()
        itk.ImageFileWriter[type(sl)].New(Input=sl, FileName=str(folder / f"slice_{k:03d}.dcm"), ImageIO=io).Update()


def test_dicom_series_folder_loads_through_itk(tmp_path):
    image, seg, _ = synthetic_brain_volume((32, 28, 8), seed=5, num_lesions=1)
    root = tmp_path / "chaos_dicom"
    root.mkdir()
    _write_dicom_series(root / "image_4", image.transpose(2, 1, 0), (1.25, 1.5, 7.7), (10.0, -5.0, 3.0))
    loaded = LoadVolumed("image")({"image": str(root / "image_4")})["image"]
    assert loaded.shape == (1, 32, 28, 8)
    np.testing.assert_array_equal(loaded[0].numpy(), image)
    # ITK reports RAS: LPS origin (10, -5, 3) -> (-10, 5, 3), spacing kept
    assert np.allclose(loaded.affine.numpy()[:3, 3], [-10.0, 5.0, 3.0])
    assert np.allclose(np.abs(np.diag(loaded.affine.numpy())[:3]), [1.25, 1.5, 7.7])
    # ITK and NiBabel read a NIfTI file to the same array and affine
    nifti = _save(tmp_path / "same.nii.gz", image)
    by_itk = LoadVolumed("image", reader="ITKReader")({"image": nifti})["image"]
    by_nibabel = LoadVolumed("image", reader="NibabelReader")({"image": nifti})["image"]
    assert torch.equal(by_itk.as_tensor(), by_nibabel.as_tensor())
    assert np.allclose(by_itk.affine.numpy(), by_nibabel.affine.numpy(), atol=1e-4)
    # a CHAOS-style case with a DICOM image folder and a NIfTI mask in the same space builds slices
    kidney = (seg > 0).astype(np.uint8) * 2
    _save(root / "label_4.nii.gz", kidney, affine=loaded.affine.numpy())
    items = build_chaos_datalist(root)
    assert items[0]["case"] == "4" and items[0]["image"].endswith("image_4")
    ds = build_slice_dataset(items, "chaos", spatial_size=(16, 16), split="all")
    assert len(ds) == 8
    assert [d["slice_index"] for d in ds if d["label"]] == [k for k in range(8) if kidney[..., k].any()]


def test_bad_inputs_name_the_file(tmp_path, case_files):
    image = np.asarray(nib.load(case_files["image"]).dataobj)
    seg = np.asarray(nib.load(case_files["seg"]).dataobj)
    pre = volume_preprocess("brats")

    def run(**paths):
        return pre({**case_files, **paths})

    with pytest.raises(ValueError, match=r"spatial shape.*short_seg.nii.gz"):
        run(seg=_save(tmp_path / "short_seg.nii.gz", seg[:, :, :10]))
    shifted = AFFINE.copy()
    shifted[0, 3] += 5.0
    with pytest.raises(ValueError, match=r"different affines.*moved_seg.nii.gz|moved_seg.nii.gz.*different affines"):
        run(seg=_save(tmp_path / "moved_seg.nii.gz", seg, affine=shifted))
    with pytest.raises(ValueError, match=r"flat_flair.nii.gz.*expected a 3D volume"):
        run(image=_save(tmp_path / "flat_flair.nii.gz", image[:, :, 5]))
    with_nan = image.astype(np.float32)
    with_nan[10, 10, 3] = np.nan
    with pytest.raises(ValueError, match=r"nan_flair.nii.gz.*NaN"):
        run(image=_save(tmp_path / "nan_flair.nii.gz", with_nan))
    odd = seg.copy()
    odd[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"odd_seg.nii.gz.*unexpected label values \[7.0\]"):
        run(seg=_save(tmp_path / "odd_seg.nii.gz", odd))
    with pytest.raises(FileNotFoundError, match="missing_flair.nii.gz"):
        run(image=str(tmp_path / "missing_flair.nii.gz"))
    # corrupt files: garbage bytes, and a truncated gzip stream behind a valid header
    (tmp_path / "garbage_flair.nii.gz").write_bytes(b"not a nifti at all" * 10)
    with pytest.raises(ValueError, match=r"cannot read .*garbage_flair.nii.gz") as info:
        run(image=str(tmp_path / "garbage_flair.nii.gz"))
    assert info.value.__cause__ is None and info.value.__suppress_context__
    with gzip.open(case_files["image"]) as f:
        raw = f.read()
    with gzip.open(tmp_path / "cut_flair.nii.gz", "wb") as f:
        f.write(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"cannot read .*cut_flair.nii.gz"):
        run(image=str(tmp_path / "cut_flair.nii.gz"))
    # through the slice dataset the same errors surface unwrapped
    with pytest.raises(ValueError, match=r"cannot read .*cut_flair.nii.gz"):
        build_slice_dataset([{**case_files, "image": str(tmp_path / "cut_flair.nii.gz")}], "brats")
    with pytest.raises(ValueError, match=r"^1 scan\(s\) have no pixel mask \('seg'\) .*\['c'\]: pass --labels"):
        build_slice_dataset([{"image": case_files["image"], "case": "c"}], "brats")


def test_validate_volume_direct():
    img = MetaTensor(torch.rand(1, 4, 4, 4), meta={"filename_or_obj": "a.nii.gz"})
    with pytest.raises(ValueError, match="channels"):
        ValidateVolumed()({"image": img, "seg": torch.zeros(2, 4, 4, 4)})
    with pytest.raises(ValueError, match="key 'image' is missing"):
        ValidateVolumed()({"seg": img})
    assert ValidateVolumed(seg_key=None)({"image": img})["image"] is img


def test_decathlon_channel_out_of_range(tmp_path):
    image, _, _ = synthetic_brain_volume((20, 20, 16), seed=0, num_lesions=0)
    path = _save(tmp_path / "four.nii.gz", np.stack([image] * 2, axis=-1))
    assert LoadVolumed("image", channel=1)({"image": path})["image"].shape == (1, 20, 20, 16)
    with pytest.raises(ValueError, match="channel 3 out of range.*four.nii.gz"):
        LoadVolumed("image")({"image": path, "channel": 3})
