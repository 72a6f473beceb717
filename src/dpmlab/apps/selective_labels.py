"""Selective labels with domain constraints — Balachandar, Garg & Pierson, "Domain constraints improve risk
prediction when outcome data is missing", ICLR 2024, arXiv 2312.03878; authors' code
sidhikabalachandar/domain_constraints (Stan models, synthetic generators). Not a diffusion model: this module
imports nothing from dpmlab and runs on its own (torch, numpy, pyro-ppl, tqdm).

Data: features ``X`` (N, p) (the intercept is added here: ``X1 = [1, X]``, M = p + 1 coefficients), a test
decision ``T`` in {0, 1}, and an outcome ``Y`` observed only where ``T = 1`` (NaN elsewhere).

Bernoulli-sigmoid model (``Variant.UNIFORM`` / ``Variant.NORMAL``)::

    r = X1 beta_Y + Z,    Y ~ Bern(sigmoid(r)),    T ~ Bern(sigmoid(alpha r + X1 beta_Delta))
    likelihood: T=1,Y=1: p(Y=1, T=1 | X);  T=1,Y=0: p(Y=0, T=1 | X);  T=0: p(T=0 | X)   (Z integrated out)

* uniform unobservables ``Z ~ U(0, sigma)``, ``alpha = 1``: closed form. With ``a = X1 beta_Y``,
  ``d = X1 beta_Delta``, ``b = a + d``, ``f(x) = softplus(x + sigma) - softplus(x)`` (= int_0^sigma sigmoid(x+z))
  and the partial fractions ``sigmoid(u) sigmoid(u + d) = (sigmoid(u) - e^-d sigmoid(u + d)) / (1 - e^-d)``::

      sigma p(Y=0, T=1) = k = (f(b) - f(a)) / (1 - e^-d),   sigma p(Y=1, T=1) = f(b) - k,
      sigma p(T=0) = softplus(-b) - softplus(-b - sigma),  sigma p(Y=1) = f(a)

  (the authors' Stan expressions, rewritten stably; a series in d for |d| < 1e-5).
* normal unobservables ``Z ~ N(0, sigma^2)``: ``sigma`` or ``alpha`` is fixed (``known_sigma`` /
  ``known_alpha``) for identifiability, as in the authors' code. Stan samples a latent Z_i per person; here Z is
  integrated out by the trapezoid rule on ``[-8 sigma, 8 sigma]`` (``quadrature_nodes``, default 49): the same
  marginal likelihood of the parameters, hence the same posterior over them (tested against Monte Carlo over the
  latent Z and a dense grid). The rule converges exponentially for these analytic integrands: relative error
  1e-10 at sigma = 2 with 49 nodes, where Gauss-Hermite with 20 nodes is off by 2e-4 (the sigmoid's poles at
  distance pi from the real axis slow Gauss-Hermite down).
* Heckman model (``Variant.HECKMAN``), continuous Y: ``Y = X1 beta_Y + Z``, ``T = 1[X1 beta_T + u > 0]``,
  ``(Z, u) ~ N(0, [[sigma^2, rho], [rho, 1]])``::

      T=1: log N(Y; X1 beta_Y, sigma^2) + log Phi((X1 beta_T + rho/sigma^2 (Y - X1 beta_Y)) / sqrt(1 - rho^2/sigma^2))
      T=0: log Phi(-X1 beta_T)

  with ``beta_T = (rho / sigma^2) beta_Y + beta_Delta`` (testing beyond risk is ``beta_Delta``).

Priors (Stan's): N(0, 3) on beta_Y and beta_Delta, half-N(0, 3) on sigma, alpha and rho.
Domain constraints:
* prevalence: ``+ (-lambda (mean_i E[Y_i | X_i] - prevalence)^2)`` in the log density (``prevalence``,
  ``prevalence_weight`` = lambda); E[Y | X] = p(Y=1 | X) (binary) or X1 beta_Y (Heckman).
* expertise: beta_Delta is non-zero only on the intercept and ``testing_features`` (indices into X's columns).

Inference: Pyro NUTS (``sample_posterior``) and MAP by L-BFGS on Pyro's log joint (``map_estimate``); both give a
``Posterior`` (MAP: one sample). ``simulate`` is the authors' synthetic generator (N = 5000, M = 5, two non-zero
beta_Delta including the intercept, sigma ~ N(2, 0.1), alpha ~ N(1, 0.1), intercepts ~ N(-2, 0.1) and N(2, 0.1),
beta ~ N(0, 1), standardised Gaussian features).

Deviations from the authors' code: the normal model's prevalence constraint uses E[sigmoid(X1 beta_Y + Z)] over
Z (quadrature), not the mean over the sampled Z_i; the Heckman model is parameterised by beta_Delta (priors on
beta_Y and beta_Delta, not on beta_T) and by ``rho = c sigma``, ``c ~ U(0, 1)`` with the factor
``log halfN(rho; 3) + log sigma`` (Stan's half-normal on rho restricted to rho < sigma, where the likelihood is
defined); the uniform-data generator uses alpha = 1 (the model's assumption) unless ``alpha_mean`` /
``alpha_std`` are given; lambda (not stated in the paper's code) defaults to 1e4.
"""

