# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""
Side-by-side CDM timing against the authors' code (Hu et al., MICCAI 2023, ``xhu248/cond_ddpm_wsss`` on GitHub).

    git clone https://github.com/xhu248/cond_ddpm_wsss /path/to/cond_ddpm_wsss
    python -m monai_wsss.benchmark authors --authors_repo /path/to/cond_ddpm_wsss --out_dir outputs/authors

Their code is imported unchanged from ``--authors_repo`` (never copied into this repository): the guided-diffusion
``guided_diffusion.unet.UNetModel`` and ``guided_diffusion.gaussian_diffusion.GaussianDiffusion`` with its
``q_sample`` and ``ddim_sample``. Their CDM loop (``scripts/image_p_seg.py``, ``main_ddim_guided`` without
``--guided``) is reproduced call for call: a second model whose class-0 embedding is replaced by
``tau * f(y1) + (1 - tau) * f(y0)``, then per step one ``ddim_sample`` on each model at batch B and the
difference accumulated on the CPU. Their setting is Q = 400 of a 4000-step linear schedule with learned sigmas
(2 output channels), ours Q = 100 of 1000 (the same noise level, docs), both R = 10, tau = 0.95.

Both networks get random weights at the same size (ours: the bundles' ``ConditionalDiffusionUNet``, 1.11 M
parameters; theirs: ``UNetModel`` with 32 base channels, channel multipliers (1, 2, 2), one residual block per
level, attention at the 16 x 16 level and in the middle, scale-shift norm, 32-channel heads: 1.19 M), so the
time is the implementations', not the training's. Timing is paired: in one process, per repeat, theirs, ours as
configured (the default: channels-last float32 on the CPU, fused attention) and ours with both turned off
("before"), in turn; medians and their ratios are reported (``authors.md`` / ``authors.json``). Where the CPU
computes bfloat16 natively (AVX512-BF16 / AMX), a fourth contender, "ours_bfloat16", is what the BraTS bundle's
``precision`` ``auto`` runs there (:py:class:`~monai_wsss.networks.AutocastNetwork`); its map differs from float32
by bfloat16 rounding (reported), which the bundle's validation showed leaves Dice unchanged to 0.001.

The interface used from their code (all a stand-in must provide): ``unet.UNetModel(image_size, in_channels,
model_channels, out_channels, num_res_blocks, attention_resolutions, channel_mult=..., num_classes=...,
num_head_channels=..., use_scale_shift_norm=...)`` with ``forward(x, timesteps, y)`` and a ``label_emb``
embedding; ``gaussian_diffusion.get_named_beta_schedule(name, steps)``, ``ModelMeanType.EPSILON``,
``ModelVarType.LEARNED_RANGE``, ``LossType.MSE`` and ``GaussianDiffusion(betas=..., model_mean_type=...,
model_var_type=..., loss_type=...)`` with ``q_sample(x, t, noise=...)`` and ``ddim_sample(model, x, t,
model_kwargs={"y": ...})["sample"]``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
from pathlib import Path
from types import ModuleType

import torch
from monai.networks.schedulers import DDIMScheduler

from monai_wsss.benchmark.paired import cpu_info, paired_medians
from monai_wsss.benchmark.speed import UNET_DEFAULTS, write_result
from monai_wsss.inferers import ConditionDifferenceInferer
from monai_wsss.networks import native_bfloat16, with_precision
from monai_wsss.networks.nets import ConditionalDiffusionUNet
from monai_wsss.utils import reuse_freed_memory

__all__ = ["AUTHORS_UNET", "load_authors_code", "build_authors_cdm", "authors_cdm", "run_authors_benchmark", "main"]

#: the authors' ``UNetModel`` at the size of the bundles' network (keyword arguments besides image_size)
AUTHORS_UNET = dict(
    in_channels=1,
    model_channels=32,
    out_channels=2,  # --learn_sigma True
    num_res_blocks=1,
    attention_resolutions=(4,),  # the 16 x 16 level of a 64 x 64 input, as ours
    channel_mult=(1, 2, 2),
    num_classes=2,
    num_head_channels=32,
    use_scale_shift_norm=True,  # their default
)


