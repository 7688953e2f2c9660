"""nn.Linear drop-ins with a compressed saved input: RandomizedLinear (a sketch) and LowBitLinear (low-bit codes)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..functional.linear import exact_linear, projection_dim, randomized_linear
from ..functional.lowbit import DEFAULT_GROUP_SIZE, check_lowbit_args, low_bit_linear
from ..functional.sketch import DEFAULT_SKETCH, SKETCHES
from ..validation import check_choice, check_generator, check_optional_int, check_real

__all__ = ["RandomizedLinear", "LowBitLinear", "ExactLinear", "check_projection_args"]


def check_projection_args(proj_dim_ratio=None, proj_dim=None, proj_dim_min=None, proj_dim_max=None):
    """Validate the projection-size arguments; exactly one of proj_dim_ratio and proj_dim is required."""
    if (proj_dim_ratio is None) == (proj_dim is None):
        raise ValueError("give exactly one of proj_dim_ratio (a fraction of the rows, in (0, 1]) and proj_dim "
                         f"(a number of rows); got proj_dim_ratio={proj_dim_ratio!r}, proj_dim={proj_dim!r}")
    if proj_dim_ratio is not None:
        check_real(proj_dim_ratio, "proj_dim_ratio", 0, 1, lo_open=True)
    check_optional_int(proj_dim, "proj_dim", lo=1)
    lo = check_optional_int(proj_dim_min, "proj_dim_min", lo=1)
    hi = check_optional_int(proj_dim_max, "proj_dim_max", lo=1)
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"proj_dim_min ({lo}) must be <= proj_dim_max ({hi})")


class RandomizedLinear(nn.Linear):
    """Drop-in nn.Linear: exact forward, grad input and grad bias; grad weight from a k-row sketch.

    k = proj_dim, or ceil(proj_dim_ratio * B) for B input rows (the product of the leading dims), clamped to
    [proj_dim_min, proj_dim_max]; k >= B keeps the input itself (exact). `sketch`: 'count' (default),
    'rownorm', 'gaussian' or 'rademacher' (see fewbit_dist.functional.sketch). `generator`: where seeds
    come from (default: torch's CPU generator). Parameters and state_dict keys are those of nn.Linear.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 proj_dim_ratio: Optional[float] = None, proj_dim: Optional[int] = None,
                 proj_dim_min: Optional[int] = None, proj_dim_max: Optional[int] = None,
                 sketch: str = DEFAULT_SKETCH, generator: Optional[torch.Generator] = None):
        check_projection_args(proj_dim_ratio, proj_dim, proj_dim_min, proj_dim_max)
        check_choice(sketch, "sketch", (None, *sorted(SKETCHES)))
        check_generator(generator)
        super().__init__(in_features, out_features, bias, device, dtype)
        self.proj_dim_ratio, self.proj_dim = proj_dim_ratio, proj_dim
        self.proj_dim_min, self.proj_dim_max = proj_dim_min, proj_dim_max
        self.sketch, self.generator = sketch, generator

    def projection_dim(self, rows: int) -> int:
        return projection_dim(rows, self.proj_dim, self.proj_dim_ratio, self.proj_dim_min, self.proj_dim_max)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows = input.numel() // input.shape[-1] if input.dim() and input.shape[-1] else 0
        return randomized_linear(input, self.weight, self.bias, proj_dim=self.projection_dim(rows),
                                 sketch=self.sketch, generator=self.generator)

    def extra_repr(self) -> str:
        size = f"proj_dim={self.proj_dim}" if self.proj_dim is not None else f"proj_dim_ratio={self.proj_dim_ratio}"
        for name in ("proj_dim_min", "proj_dim_max"):
            if getattr(self, name) is not None:
                size += f", {name}={getattr(self, name)}"
        return f"{super().extra_repr()}, {size}, sketch={self.sketch!r}"


class LowBitLinear(nn.Linear):
    """Drop-in nn.Linear: exact forward, grad input and grad bias; grad weight from the input saved at `bits`.

    The input is saved as `bits`-bit codes (2..8) with a float32 (lo, scale) per group of `group_size` columns of a row, and grad W = g^T x_hat.
    rounding='stochastic' (default): E[x_hat] = x, grad W unbiased; 'nearest': lower error, biased. Layers
    reading one tensor (Q, K, V) share one quantized copy. See fewbit_dist.functional.lowbit.
    `generator`: where the rounding seeds come from (default: torch's CPU generator). Parameters and
    state_dict keys are those of nn.Linear.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 bits: int = 4, group_size: int = DEFAULT_GROUP_SIZE, rounding: str = "stochastic",
                 generator: Optional[torch.Generator] = None):
        check_lowbit_args(bits, group_size, rounding)
        check_generator(generator)
        super().__init__(in_features, out_features, bias, device, dtype)
        self.bits, self.group_size, self.rounding, self.generator = bits, group_size, rounding, generator

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return low_bit_linear(input, self.weight, self.bias, bits=self.bits, group_size=self.group_size,
                              rounding=self.rounding, generator=self.generator)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, bits={self.bits}, group_size={self.group_size}, "
                f"rounding={self.rounding!r}")


class ExactLinear(nn.Linear):
    """Drop-in nn.Linear with unchanged values and gradients that saves less: the Parameter instead of
    autocast's weight copy, and one copy of its input shared with the other layers reading the same tensor
    (or none, when a converted norm or gated MLP rebuilds that tensor exactly). See
    fewbit_dist.functional.linear.exact_linear. Parameters and state_dict keys are those of nn.Linear."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return exact_linear(input, self.weight, self.bias)
