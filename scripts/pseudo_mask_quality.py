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
With ``--diffusion_bundle`` the bundle's CG-CDM (its inference defaults, per-slice Otsu) is scored as a source too.
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



def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), required=True)
    p.add_argument("--datalist", required=True)
    p.add_argument("--split", default="validation")
    p.add_argument("--factors", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9])
    p.add_argument("--healthy_percentiles", type=float, nargs="*", default=[],
                   help="also score each factor restricted by these healthy-slice percentiles")
    p.add_argument("--diffusion_bundle", default=None, help="also score this bundle's cg_cdm as a source")
    p.add_argument("--criterion", choices=("labels", "pixel_masks"), default="labels")
    p.add_argument("--labels", help="labels CSV (case,slice,label); --criterion labels")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
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
    if args.diffusion_bundle:
        cfg = ConfigParser()
        cfg.read_config([f"{args.diffusion_bundle}/configs/{n}" for n in ("inference.json", "inference_cg_cdm.json")])
        net = load_weights(cfg.get_parsed_content("diffusion_def"), f"{args.diffusion_bundle}/models/diffusion.pt", "cpu")
        clf = load_weights(cfg.get_parsed_content("classifier_def"), f"{args.diffusion_bundle}/models/classifier.pt", "cpu")
        inferer = build_method_inferer("cg_cdm", cfg.get_parsed_content("scheduler"), net, clf,
                                       noise_level=cfg.get("noise_level"), tau=cfg.get("tau"),
                                       guidance_scale=cfg.get("guidance_scale"), num_steps=cfg.get("num_steps"))
        sources[("cg_cdm", None)] = (VolumeSegmentationPipeline(net, inferer, task=args.task, roi_size=tuple(cfg.get("spatial_size")),
                                                       map_mode=default_map_mode("cg_cdm", args.task), threshold="otsu",
                                                       sw_batch_size=8), None)
    out = {}
    for name, (source, healthy) in sources.items():
        gen = PseudoMaskGenerator(source, fill_holes=True, source_name=f"{name[0]}", healthy_percentile=healthy)
        vol, per_slice = [], []
        for item in items:
            data = gen(item)
            pseudo, seg = np.asarray(data["pseudo"])[0] > 0, np.asarray(data["seg"])[0] > 0
            vol.append(binary_dice(pseudo, seg))
            positive = (data["slice_label"] == 1).numpy()
            axis = gen.preset.slice_axis
            ps, ss = np.moveaxis(pseudo, axis, 0), np.moveaxis(seg, axis, 0)
            per_slice += [binary_dice(ps[k], ss[k]) for k in np.flatnonzero(positive)]
        out[name] = (float(np.nanmean(vol)), float(np.nanmean(per_slice)))
        label = name[0] if healthy is None else f"{name[0]}, healthy {healthy}"
        print(f"| {label} | {out[name][0]:.3f} | {out[name][1]:.3f} |", flush=True)
    return out


def _label_criterion(args) -> dict:
    """Label-only scores of each rule on the validation volumes: estimated volume Dice and slice F1 (no mask read)."""
    labels = SliceLabels.from_csv(args.labels)
    items = [{k: v for k, v in it.items() if k != "seg"}
             for it in list_volumes(args.datalist, task=args.task, split=args.split)]
    stats: dict = {}  # (factor, healthy) -> per volume (marked on positives, FP estimate, slice counts)
    for factor in args.factors:
        pipeline = VolumeSegmentationPipeline(None, build_method_inferer("volume_threshold"), task=args.task,
                                              map_mode=None, threshold=factor)
        gen = PseudoMaskGenerator(pipeline, fill_holes=False)
        axis = gen.preset.slice_axis
        for item in items:
            data = pipeline.segment(item)
            image = torch.as_tensor(data["image"])
            img = image[0].movedim(axis, 0)
            msk = (torch.as_tensor(data["mask"]) > 0)[0].movedim(axis, 0)
            body = img != 0
            values = labels.for_case(str(item["case"]), img.shape[0])
            enough = slice_foreground_fraction(image, axis) >= gen.preset.min_body_fraction
            healthy = torch.nonzero((values == 0) & enough).flatten().tolist()
            positive = torch.nonzero((values == 1) & enough).flatten().tolist()
            halves = (healthy[0::2], healthy[1::2])
            for healthy_pct in [None, *args.healthy_percentiles]:
                gen.healthy_percentile = healthy_pct
                if healthy_pct is None:
                    refs = {"all": None, 0: None, 1: None}
                elif len(halves[1]) == 0:
                    continue  # fewer than two healthy slices: no cross-fitted reference for this volume
                else:
                    def reference(slices):
                        chosen = torch.zeros(len(values), dtype=torch.bool)
                        chosen[slices] = True
                        return gen.healthy_reference(image, chosen)

                    # a healthy slice is judged with the reference of the other half, a positive one with all of them
                    refs = {"all": reference(healthy), 0: reference(halves[1]), 1: reference(halves[0])}

                def marked(k, ref):
                    return msk[k] if ref is None else msk[k] & (img[k] > ref)

                first = set(halves[0])
                held_out = [marked(k, refs[0 if k in first else 1]) for k in healthy]
                on_positive = [marked(k, refs["all"]) for k in positive]
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
                stats.setdefault((factor, healthy_pct), {})[str(item["case"])] = row
    # estimated target voxels per volume: the most any rule finds beyond its false-positive estimate
    cases = sorted({c for per in stats.values() for c in per})
    found = {c: max(max(per[c]["marked"] - per[c]["false_estimate"], 0.0) for per in stats.values() if c in per)
             for c in cases}
    print(f"| rule (threshold factor, healthy percentile) | estimated volume Dice (labels) | slice F1 (labels) | "
          f"positive slices marked | held-out healthy slices marked |  ({len(items)} {args.split} volumes of "
          f"{args.task}, no mask read)")
    print("|---|---|---|---|---|")
    out = {}
    for key, per in stats.items():
        dice = []
        for c, r in per.items():
            true_est = max(r["marked"] - r["false_estimate"], 0.0)
            dice.append(2 * true_est / (r["marked"] + found[c]) if r["marked"] + found[c] > 0 else float("nan"))
        tp, fp = sum(r["tp"] for r in per.values()), sum(r["fp"] for r in per.values())
        n_pos, n_neg = sum(r["n_pos"] for r in per.values()), sum(r["n_neg"] for r in per.values())
        f1 = 2 * tp / max(tp + n_pos + fp, 1)
        out[key] = (float(np.nanmean(dice)), f1)
        name = f"{key[0]}" if key[1] is None else f"{key[0]}, healthy {key[1]}"
        print(f"| {name} | {out[key][0]:.3f} | {f1:.3f} | {tp}/{n_pos} | {fp}/{n_neg} |", flush=True)
    best = max(out, key=lambda k: out[k][0])
    print(f"best estimated volume Dice: threshold factor {best[0]}, healthy percentile {best[1]}")
    return out


if __name__ == "__main__":
    main()
