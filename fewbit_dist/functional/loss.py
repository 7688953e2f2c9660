"""Causal-LM loss without the vocabulary's logits: a fused linear cross-entropy, or chunks under checkpointing.

Hugging Face computes `logits = lm_head(hidden)` for every token, upcasts them to float32 and keeps them for
the cross-entropy's backward: 4 * vocab bytes per token (196 KiB for a 49k vocabulary), often the largest
single tensor of a step. Here the flattened hidden states are cut into chunks of `chunk_rows` rows (by
default as many as keep a chunk's float32 logits within 32 MiB: chunk_rows_for), and one of two paths runs:

- fused (a head whose forward is F.linear: nn.Linear or ExactLinear, made ready by `fuse_head`, which
  `convert` does): the forward computes, chunk by chunk, the logits, their loss and at once their gradient,
  and from it the gradients of the hidden states and of the head's weight and bias. It keeps the hidden
  states' gradient (the size of the hidden states, in the compute dtype) for backward, and the head's
  parameter gradients, which backward hands to autograd. Nothing is recomputed: the step does the head's
  three matrix products once, as without this loss, instead of four. The whole computation runs inside the
  head module's forward (`head(h, fewbit_loss_target=...)`), so DeepSpeed ZeRO-3 and FSDP gather the
  weight there as for any forward.
- checkpointed (any other head: LoRA-wrapped, low-bit, quantized): each chunk's logits and loss run under
  non-reentrant activation checkpointing, so backward recomputes one chunk's logits at a time.

Exact: the same shift, ignore_index and reduction as transformers' ForCausalLMLoss (mean over non-ignored
labels, or sum / num_items_in_batch); values and gradients differ from it only by float rounding (the fused
path forms softmax - one-hot itself, and accumulates the head's weight gradient over chunks in float32).
Under autocast the matrix products run in the autocast dtype, as F.linear's would.

The head's parameter gradients exist from the end of the forward rather than from the start of the
backward; they are parameter gradients, not saved activations, so SavedTensorMeter does not count them.
The fused backward may run once (retain_graph=True and a second backward raise).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..chunks import chunk_starts
from ..validation import check_optional_int

__all__ = ["chunked_causal_lm_loss", "linear_cross_entropy_sum", "fuse_head", "is_fused_head",
           "chunk_rows_for", "DEFAULT_CHUNK_ROWS"]

DEFAULT_CHUNK_ROWS = None  # automatic: chunk_rows_for(vocab)
CHUNK_LOGITS_BYTES = 32 << 20  # the float32 logits of one automatic chunk
_FUSED = "_fewbit_fused_head"


def chunk_rows_for(vocab: int) -> int:
    """The automatic chunk: as many rows as keep one chunk's float32 logits within CHUNK_LOGITS_BYTES (a
    multiple of 16, at least 16: 160 rows for a 49k vocabulary, 1024 for 8k). On a CPU smaller chunks also
    ran faster than 1024-row ones on SmolLM2's head (a large fresh buffer costs its page faults; measured on a
    loaded machine, so no figure is quoted)."""
    return max(16, CHUNK_LOGITS_BYTES // (4 * max(1, vocab)) // 16 * 16)


# ------------------------------------------------------------------------------------------ fused path


def _chunk_grad_logits(x: torch.Tensor, t: torch.Tensor, ignore_index: int, scale, softcap: Optional[float]):
    """From float32 logits `x` (rows x vocab, overwritten) and targets `t`: (the rows' summed loss,
    d(loss * scale)/d(logits) in `x`'s storage). Five passes over `x`, no vocabulary-sized temporary (beyond
    the soft cap's tanh)."""
    tanh = None
    if softcap is not None:
        tanh = torch.tanh(x / softcap)
        x = torch.mul(tanh, softcap, out=x)
    valid = t != ignore_index
    safe = torch.where(valid, t, torch.zeros_like(t))
    picked = x.gather(1, safe[:, None]).squeeze(1)
    top = x.amax(dim=1)
    x.sub_(top[:, None]).exp_()
    total = x.sum(dim=1)
    lse = top + total.log()
    loss = torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
    w = valid.to(x.dtype) * scale
    x.mul_((w / total)[:, None])  # softmax * scale (ignored rows: 0)
    x.scatter_add_(1, safe[:, None], -w[:, None])  # - one-hot * scale
    if tanh is not None:  # d softcap*tanh(z/softcap) / dz = 1 - tanh^2
        x.mul_(tanh.square_().neg_().add_(1))
    return loss, x


class _LinearCrossEntropyFn(torch.autograd.Function):
    """loss = sum over valid rows of cross_entropy(h W^T + b) * scale, with every gradient formed in forward."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, scale, ignore_index, chunk_rows, softcap, compute_dtype):
        dt = compute_dtype or h.dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        w = weight if weight.dtype == dt else weight.to(dt)
        b = None if bias is None else (bias if bias.dtype == dt else bias.to(dt))
        grad_h = torch.empty(h.shape, dtype=dt, device=h.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        rows = min(chunk_rows, h.shape[0])
        # Buffers reused by every chunk (a fresh vocabulary-sized block per chunk costs its page faults): the
        # float32 logits, turned into their gradient in place; in low precision, the matmul's output (then
        # the gradient's cast) and the weight gradient's per-chunk product.
        buf = torch.empty(rows, w.shape[0], dtype=torch.float32, device=h.device)
        low = wbuf = None
        if dt != torch.float32:
            low = torch.empty(rows, w.shape[0], dtype=dt, device=h.device)
            wbuf = torch.empty(weight.shape, dtype=dt, device=weight.device) if need_w else None
        total = None
        for r0 in chunk_starts(h.shape[0], chunk_rows):
            hc = h[r0:r0 + chunk_rows]
            hc = hc if hc.dtype == dt else hc.to(dt)
            n = hc.shape[0]
            x = buf[:n]
            out = x if low is None else low[:n]
            if b is None:
                torch.mm(hc, w.t(), out=out)
            else:
                torch.addmm(b, hc, w.t(), out=out)
            if low is not None:
                x.copy_(out)
            part, g = _chunk_grad_logits(x, target[r0:r0 + chunk_rows], ignore_index, scale, softcap)
            total = part if total is None else total + part
            if low is not None:
                g = out.copy_(g)
            if need_h:
                torch.mm(g, w, out=grad_h[r0:r0 + n])
            if need_w:
                if wbuf is None:
                    grad_w.addmm_(g.t(), hc)
                else:
                    grad_w += torch.mm(g.t(), hc, out=wbuf)
            if need_b:
                grad_b += g.sum(0, dtype=torch.float32)
        if total is None:  # no rows
            total = torch.zeros((), dtype=torch.float32, device=h.device)
        ctx.h_dtype, ctx.used = h.dtype, False
        ctx.grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        ctx.grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        ctx.save_for_backward(grad_h)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.used:
            raise RuntimeError("the fused linear cross-entropy can run its backward once (it hands over "
                               "gradients it formed in forward); retain_graph=True is not supported")
        ctx.used = True
        (grad_h,) = ctx.saved_tensors
        grad_w, grad_b = ctx.grad_w, ctx.grad_b
        ctx.grad_w = ctx.grad_b = None
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_out).to(ctx.h_dtype)
        if grad_w is not None:
            grad_w.mul_(grad_out)
        if grad_b is not None:
            grad_b.mul_(grad_out)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             target: torch.Tensor, scale, *, ignore_index: int = -100,
                             chunk_rows: Optional[int] = DEFAULT_CHUNK_ROWS,
                             softcap: Optional[float] = None) -> torch.Tensor:
    """`scale * sum(cross_entropy(hidden @ weight.T + bias, target, ignore_index, reduction="none"))` as one
    fused op (hidden: rows x features, target: rows); see the module docstring. `scale` is a number or a
    0-d tensor (e.g. 1 / the count of valid targets). chunk_rows None: chunk_rows_for(vocabulary)."""
    chunk_rows = check_optional_int(chunk_rows, "chunk_rows", lo=1) or chunk_rows_for(weight.shape[0])
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    with torch.autocast(device_type, enabled=False):
        if torch.is_tensor(scale):
            scale = scale.to(device=hidden.device, dtype=torch.float32)
        return _LinearCrossEntropyFn.apply(hidden, weight, bias, target, scale, ignore_index, chunk_rows,
                                           softcap, dtype)


def _fused_head_forward(self, input, fewbit_loss_target=None, **loss_kwargs):
    if fewbit_loss_target is None:
        return type(self).forward(self, input)
    return linear_cross_entropy_sum(input, self.weight, self.bias, fewbit_loss_target, **loss_kwargs)


def is_fusable_head(head: nn.Module) -> bool:
    """A head whose forward is F.linear on its own weight and bias (nn.Linear, ExactLinear)."""
    from ..nn.linear import ExactLinear

    return (type(head).forward in (nn.Linear.forward, ExactLinear.forward)
            and isinstance(getattr(head, "weight", None), torch.Tensor)
            and not getattr(head, "parametrizations", None))


def fuse_head(head: nn.Module) -> bool:
    """Let `head(h, fewbit_loss_target=t, scale=..., ...)` compute the fused linear cross-entropy inside the
    head's own forward (its hooks, ZeRO-3's and FSDP's gathers included, run as for any call); a call without
    `fewbit_loss_target` is unchanged. True if `head` is fusable (is_fusable_head) and is now fused."""
    if is_fused_head(head):
        return True
    if not is_fusable_head(head):
        return False
    from ..models.decoder import set_forward

    set_forward(head, _fused_head_forward)
    head.__dict__[_FUSED] = True
    return True


def is_fused_head(head: nn.Module) -> bool:
    return bool(head.__dict__.get(_FUSED, False))


# ------------------------------------------------------------------------------------- checkpointed path


def _chunk_loss_sum(h: torch.Tensor, labels: torch.Tensor, head, softcap: Optional[float], ignore_index: int):
    logits = head(h)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")


def chunked_causal_lm_loss(hidden: torch.Tensor, head: torch.nn.Module, labels: Optional[torch.Tensor] = None, *,
                           shift_labels: Optional[torch.Tensor] = None, num_items_in_batch=None,
                           ignore_index: int = -100, chunk_rows: Optional[int] = DEFAULT_CHUNK_ROWS,
                           softcap: Optional[float] = None) -> torch.Tensor:
    """The causal-LM loss of `head(hidden)` against `labels` (shifted by one, as transformers does) or
    `shift_labels` (already shifted), `chunk_rows` rows at a time (None: chunk_rows_for the head's
    out_features, 1024 rows for a head without them): fused if `head` was made ready by `fuse_head`, else
    checkpointed (module docstring)."""
    chunk_rows = check_optional_int(chunk_rows, "chunk_rows", lo=1)
    if chunk_rows is None:
        vocab = getattr(head, "out_features", None)
        chunk_rows = chunk_rows_for(vocab) if isinstance(vocab, int) else 1024
    if shift_labels is None:
        if labels is None:
            raise ValueError("give labels (unshifted) or shift_labels")
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    target = shift_labels.reshape(-1).to(h2.device)
    if target.numel() != h2.shape[0]:
        raise ValueError(f"labels have {target.numel()} positions but hidden states have {h2.shape[0]} rows")
    if h2.shape[0] == 0:  # no rows: what cross_entropy's mean of nothing gives
        return h2.new_full((), float("nan"), dtype=torch.float32)
    if num_items_in_batch is None:
        denom = (target != ignore_index).sum()
    else:
        denom = num_items_in_batch.to(h2.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
    if is_fused_head(head) and torch.is_grad_enabled():
        scale = 1.0 / denom if torch.is_tensor(denom) else 1.0 / float(denom) if denom else float("nan")
        return head(h2, fewbit_loss_target=target, scale=scale, ignore_index=ignore_index, chunk_rows=chunk_rows,
                    softcap=softcap)
    total = None
    for r0 in chunk_starts(h2.shape[0], chunk_rows):
        h, t = h2[r0:r0 + chunk_rows], target[r0:r0 + chunk_rows]
        if torch.is_grad_enabled() and h.requires_grad:
            part = checkpoint(_chunk_loss_sum, h, t, head, softcap, ignore_index, use_reentrant=False)
        else:
            part = _chunk_loss_sum(h, t, head, softcap, ignore_index)
        total = part if total is None else total + part
    return total / denom
