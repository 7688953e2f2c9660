"""Reference bit packing of b-bit codes (b = 1..8), pure PyTorch.

Layout (the native kernels follow the same one): the codes form one little-endian bit stream. Element i
occupies stream bits [i*b, (i+1)*b), least significant bit first, and stream bit p lives in byte p // 8 at
bit position p % 8. A tensor of n codes packs into exactly ceil(n*b/8) bytes; the unused high bits of the
last byte are zero. Because 8 codes fill exactly b bytes, a run of codes starting at an element index that
is a multiple of 8 starts on a byte boundary: callers may pack and unpack such runs independently.

The reference works on groups of eight codes: it assembles each group into one integer (24 bits fit an
int32 for b <= 3, at most 56 bits an int64 otherwise) and splits it into b bytes. It walks the tensor in
chunks of CHUNK elements so that temporaries stay O(CHUNK) (and in cache), never O(n) wider than a byte.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import validation

__all__ = ["packed_nbytes", "pack_codes", "unpack_codes", "check_bits", "CHUNK"]

CHUNK = 1 << 20  # elements per step; a multiple of 8, so every chunk starts on a byte boundary


def check_bits(bits, label: str = "bits") -> int:
    """A code width: an int in 1..8 (`label` names it); see fewbit_dist.validation.check_bits."""
    return validation.check_bits(bits, label, 1, 8)


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that `numel` codes of `bits` bits occupy when packed: ceil(numel * bits / 8)."""
    check_bits(bits)
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    return (numel * bits + 7) // 8


def _word_dtype(bits: int) -> torch.dtype:
    return torch.int32 if bits <= 3 else torch.int64


def _shifts(step: int, count: int, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.arange(0, step * count, step, dtype=dtype, device=device)


def pack_codes(codes: torch.Tensor, bits: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) into a flat uint8 tensor of ceil(n*bits/8) bytes.

    `codes` may have any shape and integer dtype; it is read in row-major (flattened) order and never
    modified. `out`, if given, is a contiguous uint8 tensor of exactly that many bytes to write into.
    Values outside [0, 2**bits) are a caller error and are not checked (the hot path).
    """
    check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"codes must have an integer dtype, got {codes.dtype}")
    n = codes.numel()
    need = packed_nbytes(n, bits)
    if out is None:
        out = torch.empty(need, dtype=torch.uint8, device=codes.device)
    elif out.dtype != torch.uint8 or out.numel() != need or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous uint8 tensor of {need} bytes, got {out.dtype} {tuple(out.shape)}")
    flat = codes.reshape(-1)
    if bits == 8:
        out.copy_(flat)
        return out
    wdt = _word_dtype(bits)
    code_shifts = _shifts(bits, 8, wdt, codes.device)
    byte_shifts = _shifts(8, bits, wdt, codes.device)
    full = n // 8
    for g0 in range(0, full, CHUNK // 8):
        g1 = min(full, g0 + CHUNK // 8)
        groups = flat[g0 * 8: g1 * 8].view(g1 - g0, 8).to(wdt)
        # Bit fields are disjoint, so their sum is their OR.
        word = (groups << code_shifts).sum(1, dtype=wdt)
        out[g0 * bits: g1 * bits].view(g1 - g0, bits).copy_((word[:, None] >> byte_shifts) & 0xFF)
    rest = n - full * 8
    if rest:  # the last, partial group: pad with zero codes, keep only the bytes that exist
        tail = torch.zeros(8, dtype=wdt, device=codes.device)
        tail[:rest] = flat[full * 8:]
        word = (tail << code_shifts).sum(dtype=wdt)
        out[full * bits:].copy_(((word >> byte_shifts) & 0xFF)[: need - full * bits])
    return out


def unpack_codes(packed: torch.Tensor, bits: int, numel: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of `pack_codes`: the first `numel` codes as a flat tensor of `dtype` (an integer dtype)."""
    check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor, got {packed.dtype}")
    need = packed_nbytes(numel, bits)
    if packed.numel() < need:
        raise ValueError(f"packed holds {packed.numel()} bytes, {numel} codes of {bits} bits need {need}")
    flat = packed.reshape(-1)
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    if bits == 8:
        return out.copy_(flat[:numel])
    wdt = _word_dtype(bits)
    code_shifts = _shifts(bits, 8, wdt, packed.device)
    byte_shifts = _shifts(8, bits, wdt, packed.device)
    mask = (1 << bits) - 1
    full = numel // 8
    for g0 in range(0, full, CHUNK // 8):
        g1 = min(full, g0 + CHUNK // 8)
        word = (flat[g0 * bits: g1 * bits].view(g1 - g0, bits).to(wdt) << byte_shifts).sum(1, dtype=wdt)
        out[g0 * 8: g1 * 8].view(g1 - g0, 8).copy_((word[:, None] >> code_shifts) & mask)
    rest = numel - full * 8
    if rest:
        tail = torch.zeros(bits, dtype=wdt, device=packed.device)
        tail[: need - full * bits] = flat[full * bits: need]
        word = (tail << byte_shifts).sum(dtype=wdt)
        out[full * 8:].copy_(((word >> code_shifts) & mask)[:rest])
    return out
