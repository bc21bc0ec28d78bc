# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""
Errors a user can act on, told in one line: the bad input's own message (naming the file, option or value) found
under the wrappers MONAI puts around it (``RuntimeError("applying transform ...")``, ``RuntimeError("Failed to
evaluate ConfigExpression ...")``), and a process hook that prints only that line on the command line.
"""

from __future__ import annotations

import os
import sys
import traceback
from types import TracebackType

__all__ = ["TRACEBACK_ENV", "USER_ERRORS", "describe_error", "install_one_line_errors", "root_error"]

#: set to 1 to get the full traceback of a user error on the command line
TRACEBACK_ENV = "MONAI_WSSS_TRACEBACK"

#: errors of bad input (a file, an option, a value): their message is the whole story. Everything else (a
#: ``TypeError``, ``KeyError`` ...) may be a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, PermissionError,
                                                IsADirectoryError, NotADirectoryError)


def root_error(err: BaseException) -> BaseException:
    """
    The error under MONAI's wrappers: follows ``__cause__`` (``raise ... from err``, as MONAI wraps) down from a
    ``RuntimeError`` while there is one, and returns the innermost error.

    Example::

        >>> try:
        ...     try:
        ...         raise ValueError("key 'image': scan.nii.gz has shape (4, 4), expected a 3D volume.")
        ...     except ValueError as e:
        ...         raise RuntimeError("applying transform <ValidateVolumed>") from e
        ... except RuntimeError as wrapped:
        ...     root_error(wrapped)
        ValueError("key 'image': scan.nii.gz has shape (4, 4), expected a 3D volume.")
    """
    seen = {id(err)}
    while isinstance(err, RuntimeError) and not isinstance(err, USER_ERRORS):
        inner = err.__cause__
        if inner is None or id(inner) in seen:
            break
        seen.add(id(inner))
        err = inner
    return err


def describe_error(err: BaseException) -> str:
    """
    One line for an error: the type and first line of the message of its :py:func:`root_error`.

    Example::

        >>> describe_error(RuntimeError("applying transform x").with_traceback(None))
        'RuntimeError: applying transform x'
    """
    root = root_error(err)
    text = str(root).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(root).__name__}: {first}" if first else type(root).__name__


def _one_line_hook(
    previous, exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    root = root_error(exc)
    if not isinstance(root, USER_ERRORS) or os.environ.get(TRACEBACK_ENV, "0") not in ("", "0"):
        previous(exc_type, exc, tb)
        return
    where = traceback.extract_tb(root.__traceback__)[-1:] if root.__traceback__ is not None else []
    sys.stderr.write(f"error: {describe_error(exc)}\n")
    hint = f" (raised in {os.path.basename(where[0].filename)}:{where[0].lineno})" if where else ""
    sys.stderr.write(f"  set {TRACEBACK_ENV}=1 for the full traceback{hint}\n")


def install_one_line_errors() -> None:
    """
    Make a user error that ends the process print as two lines (``error: <type>: <message>`` and how to get the
    traceback) instead of a 50-line traceback through MONAI's config parser. Other errors, and every error with
    ``MONAI_WSSS_TRACEBACK=1`` in the environment, print their traceback as usual. The bundles call it from
    ``initialize`` (through :py:func:`~monai_wsss.bundle.check_command_line`); it changes ``sys.excepthook`` only.

    Example::

        "initialize": ["$monai_wsss.utils.install_one_line_errors()"]
    """
    previous = sys.excepthook
    if getattr(previous, "_monai_wsss", False):
        return

    def hook(exc_type, exc, tb):
        _one_line_hook(previous, exc_type, exc, tb)

    hook._monai_wsss = True  # type: ignore[attr-defined]
    sys.excepthook = hook