def load_authors_code(authors_repo: str | Path) -> tuple[ModuleType, ModuleType]:
    """
    Import ``guided_diffusion.unet`` and ``guided_diffusion.gaussian_diffusion`` from a checkout of the authors'
    repository, unchanged.

    Args:
        authors_repo: the checkout's root (the folder holding ``guided_diffusion/``).

    Returns:
        the two modules ``(unet, gaussian_diffusion)``.

    Raises:
        FileNotFoundError: ``authors_repo`` has no ``guided_diffusion/unet.py`` or ``gaussian_diffusion.py``.
        ImportError: the modules do not import (their error chained).

    Example::

        unet, gd = load_authors_code("/path/to/cond_ddpm_wsss")
    """
    root = Path(authors_repo).expanduser().resolve()
    for name in ("unet.py", "gaussian_diffusion.py"):
        if not (root / "guided_diffusion" / name).is_file():
            raise FileNotFoundError(
                f"--authors_repo {authors_repo}: no guided_diffusion/{name} (clone https://github.com/xhu248/cond_ddpm_wsss)."
            )
    for cached in [m for m in sys.modules if m == "guided_diffusion" or m.startswith("guided_diffusion.")]:
        del sys.modules[cached]  # a different checkout imported earlier in this process
    sys.path.insert(0, str(root))
    try:
        unet = importlib.import_module("guided_diffusion.unet")
        gd = importlib.import_module("guided_diffusion.gaussian_diffusion")
    except Exception as err:  # their imports may need packages we do not have
        raise ImportError(f"--authors_repo {authors_repo}: guided_diffusion does not import: {err}") from err
    finally:
        sys.path.remove(str(root))
    return unet, gd


def _perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    # both codes zero-initialise their output convolutions: random weights everywhere give real, non-zero maps
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return module.eval()


def build_authors_cdm(unet: ModuleType, gd: ModuleType, size: int = 64, timesteps: int = 4000, tau: float = 0.95, seed: int = 0):
    """
    The authors' CDM pieces at the bundles' size: ``(model, model2, diffusion)`` where ``model2`` is their copy
    with the class-0 embedding replaced by ``tau * f(1) + (1 - tau) * f(0)`` (as ``main_ddim_guided`` builds it).

    Raises:
        ValueError: ``size`` not a positive multiple of 4 or ``timesteps < 2``.
    """
    if size < 4 or size % 4:
        raise ValueError(f"size must be a positive multiple of 4 (two downsamplings), got {size}.")
    if timesteps < 2:
        raise ValueError(f"timesteps must be >= 2, got {timesteps}.")
    torch.manual_seed(seed)
    model = _perturb(unet.UNetModel(image_size=size, **AUTHORS_UNET), seed)
    model2 = copy.deepcopy(model)
    with torch.no_grad():
        model2.label_emb.weight[0] = tau * model.label_emb.weight[1] + (1 - tau) * model.label_emb.weight[0]
    diffusion = gd.GaussianDiffusion(
        betas=gd.get_named_beta_schedule("linear", timesteps),
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.LEARNED_RANGE,
        loss_type=gd.LossType.MSE,
    )
    return model, model2, diffusion


def authors_cdm(model, model2, diffusion, x0: torch.Tensor, noise: torch.Tensor, noise_level: int = 400, num_steps: int = 10) -> torch.Tensor:
    """
    The authors' CDM map of ``x0`` (their ``main_ddim_guided`` loop without classifier guidance): two
    ``ddim_sample`` calls per step, at batch B each, the difference summed on the CPU.
    """
    b = x0.shape[0]
    t = torch.tensor([noise_level] * b, device=x0.device)
    noisy_x = diffusion.q_sample(x0, t, noise=noise)
    diff = torch.zeros(noisy_x.shape)
    with torch.no_grad():
        sample, sample_2 = torch.clone(noisy_x), torch.clone(noisy_x)
        cond = {"y": torch.ones(b, dtype=torch.long, device=x0.device)}
        fake_cond = {"y": torch.zeros(b, dtype=torch.long, device=x0.device)}
        for _ in range(num_steps):
            t = t - 1
            sample = diffusion.ddim_sample(model, sample, t, model_kwargs=cond)["sample"]
            sample_2 = diffusion.ddim_sample(model2, sample_2, t, model_kwargs=fake_cond)["sample"]
            diff += (sample - sample_2).cpu()
    return diff


