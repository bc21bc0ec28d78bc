# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""
The paper's comparison table: every method on the same test slices with the same thresholding.

    python -m monai_wsss.benchmark table --bundle_root bundles/brats_cdm --dataset_dir ../shared/data/brats2018 \
        --task brats --out_dir outputs/table_brats

For one dataset and one trained bundle (``models/diffusion.pt`` and ``models/classifier.pt`` built from the bundle's
``train_diffusion.json`` / ``train_classifier.json`` network definitions), the test split of the bundle's own
case-level split is sliced and moved to model space exactly as in training. A seeded subset of the positive slices
(``--max_slices``) is scored when the full set would take hours (CG-Diff costs tens of seconds per slice on CPU).
Every continuous map is post-processed identically: :class:`~monai_wsss.transforms.NormalizeMap` inside the body,
then a per-slice Otsu threshold. Dice, IoU and HD95 are averaged over positive slices (the paper's protocol; an
empty prediction has no HD95 and is counted, not scored 0), pixel AUROC/AUPRC are computed from the continuous
maps inside the body, and seconds per slice are measured in the same run. Stochastic methods (CDM, CG-CDM) are
repeated with different noise seeds (mean +- std over repeats, as the paper's 4 runs); deterministic methods run once.
Results: ``table.csv``, ``table.md`` and ``table.png`` (bar chart).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.transforms import AsDiscrete

from monai_wsss.apps.inputs import load_weights
from monai_wsss.apps.methods import CLASSIFIER_METHODS, NETWORK_METHODS, build_method_inferer, default_map_mode
from monai_wsss.apps.reports import write_csv
from monai_wsss.bundle import prepare_splits
from monai_wsss.data import TASKS, build_slice_dataset
from monai_wsss.inferers import CAM_METHODS, ClassActivationMapInferer, IntensityThresholdInferer
from monai_wsss.metrics import PixelAUCMetric, SegmentationScores
from monai_wsss.transforms import MODEL_INTENSITY_RANGE, NormalizeMap, OtsuThreshold, oriented_map
from monai_wsss.utils.atomic_files import atomic_write, write_text_atomic

__all__ = [
    "MethodSpec",
    "build_methods",
    "load_bundle_networks",
    "load_eval_slices",
    "bundle_method_settings",
    "evaluate_method",
    "method_maps",
    "run_table",
    "write_table",
    "main",
]

METHOD_SETTINGS = ("noise_level", "num_steps", "tau", "guidance_scale", "guided_noise_level", "guided_num_steps", "guided_tau",
                   "cgdiff_level", "cgdiff_guidance", "cfg_scale")
#: the table's rows: two slice-level intensity baselines (per-slice Otsu, and the fixed threshold), the CAM baselines
#: of :py:data:`~monai_wsss.inferers.CAM_METHODS` and the bundles' diffusion methods
#: (:py:data:`~monai_wsss.apps.NETWORK_METHODS`, built by :py:func:`~monai_wsss.apps.build_method_inferer`)
ALL_METHODS = ("threshold", "threshold_fixed", *CAM_METHODS, *NETWORK_METHODS)


@dataclass
class MethodSpec:
    """One row of the table: how to compute a map, how to read it, whether it depends on the noise seed."""

    name: str
    inferer: Callable[..., torch.Tensor]
    map_mode: str = "abs"  # NormalizeMap mode
    stochastic: bool = False
    fixed_threshold: float | None = None  # None: per-slice Otsu
    setting: str = ""
    extra: dict = field(default_factory=dict)


def load_bundle_networks(
    bundle_root: str | Path,
    device: torch.device,
    diffusion_path: str | Path | None = None,
    classifier_path: str | Path | None = None,
) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """
    The diffusion network and noisy classifier of a bundle, built from its training configs' ``network_def``
    and loaded from ``models/diffusion.pt`` / ``models/classifier.pt`` (``weights_only=True``), or from the
    given paths (weights of a new training run, judged against the committed ones).

    Raises:
        FileNotFoundError: a missing config or diffusion weights file (named).
        ValueError: weights that do not fit the network (see :py:func:`~monai_wsss.apps.load_weights`).
    """
    root = Path(bundle_root)
    nets = []
    for config, weights, given in (
        ("train_diffusion.json", "diffusion.pt", diffusion_path),
        ("train_classifier.json", "classifier.pt", classifier_path),
    ):
        cfg_path, w_path = root / "configs" / config, Path(given) if given else root / "models" / weights
        if not cfg_path.is_file():
            raise FileNotFoundError(f"bundle config not found: {cfg_path}")
        if not w_path.is_file():
            if weights == "diffusion.pt" or given:  # only the bundle's own classifier may be absent
                raise FileNotFoundError(f"{'diffusion' if weights == 'diffusion.pt' else 'classifier'} weights not found: {w_path}")
            nets.append(None)
            continue
        parser = ConfigParser()
        parser.read_config(str(cfg_path))
        name = "diffusion model" if weights == "diffusion.pt" else "noisy classifier"
        nets.append(load_weights(parser.get_parsed_content("network_def"), w_path, device, name=name))
    return nets[0], nets[1]


def load_eval_slices(
    dataset_dir: str | Path,
    task: str,
    split: str = "test",
    max_slices: int | None = 64,
    seed: int = 0,
    split_seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    spatial_size: Sequence[int] = (64, 64),
    cache_dir: str | Path | None = None,
    keep_small_targets: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """
    Positive evaluation slices of one split in model space, a seeded subset of at most ``max_slices``.

    Args:
        keep_small_targets: keep the slices the task's ``eval_min_fraction`` rule drops (CHAOS: kidney under 5 %
            of the slice), as the bundles' training validation does; the CHAOS validation cases have no slice
            left under the rule, so tuning on them needs this.

    Returns:
        ``(images, segs, info)``: (N, 1, h, w) images in [-1, 1], (N, 1, h, w) binary masks, and a dict with the
        number of cases, of positive slices available and of slices used.
    """
    splits = prepare_splits(dataset_dir, task, val_fraction, test_fraction, split_seed)
    if split not in splits or not splits[split]:
        raise ValueError(f"split {split!r} of {dataset_dir} is empty (splits: { {k: len(v) for k, v in splits.items()} }).")
    preset = TASKS[task].replace(eval_min_fraction=None) if keep_small_targets else TASKS[task]
    rule = preset.eval_min_fraction
    ds = build_slice_dataset(splits[split], preset, spatial_size=spatial_size, cache_dir=cache_dir, split="eval")
    positives = [i for i in range(len(ds)) if float(ds[i]["seg"].sum()) > 0]
    if not positives:
        raise ValueError(f"split {split!r} of {dataset_dir} has no slice with target.")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(positives, size=max_slices, replace=False).tolist()) if max_slices and max_slices < len(positives) else positives
    images = torch.stack([torch.as_tensor(ds[i]["image"]) for i in chosen]).float()
    segs = torch.stack([torch.as_tensor(ds[i]["seg"]) for i in chosen]).float()
    info = {
        "split": split,
        "eval_min_fraction": rule,
        "slice_rule": f"slices whose target covers under {rule:.0%} of the slice dropped" if rule else "every slice with target",
        "cases": len(splits[split]),
        "positive_slices": len(positives),
        "slices_used": len(chosen),
        "cases_used": len({ds[i]["case"] for i in chosen}),
    }
    return images, segs, info


def build_methods(
    names: Sequence[str],
    scheduler,
    classifier: torch.nn.Module | None,
    net: torch.nn.Module,
    noise_level: int = 200,
    num_steps: int = 10,
    tau: float = 0.95,
    guidance_scale: float = 10.0,
    guided_num_steps: int | None = None,
    cgdiff_level: int = 400,
    cgdiff_guidance: float = 100.0,
    cfg_scale: float = 3.0,
    threshold: float = 0.7,
    task: str = "brats",
    guided_noise_level: int | None = None,
    guided_tau: float | None = None,
) -> list[MethodSpec]:
    """
    The table's methods by name (see ``ALL_METHODS``). CG-CDM takes ``guided_noise_level`` / ``guided_num_steps`` /
    ``guided_tau`` where given (a bundle's ``inference_cg_cdm.json`` has its own), CDM's otherwise.

    Raises:
        ValueError: an unknown name, a classifier-based method without a classifier, ``cfg`` without a null class.
    """
    specs = []
    for name in names:
        if name not in ALL_METHODS:
            raise ValueError(f"unknown method {name!r}; choose from {ALL_METHODS}.")
        needs_clf = name in CAM_METHODS or name in CLASSIFIER_METHODS
        if needs_clf and classifier is None:
            raise ValueError(f"method {name!r} needs the bundle's classifier (models/classifier.pt).")
        if name == "threshold":
            specs.append(MethodSpec(name, IntensityThresholdInferer(percentile=None), setting="image intensity, Otsu"))
        elif name == "threshold_fixed":
            specs.append(
                MethodSpec(
                    name,
                    IntensityThresholdInferer(percentile=99.0, threshold=threshold),
                    fixed_threshold=threshold,
                    setting=f"intensity / 99th body percentile > {threshold}",
                )
            )
        elif name in CAM_METHODS:
            specs.append(MethodSpec(name, ClassActivationMapInferer(method=name, target_class=1, timestep=0), setting="classifier at t=0"))
        else:  # the diffusion methods exactly as a bundle's inference.json builds them
            q = guided_noise_level if name == "cg_cdm" and guided_noise_level is not None else noise_level
            t = guided_tau if name == "cg_cdm" and guided_tau is not None else tau
            inf = build_method_inferer(
                name, scheduler, net, classifier, noise_level=q, num_steps=num_steps, tau=t,
                guidance_scale=guidance_scale, guided_num_steps=guided_num_steps, cgdiff_level=cgdiff_level,
                cgdiff_guidance=cgdiff_guidance, cfg_scale=cfg_scale,
            )
            if name in ("cdm", "cg_cdm"):  # R as the inferer got it (CG-CDM may have its own)
                setting = f"Q={q}, R={inf.num_steps}, tau={t}" + (f", s={guidance_scale}" if name == "cg_cdm" else "")
            else:
                setting = f"L={cgdiff_level}, " + (f"s={cgdiff_guidance}" if name == "cg_diff" else f"w={cfg_scale}")
            specs.append(MethodSpec(name, inf, default_map_mode(name, task), name in ("cdm", "cg_cdm"), setting=setting))
    return specs


def maps_to_masks(maps: torch.Tensor, images: torch.Tensor, spec: MethodSpec) -> torch.Tensor:
    """The shared post-processing: normalise inside the body, then per-slice Otsu (or the method's fixed threshold)."""
    body = (images > MODEL_INTENSITY_RANGE[0] + 1e-6).float()  # model space maps intensity 0 (background) to -1
    if spec.fixed_threshold is not None:
        return AsDiscrete(threshold=spec.fixed_threshold)(maps).as_subclass(torch.Tensor).float() * body
    norm, otsu = NormalizeMap(mode=spec.map_mode), OtsuThreshold()
    return torch.stack([torch.as_tensor(otsu(norm(m, body_mask=b), body_mask=b)) for m, b in zip(maps, body)]).float()


def method_maps(
    spec: MethodSpec,
    net: torch.nn.Module,
    classifier: torch.nn.Module | None,
    images: torch.Tensor,
    rep: int = 0,
    batch_size: int = 16,
    seed: int = 0,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, float]]:
    """
    One method's maps of ``images`` in batches, the noise of a stochastic method seeded per repeat ``rep`` and
    batch, so that every scoring of the same slices sees the same noise.

    Yields:
        ``(start, x, maps, seconds)``: the batch's first index, its images and float32 maps on the CPU, and the
        seconds the inferer took.
    """
    device = next(net.parameters()).device
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device)
        kwargs = {"classifier": classifier} if classifier is not None else {}
        if spec.stochastic:
            kwargs["generator"] = torch.Generator(device=device).manual_seed(seed + 1000 * rep + start)
        tic = time.perf_counter()
        maps = spec.inferer(x, net, **kwargs).float().cpu()
        yield start, x.cpu(), maps, time.perf_counter() - tic


