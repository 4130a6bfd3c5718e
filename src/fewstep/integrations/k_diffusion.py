"""k-diffusion's denoiser convention, both ways: a fewstep model as D(x, sigma), and D(x, sigma) as a fewstep model.

k-diffusion (Crowson; Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", NeurIPS
2022) samples in "VE" coordinates: x = x0 + sigma eps, with a denoiser D(x, sigma, **extra_args) -> x0. A fewstep
process x_t = alpha(t) x0 + sigma(t) eps is the same ODE in those coordinates with sigma = sigma(t) / alpha(t) and
x = x_t / alpha(t) (the time t with that ratio is `process.t_from_log_snr(-log sigma)`); the other way, a k-diffusion
denoiser is a fewstep x0-model on `EDM(sigma_min, sigma_max)` (alpha = 1, sigma = t). Shapes: x [batch, ...],
sigma [batch] (or a scalar).
"""

from __future__ import annotations

import importlib
import math
import site
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..checks import check_real
from ..parameterization import Coefficients, check_prediction, to_x0_eps
from ..processes import EDM, Process

RANGE_TOLERANCE = 1e-6  # relative: sigmas this close outside the process's range are clamped to it


def k_sigma(process: Process, t: float) -> float:
    """k-diffusion's sigma = sigma(t) / alpha(t) at a fewstep time t (inf where alpha = 0)."""
    alpha, sigma = float(process.alpha(t)), float(process.sigma(t))
    return sigma / alpha if alpha > 0 else math.inf


def _time_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class KDiffusionDenoiser:
    """A fewstep model as a k-diffusion denoiser: D(x, sigma, **extra) -> x0 with x = x0 + sigma eps.

    `sigma_min`, `sigma_max`: the k-diffusion sigmas of the process's time range (what k-diffusion's wrappers expose);
    a sigma outside it is a ValueError. `extra` is passed to the model: `model(x_t, t, **extra)`.
    """

    def __init__(self, model: Callable[..., torch.Tensor], process: Process, prediction: str):
        if not callable(model):
            raise TypeError(f"model must be a callable model(x, t) -> Tensor, got {type(model).__name__}")
        if not isinstance(process, Process):
            raise TypeError(f"process must be a fewstep Process (e.g. fewstep.EDM()), got {type(process).__name__}")
        self.model, self.process, self.prediction = model, process, check_prediction(prediction)
        self.sigma_min, self.sigma_max = k_sigma(process, process.t_min), k_sigma(process, process.t_max)

    def time(self, sigma: torch.Tensor) -> torch.Tensor:
        """fewstep times [batch] (float64) of k-diffusion sigmas [batch], checked against the process's range."""
        s64 = sigma.detach().to(torch.float64)
        lo, hi = float(s64.min()), float(s64.max())  # one host sync per evaluation, as k-diffusion's own wrappers
        if not (lo >= self.sigma_min * (1 - RANGE_TOLERANCE) and hi <= self.sigma_max * (1 + RANGE_TOLERANCE)):
            raise ValueError(
                f"sigma must lie in [{self.sigma_min:.6g}, {self.sigma_max:.6g}] (sigma/alpha over the time range of "
                f"{self.process!r}), got sigmas in [{lo:.6g}, {hi:.6g}]"
            )
        t = self.process.t_from_log_snr(-torch.log(s64))
        return t.clamp(self.process.t_min, self.process.t_max)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float, **extra: Any) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        if sigma.shape != (x.shape[0],):
            raise ValueError(f"sigma must be a scalar or of shape [batch] = [{x.shape[0]}], got shape {tuple(sigma.shape)}")
        t = self.time(sigma)
        c = Coefficients.of(self.process, t, x)
        x_t = x * c.alpha
        out = self.model(x_t, t.to(_time_dtype(x)), **extra)
        return to_x0_eps(out, self.prediction, x_t, c)[0]

    def __repr__(self) -> str:
        return f"KDiffusionDenoiser({self.process!r}, prediction={self.prediction!r})"


def to_k_diffusion(model: Callable[..., torch.Tensor], process: Process, prediction: str) -> KDiffusionDenoiser:
    """A fewstep model `model(x, t)` predicting `prediction` on `process` as a k-diffusion denoiser D(x, sigma, **extra).

    Run k-diffusion's samplers on it with sigmas in [D.sigma_min, D.sigma_max] followed by 0, starting from
    x = sigma_0 * noise.
    """
    return KDiffusionDenoiser(model, process, prediction)


class FromKDiffusion:
    """A k-diffusion denoiser D(x, sigma, **extra) as a fewstep x0-model on EDM: model(x, t, **extra) = D(x, t, **extra)."""

    def __init__(self, denoiser: Callable[..., torch.Tensor]):
        if not callable(denoiser):
            raise TypeError(f"denoiser must be a callable D(x, sigma) -> x0, got {type(denoiser).__name__}")
        self.denoiser = denoiser

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **extra: Any) -> torch.Tensor:
        return self.denoiser(x, t, **extra)

    def __repr__(self) -> str:
        return f"FromKDiffusion({self.denoiser!r})"


def from_k_diffusion(
    denoiser: Callable[..., torch.Tensor], sigma_min: float | None = None, sigma_max: float | None = None
) -> tuple[FromKDiffusion, EDM, str]:
    """(model, process, prediction) for `fewstep.sample` from a k-diffusion denoiser D(x, sigma, **extra) -> x0.

    sigma_min, sigma_max: the denoiser's sigma range; read from `denoiser.sigma_min` / `.sigma_max` when not given
    (k-diffusion's wrapped models, e.g. `DiscreteEpsDDPMDenoiser`, `CompVisDenoiser`, expose them). The process is
    `EDM(sigma_min, sigma_max)` (x = x0 + t eps), the prediction "x0"; sampling starts at x = sigma_max * noise.
    """
    bounds = []
    for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
        if value is None:
            value = getattr(denoiser, name, None)
            if value is None:
                raise ValueError(f"{name} is needed: pass it, or a denoiser with a {name} attribute (k-diffusion's wrappers)")
        bounds.append(check_real(value, name, positive=True))
    return FromKDiffusion(denoiser), EDM(*bounds), "x0"


def kdiffusion_sampling() -> types.ModuleType | None:
    """`k_diffusion.sampling`, imported without the package's __init__ (which needs torchvision, CLIP, wandb...).

    Only the samplers are used; `k_diffusion.utils` imports torchvision's image transforms at module level, so a
    placeholder module stands in for them (no sampler touches it). k-diffusion is looked for in the site packages
    and on sys.path (e.g. PYTHONPATH). Returns None when k-diffusion is absent.
    """
    for base in site.getsitepackages() + [site.getusersitepackages()] + [p for p in sys.path if p]:
        path = Path(base) / "k_diffusion"
        if (path / "sampling.py").exists():
            break
    else:
        return None
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    try:
        import torchvision.transforms.functional  # noqa: F401
    except Exception:  # no usable torchvision here: stand-ins for the image helpers k_diffusion.utils imports
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
            sys.modules.setdefault(name, types.ModuleType(name))
        sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
        sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
    package = types.ModuleType("k_diffusion")
    package.__path__ = [str(path)]
    sys.modules.setdefault("k_diffusion", package)
    try:
        return importlib.import_module("k_diffusion.sampling")
    except ImportError:
        return None
