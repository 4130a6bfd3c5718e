"""Sample-quality metrics: Frechet distance, sliced Wasserstein, MMD, k-NN precision/recall, the digits classifier,
the shipped digits models and `fewstep eval`."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import scipy.stats
import torch

import fewstep
from fewstep.metrics import frechet_distance, gaussian_frechet_distance, mmd_rbf, precision_recall, sliced_wasserstein
from fewstep.metrics.sliced import wasserstein_1d
from fewstep.tools.classifier import class_statistics, digits_split, features_and_logits

# FD bounds of the shipped models: 500 samples from seed 0 at NFE 10. Measured: digits_vp with ddim 2.39 (the same
# model after 500 of its 7000 training steps: 18.6); digits_flow with heun (9 evaluations) 2.14; digits_cosine_v
# (cosine DiscreteVP, v prediction) with ddim 1.68. Real digits: ~1-2.
FD_BOUND_VP = 3.5
FD_BOUND_FLOW = 3.5
FD_BOUND_COSINE_V = 2.5


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- Frechet distance ------------------------------------------------------------------------------------------


def test_gaussian_fd_closed_form_2d_non_commuting():
    # In 2-D, tr sqrt(C1^1/2 C2 C1^1/2) = sqrt(tr(C1 C2) + 2 sqrt(det(C1 C2))) (eigenvalues of C1 C2), exactly.
    c1 = np.array([[2.0, 0.8], [0.8, 1.0]])
    c2 = np.array([[0.5, -0.3], [-0.3, 1.5]])
    mu1, mu2 = np.array([1.0, -2.0]), np.array([0.5, 0.5])
    cross = math.sqrt(np.trace(c1 @ c2) + 2 * math.sqrt(np.linalg.det(c1 @ c2)))
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * cross)
    assert gaussian_frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-12)
    assert gaussian_frechet_distance(mu1, c1, mu1, c1) == pytest.approx(0.0, abs=1e-12)


def test_gaussian_fd_diagonal_and_singular():
    # Commuting (diagonal) covariances: |dmu|^2 + sum (s1 - s2)^2 with standard deviations s; a zero variance is fine.
    s1, s2 = np.array([1.0, 2.0, 0.0]), np.array([3.0, 0.5, 1.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 1.0, 1.0])
    expected = 3.0 + float(((s1 - s2) ** 2).sum())
    assert gaussian_frechet_distance(mu1, np.diag(s1**2), mu2, np.diag(s2**2)) == pytest.approx(expected, rel=1e-12)


def test_sample_fd_converges_to_closed_form():
    g = _gen(1)
    d, n = 4, 40_000
    a_root = torch.randn(d, d, generator=g, dtype=torch.float64) / 2
    b_root = torch.randn(d, d, generator=g, dtype=torch.float64) / 2
    mu_b = torch.tensor([1.0, 0.0, -0.5, 0.25], dtype=torch.float64)
    a = torch.randn(n, d, generator=g, dtype=torch.float64) @ a_root.T
    b = torch.randn(n, d, generator=g, dtype=torch.float64) @ b_root.T + mu_b
    exact = gaussian_frechet_distance(np.zeros(d), (a_root @ a_root.T).numpy(), mu_b.numpy(), (b_root @ b_root.T).numpy())
    assert frechet_distance(a, b) == pytest.approx(exact, rel=0.03)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_fd_digits_real_vs_held_out_and_noise():
    # Measured: FD(train, held-out) = 2.14, FD(train, uniform-clamped noise) = 141.7 (features of the shipped classifier).
    (x_train, _), (x_test, _) = digits_split()
    real = features_and_logits(x_train)[0]
    held = features_and_logits(x_test)[0]
    noise = features_and_logits(torch.randn(len(x_test), 1, 8, 8, generator=_gen()).clamp(-1, 1))[0]
    fd_held, fd_noise = frechet_distance(real, held), frechet_distance(real, noise)
    assert fd_held < 5.0
    assert fd_noise > 50.0
    assert fd_noise > 20 * fd_held


# ---- sliced Wasserstein, MMD -------------------------------------------------------------------------------------


def test_wasserstein_1d_matches_scipy_for_unequal_sizes():
    g = _gen(2)
    u = torch.randn(1, 37, generator=g, dtype=torch.float64)
    v = torch.randn(1, 53, generator=g, dtype=torch.float64) * 2 + 0.3
    expected = scipy.stats.wasserstein_distance(u[0].numpy(), v[0].numpy())
    assert float(wasserstein_1d(u, v, p=1.0)[0]) == pytest.approx(expected, rel=1e-10)


def test_sliced_wasserstein_identical_zero_and_grows_with_shift():
    g = _gen(3)
    a = torch.randn(400, 3, generator=g, dtype=torch.float64)
    assert sliced_wasserstein(a, a) == 0.0
    direction = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64) / math.sqrt(3)
    values = [sliced_wasserstein(a, a + c * direction, projections=2000) for c in (0.5, 1.0, 2.0)]
    # a pure translation by s moves every projection by theta.s: SW_2 = sqrt(E (theta.s)^2) = |s| / sqrt(d)
    for c, value in zip((0.5, 1.0, 2.0), values, strict=True):
        assert value == pytest.approx(c / math.sqrt(3), rel=0.05)
    assert values[0] < values[1] < values[2]


def _mmd_brute_force(a: torch.Tensor, b: torch.Tensor, h: float) -> float:
    def k(x, y):
        return math.exp(-float(((x - y) ** 2).sum()) / (2 * h * h))

    n, m = len(a), len(b)
    kaa = sum(k(a[i], a[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kbb = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kab = sum(k(a[i], b[j]) for i in range(n) for j in range(m)) / (n * m)
    return kaa + kbb - 2 * kab


def test_mmd_matches_the_u_statistic():
    g = _gen(4)
    a, b = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64) + 0.5
    assert mmd_rbf(a, b, bandwidth=0.7) == pytest.approx(_mmd_brute_force(a, b, 0.7), rel=1e-12)


def test_mmd_near_zero_for_equal_and_matches_gaussian_closed_form_for_shifted():
    # X ~ N(0, I_d), Y ~ N(c, I_d), RBF bandwidth h: MMD^2 = 2 (h^2 / (h^2 + 2))^(d/2) (1 - exp(-|c|^2 / (2 (h^2 + 2)))).
    g = _gen(5)
    d, h = 2, 1.0
    a = torch.randn(500, d, generator=g, dtype=torch.float64)
    b = torch.randn(500, d, generator=g, dtype=torch.float64)
    assert abs(mmd_rbf(a, b, bandwidth=h)) < 0.01
    shifted = []
    for c in (0.5, 1.0, 2.0):
        exact = 2 * (h * h / (h * h + 2)) ** (d / 2) * (1 - math.exp(-d * c * c / (2 * (h * h + 2))))
        shifted.append(mmd_rbf(a, b + c, bandwidth=h))
        assert shifted[-1] == pytest.approx(exact, abs=0.02)
    assert 0 < shifted[0] < shifted[1] < shifted[2]


# ---- precision / recall --------------------------------------------------------------------------------------------


def test_energy_distance_is_scipys_squared_in_1d_and_zero_only_for_equal_samples():
    from scipy.stats import energy_distance as scipy_energy

    from fewstep.metrics import energy_distance

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 1, generator=g, dtype=torch.float64), 0.5 + torch.randn(200, 1, generator=g, dtype=torch.float64)
    assert energy_distance(a, b) == pytest.approx(scipy_energy(a[:, 0].numpy(), b[:, 0].numpy()) ** 2, rel=1e-10)
    assert energy_distance(a, a) == pytest.approx(0.0, abs=1e-12)
    c = torch.randn(400, 3, generator=g, dtype=torch.float64)
    assert energy_distance(c, c + 1.0) > 10 * energy_distance(c[:200], c[200:]) > 0
    with pytest.raises(ValueError, match="same dimension"):
        energy_distance(a, c)


def test_precision_recall_identical_disjoint_and_half():
    g = _gen(6)
    a = torch.randn(300, 4, generator=g, dtype=torch.float64)
    assert precision_recall(a, a) == (1.0, 1.0)
    assert precision_recall(a, a + 100.0) == (0.0, 0.0)
    # half of the fake points far away: precision 1/2; the real set is still covered by the near half (recall ~ 1)
    b = torch.randn(300, 4, generator=g, dtype=torch.float64)
    fake = torch.cat([b[:150], b[150:] + 100.0])
    precision, recall = precision_recall(a, fake)
    assert precision == pytest.approx(0.5, abs=0.04)
    assert recall > 0.8


# ---- classifier ----------------------------------------------------------------------------------------------------


def test_shipped_classifier_held_out_accuracy():
    # Measured: 360/360 = 1.000 held-out accuracy (python -m fewstep.tools.classifier train ..., 40 epochs, seed 0).
    _, (x_test, y_test) = digits_split()
    stats = class_statistics(features_and_logits(x_test)[1], y_test)
    assert stats["accuracy"] >= 0.97
    assert stats["confidence"] > 0.8
    assert stats["class_entropy"] > 0.95 * math.log(10)  # the held-out classes are balanced


def test_shipped_noisy_classifier_accuracy_falls_with_the_noise():
    # Measured (python -m fewstep.tools.classifier train-noisy ..., 8000 steps, seed 0): held-out accuracy at log-SNR
    # 3 / 0 / -3: see the asset's metadata; near the data it is as good as the clean classifier, at pure noise chance.
    from fewstep.tools.classifier import load_noisy_classifier, noisy_accuracy

    net, (_, (x_test, y_test)) = load_noisy_classifier(), digits_split()
    accuracy = {level: noisy_accuracy(net, x_test, y_test, level) for level in (-12, -3, 0, 3, 12)}
    assert accuracy[12] >= 0.97 and accuracy[3] >= 0.95
    assert 0.5 < accuracy[0] < accuracy[3]
    assert accuracy[-12] < 0.2  # chance is 0.1: no signal left


def test_class_statistics_exact():
    logits = torch.tensor([[10.0, 0, 0], [0, 10.0, 0], [0, 10.0, 0], [0, 0, 10.0]])
    logits = torch.nn.functional.pad(logits, (0, 7), value=-1e9)
    stats = class_statistics(logits, torch.tensor([0, 1, 2, 2]))
    assert stats["accuracy"] == 0.75
    assert stats["class_entropy"] == pytest.approx(-(0.25 * math.log(0.25) * 2 + 0.5 * math.log(0.5)))
    assert stats["confidence"] == pytest.approx(1 / (1 + 2 * math.exp(-10)), rel=1e-6)


# ---- bad input -------------------------------------------------------------------------------------------------------


def test_bad_input_names_the_parameter():
    a = torch.zeros(10, 3)
    with pytest.raises(ValueError, match="same dimension"):
        frechet_distance(a, torch.zeros(10, 4))
    with pytest.raises(ValueError, match=r"b must have shape \[n, d\]"):
        sliced_wasserstein(a, torch.zeros(10))
    with pytest.raises(ValueError, match="k must be an integer"):
        precision_recall(a, a, k=0)
    with pytest.raises(ValueError, match="bandwidth"):
        mmd_rbf(a, a, bandwidth=-1.0)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(a, torch.full((10, 3), float("nan")))
    with pytest.raises(ValueError, match="digits must be"):
        features_and_logits(torch.zeros(4, 10))


# ---- NFE budgets, shipped digits models, eval command, demo ---------------------------------------------------------


def test_steps_within_nfe_counts_heun_and_the_final_denoise():
    from fewstep import DiscreteVP, RectifiedFlow
    from fewstep.budget import steps_within_nfe

    vp, flow = DiscreteVP.linear(), RectifiedFlow()
    assert steps_within_nfe("ddim", 10, vp) == 9  # 9 steps + the final denoising evaluation
    assert steps_within_nfe("ddim", 10, flow) == 10  # sigma(t_min) = 0: no final denoising evaluation
    assert steps_within_nfe("heun", 10, vp) == 4  # 2 per step + 1 = 9 <= 10 < 11
    assert steps_within_nfe("heun", 10, flow) == 5  # 2 per step, 1 on the step that ends at sigma = 0: 9
    with pytest.raises(ValueError, match="nfe must be"):
        steps_within_nfe("ddim", 0, vp)
    with pytest.raises(ValueError, match="below the cost"):
        steps_within_nfe("heun", 2, vp)


def _shipped_fd(name: str, solver: str, nfe: int, n: int = 500) -> float:
    from fewstep import sample
    from fewstep.budget import steps_within_nfe
    from fewstep.shipped import load_model
    from fewstep.tools.evaluate import sample_metrics

    loaded = load_model(name)
    noise = torch.randn(n, 1, 8, 8, generator=_gen(0))
    steps = steps_within_nfe(solver, nfe, loaded.process)
    x = sample(loaded.model, noise, process=loaded.process, prediction=loaded.prediction, solver=solver, steps=steps,
               schedule="time_uniform")  # fmt: skip
    return sample_metrics(x)["fd"]


@pytest.mark.parametrize(
    ("name", "solver", "nfe", "bound"),
    [
        ("digits_vp", "ddim", 10, FD_BOUND_VP),
        ("digits_flow", "heun", 10, FD_BOUND_FLOW),
        ("digits_cosine_v", "ddim", 10, FD_BOUND_COSINE_V),
    ],
)
def test_shipped_digits_model_fd(name, solver, nfe, bound):
    assert _shipped_fd(name, solver, nfe) < bound


def test_eval_command_writes_its_table(tmp_path):
    import json

    from typer.testing import CliRunner

    from fewstep.cli import app

    out = tmp_path / "eval"
    result = CliRunner().invoke(
        app, ["eval", "digits_vp", "--solvers", "ddim,heun", "--nfe", "5", "--n", "200", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    table = (out / "eval.md").read_text()
    assert "| ddim | 5 | 4 |" in table  # DiscreteVP: 4 steps + the final denoising evaluation
    assert "| heun | 5 | 2 |" in table  # 2 per step + 1
    rows = json.loads((out / "eval.json").read_text())
    assert [(r["solver"], r["nfe"]) for r in rows] == [("ddim", 5), ("heun", 5)]
    assert all(0 < r["fd"] < 200 and 0 <= r["precision"] <= 1 for r in rows)
    assert (out / "fd_vs_nfe.png").stat().st_size > 1000


def test_digits_demo_writes_grids_and_table(tmp_path):
    from fewstep.tools.digits_demo import digits_demo

    table = digits_demo(tmp_path, nfes=(5, 10), solvers=("dpmpp_2m",), n=200)
    assert "| dpmpp_2m |" in table and "NFE 5" in table and "NFE 10" in table
    for nfe in (5, 10):
        assert (tmp_path / f"digits_vp_dpmpp_2m_nfe{nfe}.png").stat().st_size > 500


def test_shared_evaluations_are_exact_and_evaluate_each_input_once():
    """The demo's cache: cells that repeat an input (same noise, same first time, same DDIM first step) reuse the
    stored output; the samples are those of the plain model, bit for bit."""
    from fewstep.tools.digits_demo import SharedEvaluations

    process = fewstep.DiscreteVP.linear()
    exact = fewstep.ring2d().model(process, "eps")
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shared = SharedEvaluations(exact)
    for solver in ("ddim", "dpmpp_2m", "deis"):
        x = fewstep.sample(shared, noise, process=process, solver=solver, steps=4, schedule="quadratic")
        assert torch.equal(x, fewstep.sample(exact, noise, process=process, solver=solver, steps=4, schedule="quadratic"))
    assert shared.calls == 15 and shared.hits >= 4  # the first evaluation (and the DDIM first step) of the later runs
    out = shared(noise, torch.ones(16, dtype=torch.float64))
    before = out.clone()
    out.add_(1.0)  # a caller changing its copy does not change the stored output
    assert torch.equal(shared(noise, torch.ones(16, dtype=torch.float64)), before)


def test_eval_command_rejects_unknown_solver_and_model(tmp_path):
    from typer.testing import CliRunner

    from fewstep.cli import app

    def error(*args: str) -> str:  # the message with rich's box and line wrapping removed
        result = CliRunner().invoke(app, ["eval", *args, "--out", str(tmp_path)])
        assert result.exit_code == 2
        return " ".join(re.sub("[\u2500-\u257f]", " ", result.output).split())

    assert "solver='nope' is not known" in error("digits_vp", "--solvers", "nope")
    assert "neither a file nor a shipped model" in error("no_such_model")


def test_tile_layout():
    from fewstep.tools.digits_demo import tile

    x = torch.stack([torch.full((1, 2, 2), -1.0), torch.full((1, 2, 2), 1.0), torch.zeros(1, 2, 2)])
    grid = tile(x, columns=2, gap=1, fill=0.5)
    assert grid.shape == (2 * 3 + 1, 2 * 3 + 1)
    assert (grid[1:3, 1:3] == 0).all() and (grid[1:3, 4:6] == 1).all() and (grid[4:6, 1:3] == 0.5).all()
    assert grid[0, 0] == 0.5 and (grid[4:6, 4:6] == 0.5).all()  # border and the empty last cell


def test_evaluate_digits_runs_the_choosers_rows_as_sample_would():
    """The "auto" row is `sample(solver="auto")` with the shipped tuning (through the demo's evaluation cache), the
    "recommended" row `fewstep.recommended`'s plan: same samples, hence the same FD, as calling them directly."""
    from fewstep.shipped import load_model
    from fewstep.tools.digits_demo import SharedEvaluations
    from fewstep.tools.evaluate import evaluate_digits, sample_metrics

    loaded = load_model("digits_vp")
    kept = {}
    rows = evaluate_digits(SharedEvaluations(loaded.model), process=loaded.process, prediction=loaded.prediction,
                           solvers=["auto", "recommended"], nfes=[5], n=32, seed=3,
                           on_cell=lambda row, x: kept.setdefault(row.solver, x))  # fmt: skip
    noise = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    auto = fewstep.sample(loaded.model, noise, process=loaded.process, prediction=loaded.prediction, solver="auto", nfe=5)
    assert auto.choice["source"] == "tuned" and rows[0].steps == auto.choice["steps"] and rows[0].nfe == 5
    plan = fewstep.recommended(5, loaded.process)
    fallback = fewstep.sample(loaded.model, noise, process=loaded.process, prediction=loaded.prediction, **plan)
    assert rows[1].steps == plan["steps"] and rows[1].nfe == 5
    for row, direct in zip(rows, (auto, fallback), strict=True):
        assert torch.allclose(kept[row.solver], direct, atol=1e-5)
        assert row.fd == pytest.approx(sample_metrics(direct)["fd"], rel=1e-3)
