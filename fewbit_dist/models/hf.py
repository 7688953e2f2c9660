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

__all__ = ["is_transformers_activation", "transformers_activation_spec", "SUPPORTED", "FEWBIT_ATTENTION",
           "use_fewbit_attention"]

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


# ------------------------------------------------------------------------------------------------ attention

FEWBIT_ATTENTION = "fewbit_sdpa"
"""The attention implementation `convert(..., compress_dropout=True)` gives a Hugging Face model that uses
"sdpa": transformers' own sdpa_attention_forward (its masks, GQA and causal handling), except that a call
with dropout on a non-CUDA device from a module marked `fewbit_compress_dropout` runs
fewbit_dist.functional.attention.scaled_dot_product_attention (q, k, v and a 1-bit mask saved)."""


class _RouteSDPA(torch.overrides.TorchFunctionMode):
    """Within one attention call: torch's scaled_dot_product_attention -> sdpa_or_fewbit."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            from ..functional.attention import sdpa_or_fewbit

            return sdpa_or_fewbit(*args, **kwargs)
        return func(*args, **kwargs)


def _fewbit_sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if dropout > 0.0 and getattr(module, "fewbit_compress_dropout", False) and query.device.type != "cuda":
        with _RouteSDPA():
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, **kwargs)


def use_fewbit_attention(model: nn.Module) -> Optional[str]:
    """Switch a Hugging Face model that uses "sdpa" attention to FEWBIT_ATTENTION. Returns the previous
    implementation when switched, else None (not a transformers model, another implementation such as eager
    or flash attention, or a model that cannot switch at run time)."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl == FEWBIT_ATTENTION:
        return impl
    if impl != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return None
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FEWBIT_ATTENTION, _fewbit_sdpa_attention_forward)
    AttentionMaskInterface.register(FEWBIT_ATTENTION, sdpa_mask)  # the masks sdpa gets, unchanged
    model.set_attn_implementation(FEWBIT_ATTENTION)
    return impl if config._attn_implementation == FEWBIT_ATTENTION else None
