"""Training side of the bundles: metadata, network I/O, every training config on synthetic data, resume, DDP."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import time
import weakref
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, run, verify_metadata

import monai_wsss.bundle.distributed
from monai_wsss.bundle import (
    ExponentialMovingAverage,
    SeededEvaluation,
    ema_copy,
    init_distributed,
    latest_checkpoint,
    prepare_splits,
    release_distributed,
    select_slices,
    verify_bundle_networks,
)
from conftest import BUNDLES, REPO
from forked_cli import run_ranks, start_module
from monai_wsss.data import make_synthetic_dataset

SCHEMA = REPO / "bundles" / "schema" / "meta_schema_monai_wsss.json"
TRAIN_CONFIGS = ("train_diffusion.json", "train_classifier.json")
REQUIRED_FILES = (
    "configs/metadata.json", "configs/inference.json", "configs/evaluate.json", "configs/train.json",
    "configs/train_diffusion.json", "configs/train_classifier.json", "configs/multi_gpu_train.json",
    "configs/multi_gpu_inference.json", "configs/logging.conf",
    "LICENSE", "docs/README.md", "docs/data_license.txt",
)
# a few iterations at 32 x 32 with a 2-step CDM validation on a handful of slices
FAST = {"max_epochs": 1, "epoch_length": 2, "batch_size": 4, "progress_bar": False, "spatial_size": [32, 32]}
FAST_VALIDATION = {
    "train_diffusion.json": {"val_interval": 1, "val_max_slices": 4, "validate#num_steps": 2, "validate#noise_level": 20},
    "train_classifier.json": {"val_batch_size": 16},
}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Synthetic cases in the BraTS layout and the same volumes in the CHAOS layout (seg label 2 = "kidney")."""
    root = tmp_path_factory.mktemp("synthetic")
    items = make_synthetic_dataset(root / "brats", num_cases=5, shape=(48, 48, 16), seed=0)
    chaos = root / "chaos"
    chaos.mkdir()
    for i, item in enumerate(items):
        shutil.copy(item["image"], chaos / f"image_{i + 1}.nii.gz")
        shutil.copy(item["seg"], chaos / f"label_{i + 1}.nii.gz")
    return {"brats": str(root / "brats"), "chaos": str(chaos)}


def run_config(bundle: str, config: str, dataset_dir: str, bundle_root: Path, **overrides) -> None:
    args = {**FAST, **FAST_VALIDATION[config], **overrides}
    run(config_file=str(BUNDLES[bundle] / "configs" / config), bundle_root=str(bundle_root), dataset_dir=dataset_dir, **args)


def config_of(bundle: str, config: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(BUNDLES[bundle] / "configs" / config))
    parser.read_meta(str(BUNDLES[bundle] / "configs" / "metadata.json"))
    parser.update(overrides)
    return parser


@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_bundle_layout_metadata_and_network_io(bundle, tmp_path):
    for name in REQUIRED_FILES:
        assert (BUNDLES[bundle] / name).is_file(), f"{bundle} lacks {name}"
    # the local schema file makes verify_metadata run offline (it downloads only when the file is missing)
    schema = tmp_path / "schema.json"
    shutil.copy(SCHEMA, schema)
    verify_metadata(meta_file=str(BUNDLES[bundle] / "configs" / "metadata.json"), filepath=str(schema))
    verify_bundle_networks(BUNDLES[bundle])
    meta = json.loads((BUNDLES[bundle] / "configs" / "metadata.json").read_text())
    assert meta["classifier_data_format"]["outputs"]["pred"]["num_channels"] == 2
    # the default network is the segmenter, as MONAI's tools (bundle load, MONAI Label) read it
    assert meta["network_data_format"]["outputs"]["pred"]["format"] == "segmentation"
    assert "optional_packages_version" not in meta and "monai_wsss" in meta["required_packages_version"]
    parsed = ConfigParser()
    parsed.read_meta(str(BUNDLES[bundle] / "configs" / "metadata.json"))
    assert "monai_wsss" in parsed["_meta_"]["required_packages_version"]  # MONAI keeps every required package


@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_default_network_exports_to_torchscript_that_reloads(bundle, tmp_path):
    """`python -m monai.bundle ckpt_export network_def` on the committed default weights, then reload and compare."""
    from monai.bundle import ckpt_export

    configs = BUNDLES[bundle] / "configs"
    out = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def", filepath=str(out), ckpt_file=str(BUNDLES[bundle] / "models" / "model.pt"),
        meta_file=str(configs / "metadata.json"), config_file=str(configs / "inference.json"),
        bundle_root=str(BUNDLES[bundle]), use_trace=False,
    )
    scripted = torch.jit.load(str(out))
    parser = ConfigParser()
    parser.read_config(str(configs / "inference.json"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(BUNDLES[bundle] / "models" / "model.pt", map_location="cpu", weights_only=True))
    x = torch.rand(1, 1, 96, 96) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net.eval()(x))


