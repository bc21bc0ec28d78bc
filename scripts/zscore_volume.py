# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""
Write a copy of a volume z-scored inside the body (non-zero voxels; the background stays 0), as BraTS 2015 and
some other releases ship FLAIR. Used to check that a bundle's masks do not depend on the intensity scale:

    python scripts/zscore_volume.py <case>_flair.nii.gz /tmp/zs/<case>_flair.nii.gz
    python -m monai.bundle run --config_file bundles/brats_cdm/configs/evaluate.json --bundle_root bundles/brats_cdm \\
        --image /tmp/zs/<case>_flair.nii.gz --seg <case>_seg.nii.gz --output_dir /tmp/zs/eval
"""

from __future__ import annotations

import argparse

import numpy as np
from monai.data import NibabelWriter
from monai.transforms import LoadImage, NormalizeIntensity

from monai_wsss.transforms.io import atomic_write


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", help="input NIfTI")
    p.add_argument("output", help="output NIfTI (written atomically)")
    args = p.parse_args(argv)
    image = LoadImage(image_only=True, ensure_channel_first=True)(args.image)
    z = NormalizeIntensity(nonzero=True)(image)  # mean / std of the non-zero voxels; zeros stay 0
    writer = NibabelWriter(output_dtype=np.float32)
    writer.set_data_array(z, channel_dim=0)
    writer.set_metadata(dict(image.meta), resample=False)
    with atomic_write(args.output) as tmp:
        writer.write(str(tmp), verbose=False)


if __name__ == "__main__":
    main()
