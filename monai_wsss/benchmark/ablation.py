# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""
Ablations as the CDM paper's Fig. 3: Dice as a function of the noise level Q, the number of steps R, tau and the
guidance scale s, one parameter at a time around a base setting, plus the noise-seed ensemble.

    python -m monai_wsss.benchmark ablation --bundle_root bundles/brats_cdm --dataset_dir ../shared/data/brats2018 \
        --split validation --out_dir outputs/ablation_brats

Runs on the validation split by default: this is the sweep that chooses the inference defaults, so it must not
see the test cases. Writes ``ablation.csv`` (one row per setting), ``ablation.png`` (one line plot per parameter)
and ``ablation.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from monai.networks.schedulers import DDIMScheduler

from monai_wsss.apps.methods import default_map_mode
from monai_wsss.apps.reports import write_csv
from monai_wsss.benchmark.table import MethodSpec, evaluate_method, load_bundle_networks, load_eval_slices
from monai_wsss.data import TASKS
from monai_wsss.inferers import ConditionDifferenceInferer, NoiseEnsembleInferer
from monai_wsss.utils.atomic_files import atomic_write, write_text_atomic

__all__ = ["sweep_settings", "run_ablation", "main"]

SWEEPS = {
    "noise_level": [50, 100, 200, 300, 400, 500],
    "num_steps": [1, 5, 10, 25],
    "tau": [0.8, 0.9, 0.95, 0.99],
    "guidance_scale": [0.0, 5.0, 10.0, 30.0, 100.0],
    "ensemble": [1, 4],
}


def sweep_settings(base: dict, sweeps: dict[str, list]) -> list[tuple[str, dict]]:
    """One-at-a-time settings around ``base``: ``[(swept_parameter, setting), ...]`` (the base recurs in each sweep)."""
    settings = []
    for param, values in sweeps.items():
        for value in values:
            setting = {**base, param: value}
            if setting["num_steps"] <= setting["noise_level"]:
                settings.append((param, setting))
    return settings


def _spec(setting: dict, scheduler, classifier, map_mode: str = "signed") -> MethodSpec:
    inner = ConditionDifferenceInferer(
        scheduler,
        noise_level=int(setting["noise_level"]),
        num_steps=int(setting["num_steps"]),
        tau=float(setting["tau"]),
        guidance_scale=float(setting["guidance_scale"]),
        classifier=classifier,
    )
    inferer = inner if int(setting["ensemble"]) == 1 else NoiseEnsembleInferer(inner, num_samples=int(setting["ensemble"]))
    name = "cg_cdm" if setting["guidance_scale"] > 0 else "cdm"
    return MethodSpec(name, inferer, map_mode, True, setting=json.dumps(setting, sort_keys=True))


def run_ablation(args: argparse.Namespace) -> list[dict]:
    """Run the sweep described by parsed ``args``; see :func:`main`."""
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    net, clf = load_bundle_networks(args.bundle_root, device)
    images, segs, info = load_eval_slices(
        args.dataset_dir, args.task, split=args.split, max_slices=args.max_slices, seed=args.seed,
        spatial_size=(args.size, args.size), cache_dir=args.cache_dir, keep_small_targets=args.keep_small_targets,
    )
    sched = DDIMScheduler(num_train_timesteps=1000, schedule="linear_beta", clip_sample=False)
    base = {"noise_level": args.noise_level, "num_steps": args.num_steps, "tau": args.tau, "guidance_scale": 0.0, "ensemble": 1}
    grid = {**SWEEPS, **(json.loads(args.grid) if args.grid else {})}
    unknown = set(grid) - set(SWEEPS)
    if unknown:
        raise ValueError(f"--grid names unknown parameters {sorted(unknown)}; known: {list(SWEEPS)}.")
    sweeps = {k: v for k, v in grid.items() if k in args.params}
    if "guidance_scale" in sweeps and clf is None:
        raise ValueError("sweeping guidance_scale needs the bundle's classifier (models/classifier.pt).")
    # the task's map reading (signed for hyperintense BraTS tumours, abs for CHAOS kidneys) unless overridden
    map_mode = args.map_mode or default_map_mode("cdm", args.task)
    info["map_mode"] = map_mode
    rows, cache = [], {}
    for param, setting in sweep_settings(base, sweeps):
        key = json.dumps(setting, sort_keys=True)
        if key not in cache:  # the base setting appears in every sweep: evaluate it once
            spec = _spec(setting, sched, clf, map_mode)
            cache[key] = evaluate_method(spec, net, clf if setting["guidance_scale"] > 0 else None, images, segs,
                                         repeats=args.repeats, batch_size=args.batch_size, seed=args.seed)
        row = {"parameter": param, **setting, **{k: v for k, v in cache[key].items() if k not in ("method", "setting")}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_ablation(rows, args.out_dir, info)
    return rows


def write_ablation(rows: list[dict], out_dir: str | Path, info: dict) -> None:
    """``ablation.csv``, ``ablation.md`` and ``ablation.png`` (Dice vs each swept parameter)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "ablation.csv", rows)
    params = list(dict.fromkeys(r["parameter"] for r in rows))
    lines = [
        f"{info['slices_used']} positive {info['split']} slices of {info['cases_used']} cases "
        f"({info.get('slice_rule', 'every slice with target')}); map mode "
        f"{info.get('map_mode', 'signed')!r}; mean ± std over noise seeds when repeated.",
        "",
    ]
    for p in params:
        lines += [f"| {p} | Dice | mIoU | HD95 | pixel AUROC |", "|---|---|---|---|---|"]
        for r in (r for r in rows if r["parameter"] == p):
            dice = f"{r['dice']:.3f} ± {r['dice_std']:.3f}" if r["repeats"] > 1 else f"{r['dice']:.3f}"
            lines.append(f"| {r[p]} | {dice} | {r['iou']:.3f} | {r['hd95']:.1f} | {r['auroc']:.3f} |")
        lines.append("")
    write_text_atomic(out / "ablation.md", "\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(params), figsize=(3.0 * len(params), 2.8), squeeze=False)
    for ax, p in zip(axes[0], params):
        sel = [r for r in rows if r["parameter"] == p]
        xs = np.array([r[p] for r in sel], dtype=float)
        ax.errorbar(xs, [r["dice"] for r in sel], yerr=[r["dice_std"] for r in sel], marker="o", capsize=3)
        ax.set_xlabel(p)
        ax.set_ylabel("Dice")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(out / "ablation.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m monai_wsss.benchmark ablation", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle_root", required=True)
    p.add_argument("--dataset_dir", required=True)
    p.add_argument("--task", default="brats", choices=sorted(TASKS))
    p.add_argument("--split", default="validation")
    p.add_argument("--out_dir", default="outputs/ablation")
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--params", nargs="+", default=list(SWEEPS), choices=list(SWEEPS))
    p.add_argument("--grid", default=None, help='JSON values overriding the default sweeps, e.g. \'{"tau": [0.9, 0.95]}\'')
    p.add_argument("--max_slices", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--noise_level", type=int, default=200)
    p.add_argument("--num_steps", type=int, default=10)
    p.add_argument("--tau", type=float, default=0.95)
    p.add_argument("--keep_small_targets", action="store_true",
                   help="keep slices the task's minimum-target rule drops (CHAOS validation has none left under it)")
    p.add_argument("--map_mode", default=None, choices=["signed", "abs"], help="map reading (default: the task's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    return run_ablation(parser().parse_args(argv))
