"""UniPC (Zhao et al. 2023) and the UniC wrapper: identities, convergence orders, NFE, dtypes/shapes."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch

import dpmlab.solvers as S
from dpmlab.models.analytic import GaussianMixture, preset, reference_solution
from dpmlab.schedules import LinearVP
from dpmlab.timesteps import uniform_lambda, uniform_time

torch.set_num_threads(1)
SCH = LinearVP()
T_END = 1e-3


def smooth_mixture() -> GaussianMixture:
    """4 broad components in 8-D (stds 0.6-1.0, means ~N(0, 1)): no mode flipping at coarse steps."""
    g = torch.Generator().manual_seed(3)
    means = torch.randn(4, 8, generator=g, dtype=torch.float64)
    stds = 0.6 + 0.4 * torch.rand(4, generator=g, dtype=torch.float64)
    return GaussianMixture(torch.ones(4), means, stds, name="smooth4x8")


@pytest.fixture(scope="module")
def oracle() -> tuple:
    model = smooth_mixture().denoiser(SCH)
    x = torch.randn(100, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = reference_solution(model, SCH, x, SCH.t_max, T_END, rtol=1e-12, atol=1e-12).x
    return model, x, ref


def measured_order(solver: S.Solver, oracle: tuple, ns: tuple[int, ...]) -> float:
    """Least-squares slope of -log(RMS error) against log(steps) on lambda-uniform grids."""
    model, x, ref = oracle
    errs = []
    for n in ns:
        out = S.sample(S.Problem(model, SCH), x, uniform_lambda(SCH, n, t_end=T_END), solver)
        errs.append(float((out - ref).pow(2).mean().sqrt()))
    ln = torch.tensor([math.log(n) for n in ns], dtype=torch.float64)
    le = torch.tensor([math.log(e) for e in errs], dtype=torch.float64)
    lc = ln - ln.mean()
    return -float((lc * (le - le.mean())).sum() / (lc * lc).sum())


def ns_for(order: int) -> tuple[int, ...]:
    """Step counts in the asymptotic range (UniPC-3's 4th order sets in late on this problem)."""
    return {4: (128, 256, 512, 1024), 3: (64, 128, 256, 512)}.get(order, (32, 64, 128, 256))


ORDER_CASES = [
    *[dict(predictor_order=p, use_corrector=False) for p in (1, 2, 3)],
    *[dict(predictor_order=p) for p in (1, 2, 3)],
    dict(predictor_order=2, variant="bh2"),
    dict(predictor_order=2, prediction="noise"),
    dict(predictor_order=1, variant="bh2", prediction="noise"),
    dict(predictor_order=3, prediction="noise"),
]


@pytest.mark.parametrize("opts", ORDER_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_unipc_convergence_order(oracle: tuple, opts: dict) -> None:
    solver = S.get("unipc", **opts, **S.solver_class("unipc").order_test_options)
    assert solver.order == opts["predictor_order"] + (1 if opts.get("use_corrector", True) else 0)
    slope = measured_order(solver, oracle, ns_for(solver.order))
    assert abs(slope - solver.order) <= 0.3, f"{opts}: measured order {slope:.2f}, declared {solver.order}"


@pytest.mark.parametrize(
    "base, order",
    [(S.get("ddim"), 2), (S.get("deis", order=2, lower_order_final=False), 3)],
    ids=["ddim", "deis2"],
)
def test_unic_after_other_solvers_raises_order(oracle: tuple, base: S.Solver, order: int) -> None:
    for prediction in ("data", "noise"):
        solver = S.get("unic", base=base, prediction=prediction, final_corrector=True)
        assert solver.order == order
        slope = measured_order(solver, oracle, ns_for(order))
        assert abs(slope - order) <= 0.3, f"UniC after {base.name} ({prediction}): {slope:.2f} vs {order}"


@pytest.mark.parametrize("t_end", [SCH.t_min, 0.0])
def test_unipc1_without_corrector_is_ddim(t_end: float) -> None:
    model = preset("gmm16").denoiser(LinearVP())
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for ts in (uniform_time(SCH, 10, t_end=t_end), uniform_lambda(SCH, 7, t_end=t_end)):
        ddim = S.sample(S.Problem(model, SCH), x, ts, S.get("ddim"))
        for prediction in ("data", "noise"):
            uni = S.sample(
                S.Problem(model, SCH),
                x,
                ts,
                S.get("unipc", predictor_order=1, use_corrector=False, prediction=prediction),
            )
            assert float((uni - ddim).abs().max()) < 1e-10


@pytest.mark.parametrize("prediction", ["data", "noise"])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unic_after_ddim_is_unipc1(prediction: str, variant: str) -> None:
    """UniP-1 is DDIM, so the wrapper around DDIM must reproduce UniPC-1 (predictor + corrector)."""
    model = preset("gmm16").denoiser(SCH)
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ts = uniform_lambda(SCH, 9, t_end=0.0)
    opts = dict(variant=variant, prediction=prediction)
    a = S.sample(S.Problem(model, SCH), x, ts, S.get("unipc", predictor_order=1, **opts))
    b = S.sample(S.Problem(model, SCH), x, ts, S.get("unic", base=S.get("ddim"), corrector_order=1, **opts))
    assert float((a - b).abs().max()) < 1e-12


class CountingModel:
    def __init__(self, model) -> None:
        self.model, self.calls = model, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model(x, t)


@pytest.mark.parametrize("to_zero", [False, True])
@pytest.mark.parametrize(
    "name, opts",
    [
        ("unipc", dict()),
        ("unipc", dict(predictor_order=3, final_corrector=True)),
        ("unipc", dict(use_corrector=False)),
        ("unic", dict()),
        ("unic", dict(final_corrector=True)),
        ("unic", dict(base=S.get("heun"), final_corrector=True)),
    ],
)
def test_model_called_exactly_declared_times(name: str, opts: dict, to_zero: bool) -> None:
    solver = S.get(name, **opts)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for n in (1, 2, 3, 6):
        counting = CountingModel(preset("gmm16").denoiser(SCH))
        ts = uniform_lambda(SCH, n, t_end=0.0 if to_zero else SCH.t_min)
        S.sample(S.Problem(counting, SCH), x, ts, solver)
        assert counting.calls == solver.nfe_for_steps(n, to_zero) == solver.nfe(ts, SCH)
    if not to_zero and opts.get("final_corrector"):
        assert solver.nfe_for_steps(5, False) == replace(solver, final_corrector=False).nfe_for_steps(5, False) + 1


class ImageModel:
    """The gmm16 denoiser applied to (B, 1, 4, 4) images."""

    def __init__(self) -> None:
        self.model = preset("gmm16").denoiser(SCH)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x.reshape(x.shape[0], -1), t).reshape(x.shape)


@pytest.mark.parametrize(
    "name, opts", [("unipc", dict(predictor_order=3)), ("unipc", dict(prediction="noise")), ("unic", dict())]
)
def test_dtypes_and_shapes(name: str, opts: dict) -> None:
    solver = S.get(name, **opts)
    x64 = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ts = uniform_lambda(SCH, 8, t_end=0.0)
    outs = {}
    for dtype in (torch.float32, torch.float64):
        img = S.sample(S.Problem(ImageModel(), SCH), x64.to(dtype), ts, solver)
        flat = S.sample(S.Problem(preset("gmm16").denoiser(SCH), SCH), x64.reshape(16, 16).to(dtype), ts, solver)
        assert img.shape == x64.shape and img.dtype == dtype and flat.shape == (16, 16) and flat.dtype == dtype
        assert torch.isfinite(img).all()
        assert float((img.reshape(16, 16) - flat).abs().max()) < 1e-5
        outs[dtype] = img
    assert float((outs[torch.float32] - outs[torch.float64]).abs().max()) < 1e-4


def test_options_are_validated() -> None:
    for bad, word in [
        (dict(variant="bh3"), "bh3"),
        (dict(prediction="v"), "'v'"),
        (dict(predictor_order=0), "0"),
        (dict(predictor_order=5), "5"),
    ]:
        with pytest.raises(ValueError, match=word):
            S.get("unipc", **bad)
    with pytest.raises(ValueError, match="deterministic"):
        S.get("unic", base=S.get("ddim", eta=1.0))
    with pytest.raises(ValueError, match="corrector_order"):
        S.get("unic", corrector_order=7)


def test_unic_config_round_trip() -> None:
    solver = S.get("unic", base=S.get("deis", order=2), corrector_order=2, variant="bh2")
    assert S.get(**solver.config()) == solver
    assert S.get(**S.get("unipc", predictor_order=3).config()) == S.get("unipc", predictor_order=3)


@dataclass(frozen=True)
class LateEvaluator(S.Solver[None]):
    """A (bad) base for UniC: evaluates the model first at t_next."""

    def step(self, problem, x, ts, i, state):
        return problem.denoise(x, float(ts[i + 1])), None


def test_unic_rejects_a_base_that_does_not_start_at_t() -> None:
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    problem = S.Problem(preset("gmm16").denoiser(SCH), SCH)
    with pytest.raises(ValueError, match="first evaluates"):
        S.sample(problem, x, uniform_lambda(SCH, 4), S.solver_class("unic")(base=LateEvaluator()))
