"""LD-Pruner (dpmlab.methods.ld_pruner): an identity-equivalent block scores 0 while the others do not;
pruning k operators removes exactly those (parameters, state dict, outputs = the bypassed network); the pruned
model runs under every registered solver; save/load through safetensors + a JSON card listing the pruned
operators; the objective (scores -> prune -> fine-tune with distillation) from a recipe on the CLI; the same
operators / bypass / prune on a diffusers UNet2DConditionModel, and its fine-tune on captioned-MNIST latents (a tiny
diffusers folder as the base): export -> reload -> identical UNet outputs, TextToImage sampling, distillation."""

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

import dpmlab
from dpmlab.cli import main
from dpmlab.methods import MethodRecipe, load
from dpmlab.methods.ld_pruner import (
    LDPrunedModel,
    LDPruner,
    LDPrunerObjective,
    Pruned,
    bypassed,
    latent_score,
    lowest,
    operators,
    parameter_count,
    prune,
    save_pruned,
    score_operators,
)
from dpmlab.models.hub import save_model
from dpmlab.models.nets import ModelSpec
from dpmlab.solvers import available, get
from dpmlab.training.data import Dataset

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
NET = {
    "image_size": 8,
    "in_channels": 1,
    "model_channels": 8,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "num_heads": 2,
    "groups": 4,
    "num_classes": 3,
}


def tiny_model(zero=(), classes=3):
    """A small class-conditional v-prediction UNet with perturbed weights (no block is the identity), except
    the blocks in ``zero``, whose output convolution is zeroed: they compute exactly their input."""
    spec = ModelSpec(
        "unet",
        {**NET, "num_classes": classes},
        "v",
        "linear",
        (1, 8, 8),
        class_names=tuple(str(i) for i in range(classes)),
    )
    torch.manual_seed(0)
    net = spec.build_net()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
        blocks = dict(zip(net.down_names, net.down)) | dict(zip(net.up_names, net.up))
        blocks |= {f"mid.{i}": m for i, m in enumerate(net.mid)}
        for name in zero:
            out = blocks[name].proj if hasattr(blocks[name], "proj") else blocks[name].conv2
            out.weight.zero_()
            out.bias.zero_()
    net.eval().requires_grad_(False)
    den = spec.denoiser(net)
    den.spec = spec
    return den, spec


def test_identity_equivalent_block_scores_zero_and_is_chosen_first():
    den, _ = tiny_model(zero=("mid.1", "down.0.res0"))
    cond = {"label": torch.arange(12) % 3}
    scores = score_operators(den, cond, 12, nfe=4)
    assert list(scores) == operators(den.net)
    assert scores["mid.1"] == 0.0 and scores["down.0.res0"] == 0.0
    assert min(v for k, v in scores.items() if k not in ("mid.1", "down.0.res0")) > 1e-3
    assert sorted(lowest(scores, 2)) == ["down.0.res0", "mid.1"]
    with pytest.raises(ValueError, match=r"k must be in \[0, 7\]"):
        lowest(scores, 8)


def test_latent_score_is_the_mean_and_std_shift():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(500, 3, 2, generator=g, dtype=torch.float64)
    assert latent_score(ref, ref[torch.randperm(500, generator=g)]) == pytest.approx(0.0, abs=1e-12)  # order-blind
    shifted = ref + torch.tensor([3.0, 0.0, 4.0]).reshape(3, 1).double()  # mean shift of norm 5 (two columns)
    assert latent_score(ref, shifted) == pytest.approx(5 * 2**0.5, rel=1e-12)
    assert latent_score(ref, 2 * ref) == pytest.approx(float(ref.mean(0).norm() + ref.std(0).norm()), rel=1e-12)
    with pytest.raises(ValueError, match="one shape"):
        latent_score(ref, ref[:10])


