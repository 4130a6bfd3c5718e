"""Learned per-evaluation corrections (`fewstep.corrections`, `fewstep.calibrate`) against the exact flow map of a
Gaussian mixture: zero corrections change nothing, fitted ones lower the error on noise they never saw, and the
artefact, the wrapper and `sample(solver="auto")` refuse what they were not fitted for."""

from __future__ import annotations

import json

import pytest
import torch

import fewstep
from fewstep.accuracy import rms_error
from fewstep.calibrate import evaluation_times, fit_corrections
from fewstep.corrections import Corrections, zero_corrections
from fewstep.tuning import TunedEntry, Tuning, TuningError

PROCESS = fewstep.DiscreteVP.linear()
MIXTURE = fewstep.mixture_nd(dim=4, components=3, seed=12)  # held out: no default was chosen on it
RUN = dict(solver="dpmpp_2m", steps=4, schedule="logsnr")  # a crude 5-NFE run with much to correct


def noise(seed: int, n: int = 128) -> torch.Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(scope="module")
def fitted() -> Corrections:
    model = MIXTURE.model(PROCESS, "eps")
    beds = [(z, MIXTURE.flow_map(z, PROCESS)) for z in (noise(0), noise(1))]
    out = fit_corrections(model, PROCESS, "eps", RUN, *beds, iters=40, lr=0.02, decay=True)  # as tune fits them
    assert out is not None
    return out


@pytest.mark.parametrize(
    "process, prediction", [(PROCESS, "eps"), (fewstep.DiscreteVP.cosine(), "v"), (fewstep.RectifiedFlow(), "velocity")]
)
def test_zero_corrections_change_nothing(process, prediction):
    model, z = MIXTURE.model(process, prediction), noise(3, 16)
    run = dict(solver="unipc", steps=5, schedule="time_uniform")
    plain = fewstep.sample(model, z, process=process, prediction=prediction, **run)
    zero = zero_corrections(evaluation_times(model, z, process, prediction, **run), memory=2)
    corrected = fewstep.sample(zero.wrap(model, process, prediction), z, process=process, prediction="x0", **run)
    assert zero.nfe == plain.nfe == corrected.nfe
    assert (corrected - plain).abs().max() < 1e-9


def test_fitted_corrections_lower_the_error_on_held_out_noise(fitted):
    """Fitted on seed 0, stopped on seed 1, measured on seed 5 against the exact flow map."""
    model, z = MIXTURE.model(PROCESS, "eps"), noise(5, 512)
    exact = MIXTURE.flow_map(z, PROCESS)
    plain = rms_error(fewstep.sample(model, z, process=PROCESS, **RUN), exact)
    corrected = rms_error(fewstep.sample(fitted.wrap(model, PROCESS, "eps"), z, process=PROCESS, prediction="x0", **RUN), exact)
    assert corrected < 0.8 * plain, (corrected, plain)
    assert fitted.error < fitted.error_before and fitted.nfe == 5 and 1 <= fitted.iters <= 40
    assert any(abs(v) > 1e-3 for v in fitted.shift) and any(abs(v) > 1e-3 for v in fitted.scale)


def test_patience_stops_the_fit_after_checks_without_a_new_best():
    """A learning rate too large for this run overshoots after a few iterations: with patience 2 the fit stops two
    checks after its best one (and keeps that one); without patience it runs every iteration."""
    model = MIXTURE.model(PROCESS, "eps")
    beds = [(z, MIXTURE.flow_map(z, PROCESS)) for z in (noise(0, 64), noise(1, 64))]
    runs = {}
    for patience in (2, None):
        checks: list[str] = []
        out = fit_corrections(model, PROCESS, "eps", RUN, *beds, iters=30, lr=0.1, check_every=1, patience=patience,
                              log=checks.append)  # fmt: skip
        runs[patience] = (len(checks), out)
    (stopped, kept), (full, _) = runs[2], runs[None]
    assert full == 30 and stopped < 30
    assert kept is not None and stopped == kept.iters + 2 and kept.error < kept.error_before


def test_the_corrected_model_refuses_another_run(fitted):
    model, z = MIXTURE.model(PROCESS, "eps"), noise(4, 8)
    with pytest.raises(ValueError, match="fitted at t="):
        fewstep.sample(fitted.wrap(model, PROCESS, "eps"), z, process=PROCESS, prediction="x0", **dict(RUN, schedule="quadratic"))
    corrected = fitted.wrap(model, PROCESS, "eps")
    fewstep.sample(corrected, z, process=PROCESS, prediction="x0", **RUN)
    with pytest.raises(ValueError, match="fitted for 5 evaluations.*used for two runs"):
        fewstep.sample(corrected, z, process=PROCESS, prediction="x0", **RUN)


