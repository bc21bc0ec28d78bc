# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""
Score candidate pseudo-mask sources on a validation split: the per-volume intensity threshold at several factors
(``PseudoMaskGenerator`` with ``volume_threshold``, holes filled, negative slices empty).

``--criterion labels`` (default, weakly supervised; needs ``--labels``; no pixel mask is read): the rule is applied
to every slice with brain / body, negative slices included. On slices labelled 0 whatever it marks is false; the
fraction of their body it marks estimates its false-positive rate per voxel of normal tissue, so on slices labelled 1
``marked - rate x body`` estimates the target voxels it finds. The target volume of a scan is estimated as the most
that any candidate rule finds, and the rule's **estimated volume Dice** is ``2 x found / (marked + target)``, the
ranking criterion. Also printed: the slice-level F1 of "the rule marks >= 0.2 % of the slice" against the labels (a
detection score, blind to the extent of a mask). With a healthy-slice reference, a slice labelled 0 is judged with
the reference of the *other* half of those slices (even / odd positions), so no slice sets its own threshold; slices
labelled 1 use all of them, as training does. Holes are not filled here.
``--criterion pixel_masks`` (not weakly supervised; for comparison): volume Dice and Dice per positive slice against
the masks.
With ``--healthy_percentiles`` every threshold is also scored restricted to voxels brighter than that percentile of
the volume's healthy slices (``PseudoMaskGenerator(healthy_percentile=...)``).
With ``--diffusion_bundle`` the bundle's CG-CDM (``--diffusion_method cdm``: CDM; its inference defaults, per-slice Otsu)
is scored as a source too,
and every intensity rule is also scored fused with that evidence (``--fusion``, :py:func:`fuse_with_evidence`):
``and``, the rule kept only where the diffusion mask agrees (the map deciding inside the bright region); ``or``, the
rule plus the diffusion mask where the voxel is at least brighter than ``--fusion_relaxed_percentile`` of the
volume's healthy slices (the map adding faint target the rule misses). Both criteria score them; ``--criterion
labels`` also lists the estimate per volume.
This chooses ``pseudo_threshold`` and ``pseudo_healthy_percentile`` of ``train.json``.

    python scripts/pseudo_mask_quality.py --task brats --datalist <run>/outputs/train/datalist.json \
        --labels labels.csv --factors 0.5 0.6 0.7 [--healthy_percentiles 98 99] [--diffusion_bundle bundles/brats_cdm]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from monai.bundle import ConfigParser

from monai_wsss.apps import (
    PseudoMaskGenerator,
    VolumeSegmentationPipeline,
    build_method_inferer,
    default_map_mode,
    list_volumes,
    load_weights,
)
from monai_wsss.data import TASKS, SliceLabels
from monai_wsss.metrics import binary_dice
from monai_wsss.transforms.slicing import slice_foreground_fraction

FUSIONS = ("and", "or")
#: diffusion methods that can give the evidence (``--diffusion_method``)
DIFFUSION_SOURCES = ("cg_cdm", "cdm")


def fuse_with_evidence(rule: torch.Tensor, evidence: torch.Tensor, relaxed: torch.Tensor, kind: str) -> torch.Tensor:
    """
    An intensity rule's mask fused with a diffusion method's mask (bool tensors of one shape).

    Args:
        rule: the intensity rule's mask.
        evidence: the diffusion method's mask (e.g. CG-CDM's map above its per-slice Otsu threshold).
        relaxed: where a voxel is bright enough to be target at all (e.g. above a low percentile of the healthy
            slices); only used by ``"or"``.
        kind: ``"and"``, the rule where the evidence agrees; ``"or"``, the rule plus the evidence inside ``relaxed``.

    Returns:
        the fused bool mask.

    Raises:
        ValueError: ``kind`` not in :py:data:`FUSIONS`; masks of different shapes.

    Example::

        >>> r, e = torch.tensor([1, 1, 0, 0]).bool(), torch.tensor([1, 0, 1, 1]).bool()
        >>> x = torch.tensor([1, 1, 1, 0]).bool()
        >>> fuse_with_evidence(r, e, x, "and").tolist(), fuse_with_evidence(r, e, x, "or").tolist()
        ([True, False, False, False], [True, True, True, False])
    """
    if kind not in FUSIONS:
        raise ValueError(f"fusion kind must be one of {FUSIONS}, got {kind!r}.")
    if not rule.shape == evidence.shape == relaxed.shape:
        raise ValueError(f"masks of different shapes: rule {tuple(rule.shape)}, evidence {tuple(evidence.shape)}, "
                         f"relaxed {tuple(relaxed.shape)}.")
    rule, evidence = rule.bool(), evidence.bool()
    return rule & evidence if kind == "and" else rule | (evidence & relaxed.bool())


