"""Training: losses fall, resume after a stop or a SIGKILL is bit-exact, two processes equal one, CLI; ``fit``
with a custom objective (frozen sub-module, export, refused resume)."""

import dataclasses
import inspect
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import dpmlab
from dpmlab.cli import main
from dpmlab.models.nets import ModelSpec
from dpmlab.training import DiffusionObjective, Recipe, TrainConfig, TrainObjective, fit, load_recipe, make_loss, train
from dpmlab.training.data import Dataset
from dpmlab.training.trainer import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "name": "tiny",
    "data": {"name": "digits8"},  # replaced by the in-memory data set below
    "model": {
        "net": "unet",
        "objective": "eps",
        "schedule": "linear",
        "net_config": {
            "image_size": 8,
            "model_channels": 8,
            "channel_mult": [1, 2],
            "num_res_blocks": 1,
            "num_heads": 2,
            "groups": 4,
            "num_classes": 3,
        },
    },
    "train": {
        "steps": 12,
        "batch_size": 8,
        "lr": 1e-3,
        "warmup": 3,
        "lr_decay": "cosine",
        "ema_decay": 0.9,
        "label_dropout": 0.25,
        "checkpoint_every": 4,
        "log_every": 2,
        "seed": 3,
    },
    "export_dtype": "float32",
}


def tiny_data():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(20, 1, 8, 8, generator=g) * 2 - 1
    return Dataset("tiny", x, torch.arange(20) % 3, ("a", "b", "c"))


def _state(out):
    tensors, meta = read_checkpoint(Path(out) / "checkpoint.safetensors")
    return tensors, meta


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    res = train(Recipe.from_dict(TINY), out, dataset=tiny_data(), progress=False)
    assert res.step == 12 and not res.stopped
    return out, res


def _assert_same(a, b):
    ta, ma = a
    tb, mb = b
    assert set(ta) == set(tb)
    for k in ta:
        if k != "rng/torch":
            assert torch.equal(ta[k], tb[k]), k
    assert ma["step"] == mb["step"] and ma["losses"] == mb["losses"]


@pytest.mark.parametrize("objective,schedule", [("eps", "linear"), ("x0", "cosine"), ("edm", "linear")])
def test_loss_falls_on_toy_data(tmp_path, objective, schedule):
    r = Recipe.from_dict(
        {
            "name": f"moons-{objective}",
            "data": {"name": "moons", "n": 2000, "conditional": False},
            "model": {
                "net": "mlp",
                "objective": objective,
                "schedule": schedule,
                "net_config": {
                    "data_shape": [2],
                    "width": 64,
                    "depth": 2,
                    "time_scale": 1.0 if schedule == "linear" or objective == "edm" else 1000.0,
                },
            },
            "train": {
                "steps": 120,
                "batch_size": 128,
                "lr": 3e-3,
                "warmup": 10,
                "log_every": 20,
                "checkpoint_every": 1000,
                "ema_decay": 0.9,
            },
        }
    )
    res = train(r, tmp_path, progress=False)
    first, last = res.losses[0][1], min(v for _, v in res.losses[-2:])
    assert last < 0.8 * first, res.losses
    model = dpmlab.load(tmp_path)
    x = dpmlab.sample(model, n=200, solver="ddim", nfe=10, seed=0)
    assert x.shape == (200, 2) and torch.isfinite(x).all()
    card = json.loads((tmp_path / "model.json").read_text())
    assert card["steps"] == 120 and card["final_loss"] == res.final_loss and card["parameters"] > 0


