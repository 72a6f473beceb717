"""Model files: shipped models load and sample; our own files round-trip; bad files fail clearly."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import dpmlab
from dpmlab.cli import main
from dpmlab.models import Denoiser
from dpmlab.models.hub import available_models, save_model, shipped_models
from dpmlab.models.mlp import MLPConfig
from dpmlab.models.nets import ModelSpec
from dpmlab.schedules import DiscreteVP

ASSETS = Path(dpmlab.__file__).parent / "assets"


def test_shipped_models_are_listed_small_and_carded():
    assert {"digits8", "mnist"} <= set(shipped_models()) <= set(available_models())
    assert "mnist_classifier" not in shipped_models()  # other assets are not diffusion models
    for name in ("digits8", "mnist"):
        assert (ASSETS / f"{name}.safetensors").stat().st_size < 4_200_000
        card = json.loads((ASSETS / f"{name}.json").read_text())
        for key in ("data", "recipe", "steps", "final_loss", "seed", "train_time_s", "parameters"):
            assert key in card, (name, key)
        assert card["steps"] == card["recipe"]["train"]["steps"]
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    if recipes.is_dir():  # the committed recipes are the ones the shipped models were trained with
        from dpmlab.training import load_recipe

        for name, file in (("digits8", "digits8.json"), ("mnist", "mnist_cond.json")):
            card = json.loads((ASSETS / f"{name}.json").read_text())
            assert load_recipe(recipes / file).to_dict() == card["recipe"], name


def test_digits8_loads_and_samples():
    model = dpmlab.load("digits8")
    assert isinstance(model, Denoiser) and isinstance(model.schedule, DiscreteVP)
    assert model.data_shape == (1, 8, 8) and not model.spec.class_names
    x = dpmlab.sample("digits8", n=4, solver="ddim", nfe=5, seed=0)
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()


def test_mnist_class_conditional_sampling_and_batches():
    model = dpmlab.load("mnist")
    assert model.data_shape == (1, 28, 28) and model.spec.class_names == tuple("0123456789")
    labels = torch.tensor([0, 3, 7, 10])  # 10 is the null class (classifier-free guidance)
    x = dpmlab.sample(model, n=4, solver="ddim", nfe=5, cond={"label": labels})
    assert x.shape == (4, 1, 28, 28) and torch.isfinite(x).all()
    xb = dpmlab.sample(model, n=4, solver="ddim", nfe=5, cond={"label": labels}, batch_size=2)
    torch.testing.assert_close(xb, x)  # per-sample labels follow the batches


def test_mnist_samples_show_the_requested_digit():
    from dpmlab.metrics import classifier_accuracy

    labels = torch.arange(40) % 10
    x = dpmlab.sample("mnist", n=40, solver="ddim", nfe=20, seed=1, cond={"label": labels})
    assert classifier_accuracy(x, labels) >= 0.85  # 0.98-0.99 at NFE 10-20 when shipped


def test_cli_sample_label_grid(tmp_path, capsys):
    out = tmp_path / "m.png"
    assert (
        main(["sample", "--model", "mnist", "--nfe", "3", "-n", "12", "--label", "grid", "--out", str(out), "-q"]) == 0
    )
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert (
        main(
            [
                "sample",
                "--model",
                "mnist",
                "--nfe",
                "3",
                "-n",
                "2",
                "--label",
                "7",
                "--out",
                str(out),
                "-q",
                "--overwrite",
            ]
        )
        == 0
    )
    assert (
        main(["sample", "--model", "mnist", "--nfe", "3", "-n", "2", "--label", "x", "--out", str(out), "--overwrite"])
        == 2
    )
    assert "unknown --label 'x'" in capsys.readouterr().err
    assert (
        main(
            ["sample", "--model", "digits8", "--nfe", "3", "-n", "2", "--label", "1", "--out", str(out), "--overwrite"]
        )
        == 2
    )
    assert "class-conditional" in capsys.readouterr().err


def _small(tmp_path, dtype=None):
    spec = ModelSpec(
        "mlp",
        MLPConfig(data_shape=(2,), width=16, depth=1, num_classes=2).to_dict(),
        "eps",
        data_shape=(2,),
        class_names=("a", "b"),
    )
    torch.manual_seed(0)
    net = spec.build_net()
    path = save_model(tmp_path / "model.safetensors", net, spec, dtype=dtype, card={"note": "test"})
    return spec, net, path


def test_our_files_round_trip_by_file_and_folder(tmp_path):
    spec, net, path = _small(tmp_path)
    for ref in (path, tmp_path, str(tmp_path)):
        model = dpmlab.load(ref)
        assert model.spec == spec and model.data_shape == (2,)
        for k, v in net.state_dict().items():
            assert torch.equal(model.net.state_dict()[k], v)
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["note"] == "test" and card["spec"] == spec.to_dict()
    _, _, half = _small(tmp_path / "fp16", dtype=torch.float16)
    m16 = dpmlab.load(half)
    assert next(m16.net.parameters()).dtype == torch.float32  # stored fp16, computed in fp32


def test_corrupt_and_mismatched_files_fail_clearly(tmp_path):
    spec, net, path = _small(tmp_path)
    data = path.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated.safetensors: not a readable safetensors file"):
        dpmlab.load(bad)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="junk.safetensors: not a readable"):
        dpmlab.load(junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="foreign.safetensors: not a dpmlab model"):
        dpmlab.load(foreign)
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    meta = {"format": "dpmlab.model/1", "spec": json.dumps(spec.to_dict())}
    missing = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in sd.items() if k != "out.bias"}, str(missing), metadata=meta)
    with pytest.raises(ValueError, match=r"missing.safetensors: weights do not match the network: missing \['out"):
        dpmlab.load(missing)
    shaped = tmp_path / "shape.safetensors"
    save_file({**sd, "out.bias": torch.zeros(3)}, str(shaped), metadata=meta)
    with pytest.raises(ValueError, match=r"shape.safetensors: tensor 'out.bias' has shape \(3,\)"):
        dpmlab.load(shaped)
    badspec = tmp_path / "badspec.safetensors"
    save_file(sd, str(badspec), metadata={**meta, "spec": "{not json"})
    with pytest.raises(ValueError, match="badspec.safetensors: bad model spec"):
        dpmlab.load(badspec)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds neither model.safetensors nor checkpoint.safetensors"):
        dpmlab.load(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        dpmlab.load("nope")


def test_a_diffusers_pipeline_folder_without_vae_loads_and_samples_from_the_cli(tmp_path, capsys):
    """``dpmlab.load`` / ``dpmlab sample --model`` on a DDPM/DDIM pipeline folder (unet/ + scheduler/, no vae):
    the pixel-space Denoiser of ``interop.diffusers.load_diffusers_folder``, not the Stable Diffusion loader."""
    import diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    model = dpmlab.load(str(tmp_path / "pipe"))
    assert tuple(model.data_shape) == (1, 8, 8)
    x = dpmlab.sample(model, 2, solver="ddim", nfe=3)
    assert x.shape == (2, 1, 8, 8) and bool(torch.isfinite(x).all())
    out = tmp_path / "s.png"
    assert main(["sample", "--model", str(tmp_path / "pipe"), "-n", "4", "--nfe", "3", "--out", str(out), "-q"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
