"""RMSNorm that saves its input once (exact) or its normalized input at a few bits (compressed).

Hugging Face's RMSNorm (Llama, Qwen2, Qwen3, Mistral; "llama" style) computes in float32:

    h = x.float() * rsqrt(mean(x.float()^2) + eps)         y = weight * h.to(x.dtype)

and Gemma's ("gemma" style) `y = (h * (1 + weight.float())).type_as(x)`. Left to autograd it keeps the
float32 upcast of x *and* h (8 bytes per element for a float32 or bfloat16 residual stream). Here the forward
runs the same operations in the same order (values bit-identical to the module's), and backward uses

    grad_h = grad_y * w'  (rounded as autograd rounds it)       w' = weight, or 1 + weight (gemma)
    grad_x = rstd * (grad_h - h * mean(grad_h * h))              grad_w = sum over rows of grad_y * h'

(h' = h.to(x.dtype) for llama, h for gemma). Modes:
- "exact": saves x (in its own dtype) and rstd (float32, one per row). It also offers the layers that read y
  (Q/K/V, gate/up) a recipe that rebuilds y bit for bit from x, rstd and a copy of the weight, so converted
  linear layers reading y save nothing of their own (fewbit_dist.functional.shared_input).
- "compressed": saves h quantized to `bits` (LowBitLinear's group quantizer, stochastic rounding by default)
  and rstd; the linear layers reading y share those codes (y is rebuilt as w' * h_hat). Gradients are then
  estimates, like LowBitLinear's.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ..validation import check_choice, check_generator, check_real, check_tensor
from . import shared_input
from .linear import draw_seed
from .lowbit import check_lowbit_args, quantize_input

__all__ = ["rms_norm", "NORM_MODES", "RMS_STYLES"]

NORM_MODES = ("exact", "compressed")
RMS_STYLES = ("llama", "gemma")


def _normalize(x: torch.Tensor, eps: float):
    xf = x.to(torch.float32)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf * rstd, rstd


def _scale(h: torch.Tensor, weight: torch.Tensor, style: str, x_dtype: torch.dtype) -> torch.Tensor:
    """The module's output from h, operation for operation as the module computes it."""
    if style == "llama":
        return weight * h.to(x_dtype)
    return (h * (1.0 + weight.float())).type_as(torch.empty((), dtype=x_dtype))


def _rebuild_output(h_parts, weight, *, style, x_dtype, rebuild_h, dtype):
    y = _scale(rebuild_h(*h_parts), weight, style, x_dtype)
    return y if y.dtype == dtype else y.to(dtype)


def _h_exact(x, rstd):
    return x.to(torch.float32) * rstd


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, style, mode, bits, group_size, rounding, seed):
        h, rstd = _normalize(x, eps)
        y = _scale(h, weight, style, x.dtype)
        ctx.style, ctx.mode, ctx.x_dtype, ctx.shape = style, mode, x.dtype, x.shape
        ctx.w_dtype = weight.dtype
        w_copy = weight.detach().clone()  # d floats: the readers' recipe must not depend on ZeRO-3 gathering
        if mode == "exact":
            ctx.save_for_backward(weight, x, rstd)
            saved = shared_input.RecomputedInput(
                (x, rstd, w_copy), _ExactRecipe(style, x.dtype), exact=True)
        else:
            q = quantize_input(h.reshape(-1, h.shape[-1]), bits, group_size, rounding, seed)
            ctx.q_meta = q.restorer()
            ctx.save_for_backward(weight, q.packed, q.lo, q.scale, rstd)
            saved = shared_input.RecomputedInput(
                (q.packed, q.lo, q.scale, w_copy), _CompressedRecipe(style, x.dtype, q.restorer(), x.shape),
                exact=False)
        ctx.share_key = shared_input.offer(y, saved)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        shared_input.forget(ctx.share_key)
        if ctx.mode == "exact":
            weight, x, rstd = ctx.saved_tensors
            h = _h_exact(x, rstd)
        else:
            weight, packed, lo, scale, rstd = ctx.saved_tensors
            h = ctx.q_meta((packed, lo, scale), torch.float32).view(ctx.shape)
        gy = grad_y
        if ctx.style == "llama":
            hx = h.to(ctx.x_dtype)
            # y = weight * hx: autograd computes both products in the promoted dtype, then casts each
            # gradient to its input's dtype.
            grad_w = (gy * hx).reshape(-1, gy.shape[-1]).sum(0).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
            grad_h = (gy * weight).to(ctx.x_dtype).to(torch.float32)
        else:
            gy = gy.to(torch.float32)
            grad_w = (gy * h).reshape(-1, gy.shape[-1]).sum(0).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
            grad_h = gy * (1.0 + weight.float())
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (rstd * (grad_h - h * (grad_h * h).mean(-1, keepdim=True))).to(ctx.x_dtype)
        return grad_x, grad_w, None, None, None, None, None, None, None


class _ExactRecipe:
    """Rebuilds y from (x, rstd, weight copy) bit for bit (the forward's own operations). Holds no tensor."""

    def __init__(self, style, x_dtype):
        self.style, self.x_dtype = style, x_dtype

    def __call__(self, x, rstd, weight, *, dtype):
        return _rebuild_output((x, rstd), weight, style=self.style, x_dtype=self.x_dtype, rebuild_h=_h_exact,
                               dtype=dtype).reshape(-1, x.shape[-1])


class _CompressedRecipe:
    """Rebuilds y ~ w' * h_hat from h's codes and a weight copy. Holds no tensor."""

    def __init__(self, style, x_dtype, restore_h, shape):
        self.style, self.x_dtype, self.restore_h, self.cols = style, x_dtype, restore_h, shape[-1]

    def __call__(self, packed, lo, scale, weight, *, dtype):
        h = self.restore_h((packed, lo, scale), torch.float32)
        return _rebuild_output((h,), weight, style=self.style, x_dtype=self.x_dtype, rebuild_h=lambda t: t,
                               dtype=dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, style: str = "llama", mode: str = "exact",
             bits: int = 8, group_size: int = 128, rounding: str = "stochastic",
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """RMSNorm as Hugging Face computes it (`style` "llama" or "gemma"), saving less (see the module
    docstring). Runs with autocast off, as the module's float32 math does."""
    check_tensor(x, "x", min_dim=1)
    check_tensor(weight, "weight")
    check_real(eps, "eps", lo=0)
    check_choice(style, "style", RMS_STYLES)
    check_choice(mode, "mode", NORM_MODES)
    check_lowbit_args(bits, group_size, rounding)
    check_generator(generator)
    seed = draw_seed(generator) if mode == "compressed" else 0
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        h, _ = _normalize(x, eps)
        return _scale(h, weight, style, x.dtype)
    device_type = x.device.type
    with torch.autocast(device_type, enabled=False):
        return _RMSNormFn.apply(x, weight, eps, style, mode, bits, group_size, rounding, seed)
