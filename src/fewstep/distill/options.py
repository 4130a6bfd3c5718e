"""The `distill` config table: methods, their options with defaults, and checks that name the key and allowed values.

Consistency methods share one template with orthogonal options (Song et al., 2023; Song & Dhariwal, 2023; Geng et
al., 2024); the method picks where x_r comes from and the defaults:
- "cd": x_r from a teacher step (`teacher_solver` "heun" | "ddim"); N = 18 intervals, l2, uniform, EMA target 0.95;
- "ct": x_r from the same noise; iCT: N 10 -> 1280, pseudo-Huber, weight 1/(s_t - s_r), lognormal, no EMA target;
- "ect": as "ct" with ECT's continuous r-schedule (q = 2, k = 8, b = 1, 8 stages), starting from the diffusion loss.
"pd": progressive distillation (Salimans & Ho, 2022), rounds from `start_steps` down to `end_steps`.
"dmd", "sid": distribution matching (Yin et al., 2024; Zhou et al., 2024), `fewstep.distill.dmd`, with K-step
generators by backward simulation (`generator_times` / `generator_steps`, `fewstep.distill.backsim`) and DMD2's optional
GAN head (`gan_weight` > 0, `fewstep.distill.gan`); "reflow": a velocity
model retrained on coupled (noise, teacher sample) pairs (Liu et al., 2023), `fewstep.distill.reflow`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..checks import check_int, check_real
from ..grids import SCHEDULES
from ..train.config import ConfigError

METHODS = ("cd", "ct", "ect", "pd", "dmd", "sid", "reflow")
MATCHING_METHODS = ("dmd", "sid")
PROBES = ("energy", "fd")
REFLOW_TIMES = ("uniform", "u_shaped")
CONSISTENCY_METHODS = ("cd", "ct", "ect")
SCHEDULES_R = ("discrete", "continuous")
DISTANCES = ("l2", "pseudo_huber")
CONSISTENCY_WEIGHTINGS = ("gap", "none")
TIME_DISTRIBUTIONS = ("lognormal", "uniform")
TEACHER_SOLVERS = ("heun", "ddim")
PD_WEIGHTINGS = ("truncated_snr", "none")
HUBER_SCALE = 0.00054  # c = 0.00054 sqrt(d), Song & Dhariwal (2023), section 3.3


@dataclass(frozen=True)
class ConsistencyOptions:
    """Settings of the consistency template (see the module doc); None: derived from the run (steps, data, process)."""

    method: str
    schedule: str
    n_min: int
    n_max: int
    rho: float
    q: float
    stage_steps: int | None
    k: float
    b: float
    distance: str
    huber_c: float | None
    weighting: str
    time_distribution: str
    p_mean: float
    p_std: float
    target_decay: float
    teacher_solver: str
    sigma_max: float | None
    student_steps: tuple[int, ...]
    gamma: float
    init_from_teacher: bool | None = None
    teacher: str | None = None

    @property
    def uses_teacher_step(self) -> bool:
        return self.method == "cd"


@dataclass(frozen=True)
class ProgressiveOptions:
    """Settings of progressive distillation; steps_per_round None: config.steps split evenly over the rounds."""

    start_steps: int
    end_steps: int
    steps_per_round: int | None
    grid: str | None
    weighting: str
    init_from_teacher: bool | None = None
    teacher: str | None = None
    method: str = field(default="pd")

    @property
    def rounds(self) -> tuple[int, ...]:
        """Student step counts per round: start_steps, start_steps / 2, ..., end_steps."""
        out, n = [], self.start_steps
        while n >= self.end_steps:
            out.append(n)
            n //= 2
        return tuple(out)


@dataclass(frozen=True)
class MatchingOptions:
    """Settings of distribution matching ("dmd" | "sid"; see `fewstep.distill.dmd`); None: derived from the run."""

    method: str
    fake_steps: int
    fake_lr: float | None
    fake_warmup: int
    t_low: float
    t_high: float
    regression_pairs: str | None
    regression_weight: float
    fake_score: str | None
    probe: str
    probe_every: int
    probe_count: int
    init_generator: str | None = None
    generator_steps: int | None = None
    generator_times: tuple[float, ...] | None = None
    alpha: float = 1.2
    gan_weight: float = 0.0
    gan_fake_weight: float = 0.01
    gan_lr: float | None = None
    init_from_teacher: bool | None = None
    teacher: str | None = None


@dataclass(frozen=True)
class ReflowOptions:
    """Settings of reflow (see `fewstep.distill.reflow`): the pair folder and the time distribution."""

    pairs: str
    time_distribution: str
    init_from_teacher: bool | None = None
    teacher: str | None = None
    method: str = field(default="reflow")


_CONSISTENCY_COMMON = {"schedule": "discrete", "n_min": 10, "n_max": 1280, "rho": 7.0, "q": 2.0, "stage_steps": None, "k": 8.0,
                       "b": 1.0, "distance": "pseudo_huber", "huber_c": None, "weighting": "gap",
                       "time_distribution": "lognormal", "p_mean": -1.1, "p_std": 2.0, "target_decay": 0.0,
                       "teacher_solver": "heun", "sigma_max": None, "student_steps": (1, 2, 4), "gamma": 1.0}  # fmt: skip
DEFAULTS: dict[str, dict[str, Any]] = {
    "cd": {
        **_CONSISTENCY_COMMON,
        "n_min": 18,
        "n_max": 18,
        "distance": "l2",
        "weighting": "none",
        "time_distribution": "uniform",
        "target_decay": 0.95,
    },  # fmt: skip
    "ct": dict(_CONSISTENCY_COMMON),
    "ect": {**_CONSISTENCY_COMMON, "schedule": "continuous"},
    "pd": {"start_steps": 64, "end_steps": 1, "steps_per_round": None, "grid": None, "weighting": "truncated_snr"},
    "dmd": {"fake_steps": 5, "fake_lr": None, "fake_warmup": 0, "t_low": 0.02, "t_high": 0.98, "regression_pairs": None,
            "regression_weight": 0.25, "fake_score": None, "probe": "energy", "probe_every": 0, "probe_count": 256,
            "init_generator": None, "generator_steps": None, "generator_times": None, "gan_weight": 0.0,
            "gan_fake_weight": 0.01, "gan_lr": None},
    "reflow": {"pairs": None, "time_distribution": "uniform"},
}  # fmt: skip
DEFAULTS["sid"] = {**DEFAULTS["dmd"], "fake_steps": 1, "alpha": 1.2}
_COMMON_KEYS = ("method", "teacher", "init_from_teacher")
_CD_ONLY = ("teacher_solver",)


def _choice(allowed: tuple[str, ...]) -> Callable[[str, Any], str]:
    def check(key: str, value: Any) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise ConfigError(f"distill.{key}", f"distill.{key}={value!r} is not known; allowed values: {', '.join(allowed)}")
        return value

    return check


def _integer(low: int) -> Callable[[str, Any], int]:
    def check(key: str, value: Any) -> int:
        try:
            return check_int(value, f"distill.{key}", minimum=low)
        except ValueError as err:
            raise ConfigError(f"distill.{key}", str(err)) from None

    return check


def _real(low: float, high: float = math.inf, *, open_low: bool = False, open_high: bool = False) -> Callable[[str, Any], float]:
    def check(key: str, value: Any) -> float:
        name = f"distill.{key}"
        try:
            result = check_real(value, name)
        except ValueError as err:
            raise ConfigError(name, str(err)) from None
        if result < low or result > high or (open_low and result == low) or (open_high and result == high):
            interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
            raise ConfigError(name, f"{name} must be a number in {interval}, got {name}={value!r}")
        return result

    return check


def _boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"distill.{key}", f"distill.{key} must be true or false, got {value!r}")
    return value


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"distill.{key}", f"distill.{key} must be a shipped model name or a checkpoint path, got {value!r}")
    return value


def _folder(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"distill.{key}", f"distill.{key} must be the folder of a pair set (fewstep.distill.reflow), got {value!r}"
        )
    return value


def _step_counts(key: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(
            f"distill.{key}", f"distill.{key} must be a non-empty list of step counts, e.g. [1, 2, 4], got {value!r}"
        )
    counts = tuple(_integer(1)(key, v) for v in value)
    return tuple(sorted(set(counts)))


def _decreasing_times(key: str, value: Any) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(
            f"distill.{key}", f"distill.{key} must be a non-empty list of decreasing times, e.g. [1.0, 0.5], got {value!r}"
        )
    times = tuple(_real(-math.inf)(key, v) for v in value)
    if list(times) != sorted(set(times), reverse=True):
        raise ConfigError(f"distill.{key}", f"distill.{key} must be strictly decreasing, got {list(times)}")
    return times


RULES: dict[str, Callable[[str, Any], Any]] = {
    "method": _choice(METHODS),
    "teacher": _text,
    "init_from_teacher": _boolean,
    "schedule": _choice(SCHEDULES_R),
    "n_min": _integer(1),
    "n_max": _integer(1),
    "rho": _real(0.0, open_low=True),
    "q": _real(1.0, open_low=True),
    "stage_steps": _integer(1),
    "k": _real(0.0),
    "b": _real(0.0, open_low=True),
    "distance": _choice(DISTANCES),
    "huber_c": _real(0.0, open_low=True),
    "weighting": _choice(CONSISTENCY_WEIGHTINGS),
    "time_distribution": _choice(TIME_DISTRIBUTIONS),
    "p_mean": _real(-math.inf),
    "p_std": _real(0.0, open_low=True),
    "target_decay": _real(0.0, 1.0, open_high=True),
    "teacher_solver": _choice(TEACHER_SOLVERS),
    "sigma_max": _real(0.0, open_low=True),
    "student_steps": _step_counts,
    "gamma": _real(0.0, 1.0),
    "start_steps": _integer(1),
    "end_steps": _integer(1),
    "steps_per_round": _integer(1),
    "grid": _choice(SCHEDULES),
    "fake_steps": _integer(1),
    "fake_lr": _real(0.0, open_low=True),
    "fake_warmup": _integer(0),
    "t_low": _real(0.0, 1.0),
    "t_high": _real(0.0, 1.0),
    "regression_pairs": _folder,
    "regression_weight": _real(0.0),
    "fake_score": _text,
    "init_generator": _text,
    "generator_steps": _integer(1),
    "generator_times": _decreasing_times,
    "probe": _choice(PROBES),
    "probe_every": _integer(0),
    "probe_count": _integer(2),
    "alpha": _real(0.0),
    "gan_weight": _real(0.0),
    "gan_fake_weight": _real(0.0, open_low=True),
    "gan_lr": _real(0.0, open_low=True),
    "pairs": _folder,
}
REFLOW_RULES = {"time_distribution": _choice(REFLOW_TIMES)}
PD_RULES = {"weighting": _choice(PD_WEIGHTINGS)}


def allowed_keys(method: str) -> tuple[str, ...]:
    """The keys the `distill` table takes for `method`."""
    keys = [k for k in DEFAULTS[method] if method == "cd" or k not in _CD_ONLY]
    return (*_COMMON_KEYS, *keys)


def parse_table(table: dict[str, Any]) -> ConsistencyOptions | ProgressiveOptions | MatchingOptions | ReflowOptions:
    """The checked options of a `distill` table (ConfigError naming "distill.<key>" and the allowed values)."""
    if not isinstance(table, dict):
        raise ConfigError("distill", f"distill must be a table like {{method = 'cd', teacher = 'digits_vp'}}, got {table!r}")
    if "method" not in table:
        raise ConfigError("distill.method", f"the distill table needs a method; allowed values: {', '.join(METHODS)}")
    method = RULES["method"]("method", table["method"])
    allowed = allowed_keys(method)
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ConfigError(
            "distill", f"distill option(s) {', '.join(unknown)} not known for method {method!r}; allowed: {', '.join(allowed)}"
        )
    rules = {**RULES, **PD_RULES} if method == "pd" else {**RULES, **REFLOW_RULES} if method == "reflow" else RULES
    values = {**DEFAULTS[method], **{k: rules[k](k, v) for k, v in table.items()}}
    if method == "pd":
        return _progressive(values)
    if method in MATCHING_METHODS:
        for key in ("gan_fake_weight", "gan_lr"):
            if key in table and values["gan_weight"] == 0:
                raise ConfigError(f"distill.{key}", f"distill.{key} is a setting of the GAN head, which is off: set "
                                  "distill.gan_weight > 0 (e.g. 0.01) to train the head")  # fmt: skip
        return _matching(values)
    if method == "reflow":
        if values["pairs"] is None:
            raise ConfigError("distill.pairs", "reflow needs distill.pairs = <folder of (noise, sample) pairs>, made by "
                              "fewstep.distill.reflow.write_pairs")  # fmt: skip
        return ReflowOptions(**values)
    if values["n_min"] > values["n_max"]:
        raise ConfigError(
            "distill.n_min", f"need distill.n_min <= distill.n_max, got n_min={values['n_min']}, n_max={values['n_max']}"
        )
    return ConsistencyOptions(**values)


def _progressive(values: dict[str, Any]) -> ProgressiveOptions:
    start, end = values["start_steps"], values["end_steps"]
    ratio = start // end
    if start % end or ratio & (ratio - 1):
        raise ConfigError(
            "distill.start_steps",
            f"distill.start_steps must be distill.end_steps times a power of two (rounds halve the steps), got "
            f"start_steps={start}, end_steps={end}",
        )
    return ProgressiveOptions(**values)


def _matching(values: dict[str, Any]) -> MatchingOptions:
    if values["t_low"] >= values["t_high"]:
        raise ConfigError(
            "distill.t_low", f"need distill.t_low < distill.t_high, got t_low={values['t_low']}, t_high={values['t_high']}"
        )
    steps, times = values["generator_steps"], values["generator_times"]
    if steps is not None and times is not None and len(times) != steps:
        raise ConfigError(
            "distill.generator_times",
            f"distill.generator_times holds {len(times)} times but distill.generator_steps = {steps}: give one time per "
            "generator step (or only one of the two)",
        )
    return MatchingOptions(**values)


def check_config_table(config: Any) -> None:
    """`TrainConfig.validate`'s check of the distill table (registered in fewstep.train.objective.TABLE_CHECKS)."""
    parse_table(config.distill)
