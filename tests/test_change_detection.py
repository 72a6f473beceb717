"""DDPM-CD (dpmlab.apps.change_detection): exact masks, decoder features of both UNet kinds, the symmetric head,
metrics against hand counts, training, errors and the command line."""

from __future__ import annotations

import json

import pytest
import torch

from dpmlab.apps import change_detection as cd
from dpmlab.models.unet import UNet, UNetConfig


def _tiny_unet(size: int = 16) -> UNet:
    torch.manual_seed(0)
    return UNet(
        UNetConfig(image_size=size, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, groups=4, num_heads=2)
    )


def test_masks_exact_unchanged_added_moved():
    digits = cd.digit_pool("train")
    assert digits.shape == (4500, 12, 12) and cd.digit_pool("test").shape == (500, 12, 12)
    p, r = cd.Placement(7, 0, 1, 2), cd.Placement(3, 2, 4, 0)
    q = p._replace(cell=3, dy=0, dx=4)  # p moved to another cell
    assert not cd.change_mask([p, r], [r, p], digits).any()  # the same scene: nothing changed
    moved = cd.change_mask([p, r], [q, r], digits)
    assert torch.equal(moved, cd.ink([p], digits) | cd.ink([q], digits)) and moved.sum() > 20
    assert torch.equal(cd.change_mask([r], [r, p], digits), cd.ink([p], digits))  # added
    near = p._replace(dy=3)  # moved inside its cell: overlapping old and new ink, still the union
    assert torch.equal(cd.change_mask([p], [near], digits), cd.ink([p], digits) | cd.ink([near], digits))
    # generated pairs: unchanged pairs have all-zero masks but different pixels (the nuisances)
    same = cd.make_pairs(6, seed=1, config=cd.SceneConfig(p_unchanged=1.0))
    assert not same.mask.any() and (same.a - same.b).abs().mean() > 0.02
    pairs = cd.make_pairs(40, seed=2)
    again = cd.make_pairs(40, seed=2)
    assert torch.equal(pairs.a, again.a) and torch.equal(pairs.mask, again.mask)  # deterministic
    assert pairs.a.shape == (40, 1, 32, 32) and pairs.mask.shape == (40, 32, 32)
    assert 0.005 < pairs.mask.float().mean() < 0.2 and pairs.a.abs().max() <= 1.0
    # changed pixels are where the clean images differ: the mean |A - B| is larger there
    d = (pairs.a - pairs.b).abs()[:, 0]
    assert d[pairs.mask].mean() > 3 * d[~pairs.mask].mean()


def test_dpmlab_features_shapes_and_values():
    net, ts = _tiny_unet(), (10, 50, 400)
    ext = cd.DiffusionFeatures(net, timesteps=ts, seed=3)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    feats = ext(x)
    assert ext.channels == [3 * 16, 3 * 8]
    assert [tuple(f.shape) for f in feats] == [(2, 48, 8, 8), (2, 24, 16, 16)]
    # the block of timestep k is the hooked decoder activation at x_k = sqrt(abar) x + sqrt(1 - abar) eps_k
    eps = torch.randn((3, 2, 1, 16, 16), generator=torch.Generator().manual_seed(3))
    abar = ext.abar[50].float()
    x_t = abar.sqrt() * x + (1 - abar).sqrt() * eps[1]
    with net.hooks(capture=["up.1.attn0", "up.0.res0"]) as got:
        net(x_t, torch.full((2,), 50))
    torch.testing.assert_close(feats[0][:, 16:32], got["up.1.attn0"][0])
    torch.testing.assert_close(feats[1][:, 8:16], got["up.0.res0"][0])


def test_diffusers_features_shapes():
    from diffusers.models.unets.unet_2d import UNet2DModel

    torch.manual_seed(0)
    net = UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
    )
    ext = cd.DiffusionFeatures(net, timesteps=(50, 100))
    feats = ext(torch.zeros(3, 1, 16, 16))
    assert ext.channels == [32, 16] and [tuple(f.shape) for f in feats] == [(3, 32, 8, 8), (3, 16, 16, 16)]
    assert not torch.equal(feats[0][:, :16], feats[0][:, 16:])  # the two timesteps differ


def test_head_symmetric_and_blind_to_unchanged_content():
    torch.manual_seed(0)
    head = cd.ChangeHead([12, 6], n_t=3)
    fa, fb, fc = ([torch.randn(2, 12, 4, 4), torch.randn(2, 6, 8, 8)] for _ in range(3))
    out = head(fa, fb, (16, 16))
    assert out.shape == (2, 2, 16, 16)
    assert torch.equal(out, head(fb, fa, (16, 16)))  # |g(f_A) - g(f_B)|
    assert torch.equal(head(fa, fa), head(fc, fc))  # an unchanged pair sees zero differences only
    assert not torch.allclose(out[:, :, ::2, ::2], head(fa, fc, (16, 16))[:, :, ::2, ::2])


def test_metrics_against_hand_counts():
    pred = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]])
    target = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0]])
    m = cd.change_metrics(pred, target)  # tp 2, fp 1, fn 1, tn 4
    assert (m.tp, m.fp, m.fn, m.tn) == (2, 1, 1, 4)
    assert m.f1 == pytest.approx(4 / 6) and m.iou == pytest.approx(0.5)
    assert m.precision == pytest.approx(2 / 3) and m.recall == pytest.approx(2 / 3)
    assert m.accuracy == pytest.approx(6 / 8)
    z = cd.change_metrics(torch.zeros(3, 3), torch.zeros(3, 3))
    assert (z.f1, z.iou, z.accuracy) == (1.0, 1.0, 1.0)
    assert cd.change_metrics(torch.ones(2, 2), torch.zeros(2, 2)).f1 == 0.0


