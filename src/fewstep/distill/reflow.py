"""Reflow: retrain a velocity model on coupled (noise, teacher sample) pairs so that its ODE paths straighten, and the
straightness that measures it.

Liu, Gong & Liu, "Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified Flow", ICLR 2023:
with (z, x) drawn from the teacher's ODE coupling (x = the teacher's sample from noise z, `fewstep.distill.pairs`),
the k+1-rectified flow is trained with the flow-matching loss on x_t = (1 - t) x + t z, target velocity z - x; its
straightness S = integral over t of E ||(z - x) - v(x_t, t)||^2 (their definition 3.3, with x_1 - x_0 = z - x) is 0
for straight paths. Lee, Lin & Fanti, "Improving the Training of Rectified Flows", NeurIPS 2024: U-shaped time
density proportional to cosh(a (t - 1/2)), a = 4, and initialisation from the 1-RF model. Here the loss is the
Trainer's denoising loss (`fewstep.train.losses.diffusion_loss`, any prediction type, the run's weighting) with the
pair's sample as x0 and its noise as eps: the trainer's own data and noise are not used. Only a process with the
straight-line form alpha = 1 - t, sigma = t on [0, 1] (rectified flow) has this velocity form: another is refused.
Shapes: pairs [n, ...]; t [batch] float64; straightness: noise [batch, ...] -> float.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..parameterization import Coefficients, to_x0_eps
from ..processes import Process
from ..train.config import ConfigError, TrainConfig
from ..train.losses import diffusion_loss
from ..train.objective import Objective
from .clock import TrainClock
from .consistency import resolve_teacher
from .options import ReflowOptions, parse_table
from .pairs import PairError, load_pairs
from .student import initialise_from_teacher, inner_config

if TYPE_CHECKING:
    from ..train.trainer import Trainer

U_SHAPE = 4.0  # a of the U-shaped time density, Lee et al. (2024)
TIME_EPS = 1e-5


def has_velocity_form(process: Process) -> bool:
    """Whether x_t = (1 - t) x0 + t eps on t in [0, 1] (rectified flow's straight line), checked at 11 times."""
    if abs(process.t_min) > 1e-12 or abs(process.t_max - 1.0) > 1e-12:
        return False
    t = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)
    alpha, sigma = process.alpha(t).to(torch.float64), process.sigma(t).to(torch.float64)
    return bool(torch.allclose(alpha, 1 - t, atol=1e-9) and torch.allclose(sigma, t, atol=1e-9))


def check_velocity_form(process: Process, key: str, what: str) -> None:
    """ConfigError(`key`) naming `what` unless `process` has the straight-line form of rectified flow."""
    if not has_velocity_form(process):
        raise ConfigError(
            key,
            f"{what} runs on {process!r}, which has no straight-line velocity form (alpha = 1 - t, sigma = t on [0, 1]); "
            "reflow needs a rectified-flow process: process = {type = 'rectified_flow'}",
        )


def u_shaped_times(n: int, generator: torch.Generator | None = None, a: float = U_SHAPE) -> torch.Tensor:
    """n times in [0, 1] with density proportional to cosh(a (t - 1/2)) (inverse CDF), float64 [n]."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    t = 0.5 + torch.asinh((2 * u - 1) * math.sinh(a / 2)) / a
    return t.clamp(TIME_EPS, 1 - TIME_EPS)


def uniform_times(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return TIME_EPS + (1 - 2 * TIME_EPS) * u


@torch.no_grad()
def straightness(model: Any, noise: torch.Tensor, process: Process, prediction: str, steps: int = 64) -> float:
    """Mean over Euler steps and features of (v(x_t, t) - (z - x_end))^2 along the model's ODE path from z = noise at
    t = 1 to t = 0 (`steps` uniform steps): Liu et al.'s straightness S, 0 for straight paths."""
    check_velocity_form(process, "process", "the straightness")
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    x, velocities = noise.clone(), []
    for i in range(steps):
        t = torch.full((len(x),), float(ts[i]), dtype=torch.float64, device=x.device)
        x0, eps = to_x0_eps(model(x, t.to(x.dtype)).to(x.dtype), prediction, x, Coefficients.of(process, t, x))
        v = eps - x0
        velocities.append(v)
        x = x + float(ts[i + 1] - ts[i]) * v
    line = noise - x
    return float(torch.stack([(v - line).double().pow(2).mean() for v in velocities]).mean())


