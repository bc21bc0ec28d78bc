#!/usr/bin/env python
# Copyright (c) monai_wsss contributors
# Licensed under the Apache License, Version 2.0
"""
Turn a BraTS or CHAOS folder into a case-level split datalist and a cached 2D slice dataset, and print how
many slices and positive slices each split holds.

Usage (from the project root)::

    python scripts/prepare_data.py --task brats --data_dir ../shared/data/brats2018 --out_dir /work/cache/brats
    python scripts/prepare_data.py --task chaos --data_dir ../shared/data/chaos_t2spir --out_dir /work/cache/chaos

Writes ``<out_dir>/datalist.json`` (MONAI format), the per-case slice cache under ``<out_dir>/slices/`` and
``<out_dir>/summary.json``. A later ``build_slice_dataset(items, task, cache_dir=<out_dir>/slices)`` with the
same preset and size reads the cache instead of the NIfTI files.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from monai_wsss.data import (
    SPLIT_KEYS,
    TASKS,
    build_slice_dataset,
    split_cases,
    write_datalist,
)
from monai_wsss.utils.atomic_files import write_text_atomic

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--data_dir", required=True, help="dataset folder (BraTS / Decathlon Task01 / CHAOS NIfTI)")
    parser.add_argument("--out_dir", required=True, help="output folder for the datalist and the slice cache")
    parser.add_argument("--seed", type=int, default=0, help="case-level split seed")
    parser.add_argument("--val_fraction", type=float, default=0.1)
    parser.add_argument("--test_fraction", type=float, default=0.2)
    parser.add_argument("--spatial_size", type=int, nargs="+", default=[64, 64], help="model-space size (h w)")
    parser.add_argument("--num_workers", type=int, default=0, help="processes reading cases")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    size = tuple(args.spatial_size) * (2 if len(args.spatial_size) == 1 else 1)
    out_dir = Path(args.out_dir)
    items = TASKS[args.task].list_cases(args.data_dir)
    splits = split_cases(items, val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed)
    datalist = write_datalist(out_dir / "datalist.json", splits)
    print(f"{args.task}: {len(items)} cases from {args.data_dir} -> {datalist}")
    cache_dir = out_dir / "slices"
    summary: dict = {"task": args.task, "data_dir": str(args.data_dir), "seed": args.seed,
                     "spatial_size": list(size), "datalist": str(datalist), "cache_dir": str(cache_dir), "splits": {}}
    header = f"{'split':<11} {'cases':>5} {'mode':>5} {'slices':>7} {'positive':>8} {'negative':>8} {'ambiguous':>9}"
    print(header)
    print("-" * len(header))
    for name in SPLIT_KEYS:
        if not splits.get(name):
            continue
        start = time.perf_counter()
        # training slices as the trainer sees them; evaluation slices as the evaluation protocol keeps them
        mode = "train" if name == "training" else "eval"
        ds = build_slice_dataset(
            splits[name], args.task, spatial_size=size, cache_dir=cache_dir, split=mode, num_workers=args.num_workers
        )
        labels = [d["label"] for d in ds.data]
        ambiguous = sum(bool(d["ambiguous"]) for d in ds.data)
        counts = {"cases": len(splits[name]), "mode": mode, "slices": len(ds), "positive": sum(labels),
                  "negative": len(labels) - sum(labels), "ambiguous": ambiguous,
                  "seconds": round(time.perf_counter() - start, 1)}
        summary["splits"][name] = counts
        print(f"{name:<11} {counts['cases']:>5} {mode:>5} {counts['slices']:>7} {counts['positive']:>8} "
              f"{counts['negative']:>8} {ambiguous:>9}   ({counts['seconds']} s)")
        preset = TASKS[args.task]
        if mode == "eval" and preset.eval_min_fraction is not None:
            # the same slices without the small-target rule (from the cache), to show what the rule removes
            unfiltered = build_slice_dataset(splits[name], preset.replace(eval_min_fraction=None), spatial_size=size,
                                             cache_dir=cache_dir, split="eval")
            positives = sum(d["label"] for d in unfiltered.data)
            counts["without_eval_min_fraction"] = {"slices": len(unfiltered), "positive": positives}
            print(f"{'':<11} {'':>5} {'':>5} {len(unfiltered):>7} {positives:>8} {len(unfiltered) - positives:>8}"
                  f"             (without eval_min_fraction={preset.eval_min_fraction})")
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
