"""Noise processes x_t = alpha(t) * x0 + sigma(t) * eps, all on a continuous time t.

Every process in fewstep is described by the two functions alpha(t) and sigma(t), their time derivatives and the
log signal-to-noise ratio log_snr(t) = log(alpha / sigma) with its inverse. Solvers, grids and conversions only
use this interface, so every solver runs on every process.

Functions accept a float or a tensor of any shape and return a tensor of the same shape (float64 for floats).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

Time = float | torch.Tensor


def _as_tensor(t: Time) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t
    return torch.as_tensor(t, dtype=torch.float64)


def broadcast_to(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample coefficient of shape [batch] (or a scalar) so it broadcasts against x [batch, ...]."""
    coef = coef.to(device=x.device, dtype=x.dtype)
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


class Process(ABC):
    """Base class: a Gaussian noise process described by alpha(t) and sigma(t) for t in [t_min, t_max].

    Subclasses define `alpha`, `sigma`, `dalpha_dt`, `dsigma_dt`, `t_from_log_snr` and the time range.
    Time runs from data (t_min, high log-SNR) to noise (t_max, low log-SNR); samplers integrate from t_max down.
    """

    t_min: float
    t_max: float
    default_schedule: str = "time_uniform"

    @abstractmethod
    def alpha(self, t: Time) -> torch.Tensor: ...

    @abstractmethod
    def sigma(self, t: Time) -> torch.Tensor: ...

    @abstractmethod
    def dalpha_dt(self, t: Time) -> torch.Tensor: ...

    @abstractmethod
    def dsigma_dt(self, t: Time) -> torch.Tensor: ...

    def log_snr(self, t: Time) -> torch.Tensor:
        """lambda(t) = log(alpha(t) / sigma(t)); -inf where alpha = 0, +inf where sigma = 0."""
        return torch.log(self.alpha(t)) - torch.log(self.sigma(t))

    @abstractmethod
    def t_from_log_snr(self, log_snr: Time) -> torch.Tensor: ...

    def add_noise(self, x0: torch.Tensor, t: Time, eps: torch.Tensor) -> torch.Tensor:
        """Sample the marginal q(x_t | x0) = N(alpha x0, sigma^2 I) with the given eps; t is a scalar or [batch]."""
        t = _as_tensor(t)
        return broadcast_to(self.alpha(t), x0) * x0 + broadcast_to(self.sigma(t), x0) * eps

    def check_time(self, t: float, name: str) -> float:
        """Validate a scalar time against the process's range; returns it as float."""
        t = float(t)
        tol = 1e-9 * max(1.0, abs(self.t_max))
        if not (self.t_min - tol <= t <= self.t_max + tol) or math.isnan(t):
            raise ValueError(
                f"{name}={t} is outside the time range of {self!r}: allowed values are {self.t_min} <= {name} <= {self.t_max}"
            )
        return min(max(t, self.t_min), self.t_max)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _VPBase(Process, ABC):
    """Variance-preserving process: alpha^2 + sigma^2 = 1, defined by log_alpha(t) and its inverse."""

    default_schedule = "logsnr"

    @abstractmethod
    def log_alpha(self, t: Time) -> torch.Tensor: ...

    @abstractmethod
    def dlog_alpha_dt(self, t: Time) -> torch.Tensor: ...

    @abstractmethod
    def t_from_log_alpha(self, log_alpha: torch.Tensor) -> torch.Tensor: ...

    def alpha(self, t: Time) -> torch.Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t: Time) -> torch.Tensor:
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def log_snr(self, t: Time) -> torch.Tensor:
        log_alpha = self.log_alpha(t)
        return log_alpha - 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))

    def t_from_log_snr(self, log_snr: Time) -> torch.Tensor:
        # alpha^2 = sigmoid(2 lambda)  =>  log alpha = -0.5 softplus(-2 lambda)
        return self.t_from_log_alpha(-0.5 * F.softplus(-2.0 * _as_tensor(log_snr)))

    def dalpha_dt(self, t: Time) -> torch.Tensor:
        return self.alpha(t) * self.dlog_alpha_dt(t)

    def dsigma_dt(self, t: Time) -> torch.Tensor:
        alpha = self.alpha(t)
        return -alpha * alpha * self.dlog_alpha_dt(t) / self.sigma(t)


