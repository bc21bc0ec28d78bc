# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""
Typed reading of bundle options: one parser the configs call for every yes/no and number, and a check that every
key given on the command line is one the config knows.

``python -m monai.bundle run`` hands command-line values over as Python literals when they are ones (``False``,
``3``, ``0.5``) and as text otherwise (``false``, ``true``, ``yes``), so a config that uses ``@largest_component``
as it is turns ``--largest_component false`` on (a non-empty string is truthy). Every option a user types therefore
goes through :py:func:`parse_option` where the config uses it.
"""

from __future__ import annotations

import difflib
import math
import numbers
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["OPTION_KINDS", "RUN_ARGUMENTS", "parse_option", "parse_write_map", "check_command_line"]

#: the value kinds :py:func:`parse_option` reads
OPTION_KINDS = ("bool", "int", "float", "str")

#: arguments of ``monai.bundle run`` itself (not config keys)
RUN_ARGUMENTS = (
    "run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file",
    "workflow_type", "workflow_name", "properties_path",
)

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and int(value) in (0, 1):
        return bool(value)
    if hasattr(value, "dtype") and getattr(value, "shape", None) == () and str(value.dtype) == "bool":
        return bool(value)  # a NumPy / torch scalar boolean
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"option '{name}' must be true or false (also 1 / 0), got {value!r}.")


def _number(name: str, value: Any, kind: str) -> int | float:
    text = value.strip() if isinstance(value, str) else None
    number: float | int
    if isinstance(value, bool) or (text is not None and text.lower() in _TRUE + _FALSE and text not in ("0", "1")):
        raise ValueError(f"option '{name}' must be a{'n integer' if kind == 'int' else ' number'}, got {value!r}.")
    try:
        number = float(text) if text is not None else float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"option '{name}' must be a{'n integer' if kind == 'int' else ' number'}, got {value!r}."
        ) from None
    if not math.isfinite(number):
        raise ValueError(f"option '{name}' must be a finite number, got {value!r}.")
    if kind == "int":
        if number != int(number):
            raise ValueError(f"option '{name}' must be an integer, got {value!r}.")
        return int(number)
    return number


def parse_option(
    name: str,
    value: Any,
    kind: str,
    low: float | None = None,
    high: float | None = None,
    choices: Iterable[str] = (),
    allow_none: bool = False,
) -> Any:
    """
    Read one option value as the type the code needs, or fail with an error naming the option.

    - ``"bool"``: ``True``/``False``, ``1``/``0`` and the texts ``true``/``false``, ``1``/``0``, ``yes``/``no``,
      ``on``/``off`` (any case); anything else is an error (``"maybe"``, ``2``, ``""``).
    - ``"int"`` / ``"float"``: numbers or numeric text, finite (NaN and infinity are refused), integral for
      ``"int"``, within ``[low, high]`` when given.
    - ``"str"``: text, one of ``choices`` when given.

    With ``choices`` a value among them is returned as it is whatever ``kind`` is: ``threshold`` is a float or
    one of ``("otsu", "average_otsu")``.

    Args:
        name: option name, for the error message.
        value: the value from the config or the command line.
        kind: one of :py:data:`OPTION_KINDS`.
        low: smallest allowed number (inclusive).
        high: largest allowed number (inclusive).
        choices: allowed words.
        allow_none: ``None`` (``null`` in JSON, ``none`` / ``null`` typed on the command line) is returned as None.

    Returns:
        the typed value.

    Raises:
        ValueError: the value cannot be read as ``kind``, is out of range or not among ``choices``; an unknown
            ``kind``.

    Example::

        >>> parse_option("largest_component", "false", "bool")
        False
        >>> parse_option("threshold", "0.4", "float", low=0, high=1, choices=("otsu", "average_otsu"))
        0.4
        >>> parse_option("threshold", "otsu", "float", low=0, high=1, choices=("otsu", "average_otsu"))
        'otsu'

    In a bundle config::

        "largest_component": "$monai_wsss.bundle.parse_option('largest_component', @largest_component, 'bool')"
    """
    if kind not in OPTION_KINDS:
        raise ValueError(f"parse_option: unknown kind {kind!r} for option '{name}', expected one of {OPTION_KINDS}.")
    choices = tuple(choices)
    if value is None or (allow_none and isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if allow_none:
            return None
        raise ValueError(f"option '{name}' needs a value, got None.")
    if choices and isinstance(value, str) and value.strip() in choices:
        return value.strip()
    alternatives = f" or one of {choices}" if choices else ""
    if kind == "bool":
        return _bool(name, value)
    if kind == "str":
        if not isinstance(value, str):
            raise ValueError(f"option '{name}' must be text{alternatives}, got {value!r}.")
        if choices:
            close = difflib.get_close_matches(value, choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"option '{name}' must be one of {choices}, got {value!r}{hint}.")
        return value
    try:
        number = _number(name, value, kind)
    except ValueError as err:
        if choices:
            raise ValueError(f"{str(err)[:-1]}{alternatives}.") from None
        raise
    if (low is not None and number < low) or (high is not None and number > high):
        bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ValueError(f"option '{name}' must be in {bounds}{alternatives}, got {value!r}.")
    return number


def config_files_from_argv(argv: Sequence[str]) -> list[Path]:
    """Every ``--config_file`` path of a ``monai.bundle run`` command line (a list is passed as ``"['a','b']"``)."""
    files: list[Path] = []
    for i, arg in enumerate(argv):
        value = None
        if arg == "--config_file" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config_file="):
            value = arg.split("=", 1)[1]
        if value:
            files += [Path(v.strip().strip("'\"")) for v in value.strip().strip("[]").split(",") if v.strip()]
    return files


def _keys_of(files: Sequence[Path]) -> set[str]:
    from monai.bundle import ConfigParser  # MONAI's own reader: JSON and YAML, as `monai.bundle run` reads them

    keys: set[str] = set()
    for file in files:
        content = ConfigParser.load_config_file(str(file))
        if isinstance(content, dict):
            keys |= set(content)
    return keys


def parse_write_map(value: Any, method: str, needs_maps: bool = False) -> bool:
    """
    The bundles' ``write_map`` option: write the float map of every scan beside its mask (``true``, the default) or
    masks only. A method that thresholds all its maps together at the end of the run (the CDM paper's average Otsu:
    the diffusion methods and ``threshold``) reads them from the written files, so it refuses ``false``.

    Args:
        value: the option's value.
        method: the method, for the message.
        needs_maps: the method reads its written maps back.

    Returns:
        whether to write the maps.

    Raises:
        ValueError: not a bool, or ``false`` for a method that needs its maps.

    Example::

        "writing_map": "$monai_wsss.bundle.parse_write_map(@write_map, @method)"
    """
    writing = parse_option("write_map", value, "bool")
    if not writing and needs_maps:
        raise ValueError(
            f"--write_map false: method {method!r} thresholds its maps together at the end of the run, from the "
            "written map files; keep --write_map true (the default) for it."
        )
    return writing


def parse_context_slices(value: Any, method: str) -> int:
    """
    The bundles' ``context_slices`` option: the neighbours on either side of each slice that the segmenter takes as
    extra channels (2.5D input; its weights must have been trained with the same value). The other methods take
    single slices, so they refuse a non-zero value instead of ignoring it.

    Args:
        value: the option's value.
        method: the method.

    Returns:
        the number of neighbours on either side (0 for the methods other than the segmenter).

    Raises:
        ValueError: not an int >= 0, or non-zero for a method other than the segmenter.

    Example::

        "network_context_slices": "$monai_wsss.bundle.parse_context_slices(@context_slices, @method)"
    """
    from monai_wsss.apps.methods import SEGMENTER_METHODS

    context = parse_option("context_slices", value, "int", low=0)
    if context and method not in SEGMENTER_METHODS:
        raise ValueError(
            f"--context_slices {context}: method {method!r} segments single slices; neighbouring slices as channels "
            f"are an input of the segmenter ({', '.join(SEGMENTER_METHODS)}) trained with the same --context_slices."
        )
    return context


def check_command_line(
    argv: Sequence[str] | None = None, known: Iterable[str] | None = None, extra: Iterable[str] = ()
) -> list[str]:
    """
    Refuse command-line keys the config does not know, naming the closest known key: ``monai.bundle run`` adds
    any ``--key value`` to the config, so a typo (``--noise_levle 50``) would otherwise run with the default.

    A key is known when it is a top-level key of one of the ``--config_file`` files (``--network_def#channels``
    is checked as ``network_def``), an argument of ``monai.bundle run`` itself (:py:data:`RUN_ARGUMENTS`), or in
    ``extra``. Without ``--config_file`` on the command line (the config run from Python, e.g. through
    ``ConfigWorkflow``), there is nothing to check.

    Args:
        argv: the command line (default ``sys.argv``).
        known: the known keys (default: read from the ``--config_file`` files).
        extra: further accepted keys.

    Returns:
        the checked keys.

    Raises:
        ValueError: an unknown key, with the closest known key.

    Example::

        "initialize": ["$monai_wsss.bundle.check_command_line()", "$monai.utils.set_determinism(seed=@seed)"]
    """
    argv = list(sys.argv if argv is None else argv)
    files = config_files_from_argv(argv)
    if known is None:
        if not files:
            return []
        known_keys = _keys_of(files)
    else:
        known_keys = set(known)
    known_keys |= set(RUN_ARGUMENTS) | set(extra)
    given: list[str] = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            given.append(arg[2:].split("=", 1)[0])
    for key in given:
        base = key.split("#", 1)[0].replace("-", "_") if not key.startswith("#") else key
        if base in known_keys:
            continue
        close = difflib.get_close_matches(base, sorted(known_keys), n=1, cutoff=0.6)
        hint = f"; did you mean --{close[0]}?" if close else ""
        source = ", ".join(str(f) for f in files) or "the config"
        raise ValueError(f"unknown option --{key}: {source} has no key {base!r}{hint}")
    return given
