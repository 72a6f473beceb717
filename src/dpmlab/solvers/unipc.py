"""UniPC — Zhao, Bai, Rao, Zhou & Lu, "UniPC: A Unified Predictor-Corrector Framework for Fast
Sampling of Diffusion Models", NeurIPS 2023, arXiv 2302.04867.

Implements the B(h) form of the multistep predictor UniP-p and the corrector UniC-p, data form
(``hh = -h``) or noise form (``hh = +h``). With a buffer of model outputs ``m_k`` at
``lam_k`` (``m_0`` the current one), ``r_k = (lam_k - lam_0) / h`` and ``D_k = (m_k - m_0) / r_k``::

    x^(1)   = (sigma_t/sigma_s) x - alpha_t (e^hh - 1) m_0        (noise form: alpha_t/alpha_s, sigma_t)
    x~_t    = x^(1) - alpha_t B(h) sum_k a_k D_k                   UniP-p, R_{p-1} a = b_{p-1}
    x^c_t   = x^(1) - alpha_t B(h) (sum_k a^c_k D_k + a^c_p (m(x~_t, t) - m_0))   UniC-p, R_p a^c = b_p

with ``R[i, k] = r_k^i``, ``b_i = i! hh phi_{i+1}(hh) / B(h)`` and ``B(h) = hh`` (``bh1``) or
``e^hh - 1`` (``bh2``). ``m(x~_t, t)`` is the model call the next step needs anyway: the corrector
costs no evaluation, the buffer keeps ``m`` at the *predicted* ``x~_t`` and the corrected ``x^c_t``
is what continues. UniP-p has order p, UniPC-p order p + 1.

Computed on the one multistep engine (``_multistep``): solving ``R a = b`` is polynomial interpolation, so
UniP-p is the engine's Taylor expansion of order p from the p - 1 previous outputs and UniC-p the order-p+1
expansion with the new point; ``B(h)`` cancels except in UniPC's hard-coded ``a = 1/2`` (UniP-2, UniC-1),
which are the engine's relaxations "unipc-bh1" / "unipc-bh2". tests/test_multistep_engine.py checks the
engine against the closed form above.

``unipc`` runs the paper's schedule: warm-up orders 1..p-1, ``lower_order_final`` (order
``min(p, N - i)`` on step i, always as in the authors' code, not gated on N), no corrector on the
final step. ``unic`` wraps any deterministic solver whose step starts by evaluating the model at
``(x, t_i)`` (DDIM, multistep solvers, Heun, ...): UniC-p is applied after each base step and the
corrector's evaluation is handed to the base's next step in place of its own first call.

Steps to ``sigma = 0`` (``lam = +inf``) are first order (``x = alpha_t x0``) without corrector:
``r_k -> 0`` makes the higher-order terms undefined there.

Deviations from the authors' ``uni_pc.py`` and diffusers' ``UniPCMultistepScheduler``: the same
coefficients (incl. their hard-coded ``a = [1/2]`` for the UniP-2 predictor and the UniC-1
corrector), computed in float64. diffusers applies the corrector at the start of the *next*
``step()`` call (same arithmetic). ``vary_coeff`` is not implemented. For ``unic`` in noise form the
reused evaluation is handed to the base as the x0 whose eps at the corrected point equals the eps
at the predicted point (diffusers' ``solver_p`` passes the raw network output, which is the same
thing for eps-networks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ._expint import interval
from ._multistep import Buffer, advance, unic_expansion, unipc_rule, update
from .base import FirstEvaluation, Problem, Solver, get, register

VARIANTS = ("bh1", "bh2")
PREDICTIONS = ("data", "noise")


@dataclass(frozen=True)
class History:
    """UniC's state: model outputs (x0 or eps, oldest first) at ``lams``; ``m_next``: the corrector's
    evaluation at the current point, to be reused as the next step's ``m_0``; ``base``: the base's state."""

    lams: tuple[float, ...] = ()
    ms: tuple[Tensor, ...] = ()
    m_next: Tensor | None = None
    base: Any = None


def _as_m(prediction: str, x: Tensor, x0: Tensor, alpha: float, sigma: float) -> Tensor:
    """The model output in the solver's form: x0 (data) or eps = (x - alpha x0) / sigma (noise)."""
    return x0 if prediction == "data" else (x - alpha * x0) / sigma


