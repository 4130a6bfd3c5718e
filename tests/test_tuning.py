"""Model-aware defaults: `fewstep.tune` against the exact flow map, the tuning artefact (keyed, validated, never
stale), and `fewstep.sample(..., solver="auto")` choosing tuned or fallback configurations."""

from __future__ import annotations

import json
import math

import pytest
import torch

import fewstep
from fewstep.accuracy import rms_error
from fewstep.nets import build_model
from fewstep.train import load_checkpoint, save_checkpoint
from fewstep.tune import searched_count, tune
from fewstep.tuning import Tuning, TuningError, choose, model_digest, tuning_path

PROCESS = fewstep.DiscreteVP.linear()
MIXTURE = fewstep.mixture_nd(dim=4, components=3, seed=11)  # a held-out problem: no default was chosen on it
FAST = dict(shape=(4,), samples=48, search_top=1, search_iters=6, reference_steps=200, calibrate_iters=0,
            candidates=(("ddim", "logsnr"), ("dpmpp_2m", "logsnr"), ("dpmpp_2m", "quadratic"), ("deis", "logsnr"),
                        ("unipc", "quadratic")))  # fmt: skip


class KeyedModel:
    """The exact eps model of MIXTURE with a tuning key (a callable that is not a torch module)."""

    tuning_key = "mixture4d-exact"

    def __init__(self, process=PROCESS):
        self.exact = MIXTURE.model(process, "eps")

    def __call__(self, x, t):
        return self.exact(x, t)


@pytest.fixture(scope="module")
def tuned() -> Tuning:
    return tune(KeyedModel(), PROCESS, "eps", [4, 6], model_key="mixture4d-exact", **FAST)


