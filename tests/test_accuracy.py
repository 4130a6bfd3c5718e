"""`fewstep.accuracy`: per-sample errors and the paired bootstrap interval of an RMS ratio."""

from __future__ import annotations

import pytest
import torch

from fewstep.accuracy import rms_error, rms_ratio_interval, squared_errors


def test_squared_errors_average_to_the_rms_error():
    x, ref = torch.randn(7, 3, 4), torch.randn(7, 3, 4)
    errors = squared_errors(x, ref)
    assert errors.shape == (7,) and float(errors.mean().sqrt()) == pytest.approx(rms_error(x, ref), rel=1e-12)


def test_a_constant_per_sample_ratio_has_a_point_interval():
    baseline = torch.rand(50, dtype=torch.float64) + 0.1
    low, high = rms_ratio_interval(4 * baseline, baseline)
    assert low == pytest.approx(2.0, rel=1e-12) and high == pytest.approx(2.0, rel=1e-12)


def test_the_interval_covers_the_true_ratio_about_as_often_as_its_level():
    """Per-sample errors b ~ Exp(1), a = b * u with u ~ U(0, 2): the true RMS ratio is sqrt(E[u]) = 1."""
    generator, covered = torch.Generator().manual_seed(0), 0
    for repeat in range(40):
        baseline = torch.empty(200, dtype=torch.float64).exponential_(generator=generator)
        errors = baseline * 2 * torch.rand(200, dtype=torch.float64, generator=generator)
        low, high = rms_ratio_interval(errors, baseline, draws=500, seed=repeat)
        assert low <= rms_error(errors.sqrt(), torch.zeros(200)) / rms_error(baseline.sqrt(), torch.zeros(200)) <= high
        covered += low <= 1.0 <= high
    assert covered >= 34  # 95 % of 40 is 38; fewer than 34 would be a 0.3 % event for a correct interval


def test_one_dominant_sample_widens_the_interval():
    baseline = torch.ones(256, dtype=torch.float64)
    calm, spiky = baseline.clone(), baseline.clone()
    calm[0], spiky[0] = 2.0, 200.0  # one sample near a boundary between modes carries most of the squared error
    calm_low, calm_high = rms_ratio_interval(calm, baseline)
    spiky_low, spiky_high = rms_ratio_interval(spiky, baseline)
    assert calm_high - calm_low < 0.01 and spiky_high - spiky_low > 0.5


@pytest.mark.parametrize(("errors", "baseline", "kwargs", "match"), [
    (torch.ones(3), torch.ones(4), {}, "same number"),
    (torch.ones(1), torch.ones(1), {}, "same number"),
    (torch.ones(3), torch.ones(3), {"level": 1.0}, "level must be in"),
    (torch.ones(3), torch.ones(3), {"draws": 0}, "draws"),
])  # fmt: skip
def test_bad_input_names_the_parameter(errors, baseline, kwargs, match):
    with pytest.raises(ValueError, match=match):
        rms_ratio_interval(errors, baseline, **kwargs)
