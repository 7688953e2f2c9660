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

from ..chunks import chunk_starts
from ..validation import check_choice, check_generator, check_real, check_tensor
from . import shared_input
from .linear import draw_seed
from .lowbit import check_lowbit_args, quantize_input

__all__ = ["rms_norm", "NORM_MODES", "RMS_STYLES"]

NORM_MODES = ("exact", "compressed")
NORM_CHUNK_BYTES = 4 << 20  # the compressed backward works on row chunks whose float32 h stays within this
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
        if ctx.mode != "exact":
            return _compressed_backward(ctx, grad_y)
        weight, x, rstd = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_x, grad_w = _grads_of_rows(ctx, grad_y, _h_exact(x, rstd), weight, rstd, need_x, need_w, sum_dtype=None)
        return grad_x, None if grad_w is None else grad_w.to(ctx.w_dtype), None, None, None, None, None, None, None


def _grads_of_rows(ctx, gy, h, weight, rstd, need_x: bool, need_w: bool, sum_dtype):
    """(grad_x or None, grad_w or None) of rows from their upstream gradient and h (as the module's autograd
    forms them: y = weight * hx computes both products in the promoted dtype and casts each gradient to its
    input's dtype). grad_w is summed over the rows in `sum_dtype` (None: the product's, as autograd does)."""
    grad_w = None
    if ctx.style == "llama":
        if need_w:
            hx = h.to(ctx.x_dtype)
            grad_w = (gy * hx).reshape(-1, gy.shape[-1]).sum(0, dtype=sum_dtype)
            del hx
        grad_h = (gy * weight).to(ctx.x_dtype).to(torch.float32)
    else:
        gy = gy.to(torch.float32)
        grad_w = (gy * h).reshape(-1, gy.shape[-1]).sum(0, dtype=sum_dtype) if need_w else None
        grad_h = gy * (1.0 + weight.float())
    grad_x = (rstd * (grad_h - h * (grad_h * h).mean(-1, keepdim=True))).to(ctx.x_dtype) if need_x else None
    return grad_x, grad_w


def _compressed_backward(ctx, grad_y):
    """The compressed mode's backward by row chunks: each chunk's h dequantized from its codes, its rows of
    grad_x written, its part of grad_w summed in float32; so backward holds grad_x and a few chunk-sized
    pieces, not a float32 h and the products of the whole input (several input-sized float32 tensors at a
    long context)."""
    weight, packed, lo, scale, rstd = ctx.saved_tensors
    cols = ctx.shape[-1]
    gy2, rstd2 = grad_y.reshape(-1, cols), rstd.reshape(-1, 1)
    n = gy2.shape[0]
    step = max(8, NORM_CHUNK_BYTES // (4 * cols) // 8 * 8)  # a multiple of 8: the codes' rows start on a byte
    need_x, need_w = ctx.needs_input_grad[:2]
    grad_x = torch.empty((n, cols), dtype=ctx.x_dtype, device=gy2.device) if need_x else None
    grad_w = torch.zeros(cols, dtype=torch.float32, device=gy2.device) if need_w else None
    codes = (packed, lo, scale)
    for r0 in chunk_starts(n, step):
        r1 = min(n, r0 + step)
        h = ctx.q_meta.rows(codes, torch.float32, r0, r1)
        part_x, part_w = _grads_of_rows(ctx, gy2[r0:r1], h, weight, rstd2[r0:r1], need_x, need_w,
                                        sum_dtype=torch.float32)
        if need_x:
            grad_x[r0:r1] = part_x
        if need_w:
            grad_w += part_w
        del h, part_x, part_w
    return (None if grad_x is None else grad_x.view(ctx.shape),
            None if grad_w is None else grad_w.to(ctx.w_dtype), None, None, None, None, None, None, None)


class _ExactRecipe:
    """Rebuilds y from (x, rstd, weight copy) bit for bit (the forward's own operations). Holds no tensor."""

    def __init__(self, style, x_dtype):
        self.style, self.x_dtype = style, x_dtype

    def __call__(self, x, rstd, weight, *, dtype):
        return _rebuild_output((x, rstd), weight, style=self.style, x_dtype=self.x_dtype, rebuild_h=_h_exact,
                               dtype=dtype).reshape(-1, x.shape[-1])


class _CompressedRecipe:
    """Rebuilds y ~ w' * h_hat, as [rows, cols], from h's codes and a weight copy: whole, or rows r0:r1 alone
    (`rows`, r0 a multiple of 8), so a reader's weight gradient rebuilds its input in bounded chunks
    (functional.linear.restored_weight_grad) instead of a float32 h and a y of the whole input at once. Holds
    no tensor."""

    row_cost = 2  # h_hat in float32 and y, per rebuilt row

    def __init__(self, style, x_dtype, restore_h, shape):
        self.style, self.x_dtype, self.restore_h, self.cols = style, x_dtype, restore_h, shape[-1]

    def __call__(self, packed, lo, scale, weight, *, dtype):
        return self.rows(packed, lo, scale, weight, dtype=dtype, r0=0, r1=None)

    def rows(self, packed, lo, scale, weight, *, dtype, r0: int, r1: Optional[int]):
        codes = (packed, lo, scale)
        h = self.restore_h(codes, torch.float32) if r1 is None else self.restore_h.rows(codes, torch.float32, r0, r1)
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
