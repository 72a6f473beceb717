"""SDA / DDA (Guo et al., CVPR 2025; Gao et al., CVPR 2023): the corruption suite, the low-pass operator, the
guided projection (identity at t_start = 0, guidance pulls LP(x0) toward LP(x_in), seeding), fine-tuning, the
logit ensemble, bad inputs and the command line (on tiny synthetic data, the projection on an exact denoiser)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from dpmlab.apps import sda
from dpmlab.metrics.features import MNISTClassifier, save_mnist_classifier
from dpmlab.models.analytic import EmpiricalData
from dpmlab.schedules import DiscreteVP


def _digits(n: int = 16, seed: int = 0) -> torch.Tensor:
    """Digit-like 28x28 images in [-1, 1]: black background, a few bright bars."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, 28, 28)
    for b in range(n):
        for _ in range(3):
            r, c = torch.randint(4, 20, (2,), generator=g).tolist()
            if torch.rand((), generator=g) < 0.5:
                x[b, 0, r : r + 3, c : c + 8] = 1.0
            else:
                x[b, 0, r : r + 8, c : c + 3] = 1.0
    return x * 2 - 1


class _Flat:
    """The exact denoiser of a finite set of 4x4 images, on (B, 1, 4, 4) tensors."""

    def __init__(self, points: torch.Tensor) -> None:
        self.schedule = DiscreteVP.from_preset("linear")
        self.den = EmpiricalData(points.flatten(1)).denoiser(self.schedule)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return self.den(x.flatten(1), t, **cond).view_as(x).to(x.dtype)


# --- corruptions ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(sda.CORRUPTIONS))
def test_corruption_is_seeded_pure_and_keeps_shape_and_range(name):
    x = _digits(6)
    x_copy = x.clone()
    a, b = sda.corrupt(x, name, 3, seed=1), sda.corrupt(x, name, 3, seed=1)
    assert torch.equal(a, b) and torch.equal(x, x_copy)  # deterministic, input untouched
    assert a.shape == x.shape and a.dtype == x.dtype and float(a.min()) >= -1 and float(a.max()) <= 1
    assert not torch.allclose(a, x, atol=1e-3)  # it does corrupt
    assert torch.equal(sda.corrupt(x[:2], name, 3, seed=1), a[:2])  # row b depends on (seed, b) only
    if name in ("gaussian_noise", "shot_noise", "impulse_noise", "motion_blur", "fog"):
        assert not torch.equal(sda.corrupt(x, name, 3, seed=2), a)


@pytest.mark.parametrize("name", list(sda.CORRUPTIONS))
def test_severity_increases_distance_to_clean(name):
    x = _digits(16)
    d = [float((sda.corrupt(x, name, s, seed=0) - x).abs().mean()) for s in range(1, 6)]
    assert all(b > a for a, b in zip(d, d[1:])), d


def test_corrupted_mnist_rejects_bad_arguments_before_loading():
    with pytest.raises(ValueError, match="unknown corruption 'snow'"):
        sda.corrupted_mnist("snow")
    with pytest.raises(ValueError, match="per_class must be an int in 1..50"):
        sda.corrupted_mnist("fog", 3, per_class=51)


def test_corruption_bad_inputs():
    x = _digits(2)
    with pytest.raises(ValueError, match="severity must be an int in 1..5, got 0"):
        sda.corrupt(x, "fog", 0)
    with pytest.raises(ValueError, match="unknown corruption 'rain'"):
        sda.corrupt(x, "rain")
    with pytest.raises(ValueError, match=r"in \[-1, 1\], got range"):
        sda.corrupt(x * 3, "fog")
    with pytest.raises(ValueError, match="float tensor"):
        sda.corrupt(x[0], "fog")


# --- low-pass operator ----------------------------------------------------------------------------------------
def test_lowpass_is_an_exact_projection_that_keeps_constants_and_block_means():
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    lp = sda.lowpass(x, 4)
    assert torch.allclose(sda.lowpass(lp, 4), lp, atol=1e-14)  # idempotent
    c = torch.full((2, 1, 28, 28), 0.3, dtype=torch.float64)
    assert torch.allclose(sda.lowpass(c, 4), c, atol=1e-15)
    assert torch.allclose(lp[..., :4, :4], x[..., :4, :4].mean(dim=(-1, -2), keepdim=True).expand(-1, -1, 4, 4))
    y = torch.randn_like(x)  # self-adjoint: <LP x, y> = <x, LP y>
    assert torch.allclose((lp * y).sum(), (x * sda.lowpass(y, 4)).sum())
    assert torch.equal(sda.lowpass(x, 1), x)
    with pytest.raises(ValueError, match="low-pass factor 5 must divide the image size 28x28"):
        sda.lowpass(x, 5)
    with pytest.raises(ValueError, match="positive int, got 0"):
        sda.lowpass(x, 0)


# --- the projection -------------------------------------------------------------------------------------------
def _toy():
    g = torch.Generator().manual_seed(0)
    points = torch.sign(torch.randn(12, 1, 4, 4, generator=g))  # 12 binary 4x4 "images"
    x_in = torch.sign(torch.randn(48, 1, 4, 4, generator=g)) * 0.9  # off the data set
    return _Flat(points), x_in


def test_projection_at_t_start_zero_returns_the_input():
    model, x = _toy()
    out = sda.project(model, x, sda.DDAConfig(t_start=0.0, lowpass=2))
    assert torch.equal(out, x)


