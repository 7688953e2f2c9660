"""GPT-2's projections: transformers' `Conv1D`, a linear layer whose weight is stored transposed.

`Conv1D(nf, nx)` computes `x @ weight + bias` with `weight` of shape (nx, nf) = (in, out), through
`torch.addmm`. It is not an `nn.Linear`, so the linear handler leaves it alone. Here the module stays what it
is (class, parameters, state_dict keys and shapes, hooks) and gets a new forward on the instance that calls
the configured linear method on `weight.t()`, a view of the same Parameter: the forward computes the same
product, and autograd transposes the weight gradient back onto the Parameter.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..functional.linear import exact_linear, projection_dim, randomized_linear
from ..functional.lowbit import low_bit_linear
from .decoder import set_forward

__all__ = ["is_conv1d", "convert_conv1d"]


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2, GPT, and the models built on its layers)."""
    cls = type(module)
    if cls.__name__ != "Conv1D" or not cls.__module__.startswith("transformers"):
        return False
    weight = getattr(module, "weight", None)
    return (isinstance(weight, nn.Parameter) and weight.dim() == 2
            and tuple(weight.shape) == (getattr(module, "nx", None), getattr(module, "nf", None)))


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.__dict__["_fewbit_conv1d"](x, self.weight.t(), self.bias)


def _randomized(x, weight, bias, *, proj_dim_ratio, proj_dim, proj_dim_min, proj_dim_max, sketch):
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    k = projection_dim(rows, proj_dim, proj_dim_ratio, proj_dim_min, proj_dim_max)
    return randomized_linear(x, weight, bias, proj_dim=k, sketch=sketch)


def convert_conv1d(module: nn.Module, method: str, **kwargs) -> bool:
    """Give a Conv1D the linear `method` ('exact', 'low_bit' with `bits`/`group_size`/`rounding`, or
    'randomized' with the RandomizedLinear sizing keywords). False if `module` is not a Conv1D."""
    if not is_conv1d(module):
        return False
    if method == "exact":
        if kwargs:
            raise TypeError(f"the exact method takes no options, got {sorted(kwargs)}")
        fn = exact_linear
    elif method == "low_bit":
        fn = functools.partial(low_bit_linear, **kwargs)
    elif method == "randomized":
        fn = functools.partial(_randomized, **kwargs)
    else:
        raise ValueError(f"method must be 'exact', 'low_bit' or 'randomized', got {method!r}")
    module.__dict__["_fewbit_conv1d"] = fn
    set_forward(module, _forward)
    return True
