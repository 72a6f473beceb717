"""SpeedUpNet (dpmlab.methods.speedupnet): the fresh adapter (W' = W, gamma = 0) is the base UNet bit for bit,
with or without a negative prompt; only the adapter trains; save -> load -> install into a second UNet with the
same cross-attention shapes (and a clear error for other shapes); the MSC target and loss against the analytic
constant-x0 teacher; a few optimiser steps lower the distillation loss on mnist_t2i; the recipe trains through
``fit`` and ``dpmlab.methods.load`` samples the student; bad settings raise."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import dpmlab
from dpmlab.methods import MethodRecipe, load, load_recipe
from dpmlab.methods.speedupnet import (
    SpeedUpNet,
    SpeedUpNetAdapter,
    SpeedUpNetDenoiser,
    SpeedUpNetModel,
    SpeedUpNetObjective,
    cross_attention_layers,
    install,
    load_adapter,
    msc_loss,
    save_adapter,
    teacher_segment,
    uninstall,
)
from dpmlab.solvers import get
from dpmlab.training.data import Dataset
from dpmlab.training.trainer import TrainConfig, fit

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def tiny_unet(seed: int = 0, cross: int = 16):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=cross,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()


def run_unet(unet, states, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=states).sample


@pytest.fixture(scope="module")
def t2i():
    return dpmlab.load("mnist_t2i")


def test_fresh_adapter_is_the_base_unet_bit_for_bit():
    unet = tiny_unet()
    pos, neg = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    ref = run_unet(unet, pos)
    adapter = install(unet, SpeedUpNetAdapter.for_unet(unet, 5))
    assert torch.equal(run_unet(unet, pos), ref)  # positive only: the plain layer
    assert torch.equal(run_unet(unet, torch.cat([pos, neg], 1)), ref)  # gamma = 0: the offset vanishes
    with torch.no_grad():
        for layer in adapter.layers:
            layer.gamma.fill_(0.5)
    moved = run_unet(unet, torch.cat([pos, neg], 1))
    assert (moved - ref).abs().max() > 1e-3  # a non-zero gain acts
    assert torch.allclose(run_unet(unet, torch.cat([pos, pos], 1)), ref, atol=1e-5)  # negative = positive: no offset
    uninstall(unet)
    assert torch.equal(run_unet(unet, pos), ref)
    with pytest.raises(ValueError, match="text states of 5"):
        install(unet, adapter)
        run_unet(unet, torch.randn(2, 7, 16))


def test_only_the_adapter_trains_and_its_gradient_flows():
    unet = tiny_unet()
    adapter = install(unet, SpeedUpNetAdapter.for_unet(unet, 5))
    assert not any(p.requires_grad for p in unet.parameters())
    assert all(p.requires_grad for p in adapter.parameters())
    assert not set(map(id, adapter.parameters())) & set(map(id, unet.parameters()))  # not inside the UNet
    assert not any("to_k" in k and "layers" in k for k in unet.state_dict())
    x = torch.randn(2, 4, 8, 8)
    out = unet(x, torch.tensor([10, 500]), encoder_hidden_states=torch.randn(2, 10, 16)).sample
    out.square().mean().backward()
    assert all(p.grad is None for p in unet.parameters())
    assert all(float(layer.gamma.grad.abs().sum()) > 0 for layer in adapter.layers)
    assert set(cross_attention_layers(unet)) == set(adapter.names) and len(adapter.names) == 4  # down, mid, up x2
    warm = SpeedUpNetAdapter.for_unet(unet, 5, gain=2.0)  # the recipe's start: attention-space guidance
    assert all(torch.equal(la.gamma, torch.full_like(la.gamma, 2.0)) for la in warm.layers)
    assert torch.equal(warm.layers[0].to_k.weight, unet.get_submodule(warm.names[0]).to_k.weight)


def test_save_load_and_plug_into_another_unet(tmp_path):
    unet_a, unet_b = tiny_unet(0), tiny_unet(1)
    adapter = SpeedUpNetAdapter.for_unet(unet_a, 5)
    with torch.no_grad():
        for layer in adapter.layers:
            layer.gamma.normal_()
    path = save_adapter(tmp_path / "sun.safetensors", adapter, SpeedUpNet(guidance=3.0), {"note": "test"})
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["method"]["name"] == "speedupnet" and card["note"] == "test"
    back = load_adapter(path)
    assert back.names == adapter.names and back.context_length == 5
    for k, v in adapter.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    states = torch.cat([torch.randn(2, 5, 16), torch.randn(2, 5, 16)], 1)
    install(unet_b, path)  # plug-and-play: weights differ, shapes agree
    plugged = run_unet(unet_b, states)
    unet_c = tiny_unet(1)
    install(unet_c, adapter)
    assert torch.equal(plugged, run_unet(unet_c, states))  # the file carries the whole adapter
    with pytest.raises(ValueError, match="does not fit this UNet"):
        install(tiny_unet(0, cross=32), path)
    with pytest.raises(ValueError, match="not a SpeedUpNet adapter"):
        from dpmlab.models.hub import write_safetensors

        write_safetensors(tmp_path / "other.safetensors", {"w": torch.zeros(1)}, {"format": "x"})
        load_adapter(tmp_path / "other.safetensors")


def test_msc_target_and_loss_against_the_constant_x0_teacher(t2i):
    sch = t2i.schedule
    c = torch.randn(1, 4, 8, 8)

    def const(x, t, **cond):  # x0 = c: the probability-flow ODE has the closed-form solution below
        return c.expand_as(x)

    x = torch.randn(3, 4, 8, 8)
    ts = torch.tensor([0.8, 0.6, 0.45, 0.3], dtype=torch.float64)
    target = teacher_segment(const, sch, x, ts, get("dpm_solver_pp"), {})
    s, e = ts[:1], ts[-1:]
    h = sch.lam(e) - sch.lam(s)
    exact = float(sch.sigma(e) / sch.sigma(s)) * x + float(sch.alpha(e) * -torch.expm1(-h)) * c
    assert torch.allclose(target, exact, atol=1e-5)
    # a student whose DDIM step uses x0 = c + delta: loss = delta^2 in x0 units
    delta = 0.3
    x_next = get("ddim").step  # noqa: F841 (the solver's own step is used below through teacher_segment)
    student = teacher_segment(lambda x, t, **k: (c + delta).expand_as(x), sch, x, ts[[0, -1]], get("ddim"), {})
    assert msc_loss(student, target, sch, 0.8, 0.3).item() == pytest.approx(delta**2, rel=1e-4)
    assert msc_loss(exact, target, sch, 0.8, 0.3).item() < 1e-8
    with pytest.raises(ValueError, match="t_next must be below t"):
        msc_loss(exact, target, sch, 0.3, 0.8)


def small_recipe(**train):
    s = SpeedUpNet(teacher_steps=4, student_steps=2, guidance=5.0, negatives=("", "bold"))
    cfg = {
        "steps": 3,
        "batch_size": 4,
        "lr": 1e-2,
        "warmup": 0,
        "ema_decay": 0.0,
        "checkpoint_every": 3,
        "log_every": 1,
        **train,
    }
    return MethodRecipe(name="sun_test", method="speedupnet", settings=s, train=TrainConfig(**cfg))


def small_data():
    from dpmlab.metrics.features import mnist_5k

    d = mnist_5k()
    return Dataset("mnist", d.images[:40], d.labels[:40], tuple(str(i) for i in range(10)))


def test_a_few_steps_lower_the_distillation_loss():
    obj = SpeedUpNetObjective(small_recipe(), small_data())
    batch = obj.draw(torch.arange(4), torch.Generator().manual_seed(3))
    batch["segment"] = torch.zeros(4, dtype=torch.int64)  # the first interval: the largest CFG effect
    opt = torch.optim.Adam([p for p in obj.module.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(8):
        loss = obj.loss(obj.module, batch)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.8 * losses[0], losses
    assert not any(p.requires_grad for p in obj.model.unet.parameters())


def test_recipe_trains_exports_and_samples(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "methods" / "speedupnet_mnist_t2i.json")
    assert recipe.settings == SpeedUpNet(gain_init=2.0) and recipe.method == "speedupnet"
    res = fit(
        SpeedUpNetObjective(small_recipe(steps=2), small_data()),
        TrainConfig(steps=2, batch_size=2, lr=1e-3, warmup=0, ema_decay=0.0, checkpoint_every=2, log_every=1),
        tmp_path,
        progress=False,
    )
    assert res.step == 2 and (tmp_path / "model.safetensors").stat().st_size < 400_000
    model = load(tmp_path)
    assert isinstance(model, SpeedUpNetModel) and isinstance(model.denoiser, SpeedUpNetDenoiser)
    z = model.sample(2, prompt="a seven", negative_prompt="bold", nfe=2, seed=0)
    assert z.shape == (2, 4, 8, 8) and torch.isfinite(z).all()
    assert torch.equal(load_adapter(tmp_path).state_dict()["layers.0.gamma"], model.adapter.layers[0].gamma)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"teacher_steps": 10, "student_steps": 4}, "must be a multiple"),
        ({"teacher_steps": 4, "student_steps": 4}, "must be a multiple"),
        ({"student_steps": 0}, "student_steps must be a positive int"),
        ({"guidance": 0.5}, "guidance must be >= 1"),
        ({"grid": "leading"}, "continuous named grid"),
        ({"teacher_solver": "ddpm"}, "must be deterministic"),
        ({"negatives": ()}, "non-empty list"),
    ],
)
def test_bad_settings_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        SpeedUpNet(**kw)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="unknown SpeedUpNet method fields: foo"):
        SpeedUpNet.from_dict({"foo": 1})
    with pytest.raises(ValueError, match="context_length must be a positive int"):
        SpeedUpNetAdapter({"a": (4, 4, 1)}, 0)
    with pytest.raises(ValueError, match="draws its prompts from labelled MNIST"):
        SpeedUpNetObjective(small_recipe(), Dataset("toy", torch.zeros(4, 2), None, ()))
    r = small_recipe()
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        SpeedUpNetObjective(
            dataclasses.replace(r, settings=SpeedUpNet(teacher_steps=4, student_steps=2, negatives=("purple",))),
            small_data(),
        )
