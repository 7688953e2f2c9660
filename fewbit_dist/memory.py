"""How much memory training keeps for backward, measured the same way everywhere.

Saved-activation bytes: the bytes of the distinct storages that autograd's saved-tensor hooks pack during
a forward, trainable parameters excluded. Exact and deterministic on any device:

    with SavedTensorMeter(model) as meter:
        loss = model(batch).loss
    print(meter.nbytes)

Two tensors that share a storage (views, or one tensor saved by two ops) count once; a view counts its whole
storage, because that is what stays alive. Parameters (any nn.Parameter, and every tensor sharing a storage
with the parameters of the modules passed in) are excluded: they live for the whole run anyway.

Only the innermost `saved_tensors_hooks` see a saved tensor: a forward run under non-reentrant activation
checkpointing (itself such a hook) saves through checkpointing, not through this meter, so the meter sees
what the checkpoint keeps (its inputs), which is the memory that really stays alive.

Peak memory: `torch.cuda.max_memory_allocated()` on CUDA after `reset_peak_memory`, the peak RSS of this
process on CPU (meaningful in a fresh process only).
"""

from __future__ import annotations

import resource
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Union

import torch
from torch import nn

__all__ = ["SavedTensorMeter", "SavedRecord", "saved_activation_bytes", "peak_memory_bytes", "reset_peak_memory",
           "format_bytes"]


@dataclass(frozen=True)
class SavedRecord:
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str
    storage_nbytes: int  # bytes of the storage, counted once per distinct storage


def _storage_key(t: torch.Tensor):
    return (t.device.type, t.device.index, t.untyped_storage().data_ptr())


class SavedTensorMeter:
    """Context manager counting what autograd saves for backward (see the module docstring).

    `exclude`: modules and/or tensors whose storages are not counted (besides every nn.Parameter).
    After the block: `nbytes` (distinct storages), `records` (one per distinct storage, in save order),
    `saved_count` (all pack calls, duplicates included).
    """

    def __init__(self, exclude: Union[nn.Module, torch.Tensor, Iterable, None] = None):
        self._exclude_keys = set()
        for item in _flatten(exclude):
            if isinstance(item, nn.Module):
                for p in item.parameters():
                    self._exclude(p)
            elif isinstance(item, torch.Tensor):
                self._exclude(item)
            else:
                raise TypeError(f"exclude takes modules and tensors, got {type(item).__name__}")
        self._seen: dict = {}
        self.records: list[SavedRecord] = []
        self.saved_count = 0
        self._hooks = None

    def _exclude(self, t: torch.Tensor) -> None:
        if hasattr(t, "to_local"):  # a sharded DTensor (FSDP2): its local shard holds the storage
            t = t.to_local()
        try:
            self._exclude_keys.add(_storage_key(t))
        except RuntimeError:  # a storage already freed or resized away (sharded, offloaded): nothing to count
            pass

    @property
    def nbytes(self) -> int:
        return sum(r.storage_nbytes for r in self.records)

    def by_dtype(self) -> dict[torch.dtype, int]:
        out: Counter = Counter()
        for r in self.records:
            out[r.dtype] += r.storage_nbytes
        return dict(out)

    def _pack(self, t: torch.Tensor):
        # Hand autograd a detached alias, never `t` itself: a saved output packed as itself would hold its own
        # grad_fn (node -> packed tensor -> grad_fn -> node), a cycle through C++ that the garbage collector
        # cannot see, so a forward that is never backpropagated would leak its whole graph.
        self.saved_count += 1
        base = t._base if t._base is not None else t
        if isinstance(t, nn.Parameter) or isinstance(base, nn.Parameter):
            return t.detach()
        if t.device.type == "meta" or not hasattr(t, "untyped_storage"):
            return t.detach()
        try:
            key = _storage_key(t)
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
            return t.detach()
        if key in self._exclude_keys or key in self._seen:
            return t.detach()
        storage = t.untyped_storage()
        # Hold the storage until the meter closes so its address cannot be reused by another tensor.
        self._seen[key] = storage
        self.records.append(SavedRecord(tuple(t.shape), t.dtype, str(t.device), storage.nbytes()))
        return t.detach()

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None
        self._seen.clear()


def _flatten(obj):
    if obj is None:
        return
    if isinstance(obj, (nn.Module, torch.Tensor)):
        yield obj
        return
    for item in obj:
        yield from _flatten(item)


def saved_activation_bytes(model: nn.Module, *args, **kwargs) -> int:
    """Saved-activation bytes of one forward of `model(*args, **kwargs)` (the graph is discarded)."""
    with SavedTensorMeter(model) as meter:
        model(*args, **kwargs)
    return meter.nbytes


def reset_peak_memory(device: Union[str, torch.device, None] = None) -> None:
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: Union[str, torch.device, None] = None) -> int:
    """CUDA: max_memory_allocated since the last reset. CPU: this process's peak resident set size."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