class ReflowObjective(Objective):
    """Reflow (Liu et al., 2023) on the Trainer: the denoising loss on coupled pairs of `distill.pairs`."""

    name = "reflow"

    def __init__(self, config: TrainConfig, process: Process, data: torch.Tensor, teacher: Any = None):
        options = parse_table(config.distill)
        assert isinstance(options, ReflowOptions)
        self.options, self.config, self.process = options, config, process
        self.teacher = resolve_teacher(teacher, options, required=False)
        if self.teacher is not None:
            check_velocity_form(self.teacher.process, "distill.teacher", f"the teacher {self.teacher.name}")
        check_velocity_form(process, "process", "the reflowed model")
        try:
            self.noise, self.samples, settings = load_pairs(options.pairs)
        except PairError as err:
            raise ConfigError("distill.pairs", f"distill.pairs: {err}") from err
        if tuple(self.noise.shape[1:]) != tuple(data.shape[1:]):
            raise ConfigError(
                "distill.pairs", f"distill.pairs={options.pairs!r} holds pairs of shape {tuple(self.noise.shape[1:])}, the "
                f"data has shape {tuple(data.shape[1:])}"
            )  # fmt: skip
        from ..train.process_config import build_process

        check_velocity_form(build_process(settings["process"]), "distill.pairs", f"the pair set {options.pairs!r}")
        self.clock = TrainClock()

    def model_config(self, config: TrainConfig, data_shape: tuple[int, ...]) -> dict[str, Any]:
        return inner_config(config, self.teacher, data_shape)

    def setup(self, trainer: Trainer) -> None:
        if self.teacher is not None:
            self.teacher.freeze(trainer.device)
        initialise_from_teacher(trainer.model, self.teacher, self.options.init_from_teacher)

    def draw(self, x0: torch.Tensor, generator: torch.Generator, step: int) -> dict[str, torch.Tensor]:
        """pair_index and t [N]."""
        index = torch.randint(0, len(self.noise), (len(x0),), generator=generator)
        sampler = u_shaped_times if self.options.time_distribution == "u_shaped" else uniform_times
        return {"pair_index": index, "t": sampler(len(x0), generator)}

    def loss(self, model: nn.Module, x0: torch.Tensor, eps: torch.Tensor, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        index = draws["pair_index"].cpu()
        x, z = self.samples[index].to(x0), self.noise[index].to(x0)
        c = self.config
        return diffusion_loss(model, x, draws["t"], z, process=self.process, prediction=c.prediction, weighting=c.weighting,
                              gamma=c.min_snr_gamma, sigma_data=c.sigma_data)  # fmt: skip

    def begin_step(self, trainer: Trainer) -> None:
        self.clock.tick()

    def after_step(self, trainer: Trainer) -> None:
        self.clock.tick()

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, self.clock.state()

    def load_state(self, tensors: dict[str, torch.Tensor], values: dict[str, Any], where: str) -> None:
        self.clock.load(values, where)

    def checkpoint_extra(self) -> dict[str, Any]:
        return self.clock.extra()


def main(argv: list[str] | None = None) -> None:
    """`python -m fewstep.distill.reflow --models digits_flow,out/distill/reflow_flow`: each model's straightness and
    the FD of its Euler samples at 1, 2 and 4 steps (digits classifier features), on one fixed noise batch."""
    import argparse

    from ..sample_model import sample_shape
    from ..sampling import sample
    from ..shipped import load_model

    parser = argparse.ArgumentParser(prog="python -m fewstep.distill.reflow", description=main.__doc__.split("\n")[0])
    parser.add_argument("--models", required=True, help="comma-separated shipped names or checkpoint paths")
    parser.add_argument("--n", type=int, default=1000, help="samples (straightness on the first 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fd", action=argparse.BooleanOptionalAction, default=True, help="FD (digits models only)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    fd = None
    if args.fd:
        from ..tools.bench_learned import digits_fd

        fd = digits_fd()
    for spec in args.models.split(","):
        loaded = load_model(spec.strip())
        noise = torch.randn((args.n, *sample_shape(loaded)), generator=torch.Generator().manual_seed(args.seed))
        s = straightness(loaded.model, noise[:256], loaded.process, loaded.prediction)
        line = f"{spec}: straightness {s:.4g}"
        if fd is not None:
            for steps in (1, 2, 4):
                x = sample(loaded.model, noise, process=loaded.process, prediction=loaded.prediction, solver="euler",
                           steps=steps, denoise_to_zero=False)  # fmt: skip
                line += f", FD euler {steps} step{'s' * (steps > 1)} {fd(x):.3g}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
