"""Closed-form teacher steps with a time per sample, for any process x = alpha x0 + sigma eps.

- DDIM (Song et al., 2021): x_r = alpha_r x0 + sigma_r eps from the teacher's (x0, eps) at (x_t, t);
- Heun in the scaled variable x / alpha against s = sigma / alpha (Karras et al., 2022, Algorithm 1; the teacher step
  of consistency distillation in Song et al., 2023): x_r = (alpha_r / alpha_t) x_t + (sigma_r - alpha_r s_t) (eps +
  eps') / 2 with eps' the teacher's at the DDIM point; per sample a DDIM step where alpha_t = 0 or sigma_r = 0;
- progressive distillation's target (Salimans & Ho, 2022, Algorithm 2): two teacher DDIM steps t -> t' -> t'' and
  the data prediction x~ = (x_t'' - (sigma_t'' / sigma_t) x_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t) whose
  single DDIM step t -> t'' lands on x_t''.
A teacher here is `teacher(x, t) -> (x0, eps)` (see `TeacherFn`). Shapes: x [batch, ...], times float64 [batch].
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..parameterization import Coefficients, to_x0_eps
from ..processes import Process, broadcast_to

TeacherFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
TEACHER_SOLVERS = ("ddim", "heun")


def prediction_pair(model: Callable, prediction: str, process: Process) -> TeacherFn:
    """`model(x, t) -> prediction` as `teacher(x, t) -> (x0, eps)` with t float64 [batch] (fed to the model in x's dtype)."""

    def pair(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(x, t.to(x.dtype))
        return to_x0_eps(out.to(x.dtype), prediction, x, Coefficients.of(process, t, x))

    return pair


def _coef(process: Process, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return broadcast_to(process.alpha(t), x), broadcast_to(process.sigma(t), x)


def ddim_step(process: Process, x0: torch.Tensor, eps: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """alpha_r x0 + sigma_r eps: DDIM from any time to r [batch] given the pair (x0, eps) there."""
    alpha_r, sigma_r = _coef(process, r, x0)
    return alpha_r * x0 + sigma_r * eps


def teacher_step(teacher: TeacherFn, process: Process, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, solver: str):
    """The teacher's step from (x, t) to r [batch]: "ddim" (one evaluation) or "heun" (two; DDIM where first order)."""
    if solver not in TEACHER_SOLVERS:
        raise ValueError(f"teacher_solver={solver!r} is not known; allowed values: {', '.join(TEACHER_SOLVERS)}")
    x0, eps = teacher(x, t)
    x_euler = ddim_step(process, x0, eps, r)
    if solver == "ddim":
        return x_euler
    _, eps_next = teacher(x_euler, r)
    alpha_t, sigma_t = _coef(process, t, x)
    alpha_r, sigma_r = _coef(process, r, x)
    second = (alpha_t > 0) & (sigma_r > 0)
    safe_alpha = torch.where(second, alpha_t, torch.ones_like(alpha_t))
    x_heun = (alpha_r / safe_alpha) * x + (sigma_r - alpha_r * sigma_t / safe_alpha) * 0.5 * (eps + eps_next)
    return torch.where(second, x_heun, x_euler)


def progressive_target(
    teacher: TeacherFn, process: Process, x: torch.Tensor, t: torch.Tensor, t_mid: torch.Tensor, t_next: torch.Tensor
) -> torch.Tensor:
    """Salimans & Ho's x~ for x at t: two teacher DDIM steps t -> t_mid -> t_next, inverted through one DDIM step."""
    x0, eps = teacher(x, t)
    x_mid = ddim_step(process, x0, eps, t_mid)
    x0_mid, eps_mid = teacher(x_mid, t_mid)
    x_next = ddim_step(process, x0_mid, eps_mid, t_next)
    alpha_t, sigma_t = _coef(process, t, x)
    alpha_n, sigma_n = _coef(process, t_next, x)
    ratio = sigma_n / sigma_t
    return (x_next - ratio * x) / (alpha_n - ratio * alpha_t)
