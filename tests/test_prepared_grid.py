"""Tests for `fewstep.sampling.prepare_grid` / `PreparedGrid` and unipc's batched weights.

Bit-identity of `sample(schedule=prepare_grid(...))` with the plain call, its errors, and UniPC's batched weights.
"""

import math

import pytest
import torch

from fewstep.processes import DiscreteVP
from fewstep.sampling import PreparedGrid, prepare_grid, sample


def _model(x, t):
    tt = t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return torch.tanh(0.7 * x) * (0.3 + 0.5 * tt)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc", "heun", "deis", "dpmpp_3m"])
@pytest.mark.parametrize("schedule", [None, "karras", "time_uniform"])
def test_prepared_grid_gives_the_same_samples_bit_for_bit(solver, schedule):
    process = DiscreteVP.linear()
    noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plain = sample(_model, noise, process=process, solver=solver, steps=7, schedule=schedule)
    grid = prepare_grid(process, 7, schedule)
    assert isinstance(grid, PreparedGrid)
    for _ in range(2):  # reused: nothing of a run is kept in the grid
        prepared = sample(_model, noise, process=process, solver=solver, steps=7, schedule=grid)
        assert torch.equal(prepared, plain)
        assert prepared.nfe == plain.nfe


def test_prepared_grid_rejects_another_process_step_count_or_times():
    process = DiscreteVP.linear()
    grid = prepare_grid(process, 5)
    noise = torch.randn(2, 3)
    with pytest.raises(ValueError, match="PreparedGrid of .* not of process"):
        sample(_model, noise, process=DiscreteVP.linear(), steps=5, schedule=grid)
    with pytest.raises(ValueError, match="PreparedGrid of 5 steps but steps=6; pass steps=5"):
        sample(_model, noise, process=process, steps=6, schedule=grid)
    with pytest.raises(ValueError, match="t_start and t_end are set by the grid"):
        sample(_model, noise, process=process, steps=5, schedule=grid, t_end=0.01)
    with pytest.raises(TypeError, match="process must be a fewstep Process"):
        prepare_grid("vp", 5)


def test_unipc_batched_weights_equal_one_solve_per_system():
    import importlib

    unipc = importlib.import_module("fewstep.solvers.unipc")
    queries = [([-1.3], -0.4, True), ([-1.1, -2.3], -0.2, False), ([-0.9, -2.0], -0.3, True), ([], -0.1, True)]
    queries.append(([-2.0], -0.7, False))
    batched = unipc.rhos_many(queries, "bh2")
    assert batched == [unipc.rhos(r, h, "bh2", c) for r, h, c in queries]
    assert batched[3] == [0.5] and batched[4] == [0.5]
    # UniC-2 weights solve the 2x2 Vandermonde system exactly
    (w0, w1), r, hh = batched[0], -1.3, -0.4
    bh = math.expm1(hh)
    from fewstep.solvers._expint import phi

    assert w0 + w1 == pytest.approx(hh * phi(2, hh) / bh, rel=1e-12)
    assert w0 * r + w1 == pytest.approx(hh * phi(3, hh) * 2 / bh, rel=1e-12)


def test_scheduler_runs_on_its_prepared_grid():
    from fewstep.integrations.scheduler import FewstepScheduler

    sch = FewstepScheduler(num_train_timesteps=1000, beta_schedule="linear", solver="unipc")
    sch.set_timesteps(6)
    assert isinstance(sch._prepared, PreparedGrid) and sch._prepared.values.process is sch._convention.process
