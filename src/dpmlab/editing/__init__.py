"""Editing: methods that act on real data through a frozen model and a solver (above ``solvers``).

* ``inversion``  DDIM inversion with any deterministic solver; edit-friendly DDPM inversion
                 (Huberman-Spiegelglas et al., CVPR 2024), regeneration and editing.
* ``boundary``   BoundaryDiffusion (Zhu et al., NeurIPS 2023): linear SVM boundaries in z- and h-space at
                 the mixing step, edits onto the plane at a signed distance, the mixing-step search.
"""

from .boundary import Boundary as Boundary
from .boundary import Latents as Latents
from .boundary import MixingProfile as MixingProfile
from .boundary import bottleneck as bottleneck
from .boundary import boundary_edit as boundary_edit
from .boundary import fit_boundary as fit_boundary
from .boundary import invert_to as invert_to
from .boundary import mixing_profile as mixing_profile
from .boundary import sample_to as sample_to
from .inversion import DDPMInversion as DDPMInversion
from .inversion import edit as edit
from .inversion import guided as guided
from .inversion import invert as invert
from .inversion import invert_ddpm as invert_ddpm
from .inversion import regenerate as regenerate

__all__ = [
    "DDPMInversion",
    "edit",
    "guided",
    "invert",
    "invert_ddpm",
    "regenerate",
    "Boundary",
    "Latents",
    "MixingProfile",
    "bottleneck",
    "boundary_edit",
    "fit_boundary",
    "invert_to",
    "mixing_profile",
    "sample_to",
]