def test_metadata_missing_a_mandatory_key_fails(tmp_path):
    meta = json.loads((BUNDLES["brats"] / "configs" / "metadata.json").read_text())
    del meta["network_data_format"]["inputs"]["image"]["dtype"]
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    shutil.copy(SCHEMA, tmp_path / "schema.json")
    with pytest.raises(ValueError, match="dtype"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(tmp_path / "schema.json"))


@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_default_hyper_parameters(bundle):
    diffusion = config_of(bundle, "train_diffusion.json")
    net = diffusion.get_parsed_content("network_def")
    assert 1.0e6 < sum(p.numel() for p in net.parameters()) < 1.2e6
    assert diffusion["spatial_size"] == [64, 64] and diffusion["batch_size"] == 16
    assert diffusion["learning_rate"] == pytest.approx(2e-4)
    assert diffusion["scheduler"]["num_train_timesteps"] == 1000 and diffusion["scheduler"]["schedule"] == "linear_beta"
    assert diffusion["task"] == {"brats": "brats", "chaos": "chaos"}[bundle]
    # ignite deletes the oldest checkpoint before writing the next: keeping two means a kill mid-save still
    # leaves a complete checkpoint to resume from
    for config in TRAIN_CONFIGS:
        savers = config_of(bundle, config)["train"]["checkpoint_savers"]
        assert [s["n_saved"] for s in savers] == [2], config
    # AMP and torch.compile are CUDA-only switches: the same config stays valid on CPU with them on
    for config in TRAIN_CONFIGS:
        flags = config_of(bundle, config, use_amp=True, use_compile=True)
        cuda = torch.cuda.is_available()
        assert flags.get_parsed_content("amp") is cuda and flags.get_parsed_content("compile") is cuda


@pytest.mark.parametrize("config", TRAIN_CONFIGS)
def test_training_precision_wraps_the_trained_network_without_copying_it(config):
    from monai_wsss.networks import AutocastNetwork

    fast = config_of("brats", config, precision="bfloat16")
    wrapped, network = fast.get_parsed_content("train_network"), fast.get_parsed_content("network")
    assert isinstance(wrapped, AutocastNetwork) and wrapped.network is network
    # the optimiser, EMA and checkpoints hold the parameters the autocast forward trains
    optimised = {id(p) for group in fast.get_parsed_content("optimizer").param_groups for p in group["params"]}
    assert optimised == {id(p) for p in wrapped.parameters()}
    assert fast["train"]["trainer"]["network"] == "@train_network"
    plain = config_of("brats", config, precision="float32")
    assert plain.get_parsed_content("train_network") is plain.get_parsed_content("network")
    with pytest.raises(RuntimeError) as err:  # MONAI wraps the config's error
        config_of("brats", config, precision="half").get_parsed_content("train_network")
    assert "precision must be one of" in str(err.value.__cause__)


def _load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_train_diffusion_runs_validates_and_saves(bundle, datasets, tmp_path):
    # CHAOS also trains the null class of classifier-free guidance (label dropout); BraTS trains under bfloat16
    # autocast, whose checkpoints must be the same plain state dicts
    cfg = {"null_class": True, "label_dropout": 0.2} if bundle == "chaos" else {}
    precision = {"precision": "bfloat16"} if bundle == "brats" else {}
    run_config(bundle, "train_diffusion.json", datasets[bundle], tmp_path, use_ema=True, ema_decay=0.5, **cfg, **precision)
    models, out = tmp_path / "models", tmp_path / "outputs" / "train_diffusion"
    checkpoint = _load_state(out / "checkpoints" / "checkpoint_epoch=1.pt")
    assert checkpoint["trainer"]["iteration"] == 2 and checkpoint["trainer"]["epoch_length"] == 2
    assert {"network", "optimizer", "ema"} <= set(checkpoint)
    assert checkpoint["ema"]["num_updates"] == 2
    net = config_of(bundle, "train_diffusion.json", spatial_size=[32, 32], **cfg).get_parsed_content("network_def")
    assert net.class_embedding.num_embeddings == (3 if cfg else 2)
    for name in ("diffusion.pt", "diffusion_final.pt"):
        state = _load_state(models / name)
        net.load_state_dict(state)  # plain state_dict, strict
    # the saved model is the EMA average, not the raw weights
    ema_weight = checkpoint["ema"]["ema_network"]["conv_in.conv.weight"]
    assert torch.equal(_load_state(models / "diffusion_final.pt")["conv_in.conv.weight"], ema_weight)
    assert not torch.equal(checkpoint["network"]["conv_in.conv.weight"], ema_weight)
    assert list(out.glob("events.out.tfevents.*")), "no TensorBoard log"
    splits = json.loads((out / "datalist.json").read_text())
    cases = {k: {it["case"] for it in v} for k, v in splits.items()}
    assert cases["training"] and cases["validation"] and not cases["training"] & cases["validation"]


