"""Hugging Face transformers: which of its activation modules convert, and to which derivative table.

Recognized by class (defined in `transformers.activations`), so nothing here imports transformers. The
converted module runs the original module's own forward, so outputs stay bit-identical (NewGELU's
hand-written tanh formula included); only the saved state and backward change.

- GELUActivation (erf GELU)                         -> the "gelu" table
- GELUTanh, NewGELUActivation, FastGELUActivation,
  AccurateGELUActivation (tanh GELU formulas)       -> the "gelu" approximate="tanh" table
- SiLUActivation                                    -> the "silu" table
- MishActivation                                    -> the "mish" table
- QuickGELUActivation (x * sigmoid(1.702 x)),
  ClippedGELUActivation (gelu clipped to [min, max]) -> a table computed for that exact function, cached

Others (ReLUSquared, Laplace, Linear, XIELU with learned parameters, ...) are left alone: their derivative
is unbounded, trivial or trainable.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..functional.activations import ActivationSpec, custom_spec, smooth_spec

__all__ = ["is_transformers_activation", "transformers_activation_spec", "SUPPORTED"]

_MODULE = "transformers.activations"

_NAMED = {
    "GELUActivation": ("gelu", {}),
    "GELUTanh": ("gelu", {"approximate": "tanh"}),
    "PytorchGELUTanh": ("gelu", {"approximate": "tanh"}),
    "NewGELUActivation": ("gelu", {"approximate": "tanh"}),
    "FastGELUActivation": ("gelu", {"approximate": "tanh"}),
    "AccurateGELUActivation": ("gelu", {"approximate": "tanh"}),
    "SiLUActivation": ("silu", {}),
    "MishActivation": ("mish", {}),
}


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _clipped_gelu(lo: float, hi: float):
    def fn(x):
        return torch.clip(torch.nn.functional.gelu(x), lo, hi)
    return fn


SUPPORTED = tuple(_NAMED) + ("QuickGELUActivation", "ClippedGELUActivation")
_custom_cache: dict = {}


def is_transformers_activation(module: nn.Module) -> bool:
    return type(module).__module__ == _MODULE and type(module).__name__ in SUPPORTED


def transformers_activation_spec(module: nn.Module, bits: int) -> Optional[ActivationSpec]:
    """The spec for a supported transformers activation, whose forward is the module's own forward."""
    if not is_transformers_activation(module):
        return None
    cls = type(module).__name__
    if cls in _NAMED:
        name, params = _NAMED[cls]
        base = smooth_spec(name, bits, **params)
        return ActivationSpec(name=cls, bits=bits, forward=module.forward, encode=base.encode,
                              levels=base.levels, table=base.table)
    if cls == "QuickGELUActivation":
        key, fn = (cls, bits), _quick_gelu
    else:  # ClippedGELUActivation
        lo, hi = float(module.min), float(module.max)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return None
        key, fn = (cls, lo, hi, bits), _clipped_gelu(lo, hi)
    base = _custom_cache.get(key)
    if base is None:
        base = _custom_cache.setdefault(key, custom_spec(cls, fn, bits))
    return ActivationSpec(name=cls, bits=bits, forward=module.forward, encode=base.encode,
                          levels=base.levels, table=base.table)
