"""Issue 17: scans as they come. Any axis order gives the same world-space mask; a bad scan never sinks a batch and a
rerun retries only it; a refused run does not block the next; a folder in use is locked; masks without maps; user
errors in one line. The bundles' default segmenter (committed weights) on small synthetic BraTS-layout volumes."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from conftest import BUNDLES, REPO
from forked_cli import run_module, start_script
from monai_wsss.apps import FailedVolumesError, RunFolder, RunFolderError
from monai_wsss.apps.run_folder import LOCK_NAME, MANIFEST_NAME
from monai_wsss.bundle import method_config_files
from monai_wsss.data import FailSafeDataset, make_synthetic_dataset, volume_preprocess, volume_to_slices
from monai_wsss.utils import TEMP_PREFIX, describe_error, install_one_line_errors, root_error

SHAPE = (40, 36, 12)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("scans") / "brats", num_cases=3, shape=SHAPE, seed=3)


def run_segmenter(output_dir, method: str = "segmenter", **overrides) -> ConfigWorkflow:
    """The bundle's inference.json (and a method override) as `monai.bundle run` runs it, with small components."""
    overrides = {"progress": False, "min_component_size": 5, **overrides}
    workflow = ConfigWorkflow(
        config_file=method_config_files(BUNDLES["brats"], method), logging_file=False, workflow_type="infer",
        output_dir=str(output_dir), **overrides,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow


def stored_as(src: str, dst: Path, perm: tuple[int, int, int], flips: tuple[int, ...] = ()) -> Path:
    """The same image in world space, stored with its array axes permuted (then flipped) and the affine to match."""
    img = nib.load(src)
    arr, aff = np.transpose(np.asanyarray(img.dataobj), perm), img.affine.copy()
    aff[:, :3] = img.affine[:, list(perm)]
    for ax in flips:
        arr = np.flip(arr, ax)
        aff[:3, 3] += aff[:3, ax] * (arr.shape[ax] - 1)
        aff[:, ax] *= -1
    dst.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(arr), aff), str(dst))
    return dst


def canonical(path: str) -> tuple[np.ndarray, np.ndarray]:
    img = nib.as_closest_canonical(nib.load(path))
    return np.asanyarray(img.dataobj), img.affine


def read_csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


# ---- 1. orientation ---------------------------------------------------------------------------------------------
ORDERS = [((2, 0, 1), ()), ((1, 0, 2), (0,)), ((0, 1, 2), (0, 1)), ((2, 1, 0), (2,))]


def test_a_scan_in_any_axis_order_gets_the_same_world_space_mask(cases, tmp_path):
    source = cases[0]["image"]
    ref = run_segmenter(tmp_path / "as_stored", image=source)
    ref_row = ref.evaluator.state.predictions[0]
    ref_mask, ref_affine = canonical(ref_row["mask"])
    ref_map, _ = canonical(ref_row["map"])
    assert ref_mask.sum() > 0 and ref_map.max() > 0  # a real mask to compare
    for k, (perm, flips) in enumerate(ORDERS):
        image = stored_as(source, tmp_path / f"order{k}" / "case_flair.nii.gz", perm, flips)
        row = run_segmenter(tmp_path / f"out{k}", image=str(image)).evaluator.state.predictions[0]
        for key in ("map", "mask"):  # written in the scan's own array order and affine
            out, stored = nib.load(row[key]), nib.load(str(image))
            assert out.shape == stored.shape
            np.testing.assert_allclose(out.affine, stored.affine, atol=1e-5)
        mask, affine = canonical(row["mask"])
        np.testing.assert_allclose(affine, ref_affine, atol=1e-5)
        np.testing.assert_array_equal(mask, ref_mask)
        np.testing.assert_allclose(canonical(row["map"])[0], ref_map, atol=1e-6)
        assert row["orientation"] == "".join(nib.aff2axcodes(nib.load(str(image)).affine))