from __future__ import annotations

import argparse
import csv
import enum
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Variant",
    "Data",
    "make_data",
    "read_csv",
    "write_csv",
    "SelectiveLabelsModel",
    "Posterior",
    "map_estimate",
    "sample_posterior",
    "SyntheticConfig",
    "Simulation",
    "simulate",
    "auc",
    "main",
]

Params = dict[str, Tensor]


class Variant(enum.Enum):
    UNIFORM = "uniform"  # Z ~ U(0, sigma), alpha = 1, binary Y: closed-form likelihood
    NORMAL = "normal"  # Z ~ N(0, sigma^2), binary Y: quadrature over Z
    HECKMAN = "heckman"  # (Z, u) bivariate normal, continuous Y, probit testing


def _variant(v: Variant | str) -> Variant:
    try:
        return Variant(v)
    except ValueError:
        raise ValueError(f"unknown variant {v!r}; allowed: {', '.join(x.value for x in Variant)}") from None


# --- data -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Data:
    """Observed data: ``X`` (N, p) features without intercept, ``T`` (N,) in {0, 1}, ``Y`` (N,) NaN where T = 0."""

    X: Tensor
    T: Tensor
    Y: Tensor
    feature_names: tuple[str, ...]

    @property
    def design(self) -> Tensor:
        """``X1 = [1, X]`` (N, M)."""
        return torch.cat([torch.ones(self.X.shape[0], 1, dtype=torch.float64), self.X], dim=1)


def make_data(X: Any, T: Any, Y: Any, *, feature_names: Sequence[str] | None = None) -> Data:
    """Validate and convert to float64: matching lengths, 0/1 tests, outcomes only for tested rows."""
    x = torch.as_tensor(np.asarray(X, dtype=np.float64))
    t = torch.as_tensor(np.asarray(T, dtype=np.float64)).reshape(-1)
    y = torch.as_tensor(np.asarray(Y, dtype=np.float64)).reshape(-1)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"X must have shape (N, p), got {tuple(x.shape)}")
    n = x.shape[0]
    if n == 0:
        raise ValueError("the data set is empty (N = 0)")
    if t.shape[0] != n or y.shape[0] != n:
        raise ValueError(f"mismatched lengths: X has {n} rows, T {t.shape[0]}, Y {y.shape[0]}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"X has {int((~torch.isfinite(x)).sum())} missing or infinite entries; features must be finite"
        )
    bad = ~((t == 0) | (t == 1))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"T must be 0 or 1, got {float(t[i])} at row {i}")
    if int(t.sum()) == 0:
        raise ValueError("no tested rows (T = 1): outcomes are never observed, nothing to learn the risk from")
    leak = (t == 0) & ~torch.isnan(y)
    if bool(leak.any()):
        i = int(leak.nonzero()[0])
        raise ValueError(
            f"Y is observed for {int(leak.sum())} untested rows (T = 0), e.g. row {i}; "
            f"outcomes of untested rows must be missing (NaN)"
        )
    miss = (t == 1) & ~torch.isfinite(y)
    if bool(miss.any()):
        raise ValueError(f"Y is missing for {int(miss.sum())} tested rows (T = 1), e.g. row {int(miss.nonzero()[0])}")
    names = tuple(feature_names) if feature_names is not None else tuple(f"x{j + 1}" for j in range(x.shape[1]))
    if len(names) != x.shape[1]:
        raise ValueError(f"{len(names)} feature names for {x.shape[1]} columns of X")
    return Data(x, t, y, names)


