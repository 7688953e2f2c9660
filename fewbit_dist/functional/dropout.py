"""Dropout that saves its mask as one bit per element.

torch's dropout saves, for backward, its mask as one byte per element (the fused CUDA kernel) or the whole
scaled noise tensor in the input's dtype (the CPU path: 4 bytes per element in fp32). Here the mask is
drawn exactly as torch's CPU path draws it (`empty_like(x).bernoulli_(1 - p)`, then divided by 1 - p), so on
the CPU the output equals nn.Dropout's bit for bit under the same RNG state (on CUDA torch uses a fused
kernel with its own random stream: the same distribution, other draws). Saved: ceil(n / 8) bytes, the
packed kept/dropped bits (fewbit::encode_pack with one border); backward is levels[bit] * grad with
levels = (0, 1 / (1 - p)) (fewbit::unpack_scale), exactly torch's grad * noise.

p == 0, eval mode or an empty input return the input itself, p == 1 returns input * 0, as torch does.
"""

from __future__ import annotations

import numbers

import torch
from torch.autograd.function import once_differentiable

from ..ops.native import encode_pack, unpack_scale

__all__ = ["dropout", "check_dropout_p"]


def check_dropout_p(p) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"dropout probability p must be a number in [0, 1], got {p!r}")
    return float(p)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _DropoutFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p, inplace):
        keep = 1.0 - p
        noise = torch.empty_like(x).bernoulli_(keep)  # as torch: same layout, same draws
        cdt = _compute_dtype(x.dtype)
        packed = encode_pack(noise, torch.full((1,), 0.5, dtype=cdt, device=x.device), 1)
        noise.div_(keep)
        # the kept value computed by the same kernel as `noise` (a tensor divided by a scalar), widened exactly
        scale = torch.ones(1, dtype=x.dtype, device=x.device).div_(keep).to(cdt)
        ctx.save_for_backward(packed, torch.cat([torch.zeros_like(scale), scale]))
        if inplace:
            ctx.mark_dirty(x)
            return x.mul_(noise)
        return x * noise

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        packed, levels = ctx.saved_tensors
        return unpack_scale(packed, levels, grad_out.contiguous(), 1), None, None


def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """torch.nn.functional.dropout with a 1-bit saved mask (see the module docstring)."""
    p = check_dropout_p(p)
    if not input.is_floating_point():
        raise TypeError(f"dropout needs a floating-point input, got {input.dtype}")
    if p == 0.0 or not training or input.numel() == 0:
        return input
    if p == 1.0:
        return input.mul_(0.0) if inplace else input * 0.0
    if not (torch.is_grad_enabled() and input.requires_grad):
        noise = torch.empty_like(input).bernoulli_(1.0 - p).div_(1.0 - p)
        return input.mul_(noise) if inplace else input * noise
    return _DropoutFn.apply(input, p, inplace)
