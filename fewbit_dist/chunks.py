"""Row chunks for the chunked loops of backward and the fused loss, and the memory planner's shortcut
through them.

Every chunked loop in the package (the gated MLP's backward, the rebuilt input's weight gradient, the fused
loss) writes each chunk into buffers allocated once, or adds it to one accumulator, and frees the chunk's
temporaries before the next one: after the first chunk, every chunk allocates and frees the same bytes, and
the last may be shorter. So a memory trace (fewbit_dist.plan, under FakeTensorMode, where no value is
computed) sees the same live bytes at every step if it runs only the first two chunks and the last one.
`steady_state_chunks()` turns that on; it refuses to run outside FakeTensorMode, where skipping chunks would
leave real gradients unwritten. The loops draw their starts from `chunk_starts`.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager

import torch

__all__ = ["chunk_starts", "steady_state_chunks"]

_STEADY = contextvars.ContextVar("fewbit_dist_steady_state_chunks", default=False)


def chunk_starts(n: int, step: int):
    """The starts 0, step, 2 step, ... below `n`; inside `steady_state_chunks()`, the first two and the last."""
    if step < 1:
        raise ValueError(f"step must be a positive number of rows, got {step}")
    starts = range(0, n, step)
    if torch.compiler.is_compiling():  # torch.compile cannot trace a ContextVar; a memory trace never compiles
        return starts
    if _STEADY.get() and len(starts) > 3:
        return (starts[0], starts[1], starts[-1])
    return starts


@contextmanager
def steady_state_chunks():
    """Run chunked loops as the first two chunks and the last (see the module docstring). Only under
    FakeTensorMode: the trace sees every allocation, and no value is computed that could be missed."""
    from torch._guards import active_fake_mode

    if active_fake_mode() is None:
        raise RuntimeError("steady_state_chunks() skips chunks, so it runs only under FakeTensorMode (a memory "
                           "trace); outside it gradients would be left unwritten")
    token = _STEADY.set(True)
    try:
        yield
    finally:
        _STEADY.reset(token)
