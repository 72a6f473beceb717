"""dpmlab: fast, training-free sampling for diffusion probabilistic models.

import dpmlab
x = dpmlab.sample("gmm2d", n=1000, solver="ddim", nfe=10, seed=0)
"""

from . import editing as editing
from . import models as models
from . import schedules as schedules
from . import solvers as solvers
from . import timesteps as timesteps
from ._version import __version__ as __version__
from .api import sample as sample
from .models.hub import load as load

__all__ = ["load", "sample", "editing", "models", "schedules", "solvers", "timesteps", "__version__"]