def test_tuned_default_beats_the_fallback_on_held_out_noise(tuned):
    """Against the exact flow map, on noise of a seed neither calibration nor selection used."""
    noise = torch.randn(256, 4, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    exact = MIXTURE.flow_map(noise, PROCESS)
    model = KeyedModel()
    for nfe in (4, 6):
        auto = fewstep.sample(model, noise, process=PROCESS, solver="auto", nfe=nfe, tuning=tuned)
        fallback = fewstep.sample(model, noise, process=PROCESS, **fewstep.recommended(nfe, PROCESS))
        assert auto.nfe == nfe and auto.choice["source"] == "tuned"
        assert rms_error(auto, exact) < 0.9 * rms_error(fallback, exact), (nfe, auto.choice)
        entry = tuned.entry(nfe)
        assert entry.error == min(entry.confirmed.values()) and f"{entry.solver} {entry.grid}" in entry.confirmed
        assert entry.error <= entry.fallback_error


def test_artefact_round_trip_and_sample_kwargs(tuned, tmp_path):
    path = tuned.save(tmp_path / "t.json")
    loaded = Tuning.load(path)
    assert loaded.to_dict() == json.loads(json.dumps(tuned.to_dict()))
    noise = torch.randn(8, 4, dtype=torch.float64)
    a = fewstep.sample(KeyedModel(), noise, process=PROCESS, solver="auto", nfe=6, tuning=path)
    b = fewstep.sample(KeyedModel(), noise, process=PROCESS, **tuned.entry(6).sample_kwargs())
    assert torch.equal(a, b)


def test_auto_falls_back_and_says_why(tuned):
    noise = torch.randn(8, 4, dtype=torch.float64)
    x = fewstep.sample(KeyedModel(), noise, process=PROCESS, solver="auto", nfe=5, tuning=tuned)
    assert x.choice["source"] == "fallback" and "no entry at nfe=5" in x.choice["reason"] and x.nfe == 5
    bare = fewstep.sample(KeyedModel(), noise, process=PROCESS, solver="auto", nfe=5)
    assert bare.choice["source"] == "fallback" and "no tuning" in bare.choice["reason"]
    torch.testing.assert_close(bare, fewstep.sample(KeyedModel(), noise, process=PROCESS, **fewstep.recommended(5, PROCESS)))


def test_a_tuning_for_another_model_process_or_prediction_is_refused(tuned):
    other = KeyedModel()
    other.tuning_key = "another-model"
    noise = torch.randn(8, 4, dtype=torch.float64)
    with pytest.raises(TuningError, match="model weights .* 'mixture4d-exact', not 'another-model'"):
        fewstep.sample(other, noise, process=PROCESS, solver="auto", nfe=6, tuning=tuned)
    cosine = fewstep.DiscreteVP.cosine()
    with pytest.raises(TuningError, match="process"):
        fewstep.sample(KeyedModel(cosine), noise, process=cosine, solver="auto", nfe=6, tuning=tuned)
    with pytest.raises(TuningError, match="prediction"):
        choose(KeyedModel(), PROCESS, "x0", 6, tuning=tuned)


def test_weights_change_makes_an_attached_tuning_stale(tmp_path):
    """A checkpoint's tuning is attached on load and used; after the weights change it is ignored, with the reason."""
    config = {"model": {"net": {"type": "mlp", "dim": 2, "width": 8, "depth": 1}, "prediction": "eps"}}
    model = build_model(config["model"], PROCESS)
    sidecar = save_checkpoint(tmp_path / "checkpoint", model=model, config=config, step=1)
    times = fewstep.time_grid(PROCESS, 3, PROCESS.t_max, PROCESS.t_min, "quadratic").tolist()
    entry = {"nfe": 4, "solver": "ddim", "steps": 3, "times": times, "denoise_to_zero": True, "options": {}, "grid": "quadratic",
             "error": 0.1, "fallback_error": 0.2, "candidates": {}}  # fmt: skip
    key = {"model": model_digest(model), "process": repr(PROCESS), "prediction": "eps"}
    data = {"format": "fewstep-tuning", "version": 1, "name": "", **key, "reference": {}, "entries": {"4": entry}}
    Tuning.from_dict(data).save(tuning_path(sidecar))
    loaded = load_checkpoint(sidecar)
    noise = torch.randn(4, 2)
    x = fewstep.sample(loaded.model, noise, process=loaded.process, solver="auto", nfe=4)
    assert x.choice["source"] == "tuned" and x.choice["solver"] == "ddim"
    with torch.no_grad():
        next(loaded.model.parameters()).add_(1e-3)
    x = fewstep.sample(loaded.model, noise, process=loaded.process, solver="auto", nfe=4)
    assert x.choice["source"] == "fallback" and "model weights" in x.choice["reason"]


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda d: d.pop("model"), "'model' is missing"),
        (lambda d: d.update(version=True), "version"),
        (lambda d: d.update(entries=[]), "'entries' must be dict"),
        (lambda d: d["entries"]["4"].update(steps=0), "steps"),
        (lambda d: d["entries"]["4"].update(solver="bogus"), "solver='bogus'"),
        (lambda d: d["entries"]["4"].update(times=[1.0, 0.5]), "entries.4.times"),
        (lambda d: d["entries"]["4"].update(times=[0.001, 0.5, 0.7, 1.0]), "strictly decreasing"),
        (lambda d: d["entries"]["4"].update(denoise_to_zero="yes"), "denoise_to_zero"),
        (lambda d: d["entries"].update({"5": d["entries"]["4"]}), "holds the entry of nfe=4"),
        (lambda d: d["entries"]["4"].update(bogus=1), "unknown field"),
    ],
)
def test_malformed_artefacts_fail_naming_file_and_key(tmp_path, mutate, key):
    times = fewstep.time_grid(PROCESS, 3, PROCESS.t_max, PROCESS.t_min).tolist()
    data = {"format": "fewstep-tuning", "version": 1, "name": "x", "model": "k", "process": repr(PROCESS), "prediction": "eps",
            "reference": {}, "entries": {"4": {"nfe": 4, "solver": "ddim", "steps": 3, "times": times, "denoise_to_zero": True,
                                               "options": {}}}}  # fmt: skip
    mutate(data)
    path = tmp_path / "bad.tuning.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TuningError, match=key) as info:
        Tuning.load(path)
    assert str(path) in str(info.value)


