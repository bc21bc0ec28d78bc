# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""
Write a copy of a volume z-scored inside the body (non-zero voxels; the background stays 0), as BraTS 2015 and
some other releases ship FLAIR, under the same file name in another folder. Used to check that a bundle's masks do
not depend on the intensity scale:

    python scripts/zscore_volume.py <case>_flair.nii.gz /tmp/zs/        # writes /tmp/zs/<case>_flair.nii.gz
    python -m monai.bundle run --config_file "['bundles/brats_cdm/configs/inference.json','bundles/brats_cdm/configs/evaluate.json']" --bundle_root bundles/brats_cdm \\
        --image /tmp/zs/<case>_flair.nii.gz --seg <case>_seg.nii.gz --output_dir /tmp/zs/eval
"""

from __future__ import annotations

import argparse

import numpy as np
from monai.transforms import LoadImage, NormalizeIntensity

from monai_wsss.transforms.io import SaveVolumed


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", help="input NIfTI")
    p.add_argument("output_dir", help="folder of the z-scored copy (same file name, written atomically)")
    args = p.parse_args(argv)
    image = LoadImage(image_only=True, ensure_channel_first=True)(args.image)
    z = NormalizeIntensity(nonzero=True)(image)  # mean / std of the non-zero voxels; zeros stay 0
    saved = SaveVolumed("image", args.output_dir, output_postfix="", output_dtype=np.float32, name_key=None)({"image": z})
    return saved["image_path"]


if __name__ == "__main__":
    main()
