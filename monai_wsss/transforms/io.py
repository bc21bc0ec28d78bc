# Copyright (c) monai_wsss contributors
# Licensed under the Apache License, Version 2.0
"""Load and save transforms for volumes: NIfTI files or DICOM series folders read with errors that name the file,
and images written through :py:func:`~monai_wsss.utils.atomic_files.atomic_write` (never half-written)."""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.config import DtypeLike, KeysCollection
from monai.data import ImageReader, MetaTensor, NibabelWriter
from monai.transforms import LoadImage, MapTransform, Orientation, SaveImage
from nibabel.orientations import aff2axcodes

from monai_wsss.utils.atomic_files import atomic_write

__all__ = ["LoadVolumed", "SaveVolumed", "axis_codes", "in_source_orientation", "reoriented"]

logger = logging.getLogger(__name__)


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
                if self.channel_key is None or d.get(self.channel_key) is None:
                    # not chosen by the datalist (the Decathlon layout names its channel): say which one is used
                    logger.warning(
                        f"key '{key}': {path} has {img.shape[0]} channels (a 4D image, shape {tuple(img.shape)}); "
                        f"using channel {channel} only. Give the datalist item a '{self.channel_key}' entry to choose."
                    )
                img = img[channel : channel + 1]
            d[key] = img
        return d


def axis_codes(affine: Any) -> str | None:
    """
    The orientation of an affine as three axis codes (nibabel's ``aff2axcodes``: the direction each array axis
    points to, e.g. ``"LPS"``), or ``None`` for a degenerate affine.

    Example::

        >>> axis_codes(np.diag([-1.0, -1.0, 1.0, 1.0]))
        'LPS'
    """
    if affine is None:
        return None
    codes = aff2axcodes(np.asarray(affine, dtype=np.float64))
    return None if None in codes else "".join(codes)


def in_source_orientation(img: Any) -> Any:
    """
    ``img`` in the axis order of the file it came from: a MetaTensor reoriented after loading (MONAI's
    ``Orientationd``, a permutation and flips of the axes) is permuted and flipped back to the orientation of its
    ``original_affine`` (set by ``LoadImage``), so its array order and affine are the source file's again. Anything
    else (no metadata, same orientation, degenerate affine) is returned as is.

    Example::

        >>> # in_source_orientation(Orientation("LPS")(LoadImage(...)("scan_stored_PSL.nii.gz"))) -> array order PSL
    """
    if not isinstance(img, MetaTensor):
        return img
    return reoriented(img, axis_codes(img.meta.get("original_affine")))


def reoriented(img: MetaTensor, codes: str | None) -> MetaTensor:
    """
    ``img`` with its axes permuted and flipped to the orientation ``codes`` (MONAI's ``Orientation``); ``img`` itself
    when it already has it or ``codes`` is ``None``.

    Example::

        >>> # reoriented(LoadImage(...)("scan_stored_PSL.nii.gz"), "LPS") -> array order LPS
    """
    if codes is None or codes == axis_codes(img.affine):
        return img
    return Orientation(axcodes=codes, labels=None)(img)


