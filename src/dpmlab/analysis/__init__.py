"""Analysis of trained or analytic models (Horvat & Pfister, ICLR 2024, arXiv 2402.03845; Stanczuk et al.,
arXiv 2212.12611). Modules, imported lazily (so ``python -m dpmlab.analysis.intrinsic_dimension`` runs cleanly):

* ``gauge`` — gauge fields ``g`` with ``div(p_t g) = 0`` (they leave sampling exact), the degenerate Gaussian
  oracle (data on a subspace, exact score and flow map), divergence and gauge-residual checks by autograd;
* ``intrinsic_dimension`` — the normal-space estimator from stacked scores, the flow-map Jacobian spectrum;
* ``conservative`` — the conservative score parameterisation ``eps_hat = grad_x E`` and Jacobian asymmetry.

Command line: ``python -m dpmlab.analysis.intrinsic_dimension --help``.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["gauge", "intrinsic_dimension", "conservative"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}; modules: {', '.join(__all__)}")