def _check(variant: str, prediction: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


@register("unipc")
@dataclass(frozen=True)
class UniPC(Solver[Buffer]):
    predictor_order: int = 2  # p of UniP-p (the paper's "UniPC-p"); the corrector raises it to p + 1
    variant: str = "bh1"  # B(h): "bh1" (h) or "bh2" (e^h - 1); the authors recommend bh1 without guidance
    prediction: str = "data"  # "data" (x0; the authors' default) or "noise" (eps)
    use_corrector: bool = True  # UniC after every step but the last
    lower_order_final: bool = True  # order min(p, N - i) on step i
    final_corrector: bool = False  # with use_corrector, also correct the last step (1 extra NFE; for order tests)

    paper = "Zhao et al. 2023, UniPC (arXiv 2302.04867)"
    order_test_options = {"lower_order_final": False, "final_corrector": True}

    def __post_init__(self) -> None:
        if not isinstance(self.predictor_order, int) or not 1 <= self.predictor_order <= 4:
            raise ValueError(f"predictor_order must be an int in 1..4, got {self.predictor_order!r}")
        _check(self.variant, self.prediction)

    @property
    def order(self) -> int:
        return self.predictor_order + (1 if self.use_corrector else 0)

    def init(self, problem: Problem, x: Tensor, ts: Tensor) -> Buffer:
        return Buffer()  # the engine's buffer of outputs

    def nfe_for_steps(self, steps: int, to_zero: bool) -> int:
        return steps + (1 if self.use_corrector and self.final_corrector and not to_zero else 0)

    def pending_output(self, state: Buffer) -> Tensor | None:
        """The corrector's evaluation at ``(x~_t, t)`` the next step reuses, in this solver's form."""
        return state.output(-1, self.prediction) if state.pending else None

    def with_pending_output(self, state: Buffer, output: Tensor) -> Buffer:
        if not state.pending:
            raise ValueError("UniPC: this state holds no pending corrector evaluation to replace")
        return state.with_newest(output, self.prediction)

    def step(self, problem: Problem, x: Tensor, ts: Tensor, i: int, state: Buffer) -> tuple[Tensor, Buffer]:
        c = interval(problem.schedule, ts, i)
        rule = unipc_rule(
            self.predictor_order,
            len(state.lams) + (0 if state.pending else 1),  # outputs up to and including the one at t_i
            i,
            len(ts) - 1,
            variant=self.variant,
            form=self.prediction,
            lower_order_final=self.lower_order_final,
            corrector=self.use_corrector,
            final_corrector=self.final_corrector,
            to_zero=c.sigma_next == 0,
        )
        return advance(problem, x, c, i, state, rule)


# --- UniC after any solver ----------------------------------------------------------------------
@register("unic")
@dataclass(frozen=True)
class UniC(Solver[History]):
    base: Solver[Any] = field(default_factory=lambda: get("ddim"))  # the predictor (deterministic)
    corrector_order: int | None = None  # p of UniC-p; None: the base's order
    variant: str = "bh1"  # B(h): "bh1" or "bh2"
    prediction: str = "data"  # "data" or "noise" form of the corrector
    final_corrector: bool = False  # also correct the last step (1 extra NFE; for order measurements)

    paper = "Zhao et al. 2023, UniPC: UniC after any solver (arXiv 2302.04867)"
    order_test_options = {"final_corrector": True}

    def __post_init__(self) -> None:
        if isinstance(self.base, Mapping):  # from config(): {"name": ..., **options}
            object.__setattr__(self, "base", get(**self.base))
        if not isinstance(self.base, Solver) or self.base.is_stochastic():
            raise ValueError(f"base must be a deterministic Solver, got {self.base!r}")
        p = self.corrector_order
        if p is not None and (not isinstance(p, int) or not 1 <= p <= 4):
            raise ValueError(f"corrector_order must be None or an int in 1..4, got {p!r}")
        _check(self.variant, self.prediction)

    @property
    def p(self) -> int:
        return self.base.order if self.corrector_order is None else self.corrector_order

    @property
    def order(self) -> int:
        return min(self.p, self.base.order) + 1

    def init(self, problem: Problem, x: Tensor, ts: Tensor) -> History:
        return History(base=self.base.init(problem, x, ts))

    def pending_output(self, state: History) -> Tensor | None:
        return state.m_next  # the corrector's evaluation at (x~_t, t), reused by the next step

    def with_pending_output(self, state: History, output: Tensor) -> History:
        if state.m_next is None:
            raise ValueError("UniC: this state holds no pending corrector evaluation to replace")
        return dataclasses.replace(state, m_next=output)

    def nfe_for_steps(self, steps: int, to_zero: bool) -> int:
        return self.base.nfe_for_steps(steps, to_zero) + (1 if self.final_corrector and not to_zero else 0)

    def step(self, problem: Problem, x: Tensor, ts: Tensor, i: int, state: History) -> tuple[Tensor, History]:
        c, n = interval(problem.schedule, ts, i), len(ts) - 1

        def reuse(xx: Tensor, evaluate: Callable[[], Tensor]) -> Tensor:
            if state.m_next is None:
                return evaluate()
            # hand over m(x~_t, t) in the corrector's form: x0 itself, or the x0 matching its eps at x
            return state.m_next if self.prediction == "data" else (xx - c.sigma * state.m_next) / c.alpha

        view = FirstEvaluation.of(problem, c.t, reuse, "UniC")
        x_pred, base_state = self.base.step(view, x, ts, i, state.base)  # the base's predictor step
        if not view.answers:
            raise ValueError(f"UniC: base solver {self.base.name!r} did not evaluate the model at (x, t_i)")
        lams = (state.lams + (c.lam,))[-self.p :]  # buffer of the last p outputs (m_0 = the base's first call)
        ms = (state.ms + (_as_m(self.prediction, *view.answers[0], c.alpha, c.sigma),))[-self.p :]
        if c.sigma_next == 0 or (i == n - 1 and not self.final_corrector):
            return x_pred, History(lams, ms, None, base_state)
        m_t = _as_m(self.prediction, x_pred, problem.denoise(x_pred, c.t_next), c.alpha_next, c.sigma_next)
        tay = unic_expansion(min(self.p, len(ms)), self.variant)
        x_c = update(c, x, lams, ms, tay, self.prediction, new=m_t)  # UniC-p on the engine
        return x_c, History(lams, ms, m_t, base_state)
