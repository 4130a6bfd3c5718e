"""Post-training quantization of a fewstep model, calibrated on the sampler's own states across its timesteps.

Q-Diffusion (Li et al., 2023, "Q-Diffusion: Quantizing Diffusion Models", ICCV, section 4.1) and PTQ4DM (Shang et al.,
2023, CVPR) observe that activation ranges move with the timestep, so the calibration set must be the sampler's own
intermediate inputs (x_t, t) drawn across all its steps, not inputs at one timestep. Here: weights per output channel,
symmetric, `w_bits` (the first and last convolution at `edge_bits`, 8 as in Q-Diffusion), rounded by GPTQ on each
layer's calibration inputs (or to nearest); the input activation of
every Conv2d and Linear per tensor, affine, `a_bits`, its range the calibration inputs' min/max (or searched for
the least error on them); with `time_groups` > 1 each layer keeps one activation range per group of timesteps
(contiguous groups of the calibration times, chosen at call time by t: the time-dependent activation ranges of TDQ,
So et al., 2023, "Temporal Dynamic Quantization for Diffusion Models", NeurIPS, in their simplest, table form).
This is *simulated* (fake) quantization: values are rounded to the integer grid and
computed in float, so it measures the accuracy of W8A8 / W4A8, not their speed. `dynamic_int8` is the real-speed
path where PyTorch has CPU kernels: int8 Linear layers (torch.ao dynamic quantization, fbgemm/x86); convolutions
stay float.
Shapes: as the model's.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..nets.model import DiffusionModel
from ..sampling import sample
from .backbone import with_backbone

RANGES = ("mse", "minmax")
WEIGHTS = ("minmax", "gptq")
SAMPLES_PER_CALL = 4096  # calibration inputs kept per layer and call for the range search
HESSIAN_ROWS_PER_CALL = 2048  # input rows (a convolution's patches) per layer and call in GPTQ's second moment


def _weight_scale(w: torch.Tensor, bits: int, rule: str = "minmax") -> torch.Tensor:
    """[out] symmetric per-output-channel step of w [out, ...]: its largest |w| over 2^(bits-1) - 1 ("minmax"), or
    that largest |w| shrunk by the factor (of 20 in 0.5..1) with the least squared rounding error ("mse")."""
    q = 2 ** (bits - 1) - 1
    rows = w.detach().float().flatten(1)
    top = rows.abs().amax(1).clamp_min(1e-12)
    if rule == "minmax":
        return top / q
    best, best_err = top / q, torch.full_like(top, float("inf"))
    for factor in torch.linspace(0.5, 1.0, 20).tolist():
        scale = factor * top / q
        err = ((rows / scale[:, None]).round().clamp(-q, q) * scale[:, None] - rows).pow(2).sum(1)
        better = err < best_err
        best, best_err = torch.where(better, scale, best), torch.where(better, err, best_err)
    return best


def _gptq(
    w: torch.Tensor, hessian: torch.Tensor, bits: int, scale: torch.Tensor | None = None, damp: float = 0.01
) -> torch.Tensor:
    """w [out, cols] rounded column by column, each column's rounding error spread over the columns not yet rounded
    so as to least change the layer's output on the calibration inputs, whose second moment is `hessian` [cols, cols]
    (GPTQ: Frantar et al., 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
    Transformers", ICLR, algorithm 1, without its lazy blocks). Per-channel steps `scale` [out] (default
    `_weight_scale(w, bits, "mse")`)."""
    q = 2 ** (bits - 1) - 1
    w = w.detach().double().clone()
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    scale = (_weight_scale(w, bits, "mse") if scale is None else scale).double()
    out = torch.empty_like(w)
    for col in range(w.shape[1]):
        rounded = (w[:, col] / scale).round().clamp(-q, q) * scale
        out[:, col] = rounded
        err = (w[:, col] - rounded) / upper[col, col]
        w[:, col + 1 :] -= err[:, None] * upper[col, col + 1 :][None, :]
    return out


def affine_grid(lo: float, hi: float, levels: int) -> tuple[float, int]:
    """(scale, zero point) of the unsigned affine grid 0..levels spanning [lo, hi] widened to hold 0."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-8) / levels
    return scale, int(round(-lo / scale))


