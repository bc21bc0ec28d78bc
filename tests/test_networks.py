from __future__ import annotations

import warnings

import pytest
import torch
from monai.networks.nets import DiffusionModelUNet

from conftest import TINY_UNET, perturb, tiny_classifier, tiny_unet
from monai_wsss.apps.run_folder import state_dict_checksum
from monai_wsss.inferers._ddim import classifier_log_prob_grad
from monai_wsss.networks import AutocastNetwork, native_bfloat16, to_memory_format, with_precision
from monai_wsss.networks.nets import ConditionalDiffusionUNet, NoisyClassifier

X = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
T = torch.tensor([10, 500])


def monai_kwargs() -> dict:
    kw = {k: v for k, v in TINY_UNET.items() if k != "num_classes"}
    return {**kw, "num_class_embeds": 2}


def test_loads_monai_state_dict_and_matches_it():
    torch.manual_seed(0)
    ref = perturb(DiffusionModelUNet(**monai_kwargs()))
    net = ConditionalDiffusionUNet(**TINY_UNET).eval()
    net.load_state_dict(ref.state_dict())  # strict: identical keys and shapes
    labels = torch.tensor([1, 0])
    expected = ref(X, T, class_labels=labels)
    assert expected.abs().max() > 1e-3  # a real signal, not the zero-initialised output
    torch.testing.assert_close(net(X, T, class_labels=labels), expected)
    torch.testing.assert_close(net(X, T, class_embedding=net.embed_classes(labels)), expected)


def test_loads_old_monai_generative_state_dict():
    net = tiny_unet()
    new_sd = net.state_dict()
    old_sd = {}
    # the MONAI Generative Models names that load_old_state_dict maps back
    for k, v in new_sd.items():
        k_old = k.replace(".attn.to_q.", ".to_q.").replace(".attn.to_k.", ".to_k.").replace(".attn.to_v.", ".to_v.")
        k_old = k_old.replace(".attn.out_proj.", ".proj_attn.").replace("postconv", "conv")
        old_sd[k_old] = v.clone()
    assert set(old_sd) != set(new_sd)
    fresh = ConditionalDiffusionUNet(**TINY_UNET).eval()
    fresh.load_old_state_dict(old_sd)
    labels = torch.tensor([0, 1])
    torch.testing.assert_close(fresh(X, T, class_labels=labels), net(X, T, class_labels=labels))


@pytest.mark.parametrize("conditioning", ["add", "scale_shift"])
def test_label_and_timestep_change_output(conditioning):
    net = tiny_unet(conditioning=conditioning)
    out1 = net(X, T, class_labels=torch.tensor([1, 1]))
    out0 = net(X, T, class_labels=torch.tensor([0, 0]))
    assert (out1 - out0).abs().mean() > 1e-3
    out_t = net(X, torch.tensor([900, 900]), class_labels=torch.tensor([1, 1]))
    assert (out1 - out_t).abs().mean() > 1e-3


def test_groupnorm_erasing_condition_is_rejected_and_scale_shift_fixes_it():
    cfg = {**TINY_UNET, "channels": (8, 16), "norm_num_groups": 8}
    with pytest.raises(ValueError, match="erases"):
        ConditionalDiffusionUNet(**cfg)
    # the measured reason: MONAI's additive conditioning before a one-channel-per-group norm is lost
    kw = {k: v for k, v in cfg.items() if k != "num_classes"}
    torch.manual_seed(0)
    plain = perturb(DiffusionModelUNet(**{**kw, "channels": (8, 8), "num_class_embeds": 2}))
    lost = plain(X, T, class_labels=torch.tensor([1, 1])) - plain(X, T, class_labels=torch.tensor([0, 0]))
    assert lost.abs().max() < 1e-4
    net = tiny_unet(channels=(8, 8), norm_num_groups=8, conditioning="scale_shift")
    kept = net(X, T, class_labels=torch.tensor([1, 1])) - net(X, T, class_labels=torch.tensor([0, 0]))
    assert kept.abs().mean() > 1e-3


def test_scale_shift_projects_two_vectors_per_channel():
    net = ConditionalDiffusionUNet(**TINY_UNET, conditioning="scale_shift")
    proj = net.down_blocks[0].resnets[0].time_emb_proj
    assert proj.out_features == 2 * 8


