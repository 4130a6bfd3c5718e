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

from .checks import check_int, check_real

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
        """Validate a scalar time (a real number) against the process's range; returns it as float, clamped to it."""
        t = check_real(t, name, finite=False)
        tol = 1e-9 * max(1.0, abs(self.t_max))
        if not (self.t_min - tol <= t <= self.t_max + tol):
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
        # sigma^2 = 1 - alpha^2  =>  sigma dsigma = -alpha dalpha (finite also where alpha = 0)
        return -self.alpha(t) * self.dalpha_dt(t) / self.sigma(t)


def _segment(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor):
    """The knots (x0, x1, f0, f1) of the piecewise-linear segment of (xp, fp), xp increasing, that holds each x.

    xp and fp must already be on x's device and dtype (DiscreteVP caches them per device: no copy per call).
    """
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


def _check_betas(betas: torch.Tensor) -> torch.Tensor:
    """The betas as a float64 CPU vector [N], N >= 2, 0 < beta < 1 (the last may be 1), or a ValueError saying why."""
    if isinstance(betas, (str, bytes)):
        raise ValueError(f"betas must be a 1-D sequence of at least 2 real numbers, got a {type(betas).__name__}")
    try:
        raw = torch.as_tensor(betas)
        if not isinstance(betas, torch.Tensor) and raw.is_floating_point():  # not through torch's default float32
            raw = torch.as_tensor(betas, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"betas must be a 1-D sequence of at least 2 real numbers ({err})") from err
    if raw.is_complex() or raw.dtype == torch.bool or raw.ndim != 1 or raw.numel() < 2:
        raise ValueError(
            f"betas must be a 1-D sequence of at least 2 real numbers, got a {raw.dtype} tensor of shape {tuple(raw.shape)}"
        )
    betas = raw.detach().to("cpu", torch.float64)
    inside = (betas > 0) & (betas < 1)
    inside[-1] = 0 < betas[-1] <= 1
    if not bool(inside.all()):
        k = int((~inside).nonzero()[0])
        raise ValueError(
            f"betas must satisfy 0 < beta < 1 (the last may be exactly 1: zero terminal SNR), got betas[{k}]={float(betas[k])}"
        )
    log_alpha = 0.5 * torch.log(torch.cumprod(1.0 - betas, dim=0))
    flat = ~(log_alpha[1:] < log_alpha[:-1])
    if bool(flat.any()) or not bool(torch.isfinite(log_alpha[:-1]).all()):
        k = int(flat.nonzero()[0]) + 1 if bool(flat.any()) else int((~torch.isfinite(log_alpha[:-1])).nonzero()[0])
        raise ValueError(
            f"betas[{k}]={float(betas[k])} leaves alphas_cumprod unchanged or zero before the last step in float64; "
            "every beta must change alphas_cumprod, and only the last may make it 0"
        )
    return betas


MAX_TIMESTEPS = 1_000_000  # DDPM uses 1,000; a million discrete betas is far beyond any model