def _segment(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor):
    """The knots (x0, x1, f0, f1) of the piecewise-linear segment of (xp, fp), xp increasing, that holds each x."""
    xp = xp.to(x.device, x.dtype)
    fp = fp.to(x.device, x.dtype)
    i = torch.searchsorted(xp, x.detach().contiguous()).clamp(1, len(xp) - 1)
    return xp[i - 1], xp[i], fp[i - 1], fp[i]


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of (xp, fp) at x, xp increasing, linear extrapolation at both ends."""
    x0, x1, f0, f1 = _segment(x, xp, fp)
    return f0 + (x - x0) * (f1 - f0) / (x1 - x0)


def _interp_slope(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Slope of the piecewise-linear interpolant at x (the segment searchsorted picks)."""
    x0, x1, f0, f1 = _segment(x, xp, fp)
    return (f1 - f0) / (x1 - x0)


class DiscreteVP(_VPBase):
    """DDPM-style process of N discrete betas on continuous time t in [1/N, 1].

    log alpha is interpolated piecewise-linearly between the points t_k = (k + 1) / N, where
    alpha(t_k)^2 = prod_{j<=k} (1 - beta_j), as in DPM-Solver (Lu et al., 2022, appendix; Ho et al., 2020).
    The model's integer timestep index of a time is `timestep(t) = t * N - 1`. Default grid: uniform in log-SNR
    (measured far more accurate than time-uniform for every multistep solver; README, "Benchmarks").
    """

    def __init__(self, betas: torch.Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() < 2 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must hold at least 2 values, each with 0 < beta < 1")
        self.betas = betas
        self.num_timesteps = n = betas.numel()
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self._t_knots = torch.arange(1, n + 1, dtype=torch.float64) / n
        self._log_alpha_knots = 0.5 * torch.log(self.alphas_cumprod)
        self.t_min = 1.0 / n
        self.t_max = 1.0

    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> DiscreteVP:
        """Linear betas of DDPM (Ho et al., 2020)."""
        return cls(torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64))

    @classmethod
    def scaled_linear(cls, num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> DiscreteVP:
        """Betas linear in sqrt(beta), as used by Stable Diffusion (Rombach et al., 2022)."""
        return cls(torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2)

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> DiscreteVP:
        """Cosine schedule of Improved DDPM (Nichol & Dhariwal, 2021): betas from alpha_bar, clipped at max_beta."""
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)
        return cls(betas)

    def log_alpha(self, t: Time) -> torch.Tensor:
        return _interp(_as_tensor(t), self._t_knots, self._log_alpha_knots)

    def dlog_alpha_dt(self, t: Time) -> torch.Tensor:
        return _interp_slope(_as_tensor(t), self._t_knots, self._log_alpha_knots)

    def t_from_log_alpha(self, log_alpha: torch.Tensor) -> torch.Tensor:
        # log alpha decreases with t: interpolate on the flipped (increasing) knots.
        return _interp(log_alpha, self._log_alpha_knots.flip(0), self._t_knots.flip(0))

    def timestep(self, t: Time) -> torch.Tensor:
        """The model's (continuous) timestep index for time t: t * N - 1, in [0, N - 1]."""
        return _as_tensor(t) * self.num_timesteps - 1

    def time_from_timestep(self, index: Time) -> torch.Tensor:
        """Inverse of `timestep`: t = (index + 1) / N."""
        index = _as_tensor(index)
        if not index.is_floating_point():
            index = index.to(torch.float64)
        return (index + 1) / self.num_timesteps

    def __repr__(self) -> str:
        # Name the betas so that processes with the same N but other betas never compare equal by repr.
        b = self.betas
        return f"DiscreteVP(N={self.num_timesteps}, betas={float(b[0]):.6g}..{float(b[-1]):.6g}, sum={float(b.sum()):.10g})"