def test_training_reduces_loss_pixels_and_diffusion():
    pairs = cd.make_pairs(24, seed=5)
    ext = cd.PixelFeatures()
    fa, fb = cd.extract(ext, pairs.a), cd.extract(ext, pairs.b)
    torch.manual_seed(0)
    head = cd.ChangeHead(ext.channels)
    losses = cd.train_head(head, fa, fb, pairs.mask, epochs=8, batch_size=8, lr=3e-3)
    assert losses[-1] < 0.5 * losses[0]
    pred = cd.predict(head, fa, fb, (32, 32))
    assert pred.shape == (24, 32, 32) and pred.dtype == torch.bool
    small = cd.make_pairs(8, seed=6, config=cd.SceneConfig(size=16, digit_size=8))
    dext = cd.DiffusionFeatures(_tiny_unet(16), timesteps=(50, 100))
    da, db = cd.extract(dext, small.a, batch_size=4), cd.extract(dext, small.b, batch_size=4)
    torch.manual_seed(0)
    dh = cd.ChangeHead(dext.channels, n_t=2)
    dl = cd.train_head(dh, da, db, small.mask, epochs=6, batch_size=4, lr=3e-3)
    assert dl[-1] < 0.7 * dl[0]


def test_bad_inputs(tmp_path):
    a = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match="mismatched pair"):
        cd.check_pairs(a, torch.zeros(2, 1, 8, 9))
    with pytest.raises(ValueError, match="mask must have shape"):
        cd.ChangePairs(a, a, torch.zeros(2, 8, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="empty"):
        cd.check_pairs(torch.zeros(0, 1, 8, 8), torch.zeros(0, 1, 8, 8))
    with pytest.raises(ValueError, match="digit_size"):
        cd.SceneConfig(size=16, digit_size=12)
    with pytest.raises(ValueError, match="split must be"):
        cd.make_pairs(2, split="val")
    net = _tiny_unet()
    with pytest.raises(ValueError, match="timesteps must be distinct"):
        cd.DiffusionFeatures(net, timesteps=(50, 1000))
    with pytest.raises(ValueError, match="unsupported network"):
        cd.DiffusionFeatures(torch.nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match=r"images must have shape \(B, 1, 16, 16\)"):
        cd.DiffusionFeatures(net, timesteps=(5,))(torch.zeros(1, 1, 8, 8))
    head, f = cd.ChangeHead([1]), [torch.zeros(2, 1, 8, 8)]
    with pytest.raises(ValueError, match="needs change masks"):
        cd.train_head(head, f, f, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mismatched pairs"):
        cd.train_head(head, f, [torch.zeros(3, 1, 8, 8)], torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="scale 0: features"):
        head(f, [torch.zeros(2, 2, 8, 8)])
    with pytest.raises(ValueError, match="same shape"):
        cd.change_metrics(torch.zeros(2, 2), torch.zeros(2, 3))
    from dpmlab.models.hub import write_safetensors

    write_safetensors(tmp_path / "p.safetensors", {"a": a, "b": a.clone()}, {})
    with pytest.raises(ValueError, match="lacks mask"):
        cd.load_pairs(tmp_path / "p.safetensors")


def test_command_line(tmp_path, capsys):
    from dpmlab.models.hub import save_model
    from dpmlab.models.nets import ModelSpec, Objective

    d = tmp_path / "data"
    assert cd.main(["data", "--out", str(d), "--scenes", "3", "--train-pairs", "16", "--test-pairs", "8"]) == 0
    assert len(list((d / "scenes").glob("*.png"))) == 3
    assert cd.main(["data", "--out", str(d), "--scenes", "0", "--train-pairs", "4", "--test-pairs", "0"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    head = tmp_path / "pix.safetensors"
    common = ["train", "--pairs", str(d / "train.safetensors"), "--epochs", "2", "--quiet"]
    assert cd.main([*common, "--features", "pixels", "--out", str(head)]) == 0
    assert (
        cd.main(
            [
                "eval",
                "--pairs",
                str(d / "test.safetensors"),
                "--head",
                str(head),
                "--json",
                str(tmp_path / "m.json"),
                "--quiet",
            ]
        )
        == 0
    )
    m = json.loads((tmp_path / "m.json").read_text())
    assert set(m) >= {"f1", "iou", "precision", "recall", "accuracy"} and m["tp"] + m["fn"] > 0
    # a (tiny, untrained) dpmlab diffusion model file as the feature extractor
    cfg = dict(image_size=32, model_channels=8, channel_mult=[1, 2], num_res_blocks=1, groups=4, num_heads=2)
    spec = ModelSpec("unet", cfg, Objective.EPS, "linear", (1, 32, 32))
    save_model(tmp_path / "m.safetensors", spec.build_net(), spec)
    dh = tmp_path / "ddpm.safetensors"
    assert (
        cd.main([*common, "--features", str(tmp_path / "m.safetensors"), "--timesteps", "50,100", "--out", str(dh)])
        == 0
    )
    assert json.loads(dh.with_suffix(".json").read_text())["head"]["channels"] == [32, 16]
    assert cd.main(["eval", "--pairs", str(d / "test.safetensors"), "--head", str(dh), "--quiet"]) == 0
    assert cd.main([*common, "--features", "missing.safetensors", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cd.main([*common, "--features", "pixels", "--out", str(head)]) == 2  # no --overwrite