def test_training_slices_do_not_depend_on_the_axis_order(cases, tmp_path):
    item = cases[1]
    permuted = {
        "image": str(stored_as(item["image"], tmp_path / "p" / "img.nii.gz", (2, 0, 1), (1,))),
        "seg": str(stored_as(item["seg"], tmp_path / "p" / "seg.nii.gz", (2, 0, 1), (1,))),
    }
    a = volume_preprocess("brats")({"image": item["image"], "seg": item["seg"]})
    b = volume_preprocess("brats")(permuted)
    torch.testing.assert_close(a["image"].as_tensor(), b["image"].as_tensor())
    torch.testing.assert_close(a["seg"].as_tensor(), b["seg"].as_tensor())
    slices_a = volume_to_slices("brats", (16, 16))({**item, "case": "x"})
    slices_b = volume_to_slices("brats", (16, 16))({**permuted, "case": "x"})
    assert [s["label"] for s in slices_a] == [s["label"] for s in slices_b]
    assert any(s["label"] == 1 for s in slices_a)


# ---- 2. one bad scan does not sink the batch ----------------------------------------------------------------------
def _folder_with_one_zero_scan(cases, root: Path) -> tuple[Path, Path]:
    folder = root / "data"
    for item in cases:
        case = Path(item["image"]).parent.name
        (folder / case).mkdir(parents=True)
        for key in ("image", "seg"):
            shutil.copy(item[key], folder / case / Path(item[key]).name)
    bad = folder / Path(cases[1]["image"]).parent.name / Path(cases[1]["image"]).name
    src = nib.load(cases[1]["image"])
    nib.save(nib.Nifti1Image(np.zeros(src.shape, np.int16), src.affine), str(bad))
    return folder, bad


def test_a_bad_scan_is_listed_and_the_others_are_segmented_then_a_rerun_retries_only_it(cases, tmp_path):
    folder, bad = _folder_with_one_zero_scan(cases, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError) as err:
        run_segmenter(out, dataset_dir=str(folder))
    failure = root_error(err.value)
    assert isinstance(failure, FailedVolumesError) and "1 of 3 volumes" in str(failure) and bad.parent.name in str(failure)
    rows = read_csv(out / "predictions.csv")
    assert [bool(r["error"]) for r in rows] == [False, True, False]
    assert "no voxel besides its background" in rows[1]["error"] and not rows[1]["mask"]
    for row in (rows[0], rows[2]):
        assert Path(row["mask"]).is_file() and Path(row["map"]).is_file()
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert list(manifest["failed"]) == [bad.parent.name]
    kept = {r["case"]: Path(r["map"]).stat().st_mtime_ns for r in (rows[0], rows[2])}
    # the scan is fixed in place: the rerun computes it alone and keeps the others
    shutil.copy(cases[1]["image"], bad)
    workflow = run_segmenter(out, dataset_dir=str(folder))
    assert len(workflow.evaluator.data_loader.dataset) == 1
    rows = read_csv(out / "predictions.csv")
    assert all(not r.get("error") and Path(r["mask"]).is_file() for r in rows)
    assert {r["case"]: Path(r["map"]).stat().st_mtime_ns for r in rows if r["case"] in kept} == kept
    assert "failed" not in json.loads((out / MANIFEST_NAME).read_text())


def test_fail_safe_dataset_returns_the_reason_and_can_be_strict(cases, tmp_path):
    bad = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int16), np.eye(4)), str(bad))
    items = [{"case": "flat", "image": str(bad), "output_name": "flat"}, {"case": "ok", "image": cases[0]["image"]}]
    dataset = FailSafeDataset(items, transform=volume_preprocess("brats"))
    assert dataset[0] == {**items[0], "failed": dataset[0]["failed"]} and "expected a 3D volume" in dataset[0]["failed"]
    assert "failed" not in dataset[1] and dataset[1]["image"].ndim == 4
    with pytest.raises(ValueError, match="expected a 3D volume"):
        FailSafeDataset(items, transform=volume_preprocess("brats"), fail_safe=False)[0]


