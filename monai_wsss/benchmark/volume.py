# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""
Whole-volume speed: the time a bundle user waits for one volume, per stage, for every method of
:py:data:`monai_wsss.apps.METHODS`, built from the bundle's own method configs (``configs/inference.json`` and
``configs/inference_<method>.json``, so every default, ``sw_batch_size`` included, is the bundle's).

    python -m monai_wsss.benchmark speed --mode volume --bundle_root bundles/brats_cdm \\
        --image ../shared/data/brats2018/Brats18_2013_11_1/Brats18_2013_11_1_flair.nii.gz

The volume goes through ``VolumeSegmentationPipeline.run`` once per method and thread count (the default
``torch.get_num_threads()`` a user gets, then 1 thread); the preprocessing (``load``), ``predict``, ``normalize``, ``binarize`` and the
map/mask writers are timed where ``run`` calls them, everything else (Otsu thresholds, CSV, the second pass of the
average Otsu threshold) is ``other``. A method whose weights are missing is skipped with a note; a method whose map
would take longer than ``--max_map_seconds`` (estimated from a warm-up on two slices) is reported as an estimate only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.utils import convert_to_tensor

import monai_wsss.apps.pipeline as pipeline_module
from monai_wsss.apps import METHODS
from monai_wsss.benchmark.speed import write_result
from monai_wsss.networks.precision import PRECISIONS
from monai_wsss.utils import reuse_freed_memory

__all__ = ["STAGES", "build_bundle_pipeline", "time_volume", "run_volume_benchmark", "volume_markdown", "main"]

#: stages of the table, in the order ``run`` goes through them
STAGES = ("load", "map", "post", "write", "other")


def build_bundle_pipeline(bundle_root: str | os.PathLike, method: str, overrides: dict | None = None) -> Any:
    """
    A :py:class:`~monai_wsss.apps.VolumeSegmentationPipeline` with the network, inferer and post-processing settings
    of a bundle's method configs (``configs/inference.json`` + ``configs/inference_<method>.json``), so its stages
    can be timed one by one.

    Args:
        bundle_root: the bundle folder.
        method: a method of the bundle (:py:func:`~monai_wsss.bundle.bundle_methods`).
        overrides: further config values (e.g. ``{"sw_batch_size": 8}``).

    Returns:
        the pipeline.

    Raises:
        FileNotFoundError: missing config or weights (from the bundle's ``load_weights``).
        ValueError: a method the bundle's networks cannot run (e.g. ``cfg`` without a null class).

    Example::

        pipe = build_bundle_pipeline("bundles/brats_cdm", "cdm")
    """
    from monai_wsss.apps import VolumeSegmentationPipeline
    from monai_wsss.bundle import parse_bundle_config
    from monai_wsss.inferers import VolumeInferer
    from monai_wsss.transforms import NormalizeMapd

    parser = parse_bundle_config(bundle_root, method, progress=False, **(overrides or {}))
    try:
        network = parser.get_parsed_content("network")
        inferer = parser.get_parsed_content("inferer")
        postprocessing = parser.get_parsed_content("postprocessing")
        threshold = parser.get_parsed_content("mask_threshold")
        min_size = int(parser.get_parsed_content("min_component_size"))
    except RuntimeError as err:  # ConfigParser wraps the real error; unwrap it so callers can tell missing weights
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, (FileNotFoundError, ValueError)):
            cause = cause.__cause__ or cause.__context__
        raise (cause or err) from err
    normalizers = [t for t in postprocessing.transforms if isinstance(t, NormalizeMapd)]
    normalizer = normalizers[0].normalizer if normalizers else None
    if isinstance(inferer, VolumeInferer):
        inner, roi, batch = inferer.inferer, inferer.roi_size, inferer.sw_batch_size
    else:  # a whole-volume inferer (the per-volume intensity threshold)
        inner, roi, batch = inferer, tuple(parser.get_parsed_content("roi_size")), 8
    return VolumeSegmentationPipeline(
        None if isinstance(network, torch.nn.Identity) else network, inner, task=parser.get_parsed_content("task"),
        roi_size=roi, sw_batch_size=batch, map_mode=None if normalizer is None else normalizer.mode,
        normalize_per="volume" if normalizer is None or normalizer.slice_axis is None else "slice",
        threshold=threshold, min_component_size=min_size, seed=int(parser.get_parsed_content("seed")),
    )


