"""A datalist whose references are the pseudo-masks: evaluate.json scores a setting from the labels alone."""

import shutil

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
