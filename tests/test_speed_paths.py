"""The speed benchmarks' plumbing (no timing asserted): the authors' side-by-side against a tiny fake checkout,
the paired timer and the argument errors."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from monai_wsss.benchmark import authors
from monai_wsss.benchmark.paired import cpu_info, paired_medians, ratio_table

# a stand-in with the interface the benchmark uses from the authors' guided_diffusion (see monai_wsss.benchmark.authors)
FAKE_UNET = '''
import torch
from torch import nn


class UNetModel(nn.Module):
    def __init__(self, image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 channel_mult=(1,), num_classes=None, num_head_channels=-1, use_scale_shift_norm=False):
        super().__init__()
        self.label_emb = nn.Embedding(num_classes, 4)
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.calls = 0

    def forward(self, x, timesteps, y=None):
        self.calls += 1
        return self.conv(x) + self.label_emb(y)[:, :1, None, None] + 1e-3 * timesteps.float()[:, None, None, None]
'''
FAKE_GD = '''
import enum
import numpy as np
import torch


class ModelMeanType(enum.Enum):
    EPSILON = 1


class ModelVarType(enum.Enum):
    LEARNED_RANGE = 1


class LossType(enum.Enum):
    MSE = 1


def get_named_beta_schedule(name, steps):
    scale = 1000 / steps
    return np.linspace(scale * 1e-4, scale * 0.02, steps)


class GaussianDiffusion:
    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type):
        self.ab = torch.as_tensor(np.cumprod(1 - betas), dtype=torch.float32)

    def q_sample(self, x, t, noise=None):
        a = self.ab[t].view(-1, 1, 1, 1)
        return a.sqrt() * x + (1 - a).sqrt() * noise

    def ddim_sample(self, model, x, t, model_kwargs=None):
        eps = model(x, t, **model_kwargs)[:, :1]
        a, a_prev = self.ab[t].view(-1, 1, 1, 1), self.ab[t - 1].view(-1, 1, 1, 1)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return {"sample": a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps}
'''


@pytest.fixture
def fake_authors(tmp_path):
    pkg = tmp_path / "checkout" / "guided_diffusion"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "unet.py").write_text(textwrap.dedent(FAKE_UNET))
    (pkg / "gaussian_diffusion.py").write_text(textwrap.dedent(FAKE_GD))
    return pkg.parent


def test_authors_benchmark_runs_both_codes_and_writes_results(fake_authors, tmp_path):
    unet, gd = authors.load_authors_code(fake_authors)
    model, model2, diffusion = authors.build_authors_cdm(unet, gd, size=16, timesteps=400, tau=0.95)
    # the second model's class-0 embedding is the interpolation, as the authors build it
    torch.testing.assert_close(model2.label_emb.weight[0], 0.95 * model.label_emb.weight[1] + 0.05 * model.label_emb.weight[0])
    x, noise = torch.rand(2, 1, 16, 16) * 2 - 1, torch.randn(2, 1, 16, 16)
    diff = authors.authors_cdm(model, model2, diffusion, x, noise, noise_level=40, num_steps=3)
    assert diff.shape == x.shape and diff.abs().max() > 0
    assert model.calls == 3 and model2.calls == 3  # two network calls per step, one per branch

    out = tmp_path / "out"
    result = authors.main(["--authors_repo", str(fake_authors), "--out_dir", str(out), "--batches", "1", "--repeats", "1",
                           "--size", "16", "--num_steps", "2", "--their_timesteps", "400", "--their_noise_level", "40",
                           "--threads", "0"])
    saved = json.loads((out / "authors.json").read_text())
    from monai_wsss.networks import native_bfloat16

    bf16 = {"ours_bfloat16"} if native_bfloat16("cpu") else set()  # timed only where the CPU has it
    assert saved["batches"]["1"]["seconds_per_slice"].keys() == {"authors", "ours", "ours_before"} | bf16
    assert result["settings"]["authors"]["noise_level"] == 40 and result["settings"]["ours"]["noise_level"] == 100
    # ours with the fast paths gives the map of ours without them, to float32 rounding
    b1 = saved["batches"]["1"]
    assert b1["map_max_abs"] > 0 and b1["map_max_abs_diff_ours_vs_before"] < 1e-4
    assert "authors / ours" in (out / "authors.md").read_text()
    # the bfloat16 contender on request (emulated where the CPU lacks it): a map near, not equal to, float32's
    with_bf16 = authors.run_authors_benchmark(fake_authors, (2,), 1, 16, 100, 1000, 40, 400, 2, 0.95, bfloat16=True)
    b2 = with_bf16["batches"]["2"]
    assert "ours_bfloat16" in b2["seconds_per_slice"] and b2["authors_over_ours_bfloat16"] > 0
    assert 0 < b2["map_max_abs_diff_bfloat16_vs_before"] < 0.5 * b2["map_max_abs"]
    assert "ours bfloat16" in authors.to_markdown(with_bf16)


def test_authors_benchmark_argument_errors(tmp_path, fake_authors):
    with pytest.raises(FileNotFoundError, match="--authors_repo .*guided_diffusion/unet.py"):
        authors.load_authors_code(tmp_path)
    with pytest.raises(SystemExit):
        authors.main([])  # --authors_repo is required
    with pytest.raises(SystemExit):
        authors.main(["--authors_repo", str(fake_authors), "--batches", "1,x"])
    with pytest.raises(ValueError, match="batches must be positive integers"):
        authors.run_authors_benchmark(fake_authors, batches=(0,))
    with pytest.raises(ValueError, match="size must be a positive multiple of 4"):
        authors.build_authors_cdm(*authors.load_authors_code(fake_authors), size=18)


def test_paired_medians_alternates_and_checks_arguments():
    order = []
    med = paired_medians({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, repeats=3, warmup=1)
    assert order == ["a", "b"] * 4 and set(med) == {"a", "b"} and all(v >= 0 for v in med.values())
    rows = ratio_table({"a": 2.0, "b": 1.0}, "a")
    assert rows[-1].endswith("| 2.00 |")
    for bad in ({"fns": {}}, {"repeats": 0}, {"warmup": -1}):
        kwargs = {"fns": {"a": lambda: None}, **bad}
        with pytest.raises(ValueError):
            paired_medians(**kwargs)
    with pytest.raises(ValueError, match="reference 'c'"):
        ratio_table({"a": 1.0}, "c")
    info = cpu_info()
    assert info["model"] and isinstance(info["flags"], list) and info["threads"] >= 1


def test_paths_benchmark_checks_results_and_arguments(tmp_path):
    from monai_wsss.benchmark import paths

    nets = paths.build_variants("classifier", size=16)
    assert set(nets) == set(paths.VARIANTS)
    ref = nets["before"].state_dict()
    for name, net in nets.items():  # same weights in every variant; only the layout / attention kernel differ
        assert all(torch.equal(v, ref[k]) for k, v in net.state_dict().items()), name
    assert any(not p.is_contiguous() for p in nets["after"].parameters())
    assert all(p.is_contiguous() for p in nets["before"].parameters())
    result = paths.run_paths_benchmark(parts=("guidance",), cdm_batches=(1,), repeats=1, size=16)
    part = result["parts"]["guidance_batch2"]
    assert set(part["speedup"]) == set(paths.VARIANTS) and max(part["grad_max_rel_diff"].values()) < paths.GRAD_TOLERANCE
    x, y = paths.synthetic_batch(4, 16, torch.Generator().manual_seed(0))
    assert x.shape == (4, 1, 16, 16) and x.min() >= -1 and x.max() <= 1 and set(y.tolist()) <= {0, 1}
    with pytest.raises(ValueError, match="parts must be among"):
        paths.run_paths_benchmark(parts=("cdm", "gpu"))
    with pytest.raises(ValueError, match="kind must be"):
        paths.build_variants("segmenter")
    for bad in (["--parts", "cdm,gpu"], ["--cdm_batches", "8,x"], ["--repeats", "0"], ["--iterations", "1"]):
        with pytest.raises(SystemExit):
            paths.main(["--out_dir", str(tmp_path)] + bad)
