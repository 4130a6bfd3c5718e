"""Comparison with peer libraries: diffusers schedulers and k-diffusion samplers run on a fewstep model.

One adapter serves `fewstep bench accuracy --peers` (the exact eps model of a Gaussian mixture under
DiscreteVP.linear(), against the exact flow map) and `fewstep bench learned` (the shipped networks, against a
many-step reference). A `Target` is any fewstep model: `model(x, t)` predicting `prediction` on `process`.

- DiscreteVP with eps, v or x0 prediction: diffusers schedulers get the process's betas (and its float64
  alphas_cumprod) and the prediction type the model predicts ("epsilon", "v_prediction", "sample"; PNDM, which only
  takes eps or v, gets an x0 model's output converted to eps by `fewstep.convert`); the model is called at the
  scheduler's (possibly fractional) timestep k as t = `process.time_from_timestep(k)`. k-diffusion samplers get the
  denoiser D(x, sigma) in their sigma = sigma/alpha space, the model's prediction converted to x0 by
  `fewstep.convert` at t = `process.t_from_log_snr(-2 log sigma)`.
- RectifiedFlow with velocity prediction: the diffusers schedulers that take flow prediction (FlowMatchEuler,
  FlowMatchHeun; DPMSolverMultistep, DPMSolverSinglestep, UniPC and DEIS with use_flow_sigmas), the model called
  at t = timestep / num_train_timesteps. k-diffusion has no flow sampler: its sigma = t / (1 - t) is infinite at the
  flow's start.

Every sampler starts from x = sigma(t_max) * noise (diffusers timestep N - 1 / flow sigma 1). A peer's NFE is
counted by wrapping its model, and its step count is chosen so that it uses exactly the requested NFE (probed on
one sample, then run on the batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..accuracy import rms_error
from ..budget import plan_for_nfe
from ..gmm import GaussianMixture, problem
from ..grids import ScheduleLike
from ..integrations.conventions import DIFFUSERS_PREDICTION
from ..integrations.k_diffusion import k_sigma, kdiffusion_sampling, to_k_diffusion
from ..parameterization import convert
from ..processes import DiscreteVP, Process, RectifiedFlow
from ..sampling import sample
from .bench import AccuracyRow


@dataclass(frozen=True)
class Target:
    """What a peer samples: `model(x, t)` (t in the process's own time, [batch]) predicting `prediction` on `process`."""

    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    process: Process
    prediction: str


def mixture_target(mixture: GaussianMixture, process: Process | None = None, prediction: str = "eps") -> Target:
    """The exact model of a Gaussian mixture as a peer target (default: eps on DiscreteVP.linear())."""
    process = DiscreteVP.linear() if process is None else process
    return Target(mixture.model(process, prediction), process, prediction)


def as_target(target: Target | GaussianMixture) -> Target:
    return mixture_target(target) if isinstance(target, GaussianMixture) else target


PeerRun = Callable[[Target, torch.Tensor, int], tuple[torch.Tensor, int]]


class _Counted:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def _time(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A scalar time as the [batch] tensor a fewstep model takes (float64 for float64 x, else float32)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return t.to(device=x.device, dtype=dtype).reshape(()).expand(x.shape[0])


EPS_OR_V_ONLY = ("PNDMScheduler",)  # schedulers that reject "sample": an x0 model's output goes in as eps


def _set_schedule(scheduler, process: DiscreteVP) -> None:
    """The process's float64 alphas_cumprod in the scheduler (diffusers keeps float32) and what it derives from it."""
    ac = process.alphas_cumprod.clone()
    scheduler.alphas_cumprod = ac
    if hasattr(scheduler, "lambda_t"):  # DPM-Solver family: used to clip the last timesteps (lambda_min_clipped)
        scheduler.alpha_t, scheduler.sigma_t = ac.sqrt(), (1 - ac).sqrt()
        scheduler.lambda_t = scheduler.alpha_t.log() - scheduler.sigma_t.log()


def _diffusers_peer(factory: Callable[[], object]) -> PeerRun:
    """A diffusers scheduler loop (scale_model_input, model, step) on a fewstep model, as a peer run."""

    def run(target: Target, noise: torch.Tensor, steps: int) -> tuple[torch.Tensor, int]:
        process, prediction = target.process, target.prediction
        scheduler = factory()
        if isinstance(process, DiscreteVP):
            _set_schedule(scheduler, process)

            def time_of(k):
                return process.time_from_timestep(torch.as_tensor(float(k), dtype=torch.float64))
        else:  # flow: diffusers' timestep is sigma * num_train_timesteps, and RectifiedFlow's sigma is t
            n = scheduler.config.num_train_timesteps

            def time_of(k):
                return torch.as_tensor(float(k), dtype=torch.float64) / n

        as_eps = prediction == "x0" and type(scheduler).__name__ in EPS_OR_V_ONLY
        scheduler.set_timesteps(steps)

        def model(x, k):
            t = _time(time_of(k), x)
            out = target.model(x, t)
            return convert(out, x, t, process, source="x0", target="eps") if as_eps else out

        counted = _Counted(model)
        # Start as fewstep does, at t_max from sigma(t_max) * noise in the process's coordinates; sigma-space
        # schedulers (Euler, Heun, LMS) hold x / alpha and have init_noise_sigma = 1 / alpha(1).
        x = noise * float(process.sigma(process.t_max)) * float(getattr(scheduler, "init_noise_sigma", 1.0))
        for k in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, k) if hasattr(scheduler, "scale_model_input") else x
            x = scheduler.step(counted(x_in, k), k, x).prev_sample
        return x, counted.calls

    return run


def _kdiffusion_peer(sampler: str, sigmas: str) -> PeerRun:
    def run(target: Target, noise: torch.Tensor, steps: int) -> tuple[torch.Tensor, int]:
        kd = kdiffusion_sampling()
        process = target.process
        sigma_max, sigma_min = k_sigma(process, process.t_max), k_sigma(process, process.t_min)
        if sigmas == "karras":
            grid = kd.get_sigmas_karras(steps, sigma_min, sigma_max, device="cpu")
        else:
            grid = kd.get_sigmas_exponential(steps, sigma_min, sigma_max, device="cpu")

        # EDM space: x = x0 + sigma * eps, i.e. x / alpha(t) in the process's coordinates (fewstep.to_k_diffusion)
        denoiser = to_k_diffusion(target.model, process, target.prediction)

        # sigmas in the noise's dtype: the samplers' sigma-shaped tensors would otherwise promote float32 x to float64
        counted = _Counted(denoiser)
        x = getattr(kd, sampler)(counted, noise * sigma_max, grid.to(noise.dtype), disable=True)
        return x, counted.calls

    return run


KDIFFUSION_SAMPLERS = ("sample_euler", "sample_heun", "sample_dpm_2", "sample_lms", "sample_dpmpp_2m")


LAMBDA_MIN_CLIPPED = -5.1  # diffusers' documented value for the cosine schedule (lambda = log(alpha / sigma))


def _diffusers_configs(d, target: Target) -> dict[str, Callable[[], object]]:
    """The diffusers schedulers (name -> factory) that can sample this target; {} when none can."""
    process, prediction = target.process, target.prediction
    if isinstance(process, RectifiedFlow) and prediction == "velocity":
        flow = dict(num_train_timesteps=1000, use_flow_sigmas=True, prediction_type="flow_prediction")
        return {
            "diffusers FlowMatchEuler": lambda: d.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000),
            "diffusers FlowMatchHeun": lambda: d.FlowMatchHeunDiscreteScheduler(num_train_timesteps=1000),
            "diffusers DPMSolverMultistep 2M flow": lambda: d.DPMSolverMultistepScheduler(**flow),
            "diffusers DPMSolverMultistep 3M flow": lambda: d.DPMSolverMultistepScheduler(**flow, solver_order=3),
            "diffusers DPMSolverSinglestep 2 flow": lambda: d.DPMSolverSinglestepScheduler(**flow, solver_order=2),
            "diffusers UniPC bh2 flow": lambda: d.UniPCMultistepScheduler(**flow),
            "diffusers UniPC bh1 order 3 flow": lambda: d.UniPCMultistepScheduler(**flow, solver_type="bh1", solver_order=3),
            "diffusers DEIS 2 flow": lambda: d.DEISMultistepScheduler(**flow),
        }  # fmt: skip
    if not isinstance(process, DiscreteVP) or prediction not in ("eps", "v", "x0"):
        return {}
    betas = process.betas.tolist()
    base = dict(num_train_timesteps=process.num_timesteps, trained_betas=betas, prediction_type=DIFFUSERS_PREDICTION[prediction])
    # PNDM takes eps or v only: an x0 model's output is converted to eps (see _diffusers_peer)
    pndm = dict(base, prediction_type="epsilon") if prediction == "x0" else base
    configs = {
        # DDIM steps from t to t - N // steps whatever its spacing, so only "trailing" (which starts at N - 1 like
        # everyone here) is consistent with its own timesteps (to one timestep).
        "diffusers DDIM": lambda: d.DDIMScheduler(**base, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing"),
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
        "diffusers Euler karras": lambda: d.EulerDiscreteScheduler(**base, use_karras_sigmas=True, timestep_spacing="linspace"),
        "diffusers Heun": lambda: d.HeunDiscreteScheduler(**base, timestep_spacing="linspace"),
        "diffusers LMS": lambda: d.LMSDiscreteScheduler(**base, timestep_spacing="linspace"),
        "diffusers PNDM (PLMS)": lambda: d.PNDMScheduler(**pndm, skip_prk_steps=True, timestep_spacing="linspace"),
    }  # fmt: skip
    if float(process.log_snr(process.t_max)) < LAMBDA_MIN_CLIPPED - 1:
        # A schedule that reaches far below log-SNR -5.1 at its last timestep (cosine): diffusers' documented settings
        # for it, clipping the DPM-Solver's first steps (lambda_min_clipped) and the "trailing" spacing.
        configs["diffusers DPMSolverMultistep 2M lambda_min_clipped"] = lambda: d.DPMSolverMultistepScheduler(
            **base, lambda_min_clipped=LAMBDA_MIN_CLIPPED
        )
        configs["diffusers DPMSolverMultistep 2M trailing"] = lambda: d.DPMSolverMultistepScheduler(
            **base, timestep_spacing="trailing"
        )
        configs["diffusers UniPC bh2 trailing"] = lambda: d.UniPCMultistepScheduler(**base, timestep_spacing="trailing")
    return configs


def peers(target: Target | None = None) -> dict[str, PeerRun]:
    """The installed peers that can sample `target` (default: an eps model on DiscreteVP.linear()):
    name -> run(target, noise, steps) -> (x0, nfe)."""
    probe = Target(lambda x, t: x, DiscreteVP.linear(), "eps") if target is None else target
    found: dict[str, PeerRun] = {}
    try:
        import diffusers as d
    except ImportError:
        d = None
    if d is not None:
        d.utils.logging.set_verbosity_error()  # their config-fix-up notices would flood the benchmark output
        found.update({name: _diffusers_peer(factory) for name, factory in _diffusers_configs(d, probe).items()})
    finite_start = math.isfinite(k_sigma(probe.process, probe.process.t_max))
    if finite_start and probe.prediction in ("eps", "v", "x0", "velocity", "score") and kdiffusion_sampling() is not None:
        for sampler in KDIFFUSION_SAMPLERS:
            for sigmas in ("karras", "exponential"):
                found[f"k-diffusion {sampler.removeprefix('sample_')} {sigmas}"] = _kdiffusion_peer(sampler, sigmas)
    return found


def run_at_nfe(peer: PeerRun, target: Target | GaussianMixture, noise: torch.Tensor, nfe: int) -> torch.Tensor | None:
    """The peer's result using exactly `nfe` model calls (None when no step count gives exactly that).

    The step count is found on the first sample alone (a deterministic sampler's count does not depend on the batch),
    then the whole batch is run once with it.
    """
    target = as_target(target)
    for steps in range(1, nfe + 1):
        _, used = peer(target, noise[:1], steps)
        if used == nfe:
            x, used = peer(target, noise, steps)
            if used != nfe:
                raise RuntimeError(f"the peer used {used} evaluations on the batch, {nfe} on one sample")
            return x
        if used > nfe:
            return None
    return None


def best_at_nfe(
    runs: dict[str, PeerRun], target: Target, noise: torch.Tensor, reference: torch.Tensor, nfe: int
) -> tuple[float, str]:
    """(RMS error to `reference`, name) of the most accurate of `runs` at exactly `nfe` evaluations ((inf, "") when
    none runs there); a peer's own failure counts as not running."""
    best, best_name = math.inf, ""
    for name, run in runs.items():
        try:
            with torch.no_grad():
                x = run_at_nfe(run, target, noise, nfe)
        except Exception:  # noqa: BLE001 - a peer's own failure (e.g. an IndexError in its timestep bookkeeping)
            continue
        error = math.inf if x is None else rms_error(x, reference)
        if math.isfinite(error) and error < best:
            best, best_name = error, name
    return best, best_name


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

    from ..schedule_search import optimize_schedule

    process = DiscreteVP.linear()
    peer_runs = peers()
    rows = []
    total = len(problems) * len(nfes) * (len(entries) + len(peer_runs) + bool(search_solvers))
    with tqdm(total=total, desc="bench accuracy --peers", disable=not progress) as bar:
        for name in problems:
            mixture = problem(name)
            noise = torch.randn(samples, mixture.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            reference = mixture.flow_map(noise, process)
            target = mixture_target(mixture, process)
            model = target.model
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
                    x = run_at_nfe(run, target, noise, nfe)
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
