# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""Utilities that are neither transforms nor networks: crash-safe file writing, one-line user errors and process-wide memory settings."""

from monai_wsss.utils.atomic_files import TEMP_PREFIX, atomic_write, remove_stale_temporaries, write_text_atomic
from monai_wsss.utils.errors import describe_error, install_one_line_errors, root_error
from monai_wsss.utils.memory import reuse_freed_memory

__all__ = [
    "TEMP_PREFIX",
    "atomic_write",
    "describe_error",
    "install_one_line_errors",
    "remove_stale_temporaries",
    "reuse_freed_memory",
    "root_error",
    "write_text_atomic",
]
