"""Training: data sets, losses (eps / x0 / v targets, EDM preconditioning and weighting) and the
trainer: ``fit`` trains any ``TrainObjective`` (AdamW, warm-up, clipping, EMA, atomic checkpoints, bit-exact
resume, ``accelerate``); ``train`` fits a recipe's ``DiffusionObjective``."""

from .data import DataConfig as DataConfig
from .data import Dataset as Dataset
from .data import load_data as load_data
from .losses import EDMLoss as EDMLoss
from .losses import PredictionLoss as PredictionLoss
from .losses import make_loss as make_loss
from .trainer import DiffusionObjective as DiffusionObjective
from .trainer import ModelConfig as ModelConfig
from .trainer import Recipe as Recipe
from .trainer import TrainConfig as TrainConfig
from .trainer import TrainObjective as TrainObjective
from .trainer import TrainResult as TrainResult
from .trainer import fit as fit
from .trainer import load_recipe as load_recipe
from .trainer import train as train
