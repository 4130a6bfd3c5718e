"""A deterministic solver's whole sampling run as one fixed loop of tensor operations: for torch.compile of the
whole loop, and CUDA-graph capture on a GPU.

Every deterministic fixed-grid solver of fewstep (DDIM, DPM-Solver(++), UniPC, DEIS, iPNDM, Heun, ...) is linear in
the starting noise and the network's data predictions: its k-th evaluation point is x_k = c_k0 noise + sum_{j<k}
c_kj D_j, and its output is such a combination too, with coefficients fixed by the grid. `LinearPlan.of` reads them
off one run of the real solver on a probe model (one-hot rows in float64), so the plan *is* that solver, not a
re-implementation, and checks them against a run of `fewstep.sample` on a nonlinear test model (a solver that is not
linear — stochastic, adaptive, with thresholding — is refused there). `compile_sampler` turns the plan into
`noise -> x0` with the times and coefficients as Python constants: no per-step Python bookkeeping, one graph for
the whole run under torch.compile (mode "reduce-overhead" adds CUDA graphs on a GPU). Shapes: noise [batch, ...].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..parameterization import Coefficients, check_prediction, to_x0_eps
from ..processes import Process
from ..sampling import sample
from .compile import check_options

CHECK_TOLERANCE = 1e-9  # relative error of the plan against `fewstep.sample` on the nonlinear check model (float64)


@dataclass(frozen=True)
class LinearPlan:
    """The evaluation times t_k, the rows (c_k0, c_k1, ..., c_k,k) of the evaluation points and the output row of a
    deterministic solver run with `steps` steps (see the module doc)."""

    times: tuple[float, ...]
    rows: tuple[tuple[float, ...], ...]
    output: tuple[float, ...]

    @property
    def nfe(self) -> int:
        return len(self.times)

    @classmethod
    def of(cls, process: Process, solver: str = "dpmpp_2m", steps: int = 10, **sample_kwargs: Any) -> LinearPlan:
        """Read the plan of `fewstep.sample(..., solver=solver, steps=steps, **sample_kwargs)` off the real solver and
        check it; a ValueError names the solver where its run is not linear in the noise and the data predictions."""
        for name in ("steering", "x0_fn", "callback", "generator", "model_kwargs", "tuning", "nfe"):
            if sample_kwargs.get(name) is not None:
                raise ValueError(f"a compiled loop runs a plain deterministic solver; {name} is not supported")
        if solver == "auto":
            raise ValueError("solver='auto' is not a fixed solver: pass the solver and steps it chose")
        kwargs = {"process": process, "prediction": "x0", "solver": solver, "steps": steps, **sample_kwargs}
        nfe = sample(lambda x, t: torch.zeros_like(x), torch.zeros(1, 1, dtype=torch.float64), **kwargs).nfe
        calls: list[tuple[float, torch.Tensor]] = []

        def probe(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            calls.append((float(t.flatten()[0]), x[:, 0].clone()))
            if len(calls) > nfe:
                raise ValueError(f"solver={solver!r} evaluated the model more often than in its first run: not a fixed plan")
            return torch.eye(nfe + 1, dtype=torch.float64)[:, len(calls)][:, None]  # D_j = the basis row j + 1

        out = sample(probe, torch.eye(nfe + 1, dtype=torch.float64)[:, :1], **kwargs)[:, 0]
        plan = cls(tuple(t for t, _ in calls), tuple(tuple(x[: k + 1].tolist()) for k, (_, x) in enumerate(calls)),
                   tuple(out.tolist()))  # fmt: skip
        plan._check(process, kwargs, solver)
        return plan

    def _check(self, process: Process, kwargs: dict[str, Any], solver: str) -> None:
        """The plan against `fewstep.sample` on a nonlinear x0 model, float64."""
        g = torch.Generator().manual_seed(0)
        weight = torch.randn(3, 3, dtype=torch.float64, generator=g) / 2

        def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return torch.tanh(x @ weight) * (1 + t[:, None])

        noise = torch.randn(4, 3, dtype=torch.float64, generator=g)
        expected = sample(model, noise, **kwargs)
        got = self.run(model, noise, process, "x0")
        error = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
        if not error < CHECK_TOLERANCE:
            raise ValueError(
                f"solver={solver!r} with these options is not linear in the noise and the data predictions (plan error "
                f"{error:.1e}): a compiled loop needs a deterministic fixed-grid solver (e.g. ddim, dpmpp_2m, unipc, deis, "
                "ipndm, heun)"
            )

    def run(self, model: Callable, noise: torch.Tensor, process: Process, prediction: str) -> torch.Tensor:
        """The plan's sampling run: model(x [batch, ...], t [batch]) predicting `prediction`; returns x0 [batch, ...]."""
        batch, preds = noise.shape[0], []
        for t, row in zip(self.times, self.rows, strict=True):
            x = _combine(row, noise, preds)
            time = torch.full((batch,), t, dtype=noise.dtype, device=noise.device)
            preds.append(to_x0_eps(model(x, time), prediction, x, Coefficients.of(process, time, x))[0])
        return _combine(self.output, noise, preds)


def _combine(row: tuple[float, ...], noise: torch.Tensor, preds: list[torch.Tensor]) -> torch.Tensor:
    """row[0] noise + sum_j row[j + 1] D_j, skipping the exact zeros."""
    x = row[0] * noise
    for c, d in zip(row[1:], preds, strict=True):
        if c != 0.0:
            x = x + c * d
    return x


def compile_sampler(model: Callable, process: Process, prediction: str = "eps", solver: str = "dpmpp_2m",
                    steps: int = 10, mode: str | None = "default", backend: Any = "inductor",
                    **sample_kwargs: Any) -> Callable[[torch.Tensor], torch.Tensor]:  # fmt: skip
    """`noise [batch, ...] -> x0`: the whole run of `fewstep.sample(model, noise, process=..., prediction=...,
    solver=..., steps=..., **sample_kwargs)` as one loop (`LinearPlan`), compiled with torch.compile in `mode` (None:
    eager; "reduce-overhead": CUDA graphs on a GPU). One graph per input shape; the result carries `nfe`."""
    check_prediction(prediction)
    if not callable(model):
        raise TypeError(f"model must be a callable model(x, t) -> Tensor, got {type(model).__name__}")
    check_options(mode, None, backend)
    plan = LinearPlan.of(process, solver, steps, **sample_kwargs)

    def loop(noise: torch.Tensor) -> torch.Tensor:
        return plan.run(model, noise, process, prediction)

    fn = loop if mode is None else torch.compile(loop, mode=mode, backend=backend, dynamic=False)

    def sampler(noise: torch.Tensor) -> torch.Tensor:
        if mode == "reduce-overhead":  # CUDA graphs: a new step, and an output the next replay will not overwrite
            torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad():
            x = fn(noise)
        x = x.clone() if mode == "reduce-overhead" else x
        x.nfe = plan.nfe
        return x

    sampler.plan = plan  # type: ignore[attr-defined]
    return sampler
