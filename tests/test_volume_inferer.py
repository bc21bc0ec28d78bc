"""VolumeInferer: slice-batched 2D inference over volumes, and writing map + mask NIfTI in the input's space."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Resize, Resized, ScaleIntensityRanged, ScaleIntensityd
from conftest import tiny_unet
from monai_wsss.inferers import ConditionDifferenceInferer
from monai_wsss.inferers.volume import VolumeInferer
from monai_wsss.transforms.postprocess import NormalizeMapd, OtsuThresholdd, map_writer


def _tiny_net(out_channels: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, out_channels, 3, padding=1)
    with torch.no_grad():
        net.weight.normal_()
        net.bias.fill_(0.1)  # nonzero everywhere, so skipped slices are visibly different
    return net.eval()


class RecordingInferer:
    """A 2D inferer callable `inferer(x, network, **kwargs)` that records what it is given."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, network: torch.nn.Module, scale: float = 1.0) -> torch.Tensor:
        self.inputs.append(x.clone())
        return network(x) * scale


def _volumes(batch: int = 2, shape=(40, 48, 7)) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    vol = torch.rand(batch, 1, *shape, generator=g)
    vol[0, ..., [0, shape[-1] - 1]] = 0.0  # slices without body
    if batch > 1:
        vol[1, ..., 3] = 0.0
    return vol


def _reference_slice(slice_2d: torch.Tensor, net: torch.nn.Module, roi=(64, 64)) -> torch.Tensor:
    """One slice through the training transforms (Resized + ScaleIntensityRanged), the net, and Resize back."""
    to_model = Compose(
        [
            Resized("image", roi, mode="bilinear", anti_aliasing=True),
            ScaleIntensityRanged("image", a_min=0.0, a_max=1.0, b_min=-1.0, b_max=1.0),
        ]
    )
    x = to_model({"image": slice_2d[None]})["image"].as_tensor()  # (1, 64, 64)
    y = net(x[None])[0]
    back = Resize(tuple(slice_2d.shape), mode="bilinear", anti_aliasing=True)(y)
    return torch.as_tensor(back)[0]


def test_matches_per_slice_training_transforms_and_skips_empty_slices():
    vol, net = _volumes(), _tiny_net()
    recorder = RecordingInferer()
    vi = VolumeInferer(inferer=recorder, roi_size=(64, 64), slice_axis=-1, sw_batch_size=4)
    assert isinstance(vi, Inferer)
    with torch.no_grad():
        out = vi(vol, net)
    assert out.shape == vol.shape and out.dtype == vol.dtype
    # 14 slices, 3 without body -> 11 slices packed across both volumes into batches of 4, 4, 3
    assert [x.shape[0] for x in recorder.inputs] == [4, 4, 3]
    assert all(x.shape[1:] == (1, 64, 64) for x in recorder.inputs)
    assert float(torch.cat(recorder.inputs).min()) < -0.9  # model space is [-1, 1]
    for b, k in [(0, 0), (0, 6), (1, 3)]:
        assert out[b, ..., k].abs().sum() == 0
    with torch.no_grad():
        for b, k in [(0, 1), (0, 5), (1, 0), (1, 6)]:
            ref = _reference_slice(vol[b, 0, ..., k], net)
            assert torch.allclose(out[b, 0, ..., k], ref, atol=1e-5)


def test_slice_axis_kwargs_plain_network_and_channels():
    vol, net = _volumes(), _tiny_net(out_channels=2)
    with torch.no_grad():
        axial = VolumeInferer(RecordingInferer(), roi_size=32, slice_axis=-1)(vol, net, scale=2.0)
        moved = VolumeInferer(RecordingInferer(), roi_size=32, slice_axis=0)(vol.movedim(-1, 2), net, scale=2.0)
        plain = VolumeInferer(None, roi_size=32, slice_axis=2)(vol, net)
    assert axial.shape == (2, 2, 40, 48, 7)
    assert torch.allclose(moved.movedim(2, -1), axial, atol=1e-6)
    assert torch.allclose(plain * 2.0, axial, atol=1e-6)  # the kwarg reached the inner inferer
    with torch.no_grad():
        no_skip = VolumeInferer(None, roi_size=32, skip_empty=False)(vol, net)
    assert no_skip[0, ..., 0].abs().sum() > 0  # the bias shows on a zero slice when it is not skipped
    assert torch.allclose(no_skip[0, ..., 1], plain[0, ..., 1], atol=1e-6)


