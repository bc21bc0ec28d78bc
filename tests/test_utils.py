# Copyright (c) monai_wsss contributors. Licensed under the Apache License, Version 2.0.
"""monai_wsss.utils: process-wide memory settings (chosen by applications, never by an inferer)."""

from __future__ import annotations

import platform
import sys

import pytest
import torch

from monai_wsss.inferers import VolumeInferer
from monai_wsss.utils import reuse_freed_memory


def test_reuse_freed_memory_sets_the_heap_thresholds_where_glibc_is_there():
    ok = reuse_freed_memory()
    assert isinstance(ok, bool)
    if sys.platform.startswith("linux") and "glibc" in " ".join(platform.libc_ver()):
        assert ok


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "1G"])
def test_reuse_freed_memory_names_a_bad_size(bad):
    with pytest.raises(ValueError, match="max_bytes must be a positive int"):
        reuse_freed_memory(bad)


def test_volume_inferer_leaves_the_process_memory_settings_to_its_caller(monkeypatch):
    import monai_wsss.utils.memory as memory

    calls = []
    monkeypatch.setattr(memory, "reuse_freed_memory", lambda *a, **k: calls.append(a))
    with pytest.raises(TypeError):
        VolumeInferer(roi_size=(8, 8), reuse_memory=True)  # the switch is gone: it is not the inferer's choice
    out = VolumeInferer(roi_size=(8, 8))(torch.rand(1, 1, 8, 8, 2), lambda x: x)
    assert out.shape == (1, 1, 8, 8, 2) and calls == []
