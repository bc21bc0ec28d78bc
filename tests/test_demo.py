"""The demo, end to end at its --quick scale: data, both training configs, every method, table, masks, overlays."""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pytest

from forked_cli import run_module
from monai_wsss import demo


def _quick_run_in_process(out_dir):
    """One in-process ``--quick`` demo (``--jobs 1``: every step in turn); returns (result, what it printed)."""
    from contextlib import redirect_stdout
    from io import StringIO

    printed = StringIO()
    with redirect_stdout(printed):
        result = demo.main(["--out_dir", str(out_dir), "--quick", "--jobs", "1"])
    return result, printed.getvalue()


@pytest.mark.slow
def test_quick_demo_runs_every_step_through_the_bundle_and_the_command_repeats_its_scores(tmp_path):
    """
    The in-process demo's outputs, then the command with its steps two at a time in worker processes, which must
    print the same table (one test, so that the first run is made once: a module fixture ran on both xdist workers).
    """
    first_dir = tmp_path / "jobs1"
    result, printed = _quick_run_in_process(first_dir)
    _check_quick_demo_outputs(first_dir, result, printed)
    _check_the_command_repeats(first_dir, tmp_path / "jobs2")


def _check_quick_demo_outputs(out_dir, result, printed):
    assert list(result["summaries"]) == ["segmenter", "cdm", "cg_cdm", "cg_diff", "threshold", "whole brain"]
    for name in result["summaries"]:
        assert f"| {name} |" in printed
        summary = result["summaries"][name]
        assert summary["num_positive_slices"] > 0 and 0.0 <= summary["slice_dice"] <= 1.0
        assert name == "whole brain" or list((out_dir / name / "overlays").glob("*.png"))
    # the diffusion model, the classifier and the segmentation network were trained by the bundle's own configs
    for name in ("diffusion_final.pt", "classifier_final.pt", "model_final.pt"):
        assert (out_dir / "models" / name).is_file(), name
    assert list((out_dir / "pseudo_masks").rglob("*_pseudo.nii.gz"))
    test_cases = json.loads((out_dir / "train_diffusion" / "datalist.json").read_text())["test"]
    for item in test_cases:
        stem = item["image"].rsplit("/", 1)[1][: -len(".nii.gz")]
        mask = nib.load(out_dir / "cdm" / f"{stem}_mask.nii.gz")
        image = nib.load(item["image"])
        assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
    saved = json.loads((out_dir / "summary.json").read_text())
    assert set(saved["summaries"]) == set(result["summaries"]) and saved["seconds"]["total"] > 0
    assert (out_dir / "summary.md").read_text().startswith("# monai_wsss demo")


def _check_the_command_repeats(first_dir, out_dir):
    """
    ``python -m monai_wsss.demo --jobs 2`` logs one training line per epoch and prints the first run's table (run
    forked from the preloaded server of ``forked_cli``: the command's parsing and pool, without a second MONAI import).
    """
    import os

    args = ["--quick", "--out_dir", str(out_dir), "--jobs", "2"]
    out = run_module("monai_wsss.demo", args, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if "train_loss" in line]
    # diffusion, classifier and segmenter trainings, one epoch each at --quick: only each epoch's last iteration is logged
    epochs = sum(demo.QUICK_SETTINGS[f"{name}_epochs"] for name in ("diffusion", "classifier", "segmenter"))
    assert len(lines) == epochs, out.stdout[-2000:]
    for line in lines:
        done, total = re.search(r"Iter: (\d+)/(\d+)", line).groups()
        assert done == total, line
    # seeded data, training and noise: a second run, its steps two at a time in worker processes, prints the table
    # of the first, which ran them in turn in one process (one thread each)
    first = json.loads((first_dir / "summary.json").read_text())
    second = json.loads((out_dir / "summary.json").read_text())
    assert first["threads"] == second["threads"] == 1
    assert (first["jobs"], second["jobs"]) == (1, 2)
    assert demo.result_table(second["summaries"]) == demo.result_table(first["summaries"])

    def scores(saved: dict) -> dict:  # everything but wall times
        return {m: {k: v for k, v in s.items() if "seconds" not in k} for m, s in saved["summaries"].items()}

    assert scores(second) == scores(first), "the scores differ beyond the third decimal"


def test_demo_steps_wait_only_for_earlier_steps():
    step = demo.DemoStep("cdm", ["inference.json"], "infer", {}, needs=("train_diffusion",))
    with pytest.raises(ValueError, match="needs .*train_diffusion"):
        demo.run_steps([step])
    first = demo.DemoStep("train_diffusion", ["train_diffusion.json"], "train", {})
    with pytest.raises(ValueError, match="two demo steps are named"):
        demo.run_steps([first, first])
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        demo.run_steps([first], jobs=0)


def test_demo_rejects_unknown_methods(tmp_path):
    with pytest.raises(ValueError, match="unknown demo method"):
        demo.run_demo(tmp_path, {**demo.QUICK_SETTINGS, "methods": ("cdm", "gradcam")})


