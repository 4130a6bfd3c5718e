"""Multi-step distribution-matching generators (DMD2 backward simulation, `fewstep.distill.backsim`) on the exact
ring2d teacher: the simulated inputs against the generator's own sampler, the loss wiring, the stored sub-grids,
exact resume, and bad options."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_exact_resume

import fewstep
from fewstep.distill import Teacher, distill_config, dmd_loss, sample_student, stored_times
from fewstep.distill.backsim import sub_grids
from fewstep.distill.dmd import data_prediction
from fewstep.distill.student import student_plan
from fewstep.train import Trainer, load_checkpoint
from fewstep.train.config import ConfigError, TrainConfig

RING = fewstep.ring2d()
FLOW = fewstep.RectifiedFlow()
DATA = RING.sample(400, torch.Generator().manual_seed(0), dtype=torch.float32)
NET = {"type": "mlp", "dim": 2, "width": 32, "depth": 2}
TIMES = [1.0, 0.7, 0.4, 0.2]


def exact_teacher() -> Teacher:
    return Teacher(RING.model(FLOW, "velocity"), FLOW, "velocity", name="ring2d-exact")


def make_trainer(folder, options: dict, **kw) -> Trainer:
    values = dict(net=NET, data="ring", prediction="velocity", steps=4, batch_size=32, checkpoint_every=0, progress=False,
                  out_dir=str(folder), ema_decay=0.9)  # fmt: skip
    values.update(kw)
    teacher = exact_teacher()
    return Trainer(distill_config("dmd", teacher, distill=options, **values), data=DATA, teacher=teacher)


def randomise(model: torch.nn.Module, seed: int = 1) -> None:
    """Random weights (the fresh MLP outputs v = 0, for which every step would be the same map)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))


