# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""scripts/pseudo_mask_quality.py: intensity rules fused with a diffusion method's mask, scored by both criteria."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import REPO


def _script():
    sys.path.insert(0, str(REPO / "scripts"))
    import pseudo_mask_quality

    return pseudo_mask_quality


def test_fuse_with_evidence_keeps_the_rule_where_the_evidence_agrees_or_adds_it_inside_the_relaxed_region():
    fuse = _script().fuse_with_evidence
    rule = torch.tensor([1, 1, 0, 0, 0]).bool()
    evidence = torch.tensor([1, 0, 1, 1, 0]).bool()
    relaxed = torch.tensor([0, 0, 1, 0, 1]).bool()
    assert fuse(rule, evidence, relaxed, "and").tolist() == [True, False, False, False, False]
    assert fuse(rule, evidence, relaxed, "or").tolist() == [True, True, True, False, False]
    with pytest.raises(ValueError, match="fusion kind"):
        fuse(rule, evidence, relaxed, "xor")
    with pytest.raises(ValueError, match="different shapes"):
        fuse(rule, evidence[:3], relaxed, "and")


def test_script_scores_fused_rules_with_the_evidence_computed_once_per_volume(tmp_path, monkeypatch):
    """
    With a stricter intensity rule standing in for the diffusion mask (0.7 x the 99th percentile), "rule 0.5 and
    evidence" is the 0.7 rule and "rule 0.5 or evidence" the 0.5 rule, row for row, under both criteria; the labels
    criterion reads no pixel mask.
    """
    from monai_wsss.apps import VolumeSegmentationPipeline, build_method_inferer
    from monai_wsss.data import make_synthetic_dataset
    from monai_wsss.data.labels import main as labels_main

    script = _script()
    built = []

    def stricter_rule(bundle, task, method):
        built.append((bundle, method))
        return VolumeSegmentationPipeline(None, build_method_inferer("volume_threshold"), task=task, map_mode=None,
                                          threshold=0.7)

    monkeypatch.setattr(script, "_diffusion_source", stricter_rule)
    items = make_synthetic_dataset(tmp_path / "brats", num_cases=2, shape=(40, 40, 12), seed=3)
    labels = tmp_path / "labels.csv"
    labels_args = ["--dataset_dir", str(tmp_path / "brats"), "--task", "brats", "--out", str(labels), "--quiet"]
    assert labels_main(labels_args) == 0
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"validation": items}))
    common = ["--task", "brats", "--datalist", str(datalist), "--factors", "0.5", "0.7", "0.9",
              "--diffusion_bundle", "B"]

    by_labels = script.main([*common, "--labels", str(labels)])
    assert built == [("B", "cg_cdm")]
    assert by_labels[(0.5, None, "and")] == pytest.approx(by_labels[(0.7, None, None)])
    assert by_labels[(0.5, None, "or")] == pytest.approx(by_labels[(0.5, None, None)])
    assert by_labels[(0.9, None, "and")] == pytest.approx(by_labels[(0.9, None, None)])
    assert by_labels[(0.7, None, None)] != pytest.approx(by_labels[(0.5, None, None)])  # the equalities say something
    for dice, f1 in by_labels.values():
        assert 0.0 <= dice <= 1.0 and 0.0 <= f1 <= 1.0

    by_masks = script.main([*common, "--criterion", "pixel_masks", "--fusion", "and"])
    assert set(by_masks) == {(f, None, k) for f in (0.5, 0.7, 0.9) for k in (None, "and")}
    assert by_masks[(0.5, None, "and")] == pytest.approx(by_masks[(0.7, None, None)])
    assert by_masks[(0.7, None, None)] != pytest.approx(by_masks[(0.5, None, None)])

    # the labels criterion needs no pixel mask: a datalist without them gives the same rows; --fusion alone: none
    datalist.write_text(json.dumps({"validation": [{k: v for k, v in it.items() if k != "seg"} for it in items]}))
    assert script.main([*common, "--labels", str(labels)]) == by_labels
    no_fusion = script.main([*common, "--labels", str(labels), "--fusion"])
    assert no_fusion.keys() == {(f, None, None) for f in (0.5, 0.7, 0.9)}
    with pytest.raises(SystemExit):
        script.main([*common, "--labels", str(labels), "--fusion_relaxed_percentile", "100"])
    # the evidence can come from CDM instead of CG-CDM; the method reaches the source and names the fused rows
    assert script.main([*common, "--labels", str(labels), "--diffusion_method", "cdm"]) == by_labels
    assert built[-1] == ("B", "cdm")
    assert script._rule_name((0.5, None, "and"), "cdm") == "0.5, and cdm"


def test_diffusion_source_refuses_a_method_that_gives_no_evidence():
    with pytest.raises(ValueError, match="diffusion method must be one of"):
        _script()._diffusion_source("bundles/brats_cdm", "brats", "cg_diff")
