"""The whole-volume speed benchmark: every method of METHODS through the bundle's own pipeline, per stage."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from conftest import perturb
from monai.bundle import ConfigParser

import monai_wsss.apps.pipeline as pipeline_module
from monai_wsss.benchmark.volume import STAGES, run_volume_benchmark, volume_markdown
from monai_wsss.data import make_synthetic_dataset

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "brats_cdm"


def test_volume_benchmark_times_each_stage_and_skips_methods_without_weights(tmp_path):
    # a copy of the bundle's configs with (untrained) diffusion weights only: timing does not depend on the values
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    (bundle / "models").mkdir()
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / f) for f in ("inference.json", "inference_cdm.json")])
    # perturbed so the map has contrast (MONAI zero-initialises the output layer) and the Otsu threshold exists
    torch.save(perturb(parser.get_parsed_content("diffusion_def")).state_dict(), bundle / "models" / "diffusion.pt")
    item = make_synthetic_dataset(tmp_path / "data", num_cases=1, shape=(40, 36, 6), seed=0)[0]
    writer = pipeline_module.map_writer

    result = run_volume_benchmark(item["image"], str(bundle), ["threshold", "cdm", "cg_cdm"], threads=[1])

    assert pipeline_module.map_writer is writer  # the instrumentation is undone
    assert [r["method"] for r in result["rows"]] == ["threshold", "cdm"]
    assert "noisy classifier" in result["skipped"]["cg_cdm"]  # no classifier.pt: skipped with the reason
    for row in result["rows"]:
        assert row["ran"] and row["threads"] == 1 and row["slices_with_body"] > 0
        assert set(row["seconds"]) == set(STAGES) and all(v >= 0 for v in row["seconds"].values())
        assert row["seconds"]["map"] > 0 and row["seconds"]["write"] > 0 and row["seconds"]["load"] > 0
        assert abs(sum(row["seconds"].values()) - row["total"]) < 1e-6  # "other" is the rest of run()
    table = volume_markdown(result)
    assert "| cdm | 1 |" in table and "| cg_cdm | | skipped" in table


def test_volume_benchmark_estimates_instead_of_running_slow_methods(tmp_path):
    item = make_synthetic_dataset(tmp_path / "data", num_cases=1, shape=(40, 36, 4), seed=0)[0]
    result = run_volume_benchmark(item["image"], str(BUNDLE), ["threshold"], threads=[1], max_map_seconds=0.0)
    (row,) = result["rows"]
    assert not row["ran"] and "seconds" not in row and row["estimated_map_seconds"] >= 0
    assert "estimate, not run" in volume_markdown(result)

