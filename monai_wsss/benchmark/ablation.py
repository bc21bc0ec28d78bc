# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""
Ablations as the CDM paper's Fig. 3: Dice as a function of the noise level Q, the number of steps R, tau and the
guidance scale s, one parameter at a time around a base setting, plus the noise-seed ensemble.

    python -m monai_wsss.benchmark ablation --bundle_root bundles/brats_cdm --dataset_dir ../shared/data/brats2018 \
        --split validation --out_dir outputs/ablation_brats

Runs on the validation split by default: this is the sweep that chooses the inference defaults, so it must not
see the test cases, and it scores each setting by image-level labels alone (``--criterion slice_auroc``, the
criterion the diffusion training selects its checkpoint by): slice-level AUROC of the map's score
(:py:class:`~monai_wsss.transforms.MapSliceScore`) against the slices' labels (``--labels``, the labels file of
training) on a seeded set of validation slices balanced between the two labels (``--max_slices 0``: every
slice). Slice AUROC rewards telling the labels apart, not the extent of the object, so ``--criterion pseudo_dice``
scores the extent from labels too: Dice of each setting's masks against the validation scans' **pseudo-masks**
(``--pseudo_dir``: the ``<case>_pseudo.nii.gz`` a bundle's training run writes from the image-level labels and its
pseudo-mask rule, the reference its segmenter's checkpoint is chosen by) on the slices labelled 1 whose pseudo-mask
is not empty. ``--criterion pixel_dice`` (Dice
against pixel masks on positive slices, the paper's Fig. 3) reports on the test split only: pixel masks never
choose a setting. ``--joint`` evaluates every combination of the grid instead of one parameter at a time.
Writes ``ablation.csv`` (one row per setting), ``ablation.md`` and, one parameter at a time, ``ablation.png``
(one line plot per parameter).

    python -m monai_wsss.benchmark ablation --bundle_root bundles/brats_cdm --dataset_dir /data/brats \
        --labels labels.csv --joint --grid '{"noise_level": [200, 300], "tau": [0.8, 0.95]}' --params noise_level tau

    # the validation pseudo-masks alone (seconds for the intensity rule), then the extent criterion
    python -m monai.bundle run --run_id pseudo_val_items --config_file bundles/brats_cdm/configs/train.json \
        --bundle_root runs/pm --dataset_dir /data/brats --labels labels.csv
    python -m monai_wsss.benchmark ablation --bundle_root bundles/brats_cdm --dataset_dir /data/brats \
        --labels labels.csv --criterion pseudo_dice --pseudo_dir runs/pm/outputs/pseudo_masks/brats_<digest> ...
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch
from monai.networks.schedulers import DDIMScheduler

from monai_wsss.apps.methods import default_map_mode
from monai_wsss.apps.reports import write_csv
from monai_wsss.benchmark.table import MethodSpec, evaluate_method, load_bundle_networks, load_eval_slices, method_maps
from monai_wsss.bundle import attach_pseudo_masks, load_slice_labels, prepare_splits, select_slices
from monai_wsss.data import TASKS, build_slice_dataset
from monai_wsss.inferers import ConditionDifferenceInferer, NoiseEnsembleInferer
from monai_wsss.metrics.auc import compute_auroc_auprc
from monai_wsss.networks import PRECISIONS, with_precision
from monai_wsss.transforms import MODEL_INTENSITY_RANGE, MapSliceScore
from monai_wsss.utils.atomic_files import atomic_write, write_text_atomic

__all__ = [
    "CRITERIA", "sweep_settings", "joint_settings", "load_labelled_slices", "load_pseudo_mask_slices",
    "evaluate_slice_auroc", "run_ablation", "main",
]

#: what a setting is scored by: image-level labels (slice AUROC; Dice against the pseudo-masks made from them), both
#: of which choose settings, or pixel masks (reports, test split only)
CRITERIA = ("slice_auroc", "pseudo_dice", "pixel_dice")

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


def joint_settings(base: dict, sweeps: dict[str, list]) -> list[tuple[str, dict]]:
    """Every combination of the ``sweeps`` values on top of ``base``: ``[("joint", setting), ...]`` (R <= Q only)."""
    names = list(sweeps)
    settings = []
    for values in itertools.product(*(sweeps[n] for n in names)):
        setting = {**base, **dict(zip(names, values))}
        if setting["num_steps"] <= setting["noise_level"]:
            settings.append(("joint", setting))
    return settings


def _labelled_split(dataset_dir, task: str, labels, split: str, split_seed: int) -> tuple:
    """The parsed labels file and one split's items (the bundles' 0.1 / 0.2 split); an empty split is an error."""
    parsed = load_slice_labels(labels)
    splits = prepare_splits(dataset_dir, task, 0.1, 0.2, split_seed, labels=parsed)
    if not splits.get(split):
        raise ValueError(f"split {split!r} of {dataset_dir} is empty (splits: { {k: len(v) for k, v in splits.items()} }).")
    return parsed, splits[split]


def load_labelled_slices(
    dataset_dir: str | Path,
    task: str,
    labels: str | Path | None,
    split: str = "validation",
    max_slices: int | None = 96,
    seed: int = 0,
    split_seed: int = 0,
    spatial_size: tuple[int, int] = (64, 64),
    cache_dir: str | Path | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """
    Slices of one split with their image-level labels, balanced between the labels (at most ``max_slices // 2``
    of each; ``max_slices`` 0 or ``None``: every slice), as the diffusion training's validation draws them (``train_diffusion.json``: ``split="eval"``, no
    minimum-target rule, :py:func:`~monai_wsss.bundle.select_slices` with ``balanced=True``). The labels come from
    ``labels`` (a labels CSV), or, without one, from the masks by the task's rule, the rule that writes such a file.

    Returns:
        ``(images, slice_labels, info)``: (N, 1, h, w) images in model space, (N,) labels 0 / 1, and a dict with the
        split, the number of cases and of slices of each label used.

    Raises:
        ValueError: an empty split, or a split without slices of both labels.
    """
    parsed, cases = _labelled_split(dataset_dir, task, labels, split, split_seed)
    preset = TASKS[task].replace(eval_min_fraction=None)
    ds = build_slice_dataset(cases, preset, spatial_size=spatial_size, cache_dir=cache_dir, split="eval", labels=parsed)
    chosen = select_slices(ds, max_slices=max_slices, seed=seed, balanced=True)
    items = [chosen[i] for i in range(len(chosen))]
    slice_labels = torch.tensor([int(item["label"]) for item in items])
    if slice_labels.min() == slice_labels.max():
        raise ValueError(f"split {split!r} of {dataset_dir} has slices of one label only: a slice AUROC needs both.")
    images = torch.stack([torch.as_tensor(item["image"]) for item in items]).float()
    info = {
        "split": split,
        "criterion": "slice_auroc",
        "labels": str(labels) if labels else "from the masks by the task's rule",
        "cases": len(cases),
        "slices_used": len(items),
        "positive_slices_used": int(slice_labels.sum()),
        "cases_used": len({item["case"] for item in items}),
    }
    return images, slice_labels, info


def load_pseudo_mask_slices(
    dataset_dir: str | Path,
    task: str,
    labels: str | Path,
    pseudo_dir: str | Path,
    split: str = "validation",
    max_slices: int | None = 64,
    seed: int = 0,
    split_seed: int = 0,
    spatial_size: tuple[int, int] = (64, 64),
    cache_dir: str | Path | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """
    Slices of one split labelled 1 (by the labels file) with their pseudo-masks, the labels-only reference of an
    object's extent: each case's ``<case>_pseudo.nii.gz`` in ``pseudo_dir`` (as
    :py:class:`~monai_wsss.apps.PseudoMaskGenerator` writes them), moved to model space with the image. Slices whose
    pseudo-mask is empty at ``spatial_size`` (the rule found nothing there) have no extent to score and are left
    out; a seeded subset of at most ``max_slices`` (0 or ``None``: all) is kept.

    Returns:
        ``(images, pseudo_masks, info)``: (N, 1, h, w) images in model space, (N, 1, h, w) binary pseudo-masks, and a
        dict with the split, the number of cases and of slices used.

    Raises:
        ValueError: no ``labels`` or ``pseudo_dir``; an empty split; a missing pseudo-mask (naming the file and the
            case); a split without a labelled-positive slice with a non-empty pseudo-mask.

    Example::

        images, pseudo, info = load_pseudo_mask_slices("/data/brats", "brats", "labels.csv",
                                                       "runs/pm/outputs/pseudo_masks/brats_a713ce1ff87d")
    """
    if not labels or not pseudo_dir:
        raise ValueError("--criterion pseudo_dice needs --labels and --pseudo_dir (the pseudo-masks).")
    parsed, cases = _labelled_split(dataset_dir, task, labels, split, split_seed)
    items = attach_pseudo_masks(cases, pseudo_dir, key="pseudo", argument="--pseudo_dir")
    preset = TASKS[task].replace(eval_min_fraction=None)
    ds = build_slice_dataset(
        items, preset, spatial_size=spatial_size, cache_dir=cache_dir, split="eval", labels=parsed,
        extra_mask_keys=("pseudo",),
    )
    positives = [i for i in range(len(ds)) if int(ds[i]["label"]) == 1 and float(ds[i]["pseudo"].sum()) > 0]
    if not positives:
        raise ValueError(
            f"split {split!r} of {dataset_dir}: no slice labelled 1 has a non-empty pseudo-mask in {pseudo_dir}."
        )
    rng = np.random.default_rng(seed)
    if max_slices and max_slices < len(positives):
        positives = sorted(rng.choice(positives, size=max_slices, replace=False).tolist())
    images = torch.stack([torch.as_tensor(ds[i]["image"]) for i in positives]).float()
    pseudo = torch.stack([torch.as_tensor(ds[i]["pseudo"]) for i in positives]).float()
    info = {
        "split": split,
        "criterion": "pseudo_dice",
        "labels": str(labels),
        "pseudo_dir": str(pseudo_dir),
        "cases": len(items),
        "slices_used": len(positives),
        "cases_used": len({ds[i]["case"] for i in positives}),
    }
    return images, pseudo, info


def evaluate_slice_auroc(
    spec: MethodSpec,
    net: torch.nn.Module,
    classifier: torch.nn.Module | None,
    images: torch.Tensor,
    slice_labels: torch.Tensor,
    repeats: int = 2,
    batch_size: int = 32,
    seed: int = 0,
) -> dict:
    """
    Slice AUROC (and AUPRC) of one setting's maps against image-level labels, mean and std over ``repeats`` noise
    seeds: each slice scored by :py:class:`~monai_wsss.transforms.MapSliceScore` in the setting's map mode inside
    the body, as the diffusion training scores its checkpoints.

    Returns:
        a row: ``slice_auroc``, ``slice_auroc_std``, ``slice_auprc``, ``repeats``, ``slices``, ``sec_per_slice``.
    """
    score = MapSliceScore(mode=spec.map_mode)
    runs, seconds = [], 0.0
    for rep in range(repeats if spec.stochastic else 1):
        scores = []
        for _, x, maps, sec in method_maps(spec, net, classifier, images, rep, batch_size, seed):
            seconds += sec
            body = (x > MODEL_INTENSITY_RANGE[0] + 1e-6).float()
            scores += [score(m, body_mask=b) for m, b in zip(maps, body)]
        runs.append(compute_auroc_auprc(torch.cat(scores), slice_labels))
    aurocs = np.array([r["auroc"] for r in runs])
    return {
        "slice_auroc": float(aurocs.mean()),
        "slice_auroc_std": float(aurocs.std()) if len(runs) > 1 else 0.0,
        "slice_auprc": float(np.mean([r["auprc"] for r in runs])),
        "repeats": len(runs),
        "slices": int(images.shape[0]),
        "sec_per_slice": seconds / (len(runs) * images.shape[0]),
    }


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
    """
    Run the sweep described by parsed ``args``; see :func:`main`.

    Raises:
        ValueError: ``--criterion pixel_dice`` on a split other than ``test``; ``pseudo_dice`` without ``--labels``
            and ``--pseudo_dir``; unknown grid parameters; a guidance sweep without a classifier.
    """
    if args.criterion == "pixel_dice" and args.split != "test":
        raise ValueError(
            f"--criterion pixel_dice scores with pixel masks, which only score the test split; got --split {args.split}. "
            "Choose settings with --criterion slice_auroc (image-level labels)."
        )
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    net, clf = load_bundle_networks(args.bundle_root, device, args.diffusion_path, args.classifier_path)
    net, clf = with_precision(net.eval(), args.precision), with_precision(clf.eval() if clf is not None else None, args.precision)
    size = (args.size, args.size)
    if args.criterion == "slice_auroc":
        images, targets, info = load_labelled_slices(
            args.dataset_dir, args.task, args.labels, split=args.split, max_slices=args.max_slices, seed=args.seed,
            spatial_size=size, cache_dir=args.cache_dir,
        )
    elif args.criterion == "pseudo_dice":
        images, targets, info = load_pseudo_mask_slices(
            args.dataset_dir, args.task, args.labels, args.pseudo_dir, split=args.split, max_slices=args.max_slices,
            seed=args.seed, spatial_size=size, cache_dir=args.cache_dir,
        )
    else:
        images, targets, info = load_eval_slices(
            args.dataset_dir, args.task, split=args.split, max_slices=args.max_slices, seed=args.seed,
            spatial_size=size, cache_dir=args.cache_dir, keep_small_targets=args.keep_small_targets,
        )
        info["criterion"] = "pixel_dice"
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
    info.update(map_mode=map_mode, precision=args.precision, diffusion_path=str(args.diffusion_path or "the bundle's"))
    rows, cache = [], {}
    for param, setting in (joint_settings if args.joint else sweep_settings)(base, sweeps):
        key = json.dumps(setting, sort_keys=True)
        if key not in cache:  # the base setting appears in every sweep: evaluate it once
            spec = _spec(setting, sched, clf, map_mode)
            guide = clf if setting["guidance_scale"] > 0 else None
            evaluate = evaluate_slice_auroc if args.criterion == "slice_auroc" else evaluate_method
            cache[key] = evaluate(spec, net, guide, images, targets, repeats=args.repeats, batch_size=args.batch_size, seed=args.seed)
        row = {"parameter": param, **setting, **{k: v for k, v in cache[key].items() if k not in ("method", "setting")}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_ablation(rows, args.out_dir, info)
    return rows


def write_ablation(rows: list[dict], out_dir: str | Path, info: dict) -> None:
    """
    ``ablation.csv``, ``ablation.md`` (one table per swept parameter, or for a joint sweep one table, best first)
    and, one parameter at a time, ``ablation.png`` (the criterion vs each swept parameter).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "ablation.csv", rows)
    criterion = info.get("criterion", "pixel_dice")
    by_labels = criterion == "slice_auroc"
    metric, label = ("slice_auroc", "slice AUROC") if by_labels else ("dice", "Dice")
    if by_labels:
        header = (f"{info['slices_used']} {info['split']} slices of {info['cases_used']} cases "
                  f"({info['positive_slices_used']} labelled target present; labels: {info['labels']}), scored by slice AUROC")
        columns, extra = ["slice AUROC", "slice AUPRC", "s / slice"], lambda r: [f"{r['slice_auprc']:.3f}", f"{r['sec_per_slice']:.3f}"]
    elif criterion == "pseudo_dice":
        header = (f"{info['slices_used']} {info['split']} slices labelled 1 of {info['cases_used']} cases (labels: "
                  f"{info['labels']}), scored by Dice against their pseudo-masks ({info['pseudo_dir']}; labels only)")
        columns = ["Dice", "mIoU", "HD95", "s / slice"]
        extra = lambda r: [f"{r['iou']:.3f}", f"{r['hd95']:.1f}", f"{r['sec_per_slice']:.3f}"]  # noqa: E731
    else:
        header = (f"{info['slices_used']} positive {info['split']} slices of {info['cases_used']} cases "
                  f"({info.get('slice_rule', 'every slice with target')}), scored by Dice against pixel masks")
        columns, extra = ["Dice", "mIoU", "HD95", "pixel AUROC"], lambda r: [f"{r['iou']:.3f}", f"{r['hd95']:.1f}", f"{r['auroc']:.3f}"]
    lines = [f"{header}; map mode {info.get('map_mode', 'signed')!r}; mean ± std over noise seeds when repeated.", ""]

    def value(r: dict) -> str:
        return f"{r[metric]:.3f} ± {r[f'{metric}_std']:.3f}" if r["repeats"] > 1 else f"{r[metric]:.3f}"

    params = list(dict.fromkeys(r["parameter"] for r in rows))
    if params == ["joint"]:
        names = [k for k in SWEEPS if len({r[k] for r in rows}) > 1]
        lines += ["| " + " | ".join(names + columns) + " |", "|" + "---|" * (len(names) + len(columns))]
        for r in sorted(rows, key=lambda r: -r[metric]):
            lines.append("| " + " | ".join([str(r[k]) for k in names] + [value(r)] + extra(r)) + " |")
        write_text_atomic(out / "ablation.md", "\n".join(lines + [""]))
        return
    for p in params:
        lines += [f"| {p} | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        for r in (r for r in rows if r["parameter"] == p):
            lines.append("| " + " | ".join([str(r[p]), value(r)] + extra(r)) + " |")
        lines.append("")
    write_text_atomic(out / "ablation.md", "\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(params), figsize=(3.0 * len(params), 2.8), squeeze=False)
    for ax, p in zip(axes[0], params):
        sel = [r for r in rows if r["parameter"] == p]
        xs = np.array([r[p] for r in sel], dtype=float)
        ax.errorbar(xs, [r[metric] for r in sel], yerr=[r[f"{metric}_std"] for r in sel], marker="o", capsize=3)
        ax.set_xlabel(p)
        ax.set_ylabel(label)
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
    p.add_argument("--labels", default=None,
                   help="labels CSV of training (slice_auroc: default the task's rule on the masks; pseudo_dice: "
                        "required)")
    p.add_argument("--criterion", default="slice_auroc", choices=CRITERIA,
                   help="slice_auroc: image-level labels; pseudo_dice: Dice against the pseudo-masks made from "
                        "them (both choose settings); pixel_dice: pixel masks (test split only)")
    p.add_argument("--pseudo_dir", default=None,
                   help="folder of the split's <case>_pseudo.nii.gz (--criterion pseudo_dice)")
    p.add_argument("--joint", action="store_true", help="every combination of the grid, not one parameter at a time")
    p.add_argument("--diffusion_path", default=None, help="diffusion weights (default: <bundle_root>/models/diffusion.pt)")
    p.add_argument("--classifier_path", default=None, help="classifier weights (default: <bundle_root>/models/classifier.pt)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="as the bundles' precision option")
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
