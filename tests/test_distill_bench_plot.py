"""`fewstep bench distill`'s figure: FD vs NFE of every student beside the teacher's training-free curve (issue 11,
item 4): the plotted series are the bench's numbers, the extra curve points are `training_free` on the first noise
sets, and the command writes and lists the figure."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import digits_pair

from fewstep.distill.bench import (
    TEACHER_SERIES,
    DistillBench,
    Scored,
    StudentResult,
    bench_distill,
    fd_nfe_series,
    mean_fd,
    plot_fd_vs_nfe,
    training_free,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _synthetic() -> DistillBench:
    free = {1: Scored(218.0, "ddim 1 steps"), 2: Scored(40.0, "auto"), 4: Scored(6.5, "auto")}
    curve = {8: Scored(2.1, "auto"), 50: Scored(1.05, "auto")}
    students = [
        StudentResult("dmd", {1: Scored(0.97, "1 NFE")}, 1140.0),
        StudentResult("cd", {1: Scored(2.24, "1 NFE"), 2: Scored(1.23, "2 NFE"), 4: Scored(math.inf, "4 NFE")}),
    ]
    return DistillBench("digits_flow", [1, 2, 4], 1000, 2, 50, Scored(1.01, "ipndm, 50 NFE"), free, students, 2, curve, 1)


def test_the_series_are_the_bench_numbers_and_the_figure_is_written(tmp_path):
    bench = _synthetic()
    series = fd_nfe_series(bench)
    assert list(series) == [TEACHER_SERIES, "dmd", "cd"]
    assert series[TEACHER_SERIES] == ([1, 2, 4, 8, 50], [218.0, 40.0, 6.5, 2.1, 1.05])
    assert series["dmd"] == ([1], [0.97])
    assert series["cd"] == ([1, 2, 4], [2.24, 1.23, math.inf])  # kept in the data, left out of the drawn line
    path = plot_fd_vs_nfe(bench, tmp_path / "fig" / "distill_fd_nfe.png")
    assert path == tmp_path / "fig" / "distill_fd_nfe.png" and path.read_bytes()[:8] == PNG
    assert [p.name for p in path.parent.iterdir()] == ["distill_fd_nfe.png"]  # atomic: no temporary file left
    from fewstep.distill.bench import markdown

    text = "training-free curve (FD at NFE; beyond the step counts over 1 noise set(s)): 1: 218, 2: 40, 4: 6.5, 8: 2.1, 50: 1.05"
    assert text in markdown(bench)


def test_the_curve_adds_training_free_points_on_the_first_noise_sets(tmp_path):
    teacher, student = digits_pair(tmp_path)
    noise = torch.randn(30, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    fd = lambda x: float(x.double().pow(2).mean())  # noqa: E731 - any samples -> number works as the score
    bench = bench_distill([("mine", student)], ("tiny", teacher), noise, fd, steps=(1, 2), reference_nfe=4, parts=3,
                          curve_nfes=(2, 3, 5), curve_parts=2)  # fmt: skip
    assert sorted(bench.curve) == [3, 5]  # 2 is a step count: the table's (3 noise sets) number is reused
    for n in (3, 5):
        expected = training_free(teacher, noise[:20], mean_fd(fd, 2), n)
        assert bench.curve[n].fd == pytest.approx(expected.fd, rel=1e-9) and bench.curve[n].what == expected.what
    assert bench.curve[3].fd != pytest.approx(training_free(teacher, noise, mean_fd(fd, 3), 3).fd, rel=1e-9)
    nfes, fds = fd_nfe_series(bench)[TEACHER_SERIES]
    assert nfes == [1, 2, 3, 5] and fds == [bench.training_free[1].fd, bench.training_free[2].fd, bench.curve[3].fd,
                                            bench.curve[5].fd]  # fmt: skip
    with pytest.raises(ValueError, match=r"curve_parts=4 must be in 1..parts=3"):
        bench_distill([], ("tiny", teacher), noise, fd, steps=(1,), parts=3, curve_parts=4)


def test_the_command_writes_and_lists_the_figure(tmp_path):
    from typer.testing import CliRunner

    from fewstep.cli import app

    digits_pair(tmp_path)
    out = tmp_path / "out"
    args = ["bench", "distill", "--teacher", str(tmp_path / "teacher.json"), "--students",
            f"mine={tmp_path / 'student.json'}", "--steps", "1,2", "--n", "40", "--repeats", "2", "--reference-nfe", "4",
            "--curve", "1,3", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "distill_fd_nfe.png").read_bytes()[:8] == PNG
    assert "distill_fd_nfe.png" in result.output and "Figure: distill_fd_nfe.png" in (out / "distill.md").read_text()
    assert "training-free curve (FD at NFE; beyond the step counts over 2 noise set(s)): 1: " in (out / "distill.md").read_text()
    bad = CliRunner().invoke(app, [*args[:-2], "--curve-repeats", "3", "--out", str(out)])
    assert bad.exit_code == 2 and "--curve-repeats" in bad.output, bad.output
