"""MMD-DDM (dpmlab.methods.mmd_ddm) and its estimator (dpmlab.metrics.distances.mmd2_unbiased): unbiasedness
(≈ 0 in expectation on two halves of one sample, where the biased V-statistic is clearly positive; the
closed form |mu_x - mu_y|² for two Gaussians under the linear kernel, exactly and in expectation), kernels
against naive sums, the objective's loss falls in a few steps on a tiny model, and the recipe runs from the CLI
and exports a plain model file tuned for its sampler."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import dpmlab
from dpmlab.cli import main
from dpmlab.methods import MethodRecipe, load
from dpmlab.methods.mmd_ddm import MMDDDM, MMDDDMModel, MMDDDMObjective, feature_map
from dpmlab.metrics.distances import PolynomialKernel, RBFKernel, kid, mmd2_unbiased
from dpmlab.models.hub import save_model
from dpmlab.models.nets import ModelSpec
from dpmlab.training import TrainConfig, fit
from dpmlab.training.data import DataConfig, Dataset

torch.set_num_threads(1)
F64 = torch.float64
LINEAR = PolynomialKernel(degree=1, gamma=1.0, coef0=0.0)


def test_two_halves_of_one_sample_average_to_zero():
    g = torch.Generator().manual_seed(0)
    cov = torch.tensor([[1.0, 0.6, 0.0], [0.6, 2.0, 0.3], [0.0, 0.3, 0.5]], dtype=F64)
    chol = torch.linalg.cholesky(cov)
    u, v = [], []
    for _ in range(400):
        z = torch.randn(40, 3, generator=g, dtype=F64) @ chol.T + 1.5
        a, b = z[:20], z[20:]
        u.append(float(mmd2_unbiased(a, b)))
        k = PolynomialKernel()
        v.append(float(k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean()))  # biased V-statistic
    u_arr, v_arr = np.array(u), np.array(v)
    se = u_arr.std(ddof=1) / math.sqrt(len(u_arr))
    assert abs(u_arr.mean()) < 3 * se
    assert v_arr.mean() > 10 * v_arr.std(ddof=1) / math.sqrt(len(v_arr))  # the test can tell bias apart
    assert (u_arr < 0).mean() > 0.2  # unbiased at MMD = 0 means negative values are common


def test_linear_kernel_closed_form_for_two_gaussians():
    g = torch.Generator().manual_seed(1)
    mu_x, mu_y = torch.tensor([0.5, -1.0, 2.0], dtype=F64), torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    truth = float((mu_x - mu_y).square().sum())  # MMD² under k(a, b) = a·b
    vals = []
    for rep in range(500):
        x = torch.randn(12, 3, generator=g, dtype=F64) * 1.5 + mu_x
        y = torch.randn(17, 3, generator=g, dtype=F64) * 0.7 + mu_y
        est = mmd2_unbiased(x, y, LINEAR)
        if rep < 5:  # exact identity: |x̄ - ȳ|² - tr(S_x)/m - tr(S_y)/n with unbiased covariances
            ident = (x.mean(0) - y.mean(0)).square().sum() - x.var(0).sum() / 12 - y.var(0).sum() / 17
            torch.testing.assert_close(est, ident, rtol=1e-12, atol=1e-12)
        vals.append(float(est))
    arr = np.array(vals)
    assert abs(arr.mean() - truth) < 3 * arr.std(ddof=1) / math.sqrt(len(arr))
    # the plug-in |x̄ - ȳ|² is biased upward by tr(Σx)/m + tr(Σy)/n = 3 (2.25/12 + 0.49/17) ≈ 0.65: detectable
    assert abs(arr.mean() + 3 * (2.25 / 12 + 0.49 / 17) - truth) > 6 * arr.std(ddof=1) / math.sqrt(len(arr))


@pytest.mark.parametrize("kernel", [PolynomialKernel(), PolynomialKernel(2, 0.3, 0.5), RBFKernel(), RBFKernel(0.2)])
def test_estimator_matches_naive_double_sums(kernel):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(7, 4, generator=g, dtype=F64), torch.randn(9, 4, generator=g, dtype=F64) + 0.4
    k = lambda a, b: float(kernel(a[None], b[None])[0, 0])  # noqa: E731
    gamma = kernel.gamma if kernel.gamma is not None else 1 / 4
    if isinstance(kernel, RBFKernel):  # the kernel itself against its formula
        assert k(x[0], y[1]) == pytest.approx(math.exp(-gamma * float((x[0] - y[1]).square().sum())), rel=1e-12)
    else:
        assert k(x[0], y[1]) == pytest.approx((gamma * float(x[0] @ y[1]) + kernel.coef0) ** kernel.degree, rel=1e-12)
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    assert float(mmd2_unbiased(x, y, kernel)) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    # KID is this estimator averaged over subsets (one copy of the formula)
    if kernel == PolynomialKernel():
        assert kid(x, y[:7], subsets=2, subset_size=7).mean == pytest.approx(float(mmd2_unbiased(x, y[:7])), rel=1e-10)


def test_estimator_is_differentiable_and_validates():
    x = torch.randn(6, 3, dtype=F64, requires_grad=True)
    mmd2_unbiased(x, torch.randn(5, 3, dtype=F64) + 1).backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="feature dims"):
        mmd2_unbiased(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="at least 2 rows"):
        mmd2_unbiased(torch.zeros(1, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="degree must be an int >= 1"):
        PolynomialKernel(degree=0)
    with pytest.raises(ValueError, match="gamma must be a positive"):
        RBFKernel(gamma=-1.0)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="deterministic solver; 'ddpm' is stochastic"):
        MMDDDM(solver="ddpm")
    with pytest.raises(ValueError, match="kernel must be one of poly, rbf, got 'gauss'"):
        MMDDDM(kernel="gauss")
    with pytest.raises(ValueError, match="features must be one of"):
        MMDDDM(features="inception")
    with pytest.raises(ValueError, match="unknown MMD-DDM method fields: lr"):
        MMDDDM.from_dict({"lr": 1e-5})


def test_classifier_features_pass_gradients_to_the_images():
    phi = feature_map("mnist_classifier")
    fake = torch.randn(8, 1, 28, 28, requires_grad=True)
    mmd2_unbiased(phi(fake), phi(torch.randn(8, 1, 28, 28))).backward()
    assert fake.grad is not None and float(fake.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match=r"take \(B, 1, 28, 28\) images"):
        phi(torch.zeros(2, 1, 8, 8))


def tiny_base(tmp_path: Path, shape=(1, 4, 4)) -> Path:
    spec = ModelSpec(
        "mlp", {"data_shape": list(shape), "width": 32, "depth": 2, "time_dim": 16}, "eps", "linear", shape
    )
    torch.manual_seed(0)
    net = spec.build_net()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return save_model(tmp_path / "base.safetensors", net, spec)


def test_loss_decreases_in_a_few_steps_on_a_tiny_model(tmp_path):
    base = tiny_base(tmp_path)
    g = torch.Generator().manual_seed(3)
    pattern = torch.linspace(-0.8, 0.8, 16).reshape(1, 4, 4)
    ds = Dataset("toy", (pattern + 0.1 * torch.randn(256, 1, 4, 4, generator=g)).clamp(-1, 1))
    settings = MMDDDM(base=str(base), features="pixels", nfe=4)
    tc = TrainConfig(
        steps=20, batch_size=32, lr=1e-2, warmup=0, grad_clip=1.0, ema_decay=0.0, log_every=1, checkpoint_every=100
    )
    recipe = MethodRecipe("mmd_tiny", "mmd_ddm", settings, DataConfig(), tc)
    obj = MMDDDMObjective(recipe, ds)
    fixed = obj.draw(torch.arange(64), torch.Generator().manual_seed(9))
    with torch.no_grad():
        before = float(obj.loss(obj.module, fixed))
    res = fit(obj, tc, tmp_path / "run", progress=False)
    with torch.no_grad():
        after = float(obj.loss(obj.module, fixed))
    assert before > 0.05 and after < 0.3 * before, (before, after, res.losses)
    # the exported file is a plain model: dpmlab.load samples it with the tuned sampler
    card = json.loads((tmp_path / "run" / "model.json").read_text())
    assert card["tuned_for"] == {"solver": "ddim", "nfe": 4, "grid": "leading", "to_zero": True}
    model = dpmlab.load(tmp_path / "run")
    x = dpmlab.sample(model, 8, solver="ddim", nfe=4, grid="leading", to_zero=True)
    assert x.shape == (8, 1, 4, 4)
    # the checkpoint reads back as the method's model, sampling the tuned sampler (the same samples)
    tuned = load(tmp_path / "run" / "checkpoint.safetensors")
    assert isinstance(tuned, MMDDDMModel) and tuned.settings == settings
    torch.testing.assert_close(tuned.sample(8), x)


def test_recipe_runs_from_the_cli_and_resumes(tmp_path):
    base = tiny_base(tmp_path, (1, 8, 8))
    recipe = {
        "name": "mmd_cli",
        "method": {
            "name": "mmd_ddm",
            "base": str(base),
            "features": "pixels",
            "nfe": 3,
            "kernel": "rbf",
            "checkpoint": True,
        },
        "data": {"name": "digits8", "conditional": False},
        "train": {
            "steps": 2,
            "batch_size": 8,
            "lr": 1e-4,
            "warmup": 0,
            "ema_decay": 0.0,
            "log_every": 1,
            "checkpoint_every": 1,
        },
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recipe))
    out = tmp_path / "run"
    assert main(["train", "--recipe", str(path), "--out", str(out), "--quiet"]) == 0
    assert (
        main(["train", "--recipe", str(path), "--out", str(out), "--quiet", "--resume", "--set", "train.steps=3"]) == 0
    )
    assert json.loads((out / "model.json").read_text())["steps"] == 3
    with pytest.raises(ValueError, match="shape"):  # base and data must fit together
        MMDDDMObjective(
            MethodRecipe("x", "mmd_ddm", MMDDDM(base=str(base), features="pixels")),
            Dataset("toy", torch.zeros(4, 1, 4, 4)),
        )
