"""The real peak memory of single compressed ops: what each holds beyond its outputs stays within a fixed chunk.

Each op runs on a large input in a fresh process started with MALLOC_MMAP_THRESHOLD_=65536, so every tensor
above 64 KiB is its own mapping, returned to the OS when freed, and the peak resident set above a region's
start (fewbit_dist.memory.PeakMemory) is the memory the region held at its highest (to the page). Each op
runs once before it is measured, so the math libraries' first-use buffers are not counted.

The bounds are the op's own outputs (and, in backward, the gradients it must return) plus the chunk its
implementation promises, plus 3 MiB of slack (small tensors, per-group ranges, the allocator's rounding).
Building the whole rebuilt input (LowBitLinear's weight gradient), the gated product's four tensors of the MLP's
width, or the loss's logits of the whole batch each exceeds its bound by a multiple of the slack.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

MiB = 1 << 20
SLACK = 3 * MiB

CHILD = r"""
import json, sys
import torch
import torch.nn.functional as F
from fewbit_dist.memory import PeakMemory
from fewbit_dist.functional import shared_input
from fewbit_dist.functional.gated import gated_product
from fewbit_dist.functional.lowbit import low_bit_linear
from fewbit_dist.functional.loss import linear_cross_entropy_sum
from fewbit_dist.functional.norm import rms_norm

torch.set_num_threads(1)
out = {}


def nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts)


def run(name, build):
    # build() -> (inputs needing grad, forward closure); the forward's output is back-propagated with a fixed
    # upstream gradient made before the backward region starts.
    for measured in (False, True):
        leaves, fwd = build()
        with PeakMemory("cpu") as pf:
            y = fwd()
        g = torch.ones_like(y) if y.dim() == 0 else torch.randn_like(y)
        with PeakMemory("cpu") as pb:
            y.backward(g)
        if measured:
            out[name] = dict(fwd_peak=pf.peak_bytes, fwd_out=nbytes(y), bwd_peak=pb.peak_bytes,
                             grads=nbytes(*(t.grad for t in leaves)))
        del y, g, leaves, fwd
        shared_input.clear()


def lowbit():
    x = torch.randn(8192, 1024, requires_grad=True)  # 32 MiB
    w = torch.randn(1024, 1024, requires_grad=True)
    return [x, w], lambda: low_bit_linear(x, w, None, bits=4, generator=torch.Generator().manual_seed(0))


def gated():
    gate = torch.randn(4096, 1536, requires_grad=True)  # 24 MiB each
    up = torch.randn(4096, 1536, requires_grad=True)
    return [gate, up], lambda: gated_product(gate, up, F.silu, mode="compressed", bits=4,
                                             generator=torch.Generator().manual_seed(0))


def gated_down():
    # the down projection reads h: it shares the gated product's codes and rebuilds h for its weight gradient
    gate = torch.randn(4096, 1536, requires_grad=True)
    up = torch.randn(4096, 1536, requires_grad=True)
    w = torch.randn(576, 1536, requires_grad=True)
    def fwd():
        gen = torch.Generator().manual_seed(0)
        h = gated_product(gate, up, F.silu, mode="compressed", bits=4, generator=gen)
        return low_bit_linear(h, w, None, bits=4, generator=gen)
    return [gate, up, w], fwd


def loss():
    h = torch.randn(8192, 576, requires_grad=True)  # 18 MiB; the whole batch's logits would be 256 MiB
    w = torch.randn(8192, 576, requires_grad=True)
    t = torch.randint(0, 8192, (8192,))
    return [h, w], lambda: linear_cross_entropy_sum(h, w, None, t, 1.0 / 8192)


def norm_reader():
    # a compressed RMSNorm and a low-bit projection reading its output (it shares the norm's codes): backward
    # rebuilds the output in chunks for the projection's weight gradient and the norm's h in chunks for its own
    x = torch.randn(8192, 1024, requires_grad=True)  # 32 MiB
    nw = torch.ones(1024, requires_grad=True)
    w = torch.randn(1024, 1024, requires_grad=True)
    def fwd():
        gen = torch.Generator().manual_seed(0)
        y = rms_norm(x, nw, 1e-6, mode="compressed", bits=4, group_size=128, generator=gen)
        return low_bit_linear(y, w, None, bits=4, generator=gen)
    return [x, nw, w], fwd


