"""DPM-Solver-v3: multistep predictor-corrector with empirical model statistics (EMS), and their computation.

Zheng, Lu, Chen & Zhu, "DPM-Solver-v3: Improved Diffusion ODE Solver with Empirical Model Statistics",
NeurIPS 2023 (eqs. 4-14, Theorem 3.1, Appendix C).

In log-SNR lambda with y = x / alpha the ODE is dy/dlambda = -l y - f, f = (sigma eps - l x) / alpha (eq. 4). With
E(lambda) = exp(int_{lambda_s}^lambda s) and B(lambda) = int_{lambda_s}^lambda exp(-int_{lambda_s}^r s) b dr, the function
g = f / E - B is approximated by the polynomial through the past values (eqs. 8-9, 12-14):

    y_t = exp(-int l) y_s - int_{lambda_s}^{lambda_t} exp(-int_lambda^{lambda_t} l) E(lambda) (g(lambda) + B(lambda)) dlambda.

The EMS l, s, b (D-dimensional, one value per data coordinate and log-SNR) minimise the first-order error:
l = sigma E[diag d eps / dx] (eq. 5), (s, b) the per-coordinate least-squares fit of the total derivative
f^(1) ~ s f + b (eq. 11). `v3_statistics` estimates them on calibration data over a uniform log-SNR grid with
central finite differences (Hutchinson probes for the Jacobian diagonal, a step along the ODE for f^(1)) and
caches them on disk (safetensors + JSON metadata, written atomically). Between grid points the EMS are piecewise
linear; their integrals are exact for that interpolant, the outer integrals use Gauss-Legendre quadrature.
Special cases (Appendix I.1): l = 1, s = 0, b = 0 is multistep DPM-Solver++ in data prediction (with the exact
phi-function weights of the polynomial, i.e. exponential Adams-Bashforth, as `ghvb` with an integer order), and
l = 0, s = -1, b = 0 the multistep DPM-Solver in noise prediction. (With l = s = b = 0 the polynomial is fitted to
e^{-lambda} eps, which is neither.)

Implemented: the multistep predictor of orders 1-3 and the multistep corrector of the same order (section 3.2.2,
no extra evaluation; the stored value of a point uses the predicted state). Not implemented: the pseudo-order
solver and the half-corrector for very few steps / large guidance (section 3.3). Steps with an infinite log-SNR at
an end (alpha = 0 or sigma = 0) are DDIM steps. Shapes: x [batch, *shape]; EMS [grid, *shape].
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import atomic_write_bytes
from ..parameterization import Denoiser, Model
from ..processes import Process
from ._cache import CacheError, check_model_name, digest, tensor_digest
from ._core import Run, register
from ._options import check_int

GAUSS_NODES = 24
DEFAULT_CLIP = 8.0  # log-SNR bound used for a process whose range is infinite at an end


@dataclass
class ModelStatistics:
    """EMS on a uniform increasing log-SNR grid: log_snr [M]; l, s, b [M, *shape] (float64, CPU)."""

    log_snr: torch.Tensor
    l: torch.Tensor  # noqa: E741 (the paper's name)
    s: torch.Tensor
    b: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        m = self.log_snr.shape[0]
        if self.log_snr.ndim != 1 or m < 2 or not bool((self.log_snr[1:] > self.log_snr[:-1]).all()):
            raise ValueError("statistics log_snr must be an increasing 1-D grid of at least 2 points")
        for name in ("l", "s", "b"):
            value = getattr(self, name)
            if value.shape[0] != m or value.shape != self.l.shape or not bool(torch.isfinite(value).all()):
                raise ValueError(
                    f"statistics {name} must be finite with shape [grid, *shape] matching l, got {tuple(value.shape)}"
                )

    @classmethod
    def constant(
        cls,
        shape: tuple[int, ...],
        lo: float,
        hi: float,
        *,
        l: float,  # noqa: E741
        s: float = 0.0,
        b: float = 0.0,
    ) -> ModelStatistics:
        """Constant EMS over [lo, hi]: l = 1, s = b = 0 is DPM-Solver++; l = 0, s = -1, b = 0 the noise-prediction DPM-Solver."""
        grid = torch.linspace(lo, hi, 2, dtype=torch.float64)
        full = [torch.full((2, *shape), float(v), dtype=torch.float64) for v in (l, s, b)]
        return cls(grid, *full, meta={"kind": "constant", "l": l, "s": s, "b": b})

    def save(self, path: str | os.PathLike) -> None:
        """Write safetensors (the arrays) and a JSON sidecar (metadata and a checksum), each atomically."""
        from safetensors.torch import save

        data = save({k: getattr(self, k).contiguous() for k in ("log_snr", "l", "s", "b")})
        atomic_write_bytes(path, data)
        meta = {"meta": self.meta, "sha256": hashlib.sha256(data).hexdigest(), "shape": list(self.l.shape)}
        atomic_write_bytes(Path(str(path) + ".json"), json.dumps(meta, sort_keys=True).encode())

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelStatistics:
        """Read statistics written by `save`; CacheError if either file is missing, corrupted or inconsistent."""
        from safetensors.torch import load

        try:
            data = Path(path).read_bytes()
            meta = json.loads(Path(str(path) + ".json").read_text())
            if meta.get("sha256") != hashlib.sha256(data).hexdigest():
                raise ValueError("checksum mismatch")
            arrays = load(data)
            return cls(arrays["log_snr"], arrays["l"], arrays["s"], arrays["b"], meta=meta["meta"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError, json.JSONDecodeError, RuntimeError) as err:
            raise CacheError(f"statistics cache {path} is corrupted or incomplete ({err}); delete it to recompute") from err


# Estimating the statistics ----------------------------------------------------------------------------------


def _eps(denoiser: Denoiser, x: torch.Tensor, t: float) -> torch.Tensor:
    return denoiser(x, t).eps


def v3_statistics(
    model: Model,
    process: Process,
    samples: torch.Tensor,
    *,
    prediction: str = "eps",
    grid_size: int = 400,
    log_snr_range: tuple[float, float] | None = None,
    probes: int = 2,
    seed: int = 0,
    model_name: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> ModelStatistics:
    """Estimate the EMS of `model` on data `samples` [K, *shape] over `grid_size` log-SNRs; cached when cache_dir is set.

    x_lambda = alpha x0 + sigma eps with fixed noise; derivatives by central differences in the samples' dtype.
    """
    grid_size = check_int("grid_size", grid_size, 2, 100_000)
    probes = check_int("probes", probes, 1, 1000)
    if cache_dir is not None and model_name is None:
        raise ValueError("model_name is needed to cache statistics on disk (cache_dir is set): name the model")
    check_model_name(model_name, in_file_name=cache_dir is not None)  # "../x" would leave cache_dir
    lo, hi = log_snr_range or _default_range(process)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"log_snr_range must be finite (low, high) with low < high, got {(lo, hi)!r}")
    data = samples.detach()
    key = {
        "method": "dpm_solver_v3",
        "process": repr(process),
        "model": model_name,
        "prediction": prediction,
        "grid": [grid_size, lo, hi],
        "probes": probes,
        "seed": seed,
        "samples": tensor_digest(data),
    }
    path = None if cache_dir is None else Path(cache_dir) / f"{model_name}-v3-ems-{digest(key)}.safetensors"
    if path is not None and (path.exists() or Path(str(path) + ".json").exists()):
        stats = ModelStatistics.load(path)
        if stats.meta != json.loads(json.dumps(key)):
            raise CacheError(f"statistics cache {path} holds statistics for another configuration; delete it to recompute")
        return stats
    stats = _estimate(Denoiser(model, process, prediction), data, grid_size, lo, hi, probes, seed)
    stats.meta = key
    if path is not None:
        stats.save(path)
    return stats


def _default_range(process: Process) -> tuple[float, float]:
    lo, hi = float(process.log_snr(process.t_max)), float(process.log_snr(process.t_min))
    return max(lo, -DEFAULT_CLIP), min(hi, DEFAULT_CLIP)


def _estimate(
    denoiser: Denoiser, x0: torch.Tensor, grid_size: int, lo: float, hi: float, probes: int, seed: int
) -> ModelStatistics:
    process = denoiser.process
    g = torch.Generator(device=x0.device).manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g, device=x0.device, dtype=x0.dtype)
    # the same noise and probes at every log-SNR (common random numbers): the estimates are smooth in lambda
    signs = [torch.randint(0, 2, x0.shape, generator=g, device=x0.device).to(x0.dtype) * 2 - 1 for _ in range(probes)]
    step = torch.finfo(x0.dtype).eps ** (1 / 3)
    lams = torch.linspace(lo, hi, grid_size, dtype=torch.float64)
    l_list, sums = [], []
    with torch.no_grad():
        for lam in lams.tolist():
            t = float(process.t_from_log_snr(lam))
            alpha, sigma = float(process.alpha(t)), float(process.sigma(t))
            x = alpha * x0 + sigma * noise
            eps = _eps(denoiser, x, t)
            diag = torch.zeros_like(x0[0])
            for v in signs:
                jv = (_eps(denoiser, x + step * sigma * v, t) - _eps(denoiser, x - step * sigma * v, t)) / (2 * step * sigma)
                diag = diag + (v * jv).mean(0) / probes
            l_n = sigma * diag
            # total derivative of eps along the ODE dx/dlambda = (dlog alpha/dlambda) x - sigma eps
            t_plus, t_minus = float(process.t_from_log_snr(lam + step)), float(process.t_from_log_snr(lam - step))
            dlog_alpha = (math.log(float(process.alpha(t_plus))) - math.log(float(process.alpha(t_minus)))) / (2 * step)
            dx = dlog_alpha * x - sigma * eps
            deps = (_eps(denoiser, x + step * dx, t_plus) - _eps(denoiser, x - step * dx, t_minus)) / (2 * step)
            y = x / alpha
            f = math.exp(-lam) * eps - l_n * y
            a = math.exp(-lam) * (deps - eps + l_n * eps)  # f^(1) = a - l' y
            l_list.append(l_n)
            sums.append([z.mean(0) for z in (f, a, y, f * f, f * a, f * y)])
    l_all = torch.stack(l_list).to(torch.float64)
    dl = torch.from_numpy(np.gradient(l_all.cpu().numpy(), lams.numpy(), axis=0))
    mf, ma, my, mff, mfa, mfy = (torch.stack([s[k] for s in sums]).to(torch.float64).cpu() for k in range(6))
    mfd = ma - dl * my  # E[f^(1)]
    mffd = mfa - dl * mfy  # E[f f^(1)]
    var = (mff - mf**2).clamp_min(0)
    s = (mffd - mf * mfd) / (var + 1e-12 * (1 + mf**2))
    b = mfd - s * mf
    return ModelStatistics(lams, l_all.cpu(), s, b)


# The solver -------------------------------------------------------------------------------------------------


class _Integrals:
    """Exact running integrals of the piecewise-linear EMS: L = int l, S = int s, C = int exp(-S) b."""

    def __init__(self, stats: ModelStatistics):
        self.grid = stats.log_snr
        self.l = stats.l.flatten(1)
        self.s = stats.s.flatten(1)
        self.cum_l = self._cumulative(self.l)
        self.cum_s = self._cumulative(self.s)
        self.c_integrand = torch.exp(-self.cum_s) * stats.b.flatten(1)
        self.cum_c = self._cumulative(self.c_integrand)

    def _cumulative(self, v: torch.Tensor) -> torch.Tensor:
        dx = (self.grid[1:] - self.grid[:-1])[:, None]
        return torch.cat([torch.zeros_like(v[:1]), torch.cumsum(0.5 * dx * (v[1:] + v[:-1]), 0)])

    def _locate(self, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        j = (torch.searchsorted(self.grid, lam, right=True) - 1).clamp(0, len(self.grid) - 2)
        width = (self.grid[j + 1] - self.grid[j])[:, None]
        return j, (lam - self.grid[j])[:, None], width

    def value(self, v: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """Linear interpolation of v [M, D] at lam [Q] -> [Q, D]."""
        j, u, w = self._locate(lam)
        return v[j] + (v[j + 1] - v[j]) * u / w

    def integral(self, cum: torch.Tensor, v: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """int_{grid[0]}^{lam} of the linear interpolant of v (exact), at lam [Q] -> [Q, D]."""
        j, u, w = self._locate(lam)
        return cum[j] + v[j] * u + (v[j + 1] - v[j]) * u**2 / (2 * w)

    def L(self, lam):  # noqa: N802
        return self.integral(self.cum_l, self.l, lam)

    def S(self, lam):  # noqa: N802
        return self.integral(self.cum_s, self.s, lam)

    def C(self, lam):  # noqa: N802
        return self.integral(self.cum_c, self.c_integrand, lam)


def _lagrange_basis(nodes: list[float], at: np.ndarray) -> np.ndarray:
    """[len(nodes), len(at)] values of the Lagrange basis polynomials."""
    out = np.ones((len(nodes), len(at)))
    for j, nj in enumerate(nodes):
        for m, nm in enumerate(nodes):
            if m != j:
                out[j] *= (at - nm) / (nj - nm)
    return out


def step_coefficients(
    ems: _Integrals, lam_s: float, lam_t: float, nodes: list[float]
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """(A, [W_j a_j], const) [D] with y_t = A y_s - sum_j (W_j a_j) f_j + const for the node log-SNRs `nodes`."""
    gx, gw = np.polynomial.legendre.leggauss(GAUSS_NODES)
    q = torch.from_numpy(lam_s + (lam_t - lam_s) * (gx + 1) / 2)
    w = torch.from_numpy(gw * (lam_t - lam_s) / 2)[:, None]
    ends = torch.tensor([lam_s, lam_t], dtype=torch.float64)
    big_l, big_s, big_c = ems.L(ends), ems.S(ends), ems.C(ends)
    kernel = torch.exp(ems.L(q) - big_l[1] + ems.S(q) - big_s[0])  # exp(-int_q^t l) E(q)
    b_at = torch.exp(big_s[0]) * (ems.C(q) - big_c[0])  # B(q)
    const = -(w * kernel * b_at).sum(0)
    basis = torch.from_numpy(_lagrange_basis(nodes, (q.numpy()))).T  # [Q, nodes]
    lam_nodes = torch.tensor(nodes, dtype=torch.float64)
    a_nodes = torch.exp(-(ems.S(lam_nodes) - big_s[0]))
    c_nodes = torch.exp(big_s[0]) * (ems.C(lam_nodes) - big_c[0])
    coefs = []
    for j in range(len(nodes)):
        wj = (w * kernel * basis[:, j : j + 1]).sum(0)
        coefs.append(wj * a_nodes[j])
        const = const + wj * c_nodes[j]
    return torch.exp(-(big_l[1] - big_l[0])), coefs, const


class _Plan:
    """Per-step coefficients of predictor and corrector, built once before the loop, on the device of x."""

    def __init__(self, run: Run, stats: ModelStatistics, x: torch.Tensor, order: int, corrector: bool):
        ems = _Integrals(stats)
        lo, hi = float(stats.log_snr[0]), float(stats.log_snr[-1])
        shape = x.shape[1:]
        to = {"device": x.device, "dtype": x.dtype}
        if tuple(stats.l.shape[1:]) != tuple(shape):
            raise ValueError(f"statistics are for samples of shape {tuple(stats.l.shape[1:])}, got x of shape {tuple(shape)}")
        finite = [lam for lam in run.log_snr if math.isfinite(lam)]
        if finite and (min(finite) < lo - 1e-9 or max(finite) > hi + 1e-9):
            raise ValueError(
                f"statistics cover log-SNR [{lo:.4g}, {hi:.4g}] but the time grid needs [{min(finite):.4g}, {max(finite):.4g}]; "
                "recompute them with a wider log_snr_range or sample over a narrower range"
            )
        finite_l = ems.value(ems.l, torch.tensor(finite, dtype=torch.float64)) if finite else None
        self.l = {lam: finite_l[k].reshape(shape).to(**to) for k, lam in enumerate(finite)}
        self.predictor, self.corrector = [], []
        for i in range(run.steps):
            lam_s, lam_t = run.log_snr[i], run.log_snr[i + 1]
            k = run.order_at(i, order)
            if not (math.isfinite(lam_s) and math.isfinite(lam_t)):
                self.predictor.append(None)
                self.corrector.append(None)
                continue
            self.predictor.append(self._pack(ems, lam_s, lam_t, [run.log_snr[i - j] for j in range(k)], shape, to))
            use = corrector and k >= 2 and i < run.steps - 1
            nodes = [lam_t] + [run.log_snr[i - j] for j in range(k - 1)]
            self.corrector.append(self._pack(ems, lam_s, lam_t, nodes, shape, to) if use else None)

    @staticmethod
    def _pack(ems, lam_s, lam_t, nodes, shape, to):
        a, coefs, const = step_coefficients(ems, lam_s, lam_t, nodes)
        return a.reshape(shape).to(**to), [c.reshape(shape).to(**to) for c in coefs], const.reshape(shape).to(**to)


def _apply(run: Run, i: int, x: torch.Tensor, pack, fs: list[torch.Tensor]) -> torch.Tensor:
    a, coefs, const = pack
    y = a * (x / run.alpha[i]) + const
    for c, f in zip(coefs, fs, strict=False):
        y = y - c * f
    return run.alpha[i + 1] * y


@register("dpm_solver_v3", order=2)
def dpm_solver_v3(
    run: Run, x: torch.Tensor, *, statistics: ModelStatistics | None = None, order: int = 2, corrector: bool = True
) -> torch.Tensor:
    """DPM-Solver-v3 multistep predictor(-corrector) of order 1-3 with EMS `statistics` (from fewstep.v3_statistics)."""
    if not isinstance(statistics, ModelStatistics):
        raise ValueError("statistics must be a ModelStatistics (from fewstep.v3_statistics or ModelStatistics.constant)")
    order = check_int("order", order, 1, 3)
    if not isinstance(corrector, bool):
        raise ValueError(f"corrector must be True or False, got corrector={corrector!r}")
    plan = _Plan(run, statistics, x, order, corrector)
    fs: list[torch.Tensor] = []  # f at the grid points, newest first

    def f_of(x_j: torch.Tensor, eps: torch.Tensor, j: int) -> torch.Tensor:
        lam = run.log_snr[j]
        return math.exp(-lam) * eps - plan.l[lam] * (x_j / run.alpha[j]) if math.isfinite(lam) else eps

    pred = run.denoise(x, 0)
    fs = [f_of(x, pred.eps, 0)]
    for i in run.range():
        x_next = run.ddim_step(i, pred) if plan.predictor[i] is None else _apply(run, i, x, plan.predictor[i], fs)
        new = pred
        if i < run.steps - 1:
            new = run.denoise(x_next, i + 1)
            f_new = f_of(x_next, new.eps, i + 1)  # stored at the predicted state: no extra evaluation (section 3.2.2)
            if plan.corrector[i] is not None:
                x_next = _apply(run, i, x, plan.corrector[i], [f_new, *fs])
            fs = [f_new, *fs[:2]]
        x_next, fs, new = run.report(i, x_next, pred, fs, new)
        x, pred = x_next, new
    return x