def test_readme_check_passes_within_its_tolerance_and_fails_beyond_it(tmp_path):
    """The README check is pure Python on table strings: scores within README_TOLERANCE agree, counts must be equal."""
    summaries = {
        "cdm": {"num_cases": 4, "num_positive_slices": 35, "slice_dice": 0.4381, "slice_iou": 0.3, "volume_dice": 0.5, "pixel_auroc": 0.9},
        "whole brain": {"num_cases": 4, "num_positive_slices": 35, "slice_dice": 0.119, "slice_iou": 0.07, "volume_dice": 0.1, "pixel_auroc": None},
    }
    start, end = demo.README_MARKERS
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{start}\n{demo.result_table(summaries)}\n{end}\n")
    assert "| whole brain | 4 | 35 | 0.119 | 0.070 | 0.100 | n/a |" in demo.read_readme_table(readme)
    assert demo.compare_with_readme(summaries, readme) == []
    assert demo.compare_with_readme(summaries, readme, tolerance=0.0) == []
    tol = demo.README_TOLERANCE
    assert 0 < tol <= 0.05

    def moved(**change):
        return {**summaries, "cdm": {**summaries["cdm"], **change}}

    # a CPU-kind difference (a little under the tolerance, on several scores at once) passes ...
    near = moved(slice_dice=0.4381 + tol - 0.002, volume_dice=0.5 - tol + 0.002, pixel_auroc=0.9 + 0.01)
    assert demo.compare_with_readme(near, readme) == []
    # ... but not with an exact check, which flags the third decimal
    assert demo.compare_with_readme(moved(slice_dice=0.4386), readme, tolerance=0.0)
    # a real difference (just beyond the tolerance) fails, naming the row and the column
    far = demo.compare_with_readme(moved(slice_iou=0.3 + tol + 0.002), readme)
    assert far[0] == "README: | cdm | 4 | 35 | 0.438 | 0.300 | 0.500 | 0.900 |"
    assert far[1].startswith("demo:   | cdm | 4 | 35 | 0.438 | 0.3")
    assert "slice IoU" in far[2] and "slice Dice" not in far[2]
    # counts are never tolerated, nor a number where the README has n/a, nor a missing or extra row
    assert demo.compare_with_readme(moved(num_positive_slices=36), readme)
    assert demo.compare_with_readme({**summaries, "whole brain": {**summaries["whole brain"], "pixel_auroc": 0.5}}, readme)
    assert demo.compare_with_readme({"cdm": summaries["cdm"]}, readme)
    assert demo.compare_with_readme({**summaries, "threshold": summaries["cdm"]}, readme)
    # the same on plain table strings, both directions
    table = demo.result_table(summaries)
    assert demo.compare_tables(table, table.replace("0.438", "0.460")) == []
    assert demo.compare_tables(table, table.replace("0.438", "0.480"))
    assert demo.compare_tables(table.replace("0.438", "0.480"), table)
    # a row named in README_ROW_TOLERANCES (the segmenter's CPU-sensitive training) has its own, wider tolerance;
    # an explicit tolerance applies to every row, so --tolerance 0 is exact for it too
    seg_tol = demo.README_ROW_TOLERANCES["segmenter"]
    assert tol < seg_tol < 0.2
    seg = table.replace("| cdm |", "| segmenter |")
    assert demo.compare_tables(seg, seg.replace("0.438", f"{0.438 + seg_tol - 0.002:.3f}")) == []
    assert demo.compare_tables(seg, seg.replace("0.438", f"{0.438 + seg_tol + 0.002:.3f}"))
    assert demo.compare_tables(seg, seg.replace("0.438", "0.460"), tolerance=0.0)
    assert demo.compare_tables(table, table.replace("0.438", "0.480"), row_tolerances={"cdm": 0.05}) == []
    with pytest.raises(ValueError, match="row_tolerances\\['cdm'\\]"):
        demo.compare_tables(table, table, row_tolerances={"cdm": -1.0})
    # bad inputs: each error names what is wrong
    with pytest.raises(ValueError, match="tolerance"):
        demo.compare_with_readme(summaries, readme, tolerance=-0.01)
    with pytest.raises(ValueError, match="tolerance"):
        demo.compare_tables(table, table, tolerance=float("nan"))
    with pytest.raises(ValueError, match="slice Dice"):
        demo.compare_tables(table, table.replace("0.438", "abc"))
    with pytest.raises(ValueError, match="value"):
        demo.compare_tables(table, table + "\n| cg_cdm | 4 | 35 | 0.1 |")
    plain = tmp_path / "plain.md"
    plain.write_text("# no table\n")
    with pytest.raises(ValueError, match="no demo table"):
        demo.compare_with_readme(summaries, plain)


def test_readme_check_command_states_its_tolerance_and_exits_1_on_a_difference(tmp_path, capsys):
    """``--check_readme`` on the repository's README: the recorded run passes, a moved score fails with exit code 1."""
    from pathlib import Path

    recorded = Path(demo.__file__).resolve().parents[1] / "bundles" / "brats_cdm" / "docs" / "results" / "demo_summary.json"
    with pytest.raises(SystemExit) as help_exit:
        demo.main(["--help"])
    assert help_exit.value.code == 0
    helped = capsys.readouterr().out
    assert f"default {demo.README_TOLERANCE}" in helped and "segmenter row" in helped
    assert demo.main(["--check_readme", str(recorded)])["differences"] == []
    assert "within" in capsys.readouterr().out
    saved = json.loads(recorded.read_text())
    first = next(iter(saved["summaries"]))
    beyond = demo.README_ROW_TOLERANCES.get(first, demo.README_TOLERANCE) + 0.02
    saved["summaries"][first]["slice_dice"] = saved["summaries"][first]["slice_dice"] + beyond
    moved = tmp_path / "summary.json"
    moved.write_text(json.dumps(saved))
    with pytest.raises(SystemExit) as failed:
        demo.main(["--check_readme", str(moved)])
    assert failed.value.code == 1
    assert f"| {first} |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad:
        demo.main(["--check_readme", str(moved), "--tolerance", "-1"])
    assert bad.value.code == 2 and "--tolerance" in capsys.readouterr().err
    with pytest.raises(SystemExit) as missing:
        demo.main(["--check_readme", str(tmp_path / "nothing.json")])
    assert missing.value.code == 2 and "--check_readme" in capsys.readouterr().err
