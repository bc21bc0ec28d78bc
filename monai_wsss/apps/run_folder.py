# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""
One output folder per run: what a segmentation run wrote, recorded in a manifest, so that a rerun resumes the same
run and refuses a folder that holds another run's results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from monai.inferers import Inferer
from monai.transforms import Transform

from monai_wsss.utils import TEMP_PREFIX, remove_stale_temporaries, write_text_atomic

__all__ = [
    "LOCK_NAME",
    "MANIFEST_NAME",
    "FailedVolumesError",
    "RunFolder",
    "RunFolderError",
    "file_checksum",
    "component_settings",
    "input_checksum",
    "name_run_items",
    "run_settings",
    "state_dict_checksum",
    "unique_output_stems",
]

logger = logging.getLogger(__name__)

#: the manifest a run writes into its output folder
MANIFEST_NAME = "run_manifest.json"
#: the lock a run holds on its output folder while it runs (an OS file lock, released when the process ends)
LOCK_NAME = ".run_folder.lock"
_VERSION = 1
# files a run of this package writes at the top of its folder; a folder holding one of these without a manifest
# belongs to a run we know nothing about
_RESULT_SUFFIXES = ("_map.nii.gz", "_mask.nii.gz")
_RESULT_NAMES = ("predictions.csv", "metrics.csv", "summary.md", "summary.json")


class RunFolderError(ValueError):
    """The output folder cannot be used for this run (another run's results, in use, not writable)."""


class FailedVolumesError(ValueError):
    """Volumes of a run could not be segmented (each listed with its reason); the others were."""


def file_checksum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def input_checksum(path: str | os.PathLike) -> str:
    """
    SHA-256 of an input: a file's bytes, or for a folder (a DICOM series) the names and bytes of every file in it.

    Raises:
        FileNotFoundError: ``path`` does not exist (named).
    """
    p = Path(path)
    if p.is_file():
        return file_checksum(p)
    if not p.is_dir():
        raise FileNotFoundError(f"input not found: {p}")
    digest = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        digest.update(str(f.relative_to(p)).encode())
        digest.update(file_checksum(f).encode())
    return digest.hexdigest()


def state_dict_checksum(module: torch.nn.Module | None) -> str | None:
    """SHA-256 of a network's weights (names, shapes, dtypes and values); None for no network."""
    if module is None or not hasattr(module, "state_dict"):
        return None
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        if not isinstance(value, torch.Tensor):
            continue
        t = value.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        # flattened first: a channels-last weight of shape (C, K, 1, 1) counts as contiguous with stride(-1) != 1
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def unique_output_stems(items: Sequence[Mapping]) -> list[str]:
    """
    Output names of a run's cases, unique within the run: the image file's name without extension where that
    is unique; where two images share a file name (different folders), ``<name>_<case id>``; where that still
    collides, ``<name>_<position in the list>``.

    Args:
        items: datalist items with ``image`` (and ``case``).

    Returns:
        one stem per item, in order.

    Example::

        >>> unique_output_stems([{"image": "a/x.nii.gz", "case": "a"}, {"image": "b/x.nii.gz", "case": "b"}])
        ['x_a', 'x_b']
    """

    def stem(item: Mapping) -> str:
        name = os.path.basename(str(item["image"]).rstrip(os.sep))
        for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
            if name.endswith(ext):
                return name[: -len(ext)]
        return name

    stems = [stem(it) for it in items]
    counts = Counter(stems)
    named = [s if counts[s] == 1 else f"{s}_{it.get('case', i)}" for i, (s, it) in enumerate(zip(stems, items))]
    counts = Counter(named)
    return [s if counts[s] == 1 else f"{s}_{i}" for i, s in enumerate(named)]


