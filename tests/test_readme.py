"""The README's quick-start example must run as written, and its demo table must be the recorded demo run's."""

import json
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: summary.json of the demo run the README shows (``python -m monai_wsss.demo``, copied from outputs/demo)
DEMO_SUMMARY = ROOT / "bundles" / "brats_cdm" / "docs" / "results" / "demo_summary.json"


def test_readme_quick_start_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    scope: dict = {}
    exec(compile(blocks[0], str(README), "exec"), scope)  # noqa: S102 (our own README)
    x = scope["x"]
    for name in ("amap",):
        assert scope[name].shape == x.shape, name


def test_readme_demo_table_is_the_recorded_demo_run():
    """
    Change the demo (settings, methods) and this fails until the demo is re-run and both the README table and
    the recorded summary are replaced: ``make demo``, ``cp outputs/demo/summary.json`` to ``DEMO_SUMMARY``, then
    paste ``python -m monai_wsss.demo --check_readme outputs/demo/summary.json``'s rows into the README.
    """
    from monai_wsss.demo import DEMO_SETTINGS, compare_with_readme

    recorded = json.loads(DEMO_SUMMARY.read_text())
    assert recorded["seed"] == 0 and recorded["threads"] == 1, "the README shows the default run: seed 0, one thread"
    assert recorded["settings"] == json.loads(json.dumps(DEMO_SETTINGS)), "the demo's settings changed since its recorded run"
    # the README's table is this run's, pasted: exact to the third decimal (the tolerance is for runs on other CPUs)
    assert compare_with_readme(recorded["summaries"], README, tolerance=0.0) == []
