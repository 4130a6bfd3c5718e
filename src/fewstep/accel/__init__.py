"""Cheaper network evaluations: feature caching (DeepCache; adaptive, TeaCache / First-Block-Cache style; both
optionally forecasting the cached feature, TaylorSeer style; Faster Diffusion's encoder propagation), compiled /
bf16 inference, the whole sampling loop as one compiled graph (`compile_sampler`), post-training quantization, and
T-Stitch (a small model for the early steps). Every method wraps a fewstep model `model(x, t)` and composes with every
solver, since it decides by the call's time t (and the adaptive cache by its input's change), never by counting
calls.
"""

from .adaptive import AdaptiveCache
from .cache import DeepCache, EncoderPropagation
from .compile import COMPILE_MODES, compile_model
from .flops import count_flops
from .forecast import newton_extrapolate
from .int8 import int8_kernels
from .loop import LinearPlan, compile_sampler
from .quant import QuantizedModel, calibration_states, dynamic_int8, quantize
from .refresh import REFRESH_RULES, refresh_indices, sampling_grid
from .stitch import Stitch

__all__ = [
    "COMPILE_MODES",
    "REFRESH_RULES",
    "AdaptiveCache",
    "DeepCache",
    "EncoderPropagation",
    "LinearPlan",
    "QuantizedModel",
    "Stitch",
    "calibration_states",
    "compile_model",
    "compile_sampler",
    "count_flops",
    "dynamic_int8",
    "int8_kernels",
    "newton_extrapolate",
    "quantize",
    "refresh_indices",
    "sampling_grid",
]
