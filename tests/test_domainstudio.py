"""DomainStudio (dpmlab.methods.domainstudio): the Haar transform (perfect reconstruction, energy, closed-form 2x2
bands, HF of a constant = 0), the pairwise-similarity KL (0 iff equal rows, positive otherwise, permutation
invariant, gradient only to the adapted side, a naive double loop), the objective's terms (0 at adapted == source,
switched off by zero weights, the loss is their weighted sum, the source stays frozen), the target domain and
shots, the recipe end to end from the command line, and bad settings."""

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from dpmlab.cli import main
from dpmlab.methods import MethodRecipe, load, load_recipe
from dpmlab.methods.domainstudio import (
    DomainStudio,
    DomainStudioModel,
    DomainStudioObjective,
    haar,
    haar_inverse,
    high_frequency,
    pairwise_similarity_kl,
    shot_indices,
    to_domain,
)
from dpmlab.training.data import Dataset

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/methods/domainstudio_mnist.json"
PLAIN = ROOT / "recipes/methods/domainstudio_mnist_plain.json"


def _data(n: int = 40) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 28, 28, generator=g) * 2 - 1
    return Dataset("synthetic", x, torch.arange(n) % 10, tuple(str(i) for i in range(10)))


def _objective(**settings: object) -> DomainStudioObjective:
    d = load_recipe(RECIPE).to_dict()
    d["method"].update(settings)
    return DomainStudioObjective(MethodRecipe.from_dict(d), _data())


def test_haar_perfect_reconstruction_energy_and_closed_form():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 8, 6, generator=g, dtype=torch.float64)
    bands = haar(x)
    assert all(b.shape == (3, 2, 4, 3) for b in bands)
    torch.testing.assert_close(haar_inverse(*bands), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(sum(b.square().sum() for b in bands), x.square().sum(), rtol=1e-12, atol=0)
    a, b, c, d = 1.0, 2.0, 4.0, 8.0  # one 2x2 block [[a, b], [c, d]]
    ll, lh, hl, hh = (float(v) for v in haar(torch.tensor([[[[a, b], [c, d]]]], dtype=torch.float64)))
    assert (ll, lh, hl, hh) == pytest.approx(
        ((a + b + c + d) / 2, (b - a + d - c) / 2, (c + d - a - b) / 2, (a - b - c + d) / 2), abs=1e-12
    )
    const = torch.full((2, 1, 6, 6), 0.7, dtype=torch.float64)
    assert float(high_frequency(const).abs().max()) < 1e-12
    assert float(high_frequency(x).abs().max()) > 0.1
    with pytest.raises(ValueError, match="even H and W"):
        haar(torch.zeros(1, 1, 5, 4))


def test_similarity_kl_zero_iff_equal_positive_otherwise_and_permutation_invariant():
    g = torch.Generator().manual_seed(1)
    src = torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    ad = src + 0.5 * torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    assert float(pairwise_similarity_kl(src, src.clone())) == pytest.approx(0.0, abs=1e-15)
    assert float(pairwise_similarity_kl(src, 3.0 * src)) == pytest.approx(0.0, abs=1e-15)  # cosine: scale-free
    v = float(pairwise_similarity_kl(src, ad))
    assert v > 1e-4
    perm = torch.randperm(6, generator=g)
    assert float(pairwise_similarity_kl(src[perm], ad[perm])) == pytest.approx(v, rel=1e-12)
    # a naive double loop: mean over the m(m-1) entries of p log(p / q), p from the source
    f = lambda z: torch.nn.functional.normalize(z.flatten(1), dim=1)  # noqa: E731
    cs, ca = f(src) @ f(src).T, f(ad) @ f(ad).T
    total = 0.0
    for i in range(6):
        js = [j for j in range(6) if j != i]
        p, q = torch.softmax(cs[i, js], 0), torch.softmax(ca[i, js], 0)
        total += float((p * (p / q).log()).sum())
    assert v == pytest.approx(total / 30, rel=1e-10)
    src.requires_grad_(True)
    ad.requires_grad_(True)
    pairwise_similarity_kl(src, ad).backward()
    assert src.grad is None and float(ad.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="m >= 3"):
        pairwise_similarity_kl(src[:2], ad[:2])


def test_terms_zero_at_source_positive_after_change_and_switched_off_by_weights():
    obj = _objective(sim_size=0)
    g = torch.Generator().manual_seed(2)
    batch = obj.draw(torch.arange(6), g)
    with torch.no_grad():
        t0 = obj.terms(obj.module, batch)
    assert float(t0["img"]) == pytest.approx(0.0, abs=1e-9) and float(t0["hf"]) == pytest.approx(0.0, abs=1e-9)
    assert float(t0["simple"]) > 0 and float(t0["hfmse"]) > 0
    with torch.no_grad():  # move the adapted network away from the source
        for p in obj.module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    with torch.no_grad():
        t1 = obj.terms(obj.module, batch)
    assert float(t1["img"]) > 1e-6 and float(t1["hf"]) > 1e-6
    s = obj.settings
    loss = obj.loss(obj.module, batch)
    want = t1["simple"] + s.pair_weight * t1["img"] + s.hf_pair_weight * t1["hf"] + s.hf_mse_weight * t1["hfmse"]
    torch.testing.assert_close(loss, want)
    # the source is frozen and untouched; its x̂0 differs from the perturbed adapted model's
    assert not any(p.requires_grad for p in obj.source.parameters())
    plain = _objective(pair_weight=0.0, hf_pair_weight=0.0, hf_mse_weight=0.0)
    plain.module.load_state_dict(obj.module.state_dict())
    tp = plain.terms(plain.module, batch)
    assert all(float(tp[k]) == 0.0 for k in ("img", "hf", "hfmse"))
    torch.testing.assert_close(plain.loss(plain.module, batch), t1["simple"])
    only_hf = _objective(pair_weight=0.0, hf_pair_weight=0.0)
    with torch.no_grad():
        to = only_hf.terms(obj.module, batch)
    assert (
        float(to["img"]) == 0.0
        and float(to["hf"]) == 0.0
        and float(to["hfmse"]) == pytest.approx(float(t1["hfmse"]), rel=1e-5)
    )


def test_domain_and_shots_are_deterministic():
    x = _data().x
    bold = to_domain(x, "bold")
    assert bool((bold >= x).all()) and float((bold > 0).float().mean()) > float((x > 0).float().mean())
    torch.testing.assert_close(to_domain(x, "inverted"), -x)
    labels = torch.arange(100) % 10
    a, b = shot_indices(labels, 100, 10, 3), shot_indices(labels, 100, 10, 3)
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 10
    assert shot_indices(labels, 100, 10, 4).tolist() != a.tolist()
    assert set(labels[shot_indices(labels, 100, 5, 0, label=7)].tolist()) == {7}
    with pytest.raises(ValueError, match="shots must be in"):
        shot_indices(labels, 100, 11, 0, label=7)


def test_recipe_runs_from_the_command_line_and_the_model_samples(tmp_path):
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--recipe",
            str(RECIPE),
            "--out",
            str(out),
            "--quiet",
            "--set",
            "train.steps=3",
            "--set",
            "train.batch_size=4",
            "--set",
            "train.checkpoint_every=3",
        ]
    )
    assert rc == 0
    card = json.loads((out / "model.json").read_text())
    assert card["method"]["name"] == "domainstudio" and card["method"]["settings"]["pair_weight"] == 4.0
    model = load(out)
    assert isinstance(model, DomainStudioModel) and model.settings.domain == "bold"
    x = model.sample(3, solver="ddim", nfe=2, seed=0)
    assert x.shape == (3, 1, 28, 28) and bool(torch.isfinite(x).all())
    base = load_recipe(PLAIN)
    assert base.settings.plain and not load_recipe(RECIPE).settings.plain
    with pytest.raises(ValueError, match="sets cond itself"):
        model.sample(2, cond={"label": torch.zeros(2)})


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"domain": "sketch"}, "unknown DomainStudio domain 'sketch'"),
        ({"sim_size": 2}, "sim_size must be 0"),
        ({"pair_weight": -1.0}, "pair_weight must be a finite number >= 0"),
        ({"hf_mse_weight": math.inf}, "hf_mse_weight must be a finite number >= 0"),
        ({"shots": 0}, "shots must be an int >= 1"),
        ({"label": -1}, "label must be None or a class index"),
        ({"temperature": 1.0}, "unknown DomainStudio method fields: temperature"),
    ],
)
def test_bad_settings_raise(settings, match):
    with pytest.raises(ValueError, match=match):
        DomainStudio.from_dict(settings)


