"""A fewstep model as a diffusers model and pipeline: `FewstepUNet` (ModelMixin + ConfigMixin) and `to_pipeline`.

diffusers loads a pipeline's components by the library and class names in its `model_index.json`, so a folder
written by `to_pipeline(loaded).save_pretrained(folder)` names `fewstep.FewstepUNet` and reloads with
`DDPMPipeline.from_pretrained(folder)` wherever fewstep is installed. The network is called with diffusers'
convention, `unet(sample, timestep).sample` with the integer timestep k of the scheduler (model time
t = (k + 1) / N for a `DiscreteVP`, `DiscreteVP.timestep`), and returns the model's own prediction (the scheduler
config's `prediction_type`). Its state dict is the fewstep model's (`net.*`), so its weights key — and so a
tuning made for the fewstep model — is the same.
Only DiscreteVP models map onto DDPM-style scheduler configs; a flow model would need a FlowMatch pipeline with
text or class conditioning, which diffusers' unconditional pipelines do not take.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ConfigMixin, DDPMPipeline, DDPMScheduler, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput

from ..nets import build_model
from ..processes import DiscreteVP
from ..train.process_config import build_process
from .conventions import DIFFUSERS_PREDICTION


class FewstepUNet(ModelMixin, ConfigMixin):
    """A fewstep network (`model_config` / `process_config` as in a fewstep checkpoint) with diffusers' call:
    forward(sample [batch, C, H, W], timestep (int, 0-d or [batch] tensor of scheduler steps k)) -> UNet2DOutput."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, model_config: dict[str, Any], process_config: dict[str, Any] | str, sample_size: int = 8,
                 in_channels: int = 1):  # fmt: skip
        super().__init__()
        process = build_process(process_config)
        if not isinstance(process, DiscreteVP):
            raise ValueError(f"FewstepUNet maps DiscreteVP models onto DDPM-style schedulers; got {process!r}")
        model = build_model(model_config, process)
        self.net = model.net  # the only registered module: the state dict is the fewstep model's (`net.*`)
        object.__setattr__(self, "_fewstep_model", model)  # the preconditioning around it, not registered twice

    @property
    def fewstep_model(self) -> torch.nn.Module:
        """The fewstep `DiffusionModel` around this network: model(x, t) in the process's own time."""
        return self._fewstep_model

    def forward(self, sample: torch.Tensor, timestep: Any, return_dict: bool = True) -> UNet2DOutput | tuple:
        k = torch.as_tensor(timestep, device=sample.device, dtype=torch.float64).reshape(-1).expand(sample.shape[0])
        t = (k + 1) / self.fewstep_model.process.num_timesteps
        out = self.fewstep_model(sample, t.to(sample.dtype))
        return UNet2DOutput(sample=out) if return_dict else (out,)


def scheduler_config(loaded: Any) -> dict[str, Any]:
    """A DDPMScheduler config describing a loaded DiscreteVP fewstep model: its betas (float64 list) and prediction."""
    process = loaded.process
    if not isinstance(process, DiscreteVP):
        raise ValueError(f"only DiscreteVP models have a DDPM-style scheduler config; this model's process is {process!r}")
    if loaded.prediction not in DIFFUSERS_PREDICTION:
        allowed = ", ".join(DIFFUSERS_PREDICTION)
        raise ValueError(f"prediction {loaded.prediction!r} has no diffusers prediction_type; allowed: {allowed}")
    return {"num_train_timesteps": process.num_timesteps, "trained_betas": process.betas.tolist(),
            "prediction_type": DIFFUSERS_PREDICTION[loaded.prediction], "clip_sample": False}  # fmt: skip


def to_pipeline(loaded: Any) -> DDPMPipeline:
    """A `DDPMPipeline` (FewstepUNet + DDPMScheduler) of a loaded fewstep DiscreteVP image model (`fewstep.shipped.
    load_model` or a checkpoint), with the same weights."""
    config = loaded.config or {}
    model_config, process_config = config.get("model"), config.get("process")
    if model_config is None or process_config is None:
        raise ValueError("the loaded model carries no model/process config (load it with fewstep.shipped.load_model)")
    shape = tuple(loaded.model.sample_shape) if hasattr(loaded.model, "sample_shape") else None
    in_channels, size = (shape[0], shape[-1]) if shape else (model_config["net"].get("in_channels", 1), 8)
    unet = FewstepUNet(model_config, process_config, sample_size=size, in_channels=in_channels)
    unet.net.load_state_dict(loaded.model.net.state_dict())
    return DDPMPipeline(unet=unet.eval(), scheduler=DDPMScheduler.from_config(scheduler_config(loaded)))
