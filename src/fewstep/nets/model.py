"""`DiffusionModel`: a backbone network turned into a fewstep model `model(x, t) -> prediction` for one process.

Without preconditioning the backbone sees (x, c_noise(t)) and its output is the prediction ("eps", "x0", "v",
"velocity"). With `precond="edm"` the model is the EDM denoiser of Karras et al. (2022), "Elucidating the
Design Space of Diffusion-Based Generative Models", eq. 7 and table 1: D(x) = c_skip x + c_out F(c_in x, c_noise),
written for any process x = alpha x0 + sigma eps through the scaled state x / alpha and sigma_edm = sigma / alpha,
in a form that stays finite at alpha = 0 and sigma = 0. It predicts "x0".
With `precond="consistency"` the model is a consistency function with the boundary condition built in (Song et al.,
2023, "Consistency Models", section 3 and appendix C): f(x, t) = c_skip(s) x / alpha + c_out(s) x0_hat with s = sigma /
alpha, c_skip = sd^2 / ((s - s_min)^2 + sd^2), c_out = (s - s_min) / sqrt((s - s_min)^2 + sd^2), s_min = s(t_min), so
f(x, t_min) = x / alpha(t_min) exactly; x0_hat is the data prediction of an inner model (`inner_prediction`,
`inner_precond`: what a teacher predicts, so that a student starts from the teacher's weights). It predicts "x0".
Shapes: x [batch, ...], t [batch] (the process's time) -> [batch, ...].
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..parameterization import Coefficients, check_prediction, to_x0_eps
from ..processes import Process, broadcast_to
from .embedding import c_noise

PRECONDITIONINGS = ("none", "edm", "consistency")
INNER_PRECONDITIONINGS = ("none", "edm")


class EDMCoefficients(NamedTuple):
    """c_skip, c_out, c_in of EDM for x = alpha x0 + sigma eps (so that D = c_skip x + c_out F(c_in x))."""

    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor


def edm_coefficients(alpha: torch.Tensor, sigma: torch.Tensor, sigma_data: float) -> EDMCoefficients:
    """EDM preconditioning for a general process; with alpha = 1 it is Karras et al. (2022), table 1, exactly.

    In the scaled variable x / alpha with s = sigma / alpha: c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2),
    c_in = 1 / sqrt(s^2 + sd^2); multiplied out against x this is the form below (finite at alpha = 0).
    """
    norm2 = sigma**2 + (alpha * sigma_data) ** 2
    return EDMCoefficients(sigma_data**2 * alpha / norm2, sigma * sigma_data / norm2.sqrt(), 1.0 / norm2.sqrt())


class ConsistencyCoefficients(NamedTuple):
    """c_skip (already divided by alpha, so it multiplies x) and c_out of the consistency boundary condition."""

    c_skip: torch.Tensor
    c_out: torch.Tensor


def consistency_coefficients(
    alpha: torch.Tensor, sigma: torch.Tensor, sigma_min: float, sigma_data: float
) -> ConsistencyCoefficients:
    """Song et al. (2023), appendix C, in the scaled variable x / alpha with s = sigma / alpha; [batch] -> [batch].

    c_skip / alpha = sd^2 / ((s - s_min)^2 + sd^2) / alpha and c_out = (s - s_min) / sqrt((s - s_min)^2 + sd^2),
    multiplied out with d = sigma - s_min alpha as sd^2 alpha / (d^2 + (sd alpha)^2) and d / sqrt(d^2 + (sd alpha)^2):
    finite at alpha = 0 (then 0 and 1) and at sigma = 0; at t_min, d = 0: f = x / alpha.
    """
    d = sigma - sigma_min * alpha
    norm2 = d**2 + (sigma_data * alpha) ** 2
    return ConsistencyCoefficients(sigma_data**2 * alpha / norm2, d / norm2.sqrt())


class DiffusionModel(nn.Module):
    """`model(x, t)` for `process`: backbone `net(x, c_noise)` plus optional EDM or consistency preconditioning.

    Attributes `process` and `prediction` say how to sample it: `fewstep.sample(model, noise, process=model.process,
    prediction=model.prediction)`. With precond="consistency", `inner_prediction` and `inner_precond` ("none" or
    "edm") describe the inner model whose data prediction the boundary condition wraps.
    """

    def __init__(
        self,
        net: nn.Module,
        process: Process,
        prediction: str = "eps",
        precond: str = "none",
        sigma_data: float = 0.5,
        *,
        inner_prediction: str | None = None,
        inner_precond: str = "none",
    ):
        super().__init__()
        if precond not in PRECONDITIONINGS:
            raise ValueError(f"precond={precond!r} is not known; allowed values: {', '.join(PRECONDITIONINGS)}")
        check_prediction(prediction)
        if precond in ("edm", "consistency") and prediction != "x0":
            raise ValueError(f"precond={precond!r} makes the model a denoiser: prediction must be 'x0', got {prediction=!r}")
        if prediction == "score":
            raise ValueError("prediction='score' is not trainable here; allowed values: eps, x0, v, velocity")
        if precond != "consistency" and (inner_prediction is not None or inner_precond != "none"):
            raise ValueError("inner_prediction and inner_precond go with precond='consistency' only")
        inner_prediction = "x0" if inner_prediction is None else inner_prediction
        if inner_prediction not in ("eps", "x0", "v", "velocity"):
            raise ValueError(f"inner_prediction={inner_prediction!r} is not known; allowed values: eps, x0, v, velocity")
        if inner_precond not in INNER_PRECONDITIONINGS:
            allowed = ", ".join(INNER_PRECONDITIONINGS)
            raise ValueError(f"inner_precond={inner_precond!r} is not known; allowed values: {allowed}")
        if inner_precond == "edm" and inner_prediction != "x0":
            raise ValueError(f"inner_precond='edm' needs inner_prediction='x0', got inner_prediction={inner_prediction!r}")
        self.net = net
        self.process = process
        self.prediction = prediction
        self.precond = precond
        self.sigma_data = float(sigma_data)
        self.inner_prediction = inner_prediction
        self.inner_precond = inner_precond
        self.sigma_min = float(process.sigma(process.t_min) / process.alpha(process.t_min))  # s(t_min), the boundary

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        level = c_noise(self.process, t).to(x.dtype)
        if self.precond == "none":
            return self.net(x, level)
        t64 = t.to(torch.float64)
        alpha, sigma = self.process.alpha(t64), self.process.sigma(t64)
        if self.precond == "edm":
            return self._edm(x, level, alpha, sigma)
        return self._consistency(x, t64, level, alpha, sigma)

    def _edm(self, x: torch.Tensor, level: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        c_skip, c_out, c_in = (broadcast_to(v, x) for v in edm_coefficients(alpha, sigma, self.sigma_data))
        return c_skip * x + c_out * self.net(c_in * x, level)

    def _consistency(self, x: torch.Tensor, t64: torch.Tensor, level: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """c_skip x + c_out x0_hat, x0_hat converted from the inner model's prediction in x's dtype (not bf16)."""
        inner = self.net(x, level) if self.inner_precond == "none" else self._edm(x, level, alpha, sigma)
        x0_hat, _ = to_x0_eps(inner.to(x.dtype), self.inner_prediction, x, Coefficients.of(self.process, t64, x))
        c_skip, c_out = (broadcast_to(v, x) for v in consistency_coefficients(alpha, sigma, self.sigma_min, self.sigma_data))
        return c_skip * x + c_out * x0_hat
