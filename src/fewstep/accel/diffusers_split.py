"""diffusers `UNet2DModel.forward` and `UNet2DConditionModel.forward` split at a down/up block pair, for feature
caching (Ma et al., 2024, "DeepCache").

The same operations in the same order as the diffusers forwards (0.3x-0.4x), so a full pass is bit-identical; the
shallow branch at `depth` k is conv_in, down_blocks[:k], up_blocks[-k:] and the output head, the deep branch the rest
(down_blocks[k:], mid_block, up_blocks[:-k]); its output is the feature entering up_blocks[-k]. Supported: no class
embedding, no skip-sample blocks (`Attn/SkipDownBlock2D`), no Fourier time embedding; for UNet2DConditionModel (the
Stable Diffusion 1.x / 2.x UNet) text conditioning by `encoder_hidden_states`, and no added embeddings (SDXL's
`added_cond_kwargs`), encoder projection, attention masks, ControlNet / adapter residuals or GLIGEN.
Shapes: sample [batch, C, H, W], timestep [batch], encoder_hidden_states [batch, tokens, dim] -> ([batch, C, H, W],
deep feature or None).
"""

from __future__ import annotations

import torch
from torch import nn

from ..nets.unet import Reuse


def is_unet2d_condition(net: object) -> bool:
    """Whether net is a diffusers `UNet2DConditionModel` (checked by name: diffusers is optional)."""
    return type(net).__name__ == "UNet2DConditionModel" and type(net).__module__.startswith("diffusers")


def check_splittable(unet: nn.Module) -> int:
    """The number of branch points (down blocks) of a diffusers UNet2DModel / UNet2DConditionModel; a TypeError
    naming what the split lacks."""
    config = unet.config
    if unet.class_embedding is not None or config.time_embedding_type == "fourier" or config.center_input_sample:
        raise TypeError("caching supports diffusers UNets without class embedding, Fourier time embedding or center_input_sample")
    if any(hasattr(block, "skip_conv") for block in [*unet.down_blocks, *unet.up_blocks]):
        raise TypeError("caching does not support UNet2DModel skip-sample blocks (SkipDownBlock2D, AttnSkipDownBlock2D)")
    if is_unet2d_condition(unet) and (
        config.addition_embed_type is not None or unet.encoder_hid_proj is not None or hasattr(unet, "position_net")
    ):
        raise TypeError(
            "caching supports UNet2DConditionModel with text conditioning only (Stable Diffusion 1.x / 2.x): no "
            "addition_embed_type (SDXL), encoder_hid_proj or GLIGEN"
        )
    return len(unet.down_blocks)


def _time_embedding(unet: nn.Module, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """The UNet's time embedding [batch, dim], as its forward computes it."""
    if is_unet2d_condition(unet):
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        return emb if unet.time_embed_act is None else unet.time_embed_act(emb)
    timesteps = timestep if timestep.ndim else timestep[None]
    timesteps = timesteps * torch.ones(sample.shape[0], dtype=timesteps.dtype, device=timesteps.device)
    return unet.time_embedding(unet.time_proj(timesteps).to(dtype=unet.dtype))


def unet2d_forward_split(
    unet: nn.Module,
    sample: torch.Tensor,
    timestep: torch.Tensor,
    depth: int | None = None,
    deep: torch.Tensor | Reuse | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`unet(sample, timestep, ...).sample` and the deep feature at `depth`; with `deep` given the deep branch is
    skipped. `deep` may be a function of the deep branch's input (the output of down_blocks[depth - 1]) returning the
    feature to use or None to compute it (adaptive caching, `fewstep.accel.adaptive`). `encoder_hidden_states` goes
    to the cross-attention blocks of a UNet2DConditionModel.
    """
    emb = _time_embedding(unet, sample, timestep)
    cross = {"encoder_hidden_states": encoder_hidden_states}

    def run(block: nn.Module, *args, **kwargs):
        return block(*args, **kwargs, **cross) if getattr(block, "has_cross_attention", False) else block(*args, **kwargs)

    up_factor = 2 ** getattr(unet, "num_upsamplers", 0)
    odd_size = is_unet2d_condition(unet) and any(dim % up_factor for dim in sample.shape[-2:])
    sample = unet.conv_in(sample)
    res = (sample,)
    n = len(unet.down_blocks)
    shallow = n if deep is None else depth
    for block in unet.down_blocks[:shallow]:
        sample, res_samples = run(block, hidden_states=sample, temb=emb)
        res += res_samples
    if callable(deep):
        deep = deep(sample)
    if deep is None:
        for block in unet.down_blocks[shallow:]:
            sample, res_samples = run(block, hidden_states=sample, temb=emb)
            res += res_samples
        if unet.mid_block is not None:
            sample = run(unet.mid_block, sample, emb)
    if deep is not None:
        res = res[: sum(len(b.resnets) for b in unet.up_blocks[n - depth :])]
    feature = None
    for j, block in enumerate(unet.up_blocks):
        if depth is not None and j == n - depth:
            feature, sample = (sample, sample) if deep is None else (deep, deep)
        if deep is not None and j < n - depth:
            continue
        res_samples, res = res[-len(block.resnets) :], res[: -len(block.resnets)]
        upsample_size = res[-1].shape[2:] if odd_size and j < n - 1 else None
        sample = run(block, hidden_states=sample, temb=emb, res_hidden_states_tuple=res_samples, upsample_size=upsample_size)
    if unet.conv_norm_out is not None:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample), feature