def test_device_dtype_meta_and_all_empty_volume():
    vol, net = _volumes(batch=1).double(), _tiny_net().double()
    affine = torch.diag(torch.tensor([0.9, 1.1, 2.5, 1.0], dtype=torch.float64))
    meta_vol = MetaTensor(vol, affine=affine, meta={"filename_or_obj": "case.nii.gz"})
    with torch.no_grad():
        out = VolumeInferer(None, roi_size=16)(meta_vol, net)
    assert out.dtype == torch.float64 and out.device == vol.device
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, affine) and out.meta["filename_or_obj"] == "case.nii.gz"

    recorder = RecordingInferer()
    empty = VolumeInferer(recorder, roi_size=16)(torch.zeros(1, 1, 10, 12, 3), net.float())
    assert recorder.inputs == [] and empty.shape == (1, 1, 10, 12, 3) and empty.abs().sum() == 0


def test_runs_the_cdm_inferer_over_a_volume(scheduler):
    vol = _volumes(batch=1, shape=(24, 20, 5))
    cdm = ConditionDifferenceInferer(scheduler, noise_level=20, num_steps=2, tau=0.95)
    with torch.no_grad():
        out = VolumeInferer(cdm, roi_size=16, sw_batch_size=2)(vol, tiny_unet(), generator=torch.Generator().manual_seed(0))
    assert out.shape == vol.shape and torch.isfinite(out).all()
    assert out[..., 0].abs().sum() == 0 and out[..., 4].abs().sum() == 0  # no body
    assert all(out[..., k].abs().sum() > 0 for k in (1, 2, 3))


def test_bad_inputs_raise_clear_errors():
    net = _tiny_net()
    vi = VolumeInferer(None, roi_size=16)
    with pytest.raises(ValueError, match="inputs"):
        vi(torch.rand(1, 10, 10, 3), net)
    nan_vol = torch.rand(1, 1, 8, 8, 2)
    nan_vol[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        vi(nan_vol, net)
    with pytest.raises(ValueError, match="roi_size"):
        VolumeInferer(roi_size=(64, 64, 64))
    with pytest.raises(ValueError, match="sw_batch_size"):
        VolumeInferer(sw_batch_size=0)
    with pytest.raises(ValueError, match="slice_axis"):
        VolumeInferer(slice_axis=3)
    with pytest.raises(ValueError, match="inferer"):
        VolumeInferer(inferer="cdm")
    with pytest.raises(ValueError, match="expected"):
        VolumeInferer(lambda x, n: x[..., :8], roi_size=16)(torch.rand(1, 1, 8, 8, 2), net)


def test_whole_volume_writes_map_and_mask_in_input_space(tmp_path):
    """240 x 240 x 155 volume with a random (sheared) affine -> map and mask NIfTI with its shape and affine."""
    rng = np.random.default_rng(7)
    affine = np.eye(4)
    affine[:3, :3] = rng.normal(size=(3, 3))
    affine[:3, 3] = rng.normal(size=3) * 50
    shape = (240, 240, 155)
    i, j, k = np.ogrid[: shape[0], : shape[1], : shape[2]]
    brain = ((i - 120) / 90.0) ** 2 + ((j - 120) / 100.0) ** 2 + ((k - 77) / 60.0) ** 2 < 1
    lesion = ((i - 100) / 15.0) ** 2 + ((j - 130) / 15.0) ** 2 + ((k - 80) / 10.0) ** 2 < 1
    volume = (brain * (100 + 10 * rng.random(shape)) + lesion * 80).astype(np.float32)
    src = tmp_path / "case01_flair.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), str(src))

    load = Compose([LoadImaged("image"), EnsureChannelFirstd("image"), ScaleIntensityd("image")])
    data = load({"image": str(src)})
    recorder = RecordingInferer()
    with torch.no_grad():
        map3d = VolumeInferer(recorder, roi_size=(64, 64), sw_batch_size=64)(data["image"][None], torch.nn.Identity())
    assert sum(x.shape[0] for x in recorder.inputs) == int(brain.any(axis=(0, 1)).sum()) < 155
    data["map"] = map3d[0]
    post = Compose(
        [
            NormalizeMapd("map", mode="signed", body_key="image"),
            OtsuThresholdd("map", output_keys="mask", body_key="image"),
            map_writer(tmp_path / "out", map_key="map", mask_key="mask", source_key="image"),
        ]
    )
    post(data)
    written_map = nib.load(str(tmp_path / "out" / "case01_flair_map.nii.gz"))
    written_mask = nib.load(str(tmp_path / "out" / "case01_flair_mask.nii.gz"))
    for img in (written_map, written_mask):
        assert img.shape == shape
        np.testing.assert_allclose(img.affine, affine, atol=1e-4)
    mask = np.asarray(written_mask.dataobj)
    assert set(np.unique(mask)) <= {0, 1} and not mask[~brain].any()
    assert (mask[lesion]).mean() > 0.9  # the bright lesion comes out in place (no axis flip or shift)
    assert np.asarray(written_map.dataobj).max() == pytest.approx(1.0)


class _Channel(torch.nn.Module):
    """A "network" returning one input channel: which neighbour reached which channel."""

    def __init__(self, channel: int) -> None:
        super().__init__()
        self.channel = channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.channel : self.channel + 1]


