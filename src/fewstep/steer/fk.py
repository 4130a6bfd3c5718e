"""Feynman-Kac steering: sequential Monte Carlo over particles of a stochastic sampler, tilted by exp(lam * reward).

Singhal, Horvitz, Teehan, Ren, Yu, McKeown & Ranganath, "A General Framework for Inference-time Scaling and Steering
of Diffusion Models" (FK steering), 2025: K particles per sample run the sampler; after a step the potential
G_i of each particle's path is evaluated on the step's data prediction x0 and multiplied into its weight, and the
particles are resampled when the effective sample size of a group falls below `ess_threshold * K` (adaptive
resampling, Doucet & Johansen 2009). Potentials: "diff" G_i = exp(lam (r_i - r_{i-1})), "max"
G_i = exp(lam max_{j<=i} r_j), "add" G_i = exp(lam sum_{j<=i} r_j). A final potential exp(lam r(x)) / prod_i G_i on
the output x makes the product of all potentials exp(lam r(x)) for every choice (the paper's G_0), so the weighted
particles target p(x) exp(lam r(x)) / Z, and the mean weights give an estimate of log Z = log E_p[exp(lam r(x))].
Weights live in log space; resampling permutes the solver's whole state (x and multistep history: `Run.report`).

Gradient proposal (`guidance` > 0): the particles move by the reward-gradient guided model (`RewardGuided`), and on
an ancestral solver (ddpm, ddim_eta, euler_ancestral: Gaussian steps) each step's weight also gets the ratio of the
model's transition to the guided one, log p(x' | x) - log q(x' | x), as in the twisted diffusion sampler (Wu,
Trippe, Naesseth, Blei & Cunningham, "Practical and Asymptotically Exact Conditional Sampling in Diffusion Models",
NeurIPS 2023). The weighted particles then still target p(x) exp(target_lam r(x)) / Z, and log Z stays consistent;
without the ratio (`correct_proposal=False`, or a guided model passed as `model`) they target whatever the guided
sampler draws, tilted. The final step (to the data) is not guided: its transition is deterministic.

Twist (`twist`): a value function of the noisy state, twist(x_t, t) -> [n], replaces the reward of the data prediction
in the intermediate potentials, and its gradient replaces the reward's in the guidance: the twisted SMC of Wu et al.
(above) with a learned twist, e.g. a noise-conditional classifier's log p(k | x_t) (Dhariwal & Nichol, NeurIPS 2021).
With twist = log E[exp(target_lam r(x0)) | x_t] / lam exactly, every particle's weight stays uniform; an approximate
twist only costs efficiency, since the final potential keeps the target exact.

Particles: noise [B * K, ...] holds B groups of K consecutive particles; the result is [B, ...], one particle per
group ("sample": drawn by the final weights, "best": the highest final reward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..checks import check_int, check_real
from ..parameterization import Model
from ..sampling import sample
from ..solvers import get_solver, reindex
from .gradient import RewardGuided
from .resampling import SCHEMES, ancestors, ess, log_mean_weight, normalized
from .rewards import Reward, Twist, check_reward_fn, evaluate_reward

POTENTIALS = ("diff", "max", "add")
SELECT = ("sample", "best")
ANCESTRAL = ("ddpm", "ddim_eta", "euler_ancestral")  # solvers whose every step is Gaussian (`solvers._ancestral`)


@dataclass(frozen=True)
class FK:
    """FK steering: `fewstep.sample(model, noise [B * particles, ...], solver=<stochastic>, steering=FK(...))`.

    reward: reward(x0 [n, ...]) -> [n], higher is better; lam: the tilt exp(lam * reward) (> 0); particles: K >= 1
    per output sample; potential: "diff", "max" or "add"; resample: "systematic" or "multinomial"; ess_threshold in
    (0, 1]: resample a group when ESS < ess_threshold * K; every: evaluate the potential every `every` steps;
    select: "sample" or "best" (see the module doc); seed: of the resampling and selection draws (None: global RNG);
    anneal: scale the intermediate tilt by the signal fraction alpha^2 / (alpha^2 + sigma^2) of the step's end time,
    so that rewards of blurry early data predictions weigh little (the final potential keeps the target exact);
    target_lam: the tilt of the target, p(x) exp(target_lam * reward(x)) (default lam): the intermediate potentials
    (strength lam) only steer the particles, the final potential corrects to the target (target_lam = 1 with a
    classifier's log-probability: the class-conditional distribution p(x | k)); guidance: the scale of the
    reward-gradient proposal (0: none; see the module doc); correct_proposal: reweigh by the model's transition over
    the guided one (needs an ancestral solver: ddpm, ddim_eta, euler_ancestral); twist: a value function
    twist(x_t [n, ...], t [n]) -> [n] of the noisy state, used by the intermediate potentials and the guidance in place
    of reward(x0_hat) (see the module doc; None: the reward of the step's data prediction).
    """

    reward: Reward
    lam: float = 1.0
    particles: int = 4
    potential: str = "diff"
    resample: str = "systematic"
    ess_threshold: float = 0.5
    every: int = 1
    select: str = "sample"
    seed: int | None = None
    anneal: bool = False
    target_lam: float | None = None
    guidance: float = 0.0
    correct_proposal: bool = True
    twist: Twist | None = None

    def __post_init__(self) -> None:
        check_reward_fn(self.reward)
        if self.twist is not None:
            check_reward_fn(self.twist, "twist")
        check_real(self.lam, "lam", positive=True)
        check_int(self.particles, "particles", minimum=1)
        check_int(self.every, "every", minimum=1)
        for name, value, allowed in (("potential", self.potential, POTENTIALS), ("resample", self.resample, SCHEMES),
                                     ("select", self.select, SELECT)):  # fmt: skip
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not known; allowed values: {', '.join(allowed)}")
        threshold = check_real(self.ess_threshold, "ess_threshold")
        if not 0 < threshold <= 1:
            raise ValueError(f"ess_threshold must be in (0, 1] (a fraction of the particles), got {threshold!r}")
        if self.seed is not None:
            check_int(self.seed, "seed", minimum=0)
        if self.target_lam is not None:
            check_real(self.target_lam, "target_lam", positive=True)
        check_real(self.guidance, "guidance", nonnegative=True)
        for name in ("anneal", "correct_proposal"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {name}={getattr(self, name)!r}")

    def steer(self, model: Model, noise: torch.Tensor, **sample_kwargs: Any) -> torch.Tensor:
        """`steered_sample(model, noise, self, **sample_kwargs)` (what `fewstep.sample(..., steering=self)` calls)."""
        return steered_sample(model, noise, self, **sample_kwargs)


class _Particles:
    """The per-particle bookkeeping of one steered run: log-weights [B, K], potentials and path sums [B * K]."""

    def __init__(self, fk: FK, groups: int):
        self.fk, self.groups, self.k = fk, groups, fk.particles
        n = groups * fk.particles
        self.log_w = torch.zeros(groups, fk.particles, dtype=torch.float64)
        self.log_z = torch.zeros(groups, dtype=torch.float64)
        self.last = torch.zeros(n, dtype=torch.float64)  # r_{i-1} ("diff"), running max ("max") or sum ("add")
        self.path_log_g = torch.zeros(n, dtype=torch.float64)  # sum of log G along each particle's ancestry
        self.started = False
        self.reward_calls = self.resamples = 0
        self.generator = None if fk.seed is None else torch.Generator().manual_seed(fk.seed)
        self.min_ess = float(fk.particles)

    def weigh(self, r: torch.Tensor, scale: float = 1.0) -> None:
        """Multiply the potential of rewards r [B * K] (tilt lam * scale) into the weights."""
        lam = self.fk.lam * scale
        if self.fk.potential == "diff":  # last holds lam_{i-1} r_{i-1}: the product telescopes to exp(lam_i r_i)
            log_g = lam * r - self.last if self.started else lam * r
            self.last = lam * r
        elif self.fk.potential == "max":
            self.last = torch.maximum(self.last, r) if self.started else r
            log_g = lam * self.last
        else:
            self.last = self.last + r
            log_g = lam * self.last
        self.started = True
        log_g = torch.nan_to_num(log_g, nan=-math.inf)  # -inf - (-inf): a forbidden particle stays forbidden
        self.log_w += log_g.view(self.groups, self.k)
        self.path_log_g += log_g

    def maybe_resample(self) -> torch.Tensor | None:
        """Resample the groups whose ESS fell below the threshold; the global particle indices [B * K], or None."""
        if self.k == 1:
            return None
        group_ess = ess(self.log_w)
        self.min_ess = min(self.min_ess, float(group_ess.min()))
        low = group_ess < self.fk.ess_threshold * self.k
        if not bool(low.any()):
            return None
        self.resamples += 1
        local = torch.arange(self.k).expand(self.groups, self.k).clone()
        local[low] = ancestors(self.log_w[low], self.fk.resample, self.generator)
        self.log_z[low] += log_mean_weight(self.log_w[low])
        self.log_w[low] = 0.0
        index = (local + self.k * torch.arange(self.groups)[:, None]).flatten()
        self.last, self.path_log_g = self.last[index], self.path_log_g[index]
        return index

    def reweigh_proposal(self, transition: dict[str, Any] | None, x0_shift: torch.Tensor) -> None:
        """Add log p(x' | x) - log q(x' | x) of a Gaussian step whose guided data prediction was moved by x0_shift:
        the means differ by d = x0_coef * x0_shift, so with x' - mean_q = noise = std * z the ratio is
        -(z . d) / std - |d|^2 / (2 std^2) per particle."""
        if transition is None or transition["noise"] is None:
            raise ValueError(
                "FK guidance with correct_proposal=True needs a Gaussian step with noise at every guided step "
                "(solver ddpm, ddim_eta with eta > 0, or euler_ancestral); use correct_proposal=False otherwise"
            )
        std, d = transition["std"], (transition["x0_coef"] * x0_shift).to(torch.float64)
        z = transition["noise"].to(torch.float64) / std
        log_ratio = -(z * d).flatten(1).sum(1) / std - (d * d).flatten(1).sum(1) / (2 * std * std)
        self.log_w += log_ratio.to(self.log_w.device).view(self.groups, self.k)

    def finish(self, r: torch.Tensor) -> None:
        """The final potential exp(lam r(x)) / prod G on the outputs' rewards r [B * K]; closes the log Z estimate."""
        lam = self.fk.lam if self.fk.target_lam is None else self.fk.target_lam
        log_g = torch.nan_to_num(lam * r - self.path_log_g, nan=-math.inf)
        self.log_w += log_g.view(self.groups, self.k)
        self.log_z += log_mean_weight(self.log_w)


def steered_sample(model: Model, noise: torch.Tensor, steering: FK, **sample_kwargs: Any) -> torch.Tensor:
    """FK steering of `fewstep.sample` (see the module doc); returns x [B, ...] for noise [B * K, ...].

    sample_kwargs: those of `fewstep.sample` with a stochastic `solver`; a list `generator` holds one generator per
    particle; `model_kwargs` tensors [B, ...] are repeated for the K particles of each sample. The result carries
    nfe (network evaluations on the particle batch), reward_calls (reward evaluations on it, the final one
    included), particles, resamples, min_ess, log_z [B] (estimate of log E[exp(lam r(x))]), rewards [B] (of the
    returned particles), and all_particles [B * K, ...], all_rewards [B * K], weights [B, K] (final, normalised).
    """
    if not isinstance(steering, FK):
        raise TypeError(f"steering must be a fewstep.steer.FK, got {type(steering).__name__}")
    solver = sample_kwargs.get("solver", "dpmpp_2m")
    if solver == "auto" or not get_solver(solver).stochastic:
        raise ValueError(
            f"steering resamples particles, which needs a stochastic solver (resampled copies of a deterministic "
            f"solver's particles stay identical); got solver={solver!r}; use e.g. ddpm, euler_ancestral, ddim_eta, "
            "sde_dpmpp_2m"
        )
    k = steering.particles
    if not isinstance(noise, torch.Tensor) or noise.ndim < 1 or noise.shape[0] % k:
        shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"noise must have B * particles = B * {k} rows (groups of {k} particles), got shape {shape}")
    groups = noise.shape[0] // k
    if sample_kwargs.get("model_kwargs") is not None:
        # each sample's conditioning rows repeated for its k particles
        rows = torch.arange(groups).repeat_interleave(k)
        sample_kwargs["model_kwargs"] = reindex(sample_kwargs["model_kwargs"], rows, groups)
    state = _Particles(steering, groups)
    user_callback = sample_kwargs.pop("callback", None)
    steps, process = sample_kwargs.get("steps", 10), sample_kwargs.get("process")
    guided = None
    if steering.guidance > 0:
        if steering.correct_proposal and solver not in ANCESTRAL:
            raise ValueError(
                f"FK guidance with correct_proposal=True reweighs Gaussian steps: solver must be one of "
                f"{', '.join(ANCESTRAL)}, got solver={solver!r} (or set correct_proposal=False)"
            )
        guided = RewardGuided(model, steering.reward, steering.guidance, process=process,
                              prediction=sample_kwargs.get("prediction", "eps"), twist=steering.twist)  # fmt: skip
        model = guided

    def hook(info: dict[str, Any]) -> torch.Tensor | None:
        if user_callback is not None:
            user_callback(info)
        i = info["step"]
        if guided is not None:
            if steering.correct_proposal and guided.last_x0_shift is not None:
                state.reweigh_proposal(info["transition"], guided.last_x0_shift)
            if i == steps - 2:  # the last step lands on the data deterministically: no proposal ratio there
                guided.scale = 0.0
        if info["x0"] is None or i == steps - 1 or (i + 1) % steering.every:
            return None  # the last step's potential is the final one, on the output
        scale = _signal_fraction(process, info["t"]) if steering.anneal else 1.0
        state.weigh(_intermediate_reward(steering, info), scale)
        state.reward_calls += 1
        return state.maybe_resample()

    x = sample(model, noise, callback=hook, **sample_kwargs)
    r = evaluate_reward(steering.reward, x)
    state.reward_calls += 1 + (guided.reward_calls if guided is not None else 0)
    state.finish(r)
    return _select(x, r, state)


def _intermediate_reward(steering: FK, info: dict[str, Any]) -> torch.Tensor:
    """The reward of the step's data prediction, or the twist of its state x at its time t (float64 [n])."""
    if steering.twist is None:
        return evaluate_reward(steering.reward, info["x0"])
    x = info["x"]
    t = torch.as_tensor(info["t"], dtype=torch.float64).to(x.device).expand(x.shape[0])
    return evaluate_reward(lambda state: steering.twist(state, t), x, "twist")


def _signal_fraction(process: Any, t: float) -> float:
    """alpha(t)^2 / (alpha(t)^2 + sigma(t)^2): 0 at pure noise, 1 at the data."""
    alpha, sigma = float(process.alpha(t)), float(process.sigma(t))
    return alpha * alpha / (alpha * alpha + sigma * sigma)


def _select(x: torch.Tensor, r: torch.Tensor, state: _Particles) -> torch.Tensor:
    """One particle per group, with the run's records as attributes."""
    groups, k = state.groups, state.k
    if state.fk.select == "best":
        local = r.view(groups, k).argmax(dim=1)
    else:
        local = torch.multinomial(normalized(state.log_w), 1, generator=state.generator).squeeze(1)
    index = local + k * torch.arange(groups)
    out = x.index_select(0, index.to(x.device))
    out.nfe, out.reward_calls, out.particles = x.nfe, state.reward_calls, k
    out.resamples, out.min_ess, out.log_z = state.resamples, state.min_ess, state.log_z
    out.rewards, out.all_particles, out.all_rewards = r[index], x, r
    out.weights = normalized(state.log_w)
    return out
