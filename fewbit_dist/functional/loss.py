"""Causal-LM loss in row chunks: the vocabulary's logits never exist for the whole batch at once.

Hugging Face computes `logits = lm_head(hidden)` for every token, upcasts them to float32 and keeps them for
the cross-entropy's backward: 4 * vocab bytes per token (196 KiB for a 49k vocabulary), often the largest
single tensor of a step. Here the flattened hidden states are cut into chunks of `chunk_rows` rows; each
chunk's logits and loss run under non-reentrant activation checkpointing, so backward recomputes one
chunk's logits at a time and nothing of vocabulary size is kept between forward and backward.

The head is called as a module (`head(h)`), never through its weight: DeepSpeed ZeRO-3 gathers a module's
parameters in that module's forward hooks (also when checkpointing recomputes it), FSDP likewise. Tied
embeddings stay tied: the head module owns (or shares) its weight as usual.

Exact: the same shift, ignore_index and reduction as transformers' ForCausalLMLoss (mean over non-ignored
labels, or sum / num_items_in_batch); the value differs from it only by the order of float summation.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..validation import check_int

__all__ = ["chunked_causal_lm_loss", "DEFAULT_CHUNK_ROWS"]

DEFAULT_CHUNK_ROWS = 1024


def _chunk_loss_sum(h: torch.Tensor, labels: torch.Tensor, head, softcap: Optional[float], ignore_index: int):
    logits = head(h)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")


def chunked_causal_lm_loss(hidden: torch.Tensor, head: torch.nn.Module, labels: Optional[torch.Tensor] = None, *,
                           shift_labels: Optional[torch.Tensor] = None, num_items_in_batch=None,
                           ignore_index: int = -100, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                           softcap: Optional[float] = None) -> torch.Tensor:
    """The causal-LM loss of `head(hidden)` against `labels` (shifted by one, as transformers does) or
    `shift_labels` (already shifted), computed `chunk_rows` rows at a time."""
    check_int(chunk_rows, "chunk_rows", lo=1)
    if shift_labels is None:
        if labels is None:
            raise ValueError("give labels (unshifted) or shift_labels")
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    h2 = hidden.reshape(-1, hidden.shape[-1])
    target = shift_labels.reshape(-1).to(h2.device)
    if target.numel() != h2.shape[0]:
        raise ValueError(f"labels have {target.numel()} positions but hidden states have {h2.shape[0]} rows")
    total = None
    for r0 in range(0, h2.shape[0], chunk_rows):
        h, t = h2[r0:r0 + chunk_rows], target[r0:r0 + chunk_rows]
        if torch.is_grad_enabled() and h.requires_grad:
            part = checkpoint(_chunk_loss_sum, h, t, head, softcap, ignore_index, use_reentrant=False)
        else:
            part = _chunk_loss_sum(h, t, head, softcap, ignore_index)
        total = part if total is None else total + part
    if total is None:  # no rows: what cross_entropy's mean of nothing gives
        return h2.new_full((), float("nan"), dtype=torch.float32)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / (target != ignore_index).sum()
