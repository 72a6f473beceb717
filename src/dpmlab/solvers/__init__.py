"""Solvers: the core (``Problem``, ``Solver``, ``sample``, ``iterate``, registry) and one file per paper.

Importing this package registers every solver; ``get(name, **options)`` builds one by name.
"""

from . import adaptive as adaptive
from . import dc_solver as dc_solver
from . import ddim as ddim
from . import ddpm as ddpm
from . import deis as deis
from . import dmcmc as dmcmc
from . import dpm_solver as dpm_solver
from . import dpm_solver_pp as dpm_solver_pp
from . import dpm_solver_v3 as dpm_solver_v3
from . import dualfast as dualfast
from . import karras as karras
from . import pndm as pndm
from . import time_shift as time_shift
from . import unipc as unipc
from . import usf as usf
from .base import Problem as Problem
from .base import SeededNoise as SeededNoise
from .base import Solver as Solver
from .base import StepInfo as StepInfo
from .base import available as available
from .base import get as get
from .base import iterate as iterate
from .base import register as register
from .base import sample as sample
from .base import solver_class as solver_class
from .ddim import DDIM as DDIM
from .ddpm import DDPM as DDPM
from .karras import Euler as Euler
from .karras import Heun as Heun
