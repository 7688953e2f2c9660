import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fewbit_dist.quant import pack_codes, packed_nbytes, unpack_codes


def bitstream_reference(codes, bits):
    """Independent reading of the documented layout: LSB-first bit stream, element i at bits [i*b, (i+1)*b)."""
    out = bytearray(packed_nbytes(len(codes), bits))
    for i, c in enumerate(codes):
        for j in range(bits):
            if (c >> j) & 1:
                p = i * bits + j
                out[p // 8] |= 1 << (p % 8)
    return bytes(out)


@settings(max_examples=300, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_round_trip_and_layout(bits, data):
    codes = data.draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=70))
    t = torch.tensor(codes, dtype=torch.int64)
    packed = pack_codes(t, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(len(codes) * bits / 8)
    assert packed.untyped_storage().nbytes() == packed.numel()  # no hidden slack in the storage
    assert bytes(packed.tolist()) == bitstream_reference(codes, bits)
    assert unpack_codes(packed, bits, len(codes)).tolist() == codes


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64])
def test_input_dtypes_and_shapes_and_no_aliasing(dtype):
    codes = torch.randint(0, 8, (3, 7, 5), dtype=dtype)
    keep = codes.clone()
    packed = pack_codes(codes.transpose(0, 2), 3)  # non-contiguous, read in row-major order
    assert torch.equal(codes, keep)
    assert torch.equal(unpack_codes(packed, 3, codes.numel()), codes.transpose(0, 2).reshape(-1).long())


@pytest.mark.parametrize("n", [1_000_003, 8 * 12345])
@pytest.mark.parametrize("bits", range(1, 9))
def test_large_sizes(n, bits):
    codes = torch.randint(0, 1 << bits, (n,), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.numel() == (n * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, bits, n), codes.long())


def test_bad_arguments():
    with pytest.raises(ValueError, match="bits must be an int in 1..8"):
        pack_codes(torch.zeros(3, dtype=torch.int64), 9)
    with pytest.raises(ValueError, match="bits must be an int in 1..8"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 0, 3)
    with pytest.raises(TypeError, match="bits must be an int"):
        pack_codes(torch.zeros(3, dtype=torch.int64), 2.0)
    with pytest.raises(TypeError, match="integer dtype"):
        pack_codes(torch.zeros(3), 2)
    with pytest.raises(TypeError, match="uint8"):
        unpack_codes(torch.zeros(3, dtype=torch.int32), 2, 3)
    with pytest.raises(ValueError, match="need"):
        unpack_codes(torch.zeros(1, dtype=torch.uint8), 3, 8)
    with pytest.raises(ValueError, match="numel"):
        packed_nbytes(-1, 3)