def noise_source(noises: list[torch.Tensor], times: list[float]):
    """A sampler noise source giving noises[i] for the step times[i] -> times[i + 1]."""

    def source(x, t_from, t_to):
        return noises[times.index(t_from)]

    return source


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit-equal in float64; in float32 up to round-off: the simulation evaluates only the samples still on their way,
    and float32 GEMM rounding depends on the batch size (float64 here does not)."""
    if a.dtype == torch.float64:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backward_simulation_equals_the_generators_own_sampler(tmp_path, dtype):
    trainer = make_trainer(tmp_path, {"generator_times": TIMES})
    objective, model = trainer.objective, trainer.model.to(dtype)
    randomise(model)
    g = torch.Generator().manual_seed(2)
    n = 48
    z = torch.randn(n, 2, generator=g, dtype=dtype)
    k = torch.arange(n) % 4
    noises = [torch.randn(n, 2, generator=g, dtype=dtype) for _ in range(3)]
    x, t = objective.generator_input(model, z, k, noises)
    # The generator's sampler as a user runs it: the stored 4-step times, consistency sampler with gamma = 1.
    plan = student_plan({"extra": objective.checkpoint_extra()}, 4)
    assert plan["schedule"].tolist() == [*TIMES, 0.0] and plan["solver"] == "consistency" and plan["gamma"] == 1.0
    states, outputs = [FLOW.sigma(1.0) * z], []

    def keep(info):
        states.append(info["x"])
        outputs.append(info["x0"])

    with torch.no_grad():
        final = fewstep.sample(model, z, process=FLOW, prediction="velocity", generator=noise_source(noises, TIMES),
                               callback=keep, **plan)  # fmt: skip
    expected = torch.stack(states[:4])[k, torch.arange(n)]  # x at t_k of each sample
    _same(x, expected)
    assert torch.equal(t, torch.tensor(TIMES, dtype=torch.float64)[k])
    with torch.no_grad():
        x_g = data_prediction(model, "velocity", FLOW)(x, t)
        _same(x_g, torch.stack(outputs)[k, torch.arange(n)])  # G at (x_{t_k}, t_k): the sampler's step k
        last = objective.sample_steps(model, z, noises)
    assert torch.equal(last, final)  # the whole batch at every step: bit-equal in any dtype
    assert float((states[1] - states[2]).abs().min()) > 0  # every step moves: the check can fail


def test_the_loss_is_the_dmd_loss_at_the_simulated_generator_samples(tmp_path):
    trainer = make_trainer(tmp_path, {"generator_times": TIMES[:3], "fake_steps": 1})
    objective, model = trainer.objective, trainer.model
    randomise(model)
    g = torch.Generator().manual_seed(3)
    x0, eps = DATA[:32], torch.randn(32, 2, generator=g)
    draws = objective.draw(x0, g, 0)
    assert draws["gen_k"].shape == (32,) and set(draws["gen_k"].tolist()) == {0, 1, 2}
    assert {"gen_z1", "gen_z2", "fake0_k", "fake0_z1", "fake0_z2"} <= set(draws) and "gen_z3" not in draws
    losses = objective.loss(model, x0, eps, draws)
    x, t = objective.generator_input(model, eps, draws["gen_k"], [draws["gen_z1"], draws["gen_z2"]])
    x_g = data_prediction(model, "velocity", FLOW)(x, t)
    x_t = FLOW.add_noise(x_g, draws["t"], draws["eps_dm"])
    expected = dmd_loss(x_g, x_t, draws["t"], objective.real, objective.fake_x0, objective.options)
    assert torch.equal(losses, expected)
    # The same draws at step index 0 everywhere give another loss: the step index reaches the generator.
    at_zero = objective.generate(model, eps)
    assert not torch.allclose(at_zero, x_g)


def test_the_student_stores_the_trained_sub_grids_and_samples_at_each_step_count(tmp_path):
    assert sub_grids(TIMES, 0.0) == {1: [1.0, 0.0], 2: [1.0, 0.4, 0.0], 3: [1.0, 0.7, 0.2, 0.0], 4: [*TIMES, 0.0]}
    trainer = make_trainer(tmp_path / "a", {"generator_times": TIMES}, steps=2)
    trainer.train()
    student = load_checkpoint(tmp_path / "a")
    assert stored_times(student.meta) == sub_grids(TIMES, 0.0)
    g = torch.Generator().manual_seed(4)
    z = torch.randn(16, 2, generator=g)
    noises = [torch.randn(16, 2, generator=g) for _ in range(3)]
    with torch.no_grad():
        x = sample_student(student, z, 4, generator=noise_source(noises, TIMES))
    assert x.nfe == 4 and torch.equal(x, trainer.objective.sample_steps(student.model, z, noises))
    assert sample_student(student, z, 2).nfe == 2
    # A later run takes K-step times from its init_generator's stored ones (generator_steps only).
    path = str(tmp_path / "a" / "checkpoint.json")
    assert make_trainer(tmp_path / "b", {"init_generator": path, "generator_steps": 3}).objective.times == [1.0, 0.7, 0.2]
    with pytest.raises(ConfigError, match="stores times for step counts: 1, 2, 3, 4") as info:
        make_trainer(tmp_path / "b", {"init_generator": path, "generator_steps": 5})
    assert info.value.key == "distill.generator_times"


def test_multistep_resume_is_exact(tmp_path):
    options = {"generator_times": TIMES[:3], "fake_steps": 2}

    def make(folder: str) -> Trainer:
        return make_trainer(tmp_path / folder, options)

    straight, _ = assert_exact_resume(make)
    assert len(set(straight.loss_history)) == 4  # the losses moved


BAD = [
    ({"generator_times": [0.5, 0.7]}, "strictly decreasing"),
    ({"generator_times": [0.5, 0.5]}, "strictly decreasing"),
    ({"generator_times": []}, "non-empty list"),
    ({"generator_times": "1.0"}, "non-empty list"),
    ({"generator_times": [1.0, "a"]}, "distill.generator_times"),
    ({"generator_times": [1.0, 0.5], "generator_steps": 3}, "holds 2 times but distill.generator_steps = 3"),
    ({"generator_steps": 0}, ">= 1"),
]


@pytest.mark.parametrize("options, message", BAD)
def test_bad_generator_options_name_the_key(options, message):
    with pytest.raises(ConfigError, match=message) as info:
        TrainConfig(data="ring", distill={"method": "sid", **options})
    assert info.value.key in ("distill.generator_times", "distill.generator_steps")
    with pytest.raises(ConfigError, match="generator_times not known for method 'cd'"):
        TrainConfig(data="ring", distill={"method": "cd", "generator_times": [1.0]})


def test_generator_times_outside_the_process_or_missing_are_refused(tmp_path):
    for times in ([1.5, 0.5], [0.5, 0.0]):
        with pytest.raises(ConfigError, match=r"in \(t_min, t_max\] = \(0.0, 1.0\] of RectifiedFlow") as info:
            make_trainer(tmp_path, {"generator_times": times})
        assert info.value.key == "distill.generator_times"
    with pytest.raises(ConfigError, match="generator_steps = 2 needs distill.generator_times .* counts: none"):
        make_trainer(tmp_path, {"generator_steps": 2})
    one = make_trainer(tmp_path, {"generator_steps": 1}).objective  # K = 1: the 1-step run, nothing more drawn
    keys = {"t", "eps_dm", *(f"fake_{what}{j}" for what in ("z", "t", "eps") for j in range(5))}
    assert one.times == [1.0] and set(one.draw(DATA[:8], torch.Generator(), 0)) == keys