# ---- 3. run folders -------------------------------------------------------------------------------------------------
def test_a_refused_run_does_not_block_the_next_one(cases, tmp_path):
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.int16), np.eye(4)), str(flat))
    out = tmp_path / "out"
    with pytest.raises(RuntimeError) as err:
        run_segmenter(out, image=str(flat))
    assert "expected a 3D volume" in str(root_error(err.value))
    assert (out / MANIFEST_NAME).is_file()  # the failure is on record ...
    workflow = run_segmenter(out, image=cases[0]["image"])  # ... and does not make the folder another run's
    rows = workflow.evaluator.state.predictions
    assert len(rows) == 1 and Path(rows[0]["mask"]).is_file()
    assert sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME) == sorted(
        [MANIFEST_NAME, "predictions.csv", Path(rows[0]["map"]).name, Path(rows[0]["mask"]).name]
    )


def test_a_folder_in_use_is_refused_without_touching_the_running_runs_files(cases, tmp_path):
    first = RunFolder(tmp_path, [{"case": "a", "image": cases[0]["image"]}], {"method": "x"}).open()
    writing = tmp_path / f"{TEMP_PREFIX}0123abcd-a_map.nii.gz"  # the first run's file being written
    writing.write_bytes(b"half")
    for attempt in range(3):
        second = RunFolder(tmp_path, [{"case": "b", "image": cases[1]["image"]}], {"method": "y"}, overwrite=True)
        with pytest.raises(RunFolderError, match="in use by another run"):
            second.open()
        assert writing.read_bytes() == b"half"
        assert json.loads((tmp_path / MANIFEST_NAME).read_text())["settings"] == {"method": "x"}
    first.close()
    second.open()  # free again: the new owner clears the stale temporary
    assert not writing.exists()
    second.close()