def evaluate_method(
    spec: MethodSpec,
    net: torch.nn.Module,
    classifier: torch.nn.Module | None,
    images: torch.Tensor,
    segs: torch.Tensor,
    repeats: int = 4,
    batch_size: int = 16,
    seed: int = 0,
) -> dict:
    """
    Maps, masks and scores of one method on the slices, ``repeats`` times with different noise seeds for
    stochastic methods.

    Returns:
        a table row: Dice / IoU / HD95 mean and std over repeats, missing HD95 count, pixel AUROC / AUPRC and
        seconds per slice.
    """
    runs = []
    seconds = 0.0
    for rep in range(repeats if spec.stochastic else 1):
        scores, auc = SegmentationScores(level="slice"), PixelAUCMetric()
        for start, x, maps, sec in method_maps(spec, net, classifier, images, rep, batch_size, seed):
            seconds += sec
            y = segs[start : start + batch_size]
            scores(maps_to_masks(maps, x, spec), y)
            # pixel scores read like the masks are (e.g. |a| for an "abs" map), on the raw scale
            auc(oriented_map(maps, spec.map_mode), y, body_mask=(x > MODEL_INTENSITY_RANGE[0] + 1e-6).float())
        runs.append({**scores.aggregate(), **auc.aggregate()})
    n_runs = len(runs)

    def stat(key: str) -> tuple[float, float]:
        vals = np.array([r[key] for r in runs], dtype=float)
        return float(np.nanmean(vals)), float(np.nanstd(vals)) if n_runs > 1 else 0.0

    row = {"method": spec.name, "setting": spec.setting, "repeats": n_runs, "slices": int(images.shape[0])}
    for key in ("dice", "iou", "hd95", "auroc", "auprc"):
        row[key], row[f"{key}_std"] = stat(key)
    row["hd95_missing"] = float(np.mean([r["num_hd95_missing"] for r in runs]))
    row["sec_per_slice"] = seconds / (n_runs * images.shape[0])
    return row