def name_run_items(items: Sequence[Mapping | str | os.PathLike]) -> list[dict]:
    """
    A run's items with a ``case`` id and an ``output_name`` each, both unique within the run (see
    :py:func:`unique_output_stems`); image paths are turned into items.

    Args:
        items: datalist items with ``image`` (e.g. from :py:func:`~monai_wsss.apps.list_volumes`) or image paths.

    Returns:
        new dicts, in order.

    Raises:
        ValueError: no item, or an item without ``image``.

    Example::

        >>> [it["output_name"] for it in name_run_items(["a/x.nii.gz", "b/x.nii.gz"])]
        ['x_0', 'x_1']
    """
    out = [{"image": str(it)} if isinstance(it, (str, os.PathLike)) else dict(it) for it in items]
    if not out:
        raise ValueError("no volume to segment (items is empty).")
    for i, item in enumerate(out):
        if "image" not in item:
            raise ValueError(f"item {i} {item!r} has no 'image'.")
    stems = unique_output_stems(out)
    for item, stem in zip(out, stems):
        item.setdefault("case", stem)
        item["case"] = str(item["case"])
        item["output_name"] = stem
    if len({it["case"] for it in out}) != len(out):  # case ids given twice: the unique file names serve as ids
        for item, stem in zip(out, stems):
            item["case"] = stem
    return out


