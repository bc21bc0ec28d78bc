from __future__ import annotations

import pytest
import torch
from monai.engines import SupervisedTrainer
from ignite.engine import Events
from monai.inferers import SimpleInferer

from conftest import tiny_classifier, tiny_unet
from monai_wsss.engines import ClassConditionalDiffusionPrepareBatch, NoisyClassifierPrepareBatch, SegmentationPrepareBatch


def batch(n=8):
    return {"image": torch.rand(n, 1, 16, 16) * 2 - 1, "label": torch.tensor([0, 1] * (n // 2)), "seg": torch.zeros(n, 1, 16, 16)}


def test_diffusion_prepare_batch_noises_images_and_passes_labels(scheduler):
    torch.manual_seed(0)
    data = batch()
    x_t, target, args, kwargs = ClassConditionalDiffusionPrepareBatch(scheduler)(data)
    t = kwargs["timesteps"]
    ab = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, ab.sqrt() * data["image"] + (1 - ab).sqrt() * target)
    assert torch.equal(kwargs["class_labels"], data["label"]) and args == ()


def test_label_dropout_uses_the_null_class(scheduler):
    torch.manual_seed(0)
    prepare = ClassConditionalDiffusionPrepareBatch(scheduler, label_dropout=0.5, null_class=2)
    labels = prepare(batch(400))[3]["class_labels"]
    dropped = (labels == 2).float().mean().item()
    assert 0.4 < dropped < 0.6
    assert set(labels.unique().tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="null_class"):
        ClassConditionalDiffusionPrepareBatch(scheduler, label_dropout=0.1)
    with pytest.raises(ValueError, match="label_dropout"):
        ClassConditionalDiffusionPrepareBatch(scheduler, label_dropout=1.0, null_class=2)
    with pytest.raises(ValueError, match="'label'"):
        prepare({"image": torch.zeros(2, 1, 16, 16)})


def test_classifier_prepare_batch_bounds_timesteps(scheduler):
    torch.manual_seed(0)
    x_t, labels, _, kwargs = NoisyClassifierPrepareBatch(scheduler, max_timestep=50)(batch(64))
    assert kwargs["timesteps"].max() < 50 and labels.dtype == torch.long
    with pytest.raises(ValueError, match="max_timestep"):
        NoisyClassifierPrepareBatch(scheduler, max_timestep=0)


def test_segmentation_prepare_batch_targets_the_pixel_mask():
    data = batch(2)
    data["seg"][0, 0, 3, 3] = 1
    image, target, _, _ = SegmentationPrepareBatch()(data)
    assert torch.equal(target, data["seg"]) and torch.equal(image, data["image"])
    with pytest.raises(ValueError, match="'mask'"):
        SegmentationPrepareBatch("mask")(data)


@pytest.mark.parametrize("which", ["diffusion", "classifier"])
def test_supervised_trainer_reduces_the_loss(scheduler, which):
    torch.manual_seed(0)
    data = [batch(8) for _ in range(2)]
    if which == "diffusion":
        net, prepare, loss = tiny_unet(), ClassConditionalDiffusionPrepareBatch(scheduler), torch.nn.MSELoss()
    else:
        net, prepare, loss = tiny_classifier(), NoisyClassifierPrepareBatch(scheduler, max_timestep=1), torch.nn.CrossEntropyLoss()
        data = [{**d, "image": d["image"] + d["label"].view(-1, 1, 1, 1)} for d in data]  # separable classes
    net.train()
    losses = []
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=15, train_data_loader=data, network=net,
        optimizer=torch.optim.Adam(net.parameters(), 2e-3), loss_function=loss, inferer=SimpleInferer(),
        prepare_batch=prepare, decollate=False,
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].item()))
    trainer.run()
    assert sum(losses[-4:]) < sum(losses[:4])
