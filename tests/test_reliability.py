"""Issue 9: results that survive a crash (atomic files, one folder per run, unique names) and inputs read strictly
(typed options, unknown keys, body from the data, one-slice and 4D volumes, checks before any compute). One test per
finding of the issue, on tiny synthetic volumes with the intensity-threshold method (no network needed)."""

from __future__ import annotations

import csv
import json
import locale
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from conftest import TINY_UNET
from forked_cli import run_module, start_script
from monai_wsss.apps import MANIFEST_NAME, FailedVolumesError, RunFolderError, VolumeSegmentationPipeline, list_volumes, load_weights
from monai_wsss.apps.run_folder import LOCK_NAME
from monai_wsss.bundle import check_command_line, parse_option
from monai_wsss.data import make_synthetic_dataset
from monai_wsss.data.synthetic import synthetic_brain_volume
from monai_wsss.inferers import ConditionDifferenceInferer, IntensityThresholdInferer, VolumeInferer
from monai_wsss.networks.nets import ConditionalDiffusionUNet
from monai_wsss.transforms import ScaleIntensityNonzeroPercentiles
from monai_wsss.utils import TEMP_PREFIX

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "bundles" / "brats_cdm" / "configs" / "inference.json"
CDM_CONFIGS = [str(CONFIG), str(CONFIG.parent / "inference_cdm.json")]
SHAPE = (32, 32, 8)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    return make_synthetic_dataset(root / "brats", num_cases=3, shape=SHAPE, seed=3)


def pipeline(threshold=0.7, **kwargs) -> VolumeSegmentationPipeline:
    """The intensity baseline on 16 x 16 slices: seconds per run, no network."""
    return VolumeSegmentationPipeline(
        None, IntensityThresholdInferer(), roi_size=(16, 16), map_mode=None, threshold=threshold, **kwargs
    )


def read_csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def assert_complete(folder: Path) -> None:
    """Every file under a final name reads completely (a truncated .nii.gz fails to decompress)."""
    for path in folder.rglob("*"):
        if path.is_file() and not path.name.startswith(TEMP_PREFIX):
            if path.name.endswith(".nii.gz"):
                np.asarray(nib.load(str(path)).get_fdata())
            elif path.suffix in (".json",):
                json.loads(path.read_text())


# ---- 1. outputs are written atomically; a killed run is resumed -------------------------------------------------
_KILLED_RUN = textwrap.dedent(
    """
    import sys, time
    from monai.data import NibabelWriter
    from monai_wsss.apps import VolumeSegmentationPipeline
    from monai_wsss.inferers import IntensityThresholdInferer

    items, out = sys.argv[1].split(","), sys.argv[2]
    original = NibabelWriter.write
    calls = [0]

    def slow_write(self, filename, *args, **kwargs):
        # the third file (case 2's map): write half of it, say so, and wait to be killed mid-write
        original(self, filename, *args, **kwargs)
        calls[0] += 1
        if calls[0] == 3:
            data = open(filename, "rb").read()
            open(filename, "wb").write(data[: len(data) // 2])
            print("WRITING", filename, flush=True)
            time.sleep(120)

    NibabelWriter.write = slow_write
    pipe = VolumeSegmentationPipeline(None, IntensityThresholdInferer(), roi_size=(16, 16), map_mode=None, threshold=0.7)
    pipe.run(items, out)
    """
)


def test_sigkill_mid_write_leaves_no_truncated_file_and_a_rerun_completes(cases, tmp_path):
    out = tmp_path / "out"
    script = tmp_path / "killed_run.py"
    script.write_text(_KILLED_RUN)
    images = ",".join(it["image"] for it in cases)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = start_script(script, [images, str(out)], env=env, output_dir=tmp_path / "killed_run")  # forked_cli.py
    try:
        line = proc.first_line()  # waits until the child is mid-write
        assert line.startswith("WRITING"), proc.output()[1][-2000:]
        proc.kill()  # SIGKILL
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    # the half-written file is a temporary one; nothing under a final name is truncated, and no table lists a
    # result of the interrupted run
    assert Path(line.split()[1]).name.startswith(TEMP_PREFIX)
    assert_complete(out)
    assert not (out / "predictions.csv").exists()
    assert (out / "synth_000_flair_map.nii.gz").is_file() and (out / "synth_000_flair_mask.nii.gz").is_file()
    first_map = (out / "synth_000_flair_map.nii.gz").read_bytes()

    result = pipeline().run([it["image"] for it in cases], out)  # same inputs and settings: resumed
    assert result["resumed"]
    assert (out / "synth_000_flair_map.nii.gz").read_bytes() == first_map  # kept, not recomputed
    rows = read_csv(out / "predictions.csv")
    assert [r["case"] for r in rows] == ["synth_000_flair", "synth_001_flair", "synth_002_flair"]
    for row in rows:
        assert Path(row["map"]).is_file() and Path(row["mask"]).is_file()
    assert not list(out.rglob(f"{TEMP_PREFIX}*"))
    assert_complete(out)
    assert json.loads((out / MANIFEST_NAME).read_text())["finished"]


