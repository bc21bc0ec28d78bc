"""A datalist whose references are the pseudo-masks: evaluate.json scores a setting from the labels alone."""

import shutil

import nibabel as nib
import numpy as np
import pytest

from monai_wsss.bundle import prepare_splits, pseudo_mask_datalist
from monai_wsss.data import load_datalist, make_synthetic_dataset


def test_validation_scans_get_their_pseudo_masks_as_references(tmp_path):
    data = tmp_path / "data"
    make_synthetic_dataset(data, num_cases=5, shape=(32, 32, 6), seed=2)
    datalist = tmp_path / "datalist.json"
    splits = prepare_splits(data, "brats", 0.2, 0.2, 0, datalist)
    pseudo = tmp_path / "pm"
    pseudo.mkdir()
    for item in splits["validation"]:
        shutil.copy(item["seg"], pseudo / f"{item['case']}_pseudo.nii.gz")
    out = tmp_path / "val_pseudo.json"
    result = pseudo_mask_datalist(datalist, pseudo, out)
    assert list(result) == ["validation"]  # only the split scored; the test masks are not carried along
    assert [it["case"] for it in result["validation"]] == [it["case"] for it in splits["validation"]]
    for item, original in zip(result["validation"], splits["validation"]):
        assert item["seg"] == str(pseudo / f"{item['case']}_pseudo.nii.gz") != original["seg"]
        assert item["image"] == original["image"]
    assert load_datalist(out)["validation"] == result["validation"]  # what evaluate.json's --dataset_dir reads
    with pytest.raises(ValueError, match="no 'test' scans"):
        pseudo_mask_datalist({"test": []}, pseudo, split="test")
    missing = splits["validation"][0]["case"]
    (pseudo / f"{missing}_pseudo.nii.gz").unlink()
    with pytest.raises(ValueError, match=f"{missing}_pseudo.nii.gz"):
        pseudo_mask_datalist(datalist, pseudo)


def test_chaos_references_carry_the_kidney_label_evaluation_maps_to_the_target(tmp_path):
    from monai_wsss.data import TASKS
    from monai_wsss.transforms import MapTargetLabels

    pseudo = tmp_path / "pm"
    pseudo.mkdir()
    mask = np.zeros((8, 8, 4), np.uint8)
    mask[2:5, 3:6, 1] = 1
    nib.save(nib.Nifti1Image(mask, np.eye(4)), pseudo / "7_pseudo.nii.gz")
    splits = {"validation": [{"case": "7", "image": "7.nii.gz", "seg": "7_ground_truth.nii.gz"}]}
    with pytest.raises(ValueError, match="reference_dir"):
        pseudo_mask_datalist(splits, pseudo, task="chaos")
    out = pseudo_mask_datalist(splits, pseudo, task="chaos", reference_dir=tmp_path / "refs")
    ref = np.asarray(nib.load(out["validation"][0]["seg"]).dataobj)
    preset = TASKS["chaos"]
    mapped = MapTargetLabels(preset.target_labels, preset.allowed_labels)(ref[None])
    assert np.array_equal(np.asarray(mapped)[0] > 0, mask > 0)  # the 0/1 pseudo-mask (1 = liver there) stays the target
    assert (tmp_path / "refs" / "7_pseudo.nii.gz").is_file() and not list((tmp_path / "refs").glob(".tmp-*"))
    assert np.allclose(nib.load(out["validation"][0]["seg"]).affine, np.eye(4))  # in the pseudo-mask's space
