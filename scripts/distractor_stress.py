# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""
A labels-only stress test of segmenters: how much of a synthetic bright structure they mark.

Every validation slice (model space, as the segmenter sees it) gets the same random bright ellipses from
:py:class:`~monai_wsss.transforms.RandBrightDistractor`, kept off the slice's pseudo-mask (what the training run made
from the image-level labels; no pixel mask is read), with the rest of the body dimmed as percentile normalisation
dims it on a scan with a large bright structure. For each segmenter the script prints the share of painted pixels
it marks (lower is better) and the share of pseudo-mask pixels it marks on the clean and on the painted slices (the
target should survive). The structures come from the same generator as the training augmentation, so a network
trained with it is tested on the kind of structure it was shown: read the result as "did the augmentation take",
not as accuracy on real bright organs.

    python scripts/distractor_stress.py --bundle_root bundles/chaos_kidney_cdm --task chaos \
        --datalist <run>/outputs/train/datalist.json --labels labels.csv \
        --pseudo_dir <run>/outputs/pseudo_masks/chaos_<digest> --model_paths a/model.pt b/model.pt --threshold 0.3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from monai.bundle import ConfigParser

from monai_wsss.apps import list_volumes, load_weights
from monai_wsss.data import TASKS, SliceLabels, build_slice_dataset
from monai_wsss.transforms import RandBrightDistractor
from monai_wsss.utils.atomic_files import write_text_atomic


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle_root", required=True)
    p.add_argument("--task", choices=sorted(TASKS), required=True)
    p.add_argument("--datalist", required=True, help="datalist JSON of the bundle's split (a training run writes it)")
    p.add_argument("--split", default="validation")
    p.add_argument("--labels", required=True, help="labels CSV (case,slice,label)")
    p.add_argument("--pseudo_dir", required=True, help="folder of the scans' <case>_pseudo.nii.gz")
    p.add_argument("--model_paths", nargs="+", required=True, help="segmenter weights to compare")
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold of a marked pixel")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if not 0.0 < args.threshold < 1.0:
        p.error(f"--threshold must lie in (0, 1), got {args.threshold}")
    torch.set_num_threads(1)

    cfg = ConfigParser()
    cfg.read_config(f"{args.bundle_root}/configs/inference.json")
    size = tuple(cfg.get("roi_size"))
    items = []
    for item in list_volumes(args.datalist, task=args.task, split=args.split, require_seg=False):
        path = Path(args.pseudo_dir) / f"{item['case']}_pseudo.nii.gz"
        if not path.is_file():
            p.error(f"--pseudo_dir: no pseudo-mask {path.name} of case {item['case']} in {args.pseudo_dir}")
        items.append({"image": item["image"], "case": item["case"], "pseudo": str(path)})
    slices = build_slice_dataset(items, task=args.task, spatial_size=size, split="eval", extra_mask_keys=("pseudo",),
                                 labels=SliceLabels.from_csv(args.labels))
    painter = RandBrightDistractor(prob=1.0).set_random_state(args.seed)
    clean, painted, pseudo, regions = [], [], [], []
    for s in slices:
        image, target = torch.as_tensor(s["image"]).float(), torch.as_tensor(s["pseudo"]) > 0
        stressed = painter(image, target=target)
        clean.append(image)
        painted.append(stressed)
        pseudo.append(target[0])
        regions.append(painter.region.clone())
    region, target = torch.stack(regions), torch.stack(pseudo)  # the painter keeps regions off the pseudo-masks
    rows = []
    for model_path in args.model_paths:
        net = load_weights(cfg.get_parsed_content("network_def"), model_path, "cpu", name="segmenter").eval()
        with torch.inference_mode():
            marks = {
                name: torch.cat([net(torch.stack(batch[i:i + 32])).softmax(1)[:, 1]
                                 for i in range(0, len(batch), 32)]) > args.threshold
                for name, batch in (("clean", clean), ("painted", painted))
            }
        row = {
            "model_path": model_path,
            "slices": len(clean),
            "distractor_pixels_marked": float(marks["painted"][region].float().mean()),
            "pseudo_mask_pixels_marked_clean": float(marks["clean"][target].float().mean()),
            "pseudo_mask_pixels_marked_painted": float(marks["painted"][target].float().mean()),
        }
        rows.append(row)
        print(json.dumps(row))
    if args.out:
        write_text_atomic(args.out, json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