def test_pruning_removes_exactly_those_blocks():
    den, _ = tiny_model()
    net = den.net
    names = ["down.1.attn0", "mid.2"]
    pruned = prune(copy.deepcopy(net), names)
    blocks = {"down.1.attn0": net.down[net.down_names.index("down.1.attn0")], "mid.2": net.mid[2]}
    assert parameter_count(net) - parameter_count(pruned) == sum(parameter_count(b) for b in blocks.values())
    removed = set(net.state_dict()) - set(pruned.state_dict())
    i = net.down_names.index("down.1.attn0")  # its slot in net.down
    assert removed == {k for k in net.state_dict() if k.startswith((f"down.{i}.", "mid.2."))}
    assert set(pruned.state_dict()) <= set(net.state_dict())
    for k, v in pruned.state_dict().items():  # the kept weights are kept
        assert torch.equal(v, net.state_dict()[k])
    assert isinstance(pruned.mid[2], Pruned) and operators(pruned) == operators(net)
    x, t, lab = torch.randn(4, 1, 8, 8), torch.tensor([3.0, 100.0, 500.0, 900.0]), torch.tensor([0, 1, 2, 3])
    with bypassed(net, names):
        expect = net(x, t, label=lab)
    assert torch.equal(pruned(x, t, label=lab), expect)
    assert not torch.equal(net(x, t, label=lab), expect)
    with pytest.raises(ValueError, match="unknown or unprunable operators down.1.res0"):
        prune(copy.deepcopy(net), ["down.1.res0"])  # 8 -> 16 channels: not shape-preserving


def _nfe_for(name):
    slv = get(name)
    return slv, slv.nfe_for_steps(4, True)  # the default grid ends at sigma = 0


def test_pruned_model_runs_under_every_solver():
    den, spec = tiny_model()
    pruned = spec.denoiser(prune(copy.deepcopy(den.net), ["mid.1", "up.1.attn0"]))
    ran, skipped = [], []
    for name in available():
        try:
            slv, nfe = _nfe_for(name)
        except (TypeError, ValueError):  # needs a fitted artifact or a base solver: not constructible bare
            skipped.append(name)
            continue
        x = dpmlab.sample(pruned, 3, solver=slv, nfe=nfe, grid="uniform_time", cond={"label": torch.arange(3)})
        assert x.shape == (3, 1, 8, 8) and bool(torch.isfinite(x).all()), name
        ran.append(name)
    assert {"ddim", "ddpm", "heun", "dpm_solver_pp", "unipc", "deis", "pndm", "euler"} <= set(ran), (ran, skipped)
    assert len(skipped) <= 4, skipped


def test_save_and_load_the_pruned_model(tmp_path):
    den, spec = tiny_model()
    names = ["down.0.res0", "up.1.attn1"]
    net = prune(copy.deepcopy(den.net), names)
    info = {"name": "ld_pruner", "spec": spec.to_dict(), "pruned": names, "scores": {"down.0.res0": 0.1}}
    path = save_pruned(tmp_path / "pruned", net, info, {"name": "tiny"})
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["pruned"] == names and card["method"]["name"] == "ld_pruner"
    model = load(tmp_path / "pruned")
    assert isinstance(model, LDPrunedModel) and model.pruned == tuple(names)
    assert parameter_count(model.denoiser.net) == parameter_count(net) < parameter_count(den.net)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.7], dtype=torch.float64)
    torch.testing.assert_close(
        model.denoiser(x, t, label=torch.tensor([0, 2])),
        spec.denoiser(net)(x, t, label=torch.tensor([0, 2])),
        rtol=0,
        atol=0,
    )
    assert model.sample(2, solver="ddim", nfe=3, cond={"label": torch.tensor([1, 1])}).shape == (2, 1, 8, 8)


def _base_file(tmp_path):
    den, spec = tiny_model()
    return save_model(tmp_path / "base.safetensors", den.net, spec)


def test_distillation_term_vanishes_without_pruning(tmp_path):
    base = _base_file(tmp_path)
    ds = Dataset("toy", torch.rand(16, 1, 8, 8) * 2 - 1, torch.arange(16) % 3, ("a", "b", "c"))
    objs = [
        LDPrunerObjective(
            MethodRecipe("x", "ld_pruner", LDPruner(base=str(base), k=0, prune=(), seeds=1, nfe=2, distill=d)), ds
        )
        for d in (0.0, 1.0)
    ]
    batch = objs[0].draw(torch.arange(8), torch.Generator().manual_seed(0))
    assert torch.equal(objs[0].loss(objs[0].module, batch), objs[1].loss(objs[1].module, batch))
    pruned = LDPrunerObjective(
        MethodRecipe("x", "ld_pruner", LDPruner(base=str(base), k=1, prune=("mid.1",), distill=1.0)), ds
    )
    nodist = LDPrunerObjective(
        MethodRecipe("x", "ld_pruner", LDPruner(base=str(base), k=1, prune=("mid.1",), distill=0.0)), ds
    )
    with torch.no_grad():
        assert float(pruned.loss(pruned.module, batch)) > float(nodist.loss(nodist.module, batch))