@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_train_classifier_runs_and_saves(bundle, datasets, tmp_path):
    run_config(bundle, "train_classifier.json", datasets[bundle], tmp_path, max_timestep=100)
    clf = config_of(bundle, "train_classifier.json", spatial_size=[32, 32]).get_parsed_content("network_def")
    for name in ("classifier.pt", "classifier_final.pt"):
        clf.load_state_dict(_load_state(tmp_path / "models" / name))
    checkpoint = _load_state(tmp_path / "outputs" / "train_classifier" / "checkpoints" / "checkpoint_epoch=1.pt")
    assert checkpoint["trainer"]["iteration"] == 2


def _cli(config: str, dataset_dir: str, bundle_root: Path, extra: dict) -> list[str]:
    """The arguments of ``python -m monai.bundle run ...`` for a brats training config."""
    args = {**FAST, **FAST_VALIDATION[config], **extra}
    cmd = ["run", "--config_file", str(BUNDLES["brats"] / "configs" / config)]
    cmd += ["--bundle_root", str(bundle_root), "--dataset_dir", dataset_dir]
    for key, value in args.items():
        cmd += [f"--{key}", json.dumps(value) if isinstance(value, list) else str(value)]
    return cmd


@pytest.mark.slow
def test_resume_after_a_killed_run_loses_no_epoch(datasets, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = _cli("train_diffusion.json", datasets["brats"], tmp_path, {"max_epochs": 1000, "val_interval": 1000})
    ckpt_dir = tmp_path / "outputs" / "train_diffusion" / "checkpoints"
    # python -m monai.bundle run ..., forked (tests/forked_cli.py); its output goes to files, not pipes
    proc = start_module("monai.bundle", cmd, env=env, output_dir=tmp_path / "killed_run")
    try:
        deadline = time.time() + 240
        newest = None
        # wait for the checkpoint of epoch 2 or later (the saver writes the new file before removing the old one)
        while newest is None or newest.endswith("epoch=1.pt"):
            assert proc.poll() is None, proc.output()[1][-2000:]
            assert time.time() < deadline, "no checkpoint of epoch 2 within 240 s"
            time.sleep(0.5)
            newest = latest_checkpoint(ckpt_dir)
    finally:
        proc.kill()  # SIGKILL
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    resume_from = latest_checkpoint(ckpt_dir)
    assert resume_from is not None, f"no readable checkpoint left by the killed run: {sorted(os.listdir(ckpt_dir))}"
    state = _load_state(resume_from)["trainer"]
    done = state["iteration"] // state["epoch_length"]  # ignite stores the iteration, the epoch follows
    assert done >= 2
    run_config("brats", "train_diffusion.json", datasets["brats"], tmp_path, max_epochs=done + 1, val_interval=1000)
    final = _load_state(latest_checkpoint(ckpt_dir))["trainer"]
    # continued from the saved epoch: one more epoch of 2 iterations, none repeated, none skipped
    assert final["iteration"] == (done + 1) * FAST["epoch_length"]


@pytest.mark.slow
def test_two_process_gloo_training(datasets, tmp_path):
    configs = json.dumps([str(BUNDLES["brats"] / "configs" / n) for n in ("train_diffusion.json", "multi_gpu_train.json")])
    cmd = _cli("train_diffusion.json", datasets["brats"], tmp_path, {"max_epochs": 2, "use_ema": True})
    cmd[cmd.index("--config_file") + 1] = configs
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # two ranks as torchrun starts them (tests/forked_cli.py)
    result = run_ranks("monai.bundle", cmd, nproc=2, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val_slice_auc" in result.stdout + result.stderr  # selection from the slice labels alone
    checkpoint = _load_state(tmp_path / "outputs" / "train_diffusion" / "checkpoints" / "checkpoint_epoch=2.pt")
    # each rank ran 2 iterations per epoch on its half of the data
    assert checkpoint["trainer"]["iteration"] == 4
    assert (tmp_path / "models" / "diffusion.pt").is_file()


def test_release_distributed_frees_a_ddp_wrapper_in_a_cycle_before_exit(monkeypatch):
    # a one-process gloo group stands in for torchrun's environment
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    registered = []
    monkeypatch.setattr(atexit, "register", registered.append)
    monkeypatch.setattr(monai_wsss.bundle.distributed, "_release_registered", False)
    try:
        assert init_distributed("gloo") == 0
        assert init_distributed("gloo") == 0  # already up: joins nothing new
        assert torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo"
        assert registered.count(release_distributed) == 1
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
        ddp(torch.ones(1, 2)).sum().backward()
        holder = {"network": ddp}
        holder["self"] = holder  # a reference cycle, as ignite engines and their handlers make
        alive = weakref.ref(ddp)
        del ddp, holder
        assert alive() is not None  # only the garbage collector frees it
        release_distributed()
        assert alive() is None
        assert not torch.distributed.is_initialized()
        release_distributed()  # a second call (the exit hook after the bundle's finalize) is harmless
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_tracking_mlflow_override(datasets, tmp_path):
    # mlflow (skinny) is in the dev extra: a missing install fails here instead of skipping the MLflow path
    run(
        config_file=str(BUNDLES["brats"] / "configs" / "train_classifier.json"), bundle_root=str(tmp_path),
        dataset_dir=datasets["brats"], tracking="mlflow", **FAST, **FAST_VALIDATION["train_classifier.json"],
    )
    store = tmp_path / "outputs" / "train_classifier" / "mlruns.db"
    assert store.is_file()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1
    # the training loss and both validation metrics reached MLflow, not only an empty run
    assert {"train_loss", "val_auc", "val_accuracy"} <= set(runs[0].data.metrics)


def test_prepare_splits_folder_json_and_errors(datasets, tmp_path):
    splits = prepare_splits(datasets["brats"], "brats", seed=0, datalist_file=tmp_path / "d.json")
    assert sum(len(v) for v in splits.values()) == 5
    again = prepare_splits(tmp_path / "d.json", "brats")
    assert [i["case"] for i in again["validation"]] == [i["case"] for i in splits["validation"]]
    assert len(prepare_splits(datasets["chaos"], "chaos")["training"]) == 3
    with pytest.raises(ValueError, match="unknown task"):
        prepare_splits(datasets["brats"], "liver")
    with pytest.raises(FileNotFoundError, match="dataset_dir"):
        prepare_splits(tmp_path / "missing", "brats")


def test_select_slices_is_a_fixed_subset():
    data = [{"label": i % 3 == 0, "i": i} for i in range(30)]
    chosen = select_slices(data, label=1, max_slices=4, seed=1)
    ids = [d["i"] for d in chosen]
    assert len(ids) == 4 and all(i % 3 == 0 for i in ids) and ids == sorted(ids)
    assert ids == [d["i"] for d in select_slices(data, label=1, max_slices=4, seed=1)]
    with pytest.raises(ValueError, match="no slice"):
        select_slices(data[:2], label=7)
    # balanced: both labels, half each (the slice-level AUROC of labels-only selection needs both)
    both = [int(d["label"]) for d in select_slices(data, max_slices=6, seed=2, balanced=True)]
    assert sorted(both) == [0, 0, 0, 1, 1, 1]
    few = [int(d["label"]) for d in select_slices(data, max_slices=26, balanced=True)]
    assert few.count(1) == 10 and few.count(0) == 13  # all 10 positives, 13 of the 20 negatives


def test_latest_checkpoint_skips_a_truncated_file(tmp_path):
    assert latest_checkpoint(tmp_path / "none") is None
    torch.save({"trainer": {"iteration": 3}}, tmp_path / "checkpoint_epoch=3.pt")
    (tmp_path / "checkpoint_epoch=4.pt").write_bytes(b"PK\x03\x04 truncated")  # a run killed while saving
    (tmp_path / "other_epoch=9.pt").write_bytes(b"")
    with pytest.warns(UserWarning, match="epoch=4"):
        assert latest_checkpoint(tmp_path).endswith("checkpoint_epoch=3.pt")


def test_ema_average_and_state():
    net = torch.nn.Linear(2, 1)
    ema_net = ema_copy(net)
    assert not any(p.requires_grad for p in ema_net.parameters())
    ema = ExponentialMovingAverage(net, ema_net, decay=0.5)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update()  # first update: d = min(0.5, 1 / 10) = 0.1
    torch.testing.assert_close(ema_net.weight, 0.1 * start + 0.9 * net.weight.detach())
    restored = ExponentialMovingAverage(net, ema_copy(torch.nn.Linear(2, 1)), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 1 and torch.equal(restored.ema_network.weight, ema_net.weight)
    with pytest.raises(ValueError, match="decay"):
        ExponentialMovingAverage(net, ema_net, decay=1.0)
    with pytest.raises(ValueError, match="same parameters"):
        ExponentialMovingAverage(net, torch.nn.Linear(3, 1))


def test_seeded_evaluation_repeats_noise_and_restores_the_stream():
    seeded = SeededEvaluation(seed=5)
    torch.manual_seed(0)
    seeded.seed_rng()
    first = torch.rand(3)
    seeded.restore_rng()
    after_first = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), after_first)  # the training stream continues as if nothing ran
    seeded.seed_rng()
    assert torch.equal(torch.rand(3), first)  # every evaluation round draws the same noise
    seeded.restore_rng()


def test_both_bundles_train_the_default_network_with_one_augmentation_recipe():
    """The segmenter's augmentation (flips, affine, random gamma and intensity scaling) is one recipe: a change to
    one bundle's train.json that the other does not get is a task fact, and belongs in the task registry."""
    from monai.bundle import ConfigParser

    recipes = []
    for bundle in sorted(BUNDLES):
        parser = ConfigParser()
        parser.read_config(str(BUNDLES[bundle] / "configs" / "train.json"))
        recipes.append(parser.get("train#preprocessing"))
        # and one weight average (--use_ema), tested on the BraTS bundle
        recipes.append([parser.get(k) for k in ("ema", "ema_network", "val_network", "checkpoint_dict", "ema_decay")])
    assert recipes[0] == recipes[2] and recipes[1] == recipes[3]
    targets = [t["_target_"] for t in recipes[0]["transforms"]]
    assert {"RandAdjustContrastd", "RandScaleIntensityd"} <= set(targets)


@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_the_papers_gpu_recipe_composes_with_training_and_inference(bundle, datasets, tmp_path):
    """train_diffusion_paper_gpu.json / cdm_paper_gpu.json: the paper's network, schedule and setting,
    stacked on this bundle's configs; one training step runs on CPU at 1/16 of the width and 64 x 64."""
    from monai.networks.schedulers import DDPMScheduler

    configs = BUNDLES[bundle] / "configs"
    train = ConfigParser()
    train.read_config([str(configs / "train_diffusion.json"), str(configs / "train_diffusion_paper_gpu.json")])
    infer = ConfigParser()
    infer.read_config([str(configs / f) for f in ("inference.json", "inference_cdm.json", "cdm_paper_gpu.json")])
    # one network in both: guided-diffusion's 128 channels x (1, 1, 2, 2, 4, 4), 3 residual blocks, attention at the
    # two coarsest levels, 4 heads
    for parser, key in ((train, "network_def"), (infer, "diffusion_def")):
        net = {k: parser.get(f"{key}#{k}") for k in ("channels", "attention_levels", "num_res_blocks", "num_head_channels")}
        assert net == {"channels": [128, 128, 256, 256, 512, 512], "attention_levels": [False] * 4 + [True] * 2,
                       "num_res_blocks": 3, "num_head_channels": [c // 4 for c in net["channels"]]}
        assert parser.get("spatial_size") == [256, 256]
    # 4000 steps whose betas are the 1000-step schedule's divided by 4: Q = 400 of 4000 noises as Q = 100 of 1000
    paper = train.get_parsed_content("scheduler")
    assert paper.num_train_timesteps == 4000 and infer.get_parsed_content("scheduler").num_train_timesteps == 4000
    ours = DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta", beta_start=1e-4, beta_end=0.02)
    assert float(paper.alphas_cumprod[400]) == pytest.approx(float(ours.alphas_cumprod[100]), abs=2e-3)
    assert [infer.get_parsed_content(k) for k in ("noise_level", "num_steps", "tau")] == [400, 10, 0.95]
    # one step of the recipe on CPU, narrower and smaller (its EMA included)
    run(config_file=[str(configs / "train_diffusion.json"), str(configs / "train_diffusion_paper_gpu.json")],
        bundle_root=str(tmp_path), dataset_dir=datasets[bundle], max_epochs=1, epoch_length=1, val_interval=2,
        progress_bar=False, spatial_size=[64, 64], **{"network_def#channels": [8, 8, 16, 16, 32, 32],
        "network_def#num_head_channels": [2, 2, 4, 4, 8, 8], "network_def#norm_num_groups": 4,
        **({"null_class": True} if bundle == "chaos" else {})})
    checkpoint = _load_state(tmp_path / "outputs" / "train_diffusion" / "checkpoints" / "checkpoint_epoch=1.pt")
    assert checkpoint["trainer"]["iteration"] == 1 and checkpoint["ema"]["num_updates"] == 1