run("lowbit", lowbit)
run("norm_reader", norm_reader)
run("gated", gated)
run("gated_down", gated_down)
run("loss", loss)
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def peaks():
    if not sys.platform.startswith("linux"):
        pytest.skip("PeakMemory on CPU reads Linux's /proc")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _mib(n):
    return f"{n / MiB:.1f} MiB"


def test_lowbit_linear_forward_holds_its_output_and_codes_only(peaks):
    r = peaks["lowbit"]
    codes = 8192 * 1024 * 4 // 8 + 2 * 8192 * 8 * 4  # 4-bit codes + float32 lo and scale per group of 128
    assert r["fwd_peak"] <= r["fwd_out"] + codes + SLACK, (_mib(r["fwd_peak"]), _mib(r["fwd_out"] + codes))


def test_lowbit_linear_backward_rebuilds_its_input_in_bounded_chunks(peaks):
    from fewbit_dist.functional.linear import RESTORE_CHUNK_BYTES

    r = peaks["lowbit"]
    # grad_x (32 MiB) and grad_W (4 MiB) are returned; a rebuilt chunk of at most RESTORE_CHUNK_BYTES besides
    assert r["bwd_peak"] <= r["grads"] + RESTORE_CHUNK_BYTES + SLACK, (_mib(r["bwd_peak"]), _mib(r["grads"]))


def test_gated_product_backward_holds_chunks_not_tensors_of_the_mlps_width(peaks):
    from fewbit_dist.functional.gated import GATED_CHUNK_BYTES

    r = peaks["gated"]
    # forward: h and the codes of gate and up (4 bits each), no temporary of the MLP's width
    codes = 2 * (4096 * 1536 // 2 + 2 * 4096 * 12 * 4)
    assert r["fwd_peak"] <= r["fwd_out"] + codes + SLACK, (_mib(r["fwd_peak"]), _mib(r["fwd_out"] + codes))
    # backward: the two gradients (48 MiB) and a handful of chunk-sized pieces; autograd's way (whole gate, up,
    # act(gate), act's backward and the products) would hold about five 24 MiB tensors more
    assert r["bwd_peak"] <= r["grads"] + 8 * GATED_CHUNK_BYTES + SLACK, (_mib(r["bwd_peak"]), _mib(r["grads"]))


def test_down_projection_rebuilds_the_gated_product_in_chunks(peaks):
    from fewbit_dist.functional.linear import RESTORE_CHUNK_BYTES

    r = peaks["gated_down"]
    # grad_h lives between the two backwards; beside it the gradients, and either the gated product's chunks
    # or the down projection's rebuilt rows of h (RESTORE_CHUNK_BYTES over the recipe's row_cost of 2, twice)
    grad_h = 4096 * 1536 * 4
    assert r["bwd_peak"] <= r["grads"] + grad_h + RESTORE_CHUNK_BYTES + SLACK, (
        _mib(r["bwd_peak"]), _mib(r["grads"] + grad_h))


def test_compressed_norm_and_its_reader_rebuild_in_chunks(peaks):
    from fewbit_dist.functional.linear import RESTORE_CHUNK_BYTES
    from fewbit_dist.functional.norm import NORM_CHUNK_BYTES

    r = peaks["norm_reader"]
    # the projection's grad_x (32 MiB) lives while the norm's backward runs; beside it the gradients and
    # either the projection's rebuilt rows of the norm's output or the norm's chunks (h, its products). The
    # whole tensors would be a float32 h and the norm's output (64 MiB), then four input-sized products.
    grad_y = 8192 * 1024 * 4
    assert r["bwd_peak"] <= r["grads"] + grad_y + RESTORE_CHUNK_BYTES + 6 * NORM_CHUNK_BYTES + SLACK, (
        _mib(r["bwd_peak"]), _mib(r["grads"] + grad_y))


def test_fused_loss_holds_one_chunk_of_logits(peaks):
    from fewbit_dist.functional.loss import chunk_rows_for

    r = peaks["loss"]
    chunk = chunk_rows_for(8192) * 8192 * 4  # the one float32 logits buffer, reused for every chunk
    # forward forms grad_h and grad_W (18 MiB each) for backward; the whole batch's logits would be 256 MiB
    held = 2 * 8192 * 576 * 4
    assert r["fwd_peak"] <= held + chunk + SLACK, (_mib(r["fwd_peak"]), _mib(held + chunk))
    # backward only scales what forward formed: the returned gradients are those tensors
    assert r["bwd_peak"] <= r["grads"] + SLACK, (_mib(r["bwd_peak"]), _mib(r["grads"]))