def run_authors_benchmark(
    authors_repo: str | Path,
    batches: tuple[int, ...] = (1, 8),
    repeats: int = 5,
    size: int = 64,
    our_noise_level: int = 100,
    our_timesteps: int = 1000,
    their_noise_level: int = 400,
    their_timesteps: int = 4000,
    num_steps: int = 10,
    tau: float = 0.95,
    memory_format: str = "auto",
    bfloat16: bool | None = None,
) -> dict:
    """
    Time CDM per slice with the authors' code and ours, paired in this process.

    Args:
        authors_repo: checkout of ``xhu248/cond_ddpm_wsss`` (see :py:func:`load_authors_code`).
        batches: slices per call.
        repeats: timed rounds (each times every contender once).
        size: slice size (a multiple of 4).
        our_noise_level: our Q (MONAI timestep index of a ``our_timesteps`` schedule).
        our_timesteps: our training schedule's length.
        their_noise_level: their Q.
        their_timesteps: their schedule's length.
        num_steps: R, for both.
        tau: for both.
        memory_format: ours "as configured" (see :py:func:`monai_wsss.networks.with_precision`).
        bfloat16: also time ``ours_bfloat16`` (``None``: where the CPU computes bfloat16 natively).

    Returns:
        a dict with the CPU, the settings, parameter counts and per batch the median seconds per slice of
        ``authors``, ``ours``, ``ours_before`` (contiguous float32, MONAI attention) and, with ``bfloat16``,
        ``ours_bfloat16``, and the ratios.

    Raises:
        ValueError: an empty ``batches``, a batch < 1 or ``repeats < 1``; the errors of the loaders and builders.
    """
    if not batches or any(int(b) != b or b < 1 for b in batches):
        raise ValueError(f"batches must be positive integers, got {batches!r}.")
    if int(repeats) != repeats or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}.")
    unet, gd = load_authors_code(authors_repo)
    model, model2, diffusion = build_authors_cdm(unet, gd, size, their_timesteps, tau)
    torch.manual_seed(0)
    before = _perturb(ConditionalDiffusionUNet(**UNET_DEFAULTS, use_flash_attention=False), 0)
    ours = ConditionalDiffusionUNet(**UNET_DEFAULTS).eval()
    ours.load_state_dict(before.state_dict())
    ours = with_precision(ours, "float32", memory_format)
    bfloat16 = native_bfloat16("cpu") if bfloat16 is None else bool(bfloat16)
    ours_bf16 = None
    if bfloat16:
        ours_bf16 = ConditionalDiffusionUNet(**UNET_DEFAULTS).eval()
        ours_bf16.load_state_dict(before.state_dict())
        ours_bf16 = with_precision(ours_bf16, "bfloat16", memory_format)
    sched = DDIMScheduler(num_train_timesteps=our_timesteps, schedule="linear_beta", clip_sample=False)
    cdm = ConditionDifferenceInferer(sched, noise_level=our_noise_level, num_steps=num_steps, tau=tau)
    params = {
        "authors": sum(p.numel() for p in model.parameters()),
        "ours": sum(p.numel() for p in ours.parameters()),
    }
    result: dict = {
        "cpu": cpu_info(),
        "size": size,
        "repeats": repeats,
        "parameters": params,
        "settings": {
            "authors": {"noise_level": their_noise_level, "timesteps": their_timesteps, "num_steps": num_steps, "tau": tau},
            "ours": {"noise_level": our_noise_level, "timesteps": our_timesteps, "num_steps": num_steps, "tau": tau,
                     "memory_format": memory_format},
        },
        "bfloat16": bfloat16,
        "batches": {},
    }
    for b in batches:
        gen = torch.Generator().manual_seed(b)
        x = torch.rand(b, 1, size, size, generator=gen) * 2 - 1
        noise = torch.randn(b, 1, size, size, generator=gen)
        with torch.inference_mode():
            map_ours, map_before = cdm(x, ours, noise=noise), cdm(x, before, noise=noise)
        contenders = {
            "authors": lambda x=x, noise=noise: authors_cdm(model, model2, diffusion, x, noise, their_noise_level, num_steps),
            "ours": lambda x=x, noise=noise: cdm(x, ours, noise=noise),
            "ours_before": lambda x=x, noise=noise: cdm(x, before, noise=noise),
        }
        if ours_bf16 is not None:
            contenders["ours_bfloat16"] = lambda x=x, noise=noise: cdm(x, ours_bf16, noise=noise)
        med = paired_medians(contenders, repeats=repeats)
        extra = {}
        if ours_bf16 is not None:
            with torch.inference_mode():
                map_bf16 = cdm(x, ours_bf16, noise=noise)
            extra = {
                "authors_over_ours_bfloat16": med["authors"] / med["ours_bfloat16"],
                "map_max_abs_diff_bfloat16_vs_before": float((map_bf16 - map_before).abs().max()),
            }
        result["batches"][str(b)] = {
            **extra,
            "seconds_per_slice": {k: v / b for k, v in med.items()},
            "authors_over_ours": med["authors"] / med["ours"],
            "authors_over_ours_before": med["authors"] / med["ours_before"],
            "ours_before_over_ours": med["ours_before"] / med["ours"],
            "map_max_abs_diff_ours_vs_before": float((map_ours - map_before).abs().max()),
            "map_max_abs": float(map_before.abs().max()),
        }
    return result