def test_null_class_is_the_last_index():
    net = ConditionalDiffusionUNet(**TINY_UNET, null_class=True)
    assert net.null_class == 2 and net.class_embedding.num_embeddings == 3
    assert ConditionalDiffusionUNet(**TINY_UNET).null_class is None
    assert net.embed_classes([2]).shape == (1, net.embedding_dim)


@pytest.mark.parametrize("kwargs, name", [({"null_class": "true"}, "null_class"), ({"null_class": 2}, "null_class"),
                                          ({"num_classes": "2"}, "num_classes"), ({"num_classes": True}, "num_classes")])
def test_class_arguments_must_be_typed_not_command_line_text(kwargs, name):
    # the network reads no command-line text: configs parse it (parse_option) before building the network
    with pytest.raises(ValueError, match=f"{name} must be an? (bool|int)"):
        ConditionalDiffusionUNet(**{**TINY_UNET, **kwargs})


def test_embed_classes_shape_and_values():
    net = tiny_unet()
    e = net.embed_classes(torch.tensor([1, 0, 1]))
    assert e.shape == (3, 32)
    torch.testing.assert_close(e[0], net.class_embedding.weight[1])
    torch.testing.assert_close(e[1], net.class_embedding.weight[0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one"),
        ({"class_labels": torch.tensor([0, 1]), "class_embedding": torch.zeros(2, 32)}, "exactly one"),
        ({"class_labels": torch.tensor([0, 2])}, "class_labels must be in 0..1"),
        ({"class_labels": torch.tensor([-1, 0])}, "class_labels must be in"),
        ({"class_embedding": torch.zeros(2, 31)}, "shape"),
        ({"class_embedding": torch.zeros(2, 32, dtype=torch.long)}, "float"),
    ],
)
def test_forward_rejects_bad_conditions(kwargs, match):
    net = ConditionalDiffusionUNet(**TINY_UNET)
    with pytest.raises(ValueError, match=match):
        net(X, T, **kwargs)


def test_constructor_errors():
    with pytest.raises(ValueError, match="num_classes"):
        ConditionalDiffusionUNet(**{**TINY_UNET, "num_classes": 0})
    with pytest.raises(ValueError, match="conditioning"):
        ConditionalDiffusionUNet(**TINY_UNET, conditioning="film")
    with pytest.raises(ValueError, match="num_class_embeds"):
        ConditionalDiffusionUNet(**TINY_UNET, num_class_embeds=2)
    with pytest.raises(ValueError, match="embed_classes|class_labels"):
        ConditionalDiffusionUNet(**TINY_UNET).embed_classes([5])


def test_noisy_classifier_is_timestep_aware_and_checks_shape():
    clf = tiny_classifier()
    logits = clf(X, T)
    assert logits.shape == (2, 2)
    assert (clf(X, torch.tensor([900, 900])) - clf(X, torch.tensor([10, 10]))).abs().max() > 1e-4
    with pytest.raises(ValueError, match="spatial shape"):
        clf(torch.randn(2, 1, 32, 32), T)
    with pytest.raises(ValueError, match="erase"):
        NoisyClassifier(spatial_dims=2, in_channels=1, num_classes=2, input_shape=(16, 16), channels=(8, 16), norm_num_groups=8)
    with pytest.raises(ValueError, match="input_shape"):
        NoisyClassifier(spatial_dims=2, in_channels=1, num_classes=2, input_shape=(16, 16, 16))


def test_three_dimensional_network():
    net = tiny_unet(spatial_dims=3)
    x = torch.randn(1, 1, 8, 8, 8)
    out = net(x, torch.tensor([5]), class_embedding=net.embed_classes([1]))
    assert out.shape == x.shape


