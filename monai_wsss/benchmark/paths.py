# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""
Which fast path pays: the CDM map, the classifier's input gradient (CG-CDM guidance) and a training step, each
timed with the fast paths off ("before": contiguous float32, MONAI's einsum attention), one at a time
("channels_last", "fused_attention") and both ("after", the default), paired in one process
(:py:func:`monai_wsss.benchmark.paired.paired_medians`), with the results checked against "before".

    python -m monai_wsss.benchmark paths --out_dir outputs/paths [--parts cdm,guidance,train,curve] [--repeats 9]

``curve`` trains the diffusion U-Net "before" and "after" from the same weights on the same batches (synthetic
64 x 64 slices: a smooth background, a bright disc on class-1 slices) for ``--iterations`` AdamW steps, one step of
each in turn, and reports both loss curves and the median time per iteration: the training speed-up with the
evidence that it trains the same. Where the CPU computes bfloat16 natively (:py:func:`~monai_wsss.networks.native_bfloat16`),
the training parts add "bfloat16": "after" under bfloat16 autocast (:py:class:`~monai_wsss.networks.AutocastNetwork`,
float32 weights and optimiser, the training configs' ``precision`` option); its losses differ from float32 by more
than rounding, so the curve shows whether it trains the same within noise.

Networks are the bundles' sizes (:py:data:`monai_wsss.benchmark.speed.UNET_DEFAULTS`, the default
``NoisyClassifier``) with random weights (timing does not depend on their values).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from monai.networks.schedulers import DDIMScheduler

from monai_wsss.benchmark.paired import cpu_info, paired_medians
from monai_wsss.benchmark.speed import UNET_DEFAULTS, write_result
from monai_wsss.inferers import ConditionDifferenceInferer
from monai_wsss.inferers._ddim import classifier_log_prob_grad
from monai_wsss.networks import AutocastNetwork, native_bfloat16, to_memory_format
from monai_wsss.networks.nets import ConditionalDiffusionUNet, NoisyClassifier
from monai_wsss.utils import reuse_freed_memory

__all__ = ["VARIANTS", "PARTS", "MAP_TOLERANCE", "build_variants", "loss_curves", "run_paths_benchmark", "synthetic_batch", "main"]

#: variant -> (memory format, fused attention)
VARIANTS = {
    "before": ("contiguous", False),
    "channels_last": ("channels_last", False),
    "fused_attention": ("contiguous", True),
    "after": ("channels_last", True),
}
PARTS = ("cdm", "guidance", "train", "curve")
#: largest allowed |map - before map| (float32 rounding, amplified by 1 / (1 - tau) = 20 and R steps)
MAP_TOLERANCE = 1e-3
#: largest allowed |gradient - before gradient| relative to the gradient's largest magnitude
GRAD_TOLERANCE = 1e-4


def _perturbed(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():  # untrained MONAI nets output zeros: random weights give real maps
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return module


def build_variants(kind: str, size: int = 64, train: bool = False, bfloat16: bool = False) -> dict[str, torch.nn.Module]:
    """
    The network ``kind`` ("unet" or "classifier") in every :py:data:`VARIANTS` entry, all with the same weights,
    and with ``bfloat16`` also "bfloat16": "after" under bfloat16 autocast (its own copy of the weights).

    Raises:
        ValueError: an unknown ``kind``.
    """
    if kind not in ("unet", "classifier"):
        raise ValueError(f"kind must be 'unet' or 'classifier', got {kind!r}.")

    def make(fused: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        if kind == "unet":
            return ConditionalDiffusionUNet(**UNET_DEFAULTS, use_flash_attention=fused)
        return NoisyClassifier(spatial_dims=2, in_channels=1, num_classes=2, input_shape=(size, size), use_flash_attention=fused)

    weights = _perturbed(make(False)).state_dict()
    nets = {}
    for name, (fmt, fused) in VARIANTS.items():
        net = make(fused)
        net.load_state_dict(weights)
        nets[name] = to_memory_format(net.train(train), fmt)
    if bfloat16:
        net = make(True)
        net.load_state_dict(weights)
        nets["bfloat16"] = AutocastNetwork(net.train(train))
    return nets


def run_paths_benchmark(
    parts: tuple[str, ...] = PARTS,
    cdm_batches: tuple[int, ...] = (8, 16),
    train_batch: int = 16,
    repeats: int = 9,
    size: int = 64,
    noise_level: int = 100,
    num_steps: int = 10,
    tau: float = 0.95,
    iterations: int = 50,
) -> dict:
    """
    Time the parts and check every variant's result against "before".

    Returns:
        a dict: CPU, settings and per part and batch the median seconds per variant, ratios before / variant and
        the largest differences from "before".

    Raises:
        ValueError: an unknown part; a variant's map or gradient beyond :py:data:`MAP_TOLERANCE` /
            :py:data:`GRAD_TOLERANCE` of "before" (a fast path that changes results is no fast path).
    """
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"parts must be among {PARTS}, got {sorted(unknown)}.")
    result: dict = {
        "cpu": cpu_info(),
        "repeats": repeats,
        "settings": {"size": size, "noise_level": noise_level, "num_steps": num_steps, "tau": tau, "train_batch": train_batch},
        "map_tolerance": MAP_TOLERANCE,
        "grad_tolerance": GRAD_TOLERANCE,
        "parts": {},
    }

    def record(part: str, med: dict, per: int, **extra) -> None:
        result["parts"][part] = {
            "seconds": med,
            "seconds_per_slice": {k: v / per for k, v in med.items()},
            "speedup": {k: med["before"] / v for k, v in med.items()},
            **extra,
        }

    gen = torch.Generator().manual_seed(1)
    if "cdm" in parts:
        nets = build_variants("unet", size)
        sched = DDIMScheduler(num_train_timesteps=1000, schedule="linear_beta", clip_sample=False)
        cdm = ConditionDifferenceInferer(sched, noise_level=noise_level, num_steps=num_steps, tau=tau)
        for b in cdm_batches:
            x = torch.rand(b, 1, size, size, generator=gen) * 2 - 1
            noise = torch.randn(b, 1, size, size, generator=gen)
            with torch.inference_mode():
                maps = {k: cdm(x, n, noise=noise) for k, n in nets.items()}
            diffs = {k: float((m - maps["before"]).abs().max()) for k, m in maps.items()}
            if max(diffs.values()) > MAP_TOLERANCE:
                raise ValueError(f"CDM maps differ from the float32 contiguous reference beyond {MAP_TOLERANCE}: {diffs}")

            def run(n, x=x, noise=noise):
                with torch.inference_mode():
                    cdm(x, n, noise=noise)

            med = paired_medians({k: (lambda n=n: run(n)) for k, n in nets.items()}, repeats)
            record(f"cdm_batch{b}", med, b, map_max_abs_diff=diffs, map_max_abs=float(maps["before"].abs().max()))
    if "guidance" in parts:
        clfs = build_variants("classifier", size)
        b = 2 * max(cdm_batches)  # CG-CDM guides both branches in one call
        x = torch.randn(b, 1, size, size, generator=gen)
        target = torch.arange(b) % 2
        grads = {k: classifier_log_prob_grad(c, x, noise_level, target) for k, c in clfs.items()}
        scale = float(grads["before"].abs().max())
        diffs = {k: float((g - grads["before"]).abs().max()) / scale for k, g in grads.items()}
        if max(diffs.values()) > GRAD_TOLERANCE:
            raise ValueError(f"classifier input gradients differ from the reference beyond {GRAD_TOLERANCE} (relative): {diffs}")
        med = paired_medians({k: (lambda c=c: classifier_log_prob_grad(c, x, noise_level, target)) for k, c in clfs.items()}, repeats)
        record(f"guidance_batch{b}", med, b, grad_max_rel_diff=diffs)
    bfloat16 = native_bfloat16("cpu")
    result["bfloat16_training"] = bfloat16
    if "train" in parts:
        for kind in ("unet", "classifier"):
            nets = build_variants(kind, size, train=True, bfloat16=bfloat16)
            x = torch.randn(train_batch, 1, size, size, generator=gen)
            t = torch.randint(0, 1000, (train_batch,), generator=gen)
            y = torch.randint(0, 2, (train_batch,), generator=gen)

            def step(net, opt, kind=kind, x=x, t=t, y=y):
                opt.zero_grad(set_to_none=True)
                if kind == "unet":
                    loss = torch.nn.functional.mse_loss(net(x, t, class_labels=y), x)
                else:
                    loss = torch.nn.functional.cross_entropy(net(x, t), y)
                loss.backward()
                opt.step()

            fns = {k: (lambda n=n, o=torch.optim.AdamW(n.parameters(), lr=2e-4): step(n, o)) for k, n in nets.items()}
            med = paired_medians(fns, repeats)
            record(f"train_{kind}_batch{train_batch}", med, 1)
    if "curve" in parts:
        result["parts"][f"curve_batch{train_batch}"] = loss_curves(iterations, train_batch, size, bfloat16=bfloat16)
    return result


def synthetic_batch(batch: int, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` slices in [-1, 1] and their labels: a smooth random background, a bright disc where label 1."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    labels = torch.randint(0, 2, (batch,), generator=gen)
    coef = torch.rand(batch, 3, generator=gen) - 0.5
    img = 0.2 + coef[:, :1, None] * xx + coef[:, 1:2, None] * yy + 0.1 * coef[:, 2:, None] * xx * yy
    centre = torch.rand(batch, 2, generator=gen) - 0.5
    radius = 0.15 + 0.2 * torch.rand(batch, generator=gen)
    disc = ((xx - centre[:, 0, None, None]) ** 2 + (yy - centre[:, 1, None, None]) ** 2) < radius[:, None, None] ** 2
    img = img + 0.6 * (disc & (labels[:, None, None] == 1))
    return (img.clamp(0, 1) * 2 - 1)[:, None], labels


def loss_curves(iterations: int = 50, batch: int = 16, size: int = 64, lr: float = 2e-4, bfloat16: bool = False) -> dict:
    """
    Train "before" and "after" U-Nets (and with ``bfloat16`` "bfloat16", see :py:func:`build_variants`) from the
    same weights on the same batches, noise and timesteps (eps-MSE, AdamW, as ``train_diffusion.json``), one
    iteration of each in turn.

    Returns:
        ``{"losses": {variant: [...]}, "seconds": {variant: median s / iteration}, "speedup", "max_abs_loss_diff":
        {variant: largest |loss - before loss|}, "mean_last10": {variant: ...}}``.
    """
    from monai.networks.schedulers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta", beta_start=0.0001, beta_end=0.02, clip_sample=False)
    nets = {k: v for k, v in build_variants("unet", size, train=True, bfloat16=bfloat16).items() if k in ("before", "after", "bfloat16")}
    opts = {k: torch.optim.AdamW(n.parameters(), lr=lr, weight_decay=0.0) for k, n in nets.items()}
    gen = torch.Generator().manual_seed(0)
    losses: dict[str, list[float]] = {k: [] for k in nets}
    times: dict[str, list[float]] = {k: [] for k in nets}
    for _ in range(iterations):
        x0, y = synthetic_batch(batch, size, gen)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        xt = sched.add_noise(original_samples=x0, noise=noise, timesteps=t)
        for k, net in nets.items():
            start = time.perf_counter()
            opts[k].zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(net(xt, t, class_labels=y), noise)
            loss.backward()
            opts[k].step()
            times[k].append(time.perf_counter() - start)
            losses[k].append(float(loss))
    sec = {k: statistics.median(v[1:] if len(v) > 1 else v) for k, v in times.items()}  # first iteration warms up
    return {
        "iterations": iterations,
        "losses": losses,
        "seconds": sec,
        "speedup": {k: sec["before"] / v for k, v in sec.items()},
        "max_abs_loss_diff": {k: max(abs(a - b) for a, b in zip(losses["before"], v)) for k, v in losses.items()},
        "mean_last10": {k: statistics.fmean(v[-10:]) for k, v in losses.items()},
    }


def to_markdown(result: dict) -> str:
    """The result as markdown: one table per part, seconds (per slice for maps) and speed-up over "before"."""
    cpu = result["cpu"]
    lines = [
        f"CPU {cpu['model']} (flags: {', '.join(cpu['flags']) or 'none'}), torch {cpu['torch']}, {cpu['threads']} threads; "
        f"median of {result['repeats']} paired repeats; settings {result['settings']}.",
    ]
    for part, r in result["parts"].items():
        if part.startswith("curve"):
            lines += ["", f"**{part}** ({r['iterations']} iterations, same weights, batches, noise and timesteps)", "",
                      "| variant | s / iteration | x faster than before | mean loss, last 10 |", "|---|---|---|---|"]
            for name, sec in r["seconds"].items():
                lines.append(f"| {name} | {sec:.3f} | {r['speedup'][name]:.2f} | {r['mean_last10'][name]:.4f} |")
            diffs = ", ".join(f"{k} {v:.1e}" for k, v in r["max_abs_loss_diff"].items() if k != "before")
            lines.append(f"\nlargest |loss - loss before| over the run: {diffs}")
            continue
        per_slice = not part.startswith("train")
        lines += ["", f"**{part}**", "", f"| variant | {'s / slice' if per_slice else 's / step'} | x faster than before |", "|---|---|---|"]
        for name, sec in r["seconds_per_slice" if per_slice else "seconds"].items():
            lines.append(f"| {name} | {sec:.4f} | {r['speedup'][name]:.2f} |")
        if "map_max_abs_diff" in r:
            lines.append(f"\nmax |map - before| {max(r['map_max_abs_diff'].values()):.1e} (map max {r['map_max_abs']:.3f}, "
                         f"tolerance {result['map_tolerance']})")
        if "grad_max_rel_diff" in r:
            lines.append(f"\nmax |grad - before| / max |grad| {max(r['grad_max_rel_diff'].values()):.1e} "
                         f"(tolerance {result['grad_tolerance']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m monai_wsss.benchmark paths", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", default="outputs/paths")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, among {','.join(PARTS)}")
    parser.add_argument("--cdm_batches", default="8,16")
    parser.add_argument("--train_batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--iterations", type=int, default=50, help="training iterations of the curve part")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (0: leave torch's choice)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    parts = tuple(p for p in args.parts.split(",") if p)
    if not parts or set(parts) - set(PARTS):
        parser.error(f"--parts must be comma-separated among {PARTS}, got {args.parts!r}")
    try:
        batches = tuple(int(v) for v in args.cdm_batches.split(",") if v)
    except ValueError:
        parser.error(f"--cdm_batches must be comma-separated integers, got {args.cdm_batches!r}")
    if not batches or min(batches) < 1 or args.train_batch < 1 or args.repeats < 1 or args.threads < 0:
        parser.error("--cdm_batches, --train_batch and --repeats must be >= 1 and --threads >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    reuse_freed_memory()
    if args.iterations < 2:
        parser.error(f"--iterations must be >= 2, got {args.iterations}")
    result = run_paths_benchmark(parts, batches, args.train_batch, args.repeats, iterations=args.iterations)
    write_result(args.out_dir, "paths", result, to_markdown(result))
    return result


if __name__ == "__main__":
    main()
