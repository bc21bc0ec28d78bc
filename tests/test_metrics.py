"""Segmentation scores (per positive slice / per volume) and AUROC/AUPRC, against hand-computed values."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from monai_wsss.metrics import PixelAUCMetric, SegmentationScores, SliceAUCMetric, compute_auroc_auprc
from monai_wsss.metrics import auc as auc_module


def _case_volume() -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 1, 9, 9, 4) prediction / ground truth with one slice of each kind.

    slice 0: both empty (negative).      slice 1: prediction only, 2 px (negative with a false alarm).
    slice 2: gt 3x3 square, prediction the same square shifted 2 columns right:
             overlap 3 px -> Dice 2*3/18 = 1/3, IoU 3/15 = 0.2; boundary distances (8 edge px each way)
             are 0,0,0 (shared column), 1,1 (middle column, top/bottom) and 2,2,2 (far column) -> HD95 = 2 px.
    slice 3: gt 4 px, prediction empty -> Dice 0, IoU 0, HD95 missing.
    """
    pred = torch.zeros(1, 1, 9, 9, 4)
    gt = torch.zeros(1, 1, 9, 9, 4)
    pred[0, 0, 0, 0:2, 1] = 1
    gt[0, 0, 2:5, 2:5, 2] = 1
    pred[0, 0, 2:5, 4:7, 2] = 1
    gt[0, 0, 6:8, 6:8, 3] = 1
    return pred, gt


def test_per_positive_slice_scores_by_hand():
    pred, gt = _case_volume()
    scores = SegmentationScores(level="slice", slice_axis=-1, spacing=(1.5, 0.5, 3.0))
    scores(pred, gt)
    agg = scores.aggregate()
    assert agg["num_scored"] == 2 and agg["num_negative"] == 2
    assert agg["num_negative_with_prediction"] == 1
    assert agg["num_hd95_missing"] == 1
    assert agg["dice"] == pytest.approx((1 / 3 + 0.0) / 2)
    assert agg["iou"] == pytest.approx((0.2 + 0.0) / 2)
    # the empty prediction is missing, not 0: averaging a 0 in would give 1.0
    assert agg["hd95"] == pytest.approx(2.0)
    # the shift is along the second in-plane axis (0.5 mm): 2 px -> 1 mm; the slice spacing (3 mm) is unused
    assert agg["hd95_mm"] == pytest.approx(1.0)
    per_slice = scores.get_scores()
    assert per_slice["dice"].tolist() == pytest.approx([1 / 3, 0.0])
    assert per_slice["pred_empty"].tolist() == [False, True]
    assert math.isnan(per_slice["hd95"][1])


def test_slice_axis_and_2d_batches_agree():
    pred, gt = _case_volume()
    reference = SegmentationScores(level="slice", slice_axis=-1)
    reference(pred, gt)
    moved = SegmentationScores(level="slice", slice_axis=0)
    moved(pred.movedim(-1, 2), gt.movedim(-1, 2))
    batch2d = SegmentationScores(level="slice")
    batch2d(pred[0].permute(3, 0, 1, 2), gt[0].permute(3, 0, 1, 2))  # (4, 1, 9, 9)
    a, b, c = reference.aggregate(), moved.aggregate(), batch2d.aggregate()
    for key in ("dice", "iou", "hd95", "num_scored", "num_hd95_missing", "num_negative"):
        assert a[key] == pytest.approx(b[key]) and a[key] == pytest.approx(c[key])


def test_per_volume_scores_by_hand_and_accumulation():
    pred, gt = _case_volume()
    scores = SegmentationScores(level="volume")
    scores(pred, gt)
    # |p| = 2 + 9 = 11, |g| = 9 + 4 = 13, overlap 3 -> Dice 6/24, IoU 3/21
    first = scores.aggregate()
    assert first["dice"] == pytest.approx(0.25) and first["iou"] == pytest.approx(1 / 7)
    assert first["num_scored"] == 1 and first["num_hd95_missing"] == 0 and np.isfinite(first["hd95"])
    # second call: a perfect volume and an empty-gt volume; means accumulate over calls
    perfect = torch.zeros(2, 1, 9, 9, 4)
    perfect[0, 0, 3:6, 3:6, 1:3] = 1
    scores(perfect, torch.cat([perfect[:1], torch.zeros(1, 1, 9, 9, 4)]))
    agg = scores.aggregate()
    assert agg["num_scored"] == 2 and agg["num_negative"] == 1 and agg["num_negative_with_prediction"] == 0
    assert agg["dice"] == pytest.approx((0.25 + 1.0) / 2)
    assert agg["hd95"] == pytest.approx(first["hd95"] / 2)  # the perfect volume has HD95 0
    scores.reset()
    assert scores.aggregate()["num_scored"] == 0


