"""How much memory training keeps for backward, measured the same way everywhere.

Saved-activation bytes: the bytes of the distinct storages that autograd's saved-tensor hooks pack during
a forward, trainable parameters excluded. Exact and deterministic on any device:

    with SavedTensorMeter(model) as meter:
        loss = model(batch).loss
    print(meter.nbytes)

Two tensors that share a storage (views, or one tensor saved by two ops) count once; a view counts its whole
storage, because that is what stays alive. Storages are told apart by identity (`storage_id`), not by data
address, so meta and fake tensors (FakeTensorMode: a full-size model with no memory) count as real ones do.
Parameters (any nn.Parameter, and every tensor sharing a storage
with the parameters of the modules passed in) are excluded: they live for the whole run anyway.

Only the innermost `saved_tensors_hooks` see a saved tensor: a forward run under non-reentrant activation
checkpointing (itself such a hook) saves through checkpointing, not through this meter, so the meter sees
what the checkpoint keeps (its inputs), which is the memory that really stays alive.

Peak memory of a region, above its start (what users judge by):

    with PeakMemory(device) as pm:
        model(**batch).loss.backward()
    print(pm.peak_bytes)

On CUDA: `torch.cuda.max_memory_allocated` after `torch.cuda.reset_peak_memory_stats`, minus the bytes allocated
when the region began. On CPU: the peak resident set size above the region's start, read from Linux's
high-water mark (writing "5" to /proc/self/clear_refs resets `VmHWM` to the current RSS; /proc/self/status
reports `VmRSS` and `VmHWM`). The CPU figure covers the whole process (every thread, every allocator, the
Python heap), and the kernel counts pages, so a buffer that is allocated but never touched does not count,
nor does one the allocator serves from pages it already holds (glibc keeps freed blocks below its dynamic mmap
threshold, up to 32 MiB each, in its heap): for figures that do not depend on what ran before, start the
process with a low MALLOC_MMAP_THRESHOLD_ (launch/bench_peak.py's --mmap-threshold).
Elsewhere (another OS, a /proc where clear_refs is not writable, as in some containers) entering the meter
raises `PeakMemoryUnavailable` saying why.

`peak_memory_bytes` / `reset_peak_memory` are the older, absolute pair (peak since the last reset, process
lifetime on CPU where the high-water mark cannot be reset).
"""

from __future__ import annotations

import os
import resource
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Union

import torch
from torch import nn

__all__ = ["SavedTensorMeter", "SavedRecord", "storage_id", "saved_activation_bytes", "PeakMemory", "PeakMemoryUnavailable",
           "peak_memory_bytes", "reset_peak_memory", "format_bytes"]


@dataclass(frozen=True)
class SavedRecord:
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str
    storage_nbytes: int  # bytes of the storage, counted once per distinct storage


def storage_id(t: torch.Tensor) -> int:
    """What identifies the memory of `t` while its storage lives: the address of its storage object (views of
    one tensor share it). Unlike `data_ptr()` it works for meta and fake tensors, which have no data; keep the
    storage alive while the id is in use, or the address can be reused."""
    return t.untyped_storage()._cdata


def _storage_key(t: torch.Tensor):
    return (t.device.type, t.device.index, storage_id(t))


class SavedTensorMeter:
    """Context manager counting what autograd saves for backward (see the module docstring).

    `exclude`: modules and/or tensors whose storages are not counted (besides every nn.Parameter).
    After the block: `nbytes` (distinct storages), `records` (one per distinct storage, in save order),
    `saved_count` (all pack calls, duplicates included).
    """

    def __init__(self, exclude: Union[nn.Module, torch.Tensor, Iterable, None] = None):
        self._exclude_keys: dict = {}
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
            # Keyed by the storage's identity, so the storage is held while the meter lives: a wrapper that
            # replaces its parameters' storages during the forward (ZeRO-3 swaps placeholders for gathered
            # tensors) would otherwise free it, and a saved activation's storage could reuse its address.
            self._exclude_keys[_storage_key(t)] = t.untyped_storage()
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
        if not hasattr(t, "untyped_storage"):
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


# Where Linux keeps the resident-set counters (module attributes, so tests can point them elsewhere).
CLEAR_REFS = "/proc/self/clear_refs"
STATUS = "/proc/self/status"