class VP(_VPBase):
    """Continuous-time variance-preserving process (Song et al., 2021), `schedule` "linear" or "cosine".

    linear: log alpha(t) = -(beta_max - beta_min) t^2 / 4 - beta_min t / 2, t in [1e-3, 1].
    cosine: alpha(t) = cos(pi/2 (t + s)/(1 + s)) / cos(pi/2 s/(1 + s)) (Nichol & Dhariwal, 2021), t in [1e-3, 0.9946]
    (the upper end as in DPM-Solver, where alpha is still positive).
    """

    SCHEDULES = ("linear", "cosine")

    def __init__(
        self,
        schedule: str = "linear",
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        s: float = 0.008,
        t_min: float = 1e-3,
        t_max: float | None = None,
    ):
        if schedule not in self.SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is not known; allowed values: {', '.join(self.SCHEDULES)}")
        self.schedule = schedule
        self.beta_min, self.beta_max, self.s = float(beta_min), float(beta_max), float(s)
        self.t_min = float(t_min)
        self.t_max = float(t_max if t_max is not None else (1.0 if schedule == "linear" else 0.9946))
        self._log_cos_s = math.log(math.cos(math.pi / 2 * self.s / (1 + self.s)))

    def log_alpha(self, t: Time) -> torch.Tensor:
        t = _as_tensor(t)
        if self.schedule == "linear":
            return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        return torch.log(torch.cos(math.pi / 2 * (t + self.s) / (1 + self.s))) - self._log_cos_s

    def dlog_alpha_dt(self, t: Time) -> torch.Tensor:
        t = _as_tensor(t)
        if self.schedule == "linear":
            return -0.5 * t * (self.beta_max - self.beta_min) - 0.5 * self.beta_min
        k = math.pi / 2 / (1 + self.s)
        return -k * torch.tan(k * (t + self.s))

    def t_from_log_alpha(self, log_alpha: torch.Tensor) -> torch.Tensor:
        if self.schedule == "linear":
            a, b, c = 0.25 * (self.beta_max - self.beta_min), 0.5 * self.beta_min, -log_alpha
            return 2 * c / (b + torch.sqrt(b * b + 4 * a * c))  # root of a t^2 + b t = c, cancellation-free
        k = math.pi / 2 / (1 + self.s)
        return torch.arccos(torch.exp(log_alpha + self._log_cos_s)) / k - self.s

    def __repr__(self) -> str:
        return f"VP({self.schedule!r})"


class VE(Process):
    """Variance-exploding process (Song et al., 2021): alpha = 1, sigma(t) = sigma_min (sigma_max/sigma_min)^t, t in [0, 1]."""

    default_schedule = "karras"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)
        self.t_min, self.t_max = 0.0, 1.0

    def alpha(self, t: Time) -> torch.Tensor:
        return torch.ones_like(_as_tensor(t))

    def sigma(self, t: Time) -> torch.Tensor:
        return self.sigma_min * torch.exp(_as_tensor(t) * self._log_ratio)

    def dalpha_dt(self, t: Time) -> torch.Tensor:
        return torch.zeros_like(_as_tensor(t))

    def dsigma_dt(self, t: Time) -> torch.Tensor:
        return self.sigma(t) * self._log_ratio

    def log_snr(self, t: Time) -> torch.Tensor:
        return -torch.log(self.sigma(t))

    def t_from_log_snr(self, log_snr: Time) -> torch.Tensor:
        return (-_as_tensor(log_snr) - math.log(self.sigma_min)) / self._log_ratio

    def __repr__(self) -> str:
        return f"VE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


class EDM(Process):
    """The EDM process (Karras et al., 2022): alpha = 1, sigma = t, t in [sigma_min, sigma_max]."""

    default_schedule = "karras"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not 0 <= sigma_min < sigma_max:
            raise ValueError(f"need 0 <= sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.t_min, self.t_max = float(sigma_min), float(sigma_max)

    def alpha(self, t: Time) -> torch.Tensor:
        return torch.ones_like(_as_tensor(t))

    def sigma(self, t: Time) -> torch.Tensor:
        return _as_tensor(t).clone()

    def dalpha_dt(self, t: Time) -> torch.Tensor:
        return torch.zeros_like(_as_tensor(t))

    def dsigma_dt(self, t: Time) -> torch.Tensor:
        return torch.ones_like(_as_tensor(t))

    def log_snr(self, t: Time) -> torch.Tensor:
        return -torch.log(_as_tensor(t))

    def t_from_log_snr(self, log_snr: Time) -> torch.Tensor:
        return torch.exp(-_as_tensor(log_snr))

    def __repr__(self) -> str:
        return f"EDM(sigma_min={self.t_min}, sigma_max={self.t_max})"


class RectifiedFlow(Process):
    """Rectified flow / linear interpolant (Liu et al., 2023; Lipman et al., 2023): alpha = 1 - t, sigma = t, t in [0, 1].

    At t = 1 the state is pure noise (alpha = 0, log-SNR -inf); at t = 0 it is data (sigma = 0, log-SNR +inf).
    """

    def __init__(self):
        self.t_min, self.t_max = 0.0, 1.0

    def alpha(self, t: Time) -> torch.Tensor:
        return 1.0 - _as_tensor(t)

    def sigma(self, t: Time) -> torch.Tensor:
        return _as_tensor(t).clone()

    def dalpha_dt(self, t: Time) -> torch.Tensor:
        return -torch.ones_like(_as_tensor(t))

    def dsigma_dt(self, t: Time) -> torch.Tensor:
        return torch.ones_like(_as_tensor(t))

    def t_from_log_snr(self, log_snr: Time) -> torch.Tensor:
        # (1 - t)/t = e^lambda  =>  t = sigmoid(-lambda)
        return torch.sigmoid(-_as_tensor(log_snr))
