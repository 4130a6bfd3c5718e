"""Parity with diffusers' DDIMScheduler and DPMSolverMultistepScheduler on the same model and discrete timesteps.

Mapping: diffusers calls the model at integer timesteps k_0 > ... > k_{n-1} and its last step goes to alpha = 1
(DDIM: set_alpha_to_one=True; DPM-Solver: final_sigmas_type="zero"), which returns the data prediction at k_{n-1}.
In fewstep that is the grid t_i = (k_i + 1) / N (DiscreteVP time of timestep k_i), n - 1 steps, denoise_to_zero=True.
"""

import pytest
import torch

import fewstep

diffusers = pytest.importorskip("diffusers", reason="parity tests need the dev extra (pip install -e .[dev])")

PROCESS = fewstep.DiscreteVP.linear()
MIXTURE = fewstep.mixture_nd(dim=6, components=4)
NOISE = torch.randn(16, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def eps_model_at_timestep(x, k):
    t = PROCESS.time_from_timestep(torch.as_tensor(k, dtype=torch.float64)).expand(x.shape[0])
    return MIXTURE.model(PROCESS, "eps")(x, t)


def run_diffusers(scheduler, steps):
    # diffusers keeps its betas in float32; give it the float64 schedule so that the comparison is of algorithms.
    assert torch.allclose(scheduler.alphas_cumprod.double(), PROCESS.alphas_cumprod, rtol=1e-5)
    scheduler.alphas_cumprod = PROCESS.alphas_cumprod.clone()
    scheduler.set_timesteps(steps)
    x = NOISE.clone() * scheduler.init_noise_sigma
    for k in scheduler.timesteps:
        x = scheduler.step(eps_model_at_timestep(x, int(k)), k, x).prev_sample
    return x, [int(k) for k in scheduler.timesteps]


def run_fewstep(solver, timesteps):
    grid = PROCESS.time_from_timestep(torch.tensor(timesteps, dtype=torch.float64))
    # diffusers starts from x = noise; fewstep from x = sigma(t_start) * noise.
    noise = NOISE / PROCESS.sigma(grid[0])
    return fewstep.sample(
        MIXTURE.model(PROCESS, "eps"),
        noise,
        process=PROCESS,
        solver=solver,
        schedule=grid,
        steps=len(timesteps) - 1,
        denoise_to_zero=True,
    )


def common_config():
    return dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


@pytest.mark.parametrize("steps", [5, 10, 25])
def test_ddim_matches_diffusers(steps):
    sched = diffusers.DDIMScheduler(**common_config(), clip_sample=False, set_alpha_to_one=True)
    expected, timesteps = run_diffusers(sched, steps)
    got = run_fewstep("ddim", timesteps)
    assert got.nfe == steps
    assert (got - expected).abs().max() < 1e-5


@pytest.mark.parametrize("steps", [5, 10, 20])
def test_dpmpp_2m_matches_diffusers(steps):
    sched = diffusers.DPMSolverMultistepScheduler(
        **common_config(), solver_order=2, algorithm_type="dpmsolver++", final_sigmas_type="zero"
    )
    expected, timesteps = run_diffusers(sched, steps)
    got = run_fewstep("dpmpp_2m", timesteps)
    assert got.nfe == steps
    assert (got - expected).abs().max() < 1e-5