class _Stopwatch:
    """Accumulates the seconds spent in wrapped callables, per stage."""

    def __init__(self) -> None:
        self.seconds = {s: 0.0 for s in STAGES}

    def wrap(self, stage: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - start

        return timed


@contextlib.contextmanager
def _instrument(pipe: Any, watch: _Stopwatch) -> Iterator[None]:
    """Time ``pipe``'s stages where ``run`` calls them (instance attributes shadow the methods; undone on exit)."""
    for name, stage in (("load", "load"), ("predict", "map"), ("normalize", "post"), ("binarize", "post")):
        setattr(pipe, name, watch.wrap(stage, getattr(pipe, name)))
    preprocess = pipe.preprocess  # what run()'s dataset loads each volume with
    pipe.preprocess = watch.wrap("load", preprocess)
    writer_factory = pipeline_module.map_writer
    # run() builds its writers from the module's map_writer; each writer it returns is timed as "write"
    pipeline_module.map_writer = lambda *a, **k: watch.wrap("write", writer_factory(*a, **k))  # type: ignore[assignment]
    try:
        yield
    finally:
        pipeline_module.map_writer = writer_factory
        pipe.preprocess = preprocess
        for name in ("load", "predict", "normalize", "binarize"):
            pipe.__dict__.pop(name, None)


def _brain_slices(pipe: Any, item: dict) -> tuple[torch.Tensor, int]:
    image = convert_to_tensor(pipe.load(item)["image"], track_meta=False)
    axis = pipe.slice_axis + 1  # channel first
    other = tuple(d for d in range(image.ndim) if d != axis)
    return image, int(image.ne(0).any(dim=other).sum())


def time_volume(pipe: Any, item: dict, max_map_seconds: float | None = None) -> dict:
    """
    Time one volume through ``pipe.run`` by stage, after a warm-up on two slices (which also estimates the map time).

    Args:
        pipe: a :py:class:`~monai_wsss.apps.VolumeSegmentationPipeline`.
        item: ``{"image": path}``.
        max_map_seconds: skip the run when the estimated map time exceeds this (None: always run).

    Returns:
        ``{"seconds": {stage: s}, "total": s, "slices_with_body": n, "estimated_map_seconds": s, "ran": bool}``.
    """
    image, n_body = _brain_slices(pipe, item)
    vi = pipe.volume_inferer
    # warm-up (oneDNN primitives, allocator) on two body slices, timed as the estimate: a whole batch of a slow
    # method (CG-Diff at L = 400, minutes per batch) would cost more than the estimate saves
    axis = pipe.slice_axis + 1
    keep = image.movedim(axis, 0).flatten(1).ne(0).any(1).nonzero().flatten()[:2]
    start = time.perf_counter()
    pipe.predict(image.index_select(axis, keep))
    per_slice = (time.perf_counter() - start) / max(1, int(keep.numel()))
    result: dict = {
        "slices_with_body": n_body,
        "sw_batch_size": vi.sw_batch_size,
        "estimated_map_seconds": per_slice * n_body,
        "ran": False,
    }
    if max_map_seconds is not None and result["estimated_map_seconds"] > max_map_seconds:
        return result
    watch = _Stopwatch()
    with tempfile.TemporaryDirectory() as out, _instrument(pipe, watch):
        start = time.perf_counter()
        pipe.run([item], out)
        total = time.perf_counter() - start
    watch.seconds["other"] = max(0.0, total - sum(watch.seconds[s] for s in STAGES if s != "other"))
    result.update(seconds=watch.seconds, total=total, ran=True)
    return result


def run_volume_benchmark(
    image: str,
    bundle_root: str = "bundles/brats_cdm",
    methods: Sequence[str] | None = None,
    threads: Sequence[int] | None = None,
    max_map_seconds: float | None = 600.0,
    overrides: dict | None = None,
) -> dict:
    """
    Time every method (default: all of :py:data:`~monai_wsss.apps.METHODS`) on one volume at the bundle's defaults.

    Args:
        image: a volume file (e.g. a 240 x 240 x 155 BraTS FLAIR).
        bundle_root: the bundle whose ``inference.json`` defines the pipeline.
        methods: method names (default: ``METHODS``, so a new method appears without a change here).
        threads: torch thread counts to time (default: the current ``torch.get_num_threads()``, then 1).
        max_map_seconds: methods whose map is estimated above this are not run (None: run all).
        overrides: config values replacing the bundle's (e.g. ``{"sw_batch_size": 32}``).

    Returns:
        ``{"image", "bundle_root", "overrides", "cpu_count", "load_average", "rows": [...], "skipped": {method: why}}``.
    """
    default_threads = torch.get_num_threads()
    threads = list(threads) if threads else sorted({default_threads, 1}, reverse=True)
    result: dict = {
        "image": str(image),
        "bundle_root": str(bundle_root),
        "overrides": dict(overrides or {}),
        "cpu_count": os.cpu_count(),
        "default_threads": default_threads,
        "load_average_before": list(os.getloadavg()),
        "rows": [],
        "skipped": {},
    }
    item = {"image": str(image)}
    try:
        for method in methods or METHODS:
            try:
                pipe = build_bundle_pipeline(bundle_root, method, overrides)
            except (FileNotFoundError, ValueError) as err:
                result["skipped"][method] = str(err).splitlines()[0]
                print(f"{method}: skipped ({result['skipped'][method]})", flush=True)
                continue
            for n in threads:
                torch.set_num_threads(n)
                row = {"method": method, "threads": n, **time_volume(pipe, item, max_map_seconds)}
                result["rows"].append(row)
                print(_row_line(row), flush=True)
    finally:
        torch.set_num_threads(default_threads)
    result["load_average_after"] = list(os.getloadavg())
    return result


def _row_line(row: dict) -> str:
    if not row["ran"]:
        return f"{row['method']} ({row['threads']} thr): not run, map estimated {row['estimated_map_seconds']:.0f} s"
    stages = ", ".join(f"{s} {row['seconds'][s]:.1f}" for s in STAGES)
    return f"{row['method']} ({row['threads']} thr): {row['total']:.1f} s ({stages})"


def volume_markdown(result: dict) -> str:
    """The volume benchmark as a markdown table (seconds per volume by stage)."""
    rows = result["rows"]
    n_body = rows[0]["slices_with_body"] if rows else "?"
    sw = rows[0]["sw_batch_size"] if rows else "?"
    lines = [
        f"One volume ({Path(result['image']).name}, {n_body} slices with body), "
        f"`{result['bundle_root']}` inference defaults (sw_batch_size {sw})"
        + (f", overrides {result['overrides']}" if result["overrides"] else "")
        + f"; {result['cpu_count']} CPUs, load average before {result['load_average_before'][0]:.1f}.",
        "",
        "| method | threads | load | map | post-process | write | other | total s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["ran"]:
            s = r["seconds"]
            lines.append(
                f"| {r['method']} | {r['threads']} | {s['load']:.1f} | {s['map']:.1f} | {s['post']:.1f} | "
                f"{s['write']:.1f} | {s['other']:.1f} | **{r['total']:.1f}** |"
            )
        else:
            lines.append(
                f"| {r['method']} | {r['threads']} | | ~{r['estimated_map_seconds']:.0f} (estimate, not run) | | | | |"
            )
    for method, why in result["skipped"].items():
        short = re.sub(r" \([^)]*\)", "", why).split(". ")[0]  # without asides; volume.json keeps the whole message
        lines.append(f"| {method} | | skipped: {short[:120]} | | | | | |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m monai_wsss.benchmark speed --mode volume", description=__doc__.split("\n\n")[1])
    p.add_argument("--image", required=True, help="a volume file, e.g. a BraTS <case>_flair.nii.gz")
    p.add_argument("--bundle_root", default="bundles/brats_cdm")
    p.add_argument("--methods", nargs="+", default=None, help=f"default: all of {METHODS}")
    p.add_argument("--threads", type=int, nargs="+", default=None, help="default: torch's default, then 1")
    p.add_argument("--max_map_seconds", type=float, default=600.0, help="don't run methods estimated slower (0: no limit)")
    p.add_argument("--sw_batch_size", type=int, default=None, help="override the bundle's sw_batch_size")
    p.add_argument("--precision", choices=PRECISIONS, default=None, help="override the bundle's network precision")
    p.add_argument("--out_dir", default="outputs/speed")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    reuse_freed_memory()  # the command's process-wide choice, as in the bundles' runs (docs/performance.md)
    overrides = {k: getattr(args, k) for k in ("sw_batch_size", "precision") if getattr(args, k) is not None}
    result = run_volume_benchmark(
        args.image, args.bundle_root, args.methods, args.threads, args.max_map_seconds or None, overrides
    )
    write_result(args.out_dir, "volume", result, volume_markdown(result))
    return result


if __name__ == "__main__":
    main()
