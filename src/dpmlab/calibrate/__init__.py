"""Calibration: ``fit_*`` functions that turn a model into a saved artifact passed to a solver.

* ``dc``   DC-Solver compensation ratios and their cascade polynomial regression
* ``ems``  empirical model statistics of DPM-Solver-v3 (``fit_ems`` -> ``EMS``)
* ``s3``   S3 search of USF plans (``fit_s3_plan`` -> ``Plan``)

``artifact_options(solver, path, model=..., nfe=...)`` turns a saved artifact into the solver's options,
validated against the model (and NFE) it is used with — the one loader behind ``dpmlab sample --artifact``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from . import dc as dc
from . import ems as ems
from . import grid as grid
from . import s3 as s3

__all__ = ["ARTIFACT_OPTIONS", "NEEDS_ARTIFACT", "artifact_options", "dc", "ems", "s3"]

# solvers that run from a fitted artifact, and the options an artifact fills
ARTIFACT_OPTIONS = {"dpm_solver_v3": ("ems",), "dc_solver": ("ratios", "dc_order"), "usf": ("plan",)}
NEEDS_ARTIFACT = {"dpm_solver_v3": "ems", "dc_solver": "ratios"}  # without it they are their base solver


def artifact_options(
    solver: str, path: str, *, model: str, nfe: int, options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``options`` (the solver's other options) plus those the artifact at ``path`` holds for ``solver``,
    validated against the ``model`` name (and ``nfe``) it is used with. ``path == "none"``: no artifact, on
    purpose (the solver runs as its base). Options given twice (in ``options`` and by the artifact) raise."""
    out = dict(options or {})
    keys = ARTIFACT_OPTIONS.get(solver)
    if keys is None:
        raise ValueError(f"solver {solver!r} takes no artifact; artifacts are for {', '.join(ARTIFACT_OPTIONS)}")
    clash = [k for k in keys if k in out]
    if clash:
        raise ValueError(f"the solver options set {', '.join(clash)} and the artifact gives it too; use one of them")
    if path == "none":
        return out
    if solver == "dpm_solver_v3":
        from ..solvers.dpm_solver_v3 import EMS

        EMS.load(path, model=model)  # validates format, shapes and the model name
        out["ems"] = path
    elif solver == "dc_solver":
        from ..solvers.dc_solver import DCRatios

        ratios = DCRatios.load(path)
        if ratios.model and ratios.model != model:
            raise ValueError(f"{path} holds DC ratios fitted for model {ratios.model!r}, not {model!r}")
        out["ratios"] = ratios  # the DCRatios: its grid / NFE / base are checked against the run
        out["dc_order"] = ratios.dc_order
        if ratios.solver:
            out.setdefault("base", json.loads(ratios.solver))
    else:
        from ..solvers.usf import Plan

        out["plan"] = Plan.load(path, model=model, nfe=nfe)
    return out
