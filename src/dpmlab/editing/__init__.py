"""Editing: methods that act on real data through a frozen model and a solver (above ``solvers``).

* ``inversion``  DDIM inversion with any deterministic solver; edit-friendly DDPM inversion
                 (Huberman-Spiegelglas et al., CVPR 2024), regeneration and editing.
"""

from .inversion import DDPMInversion as DDPMInversion
from .inversion import edit as edit
from .inversion import guided as guided
from .inversion import invert as invert
from .inversion import invert_ddpm as invert_ddpm
from .inversion import regenerate as regenerate

__all__ = ["DDPMInversion", "edit", "guided", "invert", "invert_ddpm", "regenerate"]
