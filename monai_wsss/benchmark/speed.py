# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""
Speed benchmark: per-slice wall time of CDM, CG-CDM and CG-Diff on the same network, batch and device, and the
time of a whole 240 x 240 x 155 volume through CDM with :class:`~monai_wsss.inferers.VolumeInferer`.

    python -m monai_wsss.benchmark speed --out_dir outputs/speed [--bundle_root bundles/brats_cdm]
    python -m monai_wsss.benchmark speed --mode volume --image <case>_flair.nii.gz [--bundle_root ...]

``--mode volume`` times the whole path a bundle user waits for (load, map, post-process, write) on one volume,
per stage and method (see :py:mod:`monai_wsss.benchmark.volume`).

With ``--bundle_root`` each method runs at the defaults of the bundle's method configs (``configs/inference_<method>.json``) with the bundle's
networks; options given on the command line override them. Without it, timing does not depend on the weights'
values, so untrained networks of the bundles' architecture are used unless ``--weights`` are given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from monai.networks.schedulers import DDIMScheduler

from monai_wsss.benchmark.table import bundle_method_settings, load_bundle_networks
from monai_wsss.apps.inputs import load_weights
from monai_wsss.apps.methods import build_method_inferer
from monai_wsss.inferers import VolumeInferer
from monai_wsss.networks import MEMORY_FORMATS, to_memory_format
from monai_wsss.networks.nets import ConditionalDiffusionUNet, NoisyClassifier
from monai_wsss.utils import reuse_freed_memory, write_text_atomic

__all__ = ["default_networks", "time_call", "run_speed_benchmark", "resolve_speed_settings", "write_result", "main"]

# speed option -> the bundle method setting (bundle_method_settings) that gives its default, and the default without a bundle
SPEED_SETTINGS = {
    "cdm_noise_level": ("noise_level", 200),
    "cdm_steps": ("num_steps", 10),
    "cdm_guidance": ("guidance_scale", 10.0),
    "cg_cdm_steps": ("guided_num_steps", None),
    "cgdiff_level": ("cgdiff_level", 400),
    "cgdiff_guidance": ("cgdiff_guidance", 100.0),
}

#: the bundles' diffusion U-Net size with MONAI's additive conditioning (the CHAOS bundle's; the BraTS bundle's takes the
#: label through scale-shift GroupNorm since 0.14.0, so its weights load with ``--bundle_root``, not ``--weights``)
UNET_DEFAULTS = dict(
    spatial_dims=2,
    in_channels=1,
    out_channels=1,
    num_classes=2,
    channels=(32, 64, 64),
    attention_levels=(False, False, True),
    num_res_blocks=1,
    num_head_channels=32,
    norm_num_groups=8,
)


def default_networks(
    size: int = 64, weights: str | None = None, classifier_weights: str | None = None, device: str = "cpu"
) -> tuple[ConditionalDiffusionUNet, NoisyClassifier]:
    """The bundles' diffusion U-Net size (:py:data:`UNET_DEFAULTS`) and noisy classifier, optionally loaded from checkpoints."""
    net = ConditionalDiffusionUNet(**UNET_DEFAULTS)
    clf = NoisyClassifier(spatial_dims=2, in_channels=1, num_classes=2, input_shape=(size, size))
    if weights:
        net = load_weights(net, weights, device, name="diffusion model")
    if classifier_weights:
        clf = load_weights(clf, classifier_weights, device, name="noisy classifier")
    return net.to(device).eval(), clf.to(device).eval()


