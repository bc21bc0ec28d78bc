"""Map post-processing: normalisation to [0, 1], per-slice / dataset-level Otsu, largest component, writer helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.filters import threshold_otsu

from monai.data import MetaTensor
from monai.transforms import AsDiscrete
from monai_wsss.transforms.postprocess import (
    CopyMetaFromd,
    NormalizeMap,
    NormalizeMapd,
    OtsuThreshold,
    OtsuThresholdd,
    dataset_otsu_threshold,
    keep_largest_component,
    map_writer,
    otsu_thresholds,
)


def _bimodal_volume(seed: int = 0, shape=(1, 24, 20, 5)) -> torch.Tensor:
    """Noisy background with a bright square per slice; each slice has a different contrast."""
    g = torch.Generator().manual_seed(seed)
    vol = torch.rand(shape, generator=g) * 0.3
    for k in range(shape[-1]):
        vol[0, 4 + k : 12 + k, 5:13, k] += 0.5 + 0.3 * k
        vol[..., k] *= 1.0 + k  # different scale per slice, so per-slice and global thresholds differ
    return vol


# ---------------------------------------------------------------- NormalizeMap


@pytest.mark.parametrize(
    "mode, expected",
    [("signed", [0.0, 0.0, 0.25, 1.0]), ("abs", [0.5, 0.0, 0.25, 1.0]), ("minmax", [0.0, 1 / 3, 0.5, 1.0])],
)
def test_normalize_modes_by_hand(mode, expected):
    m = torch.tensor([[[-2.0, 0.0], [1.0, 4.0]]])  # (1, 2, 2)
    out = NormalizeMap(mode=mode)(m)
    assert torch.allclose(out.flatten(), torch.tensor(expected))


def test_normalize_body_mask_restricts_statistics_and_zeros_outside():
    m = torch.tensor([[[1.0, 2.0, 100.0], [0.5, -1.0, 50.0]]])
    body = torch.tensor([[[1, 1, 0], [1, 1, 0]]])
    out = NormalizeMap("signed")(m, body_mask=body)
    # the bright values outside the body neither set the scale nor survive
    assert torch.allclose(out, torch.tensor([[[0.5, 1.0, 0.0], [0.25, 0.0, 0.0]]]))
    out_mm = NormalizeMap("minmax")(m, body_mask=body)
    assert torch.allclose(out_mm, torch.tensor([[[2 / 3, 1.0, 0.0], [0.5, 0.0, 0.0]]]))


def test_normalize_per_slice_vs_whole_volume():
    vol = torch.zeros(1, 3, 3, 2)
    vol[0, 1, 1, 0] = 2.0
    vol[0, 0, 0, 1] = 8.0
    per_slice = NormalizeMap("signed", slice_axis=-1)(vol)
    whole = NormalizeMap("signed", slice_axis=None)(vol)
    assert per_slice[0, 1, 1, 0] == 1.0 and per_slice[0, 0, 0, 1] == 1.0
    assert whole[0, 1, 1, 0] == 0.25 and whole[0, 0, 0, 1] == 1.0
    # slicing along axis 0 treats rows as slices: row 1 holds only the 2.0, row 0 only the 8.0
    rows = NormalizeMap("signed", slice_axis=0)(vol)
    assert rows[0, 1, 1, 0] == 1.0 and rows[0, 0, 0, 1] == 1.0


def test_normalize_constant_and_negative_units_become_zero():
    vol = torch.stack([torch.full((4, 4), 3.0), -torch.rand(4, 4), torch.zeros(4, 4)], -1)[None]
    for mode in ("signed", "abs", "minmax"):
        out = NormalizeMap(mode)(vol)
        assert not torch.isnan(out).any()
        assert out[..., 0].abs().sum() == 0  # constant slice: no localisation
        assert out[..., 2].abs().sum() == 0
    assert NormalizeMap("signed")(vol)[..., 1].abs().sum() == 0  # nothing positive
    assert NormalizeMap("abs")(vol)[..., 1].max() == 1.0


def test_normalize_keeps_type_and_meta():
    arr = np.random.default_rng(0).normal(size=(1, 5, 6, 3))
    out = NormalizeMap("abs")(arr)
    assert isinstance(out, np.ndarray) and out.shape == arr.shape and out.max() <= 1.0 and out.min() >= 0.0
    affine = torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0]))
    mt = MetaTensor(torch.as_tensor(arr, dtype=torch.float32), affine=affine)
    out_mt = NormalizeMap("abs")(mt)
    assert isinstance(out_mt, MetaTensor) and torch.equal(out_mt.affine, mt.affine)


# ---------------------------------------------------------------- Otsu


@pytest.mark.parametrize("slice_axis", [-1, 0])
def test_otsu_per_slice_matches_skimage(slice_axis):
    vol = _bimodal_volume()
    mask = OtsuThreshold(slice_axis=slice_axis)(vol)
    arr = vol[0].numpy()
    moved = np.moveaxis(arr, slice_axis, 0)
    moved_mask = np.moveaxis(mask[0].numpy(), slice_axis, 0)
    thresholds = []
    for s, ms in zip(moved, moved_mask):
        t = threshold_otsu(s)
        thresholds.append(t)
        np.testing.assert_array_equal(ms, (s > t).astype(np.float32))
    assert len(set(np.round(thresholds, 6))) > 1  # really one threshold per slice
    np.testing.assert_allclose(OtsuThreshold(slice_axis=slice_axis).thresholds(vol), thresholds)


def test_otsu_whole_volume_differs_from_per_slice():
    vol = _bimodal_volume()
    whole = OtsuThreshold(slice_axis=None)(vol)
    np.testing.assert_array_equal(whole[0].numpy(), (vol[0].numpy() > threshold_otsu(vol[0].numpy())).astype(np.float32))
    assert not torch.equal(whole, OtsuThreshold(slice_axis=-1)(vol))


def test_otsu_inside_body_only():
    vol = _bimodal_volume(shape=(1, 24, 20, 2))
    body = torch.zeros_like(vol)
    body[:, 2:20, 2:18] = 1
    vol[:, 0, :, :] = 50.0  # very bright rim outside the body must not pull the threshold
    mask = OtsuThreshold()(vol, body_mask=body)
    for k in range(2):
        s, b = vol[0, ..., k].numpy(), body[0, ..., k].numpy() > 0
        t = threshold_otsu(s[b])
        np.testing.assert_array_equal(mask[0, ..., k].numpy(), ((s > t) & b).astype(np.float32))
    assert mask[:, 0].sum() == 0


def test_otsu_constant_and_empty_units_give_empty_mask():
    vol = torch.zeros(1, 8, 8, 3)
    vol[..., 1] = 0.7  # constant
    vol[0, 2:5, 2:5, 2] = 1.0  # real content
    thresholder = OtsuThreshold()
    mask = thresholder(vol)
    assert mask[..., 0].sum() == 0 and mask[..., 1].sum() == 0
    assert mask[..., 2].sum() == 9
    thr = thresholder.thresholds(vol)
    assert np.isnan(thr[0]) and np.isnan(thr[1]) and np.isfinite(thr[2])
    # Otsu only: a fixed threshold is MONAI's AsDiscrete, not a mode of this transform
    with pytest.raises(TypeError):
        OtsuThreshold(threshold=0.5)
    # body without any pixel
    assert OtsuThreshold()(vol, body_mask=torch.zeros_like(vol)).sum() == 0


def test_otsu_batch_of_2d_maps_per_slice():
    vol = _bimodal_volume()
    batch = vol[0].permute(2, 0, 1)[:, None]  # (B, 1, H, W)
    per_item = torch.stack([OtsuThreshold()(item) for item in batch])
    vectorised = OtsuThreshold()(batch[:, 0])[:, None]  # the batch as B channels of one 2D item
    assert torch.equal(per_item, vectorised)
    assert torch.equal(per_item[:, 0].permute(1, 2, 0)[None], OtsuThreshold(slice_axis=-1)(vol))


def test_dataset_otsu_is_mean_of_slice_thresholds():
    maps = [_bimodal_volume(seed=s) for s in range(3)]
    maps[1][..., 0] = 0.0  # a slice without contrast must not contribute
    expected = []
    for m in maps:
        for k in range(m.shape[-1]):
            s = m[0, ..., k].numpy()
            if s.max() > s.min():
                expected.append(threshold_otsu(s))
    thr = dataset_otsu_threshold(maps, slice_axis=-1)
    assert len(expected) == 14
    assert thr == pytest.approx(np.mean(expected))
    # a batch tensor of 2D maps is an iterable of (C, H, W) items
    batch = maps[0][0].permute(2, 0, 1)[:, None]
    assert dataset_otsu_threshold(batch) == pytest.approx(np.mean(otsu_thresholds(maps[0], slice_axis=-1)))
    # applied as a fixed threshold with MONAI's AsDiscrete
    fixed = AsDiscrete(threshold=thr)(maps[0])
    assert torch.equal(torch.as_tensor(fixed), (maps[0] >= thr).float())


def test_largest_component_per_slice():
    vol = torch.zeros(1, 12, 12, 2)
    vol[0, 1:3, 1:3, 0] = 1.0  # small blob (4 px)
    vol[0, 6:10, 6:10, 0] = 1.0  # large blob (16 px)
    vol[0, 1:4, 1:4, 1] = 1.0  # in slice 1 the other blob is the larger
    vol[0, 8:10, 8:10, 1] = 1.0
    plain = OtsuThreshold()(vol)
    assert plain[..., 0].sum() == 20
    lcc = OtsuThreshold(largest_component=True)(vol)
    assert lcc[..., 0].sum() == 16 and lcc[0, 7, 7, 0] == 1 and lcc[0, 1, 1, 0] == 0
    assert lcc[..., 1].sum() == 9 and lcc[0, 2, 2, 1] == 1
    # the same step for a fixed-threshold mask, per slice, and on the whole volume with slice_axis=None
    assert torch.equal(keep_largest_component(AsDiscrete(threshold=0.5)(vol)), lcc)
    whole = keep_largest_component(plain, slice_axis=None)
    # in 3D the 16 px blob of slice 0 joins the 4 px one of slice 1 (20 voxels) and beats the 4 + 9 pair
    assert whole.sum() == 20 and whole[0, 8, 8, 1] == 1 and whole[0, 2, 2, 1] == 0
    with pytest.raises(ValueError, match="`mask` must be binary"):
        keep_largest_component(vol * 0.5)


def test_dictionary_versions_with_body_and_output_keys():
    vol = _bimodal_volume(shape=(1, 24, 20, 3)) - 0.2
    image = MetaTensor(torch.ones_like(vol), affine=torch.diag(torch.tensor([1.5, 1.5, 2.0, 1.0])))
    image[:, :2] = 0  # outside the body
    data = {"image": image, "map": MetaTensor(vol.clone(), affine=image.affine)}
    out = NormalizeMapd("map", mode="signed", body_key="image")(data)
    out = OtsuThresholdd("map", output_keys="mask", body_key="image")(out)
    assert set(out) == {"image", "map", "mask"}
    assert torch.equal(out["map"], NormalizeMap("signed")(vol, body_mask=image))
    assert torch.equal(out["mask"], OtsuThreshold()(out["map"], body_mask=image))
    assert out["mask"][:, :2].sum() == 0 and out["mask"].sum() > 0
    assert isinstance(out["mask"], MetaTensor) and torch.equal(out["mask"].affine, image.affine)
    assert OtsuThresholdd(["map", "other"], allow_missing_keys=True)(data)["map"].max() == 1.0


# ---------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    vol = _bimodal_volume()
    with pytest.raises(ValueError, match="img"):
        NormalizeMap()(torch.rand(5, 5))
    with pytest.raises(ValueError, match="img"):
        OtsuThreshold()(torch.rand(1, 2, 3, 4, 5))
    nan_map = vol.clone()
    nan_map[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        NormalizeMap()(nan_map)
    with pytest.raises(ValueError, match="NaN"):
        OtsuThreshold()(nan_map)
    with pytest.raises(ValueError, match="mode"):
        NormalizeMap(mode="log")
    with pytest.raises(ValueError, match="slice_axis"):
        OtsuThreshold(slice_axis=3)
    with pytest.raises(ValueError, match="nbins"):
        OtsuThreshold(nbins=1)
    with pytest.raises(ValueError, match="body_mask"):
        OtsuThreshold()(vol, body_mask=torch.ones(1, 24, 20, 4))
    with pytest.raises(ValueError, match="body_key"):
        NormalizeMapd("map", body_key="brain")({"map": vol})
    with pytest.raises(ValueError, match="output_keys"):
        OtsuThresholdd(["a", "b"], output_keys="mask")
    with pytest.raises(ValueError, match="maps"):
        dataset_otsu_threshold([])
    with pytest.raises(ValueError, match="contrast"):
        dataset_otsu_threshold([torch.zeros(1, 4, 4)])
    with pytest.raises(ValueError, match="body_masks"):
        dataset_otsu_threshold([vol, vol], body_masks=[None])


def test_copy_meta_from_source_and_writer_errors(tmp_path):
    image = MetaTensor(torch.rand(1, 6, 7, 8), affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])))
    out = CopyMetaFromd(["map"], source_key="image")({"image": image, "map": np.zeros((1, 6, 7, 8))})
    assert isinstance(out["map"], MetaTensor) and torch.equal(out["map"].affine, image.affine)
    with pytest.raises(ValueError, match="map"):
        CopyMetaFromd(["map"])({"image": image, "map": torch.zeros(1, 6, 7, 9)})
    with pytest.raises(ValueError, match="source_key"):
        CopyMetaFromd(["map"])({"image": torch.rand(1, 6, 7, 8), "map": torch.zeros(1, 6, 7, 8)})
    with pytest.raises(ValueError, match="source_key"):
        CopyMetaFromd(["map"])({"map": torch.zeros(1, 6, 7, 8)})
    with pytest.raises(ValueError, match="nothing to write"):
        map_writer(tmp_path, map_key=None, mask_key=None)


def test_mask_of_map_is_otsu_per_slice_or_a_fixed_threshold_inside_the_body():
    from monai_wsss.transforms import OtsuThreshold, mask_of_map

    torch.manual_seed(0)
    values = torch.rand(1, 8, 8, 3)
    body = torch.ones_like(values)
    body[..., :2, :, :] = 0
    fixed = mask_of_map(values, body, 0.5, slice_axis=-1)
    assert torch.equal(fixed, ((values >= 0.5) & (body != 0)).to(fixed.dtype))  # AsDiscrete's >=, never outside
    otsu = mask_of_map(values, body, "otsu", slice_axis=-1)
    assert torch.equal(otsu.bool(), torch.as_tensor(OtsuThreshold(slice_axis=-1)(values, body_mask=body)).bool())
    largest = mask_of_map(values, body, 0.5, slice_axis=-1, largest_component=True)
    assert largest.sum() <= fixed.sum() and not (largest.bool() & ~fixed.bool()).any()
