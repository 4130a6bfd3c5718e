"""The benchmark plumbing measures what it says: NFE accounting, errors, and the peer adapters' start and end states."""

import math

import pytest
import torch

import fewstep
from fewstep.accuracy import rms_error
from fewstep.tools import bench, peers


def test_accuracy_rows_match_a_direct_measurement():
    process = fewstep.DiscreteVP.linear()
    rows = bench.accuracy(["ring2d"], process, "eps", ["ddim", "heun"], ["logsnr"], [4, 6], samples=32, progress=False)
    mixture = fewstep.ring2d()
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reference = mixture.ode_solution(noise, process)
    x = fewstep.sample(mixture.model(process), noise, process=process, solver="ddim", steps=3, schedule="logsnr")
    assert rows[0].errors[4] == pytest.approx(rms_error(x, reference), rel=1e-12)
    heun = rows[1].errors  # Heun: 2 per step, so NFE 4 and 6 are reached without the final denoising step
    x = fewstep.sample(mixture.model(process), noise, process=process, solver="heun", steps=2, schedule="logsnr",
                       denoise_to_zero=False)  # fmt: skip
    assert heun[4] == pytest.approx(rms_error(x, reference), rel=1e-12)
    assert math.isfinite(heun[6])


def test_diffusers_peer_adapter_reproduces_fewstep_on_the_same_timesteps():
    """The adapter's start (t = 1, sigma(1) * noise) and end (sigma = 0) are fewstep's: DPM-Solver++(2M) agrees to
    1e-6 (diffusers rounds the sample to float32 inside its step)."""
    pytest.importorskip("diffusers", reason="the peer benchmark needs the dev extra")
    mixture, process = fewstep.ring2d(), fewstep.DiscreteVP.linear()
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = peers.run_at_nfe(peers.peers()["diffusers DPMSolverMultistep 2M"], mixture, noise, 6)
    timesteps = torch.linspace(0, 999, 7).round().flip(0)[:-1].to(torch.float64)  # diffusers' "linspace" spacing
    grid = process.time_from_timestep(timesteps)
    ours = fewstep.sample(mixture.model(process), noise, process=process, solver="dpmpp_2m", schedule=grid, steps=5)
    assert ours.nfe == 6
    assert (x - ours).abs().max() < 1e-6


def test_run_at_nfe_returns_none_when_unreachable():
    def two_per_step(mixture, noise, steps):
        return noise, 2 * steps

    assert peers.run_at_nfe(two_per_step, fewstep.ring2d(), torch.zeros(1, 2), 5) is None
    assert peers.run_at_nfe(two_per_step, fewstep.ring2d(), torch.zeros(1, 2), 6) is not None


def test_best_at_nfe_is_the_least_error_of_the_peers_that_run():
    target = peers.mixture_target(fewstep.ring2d())
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = torch.zeros_like(noise)

    def scaled(c):
        return lambda target, x, steps: (c * x, 2 * steps)

    def broken(target, x, steps):
        raise IndexError("a peer's own failure")

    runs = {"a": scaled(2.0), "b": scaled(0.5), "nan": scaled(float("nan")), "broken": broken}
    error, name = peers.best_at_nfe(runs, target, noise, reference, 4)
    assert name == "b" and error == pytest.approx(0.5 * float(noise.pow(2).mean().sqrt()))
    assert peers.best_at_nfe(runs, target, noise, reference, 5) == (math.inf, "")  # 2 evaluations per step