def test_context_slices_pass_each_slices_neighbours_as_channels():
    from monai_wsss.transforms import stack_neighbour_slices

    assert stack_neighbour_slices(torch.arange(3.0).reshape(3, 1, 1, 1), 1).flatten(1).tolist() == [
        [0.0, 0.0, 1.0], [0.0, 1.0, 2.0], [1.0, 2.0, 2.0]
    ]
    two = torch.arange(4.0).reshape(2, 2, 1, 1)  # 2 slices of 2 channels: neighbour-major, channels kept together
    assert stack_neighbour_slices(two, 1)[0].flatten().tolist() == [0.0, 1.0, 0.0, 1.0, 2.0, 3.0]
    assert stack_neighbour_slices(two, 0) is two
    with pytest.raises(ValueError, match="context_slices must be >= 0"):
        stack_neighbour_slices(two, -1)

    vol = _volumes(batch=2)  # (2, 1, 40, 48, 7); volume 0 has no body on slices 0 and 6, volume 1 on slice 3
    seen = RecordingInferer()
    below = VolumeInferer(seen, roi_size=(40, 48), slice_axis=-1, sw_batch_size=4, context_slices=1)(vol, _Channel(0))
    above = VolumeInferer(None, roi_size=(40, 48), slice_axis=-1, sw_batch_size=4, context_slices=1)(vol, _Channel(2))
    centre = VolumeInferer(None, roi_size=(40, 48), slice_axis=-1, sw_batch_size=4)(vol, _Channel(0))
    assert {x.shape[1] for x in seen.inputs} == {3}
    n = vol.shape[-1]
    for b in range(2):
        for j in range(n):
            if not vol[b, ..., j].any():  # no body: skipped, judged on the centre slice alone
                assert not below[b, ..., j].any() and not above[b, ..., j].any()
                continue
            model_space = 2 * vol[b, ..., [max(j - 1, 0), min(j + 1, n - 1)]] - 1  # [0, 1] -> [-1, 1]
            torch.testing.assert_close(below[b, ..., j], model_space[..., 0], atol=1e-5, rtol=0)
            torch.testing.assert_close(above[b, ..., j], model_space[..., 1], atol=1e-5, rtol=0)
            torch.testing.assert_close(centre[b, ..., j], 2 * vol[b, ..., j] - 1, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="context_slices"):
        VolumeInferer(None, roi_size=(40, 48), context_slices=-1)