def test_auto_applies_the_corrections_of_a_tuned_entry(fitted, tmp_path):
    times = fewstep.time_grid(PROCESS, 4, PROCESS.t_max, PROCESS.t_min, "logsnr").tolist()
    entry = TunedEntry(nfe=5, solver="dpmpp_2m", steps=4, times=times, grid="logsnr", corrections=fitted.to_dict())
    tuning = Tuning("mixture-corrections", repr(PROCESS), "eps", entries={5: entry})
    path = tuning.save(tmp_path / "t.tuning.json")
    z = noise(6, 32)
    x = fewstep.sample(Keyed(), z, process=PROCESS, solver="auto", nfe=5, tuning=path)
    assert x.choice["source"] == "tuned" and x.choice["corrected"] and x.nfe == 5
    manual = fewstep.sample(fitted.wrap(Keyed(), PROCESS, "eps"), z, process=PROCESS, prediction="x0", **RUN)
    assert torch.equal(x, manual)
    data = json.loads(path.read_text())
    data["entries"]["5"]["corrections"]["shift"] = data["entries"]["5"]["corrections"]["shift"][:2]
    path.write_text(json.dumps(data))
    with pytest.raises(TuningError, match=r"entries\.5\.corrections.*one entry per evaluation"):
        Tuning.load(path)
    data["entries"]["5"]["corrections"] = {"times": [1.0], "shift": [0.0], "scale": [0.0], "mix": [[0.0]]}
    path.write_text(json.dumps(data))
    with pytest.raises(TuningError, match="holds 1 evaluations, not nfe=5"):
        Tuning.load(path)


def test_bad_input():
    with pytest.raises(ValueError, match="finite number"):
        Corrections(times=[1.0], shift=[float("nan")], scale=[0.0], mix=[[0.0]])
    with pytest.raises(ValueError, match="missing key"):
        Corrections.from_dict({"times": [1.0]})
    model, z = MIXTURE.model(PROCESS, "eps"), noise(0, 8)
    with pytest.raises(ValueError, match="iters must be"):
        fit_corrections(model, PROCESS, "eps", RUN, (z, z), (z, z), iters=0)


class Keyed:
    """The exact eps model of MIXTURE, known to tunings by a key of its own."""

    tuning_key = "mixture-corrections"

    def __init__(self):
        self.exact = MIXTURE.model(PROCESS, "eps")

    def __call__(self, x, t):
        return self.exact(x, t)


def test_tune_keeps_the_lowest_corrected_error_of_the_best_few():
    """With calibrate_top=k the best configuration of each of the k best solvers gets corrections, and the one with
    the lowest corrected error on the confirmation batch is kept: the same error as fitting that configuration alone."""
    from fewstep.tune import tune

    candidates = (("ipndm", "logsnr"), ("deis", "quadratic"), ("dpmpp_2m", "quadratic"))
    settings = dict(model_key=Keyed.tuning_key, shape=(4,), samples=32, search_top=0, end_log_snrs=(), confirm_samples=128,
                    calibrate_iters=20)  # fmt: skip
    alone = {c: tune(Keyed(), PROCESS, "eps", [5], candidates=(c,), **settings).entry(5) for c in candidates}
    assert all(e.corrections for e in alone.values())  # every one gains: the choice is among corrected errors
    best_few = tune(Keyed(), PROCESS, "eps", [5], candidates=candidates, calibrate_top=3, **settings).entry(5)
    first = tune(Keyed(), PROCESS, "eps", [5], candidates=candidates, calibrate_top=1, **settings).entry(5)
    winner = min(alone, key=lambda c: alone[c].error)
    assert (best_few.solver, best_few.grid) == winner
    assert best_few.error == pytest.approx(alone[winner].error, rel=1e-9)
    assert (first.solver, first.grid) == ("ipndm", "logsnr")  # the best uncorrected one ...
    assert best_few.error < 0.8 * first.error  # ... is not the best corrected one
    assert len(best_few.confirmed) == 3
    same_solver = (("ipndm", "logsnr"), ("ipndm", "quadratic"), ("deis", "quadratic"))
    two = tune(Keyed(), PROCESS, "eps", [5], candidates=same_solver, calibrate_top=2, confirm_top=1, **settings).entry(5)
    assert sorted(name.split()[0] for name in two.confirmed) == ["deis", "ipndm"]  # one per solver


def test_tune_fits_corrections_and_correct_adds_them_to_a_tuning():
    """tune(calibrate_iters=...) stores corrections that lower the held-out error of solver="auto"; `correct` adds
    them to a tuning made without; both keep the chosen solver and grid."""
    from fewstep.tune import correct, tune

    settings = dict(model_key=Keyed.tuning_key, shape=(4,), samples=32, candidates=(("dpmpp_2m", "logsnr"),), search_top=0,
                    end_log_snrs=(), confirm_samples=128)  # fmt: skip
    plain = tune(Keyed(), PROCESS, "eps", [5], calibrate_iters=0, **settings)
    assert plain.entry(5).corrections == {}
    fitted = tune(Keyed(), PROCESS, "eps", [5], calibrate_iters=30, **settings)
    entry = fitted.entry(5)
    assert entry.corrections and entry.error == entry.corrections["error"] < entry.corrections["error_before"]
    assert entry.corrections["error_before"] == pytest.approx(plain.entry(5).error, rel=1e-5)  # float32 noise: x0 path
    z = noise(9, 512)
    exact = MIXTURE.flow_map(z, PROCESS)
    errors = [
        rms_error(fewstep.sample(Keyed(), z, process=PROCESS, solver="auto", nfe=5, tuning=t), exact) for t in (plain, fitted)
    ]
    assert errors[1] < 0.8 * errors[0], errors
    corrected = correct(Keyed(), plain, PROCESS, "eps", shape=(4,), samples=128, iters=30)
    assert corrected.entry(5).corrections and corrected.entry(5).times == entry.times
    with pytest.raises(ValueError, match=r"nfes \[7\] have no entry in this tuning"):
        correct(Keyed(), plain, PROCESS, "eps", shape=(4,), nfes=[7])
    with pytest.raises(TuningError, match="prediction"):
        correct(Keyed(), plain, PROCESS, "v", shape=(4,))