def time_call(fn, repeats: int = 1) -> float:
    """Best wall time in seconds of ``repeats`` calls of ``fn`` (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run_speed_benchmark(
    batch: int = 8,
    size: int = 64,
    cdm_noise_level: int = 200,
    cdm_steps: int = 10,
    cdm_guidance: float = 10.0,
    cg_cdm_steps: int | None = None,
    cgdiff_level: int = 400,
    cgdiff_guidance: float = 100.0,
    volume_shape: tuple[int, int, int] = (240, 240, 155),
    volume_batch: int = 8,
    weights: str | None = None,
    classifier_weights: str | None = None,
    device: str = "cpu",
    bundle_root: str | None = None,
    memory_format: str = "auto",
) -> dict:
    """
    Time every method on one batch of ``batch`` slices and CDM on a whole volume.

    CDM runs ``cdm_steps`` steps, CG-CDM ``cg_cdm_steps`` (``None``: ``cdm_steps``), as the bundles' ``num_steps``
    and ``guided_num_steps``. With ``bundle_root`` the networks are the bundle's. Both networks run in
    ``memory_format`` (:py:func:`monai_wsss.networks.to_memory_format`; ``"auto"``, the inference default:
    channels-last on the CPU).

    Returns:
        a dict with seconds per slice of each method, ratios to CDM and the volume time.

    Raises:
        ValueError: ``bundle_root`` together with ``weights`` or ``classifier_weights`` (one source of networks).
        FileNotFoundError: the bundle has no classifier weights.
    """
    if bundle_root is not None and (weights or classifier_weights):
        raise ValueError("give either bundle_root (--bundle_root) or weights / classifier_weights, not both.")
    if bundle_root is not None:
        net, clf = load_bundle_networks(bundle_root, torch.device(device))
        if clf is None:
            raise FileNotFoundError(f"the speed benchmark needs the classifier: {Path(bundle_root) / 'models' / 'classifier.pt'}")
    else:
        net, clf = default_networks(size, weights, classifier_weights, device)
    net, clf = to_memory_format(net, memory_format), to_memory_format(clf, memory_format)
    sched = DDIMScheduler(num_train_timesteps=1000, schedule="linear_beta", clip_sample=False)
    x = torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(0), device=device) * 2 - 1
    # built as the bundles build them, so CG-CDM's own R follows the same rule
    methods = {
        name: build_method_inferer(
            name, sched, net, clf, noise_level=cdm_noise_level, num_steps=cdm_steps, guidance_scale=cdm_guidance,
            guided_num_steps=cg_cdm_steps, cgdiff_level=cgdiff_level, cgdiff_guidance=cgdiff_guidance,
        )
        for name in ("cdm", "cg_cdm", "cg_diff")
    }
    result: dict = {
        "device": device,
        "threads": torch.get_num_threads(),
        "memory_format": memory_format,
        "batch": batch,
        "size": size,
        "settings": {
            "cdm": {"noise_level": cdm_noise_level, "num_steps": cdm_steps},
            "cg_cdm": {"noise_level": cdm_noise_level, "num_steps": methods["cg_cdm"].num_steps, "guidance_scale": cdm_guidance},
            "cg_diff": {"noise_level": cgdiff_level, "guidance_scale": cgdiff_guidance},
        },
        "seconds_per_slice": {},
    }
    for name, inferer in methods.items():
        # the slow method is timed once (after warm-up on a single slice), the fast ones best of 3
        repeats = 1 if name == "cg_diff" else 3
        if name == "cg_diff":
            inferer(x[:1], net)
            start = time.perf_counter()
            inferer(x, net)
            seconds = time.perf_counter() - start
        else:
            seconds = time_call(lambda inf=inferer: inf(x, net), repeats)
        result["seconds_per_slice"][name] = seconds / batch
    sps = result["seconds_per_slice"]
    result["ratio_to_cdm"] = {k: v / sps["cdm"] for k, v in sps.items()}

    # a brain-like volume: an ellipsoid filling the middle ~60 % of the slices, empty slices above and below
    h, w, d = volume_shape
    zz, yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), np.linspace(-1, 1, d), indexing="ij")
    brain = (zz / 0.8) ** 2 + (yy / 0.9) ** 2 + (xx / 0.6) ** 2 <= 1
    volume = torch.as_tensor(brain * np.random.default_rng(0).uniform(0.2, 1.0, brain.shape), dtype=torch.float32)
    volume = volume[None, None].to(device)
    vi = VolumeInferer(methods["cdm"], roi_size=(size, size), slice_axis=-1, sw_batch_size=volume_batch)
    start = time.perf_counter()
    vi(volume, net)
    result["volume"] = {
        "shape": list(volume_shape),
        "slices_with_body": int(brain.any(axis=(0, 1)).sum()),
        "cdm_seconds": time.perf_counter() - start,
        "sw_batch_size": volume_batch,
    }
    return result


def to_markdown(result: dict) -> str:
    """The benchmark result as a markdown table."""
    lines = [
        f"Device {result['device']}, {result['threads']} threads, batch {result['batch']} slices of "
        f"{result['size']} x {result['size']}.",
        "",
        "| method | setting | s / slice | x CDM |",
        "|---|---|---|---|",
    ]
    for name, sec in result["seconds_per_slice"].items():
        setting = ", ".join(f"{k}={v}" for k, v in result["settings"][name].items())
        lines.append(f"| {name} | {setting} | {sec:.3f} | {result['ratio_to_cdm'][name]:.1f} |")
    vol = result["volume"]
    lines += [
        "",
        f"Whole volume {' x '.join(map(str, vol['shape']))} ({vol['slices_with_body']} slices with body) through CDM: "
        f"{vol['cdm_seconds']:.1f} s (VolumeInferer, sw_batch_size {vol['sw_batch_size']}).",
    ]
    return "\n".join(lines)


def resolve_speed_settings(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the method options left unset (None) from ``args.bundle_root``'s inference defaults, else the fallbacks."""
    bundle = bundle_method_settings(args.bundle_root) if args.bundle_root else {}
    for option, (key, fallback) in SPEED_SETTINGS.items():
        if getattr(args, option) is None:
            setattr(args, option, bundle.get(key, fallback))
    return args