class PeakMemoryUnavailable(RuntimeError):
    """The peak of a region cannot be measured here (the message says why)."""


def _status_kib(field: str) -> int:
    with open(STATUS) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])  # "VmHWM:     1234 kB"
    raise PeakMemoryUnavailable(f"{STATUS} has no {field} line: cannot read the resident set size")


def _reset_cpu_high_water_mark() -> None:
    if not sys.platform.startswith("linux"):
        raise PeakMemoryUnavailable(f"the CPU peak of a region needs Linux's resettable RSS high-water mark "
                                    f"(/proc/self/clear_refs); this is {sys.platform}")
    try:
        with open(CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError as e:
        raise PeakMemoryUnavailable(f"cannot reset the RSS high-water mark: writing 5 to {CLEAR_REFS} failed "
                                    f"({e.strerror or e}); a read-only /proc (some containers) or a kernel "
                                    "older than 4.0 does this") from e


def _cuda_device(device: torch.device) -> torch.device:
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


class PeakMemory:
    """Context manager: the peak memory of the code inside, above the memory at its start.

    `device`: "cpu" (default: the process's resident set, see the module docstring) or a CUDA device
    (allocated bytes on that device). After the block: `peak_bytes` (peak above the start, >= 0),
    `start_bytes` (RSS or allocated bytes at the start) and `end_bytes` (what the region left behind, above
    the start; negative if it freed more than it allocated).

    Both counters are process-wide and one of them at a time: a reset serves every meter open on that
    device. Meters nest: before an inner meter resets the counter, every open outer meter folds the peak
    seen so far into its own, so an outer `peak_bytes` covers the whole outer region, the inner region
    included. A meter can be reused (entered again after it exits): each use measures afresh. Entering a
    meter that is already open raises RuntimeError. Threads running meanwhile count toward the peak.
    """

    _open: list = []  # meters inside their region, outermost first

    def __init__(self, device: Union[str, torch.device, None] = None):
        device = torch.device("cpu") if device is None else torch.device(device)
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or a CUDA device, got {str(device)!r}")
        self.device = device
        self.start_bytes = self.end_bytes = self.peak_bytes = None
        self._peak_abs = 0
        self._active = False

    def _current(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return _status_kib("VmRSS") * 1024

    def _high_water(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return _status_kib("VmHWM") * 1024

    def _same_counter(self) -> list:
        return [m for m in PeakMemory._open if m.device == self.device]

    def _reset(self) -> None:
        high = None
        for outer in self._same_counter():  # keep what the outer regions have seen before the reset
            high = self._high_water() if high is None else high
            outer._peak_abs = max(outer._peak_abs, high)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_cpu_high_water_mark()

    def __enter__(self) -> "PeakMemory":
        if self._active:
            raise RuntimeError("this PeakMemory is already measuring a region; use another one to nest")
        if self.device.type == "cuda":
            self.device = _cuda_device(self.device)
            torch.cuda.synchronize(self.device)
        self._reset()
        self.start_bytes = self._current()
        self._peak_abs = self.start_bytes
        self.peak_bytes = self.end_bytes = None
        self._active = True
        PeakMemory._open.append(self)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        PeakMemory._open.remove(self)
        self._active = False
        high = self._high_water()
        for outer in self._same_counter():  # the counter is not reset here: outer meters read it at their exit
            outer._peak_abs = max(outer._peak_abs, high)
        self._peak_abs = max(self._peak_abs, high)
        self.peak_bytes = self._peak_abs - self.start_bytes
        self.end_bytes = self._current() - self.start_bytes


def reset_peak_memory(device: Union[str, torch.device, None] = None) -> None:
    """Start a new peak: CUDA's peak statistics; on Linux CPUs the RSS high-water mark where /proc allows it
    (elsewhere nothing: `peak_memory_bytes` then reports the process lifetime's peak)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            _reset_cpu_high_water_mark()
        except PeakMemoryUnavailable:
            pass


def peak_memory_bytes(device: Union[str, torch.device, None] = None) -> int:
    """CUDA: max_memory_allocated since the last reset. CPU: this process's peak resident set size (since the
    last `reset_peak_memory` on Linux, else over the process lifetime)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if sys.platform.startswith("linux") and os.path.exists(STATUS):
        try:
            return _status_kib("VmHWM") * 1024
        except (OSError, PeakMemoryUnavailable, ValueError):
            pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
