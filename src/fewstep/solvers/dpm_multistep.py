"""Multistep DPM-Solver(++) of orders 1-3 in noise or data prediction, ODE or SDE: one evaluation per step.

Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", 2022: Algorithm 2
(DPM-Solver++(2M)), the multistep DPM-Solver in noise prediction, and SDE-DPM-Solver++ (appendix B). Order 2 is
the "midpoint" update of the paper and of diffusers' DPMSolverMultistepScheduler. Order 3 uses the divided
differences of the authors' code; by default (`third_order="taylor"`) its second-derivative term has the full
Taylor coefficient. The authors' code, diffusers (ODE) and k-diffusion (3M SDE) carry half of it
(`third_order="reference"`, kept for parity), which makes the error O(h^2): measured order 2.2-2.4, not 3.
x: [batch, ...].
"""

import torch

from ..parameterization import Prediction
from ._core import Run, register
from ._dpm import finite, grid_node, model_output, sde_noise_scale, step
from ._options import check_choice

THIRD_ORDER = ("taylor", "reference")


def multistep_derivs(ms: list[torch.Tensor], lams: list[float], h: float, third_order: str) -> list[torch.Tensor]:
    """D_0.. from the model outputs ms (newest first) at log-SNRs lams, for a step of log-SNR length h.

    Two outputs: the first difference folded into D_0 (the "midpoint" form of DPM-Solver++(2M)). Three: the
    divided differences D_1 ~ h m' and D_2 ~ h^2 m'' ("taylor"), or D_2 ~ h^2 m'' / 2 ("reference": the update
    of the authors' code, diffusers and k-diffusion, whose second-derivative term is half the Taylor term, so
    that it converges at order 2 only; kept for parity).
    """
    r0 = (lams[0] - lams[1]) / h
    if len(ms) == 2:  # (1 + 1/(2 r0)) m0 - m1/(2 r0), one fused kernel
        return [torch.lerp(ms[1], ms[0], 1.0 + 1.0 / (2.0 * r0))]
    r1 = (lams[1] - lams[2]) / h
    d1_0 = (ms[0] - ms[1]) / r0
    d1_1 = (ms[1] - ms[2]) / r1
    d2 = (d1_0 - d1_1) / (r0 + r1)
    return [ms[0], d1_0 + r0 * d2, 2.0 * d2 if third_order == "taylor" else d2]


def multistep(run: Run, x: torch.Tensor, *, order: int, kind: str, third_order: str = "taylor") -> torch.Tensor:
    """Multistep exponential integrator of `order` for kind "noise", "data" or "sde" (see `_dpm`).

    The order is lowered by `run.order_at` (warm-up, infinite log-SNR, sigma = 0 at the end, lower-order final);
    a first-order step is DDIM for the ODE and SDE-DPM-Solver++(1) for the SDE (at alpha = 0 it draws fresh
    noise, at sigma = 0 it returns the data prediction).
    """
    check_choice("third_order", third_order, THIRD_ORDER)
    ms: list[torch.Tensor] = []
    for i in run.range():
        pred = run.denoise(x, i)
        ms = [model_output(pred, kind)] + ms[: order - 1]
        k = run.order_at(i, order)
        s, t = grid_node(run, i), grid_node(run, i + 1)
        if k == 1 and kind != "sde":
            x = run.ddim_step(i, pred)
        elif not finite(s, t):
            x = run.ddim_step(i, Prediction(pred.x0, run.noise_like(x, i)))
        else:
            lams = [run.log_snr[i - j] for j in range(k)]
            derivs = ms[:1] if k == 1 else multistep_derivs(ms[:k], lams, t.lam - s.lam, third_order)
            x = step(x, s, t, derivs, kind)
            if kind == "sde":
                x = x + sde_noise_scale(s, t) * run.noise_like(x, i)
        x, ms = run.report(i, x, pred, ms)
    return x


@register("dpmpp_2m", order=2)
def dpmpp_2m(run: Run, x: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++(2M): second-order multistep in data prediction, one evaluation per step."""
    return multistep(run, x, order=2, kind="data")


@register("dpmpp_3m", order=3)
def dpmpp_3m(run: Run, x: torch.Tensor, *, third_order: str = "taylor") -> torch.Tensor:
    """DPM-Solver++(3M): third-order multistep in data prediction, one evaluation per step."""
    return multistep(run, x, order=3, kind="data", third_order=third_order)


@register("dpm_multistep_2", order=2)
def dpm_multistep_2(run: Run, x: torch.Tensor) -> torch.Tensor:
    """Multistep DPM-Solver-2 in noise prediction (diffusers algorithm_type="dpmsolver"), one evaluation per step."""
    return multistep(run, x, order=2, kind="noise")


@register("dpm_multistep_3", order=3)
def dpm_multistep_3(run: Run, x: torch.Tensor, *, third_order: str = "taylor") -> torch.Tensor:
    """Multistep DPM-Solver-3 in noise prediction (diffusers algorithm_type="dpmsolver"), one evaluation per step."""
    return multistep(run, x, order=3, kind="noise", third_order=third_order)