def test_a_killed_run_does_not_leave_its_folder_locked(cases, tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time
        from monai_wsss.apps import RunFolder
        folder = RunFolder({str(tmp_path)!r}, [{{"case": "a", "image": {cases[0]["image"]!r}}}], {{"m": 1}}).open()
        print("open", flush=True)
        time.sleep(60)
        """
    )
    (tmp_path / "holds_the_lock.py").write_text(script)
    proc = start_script(tmp_path / "holds_the_lock.py", [], cwd=REPO, output_dir=tmp_path / "holder")  # forked_cli.py
    try:
        assert proc.first_line().strip() == "open", proc.output()[1][-2000:]
        folder = RunFolder(tmp_path, [{"case": "a", "image": cases[0]["image"]}], {"m": 1})
        with pytest.raises(RunFolderError, match="in use"):
            folder.open()
    finally:
        proc.kill()  # SIGKILL
        proc.wait(timeout=30)
    folder.open()  # the OS released the dead run's lock
    assert folder.opened and not folder.resumed  # the dead run wrote nothing: a new run
    folder.close()


# ---- 4 / 5. options and messages --------------------------------------------------------------------------------
def test_masks_without_maps(cases, tmp_path):
    out = tmp_path / "masks_only"
    run_segmenter(out, image=cases[0]["image"], write_map=False)
    assert [p.name for p in out.glob("*.nii.gz")] == [Path(cases[0]["image"]).name.replace(".nii.gz", "_mask.nii.gz")]
    assert "map" not in read_csv(out / "predictions.csv")[0]
    again = run_segmenter(out, image=cases[0]["image"], write_map=False)  # resumed: the mask is the volume's result
    assert len(again.evaluator.data_loader.dataset) == 0 and again.evaluator.state.predictions[0]["mask"]
    with pytest.raises(RuntimeError) as err:  # a method thresholding its maps at the end of the run needs them
        run_segmenter(tmp_path / "cdm", method="cdm", image=cases[0]["image"], write_map=False)
    assert "--write_map false" in str(root_error(err.value))


def test_user_errors_print_in_one_line_and_bugs_keep_their_traceback(capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(sys, "excepthook", lambda *a: calls.append(a))
    install_one_line_errors()
    try:
        try:
            raise ValueError("--threshold 1.5: outside [0, 1]")
        except ValueError as inner:
            raise RuntimeError("Failed to evaluate ConfigExpression") from inner
    except RuntimeError as wrapped:
        err = wrapped
    monkeypatch.delenv("MONAI_WSSS_TRACEBACK", raising=False)
    sys.excepthook(type(err), err, err.__traceback__)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "error: ValueError: --threshold 1.5: outside [0, 1]" and len(lines) == 2 and not calls
    assert describe_error(err) == "ValueError: --threshold 1.5: outside [0, 1]"
    monkeypatch.setenv("MONAI_WSSS_TRACEBACK", "1")
    sys.excepthook(type(err), err, err.__traceback__)
    bug = KeyError("x")
    monkeypatch.delenv("MONAI_WSSS_TRACEBACK")
    sys.excepthook(KeyError, bug, None)
    assert [c[1] for c in calls] == [err, bug]  # the previous hook prints those tracebacks


def test_the_command_line_run_with_a_bad_scan_exits_non_zero_in_two_lines(cases, tmp_path):
    folder, bad = _folder_with_one_zero_scan(cases, tmp_path)
    cmd = [
        "run", "--config_file", str(BUNDLES["brats"] / "configs" / "inference.json"),
        "--dataset_dir", str(folder), "--output_dir", str(tmp_path / "out"), "--progress", "false",
        "--min_component_size", "5",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MONAI_WSSS_TRACEBACK", None)
    proc = run_module("monai.bundle", cmd, env=env)
    assert proc.returncode != 0
    tail = proc.stderr.strip().splitlines()[-2:]
    assert tail[0].startswith("error: FailedVolumesError: 1 of 3 volumes") and bad.parent.name in tail[0]
    assert "Traceback" not in proc.stderr
    assert len(read_csv(tmp_path / "out" / "predictions.csv")) == 3


def test_a_rerun_with_every_map_written_still_makes_the_masks(cases, tmp_path):
    """Killed after the last map, before the dataset-level masks: nothing is left to infer, the run's end still runs."""
    out = tmp_path / "out"
    first = run_segmenter(out, method="threshold", image=cases[0]["image"], spatial_size=[16, 16])
    mask = Path(first.evaluator.state.predictions[0]["mask"])
    mask.unlink()
    (out / "predictions.csv").unlink()
    again = run_segmenter(out, method="threshold", image=cases[0]["image"], spatial_size=[16, 16])
    assert len(again.evaluator.data_loader.dataset) == 0
    assert mask.is_file() and len(read_csv(out / "predictions.csv")) == 1


def test_a_component_size_no_component_can_reach_is_refused_before_any_compute(cases, tmp_path):
    with pytest.raises(RuntimeError) as err:
        run_segmenter(tmp_path / "out", image=cases[0]["image"], min_component_size=int(np.prod(SHAPE)))
    assert "--min_component_size" in str(root_error(err.value)) and "voxels" in str(root_error(err.value))
    assert not (tmp_path / "out").exists()  # refused before the run folder was even opened


def test_precision_says_what_it_chose_and_why(caplog, monkeypatch):
    import monai_wsss.networks.precision as precision

    net = torch.nn.Conv2d(1, 1, 3)
    for native, expected, level in ((False, "runs in float32", "INFO"), (True, "bfloat16 autocast", "INFO")):
        monkeypatch.setattr(precision, "native_bfloat16", lambda device, native=native: native)
        caplog.clear()
        with caplog.at_level("INFO", logger="monai_wsss.networks.precision"):
            out = precision.with_precision(net, "auto")
        assert isinstance(out, precision.AutocastNetwork) == native
        assert [(r.levelname, expected in r.getMessage()) for r in caplog.records] == [(level, True)]
    monkeypatch.setattr(precision, "native_bfloat16", lambda device: False)
    caplog.clear()
    with caplog.at_level("INFO", logger="monai_wsss.networks.precision"):
        precision.with_precision(torch.nn.Conv2d(1, 1, 3), "bfloat16")
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "emulated" in caplog.records[0].getMessage()
