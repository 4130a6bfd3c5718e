"""fewstep: few-step diffusion sampling, training and distillation on one exact core."""

from .gmm import GaussianMixture, mixture_nd, problem, ring2d
from .grids import SCHEDULES, time_grid
from .parameterization import PREDICTIONS, Denoiser, ModelError, Prediction, convert
from .processes import EDM, VE, VP, DiscreteVP, Process, RectifiedFlow
from .sampling import sample, solvers

__version__ = "0.1.0"

__all__ = [
    "EDM",
    "PREDICTIONS",
    "SCHEDULES",
    "VE",
    "VP",
    "Denoiser",
    "DiscreteVP",
    "GaussianMixture",
    "ModelError",
    "Prediction",
    "Process",
    "RectifiedFlow",
    "convert",
    "mixture_nd",
    "problem",
    "ring2d",
    "sample",
    "solvers",
    "time_grid",
]