def write_table(rows: list[dict], out_dir: str | Path, title: str, info: dict) -> str:
    """Write ``table.csv``, ``table.md`` and ``table.png``; return the markdown."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "table.csv", rows)

    def pm(row: dict, key: str, digits: int = 3) -> str:
        if math.isnan(row[key]):
            return "n/a"
        return f"{row[key]:.{digits}f} ± {row[f'{key}_std']:.{digits}f}" if row["repeats"] > 1 else f"{row[key]:.{digits}f}"

    lines = [
        f"### {title}",
        "",
        f"{info['slices_used']} positive slices of {info['cases_used']} {info['split']} cases "
        f"({info['positive_slices']} positive slices in the split; {info.get('slice_rule', 'every slice with target')}); per-slice Otsu after normalisation inside the body "
        "unless a fixed threshold is given; mean ± std over noise seeds for stochastic methods.",
        "",
        "| method | setting | Dice | mIoU | HD95 (px) | HD95 missing | pixel AUROC | pixel AUPRC | s / slice |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['setting']} | {pm(r, 'dice')} | {pm(r, 'iou')} | {pm(r, 'hd95', 1)} | "
            f"{r['hd95_missing']:.0f} | {r['auroc']:.3f} | {r['auprc']:.3f} | {r['sec_per_slice']:.3f} |"
        )
    md = "\n".join(lines) + "\n"
    write_text_atomic(out / "table.md", md)
    write_text_atomic(out / "info.json", json.dumps(info, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(rows), 3.2))
    names = [r["method"] for r in rows]
    ax.bar(names, [r["dice"] for r in rows], yerr=[r["dice_std"] for r in rows], color="tab:blue", capsize=3)
    ax.set_ylabel("Dice (positive slices)")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    with atomic_write(out / "table.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return md


def run_table(args: argparse.Namespace) -> tuple[list[dict], str]:
    """Run the benchmark described by parsed command-line ``args``; see :func:`main`."""
    from monai.networks.schedulers import DDIMScheduler

    # method settings left unset (None) take the bundle's own inference defaults
    for key, value in bundle_method_settings(args.bundle_root).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    net, clf = load_bundle_networks(args.bundle_root, device, args.diffusion_path, args.classifier_path)
    images, segs, info = load_eval_slices(
        args.dataset_dir,
        args.task,
        split=args.split,
        max_slices=args.max_slices,
        seed=args.seed,
        split_seed=args.split_seed,
        spatial_size=(args.size, args.size),
        cache_dir=args.cache_dir,
    )
    sched = DDIMScheduler(num_train_timesteps=args.num_train_timesteps, schedule="linear_beta", clip_sample=False)
    methods = [m for m in args.methods if not (m == "cfg" and getattr(net, "null_class", None) is None and args.skip_unavailable)]
    specs = build_methods(
        methods,
        sched,
        clf,
        net,
        noise_level=args.noise_level,
        num_steps=args.num_steps,
        tau=args.tau,
        guidance_scale=args.guidance_scale,
        guided_num_steps=args.guided_num_steps,
        cgdiff_level=args.cgdiff_level,
        cgdiff_guidance=args.cgdiff_guidance,
        cfg_scale=args.cfg_scale,
        task=args.task,
        guided_noise_level=args.guided_noise_level,
        guided_tau=args.guided_tau,
    )
    rows = []
    for spec in specs:
        # CG-Diff takes minutes per batch on CPU: keep its batches small so progress is visible in logs
        row = evaluate_method(spec, net, clf, images, segs, repeats=args.repeats, batch_size=args.batch_size, seed=args.seed)
        rows.append(row)
        print(json.dumps(row), flush=True)
    title = f"{args.task}: {args.split} split, {args.size}x{args.size}"
    md = write_table(rows, args.out_dir, title, info)
    print(md)
    return rows, md


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m monai_wsss.benchmark table", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle_root", required=True, help="bundle folder with configs/ and models/")
    p.add_argument("--dataset_dir", required=True, help="dataset folder or datalist JSON")
    p.add_argument("--task", default="brats", choices=sorted(TASKS))
    p.add_argument("--split", default="test")
    p.add_argument("--out_dir", default="outputs/table")
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--diffusion_path", default=None, help="diffusion weights (default: <bundle_root>/models/diffusion.pt)")
    p.add_argument("--classifier_path", default=None, help="classifier weights (default: <bundle_root>/models/classifier.pt)")
    p.add_argument("--methods", nargs="+", default=list(ALL_METHODS))
    p.add_argument("--skip_unavailable", action="store_true", help="drop cfg silently-but-logged when the net has no null class")
    p.add_argument("--max_slices", type=int, default=64)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split_seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--num_train_timesteps", type=int, default=1000)
    # method settings: default to the bundle's own inference defaults (configs/inference.json)
    p.add_argument("--noise_level", type=int, default=None, help="CDM / CG-CDM Q (default: the bundle's)")
    p.add_argument("--num_steps", type=int, default=None, help="CDM R (default: the bundle's)")
    p.add_argument("--guided_noise_level", type=int, default=None, help="CG-CDM Q (default: the bundle's)")
    p.add_argument("--guided_num_steps", type=int, default=None, help="CG-CDM R (default: the bundle's)")
    p.add_argument("--guided_tau", type=float, default=None, help="CG-CDM tau (default: the bundle's)")
    p.add_argument("--tau", type=float, default=None, help="CDM / CG-CDM tau (default: the bundle's)")
    p.add_argument("--guidance_scale", type=float, default=None, help="CG-CDM s (default: the bundle's)")
    p.add_argument("--cgdiff_level", type=int, default=None, help="CG-Diff / cfg L (default: the bundle's)")
    p.add_argument("--cgdiff_guidance", type=float, default=None, help="CG-Diff s (default: the bundle's)")
    p.add_argument("--cfg_scale", type=float, default=None, help="classifier-free w (default: the bundle's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def bundle_method_settings(bundle_root: str | Path) -> dict:
    """
    The method settings a bundle user runs with, from the bundle's method configs (``configs/inference_cdm.json``,
    ``inference_cg_cdm.json``, ``inference_cg_diff.json``, ``inference_cfg.json``), under this table's names.

    Raises:
        FileNotFoundError: a method config is missing (named).
        KeyError: a method config lacks a setting (named).
    """
    configs = Path(bundle_root) / "configs"

    def read(method: str) -> dict:
        path = configs / f"inference_{method}.json"
        if not path.is_file():
            raise FileNotFoundError(f"bundle method config not found: {path}")
        return json.loads(path.read_text(encoding="utf-8"))

    sources = {  # this table's name: (method config, key in it)
        "noise_level": ("cdm", "noise_level"), "num_steps": ("cdm", "num_steps"), "tau": ("cdm", "tau"),
        "guidance_scale": ("cg_cdm", "guidance_scale"), "guided_num_steps": ("cg_cdm", "num_steps"),
        "guided_noise_level": ("cg_cdm", "noise_level"), "guided_tau": ("cg_cdm", "tau"),
        "cgdiff_level": ("cg_diff", "noise_level"), "cgdiff_guidance": ("cg_diff", "guidance_scale"),
        "cfg_scale": ("cfg", "cfg_scale"),
    }
    loaded = {m: read(m) for m in {m for m, _ in sources.values()}}
    settings = {}
    for name, (method, key) in sources.items():
        if key not in loaded[method]:
            raise KeyError(f"{configs / f'inference_{method}.json'} lacks the setting {key!r}.")
        settings[name] = loaded[method][key]
    assert set(settings) == set(METHOD_SETTINGS)
    return settings


def main(argv: list[str] | None = None) -> list[dict]:
    args = parser().parse_args(argv)
    if args.skip_unavailable and "cfg" in args.methods:
        print("note: 'cfg' is skipped when the bundle's network has no null class")
    rows, _ = run_table(args)
    return rows
