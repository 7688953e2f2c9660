"""One saved copy per tensor, however many layers read it.

Several layers of a transformer block read the same tensor one after the other: Q, K and V read the
attention norm's output, gate and up read the MLP norm's output, the down projection reads the gated
product. Each of them needs (a copy of) that tensor for its weight gradient. Saving it once per reader
triples the bytes; under torch.autocast it is worse, since every reader casts its input to bf16 first and
saves its own cast.

This module holds the last *saved inputs* in two slots: what a layer saved for the tensor it read, keyed
by that tensor's memory (device, storage address, offset, shape, strides, dtype, version counter), not by the
Python object, because DeepSpeed ZeRO-3 hands each submodule its own alias of one tensor. The next reader of
the same tensor saves the same storages (so they exist once) and rebuilds the input from them in backward.

A `SavedInput` is the saved form of a [rows, cols] input:
- exact: the tensor itself, possibly cast (`ExactInput`), or a recipe that recomputes it bit for bit from what
  its producer saved anyway (a norm rebuilds its output from its saved input and statistics; a gated MLP
  rebuilds act(gate) * up from gate and up);
- lossy: low-bit codes (`fewbit_dist.functional.lowbit.QuantizedInput`), or a recipe over lossy parts.

Only readers under the same saved-tensor hooks as the producer share its form (the innermost
torch.autograd.graph.saved_tensors_hooks, which non-reentrant checkpointing installs per region). A region
that checkpointing recomputes must save the same tensors as in its forward: a reader whose producer sits in
the previous region (BERT's output LayerNorm feeds the next layer's Q/K/V) found the entry in the forward but
would not in the recompute, so it saves its own form in both.

Under torch.compile nothing is shared: the keys are memory addresses, which a traced graph cannot read, and
AOT autograd decides what the compiled graph saves from the whole graph anyway. `offer` and `take` then do
nothing, and each reader saves its own form of its input (the same values; more bytes than eager).

Producers (norms, gated MLPs) `offer` the saved form of their output; consumers (linear layers) `take` it:
an exact consumer takes only exact forms, a low-bit consumer takes any. An entry is evicted by later offers
(least recently used first) and dropped by the first backward that reads it, so at most CAPACITY saved
inputs outlive their layers' own saved tensors (under non-reentrant checkpointing), and only until later
layers offer.
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable, Optional, Sequence

import torch

from ..memory import storage_id

__all__ = ["SavedInput", "ExactInput", "RecomputedInput", "memory_key", "offer", "take", "forget", "clear"]


class SavedInput:
    """The saved form of a [rows, cols] input: `tensors()` are what autograd keeps; `restorer()(tensors, dtype)`
    rebuilds the input from them (in backward, where the tensors come back from ctx.saved_tensors)."""

    exact: bool = True

    def tensors(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def restorer(self) -> Callable[[Sequence[torch.Tensor], torch.dtype], torch.Tensor]:
        """`restorer()(tensors, dtype)` rebuilds the input from `tensors()` (as they come back from
        ctx.saved_tensors). The callable holds no tensor: an autograd context may keep it without
        keeping tensors outside autograd's saved-tensor hooks (activation checkpointing, offloading)."""
        raise NotImplementedError

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


class ExactInput(SavedInput):
    """The input itself (or its cast), as a [rows, cols] tensor."""

    def __init__(self, x2: torch.Tensor):
        self.x2 = x2

    def tensors(self):
        return (self.x2,)

    def restorer(self):
        return _restore_exact


def _restore_exact(tensors, dtype):
    return tensors[0] if tensors[0].dtype == dtype else tensors[0].to(dtype)


class RecomputedInput(SavedInput):
    """An input rebuilt by `fn(*tensors, dtype=dtype)` from tensors its producer keeps anyway. `exact`: whether
    `fn` rebuilds it bit for bit (then an exact consumer may take it). `fn` must hold no tensor (pass
    everything it needs in `saved`)."""

    def __init__(self, saved: Sequence[torch.Tensor], fn: Callable[..., torch.Tensor], exact: bool):
        self.saved, self.fn, self.exact = tuple(saved), fn, exact

    def tensors(self):
        return self.saved

    def restorer(self):
        return _RowRecipeRestorer(self.fn) if hasattr(self.fn, "rows") else _RecipeRestorer(self.fn)


