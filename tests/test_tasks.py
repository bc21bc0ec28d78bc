# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""The task registry: one place per task fact, read by datalists, apps, bundle helpers and scripts."""

from __future__ import annotations

import re

from pathlib import Path

import pytest

from monai_wsss.apps import (
    METHODS,
    default_map_mode,
    default_min_component_size,
    default_normalize_per,
    default_threshold,
    list_volumes,
    method_defaults,
)
from monai_wsss.bundle import prepare_splits
from monai_wsss.data import TASKS, DatasetLayout, MethodDefaults, TaskPreset, get_task, make_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def brats_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks") / "brats"
    make_synthetic_dataset(root, num_cases=2, shape=(16, 16, 4), seed=1)
    return root


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_method_has_defaults_on_every_task_and_says_where_they_were_chosen(task):
    preset = TASKS[task]
    for method in METHODS:
        defaults = method_defaults(method, task)
        assert isinstance(defaults, MethodDefaults)
        assert (default_threshold(method, task), default_normalize_per(method, task)) == (
            defaults.threshold,
            defaults.normalize_per,
        )
        assert default_map_mode(method, task) == defaults.map_mode
        assert default_min_component_size(method, task) == defaults.min_component_size
    for method, defaults in preset.method_defaults.items():
        assert method in METHODS, f"{task} has defaults for an unknown method {method!r}"
        doc = defaults.chosen_on.split(",")[0]
        assert (REPO / doc).is_file(), f"{task}/{method}: chosen_on names a missing doc {doc}"
        section = re.search(r"'([^']+)'", defaults.chosen_on)
        if section:  # a named section must be a heading of that doc (a renamed section breaks the reference)
            headings = re.findall(r"^#+ (.+)$", (REPO / doc).read_text(), re.M)
            assert any(h.startswith(section.group(1)) for h in headings), f"{task}/{method}: no section {section.group(1)!r} in {doc}"


def test_tuned_defaults_are_the_documented_ones():
    assert [default_threshold("segmenter", t) for t in ("brats", "chaos")] == [0.7, 0.3]
    assert [default_min_component_size("segmenter", t) for t in ("brats", "chaos")] == [1000, 0]
    assert [default_threshold("cg_cdm", t) for t in ("brats", "chaos")] == ["average_otsu", "otsu"]
    assert [default_normalize_per("cdm", t) for t in ("brats", "chaos")] == ["volume", "slice"]
    assert [default_map_mode("cdm", t) for t in ("brats", "chaos")] == ["signed", "abs"]
    assert default_threshold("volume_threshold", "chaos") == 0.7  # the baseline's definition, on every task


def test_a_preset_passed_instead_of_a_name_gives_its_own_defaults():
    tuned = MethodDefaults(0.4, "slice", None, 10, chosen_on="a test")
    preset = TASKS["brats"].replace(name="brats_t1", method_defaults={"segmenter": tuned})
    assert default_threshold("segmenter", preset) == 0.4
    assert default_min_component_size("segmenter", preset) == 10
    with pytest.raises(ValueError, match="brats_t1.*no defaults for method 'cdm'.*monai_wsss/data/tasks.py"):
        default_threshold("cdm", preset)


def test_unknown_task_and_method_are_named():
    with pytest.raises(ValueError, match="unknown task 'liver'.*'brats', 'chaos'"):
        get_task("liver")
    with pytest.raises(ValueError, match="unknown task 'liver'"):
        default_threshold("cdm", "liver")
    with pytest.raises(ValueError, match="unknown method 'unet'"):
        method_defaults("unet", "brats")


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": "median"}, "threshold"),
        ({"threshold": True}, "threshold"),
        ({"normalize_per": "case"}, "normalize_per"),
        ({"map_mode": "square"}, "map_mode"),
        ({"min_component_size": -1}, "min_component_size"),
        ({"chosen_on": " "}, "chosen_on"),
    ],
)
def test_method_defaults_refuse_bad_values_naming_the_field(changes, field):
    values = {"threshold": 0.5, "normalize_per": "volume", "map_mode": None, "min_component_size": 0, "chosen_on": "x"}
    with pytest.raises(ValueError, match=f"MethodDefaults.{field}"):
        MethodDefaults(**{**values, **changes})