@pytest.mark.parametrize("objective,schedule", [("eps", "linear"), ("x0", "cosine"), ("v", "linear_vp")])
def test_loss_targets_agree_with_the_denoiser(objective, schedule):
    """Each target's loss is a fixed weighting of the x0 error of the Denoiser built on the same net:
    x0: 1, eps: alpha^2 / sigma^2, v (VP): 1 / sigma^2 — so training and sampling agree."""
    spec = ModelSpec(
        "mlp",
        {"data_shape": [2], "width": 16, "depth": 1, "time_scale": 3.0},
        objective,
        schedule=schedule,
        data_shape=(2,),
    )
    torch.manual_seed(0)
    net = spec.build_net().double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    loss = make_loss(spec)
    g = torch.Generator().manual_seed(0)
    t = loss.draw(g, 64)
    x0, eps = torch.randn(64, 2, dtype=torch.float64), torch.randn(64, 2, dtype=torch.float64)
    per_sample = loss(net, x0, t, eps)
    sch = spec.make_schedule()
    a, s = sch.alpha(t), sch.sigma(t)
    x0_hat = spec.denoiser(net)(a[:, None] * x0 + s[:, None] * eps, t)
    weight = {"x0": torch.ones_like(t), "eps": a**2 / s**2, "v": 1 / s**2}[objective]
    torch.testing.assert_close(per_sample, weight * (x0_hat - x0).square().mean(1))


def test_resume_after_stop_is_bit_exact(tmp_path, reference):
    ref_out, ref = reference
    recipe = Recipe.from_dict(TINY)
    res = train(recipe, tmp_path, dataset=tiny_data(), progress=False, callback=lambda s, loss: s == 7)
    assert res.stopped and res.step == 7
    assert _state(tmp_path)[1]["step"] == 4  # the last checkpoint before the stop
    with pytest.raises(ValueError, match="exists; pass resume=True"):
        train(recipe, tmp_path, dataset=tiny_data(), progress=False)
    res2 = train(recipe, tmp_path, resume=True, dataset=tiny_data(), progress=False)
    assert res2.step == 12 and res2.losses == ref.losses
    _assert_same(_state(tmp_path), _state(ref_out))


def test_sigkill_while_writing_a_checkpoint_keeps_the_last_good_one(tmp_path, reference):
    ref_out, _ = reference
    script = inspect.getsource(tiny_data) + textwrap.dedent(f"""
        import os, signal, json
        import safetensors.torch
        from pathlib import Path
        real = safetensors.torch.save_file
        calls = []

        def dying_save(tensors, path, metadata=None):
            calls.append(path)
            real(tensors, path, metadata=metadata)
            if len(calls) == 2:  # second checkpoint: half-written temp file, then killed
                Path(path).write_bytes(Path(path).read_bytes()[:1000])
                os.kill(os.getpid(), signal.SIGKILL)

        safetensors.torch.save_file = dying_save
        train(Recipe.from_dict(json.loads({json.dumps(json.dumps(TINY))})), {str(tmp_path)!r},
              dataset=tiny_data(), progress=False)
    """)
    prelude = (
        "import torch\ntorch.set_num_threads(1)\nfrom dpmlab.training import Recipe, train\n"
        "from dpmlab.training.data import Dataset\n"
    )
    proc = subprocess.run([sys.executable, "-c", prelude + script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert _state(tmp_path)[1]["step"] == 4  # the first checkpoint survived intact
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".checkpoint")]  # the torn temp file
    train(Recipe.from_dict(TINY), tmp_path, resume=True, dataset=tiny_data(), progress=False)
    _assert_same(_state(tmp_path), _state(ref_out))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, recipe, out):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        ACCELERATE_USE_CPU="yes",
        GLOO_SOCKET_IFNAME="lo",
    )
    torch.set_num_threads(1)
    train(Recipe.from_dict(recipe), out, dataset=tiny_data(), progress=False)
    torch.distributed.destroy_process_group()