def test_corrupt_artefact_is_a_clear_error(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('{"format": "fewstep-tuning", "vers')
    with pytest.raises(TuningError, match=f"{path}.*not JSON"):
        Tuning.load(path)


def test_reference_that_does_not_converge_is_refused_with_numbers():
    def oscillating(x, t):  # the drift flips sign on a time scale far below the reference's step
        return x * 3.0 * torch.sign(torch.sin(4000.0 * t))[:, None]

    with pytest.raises(TuningError, match=r"not converge: dpmpp_2m with 20 and 40 steps gives a median sample"):
        tune(oscillating, PROCESS, "eps", [4], shape=(2,), samples=8, reference_steps=40, model_key="osc")


def test_bad_input():
    model = KeyedModel()
    with pytest.raises(ValueError, match=r"nfes must be an integer in \[2, 1000\]"):
        tune(model, PROCESS, "eps", [1], shape=(4,), model_key="k")
    with pytest.raises(ValueError, match="candidate grid 'bogus'"):
        tune(model, PROCESS, "eps", [4], shape=(4,), model_key="k", candidates=(("ddim", "bogus"),))
    with pytest.raises(TuningError, match="string attribute `tuning_key`"):
        tune(lambda x, t: x, PROCESS, "eps", [4], shape=(4,))
    noise = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="pass nfe="):
        fewstep.sample(model, noise, process=PROCESS, solver="auto")
    with pytest.raises(ValueError, match="do not pass schedule"):
        fewstep.sample(model, noise, process=PROCESS, solver="auto", nfe=4, schedule="logsnr")
    with pytest.raises(ValueError, match="only with solver='auto'"):
        fewstep.sample(model, noise, process=PROCESS, nfe=4)
    with pytest.raises(TuningError, match="does not exist"):
        fewstep.sample(model, noise, process=PROCESS, solver="auto", nfe=4, tuning="/nonexistent/t.json")
    assert math.isfinite(float(fewstep.sample(model, noise, process=PROCESS, solver="auto", nfe=2).sum()))


def test_cli_sample_auto_reports_its_choice(tmp_path):
    from typer.testing import CliRunner

    from fewstep.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["sample", "--solver", "auto", "--nfe", "6", "--n", "8", "--out", str(tmp_path / "x.npy")])
    assert ok.exit_code == 0 and "solver auto: fallback deis on logsnr, 5 steps" in " ".join(ok.output.split())
    assert "NFE 6" in ok.output
    for args in (["--solver", "auto"], ["--nfe", "5"]):
        bad = runner.invoke(app, ["sample", *args, "--out", str(tmp_path / "y.npy")])
        assert bad.exit_code == 2 and "--nfe goes with --solver auto" in bad.output


def test_grid_ends_are_candidates_and_keep_the_budget(tuned):
    """Each candidate is also scored on grids that end at log-SNR 3 / 2 / 1.5 before the final denoising step; the
    ends outside a process's log-SNR range are skipped; a tuned early-ending grid uses exactly its NFE."""
    from fewstep.tune import END_LOG_SNRS, end_times

    ends = end_times(PROCESS, (3.0, 2.0, 50.0, -50.0))
    assert [e[0] is None for e in ends] == [True, False, False]  # t_min, then the two inside the range
    for (t_end, label), log_snr in zip(ends[1:], (3.0, 2.0), strict=True):
        assert float(PROCESS.log_snr(t_end)) == pytest.approx(log_snr, abs=1e-9) and f"{log_snr:g}" in label
    assert len(end_times(fewstep.RectifiedFlow(), END_LOG_SNRS)) == 1 + len(END_LOG_SNRS)  # log-SNR from -inf to inf
    for nfe in (4, 6):
        labels = list(tuned.entry(nfe).candidates)
        assert any("ends at log-SNR" in label for label in labels) and any("ends at" not in label for label in labels)
    early = Tuning(tuned.model, tuned.process, "eps")
    entry = next(e for e in tuned.entries.values())
    steps, denoise = fewstep.budget.plan_for_nfe("dpmpp_2m", 5, PROCESS, t_end=ends[2][0])
    times = fewstep.grids.time_grid(PROCESS, steps, PROCESS.t_max, ends[2][0], "logsnr")
    early.entries[5] = type(entry)(nfe=5, solver="dpmpp_2m", steps=steps, times=times.tolist(), denoise_to_zero=denoise,
                                   grid="logsnr, ends at log-SNR 2", error=0.0, fallback_error=0.0)  # fmt: skip
    x = fewstep.sample(KeyedModel(), torch.randn(8, 4, dtype=torch.float64), process=PROCESS, solver="auto", nfe=5, tuning=early)
    assert x.nfe == 5 and x.choice["source"] == "tuned"