def read_csv(path: str | Path, *, test: str = "T", outcome: str = "Y", features: Sequence[str] | None = None) -> Data:
    """Read a CSV with a header: the test column, the outcome column (empty or NaN where untested) and the
    features (default: every other column)."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise ValueError(f"{path} is empty; expected a header row with columns {test!r}, {outcome!r} and features")
    header = [h.strip() for h in rows[0]]
    feats = [h for h in header if h not in (test, outcome)] if features is None else list(features)
    missing = [c for c in [test, outcome, *feats] if c not in header]
    if missing:
        raise ValueError(f"{path} lacks column(s) {', '.join(map(repr, missing))}; it has {', '.join(header)}")
    body = [r for r in rows[1:] if any(c.strip() for c in r)]
    if any(len(r) != len(header) for r in body):
        i = next(k for k, r in enumerate(body) if len(r) != len(header))
        raise ValueError(f"{path}: data row {i + 1} has {len(body[i])} fields, the header {len(header)}")

    def col(name: str) -> list[float]:
        j = header.index(name)
        try:
            return [float(r[j]) if r[j].strip() not in ("", "NA", "nan", "NaN") else math.nan for r in body]
        except ValueError as e:
            raise ValueError(f"{path}: column {name!r} has a non-numeric entry ({e})") from None

    X = np.array([col(f) for f in feats], dtype=np.float64).T.reshape(len(body), len(feats))
    return make_data(X, col(test), col(outcome), feature_names=feats)


def write_csv(path: str | Path, data: Data) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*data.feature_names, "T", "Y"])
        for x, t, y in zip(data.X.tolist(), data.T.tolist(), data.Y.tolist()):
            w.writerow([*(f"{v:.10g}" for v in x), int(t), "" if math.isnan(y) else f"{y:.10g}"])


# --- the model ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SelectiveLabelsModel:
    """The model and its domain constraints (defaults: the paper's priors, no constraint)."""

    variant: Variant = Variant.UNIFORM  # unobservables / outcome model
    prevalence: float | None = None  # known population mean of Y; None: no prevalence constraint
    prevalence_weight: float = 1e4  # lambda of the soft penalty -lambda (implied - prevalence)^2
    testing_features: tuple[int, ...] | None = None  # expertise constraint: X columns in beta_Delta; None: all
    known_sigma: float | None = None  # fix sigma (normal: this or known_alpha is required)
    known_alpha: float | None = None  # fix alpha (normal only; the uniform model has alpha = 1)
    prior_scale: float = 3.0  # N(0, s) / half-N(0, s) priors
    quadrature_nodes: int = 49  # trapezoid nodes over Z in [-8 sigma, 8 sigma] (normal)

    def __post_init__(self) -> None:
        object.__setattr__(self, "variant", _variant(self.variant))
        if self.testing_features is not None:
            tf = tuple(int(j) for j in self.testing_features)
            if len(set(tf)) != len(tf) or any(j < 0 for j in tf):
                raise ValueError(f"testing_features must be distinct column indices >= 0, got {tf}")
            object.__setattr__(self, "testing_features", tuple(sorted(tf)))
        if self.prevalence is not None:
            binary = self.variant is not Variant.HECKMAN
            if not math.isfinite(self.prevalence) or (binary and not 0 < self.prevalence < 1):
                raise ValueError(f"prevalence must be in (0, 1) for binary outcomes, got {self.prevalence}")
        if not self.prevalence_weight > 0:
            raise ValueError(f"prevalence_weight must be > 0, got {self.prevalence_weight}")
        for name in ("known_sigma", "known_alpha"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be > 0 or None, got {v}")
        if self.known_alpha is not None and self.variant is not Variant.NORMAL:
            raise ValueError(f"known_alpha applies to the normal model only; the {self.variant.value} model has none")
        if self.variant is Variant.NORMAL and self.known_sigma is None and self.known_alpha is None:
            raise ValueError(
                "the normal model needs known_sigma or known_alpha (sigma and alpha are not both identified)"
            )
        if self.quadrature_nodes < 2 or self.prior_scale <= 0:
            raise ValueError(
                f"quadrature_nodes must be >= 2 and prior_scale > 0, got {self.quadrature_nodes}, {self.prior_scale}"
            )

    # -- structure
    def delta_index(self, m: int) -> Tensor:
        """Coefficients of X1 (intercept = 0) that beta_Delta may use."""
        if self.testing_features is None:
            return torch.arange(m)
        if self.testing_features and max(self.testing_features) >= m - 1:
            raise ValueError(f"testing_features {self.testing_features} out of range for {m - 1} feature columns")
        return torch.tensor([0, *(j + 1 for j in self.testing_features)], dtype=torch.long)

    def check(self, data: Data) -> None:
        self.delta_index(data.X.shape[1] + 1)
        y = data.Y[data.T == 1]
        if self.variant is not Variant.HECKMAN and not bool(((y == 0) | (y == 1)).all()):
            raise ValueError(
                f"the {self.variant.value} model needs binary outcomes (0/1) for tested rows; "
                f"got e.g. {float(y[~((y == 0) | (y == 1))][0])}"
            )

    # -- the Pyro model
    def pyro_model(self, data: Data) -> None:
        import pyro
        import pyro.distributions as dist

        m, s = data.X.shape[1] + 1, torch.tensor(self.prior_scale, dtype=torch.float64)
        latent = {
            "beta_Y": pyro.sample("beta_Y", dist.Normal(0.0 * s, s).expand([m]).to_event(1)),
            "beta_Delta": pyro.sample(
                "beta_Delta", dist.Normal(0.0 * s, s).expand([len(self.delta_index(m))]).to_event(1)
            ),
        }
        if self.known_sigma is None:
            latent["sigma"] = pyro.sample("sigma", dist.HalfNormal(s))
        if self.variant is Variant.NORMAL and self.known_alpha is None:
            latent["alpha"] = pyro.sample("alpha", dist.HalfNormal(s))
        if self.variant is Variant.HECKMAN:
            latent["corr"] = pyro.sample("corr", dist.Uniform(0.0 * s, 1.0 + 0.0 * s))
        p = self.params(latent, m)
        if self.variant is Variant.HECKMAN:  # half-N(0, s) on rho = c sigma, Jacobian d rho / d c = sigma
            pyro.factor("rho_prior", dist.HalfNormal(s).log_prob(p["rho"]) + torch.log(p["sigma"]))
        loglik, expected = self._terms(p, data)
        pyro.factor("log_likelihood", loglik.sum())
        if self.prevalence is not None:
            gap = expected.mean() - self.prevalence
            pyro.factor("prevalence", -self.prevalence_weight * gap**2)

    def params(self, latent: Mapping[str, Tensor], m: int) -> Params:
        """Full parameters from the latent sites (any leading sample dims): beta_Y, beta_Delta (zeros off the
        expertise set), sigma, alpha (binary) or rho, beta_T (Heckman)."""
        by = latent["beta_Y"]
        bd = torch.zeros_like(by).index_copy(-1, self.delta_index(m), latent["beta_Delta"])
        lead = by.shape[:-1]
        sigma = latent["sigma"] if "sigma" in latent else by.new_full(lead, float(self.known_sigma or 0))
        out = {"beta_Y": by, "beta_Delta": bd, "sigma": sigma}
        if self.variant is Variant.HECKMAN:
            rho = latent["corr"] * sigma
            out.update(rho=rho, beta_T=(rho / sigma**2)[..., None] * by + bd)
        else:
            alpha = latent.get("alpha", by.new_full(lead, float(self.known_alpha or 1.0)))
            out["alpha"] = alpha
        return out

    # -- likelihood pieces (one parameter set, N rows)
    def cell_probs(self, p: Params, X: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Binary models: ``p(Y=1), p(Y=1,T=1), p(Y=0,T=1), p(T=0)`` given X, each (N,)."""
        X1 = torch.cat([torch.ones(X.shape[0], 1, dtype=X.dtype), X], dim=1)
        a, d, s = X1 @ p["beta_Y"], X1 @ p["beta_Delta"], p["sigma"]
        if self.variant is Variant.UNIFORM:
            return _uniform_cells(a, d, s)
        if self.variant is Variant.NORMAL:
            u = torch.linspace(-8.0, 8.0, self.quadrature_nodes, dtype=a.dtype)  # standard-normal nodes
            wn = torch.softmax(-0.5 * u**2, 0)  # trapezoid weights of N(0, 1), summing to 1
            z = s * u  # nodes of N(0, sigma^2)
            r = a[:, None] + z  # (N, K) risk at each node
            lt = p["alpha"] * r + d[:, None]
            py, qy, pt, qt = torch.sigmoid(r), torch.sigmoid(-r), torch.sigmoid(lt), torch.sigmoid(-lt)
            return (wn * py).sum(1), (wn * py * pt).sum(1), (wn * qy * pt).sum(1), (wn * qt).sum(1)
        raise ValueError("cell_probs is for the binary models; the Heckman model has a continuous outcome")

    def log_likelihood(self, p: Params, data: Data) -> Tensor:
        """Per-row log-likelihood (N,), Z integrated out."""
        return self._terms(p, data)[0]

    def _terms(self, p: Params, data: Data) -> tuple[Tensor, Tensor]:
        """Per-row log-likelihood and E[Y | X], sharing one evaluation."""
        t, y = data.T == 1, torch.nan_to_num(data.Y)
        if self.variant is Variant.HECKMAN:
            X1 = data.design
            a, c, s, rho = X1 @ p["beta_Y"], X1 @ p["beta_T"], p["sigma"], p["rho"]
            res = y - a
            tested = (
                -0.5 * (res / s) ** 2
                - torch.log(s)
                - 0.5 * math.log(2 * math.pi)
                + torch.special.log_ndtr((c + rho / s**2 * res) / torch.sqrt(1 - (rho / s) ** 2))
            )
            return torch.where(t, tested, torch.special.log_ndtr(-c)), a
        py, p11, p10, p0 = self.cell_probs(p, data.X)
        ll = torch.where(t, torch.where(y == 1, p11, p10), p0).clamp_min(1e-300).log()
        return ll, py

    def expected_outcome(self, p: Params, X: Tensor) -> Tensor:
        """E[Y | X] (N,): the risk p(Y=1 | X), or X1 beta_Y for the Heckman model."""
        if self.variant is Variant.HECKMAN:
            return torch.cat([torch.ones(X.shape[0], 1, dtype=X.dtype), X], 1) @ p["beta_Y"]
        return self.cell_probs(p, X)[0]

    def conditional_outcome(self, p: Params, X: Tensor, T: Tensor) -> Tensor:
        """E[Y | X, T] (N,): risk given the test decision (e.g. of the untested, T = 0)."""
        if self.variant is Variant.HECKMAN:  # E[Z | u > -c] = rho phi(c)/Phi(c), E[Z | u < -c] = -rho phi(c)/Phi(-c)
            c = torch.cat([torch.ones(X.shape[0], 1, dtype=X.dtype), X], 1) @ p["beta_T"]
            logphi = -0.5 * c**2 - 0.5 * math.log(2 * math.pi)
            mills = torch.where(
                T == 1, torch.exp(logphi - torch.special.log_ndtr(c)), -torch.exp(logphi - torch.special.log_ndtr(-c))
            )
            return self.expected_outcome(p, X) + p["rho"] * mills
        py, p11, p10, p0 = self.cell_probs(p, X)
        return torch.where(T == 1, p11 / (p11 + p10), (py - p11).clamp_min(0) / p0)


def _uniform_cells(a: Tensor, d: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # softplus(y) = max(y, 0) + L(y), L(y) = log1p(exp(-|y|)); f(x) = int_0^s sigmoid(x + z) dz
    # = softplus(x + s) - softplus(x) and g(x) = s - f(x) are both accurate in this form (no s - f cancellation)
    s = s.clamp_min(1e-6)  # sigma -> 0 is the model without unobservables; keeps f / sigma finite
    b = a + d
    ys = torch.stack([a, a + s, b, b + s])  # (4, N)
    e = torch.exp(-ys.abs())
    L = torch.log1p(e)
    ha, hb = torch.minimum((a + s).clamp_min(0), s), torch.minimum((b + s).clamp_min(0), s)  # max(x+s,0) - max(x,0)
    fa, fb = ha + (L[1] - L[0]), hb + (L[3] - L[2])
    gb = (s - hb) - (L[3] - L[2])
    diff = (hb - ha) + (L[3] - L[2] - L[1] + L[0])  # f(b) - f(a)
    small = d.abs() < 1e-5
    k_exact = diff / -torch.expm1(-torch.where(small, torch.ones_like(d), d))
    sig = torch.where(ys >= 0, 1 / (1 + e), e / (1 + e))  # sigmoid(ys)
    f1, f2 = sig[1] - sig[0], sig[1] * (1 - sig[1]) - sig[0] * (1 - sig[0])  # f'(a), f''(a)
    k = torch.where(small, f1 + d * (f1 + f2) / 2, k_exact)  # = s p(Y=0, T=1)
    return fa / s, (fb - k) / s, k / s, gb / s


# --- posterior ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Posterior:
    """Draws of the full parameters (each ``(S, ...)``; MAP: S = 1) and how they were made."""

    model: SelectiveLabelsModel
    samples: Mapping[str, Tensor]
    method: str  # "map" or "nuts"
    info: Mapping[str, float] = field(default_factory=dict)

    def draw(self, i: int) -> Params:
        return {k: v[i] for k, v in self.samples.items()}

    @property
    def num_samples(self) -> int:
        return int(self.samples["beta_Y"].shape[0])

    def mean(self) -> Params:
        return {k: v.mean(0) for k, v in self.samples.items()}

    def interval(self, level: float = 0.9) -> dict[str, tuple[Tensor, Tensor]]:
        """Equal-tailed credible intervals."""
        if not 0 < level < 1:
            raise ValueError(f"level must be in (0, 1), got {level}")
        q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
        return {k: tuple(torch.quantile(v, q, dim=0)) for k, v in self.samples.items()}  # type: ignore[misc]

    def risk(self, X: Any, T: Any | None = None) -> Tensor:
        """Posterior mean of E[Y | X] (or of E[Y | X, T] when T is given), (N,)."""
        x = torch.as_tensor(np.asarray(X, dtype=np.float64))
        m = self.samples["beta_Y"].shape[-1]
        if x.ndim != 2 or x.shape[1] != m - 1:
            raise ValueError(f"X must have shape (N, {m - 1}) (the fitted feature columns), got {tuple(x.shape)}")
        t = None if T is None else torch.as_tensor(np.asarray(T, dtype=np.float64)).reshape(-1)
        if t is not None and t.shape[0] != x.shape[0]:
            raise ValueError(f"mismatched lengths: X has {x.shape[0]} rows, T {t.shape[0]}")
        with torch.no_grad():
            f = (
                (lambda p: self.model.expected_outcome(p, x))
                if t is None
                else (lambda p: self.model.conditional_outcome(p, x, t))
            )
            return torch.stack([f(self.draw(i)) for i in range(self.num_samples)]).mean(0)

    def to_dict(self) -> dict[str, Any]:
        model = {**asdict(self.model), "variant": self.model.variant.value}
        return {
            "model": model,
            "method": self.method,
            "info": dict(self.info),
            "samples": {k: v.tolist() for k, v in self.samples.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Posterior:
        m = dict(d["model"])
        if m.get("testing_features") is not None:
            m["testing_features"] = tuple(m["testing_features"])
        samples = {k: torch.tensor(v, dtype=torch.float64) for k, v in d["samples"].items()}
        return cls(SelectiveLabelsModel(**m), samples, str(d["method"]), dict(d.get("info", {})))


def _sites(model: SelectiveLabelsModel, data: Data) -> dict[str, Any]:
    from pyro import poutine

    tr = poutine.trace(model.pyro_model).get_trace(data)
    return {n: s["fn"] for n, s in tr.nodes.items() if s["type"] == "sample" and not s["is_observed"]}


def _latent_init(model: SelectiveLabelsModel, data: Data) -> Params:
    m = data.X.shape[1] + 1
    init = {
        "beta_Y": torch.zeros(m, dtype=torch.float64),
        "beta_Delta": torch.zeros(len(model.delta_index(m)), dtype=torch.float64),
        "sigma": torch.tensor(1.0, dtype=torch.float64),
        "alpha": torch.tensor(1.0, dtype=torch.float64),
        "corr": torch.tensor(0.5, dtype=torch.float64),
    }
    return {k: init[k] for k in _sites(model, data)}


def _log_joint(model: SelectiveLabelsModel, data: Data, latent: Params) -> Tensor:
    from pyro import poutine

    lp = poutine.trace(poutine.condition(model.pyro_model, data=latent)).get_trace(data).log_prob_sum()
    return torch.as_tensor(lp)


def map_estimate(
    model: SelectiveLabelsModel,
    data: Data,
    *,
    max_rounds: int = 100,
    progress: bool = False,
    init: Mapping[str, Tensor] | None = None,
    unconstrained: bool = False,
) -> Posterior:
    """The posterior mode by L-BFGS on Pyro's log joint: of the density of the parameters themselves (MAP), or
    with ``unconstrained`` of the density of their unconstrained images (log sigma, ...: what NUTS samples; its
    mode stays off the sigma = 0 boundary, the start ``sample_posterior`` uses)."""
    from pyro.distributions.transforms import biject_to
    from tqdm import tqdm

    model.check(data)
    sites = _sites(model, data)
    to = {n: biject_to(fn.support) for n, fn in sites.items()}
    start = dict(_latent_init(model, data), **(init or {}))
    u = {n: to[n].inv(start[n]).detach().clone().requires_grad_(True) for n in sites}
    opt = torch.optim.LBFGS(
        list(u.values()),
        lr=1.0,
        max_iter=50,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
    )

    def closure() -> Tensor:
        opt.zero_grad()
        values = {n: to[n](v) for n, v in u.items()}
        loss = -_log_joint(model, data, values)
        if unconstrained:
            loss = loss - sum(to[n].log_abs_det_jacobian(u[n], values[n]).sum() for n in u)
        loss.backward()
        return loss

    last, bar = math.inf, tqdm(range(max_rounds), desc="MAP (L-BFGS)", disable=not progress, leave=False)
    for _ in bar:
        loss = float(opt.step(closure).detach())  # type: ignore[union-attr]
        bar.set_postfix(neg_log_joint=f"{loss:.4f}")
        if not math.isfinite(loss):
            raise FloatingPointError("MAP diverged (non-finite log density); check the data and the constraints")
        if abs(last - loss) < 1e-9 * max(1.0, abs(loss)):
            break
        last = loss
    with torch.no_grad():
        latent = {n: to[n](v.detach()).detach()[None] for n, v in u.items()}
        full = model.params(latent, data.X.shape[1] + 1)
    return Posterior(model, full, "map", {"log_density": -last})


def sample_posterior(
    model: SelectiveLabelsModel,
    data: Data,
    *,
    num_samples: int = 500,
    warmup: int = 500,
    seed: int = 0,
    max_tree_depth: int = 8,
    full_mass: bool = True,
    jit: bool = True,
    progress: bool = True,
    init: Posterior | None = None,
) -> Posterior:
    """NUTS (Pyro) from the mode in unconstrained space (or ``init``); one chain, a dense mass matrix (sigma and
    the intercepts are strongly correlated) and a TorchScript-traced potential. Seeds Pyro's global RNGs."""
    import pyro
    from pyro.infer import MCMC, NUTS
    from pyro.infer.autoguide.initialization import init_to_value

    if num_samples < 1 or warmup < 0:
        raise ValueError(f"num_samples must be >= 1 and warmup >= 0, got {num_samples}, {warmup}")
    model.check(data)
    start = init if init is not None else map_estimate(model, data, progress=progress, unconstrained=True)
    pm = start.draw(0)
    latent0 = {
        "beta_Y": pm["beta_Y"],
        "beta_Delta": pm["beta_Delta"][model.delta_index(pm["beta_Y"].shape[0])],
        "sigma": pm["sigma"],
        "alpha": pm.get("alpha", pm["sigma"]),
    }
    if "rho" in pm:
        latent0["corr"] = (pm["rho"] / pm["sigma"]).clamp(1e-3, 1 - 1e-3)
    latent0 = {k: latent0[k] for k in _sites(model, data)}
    pyro.set_rng_seed(seed)
    kernel = NUTS(
        model.pyro_model,
        init_strategy=init_to_value(values=latent0),
        max_tree_depth=max_tree_depth,
        full_mass=full_mass,
        jit_compile=jit,
        ignore_jit_warnings=True,
    )
    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup, disable_progbar=not progress)
    mcmc.run(data)
    draws = {k: v.detach().to(torch.float64) for k, v in mcmc.get_samples().items()}
    diag = mcmc.diagnostics()
    div = diag.get("divergences", {})
    info = {
        "divergences": float(sum(len(v) for v in div.values())),
        "min_n_eff": float(min(float(diag[k]["n_eff"].min()) for k in draws)),
    }
    return Posterior(model, model.params(draws, data.X.shape[1] + 1), "nuts", info)


# --- synthetic data -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticConfig:
    """The authors' generator (``generate_synthetic_data_{bin_Y,heckman}.py``) and its defaults."""

    variant: Variant = Variant.UNIFORM
    n: int = 5000  # people
    m: int = 5  # coefficients including the intercept (m - 1 features)
    num_not_sparse: int = 2  # beta_Delta non-zero on the first num_not_sparse coefficients (intercept included)
    sigma_mean: float = 2.0
    sigma_std: float = 0.1
    alpha_mean: float | None = None  # None: 1 (normal: N(1, 0.1); uniform: exactly 1, the model's assumption)
    alpha_std: float | None = None
    rho_mean: float = 1.0  # Heckman: Cov(Z, u)
    rho_std: float = 0.1
    beta_Y_intercept_mean: float = -2.0
    beta_Delta_intercept_mean: float = 2.0  # Heckman: of beta_T
    intercept_std: float = 0.1
    beta_std: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "variant", _variant(self.variant))
        if self.n < 1 or self.m < 2 or not 1 <= self.num_not_sparse <= self.m:
            raise ValueError(
                f"need n >= 1, m >= 2 and 1 <= num_not_sparse <= m; got {self.n}, {self.m}, {self.num_not_sparse}"
            )


@dataclass(frozen=True)
class Simulation:
    data: Data  # what a model sees (Y NaN where untested)
    params: Params  # true beta_Y, beta_Delta, sigma, alpha (binary) or rho, beta_T (Heckman)
    Y_full: Tensor  # every outcome, untested included
    Z: Tensor  # the unobservables
    p_Y: Tensor  # sigmoid(r) (binary) or E[Y | X, Z] (Heckman)
    prevalence: float  # mean of Y_full (the authors' "true prevalence")


def simulate(config: SyntheticConfig = SyntheticConfig(), seed: int = 0) -> Simulation:
    """One synthetic data set with its parameters drawn as in the authors' code."""
    c, rng = config, np.random.default_rng(seed)
    n, m, k = c.n, c.m, c.num_not_sparse
    x = rng.normal(size=(n, m - 1))
    x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
    X1 = np.concatenate([np.ones((n, 1)), x], 1)
    sigma = rng.normal(c.sigma_mean, c.sigma_std)
    by = rng.normal(scale=c.beta_std, size=m)
    by[0] = rng.normal(c.beta_Y_intercept_mean, c.intercept_std)
    bd = np.zeros(m)
    bd[:k] = rng.normal(scale=c.beta_std, size=k)
    bd[0] = rng.normal(c.beta_Delta_intercept_mean, c.intercept_std)
    if c.variant is Variant.HECKMAN:
        rho = rng.normal(c.rho_mean, c.rho_std)
        if not 0 < rho < sigma:
            raise ValueError(f"drew rho = {rho:.3f} outside (0, sigma = {sigma:.3f}); change rho_mean / rho_std")
        e = rng.multivariate_normal([0.0, 0.0], [[sigma**2, rho], [rho, 1.0]], size=n)
        z = e[:, 0]
        bt = rho / sigma**2 * by  # beta_T: drawn on the expertise set, rho/sigma^2 beta_Y off it
        bt[:k] = bd[:k]
        bd = bt - rho / sigma**2 * by
        t = (X1 @ bt + e[:, 1] > 0).astype(np.float64)
        y = X1 @ by + z
        p_y, params = X1 @ by + z, {"rho": rho, "beta_T": bt}
    else:
        normal = c.variant is Variant.NORMAL
        am = 1.0 if c.alpha_mean is None else c.alpha_mean
        alpha = rng.normal(am, (0.1 if normal else 0.0) if c.alpha_std is None else c.alpha_std)
        z = rng.normal(0.0, sigma, size=n) if normal else rng.uniform(0.0, sigma, size=n)
        r = X1 @ by + z
        p_y = 1 / (1 + np.exp(-r))
        y = (rng.random(n) < p_y).astype(np.float64)
        t = (rng.random(n) < 1 / (1 + np.exp(-(alpha * r + X1 @ bd)))).astype(np.float64)
        params = {"alpha": alpha}
    truth = {
        k2: torch.as_tensor(np.asarray(v, dtype=np.float64))
        for k2, v in {"beta_Y": by, "beta_Delta": bd, "sigma": sigma, **params}.items()
    }
    data = make_data(x, t, np.where(t == 1, y, np.nan))
    return Simulation(data, truth, torch.as_tensor(y), torch.as_tensor(z), torch.as_tensor(p_y), float(y.mean()))


def auc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half)."""
    s, y = np.asarray(scores, dtype=np.float64).reshape(-1), np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"mismatched lengths: {s.shape[0]} scores, {y.shape[0]} labels")
    pos, neg = s[y == 1], s[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("AUC needs both positive and negative labels")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    allv = np.concatenate([pos, neg])[order]
    ranks = np.empty(len(allv))
    _, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    ranks[order] = (np.cumsum(counts) - (counts - 1) / 2)[inv]
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


# --- command line ---------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dpmlab.apps.selective_labels",
        description="Selective-labels risk model with domain constraints (Balachandar et al.)",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("simulate", help="write a synthetic data set (CSV) and its truth (JSON)")
    s.add_argument("--variant", default="uniform", choices=[v.value for v in Variant])
    s.add_argument("--n", type=int, default=5000)
    s.add_argument("--m", type=int, default=5, help="coefficients including the intercept")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="data CSV (features, T, Y empty where untested)")
    s.add_argument("--truth", help="JSON with the parameters, prevalence and every outcome")
    f = sub.add_parser("fit", help="posterior (NUTS) or MAP of a data CSV")
    f.add_argument("data", help="CSV with a header")
    f.add_argument("--variant", default="uniform", choices=[v.value for v in Variant])
    f.add_argument("--method", default="nuts", choices=["nuts", "map"])
    f.add_argument("--test-column", default="T")
    f.add_argument("--outcome-column", default="Y")
    f.add_argument("--prevalence", type=float, help="known mean of Y (prevalence constraint)")
    f.add_argument("--prevalence-weight", type=float, default=1e4)
    f.add_argument(
        "--testing-features",
        help="comma-separated feature columns allowed to affect testing beyond "
        "risk (expertise constraint); empty string: intercept only",
    )
    f.add_argument("--known-sigma", type=float)
    f.add_argument("--known-alpha", type=float)
    f.add_argument("--samples", type=int, default=500)
    f.add_argument("--warmup", type=int, default=500)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", help="posterior JSON")
    f.add_argument("--risk-out", help="CSV of each row's posterior-mean E[Y | X] and E[Y | X, T]")
    return p


def _cmd_simulate(a: argparse.Namespace) -> int:
    sim = simulate(SyntheticConfig(variant=a.variant, n=a.n, m=a.m), seed=a.seed)
    write_csv(a.out, sim.data)
    if a.truth:
        Path(a.truth).write_text(
            json.dumps(
                {
                    "params": {k: v.tolist() for k, v in sim.params.items()},
                    "prevalence": sim.prevalence,
                    "Y_full": sim.Y_full.tolist(),
                }
            )
        )
    d = sim.data
    print(f"wrote {a.out}: N = {d.X.shape[0]}, tested {float(d.T.mean()):.3f}, prevalence {sim.prevalence:.4f}")
    return 0


def _cmd_fit(a: argparse.Namespace) -> int:
    data = read_csv(a.data, test=a.test_column, outcome=a.outcome_column)
    tf: tuple[int, ...] | None = None
    if a.testing_features is not None:
        names = [s.strip() for s in a.testing_features.split(",") if s.strip()]
        unknown = [nm for nm in names if nm not in data.feature_names]
        if unknown:
            raise ValueError(
                f"--testing-features names unknown column(s) {', '.join(unknown)}; "
                f"features are {', '.join(data.feature_names)}"
            )
        tf = tuple(data.feature_names.index(nm) for nm in names)
    model = SelectiveLabelsModel(
        variant=a.variant,
        prevalence=a.prevalence,
        prevalence_weight=a.prevalence_weight,
        testing_features=tf,
        known_sigma=a.known_sigma,
        known_alpha=a.known_alpha,
    )
    post = (
        map_estimate(model, data, progress=True)
        if a.method == "map"
        else sample_posterior(model, data, num_samples=a.samples, warmup=a.warmup, seed=a.seed)
    )
    mean, iv = post.mean(), post.interval(0.9)
    labels = {"beta_Y": ["intercept", *data.feature_names]}
    labels["beta_Delta"] = labels["beta_T"] = labels["beta_Y"]
    print(f"{'parameter':<28}{'mean':>10}{'5%':>10}{'95%':>10}")
    for k, v in mean.items():
        for j, x in enumerate(v.reshape(-1).tolist()):
            name = f"{k}[{labels[k][j]}]" if k in labels else k
            print(f"{name:<28}{x:>10.4f}{float(iv[k][0].reshape(-1)[j]):>10.4f}{float(iv[k][1].reshape(-1)[j]):>10.4f}")
    for k, val in post.info.items():
        print(f"{k}: {val:g}")
    if a.out:
        Path(a.out).write_text(json.dumps(post.to_dict()))
    if a.risk_out:
        r, rc = post.risk(data.X), post.risk(data.X, data.T)
        with open(a.risk_out, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["T", "risk", "risk_given_T"])
            w.writerows([int(t), f"{x:.6g}", f"{y:.6g}"] for t, x, y in zip(data.T.tolist(), r.tolist(), rc.tolist()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    torch.set_num_threads(1)
    run: Callable[[argparse.Namespace], int] = _cmd_simulate if a.cmd == "simulate" else _cmd_fit
    try:
        return run(a)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