class _RecipeRestorer:
    """`restorer(tensors, dtype)` = `fn(*tensors, dtype=dtype)`. Holds the recipe, which holds no tensor."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, tensors, dtype):
        return self.fn(*tensors, dtype=dtype)


class _RowRecipeRestorer(_RecipeRestorer):
    """A recipe that can also rebuild rows r0:r1 alone (`fn.rows`), so a consumer's weight gradient can
    rebuild its input in chunks (fewbit_dist.functional.linear.restored_weight_grad). `row_cost`: how many
    input-sized rows the recipe holds at once per rebuilt row (its transient memory, for sizing the chunks)."""

    __slots__ = ()

    def rows(self, tensors, dtype, r0: int, r1: int):
        return self.fn.rows(*tensors, dtype=dtype, r0=r0, r1=r1)

    @property
    def row_cost(self) -> int:
        return getattr(self.fn, "row_cost", 1)


def _hooks_context():
    """A weak reference to the innermost saved-tensor pack hook (None outside any): what a region of
    non-reentrant checkpointing (or a meter) is identified by. Weak, so an entry never keeps a checkpoint
    frame alive."""
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return None if top is None else weakref.ref(top[0])


def _same_context(ref) -> bool:
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return (ref is None and top is None) or (ref is not None and top is not None and ref() is top[0])


def memory_key(x: torch.Tensor, *extra) -> tuple:
    """What identifies the contents of `x` while it lives: its memory and version counter (+ `extra`)."""
    return (x.device, storage_id(x), x.storage_offset(), tuple(x.shape), tuple(x.stride()),
            x.dtype, x._version, *extra)


# The slots are per thread: two threads running forwards (a data loader warm-up, a test runner) must not
# hand each other their inputs. Two slots, most recent first: a LoRA adapter's own small input (lora_B's)
# comes between two readers of the block's input (q's and k's lora_A), and must not evict it.
CAPACITY = 2
_local = threading.local()


def _entries() -> list:
    entries = getattr(_local, "entries", None)
    if entries is None:
        entries = _local.entries = []
    return entries


def _slot():
    """The most recent entry (key, storage, saved form, hooks context), or None."""
    entries = _entries()
    return entries[0] if entries else None


def offer(x: torch.Tensor, saved: SavedInput, tag=None) -> Optional[tuple]:
    """Make `saved` the saved form of tensor `x` for its next readers; returns its key. The entry holds x's
    storage, so the address cannot be reused by another tensor while the key lives. `tag` separates forms
    of one tensor that are not interchangeable (e.g. different quantization settings). The least recently
    used entry beyond CAPACITY is dropped. Under torch.compile: does nothing, returns None."""
    if torch.compiler.is_compiling():
        return None
    key = memory_key(x, tag)
    entries = _entries()
    entries[:] = [e for e in entries if e[0] != key]
    entries.insert(0, (key, x.untyped_storage(), saved, _hooks_context()))
    del entries[CAPACITY:]
    return key


def take(x: torch.Tensor, exact: bool, tag=None) -> tuple[Optional[tuple], Optional[SavedInput]]:
    """(key, saved form) of `x` if a slot holds one (an exact one when `exact`, and one offered with `tag` or
    with no tag), else (None, None)."""
    if torch.compiler.is_compiling():
        return None, None
    entries = _entries()
    if not entries:
        return None, None
    want = memory_key(x)
    for i, entry in enumerate(entries):
        key, _, saved, context = entry
        if key[:-1] != want or (exact and not saved.exact) or (key[-1] is not None and key[-1] != tag):
            continue
        if not _same_context(context):  # another checkpoint region: it would not be there in the recompute
            continue
        if i:  # most recently used first
            entries.insert(0, entries.pop(i))
        return key, saved
    return None, None


def forget(key: Optional[tuple]) -> None:
    """Drop the entry of `key` (the first backward that reads an entry drops it)."""
    if key is None:
        return
    entries = _entries()
    entries[:] = [e for e in entries if e[0] != key]


def clear() -> None:
    _entries().clear()