class DiscreteVP(_VPBase):
    """DDPM-style process of N discrete betas on continuous time t in [1/N, 1].

    log alpha is interpolated piecewise-linearly between the points t_k = (k + 1) / N, where
    alpha(t_k)^2 = prod_{j<=k} (1 - beta_j), as in DPM-Solver (Lu et al., 2022, appendix; Ho et al., 2020).
    The model's integer timestep index of a time is `timestep(t) = t * N - 1`. Default grid: uniform in log-SNR
    (measured far more accurate than time-uniform for every multistep solver; README, "Benchmarks").

    A last beta of exactly 1 gives zero terminal SNR (Lin et al., 2024, "Common Diffusion Noise Schedules and Sample
    Steps are Flawed"; see `rescale_zero_terminal_snr`): alpha(1) = 0, sigma(1) = 1, log-SNR -inf at t = 1, as in
    RectifiedFlow. On the last segment [t_{N-2}, 1] alpha, not log alpha, is then linear in t (log alpha cannot reach
    -inf linearly), and the default grid is "time_uniform" (a log-SNR grid needs a finite log-SNR at t_start).
    """

    def __init__(self, betas: torch.Tensor):
        self.betas = betas = _check_betas(betas)
        self.num_timesteps = n = betas.numel()
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self._t_knots = torch.arange(1, n + 1, dtype=torch.float64) / n
        self._log_alpha_knots = 0.5 * torch.log(self.alphas_cumprod)
        self.t_min = 1.0 / n
        self.t_max = 1.0
        self.zero_terminal_snr = bool(self.alphas_cumprod[-1] == 0)
        # Knots used for interpolation: finite everywhere (the last segment of a zero-terminal process is handled apart).
        self._t_last, self._log_alpha_last = float(self._t_knots[-2]), float(self._log_alpha_knots[-2])
        interp_knots = self._log_alpha_knots.clone()
        if self.zero_terminal_snr:
            interp_knots[-1] = self._log_alpha_last - 1.0  # placeholder, never used: the last segment is replaced
            self.default_schedule = "time_uniform"
        self._knot_tensors = (self._t_knots, interp_knots, interp_knots.flip(0), self._t_knots.flip(0))
        self._device_knots: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}

    @staticmethod
    def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
        """Betas [N] rescaled to zero terminal SNR (Lin et al., 2024, "Common Diffusion Noise Schedules and Sample
        Steps are Flawed", Algorithm 1): sqrt(alphas_cumprod) is shifted so the last is 0 and scaled so the first is
        unchanged; the last beta becomes exactly 1. Returns float64 betas [N]."""
        betas = _check_betas(betas)
        sqrt_alpha_bar = torch.cumprod(1.0 - betas, dim=0).sqrt()
        first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
        sqrt_alpha_bar = (sqrt_alpha_bar - last) * (first / (first - last))
        alpha_bar = sqrt_alpha_bar**2
        alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
        return 1.0 - alphas

    @classmethod
    def _from_betas(cls, betas: torch.Tensor, zero_terminal_snr: bool) -> DiscreteVP:
        if not isinstance(zero_terminal_snr, bool):
            raise ValueError(f"zero_terminal_snr must be True or False, got {zero_terminal_snr!r}")
        return cls(cls.rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas)

    @classmethod
    def linear(
        cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, *, zero_terminal_snr: bool = False
    ) -> DiscreteVP:
        """Linear betas of DDPM (Ho et al., 2020); `zero_terminal_snr` rescales them (see `rescale_zero_terminal_snr`)."""
        n = check_int(num_timesteps, "num_timesteps", minimum=2, maximum=MAX_TIMESTEPS)
        start, end = check_real(beta_start, "beta_start", positive=True), check_real(beta_end, "beta_end", positive=True)
        return cls._from_betas(torch.linspace(start, end, n, dtype=torch.float64), zero_terminal_snr)

    @classmethod
    def scaled_linear(
        cls, num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012, *, zero_terminal_snr: bool = False
    ) -> DiscreteVP:
        """Betas linear in sqrt(beta), as used by Stable Diffusion (Rombach et al., 2022); `zero_terminal_snr` rescales."""
        n = check_int(num_timesteps, "num_timesteps", minimum=2, maximum=MAX_TIMESTEPS)
        start, end = check_real(beta_start, "beta_start", positive=True), check_real(beta_end, "beta_end", positive=True)
        return cls._from_betas(torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2, zero_terminal_snr)

    @classmethod
    def cosine(
        cls, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999, *, zero_terminal_snr: bool = False
    ) -> DiscreteVP:
        """Cosine schedule of Improved DDPM (Nichol & Dhariwal, 2021): betas from alpha_bar, clipped at max_beta."""
        n = check_int(num_timesteps, "num_timesteps", minimum=2, maximum=MAX_TIMESTEPS)
        s, max_beta = check_real(s, "s", nonnegative=True), check_real(max_beta, "max_beta", positive=True)
        steps = torch.arange(n + 1, dtype=torch.float64) / n
        alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)
        return cls._from_betas(betas, zero_terminal_snr)

    def _knots(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(x, t knots, log-alpha knots, both flipped) in x's floating dtype on x's device, copied once per (device, dtype)."""
        if not x.is_floating_point():
            x = x.to(torch.float64)
        key = (x.device, x.dtype)
        knots = self._device_knots.get(key)
        if knots is None:
            knots = self._device_knots[key] = tuple(k.to(x.device, x.dtype) for k in self._knot_tensors)
        return (x, *knots)

    def _on_last_segment(self, t: torch.Tensor) -> torch.Tensor:
        """Where t lies on the last segment (t_{N-2}, 1] of a zero-terminal-SNR process."""
        return t > self._t_last

    def log_alpha(self, t: Time) -> torch.Tensor:
        t, t_knots, log_alpha_knots, _, _ = self._knots(_as_tensor(t))
        log_alpha = _interp(t, t_knots, log_alpha_knots)
        if self.zero_terminal_snr:  # alpha linear in t, 0 at t = 1 (clamped: -inf beyond)
            last = self._log_alpha_last + torch.log((1.0 - t).clamp(min=0) / (1.0 - self._t_last))
            log_alpha = torch.where(self._on_last_segment(t), last, log_alpha)
        return log_alpha

    def dlog_alpha_dt(self, t: Time) -> torch.Tensor:
        t, t_knots, log_alpha_knots, _, _ = self._knots(_as_tensor(t))
        slope = _interp_slope(t, t_knots, log_alpha_knots)
        if self.zero_terminal_snr:
            slope = torch.where(self._on_last_segment(t), -1.0 / (1.0 - t).clamp(min=0), slope)
        return slope

    def dalpha_dt(self, t: Time) -> torch.Tensor:
        slope = super().dalpha_dt(t)
        if self.zero_terminal_snr:  # finite at t = 1, where alpha * dlog_alpha_dt is 0 * inf
            t = _as_tensor(t)
            slope = torch.where(self._on_last_segment(t), -math.exp(self._log_alpha_last) / (1.0 - self._t_last), slope)
        return slope

    def t_from_log_alpha(self, log_alpha: torch.Tensor) -> torch.Tensor:
        # log alpha decreases with t: interpolate on the flipped (increasing) knots.
        log_alpha, _, _, log_alpha_flipped, t_flipped = self._knots(_as_tensor(log_alpha))
        t = _interp(log_alpha, log_alpha_flipped, t_flipped)
        if self.zero_terminal_snr:
            last = 1.0 - (1.0 - self._t_last) * torch.exp(log_alpha - self._log_alpha_last)
            t = torch.where(log_alpha < self._log_alpha_last, last, t)
        return t

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
        if not isinstance(schedule, str) or schedule not in self.SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is not known; allowed values: {', '.join(self.SCHEDULES)}")
        self.schedule = schedule
        self.beta_min = check_real(beta_min, "beta_min", positive=True)
        self.beta_max = check_real(beta_max, "beta_max", positive=True)
        if not self.beta_min < self.beta_max:
            raise ValueError(f"need beta_min < beta_max, got beta_min={self.beta_min}, beta_max={self.beta_max}")
        self.s = check_real(s, "s", nonnegative=True)
        self.t_min = check_real(t_min, "t_min", nonnegative=True)
        self.t_max = check_real(t_max, "t_max") if t_max is not None else (1.0 if schedule == "linear" else 0.9946)
        if not self.t_min < self.t_max:
            raise ValueError(f"need t_min < t_max, got t_min={self.t_min}, t_max={self.t_max}")
        self._log_cos_s = math.log(math.cos(math.pi / 2 * self.s / (1 + self.s)))
        alpha_max = float(self.alpha(self.t_max))
        if not (math.isfinite(alpha_max) and alpha_max > 0 and float(self.sigma(self.t_max)) < 1):
            limit = "t_max < 1" if schedule == "cosine" else "a smaller t_max or beta_max"
            raise ValueError(
                f"VP({schedule!r}) has alpha(t_max)={alpha_max} at t_max={self.t_max}: alpha must stay positive and "
                f"sigma below 1 inside the range; use {limit}"
            )

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
        self.sigma_min = check_real(sigma_min, "sigma_min", positive=True)
        self.sigma_max = check_real(sigma_max, "sigma_max", positive=True)
        if not self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self._log_ratio = math.log(self.sigma_max) - math.log(self.sigma_min)
        if not math.isfinite(float(self.sigma(1.0))):
            raise ValueError(f"sigma_max / sigma_min overflows float64, got sigma_min={sigma_min}, sigma_max={sigma_max}")
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
        t_min = check_real(sigma_min, "sigma_min", nonnegative=True)
        t_max = check_real(sigma_max, "sigma_max", positive=True)
        if not t_min < t_max:
            raise ValueError(f"need 0 <= sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.t_min, self.t_max = t_min, t_max

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
