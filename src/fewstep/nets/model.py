"""`DiffusionModel`: a backbone network turned into a fewstep model `model(x, t) -> prediction` for one process.

Without preconditioning the backbone sees (x, c_noise(t)) and its output is the prediction ("eps", "x0", "v",
"velocity"). With `precond="edm"` the model is the EDM denoiser of Karras et al. (2022), "Elucidating the
Design Space of Diffusion-Based Generative Models", eq. 7 and table 1: D(x) = c_skip x + c_out F(c_in x, c_noise),
written for any process x = alpha x0 + sigma eps through the scaled state x / alpha and sigma_edm = sigma / alpha,
in a form that stays finite at alpha = 0 and sigma = 0. It predicts "x0".
Shapes: x [batch, ...], t [batch] (the process's time) -> [batch, ...].
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..parameterization import check_prediction
from ..processes import Process, broadcast_to
from .embedding import c_noise

PRECONDITIONINGS = ("none", "edm")


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


class DiffusionModel(nn.Module):
    """`model(x, t)` for `process`: backbone `net(x, c_noise)` plus optional EDM preconditioning.

    Attributes `process` and `prediction` say how to sample it: `fewstep.sample(model, noise, process=model.process,
    prediction=model.prediction)`.
    """

    def __init__(self, net: nn.Module, process: Process, prediction: str = "eps", precond: str = "none", sigma_data: float = 0.5):
        super().__init__()
        if precond not in PRECONDITIONINGS:
            raise ValueError(f"precond={precond!r} is not known; allowed values: {', '.join(PRECONDITIONINGS)}")
        check_prediction(prediction)
        if precond == "edm" and prediction != "x0":
            raise ValueError(f"precond='edm' makes the model a denoiser: prediction must be 'x0', got prediction={prediction!r}")
        if prediction == "score":
            raise ValueError("prediction='score' is not trainable here; allowed values: eps, x0, v, velocity")
        self.net = net
        self.process = process
        self.prediction = prediction
        self.precond = precond
        self.sigma_data = float(sigma_data)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        level = c_noise(self.process, t).to(x.dtype)
        if self.precond == "none":
            return self.net(x, level)
        t64 = t.to(torch.float64)
        alpha, sigma = self.process.alpha(t64), self.process.sigma(t64)
        c = edm_coefficients(alpha, sigma, self.sigma_data)
        c_skip, c_out, c_in = (broadcast_to(v, x) for v in c)
        return c_skip * x + c_out * self.net(c_in * x, level)