def test_preset_checks_and_read_only_defaults():
    with pytest.raises(ValueError, match="TaskPreset.slice_axis"):
        TASKS["brats"].replace(slice_axis=3)
    for codes in ("LPX", "LLS", "LP", 3):
        with pytest.raises(ValueError, match="TaskPreset.orientation"):
            TASKS["brats"].replace(orientation=codes)
    assert TASKS["brats"].replace(orientation="ras").orientation == "RAS"  # nibabel codes, any case
    with pytest.raises(ValueError, match=r"TaskPreset.method_defaults\['cdm'\]"):
        TASKS["brats"].replace(method_defaults={"cdm": 0.5})
    with pytest.raises(TypeError):
        TASKS["brats"].method_defaults["cdm"] = None  # shared by every caller
    with pytest.raises(ValueError, match="DatasetLayout.modalities"):
        DatasetLayout("none", lambda root, require_seg=True: [], modalities=())


def test_slice_fields_and_repr_hold_only_what_shapes_the_slices():
    # the slice cache and run folders are keyed on these; descriptive fields must not change them
    preset = TASKS["chaos"]
    assert set(preset.slice_fields()) == {
        "name", "target_labels", "allowed_labels", "lower_percentile", "upper_percentile", "positive_min_pixels",
        "positive_min_fraction", "min_body_fraction", "eval_min_fraction", "slice_axis", "orientation", "image_channel",
    }
    assert "layout" not in repr(preset) and "method_defaults" not in repr(preset)
    assert preset.replace(modality="other") == preset


def test_layouts_read_folders_and_refuse_foreign_modalities(brats_folder, tmp_path):
    assert [it["case"] for it in TASKS["brats"].list_cases(brats_folder)] == ["synth_000", "synth_001"]
    assert TASKS["chaos"].layout.default_modality == "t2spir"
    with pytest.raises(ValueError, match="modality 'flair'.*'t2spir' images only"):
        TASKS["chaos"].list_cases(tmp_path, modality="flair")
    with pytest.raises(ValueError, match="modality 'flair'.*'t2spir' images only"):
        list_volumes(tmp_path, task="chaos", modality="flair")
    no_layout = TaskPreset(name="custom", target_labels=None, allowed_labels=(0, 1))
    with pytest.raises(ValueError, match="task 'custom' has no dataset folder layout"):
        prepare_splits(tmp_path, no_layout)
    assert TASKS["chaos"].layout.is_volume_folder("image_12") and not TASKS["chaos"].layout.is_volume_folder("data")
    assert not TASKS["brats"].layout.is_volume_folder("image_12")


def test_command_line_task_choices_come_from_the_registry(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_data", REPO / "scripts" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(TASKS, "liver", TASKS["chaos"].replace(name="liver"))
    args = module.parse_args(["--task", "liver", "--data_dir", "d", "--out_dir", "o"])
    assert args.task == "liver"
    monkeypatch.delitem(TASKS, "liver")
    with pytest.raises(SystemExit):
        module.parse_args(["--task", "liver", "--data_dir", "d", "--out_dir", "o"])


def test_weak_label_rule_is_quoted_from_the_preset():
    assert TASKS["chaos"].weak_label_rule() == "chaos rule: >= 0.2 % of the slice: 1, none: 0, in between: unlabelled"
    custom = TASKS["brats"].replace(name="b", positive_min_fraction=None, positive_min_pixels=50)
    assert custom.weak_label_rule() == "b rule: >= 50 pixels: 1, none: 0, in between: unlabelled"


@pytest.mark.parametrize("task", sorted(TASKS))
def test_presets_pickle_for_worker_processes(task):
    import pickle

    copy = pickle.loads(pickle.dumps(TASKS[task]))
    assert copy == TASKS[task] and dict(copy.method_defaults) == dict(TASKS[task].method_defaults)
    assert copy.layout.list_cases is TASKS[task].layout.list_cases
