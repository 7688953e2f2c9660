"""Attention with dropout that saves q, k, v and a 1-bit dropout mask, and recomputes the probabilities.

torch's scaled_dot_product_attention with dropout_p > 0 runs its math fallback on the CPU (and with some
masks elsewhere): it saves the attention probabilities, the dropout noise in the input's dtype and the dropped
probabilities, three [batch, heads, q_len, kv_len] tensors per layer, more than everything else in a layer of
a short-sequence transformer. This function keeps q, k, v (the layer already has them) and the dropout mask
packed at one bit per element, and recomputes scores and softmax in backward, as flash attention does. The
gradients are exact given the mask (the same math, rounded alike).

On CUDA torch's fused kernels (flash, memory-efficient) already keep only q, k, v, the output, the
log-sum-exp and a random seed, which beats a bit per element: `sdpa_or_fewbit` hands CUDA tensors, and any
call without dropout, to torch.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ..ops.native import unpack_scale
from .dropout import check_dropout_p, draw_packed_mask

__all__ = ["scaled_dot_product_attention", "sdpa_or_fewbit"]


def _scores(q, k, attn_mask, scale, is_causal):
    s = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)
    if is_causal:
        lq, lk = q.shape[-2], k.shape[-2]
        causal = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril_()
        s = s.masked_fill_(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill_(~attn_mask, float("-inf"))
        else:
            s = s.add_(attn_mask)
    return s


class _AttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attn_mask, p, scale, is_causal):
        probs = torch.softmax(_scores(q, k, attn_mask, scale, is_causal), dim=-1)
        noise, packed, levels = draw_packed_mask(probs, p)
        probs.mul_(noise)
        del noise
        out = torch.matmul(probs, v)
        ctx.scale, ctx.is_causal = scale, is_causal
        ctx.save_for_backward(q, k, v, attn_mask, packed, levels)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, attn_mask, packed, levels = ctx.saved_tensors
        probs = torch.softmax(_scores(q, k, attn_mask, ctx.scale, ctx.is_causal), dim=-1)
        ones = torch.ones_like(probs)
        drop = unpack_scale(packed, levels, ones, 1)  # 0 or 1 / (1 - p), as the forward's noise
        del ones
        grad_out = grad_out.to(v.dtype)
        grad_v = torch.matmul((probs * drop).transpose(-2, -1), grad_out)
        grad_p = torch.matmul(grad_out, v.transpose(-2, -1)).mul_(drop)
        del drop
        grad_s = probs * (grad_p - (grad_p * probs).sum(-1, keepdim=True))
        del probs, grad_p
        grad_mask = None
        if attn_mask is not None and ctx.needs_input_grad[3]:
            grad_mask = grad_s.sum_to_size(attn_mask.shape)
        grad_s = grad_s.mul_(ctx.scale)
        grad_q = torch.matmul(grad_s, k)
        grad_k = torch.matmul(grad_s.transpose(-2, -1), q)
        return grad_q, grad_k, grad_v, grad_mask, None, None, None


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """torch.nn.functional.scaled_dot_product_attention's semantics (a boolean mask: True attends; a float
    mask is added to the scores), saving q, k, v and a 1-bit dropout mask (see the module docstring)."""
    p = check_dropout_p(dropout_p)
    if query.dim() < 2 or key.shape[-1] != query.shape[-1] or key.shape[-2] != value.shape[-2]:
        raise ValueError(f"incompatible shapes query {tuple(query.shape)}, key {tuple(key.shape)}, "
                         f"value {tuple(value.shape)}")
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    if enable_gqa and query.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, dim=-3), value.repeat_interleave(rep, dim=-3)
    if p == 0.0 or p == 1.0 or not torch.is_grad_enabled() or not any(
            t is not None and t.requires_grad for t in (query, key, value, attn_mask)):
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=p,
                                                                is_causal=is_causal, scale=scale)
    return _AttentionFn.apply(query, key, value, attn_mask, p, scale, is_causal)


def sdpa_or_fewbit(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False):
    """torch's SDPA unless dropout is on and the tensors are not on CUDA: then `scaled_dot_product_attention`."""
    if dropout_p > 0.0 and query.device.type != "cuda":
        return scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask,
                                                            dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                                                            enable_gqa=enable_gqa)