def test_two_processes_equal_one(tmp_path, reference):
    pytest.importorskip("accelerate")
    import torch.multiprocessing as mp

    recipe = {**TINY, "train": {**TINY["train"], "steps": 3, "checkpoint_every": 3}}
    one = train(Recipe.from_dict(recipe), tmp_path / "one", dataset=tiny_data(), progress=False)
    assert one.step == 3
    mp.start_processes(_worker, args=(2, _free_port(), recipe, tmp_path / "two"), nprocs=2, start_method="fork")
    (t1, m1), (t2, m2) = _state(tmp_path / "one"), _state(tmp_path / "two")
    assert m2["world_size"] == 2 and m1["world_size"] == 1
    moved = 0.0
    for k in t1:
        if k.startswith(("model/", "ema/", "optim/")):
            torch.testing.assert_close(t2[k], t1[k], atol=1e-6, rtol=1e-5, msg=k)
            if k.startswith("model/"):
                moved = max(moved, float((t1[k] - t1[k.replace("model/", "ema/")]).abs().max()))
    assert moved > 1e-4  # the weights did move: the comparison is not vacuous


def test_cli_train_from_flags_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "train",
        "--data",
        "rings",
        "--steps",
        "30",
        "--batch-size",
        "64",
        "--out",
        str(out),
        "-q",
        "--checkpoint-every",
        "10",
        "--set",
        "model.net_config.width=32",
        "--set",
        "train.log_every=10",
    ]
    assert main(args) == 0
    card = json.loads((out / "model.json").read_text())
    assert card["spec"]["net"] == "mlp" and card["spec"]["class_names"] == ["inner", "middle", "outer"]
    assert card["recipe"]["model"]["net_config"]["width"] == 32
    x = dpmlab.sample(dpmlab.load(out), n=6, solver="ddim", nfe=4, cond={"label": torch.tensor([0, 1, 2, 3, 0, 1])})
    assert x.shape == (6, 2) and torch.isfinite(x).all()
    assert main(args) == 2 and "pass resume=True (--resume)" in capsys.readouterr().err
    assert main([*args[:4], "40", *args[5:], "--resume"]) == 0  # only train.steps may change
    assert json.loads((out / "model.json").read_text())["steps"] == 40
    assert main([*args, "--resume", "--lr", "0.5"]) == 2
    assert "different recipe" in capsys.readouterr().err
    exported = tmp_path / "assets" / "rings.safetensors"
    assert (
        main(
            [
                "train",
                "--data",
                "moons",
                "--unconditional",
                "--steps",
                "5",
                "--out",
                str(tmp_path / "m"),
                "-q",
                "--export",
                str(exported),
            ]
        )
        == 0
    )
    assert exported.is_file() and exported.with_suffix(".json").is_file()
    assert dpmlab.load(exported).data_shape == (2,)


def test_recipes_parse_and_errors_are_clear(tmp_path):
    for path in sorted((ROOT / "recipes").glob("*.json")):
        r = load_recipe(path)
        assert r.train.steps > 0 and r.model.net == "unet"
    toml = tmp_path / "r.toml"
    toml.write_text('name = "t"\n[data]\nname = "moons"\n[train]\nsteps = 3\nlr_decay = "cosine"\n')
    assert load_recipe(toml).train.lr_decay == "cosine"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "b", "train": {"stepz": 3}}))
    with pytest.raises(ValueError, match="bad.json: unknown train fields: stepz"):
        load_recipe(bad)
    with pytest.raises(ValueError, match="lr_decay must be"):
        Recipe.from_dict({"name": "x", "train": {"lr_decay": "step"}})
    with pytest.raises(ValueError, match="unknown objective 'score'; allowed: eps, x0, v, edm"):
        Recipe.from_dict({"name": "x", "model": {"objective": "score"}})
    r = Recipe.from_dict(
        {**TINY, "model": {**TINY["model"], "net_config": {**TINY["model"]["net_config"], "num_classes": 4}}}
    )
    with pytest.raises(ValueError, match="num_classes=4 but dataset 'tiny' has 3 classes"):
        train(r, tmp_path / "x", dataset=tiny_data(), progress=False)


def test_lr_schedule():
    tc = Recipe.from_dict({"name": "x", "train": {"steps": 110, "lr": 1.0, "warmup": 10, "lr_decay": "cosine"}}).train
    assert tc.lr_at(0) == pytest.approx(0.1) and tc.lr_at(9) == pytest.approx(1.0)
    assert tc.lr_at(60) == pytest.approx(0.5) and tc.lr_at(109) < 0.01