# ---- inference precision -----------------------------------------------------------------------------------------
def test_autocast_network_keeps_float32_interfaces_and_close_outputs():
    net = tiny_unet()
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([5, 300, 900]), torch.tensor([1, 0, 1])
    with torch.no_grad():
        reference = net(x, t, y)
    fast = AutocastNetwork(net)
    with torch.no_grad():
        out = fast(x, t, y)
    assert out.dtype == torch.float32 and out.shape == reference.shape and out.is_contiguous()
    difference = (out - reference).abs().max().item()
    assert 0 < difference < 0.05 * reference.abs().max().item()  # reduced precision really ran, and stayed close
    # the inferers reach the wrapped network's helpers and attributes through the wrapper
    assert fast.null_class == net.null_class
    torch.testing.assert_close(fast.embed_classes([1, 0]), net.embed_classes([1, 0]))
    # input gradients (classifier guidance) flow through the autocast region, in float32
    clf = AutocastNetwork(tiny_classifier())
    xg = torch.randn(2, 1, 16, 16, requires_grad=True)
    clf(xg, torch.tensor([10, 10])).logsumexp(1).sum().backward()
    assert xg.grad is not None and xg.grad.dtype == torch.float32 and xg.grad.abs().sum() > 0


def test_with_precision_choices_and_errors():
    net = tiny_unet()
    assert with_precision(net, "float32") is net
    assert with_precision(None, "bfloat16") is None
    wrapped = with_precision(net, "bfloat16")
    assert isinstance(wrapped, AutocastNetwork) and with_precision(wrapped, "bfloat16") is wrapped
    # run manifests checksum the (now channels-last) weights, and a bfloat16 run never resumes a float32 one
    assert state_dict_checksum(wrapped) != state_dict_checksum(tiny_unet()) is not None
    auto = with_precision(tiny_unet(), "auto")
    assert isinstance(auto, AutocastNetwork) == native_bfloat16("cpu")
    with pytest.raises(ValueError, match="precision"):
        with_precision(net, "half")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        AutocastNetwork(lambda x: x)


# ---- memory format and attention kernel (speed paths; speed itself is measured by python -m monai_wsss.benchmark paths)
# float32 tolerance of the fast paths: same arithmetic in another summation order
FAST_PATH_ATOL = 1e-5


def test_channels_last_keeps_outputs_and_plain_state_dict(tmp_path):
    reference = tiny_unet()
    net = tiny_unet()
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([5, 300, 900]), torch.tensor([1, 0, 1])
    with torch.no_grad():
        expected = reference(x, t, class_labels=y)
    assert expected.abs().max() > 1e-3
    assert to_memory_format(net, "channels_last") is net
    weights4d = [p for p in net.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[2] > 1]  # not 1x1 or 1-channel
    assert weights4d and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in weights4d)
    with torch.no_grad():
        out = net(x, t, class_labels=y)
    assert out.is_contiguous() and out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=FAST_PATH_ATOL, rtol=0)
    # converting twice adds no second set of hooks
    n_hooks = len(net._forward_pre_hooks)
    assert to_memory_format(net, "auto") is net and len(net._forward_pre_hooks) == n_hooks
    # the saved weights: same keys, shapes and plain layout; they load (weights_only) into a contiguous network
    sd = net.state_dict()
    assert list(sd) == list(reference.state_dict())
    assert all(v.is_contiguous() for v in sd.values())
    torch.save(sd, tmp_path / "w.pt")
    fresh = ConditionalDiffusionUNet(**TINY_UNET).eval()
    fresh.load_state_dict(torch.load(tmp_path / "w.pt", map_location="cpu", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, class_labels=y), expected, atol=0, rtol=0)
    # and contiguous weights load into the channels-last network, which stays channels-last
    net.load_state_dict(reference.state_dict())
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in weights4d)


def test_memory_format_choices_and_errors():
    plain = tiny_unet()
    assert to_memory_format(plain, "contiguous") is plain and all(p.is_contiguous() for p in plain.parameters())
    assert to_memory_format(None) is None
    # float32 on the CPU is channels-last by default, and the same object (checksums, attributes, isinstance)
    net = tiny_unet()
    assert with_precision(net, "float32") is net
    assert any(p.ndim == 4 and not p.is_contiguous() for p in net.parameters())
    off = tiny_unet()
    assert with_precision(off, "float32", "contiguous") is off and all(p.is_contiguous() for p in off.parameters())
    # 3D networks have no channels-last: "auto" leaves them, an explicit request is an error naming the option
    net3d = tiny_unet(spatial_dims=3)
    assert to_memory_format(net3d, "auto") is net3d and all(p.is_contiguous() for p in net3d.parameters())
    with pytest.raises(ValueError, match="memory_format='channels_last' needs a 2D network"):
        to_memory_format(net3d, "channels_last")
    with pytest.raises(ValueError, match="memory_format must be one of"):
        to_memory_format(plain, "nhwc")
    with pytest.raises(ValueError, match="memory_format must be one of"):
        with_precision(plain, "float32", "nhwc")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        to_memory_format(lambda x: x)  # type: ignore[arg-type]
    assert not AutocastNetwork(tiny_unet(), channels_last=False).channels_last


