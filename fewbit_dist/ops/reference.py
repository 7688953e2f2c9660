"""Pure-PyTorch reference of every native kernel: what the library falls back to without a compiler, and what
the tests compare the CPU and CUDA kernels against, bit for bit.

All loops walk their tensors in chunks (about CHUNK elements, a whole number of bytes of the packed stream), so
temporaries stay O(chunk) and never O(n) wider than a byte.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..quant.packing import CHUNK, pack_codes, packed_nbytes, unpack_codes

__all__ = ["encode_with_borders", "encode_pack_chunked", "reference_encode_pack", "reference_unpack_scale",
           "row_chunk", "reference_quantize_pack", "reference_unpack_dequantize", "reference_group_ranges",
           "reference_quantize_groups", "mix32", "uniform_key", "counter_uniforms", "HASH_CHUNK"]

def encode_with_borders(x: torch.Tensor, borders: torch.Tensor) -> torch.Tensor:
    """The number of `borders` <= x, compared in borders' dtype; NaN gets code 0."""
    xs = x.to(borders.dtype)
    if borders.numel() <= 15:  # up to 4 bits: a few comparisons beat a binary search
        codes = (xs >= borders[0]).to(torch.uint8)
        for i in range(1, borders.numel()):
            codes += xs >= borders[i]
        return codes
    codes = torch.bucketize(xs.contiguous(), borders, right=True, out_int32=True)
    return codes.masked_fill_(xs.isnan(), 0)