def test_hd95_mm_uses_per_item_spacing():
    pred, gt = _case_volume()
    scores = SegmentationScores(level="slice")
    both_pred, both_gt = torch.cat([pred, pred]), torch.cat([gt, gt])
    scores(both_pred, both_gt, spacing=[(1.0, 1.0, 1.0), (1.0, 2.0, 1.0)])
    per_slice = scores.get_scores()["hd95_mm"]
    assert per_slice[0] == pytest.approx(2.0) and per_slice[2] == pytest.approx(4.0)
    assert SegmentationScores()._compute_tensor(pred, gt)[:, 4].isnan().all()  # no spacing: mm missing


def _reference_hd95(a: np.ndarray, b: np.ndarray) -> float:
    """Independent symmetric HD95 between mask boundaries (erosion edges, Euclidean EDT, linear percentile)."""
    edge_a = a ^ ndimage.binary_erosion(a)
    edge_b = b ^ ndimage.binary_erosion(b)
    d_ab = ndimage.distance_transform_edt(~edge_b)[edge_a]
    d_ba = ndimage.distance_transform_edt(~edge_a)[edge_b]
    return max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))


def test_hd95_against_independent_reference_with_outlier():
    rng = np.random.default_rng(3)
    gt = np.zeros((40, 40), bool)
    gt[10:25, 12:30] = True
    pred = ndimage.binary_dilation(gt, iterations=1) & (rng.random((40, 40)) > 0.1)
    pred[38, 1] = True  # far outlier: HD max is large, HD95 is not
    scores = SegmentationScores(level="slice")
    scores(torch.as_tensor(pred)[None, None].float(), torch.as_tensor(gt)[None, None].float())
    hd95 = scores.aggregate()["hd95"]
    assert hd95 == pytest.approx(_reference_hd95(pred, gt), rel=1e-5)
    assert hd95 < 10


def test_segmentation_scores_bad_inputs():
    pred, gt = _case_volume()
    with pytest.raises(ValueError, match="level"):
        SegmentationScores(level="patient")
    with pytest.raises(ValueError, match="same shape"):
        SegmentationScores()(pred, gt[..., :3])
    with pytest.raises(ValueError, match="y_pred"):
        SegmentationScores()(pred * 0.5, gt)
    with pytest.raises(ValueError, match="`y`"):
        SegmentationScores()(pred, gt * 2)
    with pytest.raises(ValueError, match="y_pred"):
        SegmentationScores(level="volume")(pred[..., 0], gt[..., 0])
    with pytest.raises(ValueError, match="y_pred"):
        SegmentationScores()(pred[0], gt[0])
    with pytest.raises(ValueError, match="channel"):
        SegmentationScores()(torch.cat([pred, pred], 1), torch.cat([gt, gt], 1))
    with pytest.raises(ValueError, match="spacing"):
        SegmentationScores(spacing=(1.0, 1.0))(pred, gt)
    with pytest.raises(ValueError, match="spacing"):
        SegmentationScores()(pred, gt, spacing=[(1.0, 1.0, 1.0)] * 2)
    with pytest.raises(ValueError, match="slice_axis"):
        SegmentationScores(slice_axis=4)


# ---------------------------------------------------------------- AUROC / AUPRC


def test_auroc_auprc_by_hand():
    # ranking 0.8(+) 0.4(-) 0.35(+) 0.1(-): 3 of 4 positive-negative pairs ordered -> AUROC 0.75;
    # precision 1 at recall 0.5, 2/3 at recall 1 -> AP = 0.5 * 1 + 0.5 * 2/3
    out = compute_auroc_auprc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
    assert out["auroc"] == pytest.approx(0.75) and out["auprc"] == pytest.approx(5 / 6)


def test_auc_monai_fallback_matches_sklearn(monkeypatch):
    rng = np.random.default_rng(0)
    scores = torch.as_tensor(np.round(rng.random(300), 1))  # many ties
    labels = torch.as_tensor(rng.random(300) < scores.numpy())
    with_sklearn = compute_auroc_auprc(scores, labels)
    monkeypatch.setattr(auc_module, "_has_sklearn", False)
    with_monai = compute_auroc_auprc(scores, labels)
    assert with_monai["auroc"] == pytest.approx(with_sklearn["auroc"])
    assert with_monai["auprc"] == pytest.approx(with_sklearn["auprc"])
    assert 0.6 < with_sklearn["auroc"] < 1.0


def test_auc_single_class_is_nan_with_warning():
    with pytest.warns(UserWarning, match="one class"):
        out = compute_auroc_auprc(torch.rand(5), torch.zeros(5))
    assert math.isnan(out["auroc"]) and math.isnan(out["auprc"])


