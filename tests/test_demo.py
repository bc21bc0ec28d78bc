"""The demo, end to end at its --quick scale: data, both training configs, every method, table, masks, overlays."""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pytest

from monai_wsss import demo


def test_quick_demo_runs_every_step_through_the_bundle(tmp_path, capsys):
    result = demo.main(["--out_dir", str(tmp_path), "--quick"])
    assert list(result["summaries"]) == ["cdm", "cg_cdm", "cg_diff", "threshold", "whole brain"]
    printed = capsys.readouterr().out
    for name in result["summaries"]:
        assert f"| {name} |" in printed
        summary = result["summaries"][name]
        assert summary["num_positive_slices"] > 0 and 0.0 <= summary["slice_dice"] <= 1.0
        assert name == "whole brain" or list((tmp_path / name / "overlays").glob("*.png"))
    # the diffusion model and the classifier were trained by the bundle's own configs
    assert (tmp_path / "models" / "model_final.pt").is_file() and (tmp_path / "models" / "classifier_final.pt").is_file()
    test_cases = json.loads((tmp_path / "train_diffusion" / "datalist.json").read_text())["test"]
    for item in test_cases:
        stem = item["image"].rsplit("/", 1)[1][: -len(".nii.gz")]
        mask = nib.load(tmp_path / "cdm" / f"{stem}_mask.nii.gz")
        image = nib.load(item["image"])
        assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert set(saved["summaries"]) == set(result["summaries"]) and saved["seconds"]["total"] > 0
    assert (tmp_path / "summary.md").read_text().startswith("# monai_wsss demo")


def test_demo_rejects_unknown_methods(tmp_path):
    with pytest.raises(ValueError, match="unknown demo method"):
        demo.run_demo(tmp_path, {**demo.QUICK_SETTINGS, "methods": ("cdm", "gradcam")})


@pytest.mark.slow
def test_demo_command_prints_one_training_line_per_epoch(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "monai_wsss.demo", "--quick", "--out_dir", str(tmp_path)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if "train_loss" in line]
    # diffusion and classifier trainings, one epoch each at --quick: only each epoch's last iteration is logged
    epochs = demo.QUICK_SETTINGS["diffusion_epochs"] + demo.QUICK_SETTINGS["classifier_epochs"]
    assert len(lines) == epochs, out.stdout[-2000:]
    for line in lines:
        done, total = re.search(r"Iter: (\d+)/(\d+)", line).groups()
        assert done == total, line