def test_guidance_pulls_the_lowpass_of_the_result_toward_the_input():
    model, x = _toy()

    def lp_err(scale):
        cfg = sda.DDAConfig(t_start=0.6, steps=10, lowpass=2, scale=scale)
        out = sda.project(model, x, cfg, seed=3)
        return float((sda.lowpass(out, 2) - sda.lowpass(x, 2)).flatten(1).norm(dim=1).mean())

    free, guided = lp_err(0.0), lp_err(2.0)
    assert guided < 0.8 * free, (free, guided)


def test_projection_is_seeded_and_independent_of_batching():
    model, x = _toy()
    cfg = sda.DDAConfig(t_start=0.5, steps=4, lowpass=2, scale=0.5)
    a = sda.project(model, x[:8], cfg, seed=1, batch_size=3)
    assert torch.equal(a, sda.project(model, x[:8], cfg, seed=1, batch_size=8))
    assert not torch.equal(a, sda.project(model, x[:8], cfg, seed=2))
    assert float(a.abs().max()) <= 1.0


def test_projection_and_config_bad_inputs():
    model, x = _toy()
    with pytest.raises(ValueError, match="t_start must be in"):
        sda.DDAConfig(t_start=1.5)
    with pytest.raises(ValueError, match="scale must be finite and >= 0"):
        sda.DDAConfig(scale=-1.0)
    with pytest.raises(ValueError, match="unknown solver|unknown"):
        sda.DDAConfig(solver="nope")
    with pytest.raises(ValueError, match="must divide the image size 4x4"):
        sda.project(model, x, sda.DDAConfig(lowpass=3))
    with pytest.raises(ValueError, match="carries no .schedule"):
        sda.project(lambda x, t: x, x)
    with pytest.raises(ValueError, match="unknown DDAConfig field"):
        sda.DDAConfig.from_dict({"t0": 0.5})
    cfg = sda.DDAConfig(scale=3.0)
    assert sda.DDAConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# --- fine-tuning and the ensemble -----------------------------------------------------------------------------
def test_ensemble_of_identical_logits_keeps_the_prediction():
    a = torch.randn(20, 10)
    assert torch.equal(sda.ensemble_logits(a, a).argmax(1), a.argmax(1))
    b = torch.randn(20, 10)
    assert torch.equal(sda.ensemble_logits(a, b), a + b)
    with pytest.raises(ValueError, match="same shape"):
        sda.ensemble_logits(a, b[:, :5])


def test_finetune_fits_labels_and_leaves_the_source_untouched():
    torch.manual_seed(0)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(784, 2)).eval()
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    x = _digits(20, seed=1)
    y = torch.arange(20) % 2  # two classes
    ft = sda.finetune_classifier(clf, x, y, sda.FinetuneConfig(steps=60, batch_size=10, lr=0.05), seed=0)
    assert all(torch.equal(v, clf.state_dict()[k]) for k, v in before.items())
    assert not ft.training
    res = sda.evaluate(clf, ft, x, x, y)
    assert res["sda_finetuned"] == 1.0 and set(res) == {
        "source",
        "dda",
        "dda_ensemble",
        "sda_finetuned",
        "sda",
        "sda_ft_both",
    }
    assert res["source"] == res["dda"] == res["dda_ensemble"]  # x_proj = x: DDA changes nothing
    with pytest.raises(ValueError, match="labels must be int64"):
        sda.finetune_classifier(clf, x, y.float())
    with pytest.raises(ValueError, match="steps must be a positive int"):
        sda.FinetuneConfig(steps=0)
    with pytest.raises(ValueError, match="same N images"):
        sda.evaluate(clf, None, x, x[:3], y)


# --- command line ---------------------------------------------------------------------------------------------
def test_cli_eval_and_errors(tmp_path, capsys):
    x, y = _digits(10), torch.arange(10)
    data = tmp_path / "c.safetensors"
    sda._save_tensors(data, {"images": x, "labels": y}, {"corruption": "none"})
    clf = tmp_path / "clf.safetensors"
    save_mnist_classifier(MNISTClassifier(), clf)
    out = tmp_path / "r.json"
    args = ["eval", str(data), "--classifier", str(clf), "--proj-steps", "2", "--out", str(out)]
    assert sda.main(args) == 0
    res = json.loads(out.read_text())
    assert set(res["accuracy"]) >= {"source", "dda", "sda"} and res["projection"]["steps"] == 2
    assert sda.main(args) == 2 and "exists; pass --overwrite" in capsys.readouterr().err
    assert sda.main(["eval", str(tmp_path / "none.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = ["corrupt", "--corruption", "fog", "--severity", "9", "--out", str(tmp_path / "f.safetensors")]
    assert sda.main(bad) == 2
    assert "severity must be an int in 1..5" in capsys.readouterr().err
    assert sda.main(["finetune", "--out", str(tmp_path / "ft.txt")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    assert sda.main(["finetune", "--scale", "-1", "--out", str(tmp_path / "ft.safetensors")]) == 2
    assert "scale must be finite" in capsys.readouterr().err


def test_classifier_adapted_is_not_the_independent_evaluator():
    import inspect

    src = inspect.getsource(sda)
    assert "load_mnist_classifier_b" not in src and "evaluator_predictions" not in src