def test_pixel_auc_accumulates_inside_body():
    gt = torch.zeros(2, 1, 4, 4)
    gt[:, :, 1:3, 1:3] = 1
    amap = gt * 0.6 + 0.2  # separates perfectly inside the body
    amap[0, 0, 0, 0] = 0.9  # a bright negative pixel, outside the body below
    body = torch.ones_like(gt)
    body[0, 0, 0, 0] = 0
    metric = PixelAUCMetric()
    metric(amap[:1], gt[:1], body_mask=body[:1])
    metric(amap[1:], gt[1:], body_mask=body[1:])
    out = metric.aggregate()
    assert out["auroc"] == pytest.approx(1.0) and out["num_pixels"] == 31 and out["num_positive"] == 8
    without_body = PixelAUCMetric()
    without_body(amap, gt)
    # the bright negative now outranks all 8 positives: AUROC = 1 - 8 / (8 * 24)
    assert without_body.aggregate()["auroc"] == pytest.approx(1 - 1 / 24)
    with pytest.raises(ValueError, match="same shape"):
        PixelAUCMetric()(amap, gt[..., :3])
    with pytest.raises(ValueError, match="`y`"):
        PixelAUCMetric()(amap, gt * 3)
    with pytest.raises(ValueError, match="body_mask"):
        PixelAUCMetric()(amap, gt, body_mask=torch.ones(2, 1, 4, 5))
    with pytest.raises(ValueError, match="before any data"):
        PixelAUCMetric().aggregate()


def test_slice_auc_of_map_max_by_hand():
    # slice maxima 0.9(+) 0.6(-) 0.5(-) 0.55(+): 3 of 4 pairs ordered -> 0.75
    maxima = [0.9, 0.6, 0.5, 0.55]
    labels = [1, 0, 0, 1]
    amap = torch.zeros(1, 1, 5, 5, 5)
    gt = torch.zeros(1, 1, 5, 5, 5)
    for k, (m, y) in enumerate(zip(maxima, labels)):
        amap[0, 0, k, k, k] = m
        amap[0, 0, 0, 4, k] = m / 3  # lower values do not matter
        gt[0, 0, 2, 2, k] = y
    body = torch.ones_like(amap)
    body[..., 4] = 0  # slice 4 has no body: left out
    metric = SliceAUCMetric(slice_axis=-1)
    metric(amap, gt, body_mask=body)
    out = metric.aggregate()
    assert out["num_slices"] == 4 and out["num_positive"] == 2
    assert out["auroc"] == pytest.approx(0.75)
    # ranked 0.9(+) 0.6(-) 0.55(+): precision 1 at recall 0.5, 2/3 at recall 1
    assert out["auprc"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # the same slices as a 2D batch with slice labels
    batch = SliceAUCMetric()
    batch(amap[0, :, :, :, :4].permute(3, 0, 1, 2), torch.tensor(labels))
    assert batch.aggregate()["auroc"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="`y`"):
        SliceAUCMetric()(amap[0, :, :, :, :4].permute(3, 0, 1, 2), torch.tensor([1, 0]))
    nan_map = amap.clone()
    nan_map[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        SliceAUCMetric()(nan_map, gt)
    with pytest.raises(ValueError, match="y_pred"):
        SliceAUCMetric()(amap[0], gt[0])


def test_metrics_emit_no_warnings_for_empty_predictions():
    """Empty predictions are handled before MONAI (which warns, returns nan, and aggregates all-nan to 0)."""
    pred, gt = _case_volume()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SegmentationScores()(pred, gt)


def test_metatensor_inputs_score_like_plain_tensors():
    from monai.data import MetaTensor

    pred, gt = _case_volume()
    plain, meta = SegmentationScores(spacing=1.0), SegmentationScores(spacing=1.0)
    plain(pred, gt)
    meta(MetaTensor(pred), MetaTensor(gt))
    assert plain.aggregate() == pytest.approx(meta.aggregate(), nan_ok=True)


def test_all_empty_predictions_do_not_score_hd95_zero():
    _, gt = _case_volume()
    scores = SegmentationScores()
    scores(torch.zeros_like(gt), gt)
    agg = scores.aggregate()
    # MONAI's HausdorffDistanceMetric(...).aggregate() gives 0.0 here; we report it as missing
    assert math.isnan(agg["hd95"]) and agg["num_hd95_missing"] == agg["num_scored"] == 2
    assert agg["dice"] == 0.0


def test_binary_dice_is_monai_compute_dice_on_one_mask():
    import numpy as np

    from monai_wsss.metrics import binary_dice

    pred = np.zeros((4, 5, 3), bool)
    truth = np.zeros((4, 5, 3), bool)
    pred[:2, :2] = True
    truth[:2, :3] = True
    assert binary_dice(pred, truth) == pytest.approx(2 * 12 / (12 + 18))
    assert binary_dice(torch.as_tensor(pred), torch.as_tensor(truth).float()) == pytest.approx(0.8)
    assert math.isnan(binary_dice(pred, np.zeros_like(truth)))  # Dice undefined without target (MONAI's default)
    assert binary_dice(pred, np.zeros_like(truth), ignore_empty=False) == 0.0
    assert binary_dice(np.zeros_like(pred), np.zeros_like(truth), ignore_empty=False) == 1.0
    with pytest.raises(ValueError, match="same shape"):
        binary_dice(pred, truth[:2])
    with pytest.raises(ValueError, match="`pred` must be binary"):
        binary_dice(pred * 0.5, truth)