def _layer_inputs(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows [n, cols] the layer multiplies by its weight [out, cols]: x itself for a Linear, x's unfolded
    patches for a Conv2d (groups 1)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    patches = torch.nn.functional.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


class QuantLayer(nn.Module):
    """A Conv2d or Linear with fake-quantized weights and input: observes the input range while `observing`.

    weights: the weight rounding, "minmax" (to nearest, `_weight_scale`) or "gptq" (`_gptq`, on the second moment of
    the inputs observed in calibration; before calibration ends the weights are rounded to nearest on its grid)."""

    def __init__(self, layer: nn.Module, w_bits: int, a_bits: int, groups: int = 1, weights: str = "minmax"):
        super().__init__()
        self.layer = copy.deepcopy(layer)
        self.float_weight = layer.weight.detach()  # the original (not a parameter: not in the state dict)
        self.weights = weights if not (isinstance(layer, nn.Conv2d) and layer.groups != 1) else "minmax"
        self.set_weight_bits(w_bits)
        self.a_bits = a_bits
        self.observing = False
        self.group = 0  # the time group of the current call (set by QuantizedModel)
        self._seen: dict[int, list[torch.Tensor]] = {}
        self._hessian: torch.Tensor | None = None
        self.register_buffer("lo", torch.full((groups,), float("inf")))
        self.register_buffer("hi", torch.full((groups,), float("-inf")))
        self.register_buffer("out_range", torch.tensor([float("inf"), float("-inf")]))  # the output's, for int8 kernels

    def set_weight_bits(self, bits: int) -> None:
        """Round the original weights to `bits` (by this layer's rule; "gptq" waits for the calibration); `w_scale`
        [out] is the per-channel step."""
        self.w_bits = bits
        self.w_scale = _weight_scale(self.float_weight, bits, "mse" if self.weights == "gptq" else self.weights)
        q = 2 ** (bits - 1) - 1
        zero = torch.zeros_like(self.w_scale, dtype=torch.int32)
        rounded = torch.fake_quantize_per_channel_affine(self.float_weight.float(), self.w_scale.float(), zero, 0, -q, q)
        self.layer.weight.data = rounded.to(self.float_weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.group
        if self.observing:
            flat = x.detach().float().flatten()
            self.lo[g], self.hi[g] = torch.minimum(self.lo[g], flat.min()), torch.maximum(self.hi[g], flat.max())
            self._seen.setdefault(g, []).append(flat[:: max(1, flat.numel() // SAMPLES_PER_CALL)])
            if self.weights == "gptq":
                rows = _layer_inputs(self.layer, x.detach().float())
                rows = rows[:: max(1, rows.shape[0] // HESSIAN_ROWS_PER_CALL)].double()
                self._hessian = (0 if self._hessian is None else self._hessian) + rows.T @ rows
            out = self.layer(x)
            self.out_range[0] = torch.minimum(self.out_range[0], out.detach().float().min())
            self.out_range[1] = torch.maximum(self.out_range[1], out.detach().float().max())
            return out
        if not bool(torch.isfinite(self.lo[g])):
            raise RuntimeError("the quantized layer was never calibrated: quantize(model, states) with at least one state")
        return self.layer(self._fake_quant(x.float(), float(self.lo[g]), float(self.hi[g])).to(x.dtype))

    def _fake_quant(self, x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        """x on the affine grid of 2^a_bits levels spanning [lo, hi] (widened to hold 0), values outside clipped."""
        levels = 2**self.a_bits - 1
        return torch.fake_quantize_per_tensor_affine(x, *affine_grid(lo, hi, levels), 0, levels)

    def start(self) -> None:
        """Begin observing calibration inputs."""
        self.observing, self._seen = True, {}

    def finish(self, ranges: str) -> None:
        """Fix each group's input range: "minmax" = the observed extremes; "mse" = the extremes shrunk by the factor
        (of 20 in 0.05..1) with the least quantization error on the observed inputs (clipping outliers buys
        resolution)."""
        seen, self.observing, self._seen = self._seen, False, {}
        if self._hessian is not None:
            w = self.float_weight
            rounded = _gptq(w.flatten(1), self._hessian, self.w_bits, self.w_scale)
            self.layer.weight.data = rounded.reshape(w.shape).to(w.dtype)
            self._hessian = None
        for g, parts in seen.items():
            if ranges == "minmax":
                continue
            values, lo, hi = torch.cat(parts), float(self.lo[g]), float(self.hi[g])
            errors = [
                (float((self._fake_quant(values, c * lo, c * hi) - values).pow(2).mean()), c)
                for c in torch.linspace(0.05, 1, 20).tolist()
            ]
            best = min(errors)[1]
            self.lo[g], self.hi[g] = best * lo, best * hi


def calibration_states(model: Callable, noise: torch.Tensor, **sample_kwargs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The model inputs (x [batch, ...], t [batch]) of one `fewstep.sample(model, noise, **sample_kwargs)` run."""
    states: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        states.append((x.detach().clone(), torch.as_tensor(t).detach().clone()))
        return model(x, t)

    sample(record, noise, **sample_kwargs)
    return states


def _check_bits(name: str, bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"{name} must be an integer in 2..8 (simulated quantization), got {name}={bits!r}")
    return bits


class QuantizedModel(nn.Module):
    """A fewstep model with a fake-quantized backbone; warns once when called at a time outside its calibration.

    boundaries [groups - 1]: increasing times between the activation-range groups; a call at time t uses group
    bucketize(t, boundaries) (its first sample's t: one group per call) in every layer."""

    def __init__(self, model: Callable, times: torch.Tensor, layers: Sequence[QuantLayer] = (),
                 boundaries: torch.Tensor | None = None):  # fmt: skip
        super().__init__()
        self.model = model
        self.process, self.prediction = getattr(model, "process", None), getattr(model, "prediction", None)
        self.register_buffer("t_range", torch.stack([times.min(), times.max()]).double())
        self.register_buffer("boundaries", torch.zeros(0, dtype=torch.float64) if boundaries is None else boundaries)
        self._layers = list(layers)  # a plain list: the layers are registered once, inside `model`
        self._warned = False

    def set_group(self, t: torch.Tensor) -> int:
        """Select the activation ranges of the time group of t in every layer; returns the group."""
        group = int(torch.bucketize(torch.as_tensor(t, dtype=torch.float64).reshape(-1)[:1], self.boundaries)[0])
        for layer in self._layers:
            layer.group = group
        return group

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not self._warned:
            self._check_time(torch.as_tensor(t))
        if self.boundaries.numel():
            self.set_group(t)
        return self.model(x, t)

    def _check_time(self, t: torch.Tensor) -> None:
        lo, hi = float(self.t_range[0]), float(self.t_range[1])
        margin = 0.05 * (hi - lo) + 1e-6 * max(abs(lo), abs(hi), 1.0)
        t_min, t_max = float(t.min()), float(t.max())
        if t_min < lo - margin or t_max > hi + margin:
            self._warned = True
            warnings.warn(
                f"the quantized model was calibrated on states at t in [{lo:.4g}, {hi:.4g}] but is called at t={t_max:.4g}"
                f"{'' if t_min == t_max else f'..{t_min:.4g}'}: activation ranges move with t; calibrate on the "
                "sampler's own states (fewstep.accel.calibration_states with the same solver and steps)",
                stacklevel=3,
            )


def quantize(
    model: Callable,
    states: Sequence[tuple[torch.Tensor, torch.Tensor]],
    w_bits: int = 8,
    a_bits: int = 8,
    edge_bits: int | None = 8,
    ranges: str = "minmax",
    time_groups: int = 1,
    weights: str = "gptq",
) -> QuantizedModel:
    """`model` with every Conv2d and Linear of its backbone fake-quantized (weights w_bits, inputs a_bits), the
    activation ranges calibrated on `states` [(x, t), ...] (e.g. `calibration_states` of the sampler to be used).

    edge_bits: weight bits of the first and last convolution (the image input and output layers), which Q-Diffusion
    keeps at 8 bits; None = w_bits. On the digits UNet at W4A8 this moves FD from ~15x to ~1.3x the float model's.
    ranges: the activation ranges, "minmax" (the observed extremes) or "mse" (the clipping with the least
    quantization error on the calibration inputs, as Q-Diffusion's MSE-based range search). On digits_vp at A8 the
    extremes keep the samples: FD ratio to the float model (2,048 samples, DPM-Solver++(2M) 50 steps) W8A8 1.03x with
    "minmax" against 1.36x with "mse", W4A8 2.57x against 2.75x (`scripts/quant_time_groups.py`): clipping the rare
    large activations costs more than the resolution it buys at 8 bits.
    time_groups: activation ranges per layer, one per group of the calibration times (contiguous groups of about
    equal numbers of distinct times; 1: one range for all, as Q-Diffusion). Measured on digits_vp it does not pay
    (W8A8, minmax: 1.12x with 4 groups against 1.03x with one): fewer calibration inputs per range.
    weights: the weight rounding, "gptq" (GPTQ on the second moment of each layer's calibration inputs: the weights,
    too, are fitted to the sampler's states across its timesteps) or "minmax" (round to nearest). On digits_vp
    (2,048 samples, two noise seeds, `scripts/quant_time_groups.py --weights minmax,gptq`) W4A8 FD ratio to the
    float model: GPTQ calibrated on all timesteps 1.87x / 2.19x, on one mid timestep 2.29x / 2.93x; round to nearest
    2.57x / 2.89x (all) and 2.45x / 2.60x (one); at W8A8 both 1.03-1.04x.
    """
    _check_bits("w_bits", w_bits)
    _check_bits("a_bits", a_bits)
    edge_bits = w_bits if edge_bits is None else _check_bits("edge_bits", edge_bits)
    if ranges not in RANGES:
        raise ValueError(f"ranges={ranges!r} is not known; allowed values: {', '.join(RANGES)}")
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r} is not known; allowed values: {', '.join(WEIGHTS)}")
    if not states:
        raise ValueError("states must hold at least one calibration input (x, t): see fewstep.accel.calibration_states")
    if isinstance(time_groups, bool) or not isinstance(time_groups, int) or time_groups < 1:
        raise ValueError(f"time_groups must be an integer >= 1, got time_groups={time_groups!r}")
    times = torch.cat([torch.as_tensor(t, dtype=torch.float64).reshape(-1) for _, t in states])
    distinct = torch.unique(times)  # sorted
    if time_groups > distinct.numel():
        raise ValueError(f"time_groups={time_groups} exceeds the {distinct.numel()} distinct calibration times")
    cuts = [round(k * distinct.numel() / time_groups) for k in range(1, time_groups)]
    boundaries = torch.stack([(distinct[c - 1] + distinct[c]) / 2 for c in cuts]) if cuts else torch.zeros(0, dtype=torch.float64)
    net = model.net if isinstance(model, DiffusionModel) else model
    if not isinstance(net, nn.Module):
        raise TypeError(f"quantize needs a DiffusionModel or an nn.Module model(x, t), got {type(model).__name__}")
    qnet = _replace_layers(copy.deepcopy(net), w_bits, a_bits, time_groups, weights)
    qmodel = with_backbone(model, qnet)
    layers = [m for m in qnet.modules() if isinstance(m, QuantLayer)]
    if not layers:
        raise TypeError(f"{type(net).__name__} has no Conv2d or Linear layer to quantize")
    convs = [m for m in layers if isinstance(m.layer, nn.Conv2d)]
    for edge in convs[:1] + convs[-1:]:
        edge.set_weight_bits(edge_bits)
    quantized = QuantizedModel(qmodel, times, layers, boundaries)
    for layer in layers:
        layer.start()
    with torch.no_grad():
        for x, t in states:
            quantized.set_group(t)
            qmodel(x, t)
    for layer in layers:
        layer.finish(ranges)
    return quantized


def _replace_layers(net: nn.Module, w_bits: int, a_bits: int, groups: int, weights: str) -> nn.Module:
    """net with each Conv2d / Linear child (recursively) replaced by a QuantLayer, in place."""
    for name, child in net.named_children():
        if isinstance(child, (nn.Conv2d, nn.Linear)):
            setattr(net, name, QuantLayer(child, w_bits, a_bits, groups, weights))
        else:
            _replace_layers(child, w_bits, a_bits, groups, weights)
    return net


def _engines() -> list[str]:
    """The quantized CPU engines of this PyTorch build (fbgemm, x86, onednn, qnnpack)."""
    return [e for e in torch.backends.quantized.supported_engines if e != "none"]


def dynamic_int8(model: Callable) -> Callable:
    """`model` with the Linear layers of its backbone in real int8 (torch.ao dynamic quantization: int8 weights,
    activations quantized per call); a RuntimeError naming the alternative where no quantized engine exists."""
    if not _engines():
        raise RuntimeError("no quantized CPU engine (fbgemm/x86/qnnpack) in this PyTorch build: use quantize(...) (simulated)")
    from torch.ao.quantization import quantize_dynamic

    net = model.net if isinstance(model, DiffusionModel) else model
    if not isinstance(net, nn.Module):
        raise TypeError(f"dynamic_int8 needs a DiffusionModel or an nn.Module model(x, t), got {type(model).__name__}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
        qnet = quantize_dynamic(copy.deepcopy(net), {nn.Linear}, dtype=torch.qint8)
    return with_backbone(model, qnet)
