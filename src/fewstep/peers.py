"""Comparison with peer libraries (`fewstep bench accuracy --peers`): diffusers schedulers and k-diffusion samplers
on the same exact model as fewstep's entries and searched grids.

The problem every sampler solves: the probability-flow ODE of a Gaussian mixture under DiscreteVP.linear() (DDPM
betas, 1000 steps), from x = sigma(t=1) * noise (diffusers timestep 999) to the data (sigma = 0). The exact answer is
`GaussianMixture.flow_map`. diffusers schedulers get the exact eps model at their (possibly fractional) timesteps;
k-diffusion samplers get the exact denoiser D(x, sigma) in their sigma = sigma/alpha space. A peer's NFE is counted
by wrapping its model, and its step count is chosen so that it uses exactly the requested NFE.
"""

from __future__ import annotations

import importlib
import math
import site
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .accuracy import rms_error
from .bench import AccuracyRow
from .budget import plan_for_nfe
from .gmm import GaussianMixture, problem
from .grids import ScheduleLike
from .processes import DiscreteVP
from .sampling import sample

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
            # DDIM steps from t to t - N // steps whatever its spacing, so only "trailing" (which starts at 999 like
            # everyone here) is consistent with its own timesteps (to one timestep).
            "diffusers DDIM": lambda: d.DDIMScheduler(**base, clip_sample=False, set_alpha_to_one=True,
                                                      timestep_spacing="trailing"),
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


SEARCHED_LABEL = "fewstep searched grid"


@dataclass(frozen=True)
class Entry:
    """A fewstep configuration in the peer comparison: solver, grid and options (per NFE, via `pick`)."""

    label: str
    pick: Callable[[int], tuple[str, ScheduleLike, dict]]


def fixed(solver: str, schedule: ScheduleLike, **options) -> Entry:
    name = schedule if isinstance(schedule, str) else repr(schedule)
    label = f"fewstep {solver} / {name}" + "".join(f", {k}={v}" for k, v in options.items())
    return Entry(label, lambda nfe: (solver, schedule, options))


