"""Real int8 kernels for a calibrated `quantize` model: its Conv2d / Linear layers run as PyTorch's quantized CPU ops.

Static post-training quantization in the integer-arithmetic form of Jacob et al. (2018, "Quantization and Training of
Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR): each layer's input is quantized to uint8 on
the affine grid `quantize` calibrated, multiplied by its int8 per-channel weights (the grid `quantize` rounded them
to, GPTQ or nearest) in integer arithmetic (torch.ao quantized Conv2d / Linear: fbgemm / x86 / onednn kernels), and
the result requantized to uint8 on the output range seen in calibration and returned as float, so the rest of the
network (normalisation, activations, attention's softmax) stays float. The inputs and weights are exactly those of
the simulated model; the one difference is the output's 8-bit requantization. W4 weights run on the int8 kernels
too (their grid is a subset of int8's): accuracy of W4, speed of W8.
Shapes: as the model's.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.ao.nn.quantized as nnq
from torch import nn

from ..nets.model import DiffusionModel
from .backbone import with_backbone
from .quant import QuantizedModel, QuantLayer, _engines, affine_grid


class Int8Layer(nn.Module):
    """A calibrated QuantLayer as a real quantized op: float in, uint8 input grid, int8 weights, float out."""

    def __init__(self, q: QuantLayer):
        super().__init__()
        layer = q.layer
        self.scale, self.zero_point = affine_grid(float(q.lo[0]), float(q.hi[0]), 2**q.a_bits - 1)
        zero = torch.zeros(q.w_scale.numel(), dtype=torch.long)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
            weight = torch.quantize_per_channel(layer.weight.detach().float(), q.w_scale.double(), zero, 0, torch.qint8)
            bias = None if layer.bias is None else layer.bias.detach().float()
            if isinstance(layer, nn.Conv2d):
                self.op = nnq.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                                     layer.dilation, layer.groups, bias is not None)  # fmt: skip
            else:
                self.op = nnq.Linear(layer.in_features, layer.out_features, bias is not None)
            self.op.set_weight_bias(weight, bias)
        self.op.scale, self.op.zero_point = affine_grid(float(q.out_range[0]), float(q.out_range[1]), 255)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = torch.quantize_per_tensor(x.float().contiguous(), self.scale, self.zero_point, torch.quint8)
        return self.op(xq).contiguous().dequantize().to(x.dtype)  # NCHW (copied as uint8): float ops are slow on NHWC


def int8_kernels(quantized: QuantizedModel, keep_output_layer: bool = True) -> QuantizedModel:
    """`quantized` (from `quantize`, a_bits 8, one time group) with its layers on real int8 kernels (see the module
    doc); a RuntimeError naming the alternative where this PyTorch build has no quantized CPU engine.

    keep_output_layer: the network's last convolution stays simulated (same int8 input and weights, float output):
    its output is the prediction itself, and requantizing that to 8 bits is the kernels' largest error."""
    if not isinstance(quantized, QuantizedModel):
        raise TypeError(f"int8_kernels needs a calibrated model from fewstep.accel.quantize, got {type(quantized).__name__}")
    if not _engines():
        raise RuntimeError("no quantized CPU engine (fbgemm/x86/qnnpack) in this PyTorch build: keep the simulated model")
    net = quantized.model.net if isinstance(quantized.model, DiffusionModel) else quantized.model
    layers = [m for m in net.modules() if isinstance(m, QuantLayer)]
    if any(layer.a_bits != 8 for layer in layers) or quantized.boundaries.numel():
        raise ValueError("int8_kernels needs quantize(..., a_bits=8, time_groups=1): the kernels take one uint8 input grid")
    if any(isinstance(m.layer, nn.Conv2d) and m.layer.padding_mode != "zeros" for m in layers):
        raise ValueError("int8_kernels supports zero-padded convolutions only")
    net = copy.deepcopy(net)
    convs = [m for m in net.modules() if isinstance(m, QuantLayer) and isinstance(m.layer, nn.Conv2d)]
    keep = {id(convs[-1])} if keep_output_layer and convs else set()
    return QuantizedModel(with_backbone(quantized.model, _replace(net, keep)), quantized.t_range)


def _replace(net: nn.Module, keep: set[int]) -> nn.Module:
    """net with each calibrated QuantLayer child (recursively) not in `keep` (ids) replaced by an Int8Layer, in place
    (a layer that no calibration call reached stays, and raises its own error if it is ever called)."""
    for name, child in net.named_children():
        if isinstance(child, QuantLayer):
            if id(child) not in keep and bool(torch.isfinite(child.out_range).all()):
                setattr(net, name, Int8Layer(child))
        else:
            _replace(child, keep)
    return net
