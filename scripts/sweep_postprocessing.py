# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""
Choose a method's mask post-processing on a validation split: probability threshold, classifier slice gate and
3D component size, scored on whole volumes at full resolution (volume Dice and Dice per slice with target, mean
over the slices of all volumes). Each volume's map and slice probabilities are computed once; the options are
applied with the pipeline's own rules. Use the validation split: the test split is for reporting.

    python scripts/sweep_postprocessing.py --bundle_root bundles/brats_cdm --task brats \
        --datalist /tmp/seg_brats/outputs/train_segmentation/datalist.json --split validation --method segmenter
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.transforms import RemoveSmallObjects

from monai_wsss.apps import VolumeSegmentationPipeline, build_method_inferer, list_volumes, load_weights


def _dice(pred: np.ndarray, gt: np.ndarray) -> float:
    total = pred.sum() + gt.sum()
    return float(2 * (pred & gt).sum() / total) if total > 0 else float("nan")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle_root", required=True)
    p.add_argument("--task", choices=("brats", "chaos"), required=True)
    p.add_argument("--datalist", required=True, help="datalist JSON of the bundle's split (a training run writes it)")
    p.add_argument("--split", default="validation")
    p.add_argument("--method", choices=("segmenter", "volume_threshold"), default="segmenter")
    p.add_argument("--segmenter_path", default=None, help="default: <bundle_root>/models/segmenter.pt")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    p.add_argument("--gates", type=float, nargs="+", default=[0.3, 0.5, 0.7], help="slice gates (plus no gate)")
    p.add_argument("--components", type=int, nargs="+", default=[0, 100, 1000])
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    cfg = ConfigParser()
    cfg.read_config(f"{args.bundle_root}/configs/evaluate.json")
    items = list_volumes(args.datalist, task=args.task, split=args.split, require_seg=True)
    clf = load_weights(cfg.get_parsed_content("classifier_def"), f"{args.bundle_root}/models/classifier.pt", "cpu",
                       name="noisy classifier")
    if args.method == "segmenter":
        net = load_weights(cfg.get_parsed_content("segmenter_def"),
                           args.segmenter_path or f"{args.bundle_root}/models/segmenter.pt", "cpu", name="segmenter")
        inferer, roi = build_method_inferer("segmenter", network=net), tuple(cfg.get("segmenter_spatial_size"))
        thresholds = args.thresholds
    else:
        net, inferer, roi = None, build_method_inferer("volume_threshold"), tuple(cfg.get("spatial_size"))
        thresholds = [0.7]  # the baseline's definition
    pipe = VolumeSegmentationPipeline(net, inferer, task=args.task, roi_size=roi, map_mode=None, threshold=0.5,
                                      slice_gate=0.5, gate_classifier=clf, sw_batch_size=32)
    axis = pipe.slice_axis
    volumes = []
    for item in items:
        data = pipe.load(item)
        volumes.append((
            pipe.predict(data["image"])[0].numpy(), data["image"][0].numpy() != 0,
            np.asarray(data["seg"])[0] > 0, pipe.slice_probabilities(data["image"]).numpy(),
        ))
    rows = []
    for thr, gate, size in itertools.product(thresholds, [None, *args.gates], args.components):
        vol, per_slice = [], []
        for heat, body, seg, prob in volumes:
            mask = (heat > thr) & body
            if gate is not None:
                keep = [1, 1, 1]
                keep[axis] = -1
                mask &= (prob >= gate).reshape(keep)
            if size:
                mask = RemoveSmallObjects(min_size=size, connectivity=3)(torch.from_numpy(mask[None]).float())[0].numpy() > 0
            vol.append(_dice(mask, seg))
            m, s = np.moveaxis(mask, axis, 0), np.moveaxis(seg, axis, 0)
            per_slice += [_dice(m[k], s[k]) for k in np.flatnonzero(s.reshape(s.shape[0], -1).any(1))]
        rows.append({"threshold": thr, "slice_gate": gate, "min_component_size": size,
                     "volume_dice": float(np.nanmean(vol)), "slice_dice": float(np.nanmean(per_slice))})
    print(f"{args.method} on {len(items)} {args.split} volumes of {args.task}")
    print("| threshold | slice_gate | min_component_size | volume Dice | slice Dice |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['threshold']} | {r['slice_gate']} | {r['min_component_size']} | {r['volume_dice']:.3f} | {r['slice_dice']:.3f} |")
    return rows


if __name__ == "__main__":
    main()