# ---- 2. runs are kept apart ----------------------------------------------------------------------------------------
def test_a_folder_of_another_run_is_refused_unless_overwrite(cases, tmp_path):
    items = [it["image"] for it in cases]
    pipeline(0.7).run(items, tmp_path)
    old_manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    with pytest.raises(RunFolderError, match="another run.*threshold"):
        pipeline(0.5).run(items, tmp_path)
    assert json.loads((tmp_path / MANIFEST_NAME).read_text()) == old_manifest  # untouched
    # overwrite, with a second case that cannot be read: the folder holds only the new run's files (the good case's
    # and a table naming the bad one)
    broken = tmp_path.parent / f"{tmp_path.name}_broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    with pytest.raises(FailedVolumesError, match="1 of 2 volumes.*broken"):
        pipeline(0.5).run([items[0], str(broken)], tmp_path, overwrite=True)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    recorded = {entry["path"] for files in manifest["files"].values() for entry in files.values()}
    on_disk = {p.name for p in tmp_path.iterdir() if p.is_file() and p.name not in (MANIFEST_NAME, LOCK_NAME)}
    assert on_disk == recorded == {"synth_000_flair_map.nii.gz", "synth_000_flair_mask.nii.gz", "predictions.csv"}
    assert list(manifest["failed"]) == [f"{tmp_path.name}_broken"]
    assert manifest["settings"]["pipeline"]["threshold"] == 0.5
    # results written without a manifest (an older version, another tool) are not mixed with this run's either
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "predictions.csv").write_text("case\n")
    with pytest.raises(RunFolderError, match="without a run_manifest.json"):
        pipeline().run(items, legacy)


# ---- 3. names are unique per case -----------------------------------------------------------------------------------
def test_images_with_one_file_name_get_one_output_each(cases, tmp_path):
    for folder in ("site_a", "site_b"):
        (tmp_path / folder).mkdir()
    shutil.copy(cases[0]["image"], tmp_path / "site_a" / "case_flair.nii.gz")
    shutil.copy(cases[1]["image"], tmp_path / "site_b" / "case_flair.nii.gz")
    items = [
        {"image": str(tmp_path / "site_a" / "case_flair.nii.gz"), "case": "a"},
        {"image": str(tmp_path / "site_b" / "case_flair.nii.gz"), "case": "b"},
    ]
    result = pipeline().run(items, tmp_path / "out")
    rows = read_csv(tmp_path / "out" / "predictions.csv")
    assert [Path(r["map"]).name for r in rows] == ["case_flair_a_map.nii.gz", "case_flair_b_map.nii.gz"]
    assert len({r["mask"] for r in rows}) == 2
    maps = [np.asarray(nib.load(r["map"]).dataobj) for r in result["rows"]]
    assert not np.array_equal(maps[0], maps[1])  # each case's own result
    # same file name and no case id: the position disambiguates
    no_ids = [{"image": it["image"]} for it in items]
    rows = pipeline().run(no_ids, tmp_path / "out2")["rows"]
    assert len({r["map"] for r in rows}) == len({r["case"] for r in rows}) == 2


# ---- 4. yes/no and numbers are typed; unknown keys are errors ------------------------------------------------------
def test_options_are_typed_and_unknown_keys_refused(tmp_path):
    assert parse_option("largest_component", "false", "bool") is False
    assert parse_option("progress", "TRUE", "bool") is True and parse_option("progress", 0, "bool") is False
    assert parse_option("threshold", "average_otsu", "float", choices=("otsu", "average_otsu")) == "average_otsu"
    assert parse_option("noise_level", "50", "int", low=1) == 50
    for args, words in [
        (("largest_component", "maybe", "bool"), "largest_component"),
        (("noise_level", "5O", "int"), "noise_level"),
        (("tau", "nan", "float"), "finite"),
        (("threshold", 2, "float", 0, 1, ("otsu",)), "threshold"),
    ]:
        with pytest.raises(ValueError, match=words):
            parse_option(*args)

    parser = ConfigParser()
    parser.read_config(CDM_CONFIGS)
    parser.update(
        {"progress": "false", "null_class": "true", "overwrite": "no",
         **{f"diffusion_def#{k}": v for k, v in TINY_UNET.items() if k in ("channels", "attention_levels", "num_head_channels", "norm_num_groups")}}
    )
    assert parser.get_parsed_content("inferer").progress is False
    assert parser.get_parsed_content("run_folder#overwrite") is False
    assert parser.get_parsed_content("diffusion_def").null_class == 2  # 'true' -> a null class, not a crash
    parser.update({"null_class": "false"})
    assert parser.get_parsed_content("diffusion_def", lazy=False).null_class is None

    argv = ["monai.bundle", "run", "--config_file", str(CDM_CONFIGS), "--noise_levle", "50", "--diffusion_def#channels", "[8]"]
    with pytest.raises(ValueError, match="noise_levle.*did you mean --noise_level"):
        check_command_line(argv)
    assert check_command_line(argv[:4] + argv[6:]) == ["config_file", "diffusion_def#channels"]