def to_markdown(result: dict) -> str:
    """The result as a markdown table."""
    cpu = result["cpu"]
    s = result["settings"]
    lines = [
        f"CDM per slice, {result['size']} x {result['size']}, CPU {cpu['model']} (flags: {', '.join(cpu['flags']) or 'none'}), "
        f"torch {cpu['torch']}, {cpu['threads']} threads, median of {result['repeats']} paired repeats.",
        f"Authors: Q = {s['authors']['noise_level']} of {s['authors']['timesteps']}, {result['parameters']['authors']:,} parameters; "
        f"ours: Q = {s['ours']['noise_level']} of {s['ours']['timesteps']}, {result['parameters']['ours']:,} parameters; "
        f"R = {s['ours']['num_steps']}, tau = {s['ours']['tau']}.",
        "",
        "| batch | authors s/slice | ours s/slice | ours before s/slice | authors / ours | authors / ours before | map diff (ours vs before) |",
        "|---|---|---|---|---|---|---|",
    ]
    for b, r in result["batches"].items():
        sps = r["seconds_per_slice"]
        lines.append(
            f"| {b} | {sps['authors']:.3f} | {sps['ours']:.3f} | {sps['ours_before']:.3f} | {r['authors_over_ours']:.2f} | "
            f"{r['authors_over_ours_before']:.2f} | {r['map_max_abs_diff_ours_vs_before']:.1e} of {r['map_max_abs']:.2f} |"
        )
    if result.get("bfloat16"):
        lines += ["", "Ours under bfloat16 autocast (the BraTS bundle's `precision` auto on this CPU):", "",
                  "| batch | ours bfloat16 s/slice | authors / ours bfloat16 | map diff (bfloat16 vs before) |", "|---|---|---|---|"]
        for b, r in result["batches"].items():
            lines.append(f"| {b} | {r['seconds_per_slice']['ours_bfloat16']:.3f} | {r['authors_over_ours_bfloat16']:.2f} | "
                         f"{r['map_max_abs_diff_bfloat16_vs_before']:.1e} of {r['map_max_abs']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m monai_wsss.benchmark authors", description=__doc__.split("\n\n")[0])
    parser.add_argument("--authors_repo", required=True, help="checkout of github.com/xhu248/cond_ddpm_wsss")
    parser.add_argument("--out_dir", default="outputs/authors")
    parser.add_argument("--batches", default="1,8", help="comma-separated slices per call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (0: leave torch's choice)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--num_steps", type=int, default=10)
    parser.add_argument("--tau", type=float, default=0.95)
    parser.add_argument("--our_noise_level", type=int, default=100)
    parser.add_argument("--their_noise_level", type=int, default=400)
    parser.add_argument("--their_timesteps", type=int, default=4000)
    parser.add_argument("--memory_format", default="auto", choices=("auto", "channels_last", "contiguous"))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        batches = tuple(int(v) for v in args.batches.split(",") if v.strip())
    except ValueError:
        parser.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    reuse_freed_memory()
    result = run_authors_benchmark(
        args.authors_repo, batches, args.repeats, args.size, args.our_noise_level, 1000, args.their_noise_level,
        args.their_timesteps, args.num_steps, args.tau, args.memory_format,
    )
    write_result(args.out_dir, "authors", result, to_markdown(result))
    return result


if __name__ == "__main__":
    main()