class SaveVolumed(MapTransform):
    """
    Write arrays as image files in their source's space (MONAI's :py:class:`monai.transforms.SaveImage`, so
    the affine of the MetaTensor is kept), each through :py:func:`atomic_write`: a killed run never leaves a
    truncated file under a final name. Trailing singleton dimensions are kept (``SaveImage`` drops them by
    default, which writes a one-slice volume ``(H, W, 1)`` as a 2D image ``(H, W)``). An array reoriented after
    loading (``Orientationd`` in the preprocessing) is written in its source file's own axis order and affine
    (:py:func:`in_source_orientation`), so outputs overlay their scan voxel for voxel.

    The file is ``<stem>_<postfix><output_ext>`` in ``output_dir``, where ``<stem>`` is the data's ``name_key``
    entry when present (a name unique within a run, see :py:func:`~monai_wsss.apps.run_folder.unique_output_stems`),
    else the source file's name without extension. The written path is stored in ``<key>_path``.

    Args:
        keys: keys of the arrays (channel-first MetaTensors) to write.
        output_dir: folder (created).
        output_postfix: postfix of the file name (default: the key).
        output_ext: extension (``".nii.gz"``, ``".nii"``, ...).
        output_dtype: data type written.
        resample: resample to the source's original affine / shape before writing (``SaveImage`` option).
        mode: interpolation when resampling (``"nearest"`` for masks).
        name_key: data key holding the output stem.
        separate_folder: write into ``output_dir/<stem>/`` (``SaveImage``'s layout).
        source_orientation: write in the source file's axis order (see above); ``False`` writes the array as
            it is, with its current affine (the same image in world space).
        allow_missing_keys: skip missing keys.

    Raises:
        ValueError: an array without a source name and no ``name_key`` entry.

    Example::

        SaveVolumed("mask", "out/", output_dtype=np.uint8, mode="nearest", name_key="output_name")(
            {"mask": mask, "output_name": "case_1"})   # out/case_1_mask.nii.gz
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike,
        output_postfix: str | None = None,
        output_ext: str = ".nii.gz",
        output_dtype: DtypeLike = np.float32,
        resample: bool = False,
        mode: str = "nearest",
        name_key: str | None = "output_name",
        separate_folder: bool = False,
        source_orientation: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.source_orientation = bool(source_orientation)
        self.output_postfix = output_postfix
        self.output_ext = output_ext
        self.name_key = name_key
        self.separate_folder = separate_folder
        options = dict(
            output_dir=str(output_dir), output_ext=output_ext, output_dtype=output_dtype, resample=resample,
            mode=mode, squeeze_end_dims=False, separate_folder=False, print_log=False,
        )
        self.saver = SaveImage(channel_dim=0, **options)
        self.output_dtype = output_dtype
        self.resample = resample
        self.mode = mode

    def output_path(self, data: Mapping[Hashable, Any], key: Hashable) -> Path:
        """The final path of ``data[key]``."""
        stem = data.get(self.name_key) if self.name_key is not None else None
        if not stem:
            source = str(getattr(data[key], "meta", {}).get("filename_or_obj", "") or "")
            if not source:
                raise ValueError(f"key '{key}': no source file name to name the output after; pass '{self.name_key}'.")
            stem = os.path.basename(source.rstrip(os.sep))
            for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".gz"):
                if stem.endswith(ext):
                    stem = stem[: -len(ext)]
                    break
        postfix = str(key) if self.output_postfix is None else self.output_postfix
        folder = self.output_dir / str(stem) if self.separate_folder else self.output_dir
        return folder / f"{stem}{'_' + postfix if postfix else ''}{self.output_ext}"

    def _write_one_channel_nifti(self, img: Any, path: Path) -> None:
        # SaveImage either keeps the channel as a 4th axis (squeeze_end_dims=False) or squeezes every trailing
        # singleton axis (True), which turns a one-slice volume (1, H, W, 1) into a 2D image (H, W): drop the
        # channel alone, with MONAI's own NIfTI writer
        writer = NibabelWriter(output_dtype=self.output_dtype)
        writer.set_data_array(img, channel_dim=0, squeeze_end_dims=False)
        writer.data_obj = writer.data_obj[..., 0]
        writer.set_metadata(getattr(img, "meta", None), resample=False, mode=self.mode)
        writer.write(str(path))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            final = self.output_path(d, key)
            img = in_source_orientation(d[key]) if self.source_orientation and not self.resample else d[key]
            with atomic_write(final) as tmp:
                if img.shape[0] == 1 and not self.resample and self.output_ext in (".nii", ".nii.gz"):
                    self._write_one_channel_nifti(img, tmp)
                else:
                    self.saver(img, filename=str(tmp)[: -len(self.output_ext)])
            d[f"{key}_path"] = str(final)
        return d