def test_recipe_scores_prunes_and_fine_tunes_from_the_cli(tmp_path):
    den, spec = tiny_model(classes=10)  # scikit-learn's 8x8 digits: 10 classes
    base = save_model(tmp_path / "base.safetensors", den.net, spec)
    recipe = {
        "name": "ldp",
        "method": {"name": "ld_pruner", "base": str(base), "k": 2, "seeds": 1, "nfe": 3},
        "data": {"name": "digits8"},
        "train": {"steps": 2, "batch_size": 8, "lr": 1e-4, "warmup": 0, "log_every": 1, "checkpoint_every": 1},
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recipe))
    out = tmp_path / "run"
    assert main(["train", "--recipe", str(path), "--out", str(out), "--quiet"]) == 0
    card = json.loads((out / "model.json").read_text())
    scores = card["method"]["scores"]
    assert card["pruned"] == lowest(scores, 2) and list(scores) == operators(den.net)
    assert card["method"]["parameters"]["after"] < card["method"]["parameters"]["before"]
    model = load(out)
    assert isinstance(model, LDPrunedModel) and list(model.pruned) == card["pruned"]
    assert model.sample(2, solver="unipc", nfe=4, cond={"label": torch.tensor([0, 9])}).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="prune lists 1 operators but k=2"):
        LDPruner(k=2, prune=("mid.1",))
    with pytest.raises(ValueError, match="'ddpm' is stochastic"):
        LDPruner(solver="ddpm")


def tiny_diffusers_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=4,
        attention_head_dim=2,
    )
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet.eval()


def test_diffusers_unet_operators_bypass_and_prune():
    unet = tiny_diffusers_unet()
    ops = operators(unet)
    assert ops == [
        "down_blocks.0.resnets.0",
        "down_blocks.0.attentions.0",
        "mid_block.resnets.0",
        "mid_block.attentions.0",
        "mid_block.resnets.1",
        "up_blocks.1.attentions.0",
        "up_blocks.1.attentions.1",
    ]
    x, t, e = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 3, 8)
    names = ["down_blocks.0.attentions.0", "mid_block.resnets.1"]
    with torch.no_grad():
        full = unet(x, t, encoder_hidden_states=e).sample
        with bypassed(unet, names):
            bypass = unet(x, t, encoder_hidden_states=e).sample
        assert torch.equal(unet(x, t, encoder_hidden_states=e).sample, full)  # hooks removed on exit
        pruned = prune(copy.deepcopy(unet), names)
        assert torch.equal(pruned(x, t, encoder_hidden_states=e).sample, bypass)
        assert not torch.equal(bypass, full)
    removed = sum(parameter_count(unet.get_submodule(n)) for n in names)
    assert parameter_count(unet) - parameter_count(pruned) == removed
    # an identity-equivalent transformer block (zero output projection): bypassing it changes nothing
    with torch.no_grad():
        proj = unet.get_submodule("up_blocks.1.attentions.1").proj_out
        proj.weight.zero_()
        proj.bias.zero_()
        ref = unet(x, t, encoder_hidden_states=e).sample
        with bypassed(unet, ["up_blocks.1.attentions.1"]):
            torch.testing.assert_close(unet(x, t, encoder_hidden_states=e).sample, ref, rtol=0, atol=1e-6)


