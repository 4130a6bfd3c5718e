"""diffusers' model conventions read from a scheduler config: the process, the prediction and the timestep map.

A diffusers model is trained with a scheduler whose config names its noise schedule and output (diffusers,
`SchedulerMixin`/`ConfigMixin`; Ho et al., 2020; Lin et al., 2024; Esser et al., 2024):
- DDPM-style betas (`beta_schedule` linear / scaled_linear / squaredcos_cap_v2, or `trained_betas`; optionally
  `rescale_betas_zero_snr`) -> `DiscreteVP`, model timestep k = t N - 1 in [0, N - 1] (`DiscreteVP.timestep`);
- flow matching (FlowMatch* schedulers, `prediction_type="flow_prediction"`, `use_flow_sigmas`) -> `ShiftedFlow`
  (RectifiedFlow, sigma = t), model timestep k = N t, the config's `shift` (or `flow_shift`) as its default grid;
- `prediction_type`: epsilon -> "eps", v_prediction -> "v", sample -> "x0", flow_prediction -> "velocity"
  (diffusers' flow target noise - x0 is dx/dt of x = (1 - t) x0 + t noise);
- `clip_sample` / `thresholding` -> the x0_fn `StaticClipping` / `DynamicThresholding`.
Works on plain mappings: diffusers itself is not imported here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..checks import check_int, check_real
from ..guidance import DynamicThresholding, StaticClipping
from ..processes import DiscreteVP, Process, Time, _as_tensor
from .flow import ShiftedFlow, check_shift, shift_from_mu

PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "velocity"}
DIFFUSERS_PREDICTION = {v: k for k, v in PREDICTIONS.items()}  # fewstep name -> diffusers name
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
LEARNED_VARIANCE = ("learned", "learned_range")

# The keys of a canonical (FewstepScheduler) model description, with their defaults (those of DDPMScheduler /
# FlowMatchEulerDiscreteScheduler where they exist).
MODEL_KEYS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "rescale_betas_zero_snr": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
    "variance_type": None,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
}


def as_mapping(config: Any, name: str = "scheduler_config") -> dict[str, Any]:
    """A scheduler config as a dict: a dict, a diffusers FrozenDict, or a scheduler (its `.config`, with its class
    name as `_class_name`, which a live scheduler's config lacks)."""
    if not isinstance(config, Mapping) and isinstance(getattr(config, "config", None), Mapping):
        return {"_class_name": type(config).__name__, **config.config}
    if not isinstance(config, Mapping):
        raise TypeError(f"{name} must be a diffusers scheduler, its .config or a dict, got {type(config).__name__}")
    return dict(config)


def is_flow(config: Mapping[str, Any]) -> bool:
    """Whether a (foreign or canonical) scheduler config describes a flow-matching model: a FlowMatch* class, flow
    prediction, flow sigmas, or (a live FlowMatch config, which names no class) a shift without betas."""
    name = str(config.get("_class_name", ""))
    flow_prediction = config.get("prediction_type") == "flow_prediction" or bool(config.get("use_flow_sigmas"))
    shift_only = "shift" in config and not ({"beta_schedule", "trained_betas", "prediction_type"} & set(config))
    return name.startswith("FlowMatch") or flow_prediction or shift_only


def canonical_config(config: Any) -> dict[str, Any]:
    """The model-describing keys of any diffusers scheduler config, in FewstepScheduler's names (missing: defaults).

    FlowMatch* configs have no prediction_type (it is flow_prediction); DPM-Solver/UniPC flow configs name the shift
    `flow_shift`. Configs of models with EDM preconditioning (EDM* schedulers, `timestep_type="continuous"`) and of
    schedulers that describe no DDPM betas nor a flow (e.g. ScoreSdeVe) are refused with a ValueError.
    """
    config = as_mapping(config)
    name = str(config.get("_class_name", ""))
    if name.startswith("EDM") or config.get("timestep_type") == "continuous" or "sigma_data" in config:
        raise ValueError(
            f"scheduler_config of {name or 'this scheduler'} describes an EDM-preconditioned model (timestep = log(sigma)/4), "
            "which fewstep.integrations does not map; supported: DDPM-style beta configs and flow-matching configs"
        )
    flow = is_flow(config)
    foreign = name not in ("", "FewstepScheduler") or bool({"sigma_min", "sigma_max"} & set(config))
    if not flow and foreign and not ({"beta_schedule", "trained_betas"} & set(config)):
        raise ValueError(
            f"scheduler_config of {name or 'this scheduler'} has neither beta_schedule nor trained_betas nor a flow-matching "
            "prediction; "
            "fewstep maps DDPM-style beta configs and flow-matching configs (FlowMatch*, prediction_type='flow_prediction')"
        )
    out = {key: config.get(key, default) for key, default in MODEL_KEYS.items()}
    if flow:
        out["prediction_type"] = "flow_prediction"
        if "flow_shift" in config and not name.startswith("FlowMatch"):
            out["shift"] = config["flow_shift"]
    return out


def betas_from_config(config: Mapping[str, Any]) -> torch.Tensor:
    """The float64 betas [N] of a canonical config (rescaled to zero terminal SNR when asked), as diffusers builds them."""
    n = check_int(config["num_train_timesteps"], "num_train_timesteps", minimum=2)
    if config["trained_betas"] is not None:
        betas = torch.as_tensor(config["trained_betas"], dtype=torch.float64)
    else:
        schedule = config["beta_schedule"]
        start, end = (check_real(config[k], k, positive=True) for k in ("beta_start", "beta_end"))
        if schedule == "linear":
            betas = DiscreteVP.linear(n, start, end).betas
        elif schedule == "scaled_linear":
            betas = DiscreteVP.scaled_linear(n, start, end).betas
        elif schedule == "squaredcos_cap_v2":
            betas = DiscreteVP.cosine(n).betas
        else:
            allowed = ", ".join(BETA_SCHEDULES)
            raise ValueError(f"beta_schedule={schedule!r} is not known; allowed values: {allowed}, or trained_betas")
    if config["rescale_betas_zero_snr"]:
        betas = DiscreteVP.rescale_zero_terminal_snr(betas)
    return betas


@dataclass(frozen=True)
class Convention:
    """A diffusers model's process, prediction and timestep map: timestep k = scale t + offset (fewstep time t)."""

    process: Process
    prediction: str
    num_train_timesteps: int
    scale: float
    offset: float
    x0_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    learned_variance: bool = False

    @property
    def flow(self) -> bool:
        return self.offset == 0.0

    def timestep(self, t: Time) -> torch.Tensor:
        """The model's timestep for fewstep time t (DiscreteVP: t N - 1; flow: N t)."""
        return _as_tensor(t) * self.scale + self.offset

    def time(self, k: Time) -> torch.Tensor:
        """fewstep time of the model's timestep k (the inverse of `timestep`)."""
        k = _as_tensor(k)
        k = k if k.is_floating_point() else k.to(torch.float64)
        return (k - self.offset) / self.scale

    def take_prediction(self, output: torch.Tensor, channels: int) -> torch.Tensor:
        """The model output without the learned-variance channels (DDPM `variance_type` learned/learned_range)."""
        if self.learned_variance and output.ndim >= 2 and output.shape[1] == 2 * channels:
            return output[:, :channels]
        return output


def convention(config: Any, *, shift: float | None = None, mu: float | None = None) -> Convention:
    """The Convention of a (foreign or canonical) scheduler config; `shift` / `mu` override a flow config's shift.

    A flow config with `use_dynamic_shifting` (FLUX) needs `mu` (or `shift`): the shift depends on the image size.
    """
    c = canonical_config(config)
    prediction_type = c["prediction_type"]
    if prediction_type not in PREDICTIONS:
        raise ValueError(f"prediction_type={prediction_type!r} is not known; allowed values: {', '.join(PREDICTIONS)}")
    if c["timestep_spacing"] not in TIMESTEP_SPACINGS:
        spacing, allowed = c["timestep_spacing"], ", ".join(TIMESTEP_SPACINGS)
        raise ValueError(f"timestep_spacing={spacing!r} is not known; allowed values: {allowed}")
    x0_fn = None
    if c["thresholding"]:
        x0_fn = DynamicThresholding(c["dynamic_thresholding_ratio"], c["sample_max_value"])
    elif c["clip_sample"]:
        x0_fn = StaticClipping(c["clip_sample_range"])
    learned = c["variance_type"] in LEARNED_VARIANCE
    if prediction_type == "flow_prediction":
        n = check_int(c["num_train_timesteps"], "num_train_timesteps", minimum=1)
        process = ShiftedFlow(flow_shift(c, shift, mu))
        return Convention(process, "velocity", n, float(n), 0.0, x0_fn, learned)
    process = DiscreteVP(betas_from_config(c))
    n = process.num_timesteps
    return Convention(process, PREDICTIONS[prediction_type], n, float(n), -1.0, x0_fn, learned)


def flow_shift(config: Mapping[str, Any], shift: float | None = None, mu: float | None = None) -> float:
    """The shift of a canonical flow config: `shift` if given, else from `mu` (dynamic shifting), else the config's."""
    if shift is not None:
        return check_shift(shift)
    if mu is not None:
        return shift_from_mu(mu, config["time_shift_type"])
    if config["use_dynamic_shifting"]:
        raise ValueError(
            "this flow config uses dynamic shifting (use_dynamic_shifting=True): pass mu (as the pipeline computes it "
            "from the image size) or shift"
        )
    return check_shift(config["shift"])


def spacing_timesteps(config: Mapping[str, Any], steps: int) -> list[float]:
    """steps + 1 decreasing integer timesteps by the config's `timestep_spacing` (DPMSolverMultistepScheduler's rules,
    keeping the last point): linspace from N - 1 to 0, "leading" multiples of N // (steps + 1) plus `steps_offset`,
    "trailing" from N - 1 in steps of N / steps, then 0."""
    n, spacing = int(config["num_train_timesteps"]), config["timestep_spacing"]
    if spacing == "linspace":
        ks = torch.linspace(n - 1, 0, steps + 1, dtype=torch.float64).round()
    elif spacing == "leading":
        ratio = n // (steps + 1)
        ks = (torch.arange(steps, -1, -1, dtype=torch.float64) * ratio).round() + int(config["steps_offset"])
    elif spacing == "trailing":
        trailing = torch.arange(n, 0, -n / steps, dtype=torch.float64).round()[:steps] - 1
        ks = torch.cat([trailing, torch.zeros(1, dtype=torch.float64)])
    else:
        raise ValueError(f"timestep_spacing={spacing!r} is not known; allowed values: {', '.join(TIMESTEP_SPACINGS)}")
    return ks.tolist()