def test_unknown_command_line_key_fails_before_any_compute(cases, tmp_path):
    cmd = [
        "run", "--config_file", str(CDM_CONFIGS),
        "--image", cases[0]["image"], "--output_dir", str(tmp_path / "out"), "--noise_levle", "50",
    ]
    proc = run_module("monai.bundle", cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and "did you mean --noise_level" in proc.stderr
    assert not (tmp_path / "out").exists()


# ---- 5. the body comes from the data --------------------------------------------------------------------------------
def test_z_scored_volume_gets_the_body_of_its_unscaled_original(tmp_path, caplog):
    image, _, affine = synthetic_brain_volume(SHAPE, seed=4, num_lesions=1)
    original = image.astype(np.float32)
    brain = original != 0
    z = (original - original[brain].mean()) / original[brain].std()
    background = float(np.percentile(z[brain], 5))  # DeepMedic-like: a negative constant, some brain voxels below it
    z[~brain] = background
    assert (z[brain] < background).any()
    paths = []
    for name, data in (("orig", original), ("zscored", z)):
        path = tmp_path / f"{name}_flair.nii.gz"
        nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(path))
        paths.append(str(path))
    with caplog.at_level(logging.INFO, logger="monai_wsss.transforms.intensity"):
        outs = [pipeline().segment(p) for p in paths]
    torch.testing.assert_close(outs[0]["image"].as_tensor(), outs[1]["image"].as_tensor(), atol=1e-5, rtol=0)
    assert torch.equal(outs[0]["mask"], outs[1]["mask"]) and outs[0]["mask"].any()
    assert not outs[1]["mask"][0][torch.from_numpy(~brain)].any()  # never outside the head
    assert "background value" in caplog.text and f"{background:g}" in caplog.text
    # without a constant background the old convention (0) holds
    scaler = ScaleIntensityNonzeroPercentiles(background=0.0)
    assert float(scaler(torch.from_numpy(z)[None])[0][~torch.from_numpy(brain)].min()) > 0  # z-score bg is body then


# ---- 6. one-slice and 4D volumes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("threshold", ["otsu", "average_otsu"])
def test_single_slice_volume_keeps_its_shape(tmp_path, threshold):
    image, _, affine = synthetic_brain_volume((32, 32, 8), seed=5, num_lesions=1)
    path = tmp_path / "one_flair.nii.gz"
    nib.save(nib.Nifti1Image(image[:, :, 4:5], affine), str(path))
    pipe = VolumeSegmentationPipeline(None, IntensityThresholdInferer(), roi_size=(16, 16), threshold=threshold,
                                      normalize_per="volume")
    rows = pipe.run([str(path)], tmp_path / "out")["rows"]
    for key in ("map", "mask"):
        assert nib.load(rows[0][key]).shape == (32, 32, 1), key


def test_four_d_image_says_which_channel_is_used(tmp_path, caplog):
    image, _, affine = synthetic_brain_volume(SHAPE, seed=6)
    path = tmp_path / "multi_flair.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([image, image // 2], axis=-1), affine), str(path))
    with caplog.at_level(logging.WARNING):
        out = pipeline().segment(list_volumes(image=path)[0])
    assert out["mask"].shape == (1, *SHAPE)
    assert "2 channels" in caplog.text and "multi_flair.nii.gz" in caplog.text and "channel 0" in caplog.text


