"""`fewstep bench learned` measures what it says: its rows are the runs they name, at exactly their NFE, and the peer
adapter samples v-prediction and flow models as fewstep's own solvers do (parity in float64)."""

from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

import fewstep
from fewstep.accuracy import rms_error
from fewstep.cli import app
from fewstep.grids import Schedule
from fewstep.tools import bench_learned as bl
from fewstep.tools import peers
from fewstep.tune import converged_reference
from fewstep.tuning import TunedEntry, Tuning

CANDIDATES = (("ddim", "logsnr"), ("dpmpp_2m", "logsnr"), ("deis", "quadratic"))


class TunedMixture:
    """The exact eps model of ring2d on DiscreteVP.linear(), with a tuning key and a tuning at NFE 4 only."""

    def __init__(self, process):
        self.fn = fewstep.ring2d().model(process, "eps")
        self.tuning_key = "ring2d-exact-eps"
        times = Schedule("quadratic").grid(process, 3, process.t_max, process.t_min)
        entry = TunedEntry(nfe=4, solver="ddim", steps=3, times=[float(t) for t in times], grid="quadratic")
        self.tuning = Tuning(self.tuning_key, repr(process), "eps", entries={4: entry})

    def __call__(self, x, t):
        return self.fn(x, t)


@pytest.fixture(scope="module")
def bench():
    process = fewstep.DiscreteVP.linear()
    model = TunedMixture(process)
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    result = bl.bench_model("ring2d", model, process, "eps", [3, 4], noise, candidates=CANDIDATES, reference_steps=100)
    return result, model, process, noise


def test_rows_are_the_runs_they_name(bench):
    result, model, process, noise = bench
    reference, _ = converged_reference(model, noise, process, "eps", "dpmpp_2m", 100, 0.01)
    ref_row = result.row(bl.REFERENCE)
    assert result.rows[0] is ref_row and all(c.rmse == 0.0 for c in ref_row.cells.values())
    assert [r.label for r in result.kind(bl.FIXED)] == [f"fewstep {s} / {g}" for s, g in CANDIDATES]
    for nfe in (3, 4):  # the fallback row is fewstep.sample with the recommended keywords
        x = fewstep.sample(model, noise, process=process, **fewstep.recommended(nfe, process))
        assert result.row(bl.FALLBACK).cells[nfe].rmse == pytest.approx(rms_error(x, reference), rel=1e-12)
        assert result.row(bl.FALLBACK).cells[nfe].nfe == nfe
    tuned = result.row(bl.TUNED).cells
    x = fewstep.sample(model, noise, process=process, **model.tuning.entries[4].sample_kwargs())
    assert not tuned[4].fallback and tuned[4].rmse == pytest.approx(rms_error(x, reference), rel=1e-12)
    assert tuned[3].fallback and tuned[3].rmse == result.row(bl.FALLBACK).cells[3].rmse  # no entry at 3: the fallback
    x = fewstep.sample(model, noise, process=process, solver="dpmpp_2m", steps=3, schedule="logsnr")  # 3 steps + denoise
    assert result.row(bl.FIXED, "fewstep dpmpp_2m / logsnr").cells[4].rmse == pytest.approx(rms_error(x, reference), rel=1e-12)


def test_peer_rows_use_exactly_their_nfe_and_divergence_is_marked(bench):
    pytest.importorskip("diffusers", reason="the peers need the dev extra")
    result, model, process, noise = bench
    peer_rows = result.kind(*bl.PEER_KINDS)
    assert len(peer_rows) >= 17
    for row in peer_rows:
        for nfe, cell in row.cells.items():
            assert cell.nfe in (None, nfe)
            assert cell.ran or cell.what.startswith(("n/a", "error"))
    ddim = result.row(bl.DIFFUSERS, "diffusers DDIM").cells[4]
    x = peers.run_at_nfe(peers.peers(peers.Target(model, process, "eps"))["diffusers DDIM"], peers.Target(model, process, "eps"),
                         noise, 4)  # fmt: skip
    reference, _ = converged_reference(model, noise, process, "eps", "dpmpp_2m", 100, 0.01)
    assert ddim.nfe == 4 and ddim.rmse == pytest.approx(rms_error(x, reference), rel=1e-12)
    baseline = result.row(bl.FIXED, result.baseline).cells
    assert result.baseline == "fewstep ddim / logsnr"
    for row in result.rows[1:]:
        for nfe, cell in row.cells.items():
            assert cell.diverged == (cell.ran and (not math.isfinite(cell.rmse) or cell.rmse > baseline[nfe].rmse))


def test_reports_have_one_line_per_nfe_and_per_configuration(bench, tmp_path):
    result = bench[0]
    summary = bl.summary_markdown(result)
    assert summary.count("\n| 3 |") == 1 and summary.count("\n| 4 |") == 1 and "(fallback)" in summary
    full = bl.full_markdown(result)
    assert all(f"| {row.label} |" in full for row in result.rows)
    analysis = bl.fallback_analysis([result, result])
    assert all(min(w[n] for w in analysis["worst"].values()) == 1.0 for n in (3, 4))
    assert "NFE band" in bl.fallback_markdown(analysis, bands=[(3, 4)])
    assert bl.full_markdown(bl.LearnedResult.from_dict(result.to_dict())) == full  # learned.json round trip
    bl.learned_plot([result], tmp_path / "learned.png")
    assert (tmp_path / "learned.png").stat().st_size > 0


