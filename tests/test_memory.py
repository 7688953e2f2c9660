import torch
from torch import nn

from fewbit_dist.memory import SavedTensorMeter, format_bytes, peak_memory_bytes, saved_activation_bytes


def test_counts_distinct_storages_once():
    x = torch.randn(100, requires_grad=True)
    with SavedTensorMeter() as meter:
        y = x * 2  # saves nothing of x (constant factor)
        z = y.exp()  # saves its output
        w = y.sin()  # saves y
        v = (z * w).sum()  # saves z and w
    assert meter.nbytes == 3 * 400  # y, exp(y), sin(y): each storage once
    assert meter.saved_count >= 4
    v.backward()


def test_views_count_their_whole_storage_and_parameters_are_excluded():
    lin = nn.Linear(8, 4)
    x = torch.randn(10, 8)
    with SavedTensorMeter(lin) as meter:
        lin(x).sum()
    assert meter.nbytes == x.numel() * 4  # the input; never the weight
    big = torch.randn(100, 10, requires_grad=True)
    with SavedTensorMeter() as meter:
        big[:1].exp()  # saves a (1, 10) result: its own storage
        (big * 1)[:1].sin()  # saves a view of a (100, 10) temporary: the whole storage stays alive
    assert meter.nbytes == 40 + 4000


def test_explicit_tensor_exclusion_and_helpers():
    x = torch.randn(50, requires_grad=True)
    y = x * 1
    with SavedTensorMeter(exclude=[y]) as meter:
        y.sin()
    assert meter.nbytes == 0
    assert saved_activation_bytes(nn.Sequential(nn.Linear(4, 4), nn.Tanh()), torch.randn(3, 4)) == 3 * 4 * 4 * 2
    assert peak_memory_bytes() > 0
    assert format_bytes(1536) == "1.50 KiB" and format_bytes(12) == "12 B"


def test_a_forward_without_backward_under_the_meter_leaks_nothing():
    """The meter's pack hook must not tie a saved output to its own node (a cycle the GC cannot see): once the
    forward's results are dropped, the tensors it saved are freed. (Watched through weak references to those
    tensors, not a count of all live tensors, which other tests' caches change.)"""
    import gc
    import weakref

    w = torch.randn(20, 20, requires_grad=True)
    x = torch.randn(8, 20)
    refs = []
    for _ in range(5):
        with SavedTensorMeter() as meter:
            y = torch.sigmoid(x @ w)  # sigmoid saves its output
            y.sum()
        refs.append(weakref.ref(y))
        del y
    gc.collect()
    assert [r() for r in refs] == [None] * 5
    assert meter.nbytes == 2 * 8 * 20 * 4  # x (for grad w) and the output


# -- PeakMemory ----------------------------------------------------------------------------------------------

import mmap  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from fewbit_dist import memory  # noqa: E402
from fewbit_dist.memory import PeakMemory, PeakMemoryUnavailable  # noqa: E402

linux_proc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU peak reads Linux's /proc")
MIB = 2**20
BIG = 64 * MIB  # above glibc's largest mmap threshold: allocated and returned to the OS as a whole
SLACK = 8 * MIB  # the interpreter, the allocator and page-table noise around the tensor


def touch(nbytes):
    """Map `nbytes` of fresh anonymous memory, fill it through a tensor (so every page is resident) and unmap it.

    Mapped directly rather than through torch's allocator: glibc serves a malloc below its dynamic mmap threshold
    (which rises to the size of the last freed mapping, up to 32 MiB) from heap pages that may already be
    resident, and those add nothing to the RSS the meter reads, so the size of a region's peak would depend on
    what the suite allocated before."""
    buf = mmap.mmap(-1, nbytes)
    t = torch.frombuffer(buf, dtype=torch.uint8)
    t.fill_(1)
    del t
    buf.close()


@linux_proc
def test_cpu_peak_is_the_size_of_a_freed_tensor():
    with PeakMemory() as pm:
        touch(BIG)
    assert BIG - SLACK <= pm.peak_bytes <= BIG + SLACK, pm.peak_bytes
    assert abs(pm.end_bytes) < SLACK  # freed: the region leaves nothing behind
    assert pm.start_bytes > 0
    with PeakMemory("cpu") as pm:  # nothing allocated: no peak
        pass
    assert 0 <= pm.peak_bytes < SLACK