def test_channels_last_training_step_matches_contiguous():
    losses, grads, params = [], [], []
    for fmt in ("contiguous", "channels_last"):
        net = to_memory_format(tiny_unet().train(), fmt)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            x = torch.randn(4, 1, 16, 16, generator=gen)
            t, y = torch.randint(0, 1000, (4,), generator=gen), torch.randint(0, 2, (4,), generator=gen)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(net(x, t, class_labels=y), x)
            loss.backward()
            opt.step()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in net.parameters()])
        params.append({k: v.clone() for k, v in net.state_dict().items()})
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g1, g0, atol=1e-4, rtol=1e-3)
    for k in params[0]:
        # Adam divides by the gradient's running RMS, which turns rounding of a near-zero gradient into up to a
        # full lr-sized step: allow 10 % of the 3 steps' largest move (3 x lr)
        torch.testing.assert_close(params[1][k], params[0][k], atol=3e-4, rtol=0)
        assert params[1][k].is_contiguous()


def test_channels_last_classifier_input_gradient_matches():
    x, target = torch.randn(4, 1, 16, 16), torch.tensor([1, 0, 1, 0])
    g_ref = classifier_log_prob_grad(tiny_classifier(), x, 100, target)
    fast = with_precision(tiny_classifier(), "float32")
    assert any(p.ndim == 4 and not p.is_contiguous() for p in fast.parameters())
    g = classifier_log_prob_grad(fast, x, 100, target)
    assert g_ref.abs().max() > 1e-4 and g.is_contiguous()
    torch.testing.assert_close(g, g_ref, atol=FAST_PATH_ATOL, rtol=1e-4)


def test_fused_attention_default_matches_monai_attention():
    fused = tiny_unet()
    einsum = ConditionalDiffusionUNet(**TINY_UNET, use_flash_attention=False).eval()
    einsum.load_state_dict(fused.state_dict())  # same weights, same keys
    flags = [m.use_flash_attention for m in fused.modules() if hasattr(m, "use_flash_attention")]
    assert flags and all(flags)
    with torch.no_grad():
        expected = einsum(X, T, class_labels=torch.tensor([1, 0]))
        torch.testing.assert_close(fused(X, T, class_labels=torch.tensor([1, 0])), expected, atol=FAST_PATH_ATOL, rtol=0)
    # the classifier's input gradient (CG-CDM guidance) through the fused attention
    kw = dict(spatial_dims=2, in_channels=1, num_classes=2, input_shape=(16, 16), channels=(8, 16),
              attention_levels=(False, True), num_res_blocks=1, norm_num_groups=4, num_head_channels=8)
    torch.manual_seed(0)
    clf_fused = perturb(NoisyClassifier(**kw))
    clf_einsum = NoisyClassifier(**kw, use_flash_attention=False).eval()
    clf_einsum.load_state_dict(clf_fused.state_dict())
    x, target = torch.randn(3, 1, 16, 16), torch.tensor([1, 0, 1])
    g_ref = classifier_log_prob_grad(clf_einsum, x, 50, target)
    assert g_ref.abs().max() > 1e-4
    torch.testing.assert_close(classifier_log_prob_grad(clf_fused, x, 50, target), g_ref, atol=FAST_PATH_ATOL, rtol=1e-4)
    with pytest.raises(ValueError, match="use_flash_attention must be a bool"):
        ConditionalDiffusionUNet(**TINY_UNET, use_flash_attention="yes")
    with pytest.raises(ValueError, match="use_flash_attention must be a bool"):
        NoisyClassifier(spatial_dims=2, in_channels=1, input_shape=(16, 16), use_flash_attention=1)


