"""LayerNorm (torch.nn.LayerNorm over the last dimension) that saves less for backward.

    y = xhat * w + b        xhat = (x - mean) * rstd        rstd = 1 / sqrt(var + eps), per row

The forward is torch's own kernel (torch.native_layer_norm, what F.layer_norm runs), so values are bit-identical
to nn.LayerNorm's. Left to autograd, LayerNorm keeps its input and per-row mean and rstd, and every linear layer
reading y keeps y as well (BERT's Q/K/V and intermediate projections, GPT-2's c_attn and c_fc, the LM head).
Modes:
- "exact": saves x (in its own dtype), mean and rstd (what torch saves) and backward is torch's own
  (aten.native_layer_norm_backward): gradients equal autograd's. It also offers the layers that read y a recipe
  that reruns the forward kernel on x and copies of w and b, rebuilding y bit for bit, so converted linear
  layers reading y save nothing of their own (fewbit_dist.functional.shared_input).
- "compressed": saves xhat quantized to `bits` (LowBitLinear's group quantizer, stochastic rounding by default)
  and rstd; the linear layers reading y share those codes (y is rebuilt as xhat_hat * w + b). Backward:

    grad_xhat = g * w      grad_x = rstd * (grad_xhat - mean(grad_xhat) - xhat * mean(grad_xhat * xhat))
    grad_w = sum over rows of g * xhat        grad_b = sum over rows of g

  in float32, with xhat from the codes: grad_w is unbiased under stochastic rounding, grad_x an estimate.

Autocast. Where torch's autocast runs layer_norm in float32 (CUDA: layer_norm is on its float32 list), the
function casts x, w and b to float32 as autocast would and returns float32; where it leaves layer_norm alone
(CPU, as of torch 2.13) it computes in the inputs' dtypes. Which one applies is read from torch itself, once
per device type and autocast dtype. The tensors saved are the inputs before the cast (a bfloat16 x stays
bfloat16 and the Parameters are recast in backward), so nothing is saved twice.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..validation import check_choice, check_generator, check_real, check_tensor
from . import shared_input
from .linear import draw_seed
from .lowbit import check_lowbit_args, quantize_input
from .norm import NORM_MODES

__all__ = ["layer_norm", "autocast_upcasts_layer_norm"]


@functools.lru_cache(maxsize=None)
def _upcasts(device_type: str, dtype: torch.dtype) -> bool:
    probe = torch.ones(1, 1, dtype=dtype, device=device_type)
    with torch.autocast(device_type, dtype):
        return F.layer_norm(probe, (1,)).dtype == torch.float32


def autocast_upcasts_layer_norm(device_type: str) -> bool:
    """Whether autocast, as now enabled for `device_type`, runs F.layer_norm in float32 (False when disabled)."""
    if not torch.is_autocast_enabled(device_type):
        return False
    dtype = torch.get_autocast_dtype(device_type)
    return dtype != torch.float32 and _upcasts(device_type, dtype)


def _cast(t: Optional[torch.Tensor], upcast: bool) -> Optional[torch.Tensor]:
    """`t` as autocast's float32 policy passes it to the op: floating tensors other than float64 in float32."""
    if not upcast or t is None or not t.is_floating_point() or t.dtype in (torch.float32, torch.float64):
        return t
    return t.to(torch.float32)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, upcast, mode, bits, group_size, rounding, seed):
        xc, wc, bc = _cast(x, upcast), _cast(weight, upcast), _cast(bias, upcast)
        cols = x.shape[-1]
        y, mean, rstd = torch.native_layer_norm(xc, (cols,), wc, bc, eps)
        ctx.mode, ctx.upcast, ctx.shape, ctx.x_dtype = mode, upcast, x.shape, x.dtype
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        # Copies (d elements each) for the readers' recipe: it runs in their backward, where ZeRO-3 need not
        # have gathered this module's Parameters.
        copies = tuple(t.detach().to(t.dtype, copy=True) for t in (wc, bc) if t is not None)
        params = tuple(t for t in (weight, bias) if t is not None)
        if mode == "exact":
            ctx.save_for_backward(x, mean, rstd, *params)
            saved = shared_input.RecomputedInput((x, *copies), _ExactRecipe(upcast, ctx.has_weight, ctx.has_bias, eps),
                                                 exact=True)
        else:
            om = _opmath(xc.dtype)
            xhat = (xc.to(om) - mean.to(om)) * rstd.to(om)
            q = quantize_input(xhat.reshape(-1, cols), bits, group_size, rounding, seed)
            del xhat
            ctx.q_meta = q.restorer()
            ctx.save_for_backward(q.packed, q.lo, q.scale, rstd, *params)
            saved = shared_input.RecomputedInput(
                (q.packed, q.lo, q.scale, *copies), _CompressedRecipe(q.restorer(), ctx.has_weight, ctx.has_bias),
                exact=False)
        ctx.share_key = shared_input.offer(y, saved)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        shared_input.forget(ctx.share_key)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if ctx.mode == "exact":
            x, mean, rstd, *params = ctx.saved_tensors
        else:
            packed, lo, scale, rstd, *params = ctx.saved_tensors
        weight, bias = _split(params, ctx.has_weight, ctx.has_bias)
        wc, bc = _cast(weight, ctx.upcast), _cast(bias, ctx.upcast)
        if ctx.mode == "exact":
            grad_x, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
                grad_y, _cast(x, ctx.upcast), [ctx.shape[-1]], mean, rstd, wc, bc,
                [need_x, need_w and weight is not None, need_b and bias is not None])
        else:
            grad_x, grad_w, grad_b = _compressed_backward(ctx, grad_y, (packed, lo, scale), rstd, wc,
                                                          need_x, need_w and weight is not None,
                                                          need_b and bias is not None)
        grad_x = grad_x.to(ctx.x_dtype) if grad_x is not None else None
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


