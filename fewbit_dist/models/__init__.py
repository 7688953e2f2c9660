"""What `convert` knows of models: a registry of handlers, one per kind of module.

A `Handler` is a predicate plus a swap, tied to one section of FewBitConfig (its sub-config, see
`fewbit_dist.config.SECTIONS`):

- `enabled(layer)`: whether the handler applies under the settings `layer` (a FewBitConfig with the
  overrides for the module's path already applied);
- `swap(module, path, layer)`: the replacement module, the module itself changed in place, or None when the
  module is not of its kind;
- `claims(module, layer)`: names of children it takes over (a gated MLP's `act_fn`, which it computes
  itself), which other handlers then leave alone.

`convert` walks the tree children first and, at each module, runs the enabled handlers in registry order
until one swaps it. Adding a model family means registering a handler (`register`), not editing convert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from ..nn.activations import PIECEWISE_MODULES, SMOOTH_MODULES, FewBitActivation, FewBitModule
from ..nn.dropout import Dropout
from ..nn.linear import ExactLinear, LowBitLinear, RandomizedLinear
from ..util import convert_linear
from . import conv1d, decoder, layer_norm
from .hf import transformers_activation_spec

__all__ = ["Handler", "HANDLERS", "register", "handlers", "convert_activation"]


@dataclass(frozen=True)
class Handler:
    name: str
    section: str
    enabled: Callable
    swap: Callable[[nn.Module, str, object], Optional[nn.Module]]
    claims: Callable = lambda module, layer: ()


HANDLERS: list[Handler] = []


def register(handler: Handler, before: Optional[str] = None) -> Handler:
    """Add `handler` to the registry (at the end, or before the handler named `before`)."""
    if any(h.name == handler.name for h in HANDLERS):
        raise ValueError(f"a handler named {handler.name!r} is already registered")
    index = len(HANDLERS) if before is None else [h.name for h in HANDLERS].index(before)
    HANDLERS.insert(index, handler)
    return handler


def handlers() -> list[Handler]:
    return list(HANDLERS)


# ------------------------------------------------------------------------------------------ built-ins

def _ctor_kwargs(new_cls, old: nn.Module) -> dict:
    import inspect

    params = inspect.signature(new_cls.__init__).parameters
    return {name: getattr(old, name) for name in params if name not in ("self", "bits") and hasattr(old, name)}


def convert_activation(module: nn.Module, bits: int, convert_transformers: bool = True) -> nn.Module:
    """The few-bit replacement of one activation module, or `module` itself when it is not one we convert."""
    if isinstance(module, FewBitModule):
        return module
    cls = type(module)  # exact class: a user's subclass may override forward, so it is not ours to replace
    if cls in SMOOTH_MODULES:
        new_cls = SMOOTH_MODULES[cls]
        return new_cls(**_ctor_kwargs(new_cls, module), bits=bits)
    if cls in PIECEWISE_MODULES:
        new_cls = PIECEWISE_MODULES[cls]
        return new_cls(**_ctor_kwargs(new_cls, module))
    if convert_transformers:
        spec = transformers_activation_spec(module, bits)
        if spec is not None:
            return FewBitActivation(module, bits=bits, spec=spec, name=cls.__name__)
    return module


def _or_none(old, new):
    return None if new is old else new


def _activation(module, path, layer):
    return _or_none(module, convert_activation(module, layer.activation_bits, layer.convert_transformers))


def _linear(module, path, layer):
    if layer.low_bit_linear:
        return _or_none(module, convert_linear(module, LowBitLinear, **layer.lowbit_kwargs()))
    if layer.randomized_linear:
        return _or_none(module, convert_linear(module, RandomizedLinear, **layer.linear_kwargs()))
    return _or_none(module, convert_linear(module, ExactLinear))


def _conv1d(module, path, layer):
    if layer.low_bit_linear:
        ok = conv1d.convert_conv1d(module, "low_bit", **layer.lowbit_kwargs())
    elif layer.randomized_linear:
        ok = conv1d.convert_conv1d(module, "randomized", **layer.linear_kwargs())
    else:
        ok = conv1d.convert_conv1d(module, "exact")
    return module if ok else None


def _dropout(module, path, layer):
    if type(module) is not nn.Dropout:
        return None
    return Dropout(module.p, module.inplace)


def _norm(module, path, layer):
    args = (module, layer.norm_mode, layer.norm_bits, layer.linear_group_size, layer.linear_rounding)
    ok = decoder.convert_rms_norm(*args) or layer_norm.convert_layer_norm(*args)  # HF RMSNorm, nn.LayerNorm
    return module if ok else None


def _gated_mlp(module, path, layer):
    ok = decoder.convert_gated_mlp(module, layer.gated_mlp_mode, layer.gated_mlp_bits, layer.linear_group_size,
                                   layer.linear_rounding)
    return module if ok else None


def _causal_lm(module, path, layer):
    return module if decoder.convert_causal_lm(module, layer.loss_chunk_rows) else None


register(Handler("gated_mlp", "gated_mlp", lambda c: c.gated_mlp_mode is not None, _gated_mlp,
                 claims=lambda m, c: ("act_fn",) if decoder.is_gated_mlp(m) else ()))
register(Handler("activation", "activations", lambda c: c.activation_bits is not None, _activation))
register(Handler("linear", "linear",
                 lambda c: c.low_bit_linear or c.randomized_linear or c.exact_linear, _linear))
register(Handler("conv1d", "linear",  # GPT-2's transposed-weight projections
                 lambda c: c.low_bit_linear or c.randomized_linear or c.exact_linear, _conv1d))
register(Handler("dropout", "dropout", lambda c: c.compress_dropout, _dropout))
register(Handler("norm", "norms", lambda c: c.norm_mode is not None, _norm))
register(Handler("causal_lm_loss", "loss", lambda c: c.chunked_loss, _causal_lm))
