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

import torch
from torch.autograd.function import once_differentiable

from ..ops.native import encode_pack, unpack_scale
from ..validation import check_real

__all__ = ["dropout", "check_dropout_p", "draw_packed_mask"]


def check_dropout_p(p, name: str = "dropout probability p") -> float:
    """`p` as a float in [0, 1]: TypeError if it is not a number (a bool, a string), ValueError if outside."""
    return check_real(p, name, 0, 1)


def draw_packed_mask(like: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch's dropout noise for `like` (drawn as torch's CPU path draws it: same layout, same draws), as
    (noise scaled by 1 / (1 - p), the kept/dropped bits packed at 1 bit per element, levels) where
    levels = (0, the kept value) in the compute dtype: unpack_scale(packed, levels, g, 1) = g * noise."""
    keep = 1.0 - p
    noise = torch.empty_like(like).bernoulli_(keep)
    cdt = torch.float64 if like.dtype == torch.float64 else torch.float32
    packed = encode_pack(noise, torch.full((1,), 0.5, dtype=cdt, device=like.device), 1)
    noise.div_(keep)
    # the kept value computed by the same kernel as `noise` (a tensor divided by a scalar), widened exactly
    level = torch.ones(1, dtype=like.dtype, device=like.device).div_(keep).to(cdt)
    return noise, packed, torch.cat([torch.zeros_like(level), level])


class _DropoutFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p, inplace):
        noise, packed, levels = draw_packed_mask(x, p)
        ctx.save_for_backward(packed, levels)
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
