"""Models: the ``Denoiser`` wrapper, analytic oracles and trainable networks (UNet, MLP)."""

from .analytic import AnalyticDenoiser as AnalyticDenoiser
from .analytic import EmpiricalData as EmpiricalData
from .analytic import GaussianMixture as GaussianMixture
from .denoiser import Denoiser as Denoiser
from .denoiser import Prediction as Prediction
from .mlp import MLP as MLP
from .mlp import MLPConfig as MLPConfig
from .nets import EDMPrecond as EDMPrecond
from .nets import ModelSpec as ModelSpec
from .reference import reference_solution as reference_solution
from .unet import UNet as UNet
from .unet import UNetConfig as UNetConfig
