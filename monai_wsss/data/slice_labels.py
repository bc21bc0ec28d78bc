# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""
Image-level labels of slices, the only supervision of the weakly supervised task: a labels file a person can write.

The file is CSV with the header ``case,slice,label``:

- ``case``: the case name as the datalist gives it (BraTS folder name, CHAOS patient number, the stem of a single
  NIfTI file, or a datalist item's ``case``);
- ``slice``: the 0-based slice index along the task's slice axis once the scan is in the task's orientation
  (``TaskPreset.orientation``; for a scan stored in it, the file's own index along that axis), or empty for every
  slice of the scan (a scan-level label, e.g. ``control_07,,0`` for a healthy control);
- ``label``: ``0`` (no target) or ``1`` (target present).

Slices that no row names are unlabelled: they are not trained on and do not enter validation. A slice row
overrides nothing: a slice row and a scan row of the same scan must agree, as must two rows of the same slice.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from monai_wsss.data.tasks import TaskPreset, get_task
from monai_wsss.utils.atomic_files import write_text_atomic

__all__ = ["LABELS_HEADER", "UNLABELLED", "SliceLabels", "labels_from_masks", "mask_slice_labels"]

logger = logging.getLogger(__name__)

#: the header of a labels file
LABELS_HEADER = ("case", "slice", "label")
#: the value of an unlabelled slice in :py:meth:`SliceLabels.for_case`
UNLABELLED = -1


class SliceLabels:
    """
    The image-level labels of a dataset's slices, read from (or written to) a ``case,slice,label`` CSV file.

    Each label remembers the file and line it came from, so every later error (a slice beyond the end of its scan,
    a case the dataset does not hold) names them.

    Args:
        rows: ``(case, slice, label, line)`` tuples; ``slice`` is ``None`` for a scan-level label, ``line`` the
            1-based line of the file (``0`` when not from a file).
        source: where the rows come from (the file path, or e.g. ``"masks of ... by the 0.2 % rule"``).

    Raises:
        ValueError: a label that is not 0 / 1, a negative slice, or two rows that disagree (both lines named).

    Example::

        >>> labels = SliceLabels([("case_a", 40, 1, 2), ("case_a", None, 0, 3), ("control", None, 0, 4)])
        Traceback (most recent call last):
        ...
        ValueError: <rows>: line 3 labels every slice of case 'case_a' 0, but line 2 labels slice 40 of it 1.
        >>> labels = SliceLabels([("case_a", 0, 0, 2), ("case_a", 1, 1, 3), ("control", None, 0, 4)])
        >>> labels.for_case("case_a", 3).tolist(), labels.for_case("control", 2).tolist()
        ([0, 1, -1], [0, 0])
    """

    def __init__(self, rows: Iterable[tuple[str, int | None, int, int]], source: str = "<rows>") -> None:
        self.source = str(source)
        self._scan: dict[str, tuple[int, int]] = {}
        self._slices: dict[str, dict[int, tuple[int, int]]] = {}
        for case, index, label, line in rows:
            self._add(str(case), index, label, int(line))

    # -- construction -------------------------------------------------------------------------------------------

    def _where(self, line: int) -> str:
        return f"{self.source}: line {line}" if line else self.source

    def _add(self, case: str, index: int | None, label: int, line: int) -> None:
        if label not in (0, 1):
            raise ValueError(f"{self._where(line)}: label must be 0 or 1, got {label!r}.")
        if index is not None and index < 0:
            raise ValueError(f"{self._where(line)}: slice must be a 0-based index >= 0 or empty, got {index}.")
        slices = self._slices.setdefault(case, {})
        if index is None:
            if case in self._scan and self._scan[case][0] != label:
                raise ValueError(
                    f"{self._where(line)} labels every slice of case {case!r} {label}, but line "
                    f"{self._scan[case][1]} labels them {self._scan[case][0]}."
                )
            for i, (other, other_line) in slices.items():
                if other != label:
                    raise ValueError(
                        f"{self._where(line)} labels every slice of case {case!r} {label}, but line {other_line} "
                        f"labels slice {i} of it {other}."
                    )
            self._scan.setdefault(case, (label, line))
            return
        if index in slices and slices[index][0] != label:
            raise ValueError(
                f"{self._where(line)} labels slice {index} of case {case!r} {label}, but line {slices[index][1]} "
                f"labels it {slices[index][0]}."
            )
        if case in self._scan and self._scan[case][0] != label:
            raise ValueError(
                f"{self._where(line)} labels slice {index} of case {case!r} {label}, but line {self._scan[case][1]} "
                f"labels every slice of it {self._scan[case][0]}."
            )
        slices.setdefault(index, (label, line))

    @classmethod
    def from_csv(cls, path: str | os.PathLike) -> SliceLabels:
        """
        Read a labels file.

        Args:
            path: a CSV file with the header ``case,slice,label`` (extra columns are an error, blank lines are
                skipped, a UTF-8 byte-order mark is accepted).

        Returns:
            the labels, each remembering its line.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: not a CSV file with that header, an empty case, a slice that is not an integer >= 0, a
                label that is not 0 / 1, two rows that disagree, a file without any row (the file, line and value
                are named).

        Example::

            >>> SliceLabels.from_csv("labels.csv").cases  # doctest: +SKIP
            ['Brats18_2013_11_1', ...]
        """
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"labels file not found: {file} (--labels takes a CSV file 'case,slice,label').")
        try:
            text = file.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as err:
            raise ValueError(f"{file} is not a text (CSV) file: {err}") from None
        lines = text.splitlines()
        first = next((i for i, line in enumerate(lines) if line.strip()), None)
        if first is None:
            raise ValueError(f"{file} is empty: expected the header {','.join(LABELS_HEADER)} and one row per label.")
        header = [h.strip().lower() for h in next(csv.reader([lines[first]]))]
        if tuple(header) != LABELS_HEADER:
            raise ValueError(
                f"{file}: line {first + 1}: expected the CSV header '{','.join(LABELS_HEADER)}', got {lines[first]!r}."
            )
        rows = []
        for number, line in enumerate(lines[first + 1 :], start=first + 2):
            if not line.strip():
                continue
            fields = next(csv.reader(io.StringIO(line)))
            where = f"{file}: line {number}"
            if len(fields) != 3:
                raise ValueError(f"{where}: expected 3 fields case,slice,label, got {len(fields)}: {line!r}.")
            case, index, label = (f.strip() for f in fields)
            if not case:
                raise ValueError(f"{where}: the case is empty: {line!r}.")
            if index == "":
                slice_index = None
            else:
                try:
                    slice_index = int(index)
                except ValueError:
                    raise ValueError(
                        f"{where}: slice must be a 0-based integer index or empty (every slice), got {index!r}."
                    ) from None
            if label not in ("0", "1"):
                raise ValueError(f"{where}: label must be 0 or 1, got {label!r}.")
            rows.append((case, slice_index, int(label), number))
        if not rows:
            raise ValueError(f"{file} has a header but no label row.")
        return cls(rows, source=str(file))

    @classmethod
    def from_tensors(cls, labels: Mapping[str, Sequence[int]], source: str = "<tensors>") -> SliceLabels:
        """
        Labels from one sequence per case: ``0`` / ``1`` per slice, :py:data:`UNLABELLED` (-1) for slices left out.

        Example::

            >>> SliceLabels.from_tensors({"a": [0, 1, -1]}).for_case("a", 3).tolist()
            [0, 1, -1]
        """
        rows = []
        for case, values in labels.items():
            for i, value in enumerate(torch.as_tensor(values).reshape(-1).tolist()):
                if value != UNLABELLED:
                    rows.append((str(case), i, int(value), 0))
        return cls(rows, source=source)

    # -- use ----------------------------------------------------------------------------------------------------

    @property
    def cases(self) -> list[str]:
        """The cases the labels name, sorted."""
        return sorted(c for c in self._slices if c in self._scan or self._slices[c])

    def __contains__(self, case: object) -> bool:
        return str(case) in self._scan or bool(self._slices.get(str(case)))

    def __len__(self) -> int:
        return len(self.cases)

    def for_case(self, case: str, num_slices: int) -> torch.Tensor:
        """
        The label of every slice of one scan.

        Args:
            case: the case name.
            num_slices: the scan's number of slices along the task's slice axis.

        Returns:
            an int64 tensor ``(num_slices,)``: 0, 1, or :py:data:`UNLABELLED` (-1) for slices no row names (every
            slice of a case the labels do not name).

        Raises:
            ValueError: a row names a slice ``>= num_slices`` (its line is named).
        """
        case = str(case)
        out = torch.full((int(num_slices),), UNLABELLED, dtype=torch.int64)
        if case in self._scan:
            out[:] = self._scan[case][0]
        for index, (label, line) in sorted(self._slices.get(case, {}).items()):
            if index >= num_slices:
                raise ValueError(
                    f"{self._where(line)}: slice {index} of case {case!r} is out of range: the scan has {num_slices} "
                    "slices along the slice axis (indices 0 to "
                    f"{num_slices - 1})."
                )
            out[index] = label
        return out

    def check_cases(
        self, dataset_cases: Iterable[str], required_cases: Iterable[str] = (), allow_unlabelled_scans: bool = False
    ) -> None:
        """
        Check the labels against a dataset: every case they name must exist, and every required case should be named.

        Args:
            dataset_cases: every case of the dataset (all splits).
            required_cases: the cases that must carry labels (the training and validation scans).
            allow_unlabelled_scans: a required case that no row names is a warning (the scan is left out of
                training and validation) instead of an error.

        Raises:
            ValueError: a case of the labels that the dataset does not hold (its first line named), or, without
                ``allow_unlabelled_scans``, a required case without labels.
        """
        known = {str(c) for c in dataset_cases}
        for case in self.cases:
            if case not in known:
                line = self._scan[case][1] if case in self._scan else min(v[1] for v in self._slices[case].values())
                shown = sorted(known)[:5]
                raise ValueError(
                    f"{self._where(line)}: unknown case {case!r}: the dataset has no such case "
                    f"({len(known)} cases, e.g. {shown})."
                )
        missing = sorted({str(c) for c in required_cases} - set(self.cases))
        if missing:
            message = (
                f"{self.source} names no slice of {len(missing)} training/validation scan(s): {missing[:10]}"
                f"{' ...' if len(missing) > 10 else ''}"
            )
            if not allow_unlabelled_scans:
                raise ValueError(
                    f"{message}. Add rows for them (an empty slice field labels every slice of a scan), or pass "
                    "--allow_unlabelled_scans true to leave them out of training and validation."
                )
            logger.warning(f"{message}; they are left out of training and validation.")

    def label_values(self, cases: Iterable[str]) -> set[int]:
        """The label values (0, 1) that the rows of these cases give, e.g. to check that a validation split has both.

        Example::

            >>> sorted(SliceLabels([("a", 0, 1, 0), ("b", None, 0, 0)]).label_values(["a", "b"]))
            [0, 1]
        """
        values: set[int] = set()
        for case in (str(c) for c in cases):
            if case in self._scan:
                values.add(self._scan[case][0])
            values.update(label for label, _ in self._slices.get(case, {}).values())
        return values

    def digest(self) -> str:
        """A short checksum of the labels (not of their lines), e.g. to key caches of what they produce."""
        h = hashlib.sha1()
        for case in self.cases:
            scan = self._scan.get(case, (None,))[0]
            slices = sorted((i, lab) for i, (lab, _) in self._slices.get(case, {}).items())
            h.update(repr((case, scan, slices)).encode())
        return h.hexdigest()[:12]

    def to_csv(self, path: str | os.PathLike) -> Path:
        """
        Write the labels as a labels file (UTF-8, atomically: a temporary file renamed into place).

        Args:
            path: output CSV path (parent folders are created).

        Returns:
            the written path.
        """
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(LABELS_HEADER)
        for case in self.cases:
            if case in self._scan:
                writer.writerow((case, "", self._scan[case][0]))
            for index, (label, _) in sorted(self._slices.get(case, {}).items()):
                writer.writerow((case, index, label))
        return write_text_atomic(path, buffer.getvalue())

    def __repr__(self) -> str:
        return f"SliceLabels({len(self)} cases from {self.source})"


def mask_slice_labels(seg: torch.Tensor, task: str | TaskPreset = "brats") -> torch.Tensor:
    """
    The label of every slice of one binary ``(1, H, W, D)`` target mask by the task's documented rule.

    The rule (:py:class:`~monai_wsss.transforms.WeakSliceLabel` with the task preset's thresholds): a slice whose
    target covers at least ``positive_min_fraction`` of the slice (and ``positive_min_pixels``) is 1, a slice without
    any target pixel 0, a slice in between :py:data:`UNLABELLED`. Slices run along the preset's ``slice_axis``.

    Returns:
        int64 ``(n_slices,)`` of 0, 1 and -1.

    Example::

        >>> m = torch.zeros(1, 40, 40, 3); m[0, :5, :5, 1] = 1; m[0, 0, 0, 2] = 1  # 0.2 % of 40 x 40 is 3.2 pixels
        >>> mask_slice_labels(m, "brats").tolist()
        [0, 1, -1]
    """
    from monai_wsss.transforms.weak_label import WeakSliceLabel

    preset = get_task(task)
    rule = WeakSliceLabel(min_pixels=preset.positive_min_pixels, min_fraction=preset.positive_min_fraction)
    slices = torch.as_tensor(seg).as_subclass(torch.Tensor)[0].movedim(preset.slice_axis, 0)
    total = int(slices[0].numel())
    labels = [rule.from_counts(int(c), total) for c in (slices != 0).flatten(1).sum(1).tolist()]
    return torch.tensor([UNLABELLED if ambiguous else lab for lab, ambiguous in labels], dtype=torch.int64)


def labels_from_masks(items: Sequence[Mapping], task: str | TaskPreset = "brats", progress: bool = False) -> SliceLabels:
    """
    The slice labels of pixel masks by the task's documented rule, as a labels file would hold them.

    The rule (:py:class:`~monai_wsss.transforms.WeakSliceLabel` with the task preset's thresholds): a slice whose
    target covers at least ``positive_min_fraction`` of the slice (0.2 %, about 115 pixels of a 240 x 240 BraTS
    slice) and ``positive_min_pixels`` is labelled 1, a slice without any target pixel 0, and a slice in between
    (a few target pixels) is left unlabelled. Slices run along the task's ``slice_axis`` of the mask as loaded.

    Args:
        items: datalist items with ``case`` and ``seg`` (a mask path).
        task: task name in :py:data:`~monai_wsss.data.TASKS` or a :py:class:`~monai_wsss.data.TaskPreset`
            (target labels, slice axis and rule thresholds).
        progress: print one line per case.

    Returns:
        the labels, with ``source`` naming the rule.

    Raises:
        ValueError: an item without ``case`` or ``seg``, two items with the same case, and the mask errors of
            :py:class:`~monai_wsss.transforms.MapTargetLabelsd` (unexpected label values, naming the file).
        FileNotFoundError: a mask file that does not exist.

    Example::

        >>> items = [{"case": "Brats18_2013_11_1", "seg": ".../Brats18_2013_11_1_seg.nii.gz"}]
        >>> labels_from_masks(items, "brats").to_csv("labels.csv")  # doctest: +SKIP
    """
    from monai.transforms import Compose

    from monai_wsss.transforms.io import LoadVolumed
    from monai_wsss.transforms.weak_label import MapTargetLabelsd

    from monai_wsss.data.slice_dataset import orientation_steps

    preset = get_task(task)
    load = Compose(
        [
            LoadVolumed("seg", channel=preset.image_channel),
            *orientation_steps(["seg"], preset),
            MapTargetLabelsd("seg", target_labels=preset.target_labels, allowed_labels=preset.allowed_labels),
        ]
    )
    rows, seen = [], set()
    for i, item in enumerate(items):
        case = item.get("case")
        if not case or not item.get("seg"):
            raise ValueError(f"item {i} needs 'case' and 'seg' (a mask path) to derive slice labels, got {dict(item)!r}.")
        if str(case) in seen:
            raise ValueError(f"case {case!r} appears twice among the items.")
        seen.add(str(case))
        values = mask_slice_labels(load({"seg": item["seg"]})["seg"], preset).tolist()
        rows += [(str(case), index, label, 0) for index, label in enumerate(values) if label != UNLABELLED]
        if progress:
            print(f"{case}: {values.count(1)} slices 1, {values.count(0)} slices 0, {values.count(UNLABELLED)} unlabelled")
    return SliceLabels(rows, source=f"the masks ({preset.weak_label_rule()})")
