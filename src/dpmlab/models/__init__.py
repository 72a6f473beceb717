"""Models: the ``Denoiser`` wrapper, analytic oracles and (later) trainable networks."""

from .analytic import AnalyticDenoiser as AnalyticDenoiser
from .analytic import EmpiricalData as EmpiricalData
from .analytic import GaussianMixture as GaussianMixture
from .denoiser import Denoiser as Denoiser
from .denoiser import Prediction as Prediction
from .reference import reference_solution as reference_solution
