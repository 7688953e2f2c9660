"""nn.Module drop-ins for the few-bit activations.

Each class subclasses its torch.nn counterpart, so constructor arguments, attributes (`approximate`,
`alpha`, `inplace`, ...), `extra_repr` and `isinstance(m, torch.nn.GELU)` all keep working; only `forward`
changes: exact values, few-bit saved state. Smooth ones take keyword-only `bits` (1..8, default 3);
piecewise-linear ones are exact at 1 bit and take no `bits`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..functional import activations as FA
from ..functional.activations import DEFAULT_BITS, ActivationSpec, apply_activation
from ..validation import check_bits, check_callable

__all__ = [
    "FewBitModule", "FewBitActivation",
    "GELU", "CELU", "ELU", "Hardswish", "LogSigmoid", "Mish", "SELU", "Sigmoid", "SiLU", "Softplus",
    "Softsign", "Tanh", "Tanhshrink",
    "ReLU", "LeakyReLU", "Threshold", "Hardsigmoid", "Hardtanh", "ReLU6", "Hardshrink", "Softshrink",
    "SMOOTH_MODULES", "PIECEWISE_MODULES",
]


class FewBitModule:
    """Mixin: forward = apply_activation(input, self.spec(), inplace). Subclasses define `spec()`."""

    bits: int

    def spec(self) -> ActivationSpec:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return apply_activation(input, self.spec(), getattr(self, "inplace", False))


class _Smooth(FewBitModule):
    _name: str
    _params: tuple[str, ...] = ()

    def _init_bits(self, bits):
        check_bits(bits, f"{type(self).__name__}: bits")
        self.bits = bits
        self.spec()  # validate the parameters now rather than at the first forward

    def spec(self) -> ActivationSpec:
        params = {p: getattr(self, p) for p in self._params}
        return FA.smooth_spec(self._name, self.bits, **params)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        return f"{base}, bits={self.bits}" if base else f"bits={self.bits}"


class _Piecewise(FewBitModule):
    bits = 1

    def extra_repr(self) -> str:
        base = super().extra_repr()
        return f"{base}, bits=1" if base else "bits=1"


# ------------------------------------------------------------------------------------------- smooth

class GELU(_Smooth, nn.GELU):
    _name, _params = "gelu", ("approximate",)

    def __init__(self, approximate: str = "none", *, bits: int = DEFAULT_BITS):
        nn.GELU.__init__(self, approximate)
        self._init_bits(bits)


class CELU(_Smooth, nn.CELU):
    _name, _params = "celu", ("alpha",)

    def __init__(self, alpha: float = 1.0, inplace: bool = False, *, bits: int = DEFAULT_BITS):
        nn.CELU.__init__(self, alpha, inplace)
        self._init_bits(bits)


class ELU(_Smooth, nn.ELU):
    _name, _params = "elu", ("alpha",)

    def __init__(self, alpha: float = 1.0, inplace: bool = False, *, bits: int = DEFAULT_BITS):
        nn.ELU.__init__(self, alpha, inplace)
        self._init_bits(bits)


class Hardswish(_Smooth, nn.Hardswish):
    _name = "hardswish"

    def __init__(self, inplace: bool = False, *, bits: int = DEFAULT_BITS):
        nn.Hardswish.__init__(self, inplace)
        self._init_bits(bits)


class LogSigmoid(_Smooth, nn.LogSigmoid):
    _name = "logsigmoid"

    def __init__(self, *, bits: int = DEFAULT_BITS):
        nn.LogSigmoid.__init__(self)
        self._init_bits(bits)


class Mish(_Smooth, nn.Mish):
    _name = "mish"

    def __init__(self, inplace: bool = False, *, bits: int = DEFAULT_BITS):
        nn.Mish.__init__(self, inplace)
        self._init_bits(bits)


class SELU(_Smooth, nn.SELU):
    _name = "selu"

    def __init__(self, inplace: bool = False, *, bits: int = DEFAULT_BITS):
        nn.SELU.__init__(self, inplace)
        self._init_bits(bits)


class Sigmoid(_Smooth, nn.Sigmoid):
    _name = "sigmoid"

    def __init__(self, *, bits: int = DEFAULT_BITS):
        nn.Sigmoid.__init__(self)
        self._init_bits(bits)


class SiLU(_Smooth, nn.SiLU):
    _name = "silu"

    def __init__(self, inplace: bool = False, *, bits: int = DEFAULT_BITS):
        nn.SiLU.__init__(self, inplace)
        self._init_bits(bits)


class Softplus(_Smooth, nn.Softplus):
    _name, _params = "softplus", ("beta", "threshold")

    def __init__(self, beta: float = 1.0, threshold: float = 20.0, *, bits: int = DEFAULT_BITS):
        nn.Softplus.__init__(self, beta, threshold)
        self._init_bits(bits)


class Softsign(_Smooth, nn.Softsign):
    _name = "softsign"

    def __init__(self, *, bits: int = DEFAULT_BITS):
        nn.Softsign.__init__(self)
        self._init_bits(bits)


class Tanh(_Smooth, nn.Tanh):
    _name = "tanh"

    def __init__(self, *, bits: int = DEFAULT_BITS):
        nn.Tanh.__init__(self)
        self._init_bits(bits)


class Tanhshrink(_Smooth, nn.Tanhshrink):
    _name = "tanhshrink"

    def __init__(self, *, bits: int = DEFAULT_BITS):
        nn.Tanhshrink.__init__(self)
        self._init_bits(bits)


# ---------------------------------------------------------------------------------------- piecewise

class ReLU(_Piecewise, nn.ReLU):
    def __init__(self, inplace: bool = False):
        nn.ReLU.__init__(self, inplace)

    def spec(self):
        return FA.relu_spec()


class LeakyReLU(_Piecewise, nn.LeakyReLU):
    def __init__(self, negative_slope: float = 0.01, inplace: bool = False):
        nn.LeakyReLU.__init__(self, negative_slope, inplace)
        self.spec()

    def spec(self):
        return FA.leaky_relu_spec(self.negative_slope)


class Threshold(_Piecewise, nn.Threshold):
    def __init__(self, threshold: float, value: float, inplace: bool = False):
        nn.Threshold.__init__(self, threshold, value, inplace)
        self.spec()

    def spec(self):
        return FA.threshold_spec(self.threshold, self.value)


class Hardsigmoid(_Piecewise, nn.Hardsigmoid):
    def __init__(self, inplace: bool = False):
        nn.Hardsigmoid.__init__(self, inplace)

    def spec(self):
        return FA.hardsigmoid_spec()


class Hardtanh(_Piecewise, nn.Hardtanh):
    def __init__(self, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False,
                 min_value: float | None = None, max_value: float | None = None):
        # Check before torch does (it asserts), so a bad range is a ValueError naming the arguments.
        FA.hardtanh_spec(min_val if min_value is None else min_value, max_val if max_value is None else max_value)
        nn.Hardtanh.__init__(self, min_val, max_val, inplace, min_value, max_value)

    def spec(self):
        return FA.hardtanh_spec(self.min_val, self.max_val)


class ReLU6(_Piecewise, nn.ReLU6):
    def __init__(self, inplace: bool = False):
        nn.ReLU6.__init__(self, inplace)

    def spec(self):
        return FA.relu6_spec()


class Hardshrink(_Piecewise, nn.Hardshrink):
    def __init__(self, lambd: float = 0.5):
        nn.Hardshrink.__init__(self, lambd)
        self.spec()

    def spec(self):
        return FA.shrink_spec("hardshrink", self.lambd)


class Softshrink(_Piecewise, nn.Softshrink):
    def __init__(self, lambd: float = 0.5):
        nn.Softshrink.__init__(self, lambd)
        self.spec()

    def spec(self):
        return FA.shrink_spec("softshrink", self.lambd)


# ------------------------------------------------------------------------------------------ generic

class FewBitActivation(FewBitModule, nn.Module):
    """Few-bit version of any elementwise activation given as a callable (or a module to replace).

    The forward runs `source` itself, so values are bit-identical to it; backward uses the optimal `bits`-bit
    table of its derivative. `spec` may be given directly (a precomputed ActivationSpec), otherwise the table
    is computed from `source` in float64 (it must be differentiable by torch.autograd).
    """

    def __init__(self, source: Callable[[torch.Tensor], torch.Tensor], *, bits: int = DEFAULT_BITS,
                 spec: ActivationSpec | None = None, name: str | None = None):
        super().__init__()
        check_callable(source, "source")
        check_bits(bits, "FewBitActivation: bits")
        if spec is not None and spec.bits != bits:
            raise ValueError(f"spec has {spec.bits} bits but bits={bits}")
        self.bits = bits
        self.name = name or getattr(source, "__name__", None) or type(source).__name__
        # Kept out of the module tree on purpose: the replaced module has no state, and registering it
        # would add a child (and possibly state_dict keys) that the original model does not have.
        self.__dict__["source"] = source
        self._spec = spec or FA.custom_spec(self.name, self._forward_source, bits, derivative_of=source)

    def _forward_source(self, x):
        return self.__dict__["source"](x)

    def spec(self) -> ActivationSpec:
        return self._spec

    def extra_repr(self) -> str:
        return f"{self.name}, bits={self.bits}"


SMOOTH_MODULES = {nn.GELU: GELU, nn.CELU: CELU, nn.ELU: ELU, nn.Hardswish: Hardswish, nn.LogSigmoid: LogSigmoid,
                  nn.Mish: Mish, nn.SELU: SELU, nn.Sigmoid: Sigmoid, nn.SiLU: SiLU, nn.Softplus: Softplus,
                  nn.Softsign: Softsign, nn.Tanh: Tanh, nn.Tanhshrink: Tanhshrink}
PIECEWISE_MODULES = {nn.ReLU: ReLU, nn.LeakyReLU: LeakyReLU, nn.Threshold: Threshold, nn.Hardsigmoid: Hardsigmoid,
                     nn.Hardtanh: Hardtanh, nn.ReLU6: ReLU6, nn.Hardshrink: Hardshrink, nn.Softshrink: Softshrink}
