# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""
Write a labels file (``case,slice,label``) from the pixel masks of a dataset, by the task's documented rule.

For benchmarks (the slice labels of BraTS / CHAOS come from their masks, once, into the file a user would write)
and for people who have masks for some scans. Scans without a mask are listed and left out of the file::

    python -m monai_wsss.data.labels --dataset_dir ../shared/data/brats2018 --task brats --out labels.csv

The rule: a slice whose target covers at least 0.2 % of the slice is labelled 1, a slice without target 0, and a
slice in between is left unlabelled (not trained on). See :py:func:`~monai_wsss.data.labels_from_masks`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from monai_wsss.data.datalist import load_datalist
from monai_wsss.data.slice_labels import labels_from_masks
from monai_wsss.data.tasks import TASKS

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--dataset_dir`` (a dataset folder or a datalist JSON), ``--task``, ``--out``."""
    parser = argparse.ArgumentParser(prog="python -m monai_wsss.data.labels", description=__doc__.split("\n\n")[1])
    parser.add_argument("--dataset_dir", required=True, help="dataset folder (BraTS / CHAOS layout) or datalist JSON")
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--out", required=True, help="the labels CSV to write (atomically)")
    parser.add_argument("--quiet", action="store_true", help="no line per case")
    args = parser.parse_args(argv)
    path = Path(args.dataset_dir)
    if path.is_file():
        items = [it for split in load_datalist(path).values() for it in split]
    elif path.is_dir():
        items = TASKS[args.task].list_cases(path, require_seg=False)
    else:
        parser.error(f"--dataset_dir: no such file or folder: {path}")
    with_mask = [it for it in items if it.get("seg")]
    without = sorted(str(it.get("case", it.get("image"))) for it in items if not it.get("seg"))
    if not with_mask:
        parser.error(f"--dataset_dir: none of the {len(items)} scans in {path} has a pixel mask to derive labels from.")
    if without:
        print(f"{len(without)} scan(s) without a mask are not in the file: {without}", file=sys.stderr)
    labels = labels_from_masks(with_mask, args.task, progress=not args.quiet)
    written = labels.to_csv(args.out)
    print(f"wrote {written}: {len(labels)} scans, labels from {labels.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