# --- fit with a custom objective: linear regression through a frozen random projection ---------------------

W_TRUE = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


class _LinRegNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(4, 4).requires_grad_(False)  # a fixed, well-conditioned feature map
        nn.init.orthogonal_(self.frozen.weight)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.frozen(x))


class LinReg:
    """y = x W + noise_scale * noise on 48 fixed inputs; MSE of the net's prediction."""

    def __init__(self, noise_scale=0.01, meta=None):
        torch.manual_seed(0)
        self.name, self.module, self.noise_scale = "linreg", _LinRegNet(), noise_scale
        self.x = torch.randn(48, 4, generator=torch.Generator().manual_seed(1))
        self.meta = {"kind": json.dumps("linreg")} if meta is None else meta
        self.exported = []

    def __len__(self):
        return len(self.x)

    def config(self):
        return {"kind": "linreg", "n": len(self.x), "noise_scale": self.noise_scale}

    def draw(self, idx, g):
        return {"x": self.x[idx], "noise": torch.randn(len(idx), 1, generator=g)}

    def loss(self, module, batch):
        y = batch["x"] @ W_TRUE + self.noise_scale * batch["noise"]
        return (module(batch["x"]) - y).square().mean()

    def export(self, ema, out_dir, card):
        self.exported.append((ema, out_dir, card))
        path = out_dir / "linreg.json"
        path.write_text(json.dumps(card))
        return path

    def checkpoint_meta(self):
        return self.meta


LINREG_TRAIN = TrainConfig(
    steps=40, batch_size=16, lr=0.1, warmup=0, ema_decay=0.9, checkpoint_every=10, log_every=10, seed=5
)


def test_fit_custom_objective_trains_keeps_frozen_and_exports_the_ema(tmp_path):
    obj: TrainObjective = LinReg()
    frozen0 = {k: v.clone() for k, v in obj.module.frozen.state_dict().items()}
    res = fit(obj, LINREG_TRAIN, tmp_path, progress=False)
    assert res.step == 40 and not res.stopped and len(res.losses) == 4
    assert res.losses[-1][1] < 0.05 * res.losses[0][1], res.losses
    tensors, meta = _state(tmp_path)
    assert meta["kind"] == "linreg" and meta["objective"] == obj.config()
    assert meta["train"]["steps"] == 40 and meta["train"]["lr"] == 0.1
    # the frozen sub-module is not optimised: two AdamW parameters (head weight, bias), frozen weights unchanged
    assert [g["params"] for g in meta["optim"]["param_groups"]] == [[0, 1]]
    assert {k.split("/")[1] for k in tensors if k.startswith("optim/")} == {"0", "1"}
    for k, v in frozen0.items():
        assert torch.equal(obj.module.frozen.state_dict()[k], v)
        assert torch.equal(tensors[f"model/frozen.{k}"], v) and torch.equal(tensors[f"ema/frozen.{k}"], v)
    assert not torch.equal(tensors["model/head.weight"], tensors["ema/head.weight"])  # EMA lags the model
    # export: once, with the EMA copy (not the trained module) and the generic card
    assert len(obj.exported) == 1
    ema, out_dir, card = obj.exported[0]
    assert ema is not obj.module and out_dir == tmp_path
    for k, v in ema.state_dict().items():
        assert torch.equal(v, tensors[f"ema/{k}"]), k
    assert card["name"] == "linreg" and card["steps"] == 40 and card["seed"] == 5
    assert [tuple(x) for x in card["losses"]] == list(res.losses) and card["final_loss"] == res.final_loss
    assert card["parameters"] == 4 * 4 + 4 + 4 + 1 and card["train"] == meta["train"]
    assert {"train_time_s", "train_cpu_time_s", "machine", "torch", "dpmlab"} <= set(card)
    assert json.loads((tmp_path / "linreg.json").read_text())["steps"] == 40


