"""Predictor-corrector sampling: Langevin corrector steps at each noise level, then a reverse-SDE predictor step.

Song et al., "Score-Based Generative Modeling through Stochastic Differential Equations", ICLR 2021, Algorithms 2-4:
the corrector runs `corrector_steps` Langevin MCMC steps x <- x + e score + sqrt(2 e) z on p_t with step size
e = 2 (snr ||z|| / ||score||)^2 (without the VP factor alpha_i of the paper's Algorithm 4). The norms: `norms="expected"`
(default) replaces both by their values for standard normal noise and a noise prediction of unit size per coordinate,
||z|| = sqrt(D), ||score|| = sqrt(D) / sigma_i, so e = 2 (snr sigma_i)^2: the same for every sample, so that a sample
never depends on its batch, and stable in any dimension. `norms="batch"` averages the measured norms over the batch,
as the paper's code does (a sample then depends on its batch); `norms="sample"` takes each sample's own norms (batch
invariant too, fine in high dimension; in very low dimension ||z|| / ||score|| is heavy-tailed and the steps become
erratic). The predictor is Euler-Maruyama on the reverse SDE ("euler_maruyama") or the
DDPM ancestral step ("ddpm", the reverse-diffusion predictor's analogue). NFE per step: corrector_steps + 1.
x [batch, ...].
"""

import math

import torch

from ..parameterization import Prediction
from ._core import Run, register
from ._options import check_choice, check_int, check_number
from .ddpm import ddpm_step
from .euler_maruyama import reverse_sde_step, sde_diffusion

PREDICTORS = ("euler_maruyama", "ddpm")
NORMS = ("expected", "batch", "sample")


def _norm(v: torch.Tensor, norms: str) -> torch.Tensor:
    """Per-sample Euclidean norms [batch, 1, ...], or their batch mean ("batch")."""
    n = v.reshape(v.shape[0], -1).norm(dim=1).reshape((-1,) + (1,) * (v.ndim - 1))
    return n.mean() if norms == "batch" else n


def langevin_step(
    run: Run, i: int, x: torch.Tensor, pred: Prediction, snr: float, norms: str, part: int, parts: int
) -> torch.Tensor:
    """One Langevin step on p_{t_i}: x + e score + sqrt(2 e) z, e = 2 (snr ||z|| / ||score||)^2 (norms: module doc)."""
    z = run.noise_like(x, i, part, parts)
    score = pred.eps * (-1.0 / run.sigma[i])
    if norms == "expected":
        step = 2.0 * (snr * run.sigma[i]) ** 2
        return x + step * score + math.sqrt(2.0 * step) * z
    ratio = _norm(z, norms) / _norm(score, norms).clamp_min(torch.finfo(x.dtype).tiny)
    step = 2.0 * (snr * ratio) ** 2
    return x + step * score + torch.sqrt(2.0 * step) * z


def predictor_step(run: Run, i: int, x: torch.Tensor, pred: Prediction, predictor: str, part: int, parts: int) -> torch.Tensor:
    """The predictor step i -> i + 1 with noise part `part` of `parts`."""
    if predictor == "ddpm":
        return ddpm_step(run, i, x, pred, "posterior", part, parts)
    return reverse_sde_step(run, i, x, pred, sde_diffusion(run, i), part, parts)


@register("pc", order=1, stochastic=True)
def pc(
    run: Run,
    x: torch.Tensor,
    *,
    snr: float = 0.16,
    corrector_steps: int = 1,
    predictor: str = "euler_maruyama",
    norms: str = "expected",
) -> torch.Tensor:
    """Predictor-corrector: `corrector_steps` Langevin steps with signal-to-noise ratio `snr`, then one predictor step."""
    snr = check_number("snr", snr, 0.0, 10.0)
    corrector_steps = check_int("corrector_steps", corrector_steps, 0, 1000)
    check_choice("predictor", predictor, PREDICTORS)
    check_choice("norms", norms, NORMS)
    if predictor == "euler_maruyama":
        for i in range(run.steps):
            sde_diffusion(run, i)  # fail before any evaluation
    parts = corrector_steps + 1
    for i in run.range():
        for k in range(corrector_steps):
            x = langevin_step(run, i, x, run.denoise(x, i), snr, norms, k, parts)
        pred = run.denoise(x, i)
        x = predictor_step(run, i, x, pred, predictor, corrector_steps, parts)
        x = run.report(i, x, pred)
    return x