def component_settings(obj: Any, _depth: int = 0) -> Any:
    """
    The plain settings of a run component for a manifest: its public attributes that are numbers, strings or
    lists of them, and a SHA-256 of every network's weights (and of small tensors); a ``Compose`` gives the
    settings of each transform, a list or tuple those of each element, and a component held by another (the
    ``AsDiscrete`` inside ``AsDiscreted``, the inner inferer of a ``VolumeInferer``) is described in turn.

    Example::

        >>> component_settings(torch.nn.Identity())["class"]
        'Identity'
    """
    plain = (bool, int, float, str, type(None))
    if isinstance(obj, plain):
        return obj
    if isinstance(obj, (list, tuple)):
        return [component_settings(v, _depth + 1) for v in obj]
    if isinstance(obj, torch.nn.Module):
        return {"class": type(obj).__name__, "weights_sha256": state_dict_checksum(obj)}
    transforms = getattr(obj, "transforms", None)
    if isinstance(transforms, (list, tuple)):  # a MONAI Compose
        return [component_settings(t, _depth + 1) for t in transforms]
    out: dict[str, Any] = {"class": type(obj).__name__}
    for key, value in sorted(vars(obj).items()) if hasattr(obj, "__dict__") else ():
        if key.startswith("_"):
            continue
        if isinstance(value, plain) or (isinstance(value, (tuple, list)) and all(isinstance(v, plain) for v in value)):
            out[key] = list(value) if isinstance(value, tuple) else value
        elif isinstance(value, torch.nn.Module):
            out[f"{key}_sha256"] = state_dict_checksum(value)
        elif isinstance(value, torch.Tensor) and value.numel() <= 1 << 16:
            out[f"{key}_sha256"] = hashlib.sha256(value.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        elif _depth < 3 and isinstance(value, (Transform, Inferer)):
            out[key] = component_settings(value, _depth + 1)
    return out


def run_settings(**components: Any) -> dict:
    """
    Everything a bundle run's results depend on, for its :py:class:`RunFolder` manifest: the package version and
    :py:func:`component_settings` of each named component (network, inferer, postprocessing, options ...).

    Example::

        "run_folder": {"_target_": "monai_wsss.apps.RunFolder", "output_dir": "@output_dir", "inputs": "@run_items",
                       "settings": "$monai_wsss.apps.run_settings(network=@network, inferer=@inferer,
                                                                  postprocessing=@postprocessing)"}
    """
    import monai_wsss

    return {"package": f"monai_wsss {monai_wsss.__version__}", **{k: component_settings(v) for k, v in components.items()}}


def _jsonable(value: Any) -> Any:
    """Settings as JSON: numbers, text, lists and dicts; nan / inf as text; anything else by its repr."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.device):
        return str(value)
    return repr(value)


class RunFolder:
    """
    The output folder of one segmentation run, and its manifest ``run_manifest.json``: the inputs (paths and
    SHA-256), the settings, and every file written with its SHA-256.

    :py:meth:`open` decides what happens to a folder before any compute:

    - empty or missing: a new run;
    - a manifest of the same run (same inputs with the same checksums, same settings): the run is resumed; files
      recorded and unchanged on disk are kept, every other file is written again;
    - a manifest of another run, or results of this package without a manifest: refused with
      :py:class:`RunFolderError`, unless ``overwrite=True``, which deletes the files the old run wrote first
      (so the folder never mixes two runs);
    - a manifest of a run that wrote nothing (refused, or failed on every volume before writing): replaced;
    - an input whose content changed since a run that wrote nothing for it (a failed scan, since fixed): the
      same run, which retries it;
    - a folder in use by another run (it holds the OS lock on :py:data:`LOCK_NAME`): refused before anything
      is read or removed. The lock is held from :py:meth:`open` to :py:meth:`finish` (or :py:meth:`close`) and
      released by the OS when the process ends, so a killed run never leaves the folder locked.

    Every file is written under a temporary name and renamed into place (see
    :py:func:`~monai_wsss.utils.atomic_files.atomic_write`); :py:meth:`record` enters it in the manifest, itself
    rewritten atomically, so a killed run leaves complete files and a manifest that lists only them.

    Args:
        output_dir: the folder.
        inputs: the run's items (``image``, ``seg`` paths are checksummed).
        settings: everything the results depend on (JSON-able values; others are stored by ``repr``).
        overwrite: replace another run's results.

    Raises:
        RunFolderError: from :py:meth:`open`, naming the folder and what differs.

    Example::

        folder = RunFolder("out", items, {"method": "cdm", "noise_level": 300})
        folder.open()
        if not folder.is_complete(case, ["map", "mask"]):
            ...  # write out/<name>_map.nii.gz, then folder.record(case, "map", path)
    """

    def __init__(
        self, output_dir: str | os.PathLike, inputs: Sequence[Mapping], settings: Mapping, overwrite: bool = False
    ) -> None:
        self.path = Path(output_dir)
        self.manifest_path = self.path / MANIFEST_NAME
        self.items = [dict(it) for it in inputs]
        self.inputs = [
            {k: str(it[k]) for k in ("case", "image", "seg") if it.get(k) is not None} for it in inputs
        ]
        self.settings = _jsonable(dict(settings))
        self.overwrite = bool(overwrite)
        self.resumed = False
        self.opened = False
        self.manifest: dict = {}
        self._lock: FileLock | None = None

    # ---- before any compute -----------------------------------------------------------------------------------
    def check_writable(self) -> None:
        """Create the folder and write / delete a probe file in it. Raises RunFolderError naming the folder."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f"{TEMP_PREFIX}probe-{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise RunFolderError(
                f"output folder {self.path} is not writable ({type(err).__name__}: {err.strerror or err}); "
                "pass another --output_dir."
            ) from None

    def _checksummed_inputs(self) -> list[dict]:
        out = []
        for item in self.inputs:
            row = dict(item)
            for key in ("image", "seg"):
                if key in item:
                    row[f"{key}_sha256"] = input_checksum(item[key])
            out.append(row)
        return out

    def _foreign_results(self) -> list[str]:
        if not self.path.is_dir():
            return []
        names = [p.name for p in self.path.iterdir() if p.is_file()]
        return sorted(n for n in names if n in _RESULT_NAMES or n.endswith(_RESULT_SUFFIXES))

    def _wrote_nothing(self, old: Mapping) -> bool:
        """Whether a readable manifest records no map or mask, and the folder holds no result it does not record."""
        files = old.get("files")
        if not isinstance(files, Mapping) or "inputs" not in old:  # unreadable, or not one of ours
            return False
        if any(entries for case, entries in files.items() if case != "_run"):
            return False
        reports = {Path(entry["path"]).name for entry in files.get("_run", {}).values()}
        return not set(self._foreign_results()) - reports

    def _differences(self, old: Mapping, new: Mapping) -> list[str]:
        diffs = []
        old_inputs, new_inputs = old.get("inputs", []), new["inputs"]
        if len(old_inputs) != len(new_inputs):
            diffs.append(f"{len(old_inputs)} input volumes vs {len(new_inputs)} now")
        else:
            files = old.get("files", {})
            for a, b in zip(old_inputs, new_inputs):
                if a == b:
                    continue
                same_paths = all(a.get(k) == b.get(k) for k in ("case", "image", "seg"))
                if same_paths and not files.get(str(b.get("case"))):
                    continue  # changed since, but nothing was written from it (e.g. a scan that failed, now fixed)
                what = "changed content" if a.get("image") == b.get("image") else f"was {a.get('image')}"
                diffs.append(f"input {b.get('image')} ({what})")
                break
        old_settings, new_settings = old.get("settings", {}), new["settings"]
        for key in sorted(set(old_settings) | set(new_settings)):
            if old_settings.get(key) != new_settings.get(key):
                diffs.append(f"{key}: {old_settings.get(key)!r} then, {new_settings.get(key)!r} now")
        return diffs

    def open(self) -> RunFolder:
        """
        Check the folder and start or resume the run (see the class docstring). Call before any compute.

        Returns:
            self (``resumed`` tells whether an earlier run of the same settings is continued).

        Raises:
            RunFolderError: not writable, in use by another run, or another run's results without ``overwrite``.
        """
        self.check_writable()
        self._lock_folder()
        try:
            self._open_locked()
        except BaseException:
            self.close()
            raise
        self.opened = True
        return self

    def _lock_folder(self) -> None:
        if self._lock is not None and self._lock.is_locked:
            return
        lock = FileLock(self.path / LOCK_NAME, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise RunFolderError(
                f"output folder {self.path} is in use by another run (it holds {LOCK_NAME}); wait for that run to "
                "end, or pass another --output_dir."
            ) from None
        self._lock = lock

    def close(self) -> None:
        """Release the folder's lock (at the end of the run, or when it fails); opening again takes it again."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self.opened = False

    def _open_locked(self) -> None:
        # only the run holding the lock removes temporaries: those of a running run are never touched
        stale = remove_stale_temporaries(self.path)
        if stale:
            logger.info(f"{self.path}: removed {len(stale)} temporary file(s) of an interrupted run")
        new = {"version": _VERSION, "inputs": self._checksummed_inputs(), "settings": self.settings}
        old: dict | None = None
        if self.manifest_path.is_file():
            try:
                old = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                old = {"settings": {"manifest": "unreadable"}}
        if old is not None and self._wrote_nothing(old):
            # a run refused, or failed on every volume, wrote no map or mask: nothing of it to keep or to protect;
            # its reports (a predictions.csv listing the failures) go with its manifest
            for entry in old.get("files", {}).get("_run", {}).values():
                (self.path / entry["path"]).unlink(missing_ok=True)
            logger.info(f"{self.path}: replacing the {MANIFEST_NAME} of an earlier run that wrote no map or mask")
            old = None
        if old is not None:
            diffs = self._differences(old, new)
            if not diffs:
                self.manifest = {**old, **new, "files": old.get("files", {})}
                self.manifest.pop("finished", None)
                self.resumed = True
                kept = sum(len(v) for v in self.manifest["files"].values())
                logger.info(f"{self.path}: resuming the run recorded in {MANIFEST_NAME} ({kept} file(s) written)")
            elif not self.overwrite:
                raise RunFolderError(
                    f"output folder {self.path} holds the results of another run ({MANIFEST_NAME}: "
                    f"{'; '.join(diffs[:4])}{' ...' if len(diffs) > 4 else ''}); pass another --output_dir, or "
                    "--overwrite true to replace them."
                )
            else:
                self._remove_recorded(old)
        else:
            foreign = self._foreign_results()
            if foreign and not self.overwrite:
                raise RunFolderError(
                    f"output folder {self.path} holds results without a {MANIFEST_NAME} ({', '.join(foreign[:3])}"
                    f"{' ...' if len(foreign) > 3 else ''}); pass another --output_dir, or --overwrite true to "
                    "replace them."
                )
            for name in foreign:
                (self.path / name).unlink()
            if foreign:
                logger.info(f"{self.path}: overwrite: removed {len(foreign)} earlier result file(s)")
        if not self.resumed:
            self.manifest = {**new, "files": {}, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        # the run's reports are written again from what is on disk at its end: the old ones would describe a
        # state that is no longer true while this run is under way
        for name in _RESULT_NAMES:
            self.forget(name)
        self._save()

    def pending(self, items: Sequence[Mapping] | None = None, names: Sequence[str] = ("map",)) -> list[dict]:
        """
        The items still to compute: all of them, unless the folder holds a manifest of this same run (same inputs
        and settings), whose volumes with every file of ``names`` recorded and unchanged on disk are kept. Reads
        the folder only (nothing is written or removed), so it can be called before :py:meth:`open`.

        Args:
            items: the run's items (default: the ones the folder was made with), with their ``case``.
            names: the files each computed volume writes (``"map"``; ``"map"`` and ``"mask"`` when masks are
                made per volume; ``"mask"`` alone when no map is written).

        Returns:
            the items to compute, in order.
        """
        items = self.items if items is None else [dict(it) for it in items]
        manifest = self.manifest
        if not manifest and self.manifest_path.is_file():
            try:
                old = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return items
            new = {"inputs": self._checksummed_inputs(), "settings": self.settings}
            if self._differences(old, new):
                return items
            manifest = old
        files = manifest.get("files", {})

        def intact(case: str, name: str) -> bool:
            entry = files.get(case, {}).get(name)
            p = self.path / entry["path"] if entry else None
            return p is not None and p.is_file() and file_checksum(p) == entry["sha256"]

        def kept(case: str) -> bool:
            return all(intact(case, name) for name in names)

        return [it for it in items if not kept(str(it.get("case")))]

    def update_row(self, case: str, **values: Any) -> dict:
        """
        Set fields of ``case``'s row of ``predictions.csv`` (kept in the manifest, so a resumed run keeps them); a
        value of ``None`` removes the field.
        """
        row = self.manifest.setdefault("rows", {}).setdefault(case, {"case": case})
        for key, value in _jsonable(values).items():
            if value is None:
                row.pop(key, None)
            else:
                row[key] = value
        self._save()
        return row

    def fail(self, case: str, reason: str) -> None:
        """Record that ``case`` could not be segmented, and why (its row's ``error``; a rerun retries it)."""
        self.update_row(case, error=str(reason))

    def failures(self) -> dict[str, str]:
        """The cases of the run recorded as failed, with their reasons, in the items' order."""
        return {str(r["case"]): str(r["error"]) for r in self.rows() if r.get("error")}

    def rows(self) -> list[dict]:
        """The rows of every item of the run, in the items' order (empty dicts for items not written)."""
        recorded = self.manifest.get("rows", {})
        return [dict(recorded.get(str(it.get("case")), {})) for it in self.items]

    def _remove_recorded(self, old: Mapping) -> None:
        removed = 0
        for files in old.get("files", {}).values():
            for entry in files.values():
                p = self.path / entry["path"]
                if p.is_file():
                    p.unlink()
                    removed += 1
        for name in self._foreign_results():
            (self.path / name).unlink()
            removed += 1
        overlays = self.path / "overlays"
        if overlays.is_dir():
            shutil.rmtree(overlays)
        logger.info(f"{self.path}: overwrite: removed {removed} file(s) of the earlier run")

    # ---- during the run ---------------------------------------------------------------------------------------
    def _save(self) -> None:
        write_text_atomic(self.manifest_path, json.dumps(self.manifest, indent=1) + "\n")

    def record(self, case: str, name: str, path: str | os.PathLike) -> None:
        """Enter a written file of ``case`` (``name``: ``"map"``, ``"mask"``, ``"overlay"``) in the manifest."""
        p = Path(path)
        rel = os.path.relpath(p, self.path)
        files = self.manifest.setdefault("files", {})
        files.setdefault(case, {})[name] = {"path": rel, "sha256": file_checksum(p)}
        self._save()

    def forget(self, name: str, case: str = "_run") -> None:
        """Drop a file from the manifest and from disk (a report about to be rewritten)."""
        entry = self.manifest.get("files", {}).get(case, {}).pop(name, None)
        target = self.path / (entry["path"] if entry else name)
        if target.is_file():
            target.unlink()

    def recorded(self, case: str, name: str) -> Path | None:
        """The path of a recorded file of ``case`` when it is on disk with its recorded checksum, else None."""
        entry = self.manifest.get("files", {}).get(case, {}).get(name)
        if not entry:
            return None
        p = self.path / entry["path"]
        if not p.is_file() or file_checksum(p) != entry["sha256"]:
            return None
        return p

    def is_complete(self, case: str, names: Sequence[str]) -> bool:
        """Whether every file of ``names`` of ``case`` is recorded and unchanged on disk."""
        return all(self.recorded(case, n) is not None for n in names)

    def finish(self) -> None:
        """Mark the run complete in the manifest (with the cases that failed, if any) and release the folder."""
        self.manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        failed = self.failures()
        if failed:
            self.manifest["failed"] = failed
        else:
            self.manifest.pop("failed", None)
        self._save()
        self.close()