def _compressed_backward(ctx, grad_y, codes, rstd, wc, need_x, need_w, need_b):
    """(grad_x, grad_w, grad_b) in the op-math dtype from xhat's codes (see the module docstring)."""
    cols = ctx.shape[-1]
    om = _opmath(grad_y.dtype)
    g = grad_y.reshape(-1, cols).to(om)
    xhat = ctx.q_meta(codes, om)
    grad_w = (g * xhat).sum(0) if need_w else None
    grad_b = g.sum(0) if need_b else None
    grad_x = None
    if need_x:
        gh = g * wc.to(om) if wc is not None else g
        r = rstd.reshape(-1, 1).to(om)
        grad_x = r * (gh - gh.mean(-1, keepdim=True) - xhat * (gh * xhat).mean(-1, keepdim=True))
        grad_x = grad_x.view(ctx.shape)
    return grad_x, grad_w, grad_b


def _split(params, has_weight, has_bias):
    params = list(params)
    weight = params.pop(0) if has_weight else None
    bias = params.pop(0) if has_bias else None
    return weight, bias


class _ExactRecipe:
    """Rebuilds y from (x, weight copy, bias copy) bit for bit: the forward's kernel again. Holds no tensor."""

    def __init__(self, upcast, has_weight, has_bias, eps):
        self.upcast, self.has_weight, self.has_bias, self.eps = upcast, has_weight, has_bias, eps

    def __call__(self, x, *params, dtype):
        weight, bias = _split(params, self.has_weight, self.has_bias)
        y = torch.native_layer_norm(_cast(x, self.upcast), (x.shape[-1],), weight, bias, self.eps)[0]
        return y.reshape(-1, x.shape[-1]).to(dtype)


class _CompressedRecipe:
    """Rebuilds y ~ xhat_hat * w + b from xhat's codes and copies of w and b. Holds no tensor."""

    def __init__(self, restore_xhat, has_weight, has_bias):
        self.restore_xhat, self.has_weight, self.has_bias = restore_xhat, has_weight, has_bias

    def __call__(self, packed, lo, scale, *params, dtype):
        weight, bias = _split(params, self.has_weight, self.has_bias)
        y = self.restore_xhat((packed, lo, scale), _opmath(dtype))
        if weight is not None:
            y = y * weight.to(y.dtype)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.to(dtype)


def _check_param(t, name: str, cols: int) -> None:
    if check_tensor(t, name, optional=True) is None:
        return
    if tuple(t.shape) != (cols,):
        raise ValueError(f"{name} must have shape ({cols},) (the input's last dimension), got {tuple(t.shape)}")


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float = 1e-5,
               *, mode: str = "exact", bits: int = 8, group_size: int = 128, rounding: str = "stochastic",
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """`F.layer_norm(x, (x.shape[-1],), weight, bias, eps)`, saving less for backward (see the module docstring).

    mode: "exact" (gradients unchanged) or "compressed" (xhat saved at `bits` 2..8 per element, in groups of
    `group_size` columns, `rounding` "stochastic" or "nearest"; `generator` draws the rounding seed)."""
    check_tensor(x, "x", min_dim=1)
    check_choice(mode, "mode", NORM_MODES)
    check_lowbit_args(bits, group_size, rounding)
    check_real(eps, "eps", lo=0)
    check_generator(generator)
    cols = x.shape[-1]
    _check_param(weight, "weight", cols)
    _check_param(bias, "bias", cols)
    # Drawn with or without grad, so the RNG stream after the norm does not depend on the grad mode.
    seed = draw_seed(generator) if mode == "compressed" else 0
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))):
        return F.layer_norm(x, (cols,), weight, bias, eps)
    device_type = x.device.type
    if not torch.amp.is_autocast_available(device_type):  # no autocast there (meta tensors)
        return _LayerNormFn.apply(x, weight, bias, float(eps), False, mode, bits, group_size, rounding, seed)
    upcast = autocast_upcasts_layer_norm(device_type)
    with torch.autocast(device_type, enabled=False):
        return _LayerNormFn.apply(x, weight, bias, float(eps), upcast, mode, bits, group_size, rounding, seed)
