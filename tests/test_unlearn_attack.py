"""UnlearnDiffAtk and ESD (dpmlab.apps.unlearn_attack): exact simplex projection, relaxed prompts equal real ones
at vertices, the ESD target, erasure touching only its parameters, the attack's words and limits, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import dpmlab
from dpmlab.apps import unlearn_attack as ua


@pytest.fixture(scope="module")
def model():
    return dpmlab.load("mnist_t2i")


@pytest.fixture(scope="module")
def sevens(model):
    return ua.target_latents(model, 7, 24)


def _bisection(v: torch.Tensor) -> torch.Tensor:
    """Independent oracle: the projection max(v - theta, 0) with sum 1, theta found by bisection in float64."""
    v = v.double()
    lo, hi = float(v.min()) - 1.0, float(v.max())
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float((v - mid).clamp_min(0).sum()) > 1 else (lo, mid)
    return (v - (lo + hi) / 2).clamp_min(0)


def test_project_simplex_exact():
    cases = {
        (0.5, 0.5): (0.5, 0.5),
        (2.0, 0.0): (1.0, 0.0),
        (0.0, 0.0, 0.0): (1 / 3, 1 / 3, 1 / 3),
        (1.0, 0.5, -1.0): (0.75, 0.25, 0.0),
        (5.0,): (1.0,),
        (0.2, 0.3, 0.5): (0.2, 0.3, 0.5),
    }
    for v, want in cases.items():
        torch.testing.assert_close(
            ua.project_simplex(torch.tensor(v, dtype=torch.float64)), torch.tensor(want, dtype=torch.float64)
        )
    v = 3 * torch.randn(50, 18, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p = ua.project_simplex(v)
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(50, dtype=torch.float64))
    torch.testing.assert_close(ua.project_simplex(p), p)  # idempotent
    torch.testing.assert_close(p, torch.stack([_bisection(r) for r in v]), atol=1e-9, rtol=0)
    q = ua.project_simplex(torch.rand(50, 18, dtype=torch.float64))  # other simplex points are farther
    assert ((v - p).norm(dim=-1) <= (v - q).norm(dim=-1) + 1e-12).all()


def test_relaxed_vertices_are_the_real_prompt(model):
    words, ids = ua.allowed_words(model)
    assert "<|endoftext|>" not in words and "<unk>" not in words and len(words) == 18
    picks = ["bold", "left", "slanted"]
    w = F.one_hot(torch.tensor([words.index(p) for p in picks]), len(words)).float()
    got = ua.prompt_states(model, w, ids, "a seven")
    torch.testing.assert_close(got, model.encode_prompt("bold left slanted a seven", 1), atol=1e-6, rtol=0)
    # an interior point is not a vertex: the states differ, and depend on the weights differentiably
    w2 = torch.full_like(w, 1 / len(words)).requires_grad_(True)
    s = ua.prompt_states(model, w2, ids, "a seven")
    assert (s - got).abs().max() > 1e-3
    s.sum().backward()
    assert w2.grad is not None and w2.grad.abs().sum() > 0


def test_esd_target_and_eps_from_v(model):
    e0, ec = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])
    torch.testing.assert_close(ua.esd_target(e0, ec, 1.0), torch.tensor([-1.0, 3.0]))
    torch.testing.assert_close(ua.esd_target(e0, ec, 0.5), torch.tensor([0.0, 2.5]))
    torch.testing.assert_close(ua.esd_target(e0, ec, 0.0), e0)
    # the v-model's eps at (x, t) is sigma x + alpha v (VP schedule)
    x, t = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.full((3,), 0.4)
    st = model.encode_prompt("a seven", 3)
    v = model.unet(x, model.net_time(t.double()).float(), encoder_hidden_states=st).sample
    a, s = float(model.schedule.alpha(torch.tensor(0.4))), float(model.schedule.sigma(torch.tensor(0.4)))
    torch.testing.assert_close(ua.eps_prediction(model, x, t, st), s * x + a * v, atol=1e-5, rtol=1e-5)


def _esd_loss(model, erased, x, t, eta=1.0):
    c, u = model.encode_prompt("seven", len(x)), model.encode_prompt("", len(x))
    with torch.no_grad():
        target = ua.esd_target(ua.eps_prediction(model, x, t, u), ua.eps_prediction(model, x, t, c), eta)
        return float(F.mse_loss(ua.eps_prediction(erased, x, t, c), target))


def test_erase_lowers_loss_and_touches_only_cross_attention(model, sevens, tmp_path):
    base_state = {k: v.clone() for k, v in model.unet.state_dict().items()}
    cfg = ua.ESDConfig(concept="seven", steps=8, lr=3e-3, batch_size=4, sample_steps=4, seed=0)
    erased, losses = ua.erase(model, cfg)
    assert len(losses) == 8
    g = torch.Generator().manual_seed(2)
    t = torch.rand(24, generator=g, dtype=torch.float64) * 0.8 + 0.1
    x = model.schedule.add_noise(sevens, torch.randn(sevens.shape, generator=g), t)
    assert _esd_loss(model, erased, x, t) < 0.8 * _esd_loss(model, model, x, t)
    names = set(ua.trainable_names(model.unet, "xattn"))
    assert names and all(".attn2." in n for n in names)
    new = erased.unet.state_dict()
    for k, v in model.unet.state_dict().items():
        torch.testing.assert_close(v, base_state[k])  # the base model is untouched
        if k not in names:
            torch.testing.assert_close(new[k], v)
    assert any(not torch.equal(new[k], base_state[k]) for k in names)
    # ESD-u trains the other side
    assert not set(ua.trainable_names(model.unet, "noxattn")) & names
    # save / load round trip applies exactly the changed tensors
    path = ua.save_erased(tmp_path / "esd.safetensors", erased, model, cfg)
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["format"] == ua.ESD_FORMAT and card["tensors"] == len(names) and card["esd"]["method"] == "xattn"
    loaded = ua.load_erased(path, model)
    for k, v in loaded.unet.state_dict().items():
        torch.testing.assert_close(v, new[k], atol=0, rtol=0)


def test_attack_finds_the_concept_word_and_respects_limits(model, sevens):
    zeros = ua.target_latents(model, 0, 24)
    cfg = ua.AttackConfig(k=1, steps=8, batch_size=8, seed=0)
    assert ua.attack(model, "a", sevens, cfg).words == ("seven",)
    assert ua.attack(model, "a", zeros, cfg).words == ("zero",)
    words, _ = ua.allowed_words(model)
    res = ua.attack(
        model, "a seven", sevens, ua.AttackConfig(k=6, steps=2, forbid=("seven",), relaxation="straight_through")
    )
    assert len(res.words) == 6 and set(res.words) <= set(words) and "seven" not in res.words
    assert res.prompt.endswith(" a seven") and len(model.tokenizer(res.prompt).input_ids) <= 10
    model.check_prompt(res.prompt)
    torch.testing.assert_close(res.weights.sum(-1), torch.ones(6))
    assert (res.weights >= 0).all() and len(res.allowed) == 17
    r = ua.random_prefix(model, 3, "a seven", forbid=("seven",), seed=1)
    assert len(r.split()) == 5 and "seven" not in r.split()[:3]


def test_straight_through_estimator():
    w = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], requires_grad=True)
    out = ua._STERandSelect.apply(w, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, w.detach())  # vertices draw themselves
    (out * torch.tensor([[3.0, -0.5, -2.0], [0.1, 0.0, 0.0]])).sum().backward()
    torch.testing.assert_close(w.grad, torch.tensor([[1.0, -0.5, -1.0], [0.1, 0.0, 0.0]]))


def test_bad_inputs(model, sevens, tmp_path):
    with pytest.raises(ValueError, match="unknown ESD train method 'bogus'"):
        ua.ESDConfig(method="bogus")
    with pytest.raises(ValueError, match="need k >= 1"):
        ua.AttackConfig(k=0)
    with pytest.raises(ValueError, match="unknown relaxation"):
        ua.AttackConfig(relaxation="softmax")
    with pytest.raises(ValueError, match="exceed the text encoder's context of 10; use k <= 6"):
        ua.attack(model, "a seven", sevens, ua.AttackConfig(k=7, steps=1))
    with pytest.raises(ValueError, match="not in the vocabulary"):
        ua.attack(model, "a seven", sevens, ua.AttackConfig(forbid=("banana",), steps=1))
    with pytest.raises(ValueError, match="targets must be latents"):
        ua.attack(model, "a seven", torch.zeros(2, 1, 32, 32), ua.AttackConfig(steps=1))
    with pytest.raises(ValueError, match="'banana' of prompt"):
        ua.attack(model, "a banana", sevens, ua.AttackConfig(steps=1))
    with pytest.raises(ValueError, match="non-finite"):
        ua.project_simplex(torch.tensor([1.0, float("nan")]))
    bogus = tmp_path / "x.safetensors"
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(bogus), metadata={"format": "other"})
    with pytest.raises(ValueError, match="not an ESD weights file"):
        ua.load_erased(bogus, model)
    out = tmp_path / "r.json"
    out.write_text("{}")
    assert ua.main(["attack", "--out", str(out), "--quiet"]) == 2  # exists, no --overwrite
    assert ua.main(["generate", "--prompt", "a seven", "--out", str(tmp_path / "g.jpg")]) == 2
    assert ua.main(["attack", "--erased", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "n.json")]) == 2