@linux_proc
def test_cpu_peak_counts_from_the_region_start_not_the_process_peak():
    touch(2 * BIG)  # an earlier, larger peak of the process
    with PeakMemory() as pm:
        touch(BIG // 2)
    assert BIG // 2 - SLACK <= pm.peak_bytes <= BIG // 2 + SLACK, pm.peak_bytes
    kept = torch.ones(BIG // 4)  # memory held from before the region does not count either
    with PeakMemory() as pm:
        touch(BIG // 2)
    assert pm.peak_bytes <= BIG // 2 + SLACK
    del kept


@linux_proc
def test_nested_meters_keep_the_outer_peak_and_a_meter_can_be_reused():
    outer, inner = PeakMemory(), PeakMemory()
    with outer:
        touch(BIG)  # before the inner meter resets the high-water mark
        with inner:
            touch(BIG // 2)
        touch(BIG // 4)  # after the inner meter
    assert BIG - SLACK <= outer.peak_bytes <= BIG + SLACK, outer.peak_bytes
    assert BIG // 2 - SLACK <= inner.peak_bytes <= BIG // 2 + SLACK, inner.peak_bytes
    with outer:  # reused: measures afresh
        touch(BIG // 4)
    assert BIG // 4 - SLACK <= outer.peak_bytes <= BIG // 4 + SLACK, outer.peak_bytes
    with outer:
        with pytest.raises(RuntimeError, match="already measuring"):
            outer.__enter__()


def test_peak_meter_errors_name_the_cause(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="device must be"):
        PeakMemory("meta")
    monkeypatch.setattr(memory, "CLEAR_REFS", str(tmp_path / "no-such-dir" / "clear_refs"))
    monkeypatch.setattr(memory.sys, "platform", "linux")
    with pytest.raises(PeakMemoryUnavailable, match="clear_refs failed"):
        with PeakMemory():
            pass
    assert PeakMemory._open == []  # a failed entry leaves no open meter behind
    memory.reset_peak_memory()  # the older helper stays silent where the reset is impossible
    monkeypatch.setattr(memory.sys, "platform", "darwin")
    with pytest.raises(PeakMemoryUnavailable, match="needs Linux.*darwin"):
        PeakMemory().__enter__()


def test_peak_meter_reads_the_status_file(monkeypatch, tmp_path):
    """The CPU figures come from VmRSS at the start and VmHWM at the end (fake /proc files)."""
    status, clear = tmp_path / "status", tmp_path / "clear_refs"
    monkeypatch.setattr(memory, "STATUS", str(status))
    monkeypatch.setattr(memory, "CLEAR_REFS", str(clear))
    monkeypatch.setattr(memory.sys, "platform", "linux")
    status.write_text("Name:\tpython\nVmHWM:\t    1000 kB\nVmRSS:\t    1000 kB\n")
    with PeakMemory() as pm:
        assert clear.read_text() == "5"
        status.write_text("VmHWM:\t    5000 kB\nVmRSS:\t    1500 kB\n")
    assert pm.start_bytes == 1000 * 1024 and pm.peak_bytes == 4000 * 1024 and pm.end_bytes == 500 * 1024
    status.write_text("VmRSS:\t    1000 kB\n")
    with pytest.raises(PeakMemoryUnavailable, match="no VmHWM"):
        with PeakMemory():
            pass


def test_excluded_storages_are_held_so_their_identity_is_not_reused():
    """A wrapper that swaps a parameter's storage during the forward (ZeRO-3 replaces its placeholder with the
    gathered tensor) frees the storage the meter excluded; a new activation must not inherit its identity."""
    from fewbit_dist.memory import SavedTensorMeter

    lin = torch.nn.Linear(8, 8)
    with SavedTensorMeter(lin) as meter:
        for _ in range(20):  # every forward frees the old placeholder and allocates new tensors
            lin.weight.data = torch.randn(8, 8)
            torch.nn.functional.gelu(lin(torch.randn(4, 8, requires_grad=True)))
    assert meter.nbytes == 20 * (4 * 8 * 4 + 4 * 8 * 4)  # each forward: the linear's input and the GELU's input
