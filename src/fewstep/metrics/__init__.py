"""Sample-quality metrics: Frechet distance, k-NN precision/recall, sliced Wasserstein distance, MMD, energy distance.

Feature-space metrics for the 8x8 digits use the small classifier in `fewstep.tools.classifier`.
"""

from .energy import energy_distance
from .frechet import frechet_distance, gaussian_frechet_distance
from .mmd import mmd_rbf
from .precision_recall import precision_recall
from .sliced import sliced_wasserstein

__all__ = [
    "energy_distance",
    "frechet_distance",
    "gaussian_frechet_distance",
    "mmd_rbf",
    "precision_recall",
    "sliced_wasserstein",
]