def encode_pack_chunked(x: torch.Tensor, encode, bits: int) -> torch.Tensor:
    """pack_codes(encode(x), bits), a chunk at a time so that the codes never exist for all of x at once."""
    flat = x.reshape(-1)
    n = flat.numel()
    packed = torch.empty(packed_nbytes(n, bits), dtype=torch.uint8, device=x.device)
    for s in range(0, n, CHUNK):  # CHUNK is a multiple of 8: each chunk starts on a byte boundary
        e = min(n, s + CHUNK)
        pack_codes(encode(flat[s:e]), bits, out=packed[s * bits // 8: packed_nbytes(e, bits)])
    return packed


def reference_encode_pack(x: torch.Tensor, borders: torch.Tensor, bits: int) -> torch.Tensor:
    return encode_pack_chunked(x, lambda chunk: encode_with_borders(chunk, borders), bits)


def reference_unpack_scale(packed: torch.Tensor, levels: torch.Tensor, grad: torch.Tensor, bits: int) -> torch.Tensor:
    g = grad.reshape(-1)
    n = g.numel()
    out = torch.empty(n, dtype=grad.dtype, device=grad.device)
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        codes = unpack_codes(packed[s * bits // 8: packed_nbytes(e, bits)], bits, e - s, dtype=torch.int32)
        out[s:e] = levels.index_select(0, codes) * g[s:e].to(levels.dtype)
    return out.view(grad.shape)


def row_chunk(cols: int) -> int:
    """Rows per step of the row-chunked loops: about CHUNK elements, a multiple of 8 rows so that every
    step starts on a byte boundary of the packed stream."""
    return max(8, (CHUNK // max(cols, 1)) // 8 * 8)


def _per_element(table: torch.Tensor, cols: int, group_size: int) -> torch.Tensor:
    """[rows, groups] -> [rows, cols]: each group's value repeated over its columns."""
    return table.repeat_interleave(group_size, dim=1)[:, :cols]


def reference_quantize_pack(x: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, noise, bits: int,
                            group_size: int) -> torch.Tensor:
    rows, cols = x.shape
    qmax = (1 << bits) - 1
    packed = torch.empty(packed_nbytes(rows * cols, bits), dtype=torch.uint8, device=x.device)
    step = row_chunk(cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        u = noise[r0:r1] if noise is not None else 0.5
        # three separately rounded float32 operations, as in fewbit::quantize_affine
        t = (x[r0:r1].float() - _per_element(lo[r0:r1], cols, group_size)) / _per_element(scale[r0:r1], cols,
                                                                                           group_size) + u
        codes = t.floor_().clamp_(0, qmax).nan_to_num_(0.0).to(torch.uint8)
        pack_codes(codes, bits, out=packed[r0 * cols * bits // 8: packed_nbytes(r1 * cols, bits)])
    return packed


def reference_unpack_dequantize(packed: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, bits: int, cols: int,
                                group_size: int, dtype: torch.dtype) -> torch.Tensor:
    rows = lo.shape[0]
    out = torch.empty(rows, cols, dtype=dtype, device=lo.device)
    step = row_chunk(cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        codes = unpack_codes(packed[r0 * cols * bits // 8: packed_nbytes(r1 * cols, bits)], bits, (r1 - r0) * cols,
                             dtype=torch.int32).view(r1 - r0, cols)
        # a product and a sum, each rounded to float32, as in fewbit::dequantize_affine
        out[r0:r1] = codes.float() * _per_element(scale[r0:r1], cols, group_size) + _per_element(lo[r0:r1], cols,
                                                                                              group_size)
    return out



# ------------------------------------------------------------------------------- fused group quantizer
#
# Counter-based uniforms, the same integer arithmetic as csrc/include/fewbit/core.h (see there for the
# definition). Why the int64 torch ops below are exact: every value is kept in [0, 2^32) by masking, and a
# 32 x 32-bit product modulo 2^32 is formed from 16-bit halves of the constant, x * c_lo < 2^48 and
# ((x * c_hi) mod 2^16) << 16 < 2^32, so no intermediate comes near 2^63: int64 never overflows and every
# operation is the exact integer one. Shifts act on non-negative values, so arithmetic and logical shifts
# agree; (h >> 8) < 2^24 converts to float32 exactly and the product with 2^-24 is exact.

_M32 = 0xFFFFFFFF
HASH_CHUNK = 1 << 16  # elements per step of the int64 hash: its temporaries stay a few hundred KiB


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x int64 in [0, 2^32) and a constant c < 2^32, without int64 overflow."""
    high = (x * (c >> 16)).bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return (x * (c & 0xFFFF)).add_(high).bitwise_and_(_M32)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """fewbit::mix32 on int64 values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x ^= x >> 15
    x = _mul32(x, 0x846CA68B)
    x ^= x >> 16
    return x


def uniform_key(seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(k0, k1), int64 scalars in [0, 2^32), from a one-element int64 seed tensor (no host synchronization)."""
    s = seed.reshape(())
    k0 = mix32((s & _M32) ^ 0x9E3779B9)
    k1 = mix32(((s >> 32) & _M32) ^ 0x85EBCA6B) ^ k0
    return k0, k1


def counter_uniforms(key: tuple[torch.Tensor, torch.Tensor], start: int, count: int,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The float32 uniforms of counters start, ..., start + count - 1, in [0, 1) with 24 random bits, into
    `out` (float32, `count` elements) if given; computed HASH_CHUNK counters at a time."""
    k0, k1 = key
    if out is None:
        out = torch.empty(count, dtype=torch.float32, device=k0.device)
    for s in range(0, count, HASH_CHUNK):
        e = min(count, s + HASH_CHUNK)
        i = torch.arange(start + s, start + e, dtype=torch.int64, device=k0.device)
        high = (i >> 32).add_(k1).bitwise_and_(_M32)
        h = mix32(mix32(i.bitwise_and_(_M32).bitwise_xor_(k0)).bitwise_xor_(high))
        out[s:e] = h.bitwise_right_shift_(8).to(torch.float32).mul_(2.0 ** -24)
    return out


def reference_group_ranges(xf: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, scale) of a float32 [rows, cols] chunk, as fewbit_dist.functional.lowbit.group_ranges: the group's
    min (NaN if any value is NaN), and (max - min) / (2^bits - 1) rounded up by one ulp, or 1 where max > min
    fails. The divisor is a tensor on the input's device, so it is a true division on every device."""
    rows, cols = xf.shape
    groups = -(-cols // group_size)
    pad = groups * group_size - cols
    if pad:  # repeat the row's last value into the short last group: min and max are unchanged
        xf = torch.cat([xf, xf[:, -1:].expand(rows, pad)], 1)
    lo, hi = torch.aminmax(xf.view(rows, groups, group_size), dim=-1)
    qmax = torch.full((), float((1 << bits) - 1), dtype=torch.float32, device=xf.device)
    step = torch.nextafter((hi - lo) / qmax, torch.full((), math.inf, device=xf.device))
    return lo, torch.where(hi > lo, step, torch.ones_like(step))


def quantize_rows_chunk(cols: int) -> int:
    """Rows per step of reference_quantize_groups: about HASH_CHUNK elements, a multiple of 8 rows (so each
    step starts on a byte of the packed stream)."""
    return max(8, (HASH_CHUNK // max(cols, 1)) // 8 * 8)


def reference_quantize_groups(x2: torch.Tensor, bits: int, group_size: int,
                              seed: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed, lo, scale) of a [rows, cols] input: the reference of fewbit::quantize_groups. Rows are taken
    quantize_rows_chunk(cols) at a time, so the float32 and int64 temporaries hold about
    max(HASH_CHUNK, 8 * cols) elements, whatever the input's size (and never a noise tensor of its size)."""
    rows, cols = x2.shape
    groups = -(-cols // group_size) if cols else 0
    qmax = (1 << bits) - 1
    device = x2.device
    packed = torch.empty(packed_nbytes(rows * cols, bits), dtype=torch.uint8, device=device)
    lo = torch.empty(rows, groups, dtype=torch.float32, device=device)
    scale = torch.empty(rows, groups, dtype=torch.float32, device=device)
    if rows * cols == 0:
        return packed, lo, scale
    key = uniform_key(seed.to(device)) if seed is not None else None
    step = quantize_rows_chunk(cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        xf = x2[r0:r1].to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        lo_c, scale_c = reference_group_ranges(xf, bits, group_size)
        lo[r0:r1], scale[r0:r1] = lo_c, scale_c
        # three separately rounded float32 operations, as in fewbit::quantize_affine
        t = xf.sub_(_per_element(lo_c, cols, group_size)).div_(_per_element(scale_c, cols, group_size))
        if key is None:
            t.add_(0.5)
        else:
            t.add_(counter_uniforms(key, r0 * cols, (r1 - r0) * cols).view(r1 - r0, cols))
        codes = t.floor_().clamp_(0, qmax).nan_to_num_(0.0).to(torch.uint8)
        pack_codes(codes, bits, out=packed[r0 * cols * bits // 8: packed_nbytes(r1 * cols, bits)])
    return packed, lo, scale