# ---- 7. failures come first, and name what is wrong -----------------------------------------------------------------
def test_bad_settings_fail_before_any_compute(cases, tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = ConditionalDiffusionUNet(**TINY_UNET)
    state = net.state_dict()
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key][...] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=f"nan.pt.*NaN.*{key}"):
        load_weights(ConditionalDiffusionUNet(**TINY_UNET), tmp_path / "nan.pt")

    pipe = VolumeSegmentationPipeline(None, IntensityThresholdInferer(), roi_size=(16, 16), threshold=0.5)
    calls = []
    monkeypatch.setattr(pipe, "predict", lambda image: calls.append(1) or torch.zeros_like(image))
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(RunFolderError, match="not writable"):
        pipe.run([cases[0]["image"]], not_a_folder / "out")
    if os.geteuid() != 0:  # root writes anywhere
        read_only = tmp_path / "read_only"
        read_only.mkdir()
        read_only.chmod(0o500)
        with pytest.raises(RunFolderError, match="read_only.*not writable"):
            pipe.run([cases[0]["image"]], read_only)
    for bad in (2.0, -1.0, 1.0):
        bad_pipe = VolumeSegmentationPipeline(None, IntensityThresholdInferer(), roi_size=(16, 16), threshold=bad)
        monkeypatch.setattr(bad_pipe, "predict", lambda image: calls.append(1) or torch.zeros_like(image))
        with pytest.raises(ValueError, match="threshold.*outside"):
            bad_pipe.run([cases[0]["image"]], tmp_path / "bad")
    assert not calls and not (tmp_path / "bad").exists()

    from monai.networks.schedulers import DDPMScheduler

    with pytest.raises(ValueError, match="guidance_scale.*finite"):
        ConditionDifferenceInferer(DDPMScheduler(1000), noise_level=10, num_steps=2, guidance_scale=float("nan"))
    inferer = ConditionDifferenceInferer(DDPMScheduler(1000), noise_level=10, num_steps=2)
    for x, words in [
        (torch.rand(2, 1, 16, 16, dtype=torch.float64), "float64"),
        (torch.rand(0, 1, 16, 16), "empty batch"),
        (torch.rand(2, 1, 15, 17), "multiple of"),
    ]:
        with pytest.raises(ValueError, match=words):
            inferer(x, net)
    with pytest.raises(ValueError, match="no voxel"):
        VolumeInferer(None, roi_size=(16, 16))(torch.rand(0, 1, 8, 8, 4), net)


def test_reports_are_utf8_under_the_c_locale_itk_leaves_behind(tmp_path):
    """ITK's image IO switches the process to the C locale (ASCII); reports with "±" must still be written."""
    from monai_wsss.apps.reports import write_csv
    from monai_wsss.benchmark.table import write_table
    from monai_wsss.utils.atomic_files import write_text_atomic

    previous = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        assert locale.getpreferredencoding(False).lower() in ("ansi_x3.4-1968", "ascii", "us-ascii")
        write_text_atomic(tmp_path / "summary.md", "Dice 0.50 ± 0.10")
        write_csv(tmp_path / "metrics.csv", [{"case": "ü", "dice": 0.5}])
        row = {"method": "cdm", "setting": "Q=300", "repeats": 2, "sec_per_slice": 0.1, "hd95_missing": 0,
               "auroc": 0.9, "auprc": 0.8, **{k: 0.5 for k in ("dice", "iou", "hd95")},
               **{f"{k}_std": 0.1 for k in ("dice", "iou", "hd95")}}
        info = {"slices_used": 1, "cases_used": 1, "split": "test", "positive_slices": 1}
        write_table([row], tmp_path / "table", "test", info)
    finally:
        locale.setlocale(locale.LC_CTYPE, previous)
    assert (tmp_path / "summary.md").read_bytes().decode("utf-8") == "Dice 0.50 ± 0.10"
    assert "ü" in (tmp_path / "metrics.csv").read_bytes().decode("utf-8")
    assert "0.500 ± 0.100" in (tmp_path / "table" / "table.md").read_bytes().decode("utf-8")


def test_component_filter_prints_no_deprecation_warning_of_a_dependency():
    """Every segmenter run filters 3D components with MONAI's RemoveSmallObjects, which passes scikit-image's
    deprecated `min_size`: importing the package silences that one message (in a fresh process, as a user runs)."""
    code = (
        "import warnings, torch\nwarnings.simplefilter('default')\nimport monai_wsss\n"
        "from monai.transforms import RemoveSmallObjects\n"
        "m = torch.zeros(1, 8, 8, 8); m[0, :2, :2, :2] = 1; m[0, 4:, 4:, 4:] = 1\n"
        "print(int(RemoveSmallObjects(min_size=10, connectivity=3)(m).sum()))\n"
        "warnings.warn('another FutureWarning', FutureWarning)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["64"]  # the 8-voxel object is gone, the 64-voxel one kept
    assert "min_size" not in proc.stderr and "another FutureWarning" in proc.stderr  # only that message is silenced
