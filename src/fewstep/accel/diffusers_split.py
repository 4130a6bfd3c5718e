"""diffusers `UNet2DModel.forward` split at a down/up block pair, for feature caching (Ma et al., 2024, "DeepCache").

The same operations in the same order as `UNet2DModel.forward` (diffusers 0.3x-0.4x), so a full pass is bit-identical;
the shallow branch at `depth` k is conv_in, down_blocks[:k], up_blocks[-k:] and the output head, the deep branch the
rest (down_blocks[k:], mid_block, up_blocks[:-k]); its output is the feature entering up_blocks[-k]. Supported: no
class embedding, no skip-sample blocks (`Attn/SkipDownBlock2D`), no Fourier time embedding.
Shapes: sample [batch, C, H, W], timestep [batch] -> ([batch, C, H, W], deep feature or None).
"""

from __future__ import annotations

import torch
from torch import nn

from ..nets.unet import Reuse


def check_splittable(unet: nn.Module) -> int:
    """The number of branch points (down blocks) of a diffusers UNet2DModel; a TypeError for what the split lacks."""
    config = unet.config
    if unet.class_embedding is not None or config.time_embedding_type == "fourier" or config.center_input_sample:
        raise TypeError("caching supports UNet2DModel without class embedding, Fourier time embedding or center_input_sample")
    if any(hasattr(block, "skip_conv") for block in [*unet.down_blocks, *unet.up_blocks]):
        raise TypeError("caching does not support UNet2DModel skip-sample blocks (SkipDownBlock2D, AttnSkipDownBlock2D)")
    return len(unet.down_blocks)


def unet2d_forward_split(
    unet: nn.Module,
    sample: torch.Tensor,
    timestep: torch.Tensor,
    depth: int | None = None,
    deep: torch.Tensor | Reuse | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`unet(sample, timestep).sample` and the deep feature at `depth`; with `deep` given the deep branch is skipped.

    `deep` may be a function of the deep branch's input (the output of down_blocks[depth - 1]) returning the feature
    to use or None to compute it (adaptive caching, `fewstep.accel.adaptive`).
    """
    timesteps = timestep if timestep.ndim else timestep[None]
    timesteps = timesteps * torch.ones(sample.shape[0], dtype=timesteps.dtype, device=timesteps.device)
    emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=unet.dtype))
    sample = unet.conv_in(sample)
    res = (sample,)
    n = len(unet.down_blocks)
    shallow = n if deep is None else depth
    for block in unet.down_blocks[:shallow]:
        sample, res_samples = block(hidden_states=sample, temb=emb)
        res += res_samples
    if callable(deep):
        deep = deep(sample)
    if deep is None:
        for block in unet.down_blocks[shallow:]:
            sample, res_samples = block(hidden_states=sample, temb=emb)
            res += res_samples
        if unet.mid_block is not None:
            sample = unet.mid_block(sample, emb)
    if deep is not None:
        res = res[: sum(len(b.resnets) for b in unet.up_blocks[n - depth :])]
    feature = None
    for j, block in enumerate(unet.up_blocks):
        if depth is not None and j == n - depth:
            feature, sample = (sample, sample) if deep is None else (deep, deep)
        if deep is not None and j < n - depth:
            continue
        res_samples, res = res[-len(block.resnets) :], res[: -len(block.resnets)]
        sample = block(sample, res_samples, emb)
    sample = unet.conv_out(unet.conv_act(unet.conv_norm_out(sample)))
    return sample, feature
