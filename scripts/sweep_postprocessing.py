# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""
Choose a method's mask post-processing on a validation split: probability threshold, classifier slice gate and
3D component size, on whole volumes at full resolution. Each volume's map and slice probabilities are computed once;
the options are applied with the pipeline's own rules. Use the validation split: the test split is for reporting.

The criterion (``--criterion``):

- ``labels`` (default, weakly supervised): volume Dice against the validation scans' **pseudo-masks** (what the
  training run made from the image-level labels and its pseudo-mask rule, exactly empty on slices labelled 0; the
  criterion that also chose the checkpoint), and the slice-level F1 of "the mask marks this slice" against the slice
  labels. No pixel mask is read. The chosen row: the best volume Dice; among rows within 0.005 of it, one without
  the classifier gate first, then the best slice F1.
- ``pixel_masks`` (not weakly supervised; for comparison): volume Dice and Dice per slice with target (mean over the
  slices of all volumes) against the ground-truth masks.

    python scripts/sweep_postprocessing.py --bundle_root bundles/brats_cdm --task brats \
        --datalist <run>/outputs/train/datalist.json --split validation --method segmenter \
        --labels labels.csv --pseudo_dir <run>/outputs/pseudo_masks/brats_<digest>
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.metrics import compute_confusion_matrix_metric, get_confusion_matrix
from monai.transforms import RemoveSmallObjects

from monai_wsss.apps import VolumeSegmentationPipeline, build_method_inferer, list_volumes, load_weights
from monai_wsss.bundle import parse_context_slices
from monai_wsss.data import TASKS, SliceLabels
from monai_wsss.metrics import binary_dice



#: volume Dice differences below this count as ties (two or three validation volumes)
TIE = 0.005


