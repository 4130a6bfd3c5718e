"""Reward-gradient guidance: the model's score plus scale * grad_x reward(x0(x)), as a model for any solver.

The guided score is grad log p_t(x) + scale * grad_x r(x0_hat(x, t)), i.e. eps -> eps - scale * sigma * g and
x0 -> x0 + scale * sigma^2 / alpha * g with g = grad_x r(x0_hat) (x = alpha x0 + sigma eps is kept). This is the
reward guidance of universal guidance / DPS-style samplers (Bansal et al., "Universal Guidance for Diffusion Models",
2023; Chung et al., "Diffusion Posterior Sampling", ICLR 2023) and the gradient proposal that FK steering combines
with particles (Singhal et al., 2025). For a Gaussian data distribution and a linear reward it is exact: the sampler
then draws from p(x) exp(scale * r(x)) / Z. Each call costs one forward and one backward pass of the model and one
reward evaluation (counted in `reward_calls`). Where alpha(t) = 0 (a flow's pure noise) the model is left unguided.

With a `twist` (a value function of the noisy state, twist(x_t, t) -> [batch], e.g. a noise-conditional classifier's
log p(k | x_t)) the gradient is grad_x twist(x_t, t) instead: classifier guidance (Dhariwal & Nichol, "Diffusion
Models Beat GANs on Image Synthesis", NeurIPS 2021), which needs no backward pass through the model.
"""

from __future__ import annotations

import torch

from ..checks import check_real
from ..parameterization import Coefficients, Model, check_prediction, from_x0_eps, to_x0_eps
from ..processes import Process
from .rewards import Reward, Twist, check_reward_fn


class RewardGuided:
    """`RewardGuided(model, reward, scale, process=..., prediction=..., twist=None)(x [batch, ...], t [batch])` -> the
    guided prediction in the model's own parameterization; pass it to `fewstep.sample` (or FK steering) as the model.
    With `twist` the gradient is the twist's (classifier guidance; see the module doc)."""

    def __init__(self, model: Model, reward: Reward, scale: float, *, process: Process, prediction: str = "eps",
                 twist: Twist | None = None):  # fmt: skip
        if not callable(model):
            raise TypeError(f"model must be a callable model(x, t) -> Tensor, got {type(model).__name__}")
        self.model, self.reward = model, check_reward_fn(reward)
        self.scale = check_real(scale, "scale", nonnegative=True)
        if not isinstance(process, Process):
            raise TypeError(f"process must be a fewstep Process, got {type(process).__name__}")
        self.process, self.prediction = process, check_prediction(prediction)
        self.twist = None if twist is None else check_reward_fn(twist, "twist")
        self.reward_calls = 0
        self.last_x0_shift: torch.Tensor | None = None  # x0 guided - x0 of the model, of the latest call

    @property
    def nfe_per_call(self) -> int:
        return getattr(self.model, "nfe_per_call", 1)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.scale == 0:  # guidance switched off (FK's final step): the model itself, no reward call
            self.last_x0_shift = None
            return self.model(x, t)
        c = Coefficients.of(self.process, t, x)
        if self.twist is None:  # grad of reward(x0(x)): through the model
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                x0, eps = to_x0_eps(self.model(xg, t), self.prediction, xg, c)
                grad = _gradient(self.reward(x0), xg, "reward")
        else:  # grad of twist(x, t): the model runs without autograd
            x0, eps = to_x0_eps(self.model(x, t), self.prediction, x, c)
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                grad = _gradient(self.twist(xg, t), xg, "twist")
        self.reward_calls += 1
        grad = torch.where(c.alpha > 0, grad.to(x.dtype), 0.0)  # alpha = 0 (a flow's pure noise): no signal to guide
        eps = eps.detach() - self.scale * c.sigma * grad
        self.last_x0_shift = self.scale * c.sigma**2 / c.alpha.clamp_min(torch.finfo(c.alpha.dtype).tiny) * grad
        x0 = x0.detach() + self.last_x0_shift
        return from_x0_eps(x0, eps, self.prediction, c).detach().to(x.dtype)


def _gradient(r: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """grad_x of r.sum() for r [batch] (a ValueError naming `name` for another shape)."""
    if not isinstance(r, torch.Tensor) or r.shape != (x.shape[0],):
        raise ValueError(f"{name} must return a tensor of shape [{x.shape[0]}] for the gradient guidance")
    return torch.autograd.grad(r.sum(), x)[0]