def test_collapsed_configurations_are_never_chosen():
    """Denoising from a very noisy end returns about the mean of the modes: low spread across the batch. Such a
    configuration scores inf (never chosen) however its RMS error compares; sound ones keep their error."""
    from fewstep.tune import collapsed

    noise = torch.randn(128, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    reference = MIXTURE.flow_map(noise, PROCESS)
    model = KeyedModel()
    t_noisy = float(PROCESS.t_from_log_snr(torch.tensor(-1.0, dtype=torch.float64)))
    mean_of_modes = fewstep.sample(model, noise, process=PROCESS, solver="ddim", steps=1, t_end=t_noisy)
    sound = fewstep.sample(model, noise, process=PROCESS, solver="dpmpp_2m", steps=5)
    assert collapsed(mean_of_modes, reference) and not collapsed(sound, reference)
    t = tune(model, PROCESS, "eps", [4], **dict(FAST, end_log_snrs=(-1.0,), search_top=0))
    entry = t.entry(4)
    early = {k: v for k, v in entry.candidates.items() if "ends at log-SNR -1" in k}
    assert early and all(v == math.inf for v in early.values()) and "ends at" not in entry.grid
    assert math.isfinite(entry.error) and entry.error == min(entry.confirmed.values())
    # the collapse is a property of the samples, not of the end: DDIM on the log-SNR grid at 3 steps collapses here too
    ddim = fewstep.sample(model, noise, process=PROCESS, solver="ddim", steps=3, schedule="logsnr")
    assert collapsed(ddim, reference) and entry.candidates["ddim logsnr"] == math.inf


def test_flow_grids_may_start_at_a_finite_log_snr():
    """Where the log-SNR is -inf at t_max (rectified flow) the best configurations are also scored from log-SNR -6.9 /
    -5 (from x = sigma(t_start) * noise); a finite start (linear DiscreteVP, -5.1) adds none. A tuned later start is
    the first time of the stored grid and keeps the budget."""
    from fewstep.tune import start_times

    assert start_times(PROCESS, (-6.9, -3.0)) == []
    flow = fewstep.RectifiedFlow()
    starts = start_times(flow, (-6.9, -5.0))
    assert [label for _, label in starts] == [", starts at log-SNR -6.9", ", starts at log-SNR -5"]
    for (t_start, _), log_snr in zip(starts, (-6.9, -5.0), strict=True):
        assert float(flow.log_snr(t_start)) == pytest.approx(log_snr, abs=1e-9)

    class FlowModel(KeyedModel):
        tuning_key = "mixture4d-flow"

        def __init__(self):
            self.exact = MIXTURE.model(flow, "velocity")

    fast = dict(FAST, candidates=(("unipc", "time_uniform"), ("ddim", "time_uniform")), search_top=0, end_log_snrs=(),
                start_log_snrs=(-6.9,), start_top=1)  # fmt: skip
    t = tune(FlowModel(), flow, "velocity", [6], model_key="mixture4d-flow", **fast)
    entry = t.entry(6)
    assert set(entry.candidates) == {"unipc time_uniform", "ddim time_uniform", "unipc time_uniform, starts at log-SNR -6.9"}
    # UniPC's corrector and second-order step from the first evaluation pay a little here (RMS 0.0565 vs 0.0572 from t_max)
    assert entry.grid == "time_uniform, starts at log-SNR -6.9" and entry.times[0] == pytest.approx(starts[0][0], abs=1e-12)
    x = fewstep.sample(FlowModel(), torch.randn(8, 4, dtype=torch.float64), process=flow, prediction="velocity",
                       solver="auto", nfe=6, tuning=t)  # fmt: skip
    assert x.nfe == 6 and x.choice["source"] == "tuned"


def test_the_best_few_are_confirmed_on_more_selection_samples():
    """The CONFIRM_TOP best on the selection batch are scored again on confirm_samples samples of the selection seed;
    the chosen error is exactly the tuned configuration's RMS error there against the model's reference."""
    from fewstep.tune import converged_reference

    t = tune(KeyedModel(), PROCESS, "eps", [5], model_key="mixture4d-exact", **dict(FAST, search_top=0, confirm_top=2,
                                                                                     confirm_samples=96))  # fmt: skip
    entry = t.entry(5)
    assert len(entry.confirmed) == 2 and entry.error == min(entry.confirmed.values())
    best_two = sorted(entry.candidates.values())[:2]
    assert sorted(entry.candidates[k] for k in entry.confirmed) == best_two
    noise = torch.randn(96, 4, generator=torch.Generator().manual_seed(1))  # seed + 1, as tune draws it
    reference, _ = converged_reference(KeyedModel(), noise, PROCESS, "eps", "dpmpp_2m", 200, 0.01)
    x = fewstep.sample(KeyedModel(), noise, process=PROCESS, **entry.sample_kwargs())
    assert rms_error(x, reference) == pytest.approx(entry.error, rel=1e-12)
    old = t.to_dict()
    del old["entries"]["5"]["confirmed"]  # an artefact written before the confirmation step still loads
    assert Tuning.from_dict(old).entry(5).confirmed == {}
    with pytest.raises(ValueError, match="confirm_samples"):
        tune(KeyedModel(), PROCESS, "eps", [5], model_key="k", **dict(FAST, confirm_samples=1))


def test_cli_correct_only_fits_corrections_of_the_attached_tuning(tmp_path):
    """`fewstep tune CKPT --correct-only` keeps the checkpoint's tuned solver and grid and adds learned corrections; a
    checkpoint without a tuning is a usage error."""
    from typer.testing import CliRunner

    from fewstep.cli import app

    config = {"model": {"net": {"type": "mlp", "dim": 2, "width": 8, "depth": 1}, "prediction": "eps"}}
    torch.manual_seed(0)
    model = build_model(config["model"], PROCESS)
    sidecar = save_checkpoint(tmp_path / "checkpoint", model=model, config=config, step=1)
    runner = CliRunner()
    args = ["tune", str(sidecar), "--correct-only", "--nfe", "4", "--calibrate-iters", "10", "--reference-steps", "40"]
    bad = runner.invoke(app, args)
    assert bad.exit_code == 2 and "no tuning to correct" in " ".join(bad.output.split())
    times = fewstep.time_grid(PROCESS, 3, PROCESS.t_max, PROCESS.t_min, "quadratic").tolist()
    entry = {"nfe": 4, "solver": "ddim", "steps": 3, "times": times, "denoise_to_zero": True, "options": {}, "error": 1.0}
    key = {"model": model_digest(model), "process": repr(PROCESS), "prediction": "eps"}
    data = {"format": "fewstep-tuning", "version": 1, "name": "", **key, "reference": {}, "entries": {"4": entry}}
    Tuning.from_dict(data).save(tuning_path(sidecar))
    ok = runner.invoke(app, [*args, "--out", str(tmp_path / "c.tuning.json")])
    assert ok.exit_code == 0, ok.output
    corrected = Tuning.load(tmp_path / "c.tuning.json").entry(4)
    assert corrected.solver == "ddim" and corrected.times == times
    fitted = corrected.fitted_corrections()
    assert fitted is None or (fitted.nfe == 4 and fitted.error < fitted.error_before)  # kept only where it pays


def test_cli_tune_takes_the_confirmation_and_calibration_sizes(tmp_path):
    """`fewstep tune CKPT --confirm-samples N --calibrate-samples M --calibrate-top K` reaches `tune`: a confirmation
    batch wider than --samples ranks the best few (listed in `confirmed`), one no wider is skipped; a size below 2 is
    a usage error naming it."""
    from typer.testing import CliRunner

    from fewstep.cli import app

    config = {"model": {"net": {"type": "mlp", "dim": 2, "width": 8, "depth": 1}, "prediction": "eps"}}
    torch.manual_seed(0)
    sidecar = save_checkpoint(tmp_path / "checkpoint", model=build_model(config["model"], PROCESS), config=config, step=1)
    args = ["tune", str(sidecar), "--nfe", "4", "--samples", "16", "--search-iters", "0", "--reference-steps", "40",
            "--calibrate-iters", "5", "--calibrate-top", "2", "--calibrate-samples", "24",
            "--out", str(tmp_path / "t.json")]  # fmt: skip
    runner = CliRunner()
    bad = runner.invoke(app, [*args, "--confirm-samples", "1"])
    assert bad.exit_code == 2 and "--confirm-samples" in bad.output
    unconfirmed = runner.invoke(app, [*args, "--confirm-samples", "16"])  # not wider than --samples: no confirmation
    assert unconfirmed.exit_code == 0 and Tuning.load(tmp_path / "t.json").entry(4).confirmed == {}
    ok = runner.invoke(app, [*args, "--confirm-samples", "32"])
    assert ok.exit_code == 0, ok.output
    entry = Tuning.load(tmp_path / "t.json").entry(4)
    assert len(entry.confirmed) >= 2 and entry.error == pytest.approx(
        entry.corrections["error"] if entry.corrections else entry.confirmed[f"{entry.solver} {entry.grid}"]
    )


def test_search_stops_above_search_max_nfe_and_selection_scores_the_best_few():
    """Grids are searched only at budgets <= search_max_nfe; only the select_top best configurations on the
    calibration noise (plus the searched ones) are scored on the selection noise and listed."""
    settings = dict(FAST, end_log_snrs=(), select_top=3)
    low = tune(KeyedModel(), PROCESS, "eps", [4], search_max_nfe=4, **settings).entry(4)
    high = tune(KeyedModel(), PROCESS, "eps", [4], search_max_nfe=3, **settings).entry(4)
    assert any(label.split(" ", 1)[1].startswith("searched") for label in low.candidates)
    assert not any(label.split(" ", 1)[1].startswith("searched") for label in high.candidates)
    finite = lambda entry: [v for v in entry.candidates.values() if math.isfinite(v)]  # noqa: E731
    assert len(finite(high)) == 3 and len(finite(low)) == 3 + 1  # 5 candidates, 2 of them collapsed here (inf)
    unlisted = tune(KeyedModel(), PROCESS, "eps", [4], search_max_nfe=3, **dict(settings, select_top=1)).entry(4)
    assert len(finite(unlisted)) == 1 and unlisted.grid == min(unlisted.candidates, key=unlisted.candidates.get).split(" ", 1)[1]


def test_search_cost_is_held_to_that_of_search_top_searches_at_search_full_nfe():
    assert [searched_count(2, nfe) for nfe in range(2, 11)] == [2, 2, 2, 2, 2, 1, 1, 1, 1]
    assert searched_count(0, 5) == 0 and searched_count(5, 8) == 2 and searched_count(4, 12) == 1
    # 2 searched at NFE 4, 1 at NFE 7 (same settings otherwise): the listing names each searched grid once
    settings = dict(FAST, end_log_snrs=(), search_top=2)
    for nfe, count in ((4, 2), (7, 1)):
        entry = tune(KeyedModel(), PROCESS, "eps", [nfe], **settings).entry(nfe)
        assert sum(label.split(" ", 1)[1].startswith("searched") for label in entry.candidates) == count
