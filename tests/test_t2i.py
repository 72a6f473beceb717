"""The shipped text-to-image model ``mnist_t2i`` (Stable Diffusion's classes): loads offline in dpmlab and in
diffusers' own pipelines, follows prompts (judged by the independent MNIST classifier), clear errors."""

import dataclasses
import json
import shutil
import socket
from importlib import resources
from pathlib import Path

import pytest
import torch

import dpmlab
from dpmlab.cli import main
from dpmlab.metrics.features import MNISTFeatures
from dpmlab.models.guidance import with_cond
from dpmlab.models.t2i import TextToImage
from dpmlab.training.captions import captioned_mnist

ROOT = Path(__file__).resolve().parents[1]
FOLDER = Path(str(resources.files("dpmlab") / "assets" / "mnist_t2i"))


@pytest.fixture(scope="module")
def model():
    m = dpmlab.load("mnist_t2i")
    assert isinstance(m, TextToImage)
    return m


@pytest.fixture()
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_folder_is_a_safetensors_only_diffusers_folder():
    index = json.loads((FOLDER / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for comp in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (FOLDER / comp).is_dir() and index[comp][0] in ("diffusers", "transformers")
    files = [p for p in FOLDER.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert sum(p.stat().st_size for p in files) < 12e6
    card = json.loads((FOLDER / "model_card.json").read_text())
    assert set(card["stages"]) == {"clip", "vae", "unet"}
    assert "mnist_t2i" in dpmlab.models.hub.shipped_models()


def test_stable_diffusion_pipeline_loads_offline_and_runs_a_dpmlab_solver(no_network):
    from diffusers import StableDiffusionPipeline

    from dpmlab.interop.diffusers import DPMLabScheduler

    pipe = StableDiffusionPipeline.from_pretrained(str(FOLDER), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a bold seven",
        negative_prompt="slanted",
        num_inference_steps=5,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        num_images_per_prompt=2,
    ).images
    assert out.shape == (2, 32, 32, 1) and bool(torch.isfinite(torch.as_tensor(out)).all())
    pipe.scheduler = DPMLabScheduler.from_config(pipe.scheduler.config, solver="dpm_solver_pp")
    out = pipe(
        ["a three", "a thin one"],
        num_inference_steps=6,
        guidance_scale=3.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (2, 1, 32, 32) and bool(torch.isfinite(out).all())
    assert float(out.std()) > 0.1  # not a blank picture


def test_diffusers_pipelines_draw_the_prompted_digit(no_network):
    """txt2img, img2img (from another digit) and inpainting in diffusers' own code, judged by the classifier."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(FOLDER), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    clf = MNISTFeatures()
    gen = torch.Generator().manual_seed(0)
    x = pipe(
        ["a seven"] * 6 + ["a two"] * 6, num_inference_steps=15, guidance_scale=5.0, output_type="pt", generator=gen
    ).images
    want = torch.tensor([7] * 6 + [2] * 6)
    assert float((clf.logits(x[..., 2:30, 2:30] * 2 - 1).argmax(1) == want).float().mean()) >= 0.75

    data = captioned_mnist()
    ones = data.images[data.val_idx][data.attrs[data.val_idx, 0] == 1][:6]  # held-out "1"s, in [-1, 1]
    i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    x = i2i(
        ["a eight"] * 6,
        image=ones / 2 + 0.5,
        strength=0.9,
        num_inference_steps=20,
        guidance_scale=5.0,
        output_type="pt",
        generator=gen,
    ).images
    assert float((clf.logits(x[..., 2:30, 2:30] * 2 - 1).argmax(1) == 8).float().mean()) >= 0.5

    inp = StableDiffusionInpaintPipeline(**pipe.components)
    inp.set_progress_bar_config(disable=True)
    mask = torch.ones(6, 1, 32, 32)  # repaint everything but a border: the prompt decides the digit
    mask[..., :2, :] = mask[..., -2:, :] = 0
    x = inp(
        ["a zero"] * 6,
        image=ones / 2 + 0.5,
        mask_image=mask,
        num_inference_steps=20,
        guidance_scale=5.0,
        output_type="pt",
        generator=gen,
        height=32,
        width=32,
    ).images
    assert x.shape == (6, 1, 32, 32)
    assert float((clf.logits(x[..., 2:30, 2:30] * 2 - 1).argmax(1) == 0).float().mean()) >= 0.5


def test_dpmlab_sampling_follows_the_prompt(model):
    """The shipped MNIST classifier (an independent network) recognises the prompted digit."""
    prompts = [f"a {w}" for w in ("zero", "one", "three", "four", "six", "seven", "eight", "nine") for _ in range(4)]
    z = dpmlab.sample(model.guided(3.0), len(prompts), solver="dpm_solver_pp", nfe=10, seed=0, cond={"prompt": prompts})
    assert z.shape == (32, 4, 8, 8)
    x = model.decode(z)
    pred = MNISTFeatures().logits(x[..., 2:30, 2:30]).argmax(1)
    want = torch.tensor([0, 1, 3, 4, 6, 7, 8, 9]).repeat_interleave(4)
    assert float((pred == want).float().mean()) >= 0.8


def test_per_sample_prompts_follow_batches_and_guidance_uses_the_negative_prompt(model):
    prompts = ["a two", "a five", "a bold nine", "a digit"]
    a = dpmlab.sample(model, 4, solver="ddim", nfe=4, seed=1, cond={"prompt": prompts})
    b = dpmlab.sample(model, 4, solver="ddim", nfe=4, seed=1, cond={"prompt": prompts}, batch_size=3)
    assert torch.allclose(a, b, atol=1e-5)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor(0.5)
    c = model(x, t, prompt="a seven")
    for neg in ("", "bold"):
        u = with_cond(model, prompt=neg)(x, t, prompt="a seven")
        guided = model.guided(4.0, negative_prompt=neg)(x, t, prompt="a seven")  # one UNet call of twice the batch:
        assert torch.allclose(guided, u + 4.0 * (c - u), atol=1e-4)  # batch rounding (measured <= 4e-6); a wrong
        # negative prompt moves it by > 1e-2 (the assertion below)
    assert not torch.allclose(with_cond(model, prompt="bold")(x, t, prompt="a seven"), model(x, t, prompt=""))
    states = model.encode_prompt(["a seven", "a seven"])
    assert torch.equal(model(x, t, encoder_hidden_states=states), c)
    assert torch.equal(model(x, t), model(x, t, prompt=""))  # no conditioning: the unconditional model


def test_vae_round_trip_on_held_out_digits(model):
    data = captioned_mnist()
    x = data.images[data.val_idx[:64]]
    rec = model.decode(model.encode(x))
    psnr = 10 * torch.log10(4.0 / (rec - x).square().flatten(1).mean(1))
    assert float(psnr.mean()) > 18.0
    card = json.loads((FOLDER / "model_card.json").read_text())
    assert card["stages"]["vae"]["scaling_factor"] == pytest.approx(model.scaling_factor)


def test_clip_score_prefers_the_true_caption():
    from dpmlab.metrics.clip import clip_score, load_clip

    clip = load_clip()
    data = captioned_mnist()
    idx = data.val_idx[:100]
    true = [c for i, c in enumerate(data.full_captions()) if i in set(idx.tolist())]
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    wrong = [f"a {words[(int(d) + 3) % 10]}" for d in data.attrs[idx, 0]]
    s_true, s_wrong = clip_score(data.images[idx], true, clip), clip_score(data.images[idx], wrong, clip)
    assert float((s_true > s_wrong).float().mean()) > 0.9
    with pytest.raises(ValueError, match="prompts for"):
        clip_score(data.images[idx], ["a one"], clip)


def test_bad_prompts_get_clear_errors(model):
    with pytest.raises(
        ValueError,
        match=r"word 'cat' of prompt 'a bold cat' is not in the tokenizer's vocabulary; "
        r"allowed: a, bold, ",
    ):
        model.encode_prompt("a bold cat")
    with pytest.raises(ValueError, match="has 12 tokens; the text encoder's context holds 10"):
        model.encode_prompt("a bold thin left right slanted upright seven eight nine")
    with pytest.raises(ValueError, match="got 2 prompts for a batch of 3"):
        model(torch.randn(3, 4, 8, 8), 0.5, prompt=["a one", "a two"])
    with pytest.raises(ValueError, match="not both"):
        model(torch.randn(1, 4, 8, 8), 0.5, prompt="a one", encoder_hidden_states=model.encode_prompt("a one"))
    with pytest.raises(ValueError, match=r"latents must be \(N, 4, 8, 8\)"):
        model.decode(torch.randn(1, 4, 4, 4))


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_missing_or_corrupt_component_folder(tmp_path, damage):
    bad = tmp_path / "sd"
    shutil.copytree(FOLDER, bad)
    if damage == "missing":
        shutil.rmtree(bad / "vae")
        msg = r"component folder vae/ is missing"
    else:
        w = bad / "unet" / "diffusion_pytorch_model.safetensors"
        w.write_bytes(w.read_bytes()[:1000])
        msg = r"unet: cannot load"
    with pytest.raises(ValueError, match=msg):
        dpmlab.load(bad)
    with pytest.raises(ValueError, match="no model_index.json"):
        dpmlab.models.t2i.load_text_to_image(tmp_path)


def test_cli_prompt_to_picture(tmp_path, capsys):
    out = tmp_path / "sevens.png"
    assert (
        main(
            [
                "sample",
                "--model",
                "mnist_t2i",
                "--prompt",
                "a bold seven",
                "--negative-prompt",
                "slanted",
                "--guidance",
                "5",
                "--solver",
                "dpm_solver_pp",
                "--nfe",
                "10",
                "-n",
                "4",
                "--out",
                str(out),
                "--raw",
                str(out.with_suffix(".npz")),
                "-q",
            ]
        )
        == 0
    )
    assert out.is_file() and out.stat().st_size > 1000
    raw = dict(__import__("numpy").load(out.with_suffix(".npz")))
    assert raw["samples"].shape == (4, 1, 32, 32)  # decoded pixels, not latents
    for argv, msg in [
        (["--model", "mnist", "--prompt", "a seven"], "need a text-to-image model"),
        (["--model", "mnist_t2i", "--prompt", "a seven", "--negative-prompt", "bold"], "give --guidance other"),
        (["--model", "mnist_t2i", "--prompt", "a zebra", "--guidance", "3"], "'zebra'"),
        (["--model", "mnist_t2i", "--label", "7"], "takes --prompt"),
    ]:
        assert main(["sample", *argv, "--nfe", "4", "-n", "2", "--out", str(tmp_path / "x.png"), "-q"]) != 0
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_t2i_recipe_trains_every_stage_and_assembles_a_loadable_folder(tmp_path, no_network):
    """A few steps of each stage on tiny configs: the one trainer runs all three objectives."""
    from diffusers import StableDiffusionPipeline

    from dpmlab.training.t2i import assemble, load_t2i_recipe, train_t2i

    r = load_t2i_recipe(ROOT / "recipes" / "t2i" / "mnist_t2i.json")
    tiny = {
        "clip": {
            "text": {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2},
            "vision": {
                "patch_size": 8,
                "hidden_size": 16,
                "intermediate_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
            },
            "projection_dim": 16,
        },
        "vae": {**r.vae, "block_out_channels": [8, 8, 8], "norm_num_groups": 4},
        "unet": {**r.unet, "block_out_channels": [8, 16, 16], "norm_num_groups": 4, "attention_head_dim": 4},
    }
    steps = {
        k: dataclasses.replace(getattr(r, k), steps=3, batch_size=8, checkpoint_every=2, warmup=1, log_every=1)
        for k in ("train_clip", "train_vae", "train_unet")
    }
    r = dataclasses.replace(r, **tiny, **steps)
    res = train_t2i(r, tmp_path / "run", progress=False)
    assert {k: v.step for k, v in res.items()} == {"clip": 3, "vae": 3, "unet": 3}
    assert train_t2i(r, tmp_path / "run", progress=False) == {}  # exported stages are not retrained
    folder = assemble(tmp_path / "run", tmp_path / "folder", r)
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a seven", num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 1)
    assert isinstance(dpmlab.load(folder), TextToImage)


def test_guidance_is_one_unet_call_of_twice_the_batch_and_equals_two_calls(model):
    """``guided`` evaluates the negative and the positive prompts in one UNet call (as diffusers' pipelines;
    two calls cost 1.3-1.5x on CPU) and equals the two-call classifier-free guidance up to batch rounding."""
    from dpmlab.models.guidance import classifier_free

    calls = []
    hook = model.unet.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        g = model.guided(4.0, "slanted")
        two = classifier_free(model, with_cond(model, prompt="slanted"), 4.0)
        cond = {"prompt": ["a seven", "a bold one", "a two"]}
        a = dpmlab.sample(g, 3, solver="dpm_solver_pp", nfe=6, cond=cond)
        assert calls == [6] * 6  # one call per evaluation, negative and positive stacked
        b = dpmlab.sample(two, 3, solver="dpm_solver_pp", nfe=6, cond=cond)
        assert calls[6:] == [3] * 12
    finally:
        hook.remove()
    assert float((a - b).abs().max()) < 1e-4  # measured <= 9e-6
    assert float((a - dpmlab.sample(model, 3, solver="dpm_solver_pp", nfe=6, cond=cond)).abs().max()) > 1e-2