def _diffusion_source(bundle: str, task: str, method: str = "cg_cdm") -> VolumeSegmentationPipeline:
    """The bundle's CG-CDM or CDM (``method``) at its inference defaults with a per-slice Otsu threshold, float32 on the
    CPU."""
    if method not in DIFFUSION_SOURCES:
        raise ValueError(f"diffusion method must be one of {DIFFUSION_SOURCES}, got {method!r}.")
    cfg = ConfigParser()
    cfg.read_config([f"{bundle}/configs/{n}" for n in ("inference.json", f"inference_{method}.json")])
    net = load_weights(cfg.get_parsed_content("diffusion_def"), f"{bundle}/models/diffusion.pt", "cpu")
    clf = None
    if method == "cg_cdm":
        clf = load_weights(cfg.get_parsed_content("classifier_def"), f"{bundle}/models/classifier.pt", "cpu")
    inferer = build_method_inferer(method, cfg.get_parsed_content("scheduler"), net, clf,
                                   noise_level=cfg.get("noise_level"), tau=cfg.get("tau"),
                                   guidance_scale=cfg.get("guidance_scale", 0.0), num_steps=cfg.get("num_steps"))
    return VolumeSegmentationPipeline(net, inferer, task=task, roi_size=tuple(cfg.get("spatial_size")),
                                      map_mode=default_map_mode(method, task), threshold="otsu", sw_batch_size=8)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), required=True)
    p.add_argument("--datalist", required=True)
    p.add_argument("--split", default="validation")
    p.add_argument("--factors", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9])
    p.add_argument("--healthy_percentiles", type=float, nargs="*", default=[],
                   help="also score each factor restricted by these healthy-slice percentiles")
    p.add_argument("--diffusion_bundle", default=None,
                   help="also score this bundle's --diffusion_method as a source, and every rule fused with it (--fusion)")
    p.add_argument("--diffusion_method", choices=DIFFUSION_SOURCES, default="cg_cdm",
                   help="the diffusion method of --diffusion_bundle that gives the evidence (its inference defaults)")
    p.add_argument("--fusion", nargs="*", choices=FUSIONS, default=list(FUSIONS),
                   help="fusions of each rule with the diffusion mask scored with --diffusion_bundle (none: no fusion)")
    p.add_argument("--fusion_relaxed_percentile", type=float, default=90.0,
                   help="'or' fusion: the diffusion mask adds voxels brighter than this percentile of the healthy "
                   "slices")
    p.add_argument("--criterion", choices=("labels", "pixel_masks"), default="labels")
    p.add_argument("--labels", help="labels CSV (case,slice,label); --criterion labels")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if not 0 < args.fusion_relaxed_percentile < 100:
        p.error(f"--fusion_relaxed_percentile must lie in (0, 100), got {args.fusion_relaxed_percentile}")
    if args.criterion == "labels":
        if not args.labels:
            p.error("--criterion labels needs --labels (or use --criterion pixel_masks)")
        return _label_criterion(args)
    items = list_volumes(args.datalist, task=args.task, split=args.split, require_seg=True)
    print(f"| source (threshold factor, healthy percentile) | volume Dice | positive-slice Dice |  "
          f"({len(items)} {args.split} volumes of {args.task})")
    print("|---|---|---|")
    sources: dict = {}
    for factor in args.factors:
        pipeline = VolumeSegmentationPipeline(None, build_method_inferer("volume_threshold"), task=args.task,
                                              map_mode=None, threshold=factor)
        for healthy in [None, *args.healthy_percentiles]:
            sources[(factor, healthy)] = (pipeline, healthy)
    fusions = args.fusion if args.diffusion_bundle else []
    evidence: dict = {}  # case -> (diffusion pseudo-mask, its slice labels), computed once per volume
    if args.diffusion_bundle:
        diffusion = PseudoMaskGenerator(_diffusion_source(args.diffusion_bundle, args.task, args.diffusion_method),
                                        fill_holes=True, source_name=args.diffusion_method)
        vol, per_slice = [], []
        for item in items:
            data = diffusion(item)
            mask, seg = np.asarray(data["pseudo"])[0] > 0, np.asarray(data["seg"])[0] > 0
            evidence[str(data["case"])] = mask
            vol.append(binary_dice(mask, seg))
            ms, ss = np.moveaxis(mask, diffusion.preset.slice_axis, 0), np.moveaxis(seg, diffusion.preset.slice_axis, 0)
            per_slice += [binary_dice(ms[k], ss[k]) for k in np.flatnonzero((data["slice_label"] == 1).numpy())]
        print(f"| {args.diffusion_method} | {float(np.nanmean(vol)):.3f} | {float(np.nanmean(per_slice)):.3f} |", flush=True)
    out = {}
    for name, (source, healthy) in sources.items():
        gen = PseudoMaskGenerator(source, fill_holes=True, source_name=f"{name[0]}", healthy_percentile=healthy)
        kinds = [None, *fusions]
        vol: dict = {k: [] for k in kinds}
        per_slice: dict = {k: [] for k in kinds}
        for item in items:
            data = gen(item)
            pseudo, seg = np.asarray(data["pseudo"])[0] > 0, np.asarray(data["seg"])[0] > 0
            positive = (data["slice_label"] == 1).numpy()
            axis = gen.preset.slice_axis
            for kind in kinds:
                mask = pseudo
                if kind is not None:
                    image = torch.as_tensor(data["image"])
                    relaxed = _relaxed(gen, image, data["slice_label"], args.fusion_relaxed_percentile,
                                       str(data["case"]))
                    mask = fuse_with_evidence(torch.as_tensor(pseudo), torch.as_tensor(evidence[str(data["case"])]),
                                              relaxed[0], kind).numpy()
                vol[kind].append(binary_dice(mask, seg))
                ps, ss = np.moveaxis(mask, axis, 0), np.moveaxis(seg, axis, 0)
                per_slice[kind] += [binary_dice(ps[k], ss[k]) for k in np.flatnonzero(positive)]
        for kind in kinds:
            key = (*name, kind)
            out[key] = (float(np.nanmean(vol[kind])), float(np.nanmean(per_slice[kind])))
            print(f"| {_rule_name(key, args.diffusion_method)} | {out[key][0]:.3f} | {out[key][1]:.3f} |", flush=True)
    return out


