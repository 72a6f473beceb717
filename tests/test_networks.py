"""Networks: shapes, configs, class conditioning, EDM preconditioning and the UNet's feature hooks."""

import json

import pytest
import torch

from dpmlab.models.mlp import MLP, MLPConfig
from dpmlab.models.nets import EDMPrecond, ModelSpec, Objective
from dpmlab.models.unet import UNet, UNetConfig


def _tiny(**kw):
    cfg = dict(image_size=8, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, num_heads=2, groups=4)
    cfg.update(kw)
    return UNet(UNetConfig(**cfg))


def _randomise(net):
    torch.manual_seed(1)
    with torch.no_grad():  # zero-initialised output layers would hide every hook's effect
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net.eval()


@pytest.mark.parametrize("size,mult", [(8, (1, 2)), (28, (1, 2, 2)), (28, (1, 2, 2, 2)), (10, (1, 2, 2))])
def test_unet_shapes_including_padded_sizes(size, mult):
    torch.manual_seed(0)
    net = _tiny(image_size=size, channel_mult=mult, num_classes=3)
    x = torch.randn(2, 1, size, size)
    out = net(x, torch.tensor([3.0, 999.0]), label=torch.tensor([0, 3]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert net.config.padded_size % 2 ** (len(mult) - 1) == 0


def test_unet_config_round_trip_and_errors():
    cfg = UNetConfig(image_size=28, channel_mult=(1, 2, 4), num_classes=10)
    assert UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="groups=5"):
        UNetConfig(groups=5)
    with pytest.raises(ValueError, match="unknown UNetConfig fields: foo"):
        UNetConfig.from_dict({"foo": 1})
    with pytest.raises(ValueError, match="expects"):
        _tiny()(torch.randn(1, 1, 9, 9), torch.zeros(1))


def test_labels_null_class_and_errors():
    net = _randomise(_tiny(num_classes=3))
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 500.0)
    null = net(x, t, label=torch.tensor([3, 3]))
    assert torch.equal(net(x, t), null)  # label=None is the null class
    assert not torch.allclose(net(x, t, label=torch.tensor([0, 1])), null)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\]"):
        net(x, t, label=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="integer"):
        net(x, t, label=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="unconditional"):
        _tiny()(x, t, label=torch.tensor([0, 1]))


def test_mlp_shapes_conditioning_and_config():
    cfg = MLPConfig(data_shape=(1, 4, 4), width=32, depth=2, num_classes=2)
    assert MLPConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    net = _randomise(MLP(cfg))
    x = torch.randn(3, 1, 4, 4)
    out = net(x, torch.tensor([1.0, 2.0, 3.0]), label=torch.tensor([0, 1, 2]))
    assert out.shape == x.shape
    assert not torch.allclose(out, net(x, torch.tensor([1.0, 2.0, 3.0])))
    with pytest.raises(ValueError, match="MLP expects"):
        net(torch.randn(3, 16), torch.zeros(3))


def test_h_space_capture_and_all_block_names():
    net = _randomise(_tiny())
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 100.0)
    with net.hooks(capture=net.block_names()) as feats:
        out = net(x, t)
        net(x, t)
    assert set(feats) == set(net.block_names())
    assert len(feats["mid"]) == 2  # one entry per forward call
    assert feats["mid"][0].shape == (2, 16, 4, 4)  # bottleneck "h-space": (B, C_last, H/2, W/2)
    assert torch.equal(feats["out"][0], out)
    assert net._hooks is None  # removed on exit
    with pytest.raises(ValueError, match="unknown blocks to capture: nope"):
        with net.hooks(capture=["nope"]):
            pass


def test_bottleneck_replacement_changes_output():
    net = _randomise(_tiny())
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 100.0)
    base = net(x, t)
    with net.hooks(bottleneck=lambda h, emb: h):
        assert torch.equal(net(x, t), base)  # identity replacement is a no-op
    with net.hooks(bottleneck=lambda h, emb: h + 1.0):
        shifted = net(x, t)
    assert not torch.allclose(shifted, base)
    assert torch.equal(net(x, t), base)  # hook removed


def test_skip_scaling_identity_and_effect():
    net = _randomise(_tiny())
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 100.0)
    base = net(x, t)
    with net.hooks(skip_scale={k: 1.0 for k in range(net.num_skips)}):
        assert torch.equal(net(x, t), base)
    with net.hooks(skip_scale={0: 0.5}):
        assert not torch.allclose(net(x, t), base)
    with pytest.raises(ValueError, match="out of range"):
        with net.hooks(skip_scale={net.num_skips: 1.0}):
            pass


def test_prunable_blocks_can_be_bypassed():
    net = _randomise(_tiny(num_res_blocks=2, channel_mult=(1, 1, 2)))
    names = net.prunable_blocks()
    assert names and "mid.1" in names and not any("sample" in n for n in names)
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 100.0)
    base = net(x, t)
    for name in names:
        with net.hooks(bypass=[name]):
            out = net(x, t)
        assert out.shape == base.shape and not torch.equal(out, base), name
    with pytest.raises(ValueError, match="cannot be bypassed"):
        with net.hooks(bypass=["down.0.downsample"]):
            pass


def test_edm_preconditioning_coefficients():
    pre = EDMPrecond(lambda x, c, **k: torch.zeros_like(x), sigma_data=0.5)
    sigma = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = pre.coefficients(sigma)
    # Karras et al. 2022, Table 1: c_skip + c_out^2 / sd^2 = 1 and Var(c_in x) = 1 for x = x0 + sigma n
    assert torch.allclose(c_skip + (c_out / 0.5) ** 2, torch.ones(3, dtype=torch.float64))
    assert torch.allclose(c_in**2 * (0.25 + sigma**2), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(c_noise, sigma.log() / 4)
    x = torch.randn(3, 2, dtype=torch.float64)
    assert torch.allclose(pre(x, sigma), c_skip[:, None] * x)  # F = 0 leaves the skip path


def test_model_spec_round_trip_and_denoiser():
    spec = ModelSpec(
        "mlp", MLPConfig(data_shape=(2,), width=16, depth=1).to_dict(), Objective.V, schedule="cosine", data_shape=(2,)
    )
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    den = spec.denoiser(spec.build_net())
    assert den.data_shape == (2,) and den(torch.randn(4, 2), 0.5).shape == (4, 2)
    edm = ModelSpec("mlp", MLPConfig(data_shape=(2,), width=16, depth=1).to_dict(), "edm", data_shape=(2,))
    assert type(edm.denoiser(edm.build_net()).schedule).__name__ == "EDM"
    with pytest.raises(ValueError, match="unknown network kind 'cnn'"):
        ModelSpec("cnn", {}, "eps")