class _LabelsPositional(torch.nn.Module):
    # a module (not a function) so that the tracer sees the network's parameters as parameters
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, class_labels=y)


def test_channels_last_state_dict_keep_vars_returns_the_live_parameters_so_tracing_works():
    # torch.jit.trace and torch.onnx.export read state_dict(keep_vars=True) and need the parameters themselves;
    # the contiguous copies meant for saving made them fail on a channels-last network
    net = to_memory_format(tiny_unet().eval(), "channels_last")
    live = net.state_dict(keep_vars=True)
    params = dict(net.named_parameters())
    assert all(live[k] is p for k, p in params.items())
    assert all(v.is_contiguous() for v in net.state_dict().values())  # saving still gets plain tensors
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([5, 300]), torch.tensor([1, 0])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on the network's Python-level input checks
        traced = torch.jit.trace(_LabelsPositional(net), (x, t, y))
        torch.testing.assert_close(traced(x, t, y), net(x, t, class_labels=y), atol=1e-6, rtol=0)


# ---- coordinate channels (issue 15: location cues for the segmenter) ---------------------------------------------
def test_coordinate_channels_network_feeds_monais_coordinate_channels_with_the_input():
    """The wrapped network sees exactly what MONAI's AddCoordinateChannels appends to each item, in 2D and 3D,
    contiguous or channels-last, and its weights save and load under the ``network.`` prefix."""
    from monai.networks.nets import UNet
    from monai.transforms import AddCoordinateChannels

    from monai_wsss.networks.nets import CoordinateChannelsNetwork

    for dims, shape in ((2, (3, 2, 16, 12)), (3, (2, 1, 8, 8, 4))):
        inner = perturb(UNet(dims, shape[1] + dims, 2, channels=(4, 8), strides=(2,), num_res_units=1))
        net = CoordinateChannelsNetwork(inner, spatial_dims=dims).eval()
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        expected = torch.stack([inner(AddCoordinateChannels(tuple(range(dims)))(xi)[None])[0] for xi in x])
        with torch.no_grad():
            torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-6)
            coords = net.coordinates(x)
        assert coords.shape == (shape[0], dims, *shape[2:])
        assert coords.amin() == -0.5 and coords.amax() == 0.5 and torch.equal(coords[0], coords[-1])
    assert all(k.startswith("network.") for k in net.state_dict())
    fast = to_memory_format(CoordinateChannelsNetwork(perturb(UNet(2, 3, 2, channels=(4, 8), strides=(2,))), 2), "channels_last")
    plain = CoordinateChannelsNetwork(UNet(2, 3, 2, channels=(4, 8), strides=(2,)), 2).eval()
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fast.eval()(x), plain(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"spatial_dims=2\) takes \(batch, channels, size, size\) input, got shape \(1, 16, 16\)"):
        plain(torch.randn(1, 16, 16))
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        CoordinateChannelsNetwork(UNet(1, 2, 2, channels=(4, 8), strides=(2,)), spatial_dims=1)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        CoordinateChannelsNetwork("unet")


def test_coordinate_channels_let_a_pointwise_network_learn_where_the_target_is():
    """A target defined by place alone (the left half of a uniform image): a 1 x 1 convolution cannot tell the
    halves apart from intensity, and learns them from the coordinate channels."""
    from monai_wsss.networks.nets import CoordinateChannelsNetwork

    x = torch.ones(4, 1, 8, 8)
    target = torch.zeros(4, 1, 8, 8)
    target[..., :4, :] = 1.0

    def fit(net: torch.nn.Module) -> float:
        torch.manual_seed(0)
        opt = torch.optim.Adam(net.parameters(), lr=0.1)
        for _ in range(200):
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), target)
            loss.backward()
            opt.step()
        with torch.no_grad():
            return ((net(x) > 0).float() == target).float().mean().item()

    torch.manual_seed(0)
    assert fit(torch.nn.Conv2d(1, 1, 1)) <= 0.5  # one output for every pixel
    torch.manual_seed(0)
    assert fit(CoordinateChannelsNetwork(torch.nn.Conv2d(3, 1, 1))) == 1.0