def test_bad_objective_inputs_raise():
    with pytest.raises(ValueError, match="label must be in"):
        _objective(label=10)
    obj = _objective(sim_size=5)
    batch = obj.draw(torch.arange(4), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="need a batch of >= max"):
        obj.loss(obj.module, batch)


T2I_RECIPE = ROOT / "recipes/methods/domainstudio_mnist_t2i.json"


def test_t2i_variant_terms_dreambooth_switch_and_round_trip(tmp_path):
    from dpmlab.methods import train_recipe
    from dpmlab.methods.domainstudio import DomainStudioT2IModel, DomainStudioT2IObjective

    d = load_recipe(T2I_RECIPE).to_dict()
    d["method"].update(class_images=2, class_nfe=1)
    d["train"].update(steps=2, batch_size=3, checkpoint_every=2)
    recipe = MethodRecipe.from_dict(d)
    obj = DomainStudioT2IObjective(recipe, _data())
    assert obj.shots.shape == (10, 1, 32, 32) and obj.z_class.shape == (2, 4, 8, 8)
    batch = obj.draw(torch.arange(3), torch.Generator().manual_seed(0))
    with torch.no_grad():
        t0 = obj.terms(obj.module, batch)
    assert float(t0["img"]) < 1e-6 and float(t0["hf"]) < 1e-6  # adapted == source
    assert all(float(t0[k]) > 0 for k in ("simple", "prior", "hfmse"))
    s = obj.settings
    want = (
        t0["simple"]
        + s.prior_weight * t0["prior"]
        + s.pair_weight * t0["img"]
        + s.hf_pair_weight * t0["hf"]
        + s.hf_mse_weight * t0["hfmse"]
    )
    with torch.no_grad():
        torch.testing.assert_close(obj.loss(obj.module, batch), want)
    dream = copy.copy(obj)  # the same objective with the DomainStudio weights 0: DreamBooth
    dream.settings = dataclasses.replace(s, pair_weight=0.0, hf_pair_weight=0.0, hf_mse_weight=0.0)
    with torch.no_grad():
        td = dream.terms(dream.module, batch)
        torch.testing.assert_close(td["simple"] + td["prior"], t0["simple"] + t0["prior"])
    assert all(float(td[k]) == 0.0 for k in ("img", "hf", "hfmse"))
    train_recipe(recipe, tmp_path / "run", dataset=_data(), progress=False)
    model = load(tmp_path / "run")
    assert isinstance(model, DomainStudioT2IModel)
    x = model.sample(2, solver="ddim", nfe=2, seed=0)
    assert x.shape == (2, 1, 32, 32) and bool(torch.isfinite(x).all())
    d["method"].update(instance_prompt="a sks digit")
    with pytest.raises(ValueError, match="is not in the tokenizer's vocabulary"):
        DomainStudioT2IObjective(MethodRecipe.from_dict(d), _data())