def _slice_f1(marked: np.ndarray, labels: np.ndarray) -> float:
    """F1 of "the mask marks the slice" against the slice labels (unlabelled slices, -1, left out), with MONAI."""
    keep = labels >= 0
    pred = torch.from_numpy(marked[keep].astype(np.float32)).reshape(-1, 1)
    truth = torch.from_numpy(labels[keep].astype(np.float32)).reshape(-1, 1)
    matrix = get_confusion_matrix(pred, truth, include_background=True).sum(0, keepdim=True)
    return float(compute_confusion_matrix_metric("f1 score", matrix))


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle_root", required=True)
    p.add_argument("--task", choices=sorted(TASKS), required=True)
    p.add_argument("--datalist", required=True, help="datalist JSON of the bundle's split (a training run writes it)")
    p.add_argument("--split", default="validation")
    p.add_argument("--method", choices=("segmenter", "volume_threshold"), default="segmenter")
    p.add_argument("--model_path", default=None, help="the segmenter's weights (default: <bundle_root>/models/model.pt)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    p.add_argument("--gates", type=float, nargs="+", default=[0.3, 0.5, 0.7], help="slice gates (plus no gate)")
    p.add_argument("--components", type=int, nargs="+", default=[0, 100, 1000])
    p.add_argument("--roi_size", type=int, nargs=2, default=None,
                   help="segmenter: the slice size its weights were trained at (default: the bundle's roi_size)")
    p.add_argument("--context_slices", type=int, default=0,
                   help="segmenter: neighbouring slices on either side it was trained with (train.json --context_slices)")
    p.add_argument("--flip_axes", type=int, nargs="*", default=[],
                   help="segmenter: mirrored test-time augmentation along these slice axes (0: left-right)")
    p.add_argument("--overrides", nargs="*", default=[],
                   help="config files of the bundle layered on inference.json, e.g. coordinate_channels.json for a "
                        "segmenter trained with that override")
    p.add_argument("--criterion", choices=("labels", "pixel_masks"), default="labels")
    p.add_argument("--labels", help="labels CSV (case,slice,label); --criterion labels")
    p.add_argument("--pseudo_dir", help="folder of the validation scans' <case>_pseudo.nii.gz; --criterion labels")
    args = p.parse_args(argv)
    weak = args.criterion == "labels"
    if weak and not (args.labels and args.pseudo_dir):
        p.error("--criterion labels needs --labels and --pseudo_dir (or use --criterion pixel_masks)")
    torch.set_num_threads(1)

    cfg = ConfigParser()
    names = ("inference.json", "slice_gate.json", *args.overrides)
    missing = [n for n in names if not Path(args.bundle_root, "configs", n).is_file()]
    if missing:
        p.error(f"--overrides: no {', '.join(missing)} in {args.bundle_root}/configs")
    cfg.read_config([f"{args.bundle_root}/configs/{name}" for name in names])
    # the bundle's own option: in_channels follow from it, and a method other than the segmenter refuses it
    cfg["context_slices"] = args.context_slices
    context = parse_context_slices(args.context_slices, args.method)
    items = list_volumes(args.datalist, task=args.task, split=args.split, require_seg=not weak)
    if weak:
        labels = SliceLabels.from_csv(args.labels)
        items = [{k: v for k, v in it.items() if k != "seg"} for it in items]  # no pixel mask is read
    clf = load_weights(cfg.get_parsed_content("classifier_def"), f"{args.bundle_root}/models/classifier.pt", "cpu",
                       name="noisy classifier")
    if args.method == "segmenter":
        net = load_weights(cfg.get_parsed_content("network_def"),
                           args.model_path or f"{args.bundle_root}/models/model.pt", "cpu", name="segmenter")
        inferer, roi = build_method_inferer("segmenter", network=net, flip_axes=args.flip_axes), tuple(args.roi_size or cfg.get("roi_size"))
        thresholds = args.thresholds
    else:
        net, inferer, roi = None, build_method_inferer("volume_threshold"), tuple(cfg.get("spatial_size"))
        thresholds = [0.7]  # the baseline's definition
    pipe = VolumeSegmentationPipeline(net, inferer, task=args.task, roi_size=roi, map_mode=None, threshold=0.5,
                                      slice_gate=0.5, gate_classifier=clf, sw_batch_size=32,
                                      context_slices=context)
    axis = pipe.slice_axis
    volumes = []
    for item in items:
        data = pipe.load(item)
        body = data["image"][0].numpy() != 0
        if weak:
            path = Path(args.pseudo_dir) / f"{item['case']}_pseudo.nii.gz"
            if not path.is_file():
                p.error(f"--pseudo_dir: no pseudo-mask {path.name} of validation case {item['case']} in {args.pseudo_dir}")
            reference = np.asarray(nib.load(str(path)).dataobj) > 0
            if reference.shape != body.shape:
                p.error(f"--pseudo_dir: {path} has shape {reference.shape}, the scan {body.shape}")
            slice_labels = labels.for_case(str(item["case"]), body.shape[axis]).numpy()
        else:
            reference, slice_labels = np.asarray(data["seg"])[0] > 0, None
        volumes.append((
            pipe.predict(data["image"])[0].numpy(), body, reference, pipe.slice_probabilities(data["image"]).numpy(),
            slice_labels,
        ))
    rows = []
    for thr, gate, size in itertools.product(thresholds, [None, *args.gates], args.components):
        vol, per_slice, marked, slice_truth = [], [], [], []
        for heat, body, seg, prob, slice_labels in volumes:
            mask = (heat > thr) & body
            if gate is not None:
                keep = [1, 1, 1]
                keep[axis] = -1
                mask &= (prob >= gate).reshape(keep)
            if size:
                mask = RemoveSmallObjects(min_size=size, connectivity=3)(torch.from_numpy(mask[None]).float())[0].numpy() > 0
            vol.append(binary_dice(mask, seg))
            m, s = np.moveaxis(mask, axis, 0), np.moveaxis(seg, axis, 0)
            per_slice += [binary_dice(m[k], s[k]) for k in np.flatnonzero(s.reshape(s.shape[0], -1).any(1))]
            if slice_labels is not None:
                marked.append(m.reshape(m.shape[0], -1).any(1))
                slice_truth.append(slice_labels)
        row = {"threshold": thr, "slice_gate": gate, "min_component_size": size,
               "volume_dice": float(np.nanmean(vol)), "slice_dice": float(np.nanmean(per_slice))}
        if weak:
            row["slice_f1"] = _slice_f1(np.concatenate(marked), np.concatenate(slice_truth))
        rows.append(row)
    against = "the validation pseudo-masks (labels only)" if weak else "the pixel masks (not weakly supervised)"
    print(f"{args.method} on {len(items)} {args.split} volumes of {args.task}, Dice against {against}")
    extra = " slice F1 (labels) |" if weak else ""
    print(f"| threshold | slice_gate | min_component_size | volume Dice | slice Dice |{extra}\n|---|---|---|---|---|{'---|' if weak else ''}")
    for r in rows:
        f1 = f" {r['slice_f1']:.3f} |" if weak else ""
        print(f"| {r['threshold']} | {r['slice_gate']} | {r['min_component_size']} | {r['volume_dice']:.3f} | {r['slice_dice']:.3f} |{f1}")
    # the choice: the best volume Dice; within TIE of it (noise on a few volumes), no classifier gate before one,
    # then the higher slice F1 (labels) or slice Dice (pixel masks)
    top = max(r["volume_dice"] for r in rows)
    close = [r for r in rows if r["volume_dice"] >= top - TIE]
    best = max(close, key=lambda r: (r["slice_gate"] is None, r.get("slice_f1", r["slice_dice"]), r["volume_dice"]))
    print(f"chosen (best volume Dice {top:.3f}; within {TIE}: no gate first, then slice "
          f"{'F1' if weak else 'Dice'}): threshold {best['threshold']}, slice_gate {best['slice_gate']}, "
          f"min_component_size {best['min_component_size']}")
    return rows


if __name__ == "__main__":
    main()
