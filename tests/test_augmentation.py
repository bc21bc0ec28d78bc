"""The bright-distractor augmentation: where it paints (body only, never on or next to the target), what it leaves
alone (the label, the background), errors, and the behaviour it is for: a segmenter trained with it leaves a bright
non-target structure alone where the same segmenter trained without it marks the structure."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.utils import set_determinism

from monai_wsss.transforms import RandBrightDistractor, RandBrightDistractord
from conftest import BUNDLES

SIZE = 32
ROWS, COLS = torch.meshgrid(torch.arange(SIZE).float(), torch.arange(SIZE).float(), indexing="ij")


def ellipse(cy: float, cx: float, rx: float, ry: float | None = None) -> torch.Tensor:
    ry = rx if ry is None else ry
    return ((ROWS - cy) / ry) ** 2 + ((COLS - cx) / rx) ** 2 <= 1


BODY = ellipse(16, 16, 14)


def slice_with_target(target: torch.Tensor, body_value: float = 0.0, target_value: float = 0.7) -> torch.Tensor:
    img = torch.full((1, SIZE, SIZE), -1.0)
    img[0][BODY] = body_value
    img[0][target] = target_value
    return img


def test_distractors_are_saturated_body_pixels_away_from_the_target_and_the_rest_is_dimmed():
    target = ellipse(12, 12, 4)
    img = slice_with_target(target, body_value=0.2)
    transform = RandBrightDistractor(prob=1.0, num_distractors=(3, 3), dimming=(1.5, 1.5), texture=0.0, margin=2)
    for seed in range(10):
        out = transform.set_random_state(seed)(img, target=target[None])
        painted = out[0] == 1.0
        assert painted.any() and torch.equal(painted, transform.region)
        assert not (painted & ~BODY).any(), "a distractor left the body"
        near_target = torch.nn.functional.max_pool2d(target[None, None].float(), 5, 1, 2)[0, 0] > 0
        assert not (painted & near_target).any(), "a distractor touched the target or its margin"
        # the rest of the body is dimmed towards the background by 1 / 1.5; the background is unchanged
        assert torch.allclose(out[0][target], torch.tensor(-1 + 1.7 / 1.5))
        assert torch.allclose(out[0][BODY & ~target & ~painted], torch.tensor(-1 + 1.2 / 1.5))
        assert torch.equal(out[0][~BODY], img[0][~BODY])


def test_probability_zero_is_the_identity_and_a_seed_repeats_the_draw():
    img = slice_with_target(ellipse(12, 12, 4))
    assert RandBrightDistractor(prob=0.0)(img) is img
    a = RandBrightDistractor(prob=1.0).set_random_state(3)(img)
    b = RandBrightDistractor(prob=1.0).set_random_state(3)(img)
    c = RandBrightDistractor(prob=1.0).set_random_state(4)(img)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dictionary_form_paints_every_image_key_alike_and_leaves_the_mask():
    target = ellipse(12, 12, 4)[None].float()
    img = slice_with_target(target[0] > 0).repeat(3, 1, 1)  # 2.5D: three channels
    data = {"image": img, "copy": img.clone(), "pseudo": target.clone()}
    out = RandBrightDistractord(["image", "copy"], target_key="pseudo", prob=1.0).set_random_state(1)(data)
    assert torch.equal(out["image"], out["copy"])
    assert torch.equal(out["image"][0], out["image"][2]), "channels of one slice got different distractors"
    assert not torch.equal(out["image"], img)
    assert torch.equal(out["pseudo"], target)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"radius_fraction": (0.3, 0.1)}, "radius_fraction"),
        ({"radius_fraction": 0.0}, "radius_fraction"),
        ({"num_distractors": (0, 2)}, "num_distractors"),
        ({"num_distractors": (1.5, 2)}, "num_distractors"),
        ({"dimming": 0.5}, "dimming"),
        ({"texture": -0.1}, "texture"),
        ({"margin": -1}, "margin"),
        ({"value_range": (1.0, -1.0)}, "value_range"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, word):
    with pytest.raises(ValueError, match=word):
        RandBrightDistractor(**kwargs)


def test_bad_inputs_are_refused():
    transform = RandBrightDistractor(prob=1.0)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        transform(torch.zeros(SIZE, SIZE))
    with pytest.raises(ValueError, match="target mask"):
        transform(torch.zeros(1, SIZE, SIZE), target=torch.zeros(1, 8, 8))
    with pytest.raises(KeyError, match="pseudo"):
        RandBrightDistractord("image", target_key="pseudo", prob=1.0)({"image": torch.zeros(1, SIZE, SIZE)})


@pytest.mark.parametrize("bundle", sorted(BUNDLES))
def test_train_config_has_the_augmentation_off_by_default_and_refuses_a_bad_probability(bundle):
    parser = ConfigParser()
    parser.read_config(str(BUNDLES[bundle] / "configs" / "train.json"))
    transforms = parser.get_parsed_content("train#preprocessing").transforms
    (distractor,) = [t for t in transforms if isinstance(t, RandBrightDistractord)]
    assert distractor.target_key == "pseudo"
    assert distractor.prob == json.loads((BUNDLES[bundle] / "configs" / "train.json").read_text())[
        "bright_distractor_prob"
    ]
    parser["bright_distractor_prob"] = 1.5
    with pytest.raises(RuntimeError) as err:  # MONAI wraps the option's ValueError
        parser.get_parsed_content("train#preprocessing", lazy=False)
    assert "option 'bright_distractor_prob' must be in [0, 1], got 1.5" in str(err.value.__cause__)


def _train_segmenter(augment: bool, seed: int = 0, iterations: int = 150) -> torch.nn.Module:
    """A tiny U-Net on slices where the target is the brightest tissue (a small disc on 60 % of them)."""
    set_determinism(seed)
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for _ in range(64):
        img = torch.full((1, SIZE, SIZE), -1.0)
        img[0][BODY] = 0.1 * torch.randn(int(BODY.sum()))
        mask = torch.zeros(1, SIZE, SIZE)
        if rng.random() < 0.6:
            cy, cx = rng.uniform(9, 23, 2)
            disc = ellipse(cy, cx, rng.uniform(2.5, 4)) & BODY
            img[0][disc] = 0.7 + 0.05 * torch.randn(int(disc.sum()))
            mask[0][disc] = 1
        images.append(img)
        masks.append(mask)
    net = UNet(2, 1, 2, (8, 16, 32), (2, 2), num_res_units=1)
    optimizer = torch.optim.Adam(net.parameters(), 3e-3)
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    augmentation = RandBrightDistractord("image", "pseudo", prob=0.5, radius_fraction=(0.1, 0.25))
    augmentation.set_random_state(seed)
    for _ in range(iterations):
        batch = [{"image": images[i], "pseudo": masks[i]} for i in rng.integers(0, 64, 16)]
        if augment:
            batch = [augmentation(item) for item in batch]
        optimizer.zero_grad()
        value = loss(net(torch.stack([b["image"] for b in batch])), torch.stack([b["pseudo"] for b in batch]))
        value.backward()
        optimizer.step()
    set_determinism(None)
    return net.eval()


def test_a_segmenter_trained_with_distractors_leaves_a_bright_structure_alone_that_one_trained_without_marks():
    target = ellipse(10, 11, 3)
    structure = ellipse(20, 20, 4, 6) & BODY  # brighter than the target, not the target, drawn by hand
    img = slice_with_target(target)
    img[0][structure] = 1.0
    marked = {}
    for augment in (False, True):
        segmenter = _train_segmenter(augment)
        with torch.no_grad():
            mask = segmenter(img[None]).softmax(1)[0, 1] > 0.5
        marked[augment] = float(mask[structure].float().mean())
        dice = float(2 * (mask & target).sum() / (mask.sum() + target.sum()))
        if augment:
            assert dice > 0.6, f"the augmented segmenter lost the target (Dice {dice:.3f})"
    assert marked[False] > 0.5, f"without the augmentation only {marked[False]:.2f} of the structure was marked"
    assert marked[True] < 0.25, f"with the augmentation {marked[True]:.2f} of the structure was still marked"


def test_stress_script_scores_segmenters_on_painted_validation_slices_without_pixel_masks(tmp_path, capsys):
    import shutil
    import sys

    from monai_wsss.data import make_synthetic_dataset
    from monai_wsss.data.labels import main as labels_main
    from conftest import REPO, perturb

    sys.path.insert(0, str(REPO / "scripts"))
    from distractor_stress import main as stress_main

    items = make_synthetic_dataset(tmp_path / "brats", num_cases=2, shape=(40, 40, 12), seed=3)
    labels = tmp_path / "labels.csv"
    labels_args = ["--dataset_dir", str(tmp_path / "brats"), "--task", "brats", "--out", str(labels), "--quiet"]
    assert labels_main(labels_args) == 0
    pseudo_dir = tmp_path / "pseudo"
    pseudo_dir.mkdir()
    for item in items:  # stands in for a run's pseudo-masks; the script reads no "seg"
        shutil.copy(item.pop("seg"), pseudo_dir / f"{item['case']}_pseudo.nii.gz")
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"validation": items}))
    parser = ConfigParser()
    parser.read_config(str(BUNDLES["brats"] / "configs" / "inference.json"))
    for seed in (0, 1):
        torch.save(perturb(parser.get_parsed_content("network_def", instantiate=True), seed=seed).state_dict(),
                   tmp_path / f"net{seed}.pt")
    args = ["--bundle_root", str(BUNDLES["brats"]), "--task", "brats", "--datalist", str(datalist), "--labels",
            str(labels), "--pseudo_dir", str(pseudo_dir), "--model_paths", str(tmp_path / "net0.pt"),
            str(tmp_path / "net1.pt"), "--out", str(tmp_path / "rows.json")]
    rows = stress_main(args)
    assert json.loads((tmp_path / "rows.json").read_text()) == rows
    assert [r["slices"] for r in rows] == [rows[0]["slices"]] * 2 and rows[0]["slices"] > 0
    assert rows[0] != rows[1]  # two networks, one set of painted slices, two answers
    for row in rows:
        for key in ("distractor_pixels_marked", "pseudo_mask_pixels_marked_clean", "pseudo_mask_pixels_marked_painted"):
            assert 0.0 <= row[key] <= 1.0
    (pseudo_dir / f"{items[0]['case']}_pseudo.nii.gz").unlink()
    with pytest.raises(SystemExit):
        stress_main(args)
    assert f"no pseudo-mask {items[0]['case']}_pseudo.nii.gz" in capsys.readouterr().err
