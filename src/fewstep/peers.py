"""Peer samplers on the same exact model, for `fewstep bench accuracy --peers`: diffusers schedulers and k-diffusion.

The problem every sampler solves: the probability-flow ODE of a Gaussian mixture under DiscreteVP.linear() (DDPM
betas, 1000 steps), from x = sigma(t=1) * noise (diffusers timestep 999) to the data (sigma = 0). The exact answer is
`GaussianMixture.flow_map`. diffusers schedulers get the exact eps model at their (possibly fractional) timesteps;
k-diffusion samplers get the exact denoiser D(x, sigma) in their sigma = sigma/alpha space. A peer's NFE is counted
by wrapping its model, and its step count is chosen so that it uses exactly the requested NFE.
"""

from __future__ import annotations

import importlib
import site
import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch

from .gmm import GaussianMixture
from .processes import DiscreteVP

PeerRun = Callable[[GaussianMixture, torch.Tensor, int], torch.Tensor]


class _Counted:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def _diffusers_peer(factory: Callable[[], object]) -> PeerRun:
    """A diffusers scheduler loop (scale_model_input, eps model, step) as a peer run."""

    def run(mixture: GaussianMixture, noise: torch.Tensor, steps: int) -> tuple[torch.Tensor, int]:
        process = DiscreteVP.linear()
        scheduler = factory()
        scheduler.alphas_cumprod = process.alphas_cumprod.clone()  # float64 schedule (diffusers keeps float32)
        scheduler.set_timesteps(steps)
        eps = mixture.model(process, "eps")

        def model(x, k):
            t = process.time_from_timestep(torch.as_tensor(float(k), dtype=torch.float64)).expand(x.shape[0])
            return eps(x, t)

        counted = _Counted(model)
        # Start as fewstep does, at t = 1 (timestep 999) from sigma(1) * noise in VP coordinates; sigma-space
        # schedulers (Euler, Heun, LMS) hold x / alpha and have init_noise_sigma = 1 / alpha(1).
        x = noise * float(process.sigma(1.0)) * float(scheduler.init_noise_sigma)
        for k in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, k)
            x = scheduler.step(counted(x_in, k), k, x).prev_sample
        return x, counted.calls

    return run


def _kdiffusion_sampling():
    """Import `k_diffusion.sampling` without the package's __init__ (which needs torchvision, CLIP, wandb...).

    Only the samplers are used; `k_diffusion.utils` imports torchvision's image transforms at module level, so a
    placeholder module stands in for them (no sampler touches it). Returns None when k-diffusion is absent.
    """
    for base in site.getsitepackages() + [site.getusersitepackages()]:
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


def _kdiffusion_peer(sampler: str, sigmas: str) -> PeerRun:
    def run(mixture: GaussianMixture, noise: torch.Tensor, steps: int) -> tuple[torch.Tensor, int]:
        kd = _kdiffusion_sampling()
        process = DiscreteVP.linear()
        sigma_max = float(process.sigma(1.0) / process.alpha(1.0))
        sigma_min = float(process.sigma(process.t_min) / process.alpha(process.t_min))
        if sigmas == "karras":
            grid = kd.get_sigmas_karras(steps, sigma_min, sigma_max, device="cpu").double()
        else:
            grid = kd.get_sigmas_exponential(steps, sigma_min, sigma_max, device="cpu").double()

        def denoiser(x, sigma):  # EDM space: x = x0 + sigma * eps
            return mixture.posterior_mean(x, 1.0, sigma.to(torch.float64))[0]

        counted = _Counted(denoiser)
        x = getattr(kd, sampler)(counted, noise * sigma_max, grid, disable=True)
        return x, counted.calls

    return run


def peers() -> dict[str, PeerRun]:
    """The installed peers: name -> run(mixture, noise, steps) -> (x0, nfe)."""
    found: dict[str, PeerRun] = {}
    try:
        import diffusers as d
    except ImportError:
        d = None
    if d is not None:
        d.utils.logging.set_verbosity_error()  # their config-fix-up notices would flood the benchmark output
        base = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
        configs = {
            "diffusers DDIM": lambda: d.DDIMScheduler(**base, clip_sample=False, set_alpha_to_one=True,
                                                      timestep_spacing="linspace"),
            "diffusers DPMSolverMultistep 2M": lambda: d.DPMSolverMultistepScheduler(**base),
            "diffusers DPMSolverMultistep 3M": lambda: d.DPMSolverMultistepScheduler(**base, solver_order=3),
            "diffusers DPMSolverMultistep 2M karras": lambda: d.DPMSolverMultistepScheduler(**base, use_karras_sigmas=True),
            "diffusers DPMSolverMultistep 2M lu-lambdas": lambda: d.DPMSolverMultistepScheduler(**base, use_lu_lambdas=True),
            "diffusers DPMSolverSinglestep 2": lambda: d.DPMSolverSinglestepScheduler(**base, solver_order=2),
            "diffusers DPMSolverSinglestep 3": lambda: d.DPMSolverSinglestepScheduler(**base, solver_order=3),
            "diffusers UniPC bh2 (order 2)": lambda: d.UniPCMultistepScheduler(**base),
            "diffusers UniPC bh1 order 3": lambda: d.UniPCMultistepScheduler(**base, solver_type="bh1", solver_order=3),
            "diffusers UniPC bh2 karras": lambda: d.UniPCMultistepScheduler(**base, use_karras_sigmas=True),
            "diffusers DEIS 2": lambda: d.DEISMultistepScheduler(**base),
            "diffusers DEIS 3": lambda: d.DEISMultistepScheduler(**base, solver_order=3),
            "diffusers Euler": lambda: d.EulerDiscreteScheduler(**base, timestep_spacing="linspace"),
            "diffusers Euler karras": lambda: d.EulerDiscreteScheduler(**base, use_karras_sigmas=True,
                                                                       timestep_spacing="linspace"),
            "diffusers Heun": lambda: d.HeunDiscreteScheduler(**base, timestep_spacing="linspace"),
            "diffusers LMS": lambda: d.LMSDiscreteScheduler(**base, timestep_spacing="linspace"),
            "diffusers PNDM (PLMS)": lambda: d.PNDMScheduler(**base, skip_prk_steps=True, timestep_spacing="linspace"),
        }  # fmt: skip
        found.update({name: _diffusers_peer(factory) for name, factory in configs.items()})
    if _kdiffusion_sampling() is not None:
        for sampler in ("sample_euler", "sample_heun", "sample_dpm_2", "sample_lms", "sample_dpmpp_2m"):
            for sigmas in ("karras", "exponential"):
                found[f"k-diffusion {sampler.removeprefix('sample_')} {sigmas}"] = _kdiffusion_peer(sampler, sigmas)
    return found


def run_at_nfe(peer: PeerRun, mixture: GaussianMixture, noise: torch.Tensor, nfe: int) -> torch.Tensor | None:
    """The peer's result using exactly `nfe` model calls (None when no step count gives exactly that)."""
    for steps in range(1, nfe + 1):
        x, used = peer(mixture, noise, steps)
        if used == nfe:
            return x
        if used > nfe:
            return None
    return None
