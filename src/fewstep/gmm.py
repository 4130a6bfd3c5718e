"""Gaussian mixtures with diagonal covariances: the exact test bed for every solver, schedule and conversion.

For x_t = alpha x0 + sigma eps and x0 ~ sum_k w_k N(mu_k, diag(s_k^2)), the marginal is again a mixture,
sum_k w_k N(alpha mu_k, diag(alpha^2 s_k^2 + sigma^2)), and the posterior means E[x0 | x_t] and E[eps | x_t] are
closed-form. So is every parameterization of the ideal model, and the probability-flow ODE can be solved to
~1e-9 in float64, which gives the exact answer every solver test and benchmark compares with.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from scipy.integrate import solve_ivp

from .parameterization import Coefficients, check_prediction, from_x0_eps
from .processes import Process, Time, _as_tensor


class GaussianMixture:
    """A mixture of K diagonal Gaussians in D dimensions.

    weights: [K] (normalised here), means: [K, D], stds: [K, D] or [K] (isotropic per component).
    """

    def __init__(self, weights, means, stds):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must have shape [K, D], got {tuple(means.shape)}")
        k, d = means.shape
        weights = torch.as_tensor(weights, dtype=torch.float64).flatten()
        stds = torch.as_tensor(stds, dtype=torch.float64)
        if stds.ndim == 1:
            stds = stds[:, None].expand(k, d)
        if weights.shape != (k,) or stds.shape != (k, d):
            raise ValueError(f"weights must be [K]={k} and stds [K, D]={k, d}; got {tuple(weights.shape)}, {tuple(stds.shape)}")
        if not bool((weights > 0).all()) or not bool((stds > 0).all()):
            raise ValueError("weights and stds must be positive")
        self.weights = weights / weights.sum()
        self.means = means.contiguous()
        self.stds = stds.contiguous()
        self.dim = d

    # Posterior --------------------------------------------------------------------------------------------

    def _posterior(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor):
        """Responsibilities [B, K] and per-component terms for x [B, D] at alpha, sigma [B, 1] (float64)."""
        mu, s2 = self.means[None], self.stds[None] ** 2  # [1, K, D]
        a, sg = alpha[:, :, None], sigma[:, :, None]  # [B, 1, 1]
        var = a * a * s2 + sg * sg  # [B, K, D]
        diff = x[:, None, :] - a * mu  # [B, K, D]
        log_resp = torch.log(self.weights)[None] - 0.5 * ((diff * diff / var) + torch.log(2 * math.pi * var)).sum(-1)
        resp = torch.softmax(log_resp, dim=1)[:, :, None]  # [B, K, 1]
        return resp, diff, var, a, s2, sg, log_resp

    def _flat(self, x: torch.Tensor, alpha, sigma):
        shape = x.shape
        x64 = x.reshape(shape[0], -1).to(torch.float64)
        if x64.shape[1] != self.dim:
            raise ValueError(f"x has {x64.shape[1]} features per sample, the mixture has dimension {self.dim}")
        a = torch.as_tensor(alpha, dtype=torch.float64, device=x.device).reshape(-1, 1).expand(shape[0], 1)
        s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1).expand(shape[0], 1)
        return x64, a, s

    def posterior_mean(self, x: torch.Tensor, alpha, sigma) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact (E[x0 | x], E[eps | x]) for x = alpha x0 + sigma eps; x [B, D], alpha/sigma scalars or [B]."""
        x64, a, s = self._flat(x, alpha, sigma)
        resp, diff, var, a3, s2, sg, _ = self._posterior(x64, a, s)
        x0 = (resp * (self.means[None] + a3 * s2 * diff / var)).sum(1)
        eps = (resp * (sg * diff / var)).sum(1)
        return x0.to(x.dtype).reshape(x.shape), eps.to(x.dtype).reshape(x.shape)

    def score(self, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """Exact score grad log p_t(x) of the noisy marginal."""
        x64, a, s = self._flat(x, alpha, sigma)
        resp, diff, var, *_ = self._posterior(x64, a, s)
        return (-(resp * diff / var).sum(1)).to(x.dtype).reshape(x.shape)

    def log_prob(self, x: torch.Tensor, alpha=1.0, sigma=0.0) -> torch.Tensor:
        """Log density of the data (default) or of the noisy marginal at (alpha, sigma); x [B, D] -> [B]."""
        x64, a, s = self._flat(x, alpha, sigma)
        *_, log_resp = self._posterior(x64, a, s)
        return torch.logsumexp(log_resp, dim=1).to(x.dtype)

    # Models -----------------------------------------------------------------------------------------------

    def model(self, process: Process, prediction: str = "eps") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The ideal network for `process` predicting `prediction`: a callable (x [B, D], t [B]) -> [B, D]."""
        check_prediction(prediction)

        def ideal_model(x: torch.Tensor, t: Time) -> torch.Tensor:
            t = _as_tensor(t).to(torch.float64)
            alpha, sigma = process.alpha(t), process.sigma(t)
            if prediction == "score":
                return self.score(x, alpha, sigma)
            x0, eps = self.posterior_mean(x, alpha, sigma)
            c = Coefficients.of(process, t, x)
            return from_x0_eps(x0, eps, prediction, c)

        return ideal_model

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float64) -> torch.Tensor:
        """n exact samples [n, D]."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds[k] * z).to(dtype)

    # Exact probability-flow ODE -----------------------------------------------------------------------------

    def ode_solution(
        self,
        noise: torch.Tensor,
        process: Process,
        t_start: float | None = None,
        t_end: float | None = None,
        *,
        denoise_to_zero: bool = True,
        rtol: float = 1e-11,
        atol: float = 1e-11,
    ) -> torch.Tensor:
        """The probability-flow ODE from x = sigma(t_start) noise to t_end, solved to ~1e-9 in float64.

        Solved in the angle phi = atan2(sigma, alpha) on the rescaled state x / sqrt(alpha^2 + sigma^2), where the
        ODE is d x_hat / d phi = -sin(phi) E[x0|x] + cos(phi) E[eps|x] for every process (smooth and bounded,
        also at alpha = 0 or sigma = 0), with SciPy's DOP853. With `denoise_to_zero`, returns the exact data
        prediction at t_end, like `fewstep.sample`. noise: [B, D]; returns float64 [B, D].
        """
        t_start = process.t_max if t_start is None else float(t_start)
        t_end = process.t_min if t_end is None else float(t_end)
        a1, s1 = float(process.alpha(t_end)), float(process.sigma(t_end))
        x = self._flow(noise, process, t_start, math.atan2(s1, a1), rtol, atol) * math.hypot(a1, s1)
        if denoise_to_zero and s1 > 0:
            x = self.posterior_mean(x, a1, s1)[0]
        return x.reshape(noise.shape)

    def flow_map(
        self, noise: torch.Tensor, process: Process, t_start: float | None = None, *, rtol: float = 1e-11, atol: float = 1e-11
    ) -> torch.Tensor:
        """The probability-flow ODE from x = sigma(t_start) noise all the way to sigma = 0: the exact noise-to-data
        map that every sampler approximates, whatever its last time. noise: [B, D]; returns float64 [B, D]."""
        t_start = process.t_max if t_start is None else float(t_start)
        return self._flow(noise, process, t_start, 0.0, rtol, atol).reshape(noise.shape)

    def _flow(self, noise: torch.Tensor, process: Process, t_start: float, phi_end: float, rtol: float, atol: float):
        """x_hat = x / sqrt(alpha^2 + sigma^2) at the angle phi_end, from x = sigma(t_start) noise ([B, D], float64)."""
        a0, s0 = float(process.alpha(t_start)), float(process.sigma(t_start))
        phi0 = math.atan2(s0, a0)
        batch = noise.shape[0]
        x_hat = (s0 * noise.reshape(batch, -1).to(torch.float64) / math.hypot(a0, s0)).numpy().ravel()

        def rhs(phi: float, y: np.ndarray) -> np.ndarray:
            x = torch.from_numpy(y).reshape(batch, self.dim)
            x0, eps = self.posterior_mean(x, math.cos(phi), math.sin(phi))
            return (-math.sin(phi) * x0 + math.cos(phi) * eps).numpy().ravel()

        if phi0 != phi_end:
            sol = solve_ivp(rhs, (phi0, phi_end), x_hat, method="DOP853", rtol=rtol, atol=atol)
            if not sol.success:
                raise RuntimeError(f"reference ODE solve failed: {sol.message}")
            x_hat = sol.y[:, -1]
        return torch.from_numpy(x_hat).reshape(batch, self.dim)

    def single_gaussian_flow(self, noise: torch.Tensor, process: Process, t_start: float, t_end: float) -> torch.Tensor:
        """Closed-form probability-flow ODE solution for a single-component mixture (K = 1).

        The standardised coordinate (x - alpha mu) / sqrt(alpha^2 s^2 + sigma^2) is constant along the flow.
        """
        if self.means.shape[0] != 1:
            raise ValueError("single_gaussian_flow needs a mixture with one component")
        mu, s = self.means[0], self.stds[0]
        a0, s0 = process.alpha(t_start), process.sigma(t_start)
        a1, s1 = process.alpha(t_end), process.sigma(t_end)
        x = s0 * noise.to(torch.float64)
        z = (x - a0 * mu) / torch.sqrt(a0**2 * s**2 + s0**2)
        return a1 * mu + z * torch.sqrt(a1**2 * s**2 + s1**2)


def ring2d(modes: int = 8, radius: float = 1.0, std: float = 0.1) -> GaussianMixture:
    """A 2-D ring of `modes` equal Gaussians."""
    angle = torch.arange(modes, dtype=torch.float64) * 2 * math.pi / modes
    means = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return GaussianMixture(torch.ones(modes), means, torch.full((modes,), std, dtype=torch.float64))


def mixture_nd(dim: int = 16, components: int = 6, seed: int = 0) -> GaussianMixture:
    """A D-dimensional mixture with random weights, means in [-0.8, 0.8]^D and stds in [0.1, 0.4] (fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    weights = 0.5 + torch.rand(components, generator=g, dtype=torch.float64)
    means = 1.6 * torch.rand(components, dim, generator=g, dtype=torch.float64) - 0.8
    stds = 0.1 + 0.3 * torch.rand(components, dim, generator=g, dtype=torch.float64)
    return GaussianMixture(weights, means, stds)


PROBLEMS: dict[str, Callable[[], GaussianMixture]] = {"ring2d": ring2d, "mixture16d": mixture_nd}


def problem(name: str) -> GaussianMixture:
    """A named exact test problem: 'ring2d' or 'mixture16d'."""
    if name not in PROBLEMS:
        raise ValueError(f"problem={name!r} is not known; allowed values: {', '.join(PROBLEMS)}")
    return PROBLEMS[name]()