# --- text-to-image base: the pruned UNet2DConditionModel fine-tuned on captioned MNIST latents ---------------
@pytest.fixture(scope="module")
def t2i_folder(tmp_path_factory):
    """A tiny diffusers-format text-to-image folder (the shipped model's layout and schedule, tiny networks)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    from dpmlab.training.captions import CONTEXT_LENGTH, VOCAB, build_tokenizer
    from dpmlab.training.t2i import SCHEDULE

    root = tmp_path_factory.mktemp("t2i") / "tiny_t2i"
    torch.manual_seed(1)
    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(4, 4, 4),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=2,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(VOCAB),
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=CONTEXT_LENGTH,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    for name, m in (("unet", tiny_diffusers_unet()), ("vae", vae), ("text_encoder", text)):
        m.save_pretrained(str(root / name), safe_serialization=True)
    build_tokenizer(root / "tokenizer")
    DPMSolverMultistepScheduler(**SCHEDULE, prediction_type="v_prediction").save_pretrained(str(root / "scheduler"))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root


def _t2i_recipe(folder, **settings):
    from dpmlab.training import DataConfig, TrainConfig

    tc = TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup=0, ema_decay=0.0, log_every=1, checkpoint_every=1)
    return MethodRecipe(
        "ldp_t2i",
        "ld_pruner",
        LDPruner(base=str(folder), seeds=1, nfe=2, **settings),
        data=DataConfig(name="mnist"),
        train=tc,
    )


def test_t2i_objective_fine_tunes_and_exports_a_reloadable_pruned_text_to_image(tmp_path, t2i_folder):
    from dpmlab.models.t2i import TextToImage
    from dpmlab.training import fit, load_data

    recipe = _t2i_recipe(t2i_folder, k=2, prune=("down_blocks.0.attentions.0", "mid_block.resnets.1"))
    obj = LDPrunerObjective(recipe, load_data(recipe.data))
    assert len(obj) == 4500  # the captioned-MNIST training split (mnist_5k_split)
    base = dpmlab.load(t2i_folder)
    untrained = copy.deepcopy(obj.module)
    res = fit(obj, recipe.train, tmp_path / "run", progress=False)
    assert res.step == 2 and bool(torch.isfinite(torch.tensor(res.final_loss)))
    model = load(tmp_path / "run")
    assert isinstance(model, LDPrunedModel) and isinstance(model.denoiser, TextToImage)
    assert model.pruned == ("down_blocks.0.attentions.0", "mid_block.resnets.1")
    card = json.loads((tmp_path / "run" / "model.json").read_text())
    assert card["pruned"] == list(model.pruned) and card["method"]["base"] == str(t2i_folder.resolve())
    unet = model.denoiser.unet
    assert isinstance(unet.get_submodule("mid_block.resnets.1"), Pruned)
    assert parameter_count(unet) == parameter_count(obj.module) == card["method"]["parameters"]["after"]
    assert card["method"]["parameters"]["after"] < card["method"]["parameters"]["before"] == parameter_count(base.unet)
    x, t, e = torch.randn(3, 4, 8, 8), torch.tensor([10, 400, 900]), torch.randn(3, 10, 8)
    with torch.no_grad():
        got = unet(x, t, encoder_hidden_states=e).sample
        want = obj.module.eval()(x, t, encoder_hidden_states=e).sample
        before = untrained.eval()(x, t, encoder_hidden_states=e).sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # the EMA at decay 0 = the trained module
    assert (got - before).abs().max() > 1e-3  # ... which training changed
    # the TextToImage API: prompts, classifier-free guidance, decoding
    z = model.sample(2, solver="ddim", nfe=2, cond={"prompt": ["a seven", "a bold one"]})
    zg = dpmlab.sample(model.denoiser.guided(3.0), 2, solver="dpm_solver_pp", nfe=3, cond={"prompt": "a two"})
    assert z.shape == zg.shape == (2, 4, 8, 8) and model.denoiser.decode(zg).shape == (2, 1, 32, 32)


def test_t2i_distillation_term_vanishes_without_pruning(t2i_folder):
    from dpmlab.training import load_data

    ds = load_data(_t2i_recipe(t2i_folder, k=0).data)
    obj = LDPrunerObjective(_t2i_recipe(t2i_folder, k=0), ds)
    batch = obj.draw(torch.arange(6), torch.Generator().manual_seed(0))
    assert set(batch) >= {"caption", "t", "eps"} and obj.scores == {}  # k = 0: nothing scored or pruned
    with torch.no_grad():
        with_kd = obj.loss(obj.module, batch)
        obj.settings = dataclasses.replace(obj.settings, distill=0.0)
        assert torch.equal(obj.loss(obj.module, batch), with_kd)
        pruned = LDPrunerObjective(_t2i_recipe(t2i_folder, k=1, prune=("mid_block.resnets.1",)), ds)
        task = float(pruned.loss(pruned.module, batch))
        pruned.settings = dataclasses.replace(pruned.settings, distill=0.0)
        assert task > float(pruned.loss(pruned.module, batch))
    with pytest.raises(ValueError, match="set data.name to 'mnist'"):
        LDPrunerObjective(_t2i_recipe(t2i_folder, k=0), Dataset("toy", torch.zeros(4, 1, 8, 8)))


def test_t2i_recipe_scores_prunes_and_fine_tunes_from_the_cli(tmp_path, t2i_folder):
    recipe = json.loads((ROOT / "recipes" / "methods" / "ld_pruner_mnist_t2i.json").read_text())
    recipe["method"].update(base=str(t2i_folder), seeds=1, nfe=2)
    recipe["train"].update(steps=2, batch_size=4, checkpoint_every=1, log_every=1)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recipe))
    assert main(["train", "--recipe", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    card = json.loads((tmp_path / "run" / "model.json").read_text())
    scores = card["method"]["scores"]
    assert list(scores) == operators(tiny_diffusers_unet()) and card["pruned"] == lowest(scores, 2)
    assert list(load(tmp_path / "run").pruned) == card["pruned"]
