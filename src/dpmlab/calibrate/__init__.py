"""Calibration: ``fit_*`` functions that turn a model into a saved artifact passed to a solver.

* ``ems``  empirical model statistics of DPM-Solver-v3 (``fit_ems`` -> ``EMS``)
"""

from . import ems as ems
