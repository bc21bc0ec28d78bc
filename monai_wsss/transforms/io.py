# Copyright (c) monai_wsss contributors
# Licensed under the Apache License, Version 2.0
"""Loading of volumes (NIfTI files or DICOM series folders) with errors that name the file."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from monai.config import DtypeLike, KeysCollection
from monai.data import ImageReader
from monai.transforms import LoadImage, MapTransform

__all__ = ["LoadVolumed"]


class LoadVolumed(MapTransform):
    """
    Load images channel-first with MONAI's :py:class:`monai.transforms.LoadImage`, raising a short error that
    names the key and the file when a file is missing or unreadable (a corrupt file in a folder of hundreds
    should not surface as a stack trace from inside nibabel).

    With ``reader=None`` MONAI picks the reader from the path: NiBabel for ``.nii``/``.nii.gz`` and ITK for a
    DICOM series folder (or ``.nrrd``, ``.mha`` ...). Multi-channel files (the Decathlon Task01 4D NIfTI,
    channels FLAIR, T1w, T1gd, T2w) can be reduced to one channel with ``channel``.

    Args:
        keys: keys of the paths to load.
        reader: reader(s) passed to ``LoadImage`` (``None``: chosen from the file suffix).
        channel: keep only this channel of multi-channel images (``None``: keep all).
        channel_key: data key that, when present, overrides ``channel`` per item (datalist items of the
            Decathlon layout carry ``"channel"``).
        dtype: data type of the loaded arrays.
        allow_missing_keys: do not raise if a key is missing.

    Returns:
        the dictionary with channel-first MetaTensors (affine and ``filename_or_obj`` in their meta).

    Raises:
        FileNotFoundError: a path does not exist (named with its key).
        ValueError: a file cannot be read, or ``channel`` is out of range (named with its key).

    Example::

        >>> loader = LoadVolumed(["image", "seg"], channel=0)
        >>> # loader({"image": "BRATS_001.nii.gz", "seg": "BRATS_001_seg.nii.gz"})["image"].shape -> (1, 240, 240, 155)
    """

    def __init__(
        self,
        keys: KeysCollection,
        reader: ImageReader | str | Sequence[ImageReader | str] | None = None,
        channel: int | None = None,
        channel_key: str | None = "channel",
        dtype: DtypeLike = np.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadImage(reader=reader, image_only=True, ensure_channel_first=True, dtype=dtype)
        self.channel = channel
        self.channel_key = channel_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        channel = self.channel
        if self.channel_key is not None and d.get(self.channel_key) is not None:
            channel = int(d[self.channel_key])
        for key in self.key_iterator(d):
            path = d[key]
            if isinstance(path, (str, os.PathLike)):
                if not os.path.exists(path):
                    raise FileNotFoundError(f"key '{key}': file not found: {path}")
                try:
                    img = self.loader(path)
                except Exception as err:  # any reader failure becomes one readable line naming the file
                    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                    raise ValueError(f"key '{key}': cannot read {path} ({type(err).__name__}: {reason})") from None
            else:
                img = self.loader(path)
            if channel is not None and img.shape[0] > 1:
                if not 0 <= channel < img.shape[0]:
                    raise ValueError(
                        f"key '{key}': channel {channel} out of range for {path} with {img.shape[0]} channels."
                    )
                img = img[channel : channel + 1]
            d[key] = img
        return d
