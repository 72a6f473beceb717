"""Calibration: ``fit_*`` functions that turn a model into a saved artifact passed to a solver.

* ``dc``   DC-Solver compensation ratios and their cascade polynomial regression
* ``ems``  empirical model statistics of DPM-Solver-v3 (``fit_ems`` -> ``EMS``)
* ``s3``   S3 search of USF plans (``fit_s3_plan`` -> ``Plan``)
"""

from . import dc as dc
from . import ems as ems
from . import s3 as s3
