# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""
Score candidate pseudo-mask sources on a validation split: the per-volume intensity threshold at several factors
(``PseudoMaskGenerator`` with ``volume_threshold``, holes filled, negative slices empty), against the pixel masks.
Volume Dice and Dice per positive slice.
With ``--healthy_percentiles`` every threshold is also scored restricted to voxels brighter than that percentile of
the volume's healthy slices (``PseudoMaskGenerator(healthy_percentile=...)``).
With ``--diffusion_bundle`` the bundle's CG-CDM (its inference defaults, per-slice Otsu) is scored as a source too.
This chooses ``pseudo_threshold`` and ``pseudo_healthy_percentile`` of ``train_segmentation.json``.

    python scripts/pseudo_mask_quality.py --task brats --datalist /tmp/seg_brats/outputs/train_segmentation/datalist.json \
        --factors 0.5 0.55 0.6 0.65 0.7 0.75 [--healthy_percentiles 98 98.5 99] [--diffusion_bundle bundles/brats_cdm]
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


def _dice(pred: np.ndarray, gt: np.ndarray) -> float:
    total = pred.sum() + gt.sum()
    return float(2 * (pred & gt).sum() / total) if total > 0 else float("nan")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("brats", "chaos"), required=True)
    p.add_argument("--datalist", required=True)
    p.add_argument("--split", default="validation")
    p.add_argument("--factors", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9])
    p.add_argument("--healthy_percentiles", type=float, nargs="*", default=[],
                   help="also score each factor restricted by these healthy-slice percentiles")
    p.add_argument("--diffusion_bundle", default=None, help="also score this bundle's cg_cdm as a source")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
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
        cfg.read_config(f"{args.diffusion_bundle}/configs/evaluate.json")
        net = load_weights(cfg.get_parsed_content("network_def"), f"{args.diffusion_bundle}/models/model.pt", "cpu")
        clf = load_weights(cfg.get_parsed_content("classifier_def"), f"{args.diffusion_bundle}/models/classifier.pt", "cpu")
        keys = ("noise_level", "num_steps", "tau", "guidance_scale", "guided_num_steps")
        inferer = build_method_inferer("cg_cdm", cfg.get_parsed_content("scheduler"), net, clf,
                                       **{k: cfg.get(k) for k in keys})
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
            vol.append(_dice(pseudo, seg))
            positive = (data["slice_label"] & ~data["slice_ambiguous"]).numpy()
            axis = gen.preset.slice_axis
            ps, ss = np.moveaxis(pseudo, axis, 0), np.moveaxis(seg, axis, 0)
            per_slice += [_dice(ps[k], ss[k]) for k in np.flatnonzero(positive)]
        out[name] = (float(np.nanmean(vol)), float(np.nanmean(per_slice)))
        label = name[0] if healthy is None else f"{name[0]}, healthy {healthy}"
        print(f"| {label} | {out[name][0]:.3f} | {out[name][1]:.3f} |", flush=True)
    return out


if __name__ == "__main__":
    main()