def _rule_name(key: tuple, method: str = "cg_cdm") -> str:
    factor, healthy, fusion = key
    name = f"{factor}" if healthy is None else f"{factor}, healthy {healthy}"
    return name if fusion is None else f"{name}, {fusion} {method}"


def _relaxed(gen: PseudoMaskGenerator, image: torch.Tensor, values: torch.Tensor, percentile: float, case: str,
             healthy: torch.Tensor | None = None) -> torch.Tensor:
    """Voxels brighter than ``percentile`` of the healthy slices (``healthy``: those slices; default: label 0)."""
    saved, gen.healthy_percentile = gen.healthy_percentile, percentile
    try:
        reference = gen.healthy_reference(image, values == 0 if healthy is None else healthy, case)
    finally:
        gen.healthy_percentile = saved
    return image > reference


def _label_criterion(args) -> dict:
    """Label-only scores of each rule on the validation volumes: estimated volume Dice and slice F1 (no mask read)."""
    labels = SliceLabels.from_csv(args.labels)
    items = [{k: v for k, v in it.items() if k != "seg"}
             for it in list_volumes(args.datalist, task=args.task, split=args.split)]
    fusions = args.fusion if args.diffusion_bundle else []
    evidence: dict = {}  # case -> the diffusion mask (n_slices, ...), computed once per volume
    if fusions:
        diffusion = _diffusion_source(args.diffusion_bundle, args.task, args.diffusion_method)
        for item in items:
            data = diffusion.segment(item, source_space=False)
            evidence[str(data["case"])] = (torch.as_tensor(data["mask"]) > 0)[0].movedim(diffusion.preset.slice_axis, 0)
    # (factor, healthy, fusion) -> case -> marked voxels on positives, false-positive estimate, slice counts
    stats: dict = {}
    for factor in args.factors:
        pipeline = VolumeSegmentationPipeline(None, build_method_inferer("volume_threshold"), task=args.task,
                                              map_mode=None, threshold=factor)
        gen = PseudoMaskGenerator(pipeline, fill_holes=False)
        axis = gen.preset.slice_axis
        for item in items:
            data = pipeline.segment(item, source_space=False)
            case = str(data["case"])
            image = torch.as_tensor(data["image"])
            img = image[0].movedim(axis, 0)
            msk = (torch.as_tensor(data["mask"]) > 0)[0].movedim(axis, 0)
            body = img != 0
            values = labels.for_case(case, img.shape[0])
            enough = slice_foreground_fraction(image, axis) >= gen.preset.min_body_fraction
            healthy = torch.nonzero((values == 0) & enough).flatten().tolist()
            positive = torch.nonzero((values == 1) & enough).flatten().tolist()
            halves = (healthy[0::2], healthy[1::2])

            def chosen(slices):
                flags = torch.zeros(len(values), dtype=torch.bool)
                flags[slices] = True
                return flags

            # a healthy slice is judged with the references of the other half, a positive one with all of them
            cross_fitted = len(halves[1]) > 0
            relaxed = {}
            if fusions and cross_fitted:
                pct = args.fusion_relaxed_percentile
                relaxed = {part: _relaxed(gen, image, values, pct, case, chosen(slices))[0].movedim(axis, 0)
                           for part, slices in (("all", healthy), (0, halves[1]), (1, halves[0]))}
            for healthy_pct in [None, *args.healthy_percentiles]:
                gen.healthy_percentile = healthy_pct
                if healthy_pct is None:
                    refs = {"all": None, 0: None, 1: None}
                elif not cross_fitted:
                    continue  # fewer than two healthy slices: no cross-fitted reference for this volume
                else:
                    refs = {part: gen.healthy_reference(image, chosen(slices))
                            for part, slices in (("all", healthy), (0, halves[1]), (1, halves[0]))}
                for fusion in [None, *(fusions if cross_fitted else [])]:
                    def marked(k, part):
                        m = msk[k] if refs[part] is None else msk[k] & (img[k] > refs[part])
                        if fusion is None:
                            return m
                        return fuse_with_evidence(m, evidence[case][k], relaxed[part][k], fusion)

                    first = set(halves[0])
                    held_out = [marked(k, 0 if k in first else 1) for k in healthy]
                    on_positive = [marked(k, "all") for k in positive]
                    min_fraction = gen.preset.positive_min_fraction or 0.0
                    is_marked = lambda m: bool(m.any()) and float(m.float().mean()) >= min_fraction  # noqa: E731
                    # voxels a rule marks per voxel of normal tissue, measured on held-out healthy slices
                    fpr = sum(int(m.sum()) for m in held_out) / max(sum(int(body[k].sum()) for k in healthy), 1)
                    row = {
                        "marked": sum(int(m.sum()) for m in on_positive),
                        "false_estimate": fpr * sum(int(body[k].sum()) for k in positive),
                        "tp": sum(is_marked(m) for m in on_positive), "fp": sum(is_marked(m) for m in held_out),
                        "n_pos": len(positive), "n_neg": len(healthy),
                    }
                    stats.setdefault((factor, healthy_pct, fusion), {})[case] = row
    # estimated target voxels per volume: the most any rule finds beyond its false-positive estimate
    cases = sorted({c for per in stats.values() for c in per})
    found = {c: max(max(per[c]["marked"] - per[c]["false_estimate"], 0.0) for per in stats.values() if c in per)
             for c in cases}
    print(f"| rule (threshold factor, healthy percentile, fusion) | estimated volume Dice (labels) | "
          f"slice F1 (labels) | "
          f"positive slices marked | held-out healthy slices marked | per volume ({', '.join(cases)}) |  "
          f"({len(items)} {args.split} volumes of {args.task}, no mask read)")
    print("|---|---|---|---|---|---|")
    out = {}
    for key, per in stats.items():
        dice = {}
        for c, r in per.items():
            true_est = max(r["marked"] - r["false_estimate"], 0.0)
            dice[c] = 2 * true_est / (r["marked"] + found[c]) if r["marked"] + found[c] > 0 else float("nan")
        tp, fp = sum(r["tp"] for r in per.values()), sum(r["fp"] for r in per.values())
        n_pos, n_neg = sum(r["n_pos"] for r in per.values()), sum(r["n_neg"] for r in per.values())
        f1 = 2 * tp / max(tp + n_pos + fp, 1)
        out[key] = (float(np.nanmean(list(dice.values()))), f1)
        per_volume = " / ".join(f"{dice[c]:.3f}" if c in dice else "-" for c in cases)
        print(f"| {_rule_name(key, args.diffusion_method)} | {out[key][0]:.3f} | {f1:.3f} | {tp}/{n_pos} | {fp}/{n_neg} | {per_volume} |",
              flush=True)
    best = max(out, key=lambda k: out[k][0])
    print(f"best estimated volume Dice: {_rule_name(best, args.diffusion_method)}")
    return out


if __name__ == "__main__":
    main()
