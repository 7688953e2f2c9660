"""Low-bit linear layer: exact forward, grad input and grad bias; grad weight from a quantized saved input.

    y = x W^T + b                       exact
    grad_x = g W,  grad_b = sum_rows g  exact
    grad_W = g^T x_hat                  x_hat = lo + code * scale, E[x_hat] = x (stochastic rounding)

Forward saves x (flattened to [rows, cols]) quantized to `bits` (2..8) per element and packed at exactly that
width, plus a float32 (lo, scale) pair per group of `group_size` consecutive columns of a row: each group's
codes span [min, max] of the group in 2**bits - 1 steps. With rounding='stochastic' a code rounds up with
probability equal to the fractional part, so x_hat is unbiased and grad_W is an unbiased estimate;
rounding='nearest' has half the variance's worth of error but is biased. Saved bytes:
ceil(rows * cols * bits / 8) + 8 * rows * ceil(cols / group_size).

Noise. Stochastic rounding takes its uniforms from a counter-based hash of (seed, element index) inside the
one-pass quantizer (fewbit_dist.ops.native.quantize_groups): no noise tensor exists. The seed is drawn (like
RandomizedLinear's, see linear.draw_seed) from torch's RNG on every call, with or without grad, so runs are
reproducible under torch.manual_seed and activation checkpointing replays the same RNG stream.

Sharing. Several layers often read one tensor, one after the other (the Q, K and V projections of
attention). The quantized input goes into the small cache of fewbit_dist.functional.shared_input, so
those layers save one packed copy between them instead of one each; an in-place change of the tensor (its
version counter), another tensor, or a different bits/group_size/rounding makes a new one. A layer also
takes the saved form its input's producer offers (a converted norm or gated MLP), exact or lossy. The
quantized tensor is the one the layer reads, before any autocast cast, so under torch.autocast Q/K/V still
share one copy; the Parameter, not autocast's weight copy, is saved and recast in backward.

Quantization math runs in float32 for every input dtype (fp64 inputs too); non-finite inputs give
non-finite group ranges and a meaningless grad_W, as they would for nn.Linear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ..ops.native import quantize_groups, unpack_dequantize
from ..validation import check_bits, check_choice, check_int
from . import shared_input
from .linear import apply_linear_function, draw_seed, linear_forward, save_shared_input, shared_input_linear_backward

__all__ = ["low_bit_linear", "quantize_input", "dequantize_input", "QuantizedInput", "group_ranges",
           "check_lowbit_args", "ROUNDINGS", "DEFAULT_GROUP_SIZE"]

ROUNDINGS = ("stochastic", "nearest")
DEFAULT_GROUP_SIZE = 128


def check_lowbit_args(bits, group_size, rounding, names=("bits", "group_size", "rounding")) -> None:
    """Validate LowBitLinear's settings with errors that name the argument (`names`: how the caller calls them):
    bits an int in 2..8 (per saved input element), group_size a positive int (columns per scale), rounding
    one of ROUNDINGS. TypeError for a wrong type, ValueError for a wrong value (fewbit_dist.validation)."""
    check_bits(bits, names[0], 2, 8)
    check_int(group_size, names[1], lo=1)
    check_choice(rounding, names[2], ROUNDINGS)


def group_ranges(x2: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, scale), float32 [rows, ceil(cols / group_size)]: each group's minimum and the step that spans its
    range in 2**bits - 1 steps, rounded up by one ulp so the maximum stays inside; 1 for a constant group
    (all codes 0 decode to lo exactly)."""
    rows, cols = x2.shape
    full = cols // group_size * group_size
    parts = []
    if full:
        parts.append(torch.aminmax(x2[:, :full].view(rows, full // group_size, group_size), dim=-1))
    if full < cols:
        lo_t, hi_t = torch.aminmax(x2[:, full:], dim=-1)
        parts.append((lo_t[:, None], hi_t[:, None]))
    lo = torch.cat([p[0] for p in parts], 1).float() if parts else x2.new_empty(rows, 0, dtype=torch.float32)
    hi = torch.cat([p[1] for p in parts], 1).float() if parts else lo
    step = torch.nextafter((hi - lo) / ((1 << bits) - 1), torch.tensor(math.inf, device=lo.device))
    scale = torch.where(hi > lo, step, torch.ones_like(step))
    return lo, scale


@dataclass(eq=False)
class QuantizedInput(shared_input.SavedInput):
    """A [rows, cols] input quantized for backward: packed codes plus float32 per-group lo and scale."""

    packed: torch.Tensor
    lo: torch.Tensor
    scale: torch.Tensor
    bits: int
    group_size: int
    cols: int
    exact = False

    def tensors(self):
        return (self.packed, self.lo, self.scale)

    def restorer(self):
        return QuantizedRestorer(self.bits, self.cols, self.group_size)


class QuantizedRestorer:
    """Rebuilds a QuantizedInput from its saved (packed, lo, scale): whole (`restorer(tensors, dtype)`) or rows
    r0:r1 only (`restorer.rows(tensors, dtype, r0, r1)`, r0 a multiple of 8: the packed stream's rows start on
    a byte boundary every eight rows). Holds no tensor."""

    __slots__ = ("bits", "cols", "group_size")

    def __init__(self, bits: int, cols: int, group_size: int):
        self.bits, self.cols, self.group_size = bits, cols, group_size

    def __call__(self, tensors, dtype):
        packed, lo, scale = tensors
        return unpack_dequantize(packed, lo, scale, self.bits, self.cols, self.group_size, dtype)

    def rows(self, tensors, dtype, r0: int, r1: int):
        if r0 % 8:
            raise ValueError(f"r0 must be a multiple of 8, got {r0}")
        packed, lo, scale = tensors
        b0 = r0 * self.cols * self.bits // 8
        nbytes = -(-(r1 - r0) * self.cols * self.bits // 8)
        return unpack_dequantize(packed[b0:b0 + nbytes], lo[r0:r1], scale[r0:r1], self.bits, self.cols,
                                 self.group_size, dtype)


def quantize_input(x2: torch.Tensor, bits: int, group_size: int, rounding: str = "stochastic",
                   seed: Optional[int] = None) -> QuantizedInput:
    """Quantize a 2-D input (see the module docstring). `seed` is required for stochastic rounding."""
    check_lowbit_args(bits, group_size, rounding)
    if x2.dim() != 2:
        raise ValueError(f"x2 must be 2-D [rows, cols], got shape {tuple(x2.shape)}")
    if rounding == "stochastic" and seed is None:
        raise ValueError("stochastic rounding needs a seed")
    if rounding == "nearest":
        seed_t = None
    elif isinstance(seed, torch.Tensor):
        seed_t = seed.reshape(1).to(torch.int64)
    else:
        seed_t = torch.tensor([seed], dtype=torch.int64)
    # One pass: group ranges, counter-based uniforms (no noise tensor), quantize and pack.
    packed, lo, scale = quantize_groups(x2.detach(), bits, group_size, seed_t)
    cols = x2.shape[1]
    return QuantizedInput(packed, lo, scale, bits, group_size, cols)


def dequantize_input(q: QuantizedInput, dtype: torch.dtype) -> torch.Tensor:
    """x_hat = lo + code * scale as a [rows, cols] tensor of `dtype`."""
    return unpack_dequantize(q.packed, q.lo, q.scale, q.bits, q.cols, q.group_size, dtype)


class _LowBitLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dtype, bits, group_size, rounding, seed):
        y = linear_forward(ctx, x, weight, bias, dtype)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        if not ctx.needs_input_grad[1]:  # no weight gradient: keep only what grad_x needs
            ctx.share_key = None
            ctx.save_for_backward(weight)
            return y
        # Quantize the tensor the layer reads (before any autocast cast), once for all its readers.
        tag = (bits, group_size, rounding)
        key, saved = shared_input.take(x, exact=False, tag=tag)
        if saved is None:
            saved = quantize_input(x.detach().reshape(-1, x.shape[-1]), bits, group_size, rounding, seed)
            key = shared_input.offer(x, saved, tag=tag)
        save_shared_input(ctx, weight, key, saved)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        return (*shared_input_linear_backward(ctx, grad_out), None, None, None, None, None)


def low_bit_linear(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *, bits: int = 4,
                   group_size: int = DEFAULT_GROUP_SIZE, rounding: str = "stochastic",
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """F.linear that saves its input at `bits` per element (see the module docstring).

    Under torch.autocast the operands are cast to the autocast dtype first, as autocast does for F.linear.
    """
    check_lowbit_args(bits, group_size, rounding)
    # Always draw (with or without grad, whatever the rounding), so the RNG stream after this layer does not
    # depend on the grad mode or the settings: reentrant checkpointing replays it.
    seed = draw_seed(generator)
    return apply_linear_function(_LowBitLinearFn, input, weight, bias, bits, group_size, rounding, seed)