def test_diffusion_objective_checkpoint_header(reference):
    """train() is fit(DiffusionObjective): the header keeps spec and recipe (dpmlab.load reads the spec) and
    records the objective config: the recipe without train.steps."""
    ref_out, _ = reference
    meta = _state(ref_out)[1]
    obj = DiffusionObjective(Recipe.from_dict(TINY), tiny_data())
    assert meta["recipe"] == Recipe.from_dict(TINY).to_dict() and meta["spec"] == obj.spec.to_dict()
    assert meta["objective"] == obj.config() and "steps" not in meta["objective"]["train"]
    assert meta["train"] == {**TINY["train"], **{k: v for k, v in meta["train"].items() if k not in TINY["train"]}}
    assert len(obj) == 20 and set(obj.draw(torch.arange(4), torch.Generator().manual_seed(0))) == {
        "x0",
        "t",
        "eps",
        "label",
    }


def test_fit_resume_after_stop_is_bit_exact(tmp_path):
    ref = fit(LinReg(), LINREG_TRAIN, tmp_path / "ref", progress=False)
    obj = LinReg()
    res = fit(obj, LINREG_TRAIN, tmp_path / "run", progress=False, callback=lambda s, loss: s == 27)
    assert res.stopped and res.step == 27 and obj.exported == []  # a stop neither checkpoints nor exports
    assert _state(tmp_path / "run")[1]["step"] == 20
    res2 = fit(LinReg(), LINREG_TRAIN, tmp_path / "run", resume=True, progress=False)
    assert res2.step == 40 and res2.losses == ref.losses
    _assert_same(_state(tmp_path / "run"), _state(tmp_path / "ref"))


def test_fit_resume_refuses_a_changed_config(tmp_path):
    fit(LinReg(), dataclasses.replace(LINREG_TRAIN, steps=10), tmp_path, progress=False)
    ckpt = tmp_path / "checkpoint.safetensors"
    with pytest.raises(
        ValueError,
        match=rf"^{re.escape(str(ckpt))}: .*objective 'linreg' config differs at "
        r"noise_scale \(saved 0.01, now 0.5\)",
    ):
        fit(LinReg(noise_scale=0.5), LINREG_TRAIN, tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(ckpt))}: .*train config differs at lr"):
        fit(LinReg(), dataclasses.replace(LINREG_TRAIN, lr=0.2), tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="exists; pass resume=True"):
        fit(LinReg(), LINREG_TRAIN, tmp_path, progress=False)
    assert fit(LinReg(), LINREG_TRAIN, tmp_path, resume=True, progress=False).step == 40  # steps may change
    with pytest.raises(ValueError, match="checkpoint_meta\\(\\) key 'step' is the trainer's"):
        fit(LinReg(meta={"step": "1"}), LINREG_TRAIN, tmp_path / "bad", progress=False)
    with pytest.raises(ValueError, match="must be JSON text"):
        fit(LinReg(meta={"kind": "linreg"}), LINREG_TRAIN, tmp_path / "bad", progress=False)


def test_train_seed_changes_every_draw(tmp_path):
    """``train.seed`` reaches the per-step generators (it used to be shifted above the 32 bits torch's CPU
    generator keeps, so seeds 0 and 1 trained bit-identical models)."""
    from dpmlab.training.trainer import stream_seed

    assert len({stream_seed(s, k) for s in range(20) for k in range(200)}) == 4000
    assert all(0 <= stream_seed(s, k) < 2**32 for s in (0, 1, 2**40) for k in (0, 7))
    losses = []
    for k, seed in enumerate((0, 1, 0)):  # the same start weights (LinReg seeds its own), only train.seed differs
        res = fit(
            LinReg(noise_scale=1.0),
            dataclasses.replace(LINREG_TRAIN, steps=5, seed=seed),
            tmp_path / str(k),
            progress=False,
        )
        losses.append(res.losses)
    assert losses[0] == losses[2] and losses[0] != losses[1]