def peer_accuracy(
    problems: Sequence[str],
    nfes: Sequence[int],
    entries: Sequence[Entry],
    *,
    search_solvers: Sequence[str] = (),
    search_t_ends: Sequence[float] = (1e-3, 0.01, 0.03),
    samples: int = 256,
    calibration: int = 64,
    search_iters: int = 30,
    seed: int = 0,
    progress: bool = True,
) -> list[AccuracyRow]:
    """fewstep entries, a searched grid and every installed peer on DiscreteVP.linear(), against the exact flow map.

    The exact answer is the probability-flow ODE from sigma(1) * noise all the way to sigma = 0
    (`GaussianMixture.flow_map`), whatever time a sampler stops at. `search_solvers`, `search_t_ends`: for each NFE
    the interior grid times of each of these solvers, ending (before the final denoising) at each of these times,
    are optimised (`optimize_schedule`) on calibration noise drawn with another seed than the evaluation noise;
    the candidate with the lowest calibration error is evaluated.
    """
    from tqdm.auto import tqdm

    from .schedule_search import optimize_schedule

    process = DiscreteVP.linear()
    peer_runs = peers()
    rows = []
    total = len(problems) * len(nfes) * (len(entries) + len(peer_runs) + bool(search_solvers))
    with tqdm(total=total, desc="bench accuracy --peers", disable=not progress) as bar:
        for name in problems:
            mixture = problem(name)
            noise = torch.randn(samples, mixture.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            reference = mixture.flow_map(noise, process)
            model = mixture.model(process, "eps")
            for entry in entries:
                errors = {}
                for nfe in nfes:
                    bar.update(1)
                    solver, schedule, options = entry.pick(nfe)
                    try:
                        steps, denoise = plan_for_nfe(solver, nfe, process)
                        x = sample(model, noise, process=process, solver=solver, steps=steps, schedule=schedule,
                                   denoise_to_zero=denoise, **options)  # fmt: skip
                        errors[nfe] = rms_error(x, reference)
                    except ValueError:
                        errors[nfe] = math.nan
                rows.append(AccuracyRow(name, repr(process), entry.label, "", errors))
            if search_solvers:
                calibration_noise = torch.randn(
                    calibration, mixture.dim, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64
                )
                calibration_reference = mixture.flow_map(calibration_noise, process)
                errors = {}
                for nfe in nfes:
                    bar.update(1)
                    found = []
                    for solver in search_solvers:
                        for t_end in search_t_ends:
                            try:
                                found.append(optimize_schedule(
                                    model, process, solver, nfe, calibration_noise, reference=calibration_reference,
                                    init=["logsnr", "quadratic", "karras", "time_uniform"], iters=search_iters,
                                    t_end=t_end,
                                ))  # fmt: skip
                            except ValueError:  # NFE not reachable by this solver
                                continue
                    best = min(found, key=lambda grid: grid.error)  # chosen on calibration noise only
                    x = sample(model, noise, process=process, **best.sample_kwargs())
                    errors[nfe] = rms_error(x, reference)
                rows.append(AccuracyRow(name, repr(process), SEARCHED_LABEL, "", errors))
            for peer_name, run in peer_runs.items():
                errors = {}
                for nfe in nfes:
                    bar.update(1)
                    x = run_at_nfe(run, mixture, noise, nfe)
                    errors[nfe] = math.nan if x is None else rms_error(x, reference)
                rows.append(AccuracyRow(name, repr(process), peer_name, "", errors))
    return rows


def peer_summary(
    rows: Sequence[AccuracyRow], nfes: Sequence[int], default_label: str, searched_label: str = SEARCHED_LABEL
) -> str:
    """Per problem and NFE: the best peer, fewstep's recommended default and searched grid, and their ratios."""
    lines = ["| problem | NFE | best peer | its error | fewstep default | ratio | searched grid | ratio |", "|---|" * 8]
    lines[1] = "|" + "---|" * 8
    for name in dict.fromkeys(r.problem for r in rows):
        group = [r for r in rows if r.problem == name]
        peer_rows = [r for r in group if not r.solver.startswith("fewstep")]
        default = next(r for r in group if r.solver == default_label)
        searched = next((r for r in group if r.solver == searched_label), None)
        for n in nfes:
            finite = [r for r in peer_rows if math.isfinite(r.errors[n])]
            if not finite:
                continue
            best = min(finite, key=lambda r: r.errors[n])
            d = default.errors[n]
            s = searched.errors[n] if searched else math.nan
            lines.append(
                f"| {name} | {n} | {best.solver} | {best.errors[n]:.2e} | {d:.2e} | {d / best.errors[n]:.2f} | "
                f"{s:.2e} | {s / best.errors[n]:.2f} |"
            )
    return "\n".join(lines) + "\n"


def peer_markdown(rows: Sequence[AccuracyRow], nfes: Sequence[int]) -> str:
    """One table per problem: every fewstep entry and peer at each NFE, the best in bold."""
    lines = []
    for name in dict.fromkeys(r.problem for r in rows):
        group = [r for r in rows if r.problem == name]
        best = {n: min((r.errors[n] for r in group if math.isfinite(r.errors[n])), default=math.nan) for n in nfes}
        lines += [f"\n**{name}**, DiscreteVP(linear), eps model; RMS error vs the exact flow map (noise -> data)\n"]
        lines += ["| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
        for r in group:
            cells = []
            for n in nfes:
                e = r.errors[n]
                cell = "-" if not math.isfinite(e) else f"{e:.2e}"
                cells.append(f"**{cell}**" if e == best[n] else cell)
            lines.append(f"| {r.solver} | " + " | ".join(cells) + " |")
    return "\n".join(lines).lstrip("\n") + "\n"
