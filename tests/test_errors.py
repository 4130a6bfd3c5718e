"""Bad input gets a clear error that names the parameter and the allowed values."""

import math

import pytest
import torch

import fewstep

PROCESS = fewstep.EDM()
MIXTURE = fewstep.ring2d()
NOISE = torch.randn(4, 2, dtype=torch.float64)
MODEL = MIXTURE.model(PROCESS, "eps")


def run(**kwargs):
    args = dict(process=PROCESS, steps=4)
    args.update(kwargs)
    model = args.pop("model", MODEL)
    noise = args.pop("noise", NOISE)
    return fewstep.sample(model, noise, **args)


def test_unknown_solver_lists_allowed():
    with pytest.raises(ValueError, match=r"solver='rk45' is not known; allowed values: .*ddim.*dpmpp_2m"):
        run(solver="rk45")


def test_unknown_schedule_lists_allowed():
    with pytest.raises(ValueError, match=r"schedule='cosine' is not known; allowed values: time_uniform, logsnr"):
        run(schedule="cosine")


def test_unknown_prediction_lists_allowed():
    with pytest.raises(ValueError, match=r"prediction='noise' is not known; allowed values: eps, x0, v, velocity, score"):
        run(prediction="noise")


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_bad_steps(steps):
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        run(steps=steps)


def test_t_start_must_exceed_t_end():
    with pytest.raises(ValueError, match="need t_start > t_end"):
        run(t_start=1.0, t_end=2.0)


def test_time_outside_process_range():
    with pytest.raises(ValueError, match=r"t_start=100.0 is outside the time range .* 0.002 <= t_start <= 80.0"):
        run(t_start=100.0)


def test_unknown_solver_option():
    with pytest.raises(ValueError, match=r"solver 'ddim' does not take option\(s\) eta; allowed: none"):
        run(solver="ddim", eta=0.5)


def test_model_output_shape_mismatch():
    with pytest.raises(fewstep.ModelError, match=r"shape \(4, 1\) for x of shape \(4, 2\)"):
        run(model=lambda x, t: x[:, :1])


def test_model_output_dtype_mismatch():
    with pytest.raises(fewstep.ModelError, match="dtype torch.float32 for x of dtype torch.float64"):
        run(model=lambda x, t: x.float())


def test_model_returning_nan_names_evaluation_and_time():
    calls = []

    def bad(x, t):
        calls.append(float(t[0]))
        out = MODEL(x, t)
        return out * math.nan if len(calls) == 3 else out

    with pytest.raises(fewstep.ModelError, match=r"NaN or Inf at step 2, evaluation 3 \(time t=") as info:
        run(model=bad)
    assert f"{calls[2]:.6g}" in str(info.value)


def test_user_schedule_checks():
    with pytest.raises(ValueError, match="pass steps=2"):
        run(schedule=torch.tensor([80.0, 1.0, 0.002]), steps=4)
    with pytest.raises(ValueError, match="strictly decreasing"):
        run(schedule=torch.tensor([80.0, 1.0, 1.0, 0.5, 0.002]))


def test_logsnr_grid_needs_finite_log_snr():
    rf = fewstep.RectifiedFlow()
    with pytest.raises(ValueError, match=r"schedule='logsnr' needs a finite log-SNR at t_start=1.0"):
        fewstep.sample(MIXTURE.model(rf, "velocity"), NOISE, process=rf, prediction="velocity", schedule="logsnr")


def test_noise_and_process_types():
    with pytest.raises(TypeError, match="noise must be a floating-point tensor"):
        run(noise=torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="process must be a fewstep Process"):
        run(process="edm")


def test_generator_list_length_checked():
    # noise_like is used by stochastic solvers; check it directly on the core.
    from fewstep.solvers import Run

    den = fewstep.Denoiser(MODEL, PROCESS)
    run_ = Run(den, fewstep.time_grid(PROCESS, 2, 80.0, 0.002), generator=[torch.Generator()] * 3)
    with pytest.raises(ValueError, match="list of 3 generators but the batch has 4 samples"):
        run_.noise_like(NOISE, 0)
