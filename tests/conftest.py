"""Shared fixtures: tiny networks whose zero-initialised output layers are perturbed so they give a real signal."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# torch, MONAI and the package are imported where they are used, not here: pytest-xdist's controller process loads
# this file too and runs no test, and importing MONAI there (~12 s on the CI's CPUs) delayed both workers' start.

# every training and inference step re-allocates the same activations: keep freed memory in the heap instead of
# page-faulting it in again (see reuse_freed_memory), in the bundle runs and notebook kernels the tests start (glibc
# reads these variables at start-up); pytest_configure does the same for the process that runs the tests
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 30))
os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(1 << 30))

# under pytest-xdist (`-n 2`, the README's command) every worker is one process per core: one torch thread each,
# and the same for the bundle runs and notebook kernels the tests start, so two workers never fight over two cores
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return  # the xdist controller: it runs no test
    import torch

    from monai_wsss.utils import reuse_freed_memory

    reuse_freed_memory()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


#: the longest tests, longest first (seconds on the 2-core AVX2 CPU, `--durations`): tutorial 01 ~130, tutorial 03
#: ~60, tutorial 02 ~60, the quick demo ~47, tutorial 04 ~31; the other slow tests take 5-15
LONGEST_FIRST = ("test_tutorial_01_", "test_tutorial_03_", "test_tutorial_02_", "test_quick_demo_", "test_tutorial_04_")


def _longest_first(item) -> int:
    return next((k for k, prefix in enumerate(LONGEST_FIRST) if item.name.startswith(prefix)), len(LONGEST_FIRST))


def pytest_collection_modifyitems(config, items):
    """
    Order for two parallel workers (``-n 2 --maxschedchunk 1``): the slow tests first, the longest of them
    (:py:data:`LONGEST_FIRST`) ahead of the others, each followed by one short test. xdist hands each worker two
    consecutive tests, then one at a time, so the two longest start at once on different workers and the short tests
    fill the gaps, instead of one worker finishing a long test alone at the end. Serial runs are unaffected in
    substance.
    """
    slow = sorted((i for i in items if i.get_closest_marker("slow")), key=_longest_first)
    fast = [i for i in items if not i.get_closest_marker("slow")]
    ordered = []
    for k, item in enumerate(slow):
        ordered += [item, *fast[k : k + 1]]
    items[:] = ordered + fast[len(slow) :]


REPO = Path(__file__).resolve().parents[1]
#: the two bundles of the repository, by task
BUNDLES = {"brats": REPO / "bundles" / "brats_cdm", "chaos": REPO / "bundles" / "chaos_kidney_cdm"}


def bundle_conditioning(task: str) -> str:
    """How a bundle's diffusion network takes its label (``train_diffusion.json``'s ``network_def``), so tiny test
    weights are built the way that bundle loads them."""
    import json

    network_def = json.loads((BUNDLES[task] / "configs" / "train_diffusion.json").read_text())["network_def"]
    return network_def.get("conditioning", "add")


TINY_UNET = dict(
    spatial_dims=2,
    in_channels=1,
    out_channels=1,
    num_classes=2,
    channels=(8, 16),
    attention_levels=(False, True),
    num_res_blocks=1,
    num_head_channels=8,
    norm_num_groups=4,
)


def perturb(module: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add small Gaussian noise to every parameter (an untrained MONAI U-Net outputs exactly 0)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return module.eval()


def tiny_unet(seed: int = 0, **overrides) -> ConditionalDiffusionUNet:
    import torch

    from monai_wsss.networks.nets import ConditionalDiffusionUNet

    torch.manual_seed(seed)
    return perturb(ConditionalDiffusionUNet(**{**TINY_UNET, **overrides}), seed=seed)


def tiny_classifier(seed: int = 1, input_shape=(16, 16)) -> NoisyClassifier:
    import torch

    from monai_wsss.networks.nets import NoisyClassifier

    torch.manual_seed(seed)
    clf = NoisyClassifier(
        spatial_dims=2,
        in_channels=1,
        num_classes=2,
        input_shape=input_shape,
        channels=(8, 16),
        attention_levels=(False, False),
        norm_num_groups=4,
    )
    return perturb(clf, seed=seed)


@pytest.fixture
def scheduler() -> DDIMScheduler:
    from monai.networks.schedulers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, schedule="linear_beta", clip_sample=False)


@pytest.fixture
def images() -> torch.Tensor:
    import torch

    return torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
