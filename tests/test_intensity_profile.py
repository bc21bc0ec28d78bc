"""The intensity profile of a model's training scans, and the inference's warning for a scan unlike all of them."""

from __future__ import annotations

import json
import logging

import nibabel as nib
import numpy as np
import pytest

from monai_wsss.data import (
    PROFILE_STATISTIC,
    body_percentile,
    load_intensity_profile,
    make_synthetic_dataset,
    volume_preprocess,
    write_intensity_profile,
)
from monai_wsss.transforms import CheckIntensityProfiled


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    root = tmp_path_factory.mktemp("profile")
    items = make_synthetic_dataset(root / "data", num_cases=5, shape=(48, 48, 12), seed=0)
    return root, items


def test_the_profile_records_each_training_scan_and_its_range(scans):
    root, items = scans
    path = write_intensity_profile(items[:4], "brats", root / "models" / "intensity_profile.json")
    profile = load_intensity_profile(path)
    assert profile["statistic"] == PROFILE_STATISTIC and profile["num_scans"] == 4
    assert sorted(profile["values"]) == sorted(it["case"] for it in items[:4])
    assert profile["low"] == min(profile["values"].values()) and profile["high"] == max(profile["values"].values())
    assert not list(path.parent.glob(".tmp-*"))  # written under a temporary name, renamed into place
    # the values are the preprocessed scans' 90th body percentile (only the image is read)
    first = volume_preprocess("brats")({"image": items[0]["image"]})["image"]
    assert profile["values"][items[0]["case"]] == pytest.approx(body_percentile(first))


@pytest.mark.parametrize(
    "content, words",
    [
        ("not json", "is not JSON"),
        (json.dumps({"statistic": "mean", "low": 0.3, "high": 0.5}), "'statistic' must be"),
        (json.dumps({"low": 0.6, "high": 0.5}), "'low' 0.6 is above 'high'"),
        (json.dumps({"low": 0.3, "high": 1.5}), "'high' must be a number in (0, 1]"),
        (json.dumps({"high": 0.5}), "'low' must be a number"),
    ],
)
def test_a_broken_profile_is_refused_naming_the_file_and_key(tmp_path, content, words):
    path = tmp_path / "intensity_profile.json"
    path.write_text(content)
    with pytest.raises(ValueError) as err:
        load_intensity_profile(path)
    assert str(path) in str(err.value) and words in str(err.value)
    with pytest.raises(FileNotFoundError, match="intensity_profile null"):
        load_intensity_profile(tmp_path / "missing.json")


def test_a_scan_with_a_large_bright_structure_is_flagged_and_a_usual_one_is_not(scans, caplog):
    root, items = scans
    path = write_intensity_profile(items[:4], "brats", root / "check" / "intensity_profile.json")
    preprocess = volume_preprocess("brats")
    check = CheckIntensityProfiled("image", profile=path)
    # a held-out scan made the same way as the training scans
    with caplog.at_level(logging.WARNING, logger="monai_wsss.transforms.validation"):
        usual = check(preprocess({"image": items[4]["image"]}))
    assert "unlike any it was trained on" not in caplog.text and "intensity_warning" not in usual["image"].meta
    # the same scan with a homogeneous structure three times as bright as anything in it, on 5 % of the body: the
    # normalisation's upper percentile lands inside it and the rest of the scan at a third of its usual intensity
    img = nib.load(items[4]["image"])
    data = np.asarray(img.dataobj).astype(np.float32)
    body = np.argwhere(data > 0)
    bright = body[np.random.default_rng(0).permutation(len(body))[: len(body) // 20]]
    data[tuple(bright.T)] = 3 * data.max()
    odd = root / "odd_flair.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), str(odd))
    with caplog.at_level(logging.WARNING, logger="monai_wsss.transforms.validation"):
        flagged = check(preprocess({"image": str(odd)}))
    assert "odd_flair.nii.gz" in caplog.text and "below the" in caplog.text and "training scans" in caplog.text
    assert "check its mask" in flagged["image"].meta["intensity_warning"]
    # the check only reads: the image is the normalised one, unchanged
    assert np.array_equal(np.asarray(flagged["image"]), np.asarray(preprocess({"image": str(odd)})["image"]))


def test_no_profile_means_no_check_and_a_bad_tolerance_is_refused(scans):
    root, items = scans
    data = volume_preprocess("brats")({"image": items[0]["image"]})
    assert CheckIntensityProfiled("image", profile=None)(data)["image"] is data["image"]
    with pytest.raises(ValueError, match="tolerance"):
        CheckIntensityProfiled("image", profile={"low": 0.3, "high": 0.6}, tolerance=-1)
