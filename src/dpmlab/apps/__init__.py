"""Applications: papers that use a model for a downstream job. Each is one module, imported lazily so that
``import dpmlab.apps`` loads nothing (and no optional dependency) until a module is asked for:

* ``selective_labels`` — Balachandar, Garg & Pierson, "Domain constraints improve risk prediction when outcome
  data is missing" (ICLR 2024): a Bayesian model of tests and outcomes with prevalence and expertise
  constraints, inferred with Pyro (NUTS, MAP). Not a diffusion model; it imports nothing from dpmlab.
* ``unlearn_attack`` — Zhang et al., "To Generate or Not? Safety-Driven Unlearned Diffusion Models Are Still Easy
  To Generate Unsafe Images ... For Now" (ECCV 2024): UnlearnDiffAtk prompt attack on an ESD-erased ``mnist_t2i``.
* ``sda`` — Guo et al., "Everything to the Synthetic: Diffusion-driven Test-time Adaptation via Synthetic-Domain
  Alignment" (CVPR 2025): DDA's low-pass-guided projection, a projected synthetic set to fine-tune the source
  classifier on, the logit ensemble; a seeded corruption suite for digits.
* ``change_detection`` — Bandara, Nair & Patel, "DDPM-CD: Denoising Diffusion Probabilistic Models as Feature
  Extractors for Change Detection" (WACV 2025): multi-timestep decoder features of a frozen diffusion UNet and a
  symmetric |difference| change head; synthetic digit-scene pairs with exact change masks.

Command lines: ``python -m dpmlab.apps.<module> --help``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["selective_labels", "unlearn_attack", "sda", "change_detection"]


def __getattr__(name: str) -> ModuleType:
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}; applications: {', '.join(__all__)}")