def test_diffusers_ddim_on_a_v_prediction_cosine_model_matches_fewstep_ddim():
    """DDIMScheduler(prediction_type="v_prediction") on DiscreteVP.cosine() through the adapter = fewstep's DDIM on the
    same timesteps (float64): the adapter's betas, timestep -> time map, start and end are right."""
    pytest.importorskip("diffusers", reason="the peers need the dev extra")
    process = fewstep.DiscreteVP.cosine()
    target = peers.mixture_target(fewstep.ring2d(), process, "v")
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = peers.run_at_nfe(peers.peers(target)["diffusers DDIM"], target, noise, 5)
    grid = process.time_from_timestep(torch.tensor([999.0, 799.0, 599.0, 399.0, 199.0], dtype=torch.float64))  # "trailing"
    ours = fewstep.sample(target.model, noise, process=process, prediction="v", solver="ddim", schedule=grid, steps=4)
    assert ours.nfe == 5
    assert (x - ours).abs().max() < 1e-6


def test_diffusers_flow_match_euler_on_a_velocity_model_matches_fewstep_euler():
    pytest.importorskip("diffusers", reason="the peers need the dev extra")
    process = fewstep.RectifiedFlow()
    target = peers.mixture_target(fewstep.ring2d(), process, "velocity")
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    available = peers.peers(target)
    assert "diffusers FlowMatchEuler" in available and "diffusers DDIM" not in available
    x = peers.run_at_nfe(available["diffusers FlowMatchEuler"], target, noise, 6)
    grid = torch.cat([torch.linspace(1.0, 1e-3, 6, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    ours = fewstep.sample(target.model, noise, process=process, prediction="velocity", solver="euler", schedule=grid, steps=6)
    assert (x - ours).abs().max() < 1e-6  # diffusers holds its sigmas in float32


@pytest.mark.parametrize(
    "args, option", [(["--models", "nope"], "--models"), (["--nfes", "1"], "--nfes"), (["--nfes", "x"], "--nfes")]
)
def test_bad_options_are_usage_errors(args, option):
    result = CliRunner().invoke(app, ["bench", "learned", *args])
    assert result.exit_code == 2 and option in result.output


def test_reuse_takes_fixed_and_peer_rows_and_reruns_the_defaults(bench):
    """With `reuse`, the fixed and peer rows are the earlier result's (same noise and reference), the tuned row is run
    again with the model's current tuning; an earlier result of other noise or NFEs is refused."""
    result, model, process, noise = bench
    entry = model.tuning.entries[4]
    model.tuning.entries[4] = TunedEntry(nfe=4, solver="dpmpp_2m", steps=3, times=entry.times, grid="quadratic")
    try:
        again = bl.bench_model("ring2d", model, process, "eps", [4], noise, candidates=(), reference_steps=100, reuse=result)
    finally:
        model.tuning.entries[4] = entry
    assert [r.label for r in again.kind(bl.FIXED, *bl.PEER_KINDS)] == [r.label for r in result.kind(bl.FIXED, *bl.PEER_KINDS)]
    assert again.row(bl.FIXED, "fewstep ddim / logsnr").cells[4] == result.row(bl.FIXED, "fewstep ddim / logsnr").cells[4]
    assert again.row(bl.TUNED).cells[4].rmse != result.row(bl.TUNED).cells[4].rmse
    assert again.row(bl.TUNED).cells[4].what.startswith("dpmpp_2m")
    with pytest.raises(ValueError, match="reuse: the earlier report"):
        bl.bench_model("ring2d", model, process, "eps", [5], noise, candidates=(), reference_steps=100, reuse=result)
    with pytest.raises(ValueError, match="reuse: the earlier report"):
        bl.bench_model("ring2d", model, process, "eps", [4], noise[:8], candidates=(), reference_steps=100, reuse=result)


def test_ratios_carry_a_bootstrap_interval_that_holds_the_point_ratio(bench):
    """The summary's ratios come with a paired bootstrap interval over the noise samples (kept in learned.json)."""
    result = bench[0]
    tuned = result.row(bl.TUNED).cells[4]
    _, fixed_err = result.best((bl.FIXED,), 4)
    low, high = result.intervals[4]["tuned/fixed"]
    assert low <= tuned.rmse / fixed_err <= high and low < high
    assert f"{tuned.rmse / fixed_err:.2f} ({low:.2f}-{high:.2f})" in bl.summary_markdown(result)
    again = bl.LearnedResult.from_dict(result.to_dict())
    assert again.intervals == result.intervals and bl.summary_markdown(again) == bl.summary_markdown(result)
    assert all(c.errors is None for r in again.rows for c in r.cells.values())  # per-sample errors are not saved
