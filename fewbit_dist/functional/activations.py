"""Few-bit activations: exact forward, b-bit packed codes saved for backward.

Every activation is described by an `ActivationSpec`: the exact torch forward, what defines the codes (a
step table's borders, or an `encode` function for piecewise-linear ones), and the derivative level of each
code. One autograd function serves them all:

    forward:  y = f(x) (torch's own kernel, so values are identical to torch); save the codes packed at
              `bits` per element (the fewbit::encode_pack op, native where built): ceil(n*bits/8) bytes,
              nothing else of size n.
    backward: grad_x = levels[code] * grad_y (the fewbit::unpack_scale op), computed in fp32 for fp16/bf16
              (fp64 for fp64) and returned in grad_y's dtype.

Smooth functions use the L2-optimal table of `fewbit_dist.quant.table` (code = number of borders <= x,
compared in fp32, or fp64 for fp64 input; NaN gets code 0). Piecewise-linear ones need 1 bit and are exact:
their code is the same comparison torch's backward makes (NaN included), their levels the two slopes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .. import ops
from ..ops.native import encode_pack_chunked
from ..quant.tables import Table, canonical_params, function_for, table
from ..validation import check_bits, check_bool

__all__ = [
    "ActivationSpec", "smooth_spec", "custom_spec", "apply_activation", "DEFAULT_BITS",
    # smooth
    "gelu", "celu", "elu", "hardswish", "logsigmoid", "mish", "selu", "sigmoid", "silu", "softplus",
    "softsign", "tanh", "tanhshrink",
    # piecewise
    "relu", "leaky_relu", "threshold", "hardsigmoid", "hardtanh", "relu6", "hardshrink", "softshrink",
]

DEFAULT_BITS = 3


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(eq=False)
class ActivationSpec:
    """What one few-bit activation computes and saves.

    forward: the exact elementwise function (a torch function, or the forward of the module it replaces).
    encode:  input -> integer codes in [0, 2**bits), for codes that no table defines (piecewise functions).
    levels:  derivative value of each code (2**bits floats).
    table:   for smooth functions, the step table whose borders define the codes.
    """

    name: str
    bits: int
    forward: Callable[[torch.Tensor], torch.Tensor]
    encode: Callable[[torch.Tensor], torch.Tensor] | None  # None when `table` defines the codes
    levels: tuple[float, ...]
    table: Table | None = None
    _cache: dict = field(default_factory=dict, repr=False)  # (what, device, dtype) -> tensor

    def _tensor(self, what: str, values, device, dtype) -> torch.Tensor:
        if torch.compiler.is_compiling():  # a constant of the graph: filling the cache is a side effect dynamo refuses
            return torch.tensor(values, dtype=dtype, device=device)
        key = (what, device, dtype)
        t = self._cache.get(key)
        if t is None:  # dict.setdefault is atomic, so concurrent first calls agree on one tensor
            t = self._cache.setdefault(key, torch.tensor(values, dtype=dtype, device=device))
        return t

    def levels_tensor(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return self._tensor("levels", self.levels, device, dtype)

    def borders_tensor(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return self._tensor("borders", self.table.borders, device, dtype)


class _FewBitActivationFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, spec: ActivationSpec, inplace: bool):
        ctx.spec = spec
        ctx.shape = x.shape
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(_encode_and_pack(x, spec))
        with torch.no_grad():
            y = spec.forward(x)
        if inplace:
            x.copy_(y)
            ctx.mark_dirty(x)
            return x
        return y

    @staticmethod
    @once_differentiable  # the step derivative has no useful second derivative: refuse, loudly
    def backward(ctx, grad_out: torch.Tensor):
        (packed,) = ctx.saved_tensors
        spec: ActivationSpec = ctx.spec
        levels = spec.levels_tensor(grad_out.device, _opmath(grad_out.dtype))
        return ops.unpack_scale(packed, levels, grad_out, spec.bits).view(ctx.shape), None, None


def _encode_and_pack(x: torch.Tensor, spec: ActivationSpec) -> torch.Tensor:
    """Codes of x packed at spec.bits per element: the native op for tables, the reference otherwise."""
    if spec.table is not None:
        return ops.encode_pack(x, spec.borders_tensor(x.device, _opmath(x.dtype)), spec.bits)
    return encode_pack_chunked(x, spec.encode, spec.bits)


def _check_input(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: input must be a torch.Tensor, got {type(x).__name__}")


def apply_activation(x: torch.Tensor, spec: ActivationSpec, inplace: bool = False) -> torch.Tensor:
    """Run `spec` on `x`: exact forward, and a few-bit backward when autograd needs one."""
    _check_input(x, spec.name)
    check_bool(inplace, f"{spec.name}: inplace")
    if not (x.requires_grad and torch.is_grad_enabled()):
        # Nothing is saved without autograd: plain torch semantics (the in-place form writes x itself).
        if inplace:
            return x.copy_(spec.forward(x))
        return spec.forward(x)
    if not x.dtype.is_floating_point:
        raise TypeError(f"{spec.name}: only floating-point inputs have gradients, got {x.dtype}")
    return _FewBitActivationFn.apply(x, spec, inplace)


# ------------------------------------------------------------------------------------ spec builders

def _spec_from_table(name: str, fwd: Callable, tab: Table) -> ActivationSpec:
    return ActivationSpec(name=name, bits=tab.bits, forward=fwd, encode=None, levels=tab.levels, table=tab)


_spec_cache: dict = {}


def smooth_spec(name: str, bits: int = DEFAULT_BITS, **params) -> ActivationSpec:
    """Spec of a built-in smooth activation (cached: one per name, parameters and bits)."""
    check_bits(bits, f"{name}: bits")
    key = (name, canonical_params(name, params), bits)
    spec = _spec_cache.get(key)
    if spec is None:
        spec = _spec_from_table(name, function_for(name, **params), table(name, bits, **params))
        spec = _spec_cache.setdefault(key, spec)
    return spec


def custom_spec(name: str, forward: Callable[[torch.Tensor], torch.Tensor], bits: int = DEFAULT_BITS,
                derivative_of: Callable | None = None, **table_kwargs) -> ActivationSpec:
    """Spec of any elementwise function: `forward` runs as is; the table approximates its derivative
    (or that of `derivative_of`, when the forward cannot be differentiated in float64)."""
    check_bits(bits, f"{name}: bits")
    return _spec_from_table(name, forward, table(derivative_of or forward, bits, **table_kwargs))


def _piecewise(name, forward, encode, low, high) -> ActivationSpec:
    return ActivationSpec(name=name, bits=1, forward=forward,
                          encode=lambda x: encode(x).to(torch.uint8), levels=(float(low), float(high)))


def _number(value, arg, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: {arg} must be a number, got {type(value).__name__}")
    return value


def relu_spec() -> ActivationSpec:
    return _piecewise("relu", F.relu, lambda x: ~(x <= 0), 0.0, 1.0)


def leaky_relu_spec(negative_slope=0.01) -> ActivationSpec:
    s = _number(negative_slope, "negative_slope", "leaky_relu")
    return _piecewise("leaky_relu", lambda x: F.leaky_relu(x, s), lambda x: x > 0, s, 1.0)


def threshold_spec(threshold, value) -> ActivationSpec:
    t = _number(threshold, "threshold", "threshold")
    v = _number(value, "value", "threshold")
    return _piecewise("threshold", lambda x: F.threshold(x, t, v), lambda x: ~(x <= t), 0.0, 1.0)


def hardtanh_spec(min_val=-1.0, max_val=1.0) -> ActivationSpec:
    lo = _number(min_val, "min_val", "hardtanh")
    hi = _number(max_val, "max_val", "hardtanh")
    if hi < lo:
        raise ValueError(f"hardtanh: max_val ({hi}) must be >= min_val ({lo})")
    return _piecewise("hardtanh", lambda x: F.hardtanh(x, lo, hi), lambda x: ~((x <= lo) | (x >= hi)), 0.0, 1.0)


def relu6_spec() -> ActivationSpec:
    # torch computes relu6 as hardtanh(x, 0, 6), forward and backward.
    return _piecewise("relu6", F.relu6, lambda x: ~((x <= 0) | (x >= 6)), 0.0, 1.0)


# torch's CPU hardsigmoid backward multiplies by 1/6 rounded to fp32, for fp64 inputs too; so do we.
_ONE_SIXTH_FP32 = float(torch.tensor(1.0 / 6.0, dtype=torch.float32))


def hardsigmoid_spec() -> ActivationSpec:
    return _piecewise("hardsigmoid", F.hardsigmoid, lambda x: (x > -3) & (x < 3), 0.0, _ONE_SIXTH_FP32)


def shrink_spec(name, lambd) -> ActivationSpec:
    lam = _number(lambd, "lambd", name)
    if lam < 0:
        raise ValueError(f"{name}: lambd must be >= 0, got {lam}")
    fwd = getattr(F, name)
    return _piecewise(name, lambda x: fwd(x, lam), lambda x: ~((x >= -lam) & (x <= lam)), 0.0, 1.0)


# ------------------------------------------------------------------------------- functional API
# Names and parameters follow torch.nn.functional; smooth functions take keyword-only `bits`.

def gelu(input, approximate="none", *, bits=DEFAULT_BITS):
    return apply_activation(input, smooth_spec("gelu", bits, approximate=approximate))


def celu(input, alpha=1.0, inplace=False, *, bits=DEFAULT_BITS):
    return apply_activation(input, smooth_spec("celu", bits, alpha=alpha), inplace)


def elu(input, alpha=1.0, inplace=False, *, bits=DEFAULT_BITS):
    return apply_activation(input, smooth_spec("elu", bits, alpha=alpha), inplace)


def hardswish(input, inplace=False, *, bits=DEFAULT_BITS):
    return apply_activation(input, smooth_spec("hardswish", bits), inplace)


def logsigmoid(input, *, bits=DEFAULT_BITS):
    return apply_activation(input, smooth_spec("logsigmoid", bits))


def mish(input, inplace=False, *, bits=DEFAULT_BITS):
    return apply_activation(input, smooth_spec("mish", bits), inplace)


def selu(input, inplace=False, *, bits=DEFAULT_BITS):
    return apply_activation(input, smooth_spec("selu", bits), inplace)


def sigmoid(input, *, bits=DEFAULT_BITS):
    return apply_activation(input, smooth_spec("sigmoid", bits))


def silu(input, inplace=False, *, bits=DEFAULT_BITS):
    return apply_activation(input, smooth_spec("silu", bits), inplace)


def softplus(input, beta=1.0, threshold=20.0, *, bits=DEFAULT_BITS):
    return apply_activation(input, smooth_spec("softplus", bits, beta=beta, threshold=threshold))


def softsign(input, *, bits=DEFAULT_BITS):
    return apply_activation(input, smooth_spec("softsign", bits))


def tanh(input, *, bits=DEFAULT_BITS):
    return apply_activation(input, smooth_spec("tanh", bits))


def tanhshrink(input, *, bits=DEFAULT_BITS):
    return apply_activation(input, smooth_spec("tanhshrink", bits))


def relu(input, inplace=False):
    return apply_activation(input, relu_spec(), inplace)


def leaky_relu(input, negative_slope=0.01, inplace=False):
    return apply_activation(input, leaky_relu_spec(negative_slope), inplace)


def threshold(input, threshold, value, inplace=False):
    return apply_activation(input, threshold_spec(threshold, value), inplace)


def hardsigmoid(input, inplace=False):
    return apply_activation(input, hardsigmoid_spec(), inplace)


def hardtanh(input, min_val=-1.0, max_val=1.0, inplace=False):
    return apply_activation(input, hardtanh_spec(min_val, max_val), inplace)


def relu6(input, inplace=False):
    return apply_activation(input, relu6_spec(), inplace)


def hardshrink(input, lambd=0.5):
    return apply_activation(input, shrink_spec("hardshrink", lambd))


def softshrink(input, lambd=0.5):
    return apply_activation(input, shrink_spec("softshrink", lambd))
