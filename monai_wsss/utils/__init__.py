# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""Utilities that are neither transforms nor networks: crash-safe file writing and process-wide memory settings."""

from monai_wsss.utils.atomic_files import TEMP_PREFIX, atomic_write, remove_stale_temporaries, write_text_atomic
from monai_wsss.utils.memory import reuse_freed_memory

__all__ = ["TEMP_PREFIX", "atomic_write", "remove_stale_temporaries", "reuse_freed_memory", "write_text_atomic"]
