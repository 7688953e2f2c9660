"""Reference bit packing of b-bit codes (b = 1..8), pure PyTorch.

Layout (the native kernels follow the same one): the codes form one little-endian bit stream. Element i
occupies stream bits [i*b, (i+1)*b), least significant bit first, and stream bit p lives in byte p // 8 at
bit position p % 8. A tensor of n codes packs into exactly ceil(n*b/8) bytes; the unused high bits of the
last byte are zero.

Eight codes of b bits fill exactly b bytes, so the reference works on groups of eight: it assembles each
group into one integer (at most 56 bits for b <= 7; b = 8 is the identity) and splits it into b bytes.
Temporaries are O(n) bytes, nothing of size n*b.
"""

from __future__ import annotations

import torch

__all__ = ["packed_nbytes", "pack_codes", "unpack_codes"]


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int in 1..8, got {type(bits).__name__}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    return bits


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that `numel` codes of `bits` bits occupy when packed: ceil(numel * bits / 8)."""
    _check_bits(bits)
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    return (numel * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) into a flat uint8 tensor of ceil(n*bits/8) bytes.

    `codes` may have any shape and integer dtype; it is read in row-major (flattened) order. Values outside
    [0, 2**bits) are a caller error and are not checked here (the hot path); use `unpack_codes` to verify.
    """
    _check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"codes must have an integer dtype, got {codes.dtype}")
    n = codes.numel()
    flat = codes.reshape(-1)
    if bits == 8:
        return flat.to(torch.uint8, copy=True)
    need = packed_nbytes(n, bits)
    # Allocate exactly `need` bytes: full groups of 8 codes write straight into it; the last, partial group
    # is assembled apart and copied in (a slice of a larger buffer would keep the larger storage alive).
    out = torch.empty(need, dtype=torch.uint8, device=codes.device)
    full = n // 8
    if full:
        _pack_groups(flat[: full * 8].view(full, 8), bits, out[: full * bits].view(full, bits))
    rest = n - full * 8
    if rest:
        tail = torch.zeros(1, 8, dtype=flat.dtype, device=codes.device)
        tail[0, :rest] = flat[full * 8:]
        tail_bytes = torch.empty(1, bits, dtype=torch.uint8, device=codes.device)
        _pack_groups(tail, bits, tail_bytes)
        out[full * bits:] = tail_bytes.view(-1)[: need - full * bits]
    return out


def _pack_groups(groups: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """groups: (G, 8) integer codes -> out: (G, bits) uint8."""
    word = groups[:, 0].to(torch.int64, copy=True)  # never alias the caller's codes
    for j in range(1, 8):
        word |= groups[:, j].to(torch.int64) << (j * bits)
    for k in range(bits):
        out[:, k] = (word >> (8 * k)) & 0xFF


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack_codes`: the first `numel` codes as a flat int64 tensor."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor, got {packed.dtype}")
    need = packed_nbytes(numel, bits)
    if packed.numel() < need:
        raise ValueError(f"packed holds {packed.numel()} bytes, {numel} codes of {bits} bits need {need}")
    flat = packed.reshape(-1)
    if bits == 8:
        return flat[:numel].to(torch.int64)
    groups = (numel + 7) // 8
    padded = torch.zeros(groups * bits, dtype=torch.int64, device=packed.device)
    padded[:need] = flat[:need]
    padded = padded.view(groups, bits)
    word = padded[:, 0].clone()
    for k in range(1, bits):
        word |= padded[:, k] << (8 * k)
    mask = (1 << bits) - 1
    out = torch.empty(groups, 8, dtype=torch.int64, device=packed.device)
    for j in range(8):
        out[:, j] = (word >> (j * bits)) & mask
    return out.reshape(-1)[:numel]