def write_result(out_dir: str | Path, name: str, result: dict, markdown: str) -> None:
    """A benchmark's ``<name>.json`` and ``<name>.md`` in ``out_dir`` (created), written atomically; the markdown
    is printed too."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / f"{name}.json", json.dumps(result, indent=2))
    write_text_atomic(out / f"{name}.md", markdown + "\n")
    print(markdown)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    mode = argparse.ArgumentParser(add_help=False)
    mode.add_argument("--mode", choices=("slice", "volume"), default="slice")
    known, rest = mode.parse_known_args(argv)
    if known.mode == "volume":  # the whole user path on one volume, per stage (monai_wsss.benchmark.volume)
        from monai_wsss.benchmark.volume import main as volume_main

        return volume_main(rest)
    argv = rest
    parser = argparse.ArgumentParser(prog="python -m monai_wsss.benchmark speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", default="outputs/speed")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--bundle_root", default=None, help="networks and method defaults of this bundle")
    parser.add_argument("--cdm_noise_level", type=int, default=None, help="CDM / CG-CDM Q (default: bundle's or 200)")
    parser.add_argument("--cdm_steps", type=int, default=None, help="CDM R (default: bundle's or 10)")
    parser.add_argument("--cdm_guidance", type=float, default=None, help="CG-CDM s (default: bundle's or 10)")
    parser.add_argument("--cg_cdm_steps", type=int, default=None, help="CG-CDM R (default: bundle's or --cdm_steps)")
    parser.add_argument("--cgdiff_level", type=int, default=None, help="CG-Diff L (default: bundle's or 400)")
    parser.add_argument("--cgdiff_guidance", type=float, default=None, help="CG-Diff s (default: bundle's or 100)")
    parser.add_argument("--volume_batch", type=int, default=8)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--classifier_weights", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory_format", default="auto", choices=MEMORY_FORMATS,
                        help="networks' memory format (auto: channels-last on the CPU; contiguous: off)")
    args = resolve_speed_settings(parser.parse_args(argv))
    if args.device == "cpu":
        reuse_freed_memory()  # the command's process-wide choice, as in the bundles' runs (docs/performance.md)
    result = run_speed_benchmark(
        batch=args.batch,
        size=args.size,
        cdm_noise_level=args.cdm_noise_level,
        cdm_steps=args.cdm_steps,
        cdm_guidance=args.cdm_guidance,
        cg_cdm_steps=args.cg_cdm_steps,
        cgdiff_level=args.cgdiff_level,
        cgdiff_guidance=args.cgdiff_guidance,
        volume_batch=args.volume_batch,
        weights=args.weights,
        classifier_weights=args.classifier_weights,
        device=args.device,
        bundle_root=args.bundle_root,
        memory_format=args.memory_format,
    )
    write_result(args.out_dir, "speed", result, to_markdown(result))
    return result


if __name__ == "__main__":
    main()
