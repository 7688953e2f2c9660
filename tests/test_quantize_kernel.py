"""The fused group quantizer fewbit::quantize_groups (LowBitLinear's input quantization in one pass): native
against the reference bit for bit (and through the CUDA kernel's span decomposition, run on the CPU), the
packed format that unpack_dequantize reads, the counter-based uniforms (unbiased rounding, seeds), bounded
temporaries of the reference, torch.library registration and torch.compile with a tensor seed."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fewbit_dist.functional.lowbit import group_ranges
from fewbit_dist.ops import native, reference

from conftest import DTYPES
from utils import require_native

SEED = torch.tensor([0x1234_5678_9ABC_DEF], dtype=torch.int64)


def shapes():
    """(name, [rows, cols] float64 input, group_size): odd widths, a group wider than the row, empty, one
    element, non-contiguous, column-strided, broadcast (stride 0), NaN and infinities, a constant group."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(37, 100, generator=g, dtype=torch.float64) * 3
    special = torch.randn(9, 20, generator=g, dtype=torch.float64)
    special[1, 3] = float("nan")
    special[2, :] = 1.5  # a constant row: all its groups constant
    special[4, 7] = float("inf")
    special[5, 0] = -float("inf")
    return [
        ("odd", base, 32), ("odd_cols", torch.randn(13, 131, generator=g, dtype=torch.float64), 7),
        ("cols_lt_group", torch.randn(5, 3, generator=g, dtype=torch.float64), 128),
        ("empty_rows", torch.empty(0, 5, dtype=torch.float64), 2),
        ("empty_cols", torch.empty(4, 0, dtype=torch.float64), 2),
        ("one", torch.tensor([[0.7]], dtype=torch.float64), 1),
        ("transposed", base.t(), 16), ("strided", base[:, ::3], 5),
        ("broadcast", torch.randn(1, 24, generator=g, dtype=torch.float64).expand(9, 24), 8),
        ("special", special, 4), ("rows_not_multiple_of_8", torch.randn(21, 9, generator=g, dtype=torch.float64), 4),
    ]


def assert_same(got, want, case):
    packed, lo, scale = got
    assert torch.equal(packed, want[0]), case
    assert torch.equal(lo.isnan(), want[1].isnan()) and torch.equal(lo.nan_to_num(), want[1].nan_to_num()), case
    assert torch.equal(scale, want[2]), case


@pytest.mark.parametrize("bits", range(2, 9))
def test_native_bit_identical_to_reference(bits):
    mod = require_native()
    for dtype in DTYPES:
        for name, x64, gs in shapes():
            x = x64.to(dtype)
            for seed in (None, SEED):
                want = reference.reference_quantize_groups(x, bits, gs, seed)
                assert want[0].numel() == math.ceil(x.numel() * bits / 8)
                assert want[1].shape == (x.shape[0], -(-x.shape[1] // gs) if x.shape[1] else 0)
                assert_same(mod.quantize_groups(x, bits, gs, seed), want, (name, dtype, seed is None))
                # the CUDA kernel's decomposition (spans, edge groups, units of eight), small spans to cross rows
                for span in (8, 24, 4096):
                    assert_same(mod.quantize_groups_spans(x, bits, gs, seed, span), want, (name, dtype, span))


def test_ranges_are_group_ranges_and_the_format_is_quantize_packs():
    """lo / scale are lowbit.group_ranges'; the packed bytes are those of quantize_pack fed the same uniforms."""
    torch.manual_seed(0)
    for dtype in DTYPES:
        x = (torch.randn(40, 70, dtype=torch.float64) * 5).to(dtype)
        for bits in (2, 3, 4, 8):
            packed, lo, scale = native.quantize_groups(x, bits, 16, SEED)
            want_lo, want_scale = group_ranges(x, bits, 16)
            assert torch.equal(lo, want_lo) and torch.equal(scale, want_scale), (dtype, bits)
            noise = reference.counter_uniforms(reference.uniform_key(SEED), 0, x.numel()).view(x.shape)
            assert torch.equal(packed, native.quantize_pack(x, lo, scale, noise, bits, 16))
            assert torch.equal(native.quantize_groups(x, bits, 16)[0], native.quantize_pack(x, lo, scale, None, bits, 16))
            x_hat = native.unpack_dequantize(packed, lo, scale, bits, 70, 16, torch.float32)
            step = scale.repeat_interleave(16, 1)[:, :70]
            assert ((x_hat - x.float()).abs() <= step * 1.0001).all()


def test_uniforms_match_the_integer_hash_written_with_python_ints():
    m = 0xFFFFFFFF

    def mix(v):
        v ^= v >> 16
        v = v * 0x7FEB352D & m
        v ^= v >> 15
        v = v * 0x846CA68B & m
        return v ^ (v >> 16)

    for seed in (0, 1, -1, 2**62 + 12345, -(2**63)):
        s = seed & (2**64 - 1)
        k0 = mix((s & m) ^ 0x9E3779B9)
        k1 = mix((s >> 32) ^ 0x85EBCA6B) ^ k0
        for start in (0, 2**32 - 3):  # across the counter's 32-bit boundary too
            want = [(mix(mix((i & m) ^ k0) ^ (((i >> 32) + k1) & m)) >> 8) / 2**24 for i in range(start, start + 6)]
            got = reference.counter_uniforms(reference.uniform_key(torch.tensor(seed)), start, 6)
            assert got.tolist() == want, (seed, start)


def test_uniforms_look_uniform_and_independent_across_seeds():
    key = reference.uniform_key(torch.tensor(7))
    n = 1 << 18
    u = reference.counter_uniforms(key, 0, n).double()
    # bounds at about 5 standard deviations of each statistic for n uniforms
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n) and abs(u.var().item() - 1 / 12) < 0.001
    assert u.min() >= 0 and u.max() < 1
    hist = torch.histc(u, bins=16, min=0, max=1)
    expected = u.numel() / 16
    assert ((hist - expected) ** 2 / expected).sum().item() < 50  # chi-square, 15 dof: p < 1e-5 above 50
    for other in (8, 7 + (1 << 32)):  # the next seed, and one differing only in the high half
        v = reference.counter_uniforms(reference.uniform_key(torch.tensor(other)), 0, n).double()
        assert abs(torch.corrcoef(torch.stack([u, v]))[0, 1].item()) < 5 / math.sqrt(n)
    lagged = torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1].item()  # neighbouring counters
    assert abs(lagged) < 5 / math.sqrt(n)


def test_stochastic_rounding_is_unbiased_over_seeds():
    torch.manual_seed(0)
    x = torch.randn(16, 96) * 2
    bits, gs, n = 2, 32, 800
    total = torch.zeros_like(x, dtype=torch.float64)
    for s in range(n):
        packed, lo, scale = native.quantize_groups(x, bits, gs, torch.tensor([s]))
        total += native.unpack_dequantize(packed, lo, scale, bits, 96, gs, torch.float32).double()
    step = scale.repeat_interleave(gs, 1).double()
    # each draw lies within one step of x, so its standard deviation is at most step / 2
    z = (total / n - x.double()).abs() / (step / 2 / math.sqrt(n))
    assert z.max() < 6, z.max()
    assert abs((total / n - x.double()).mean().item()) < 0.01 * step.mean().item()
    # nearest rounding is biased: its mean error over the same elements does not shrink with seeds
    nearest = native.unpack_dequantize(*native.quantize_groups(x, bits, gs), bits, 96, gs, torch.float32)
    assert (nearest - x).abs().mean() > 5 * (total / n - x.double()).abs().mean()


def test_seeds_change_the_codes_and_repeat_them():
    x = torch.randn(64, 256)
    a = native.quantize_groups(x, 4, 128, torch.tensor([1]))[0]
    assert torch.equal(a, native.quantize_groups(x, 4, 128, torch.tensor([1]))[0])
    assert torch.equal(a, native.quantize_groups(x, 4, 128, torch.tensor(1))[0])  # a 0-d seed too
    for other in (2, 1 + (1 << 40)):
        b = native.quantize_groups(x, 4, 128, torch.tensor([other]))[0]
        assert (a != b).float().mean() > 0.3, other
    assert not torch.equal(a, native.quantize_groups(x, 4, 128)[0])  # nearest differs from stochastic


def test_native_and_reference_ops_agree(monkeypatch):
    """The op through FEWBIT_NATIVE=0 (reference) and through the native kernel gives the same bytes."""
    require_native()
    x = torch.randn(300, 257, dtype=torch.bfloat16)
    out = {}
    for mode in ("", "0"):
        monkeypatch.setenv("FEWBIT_NATIVE", mode)
        out[mode] = native.quantize_groups(x.t(), 3, 64, SEED)
    assert_same(out[""], out["0"], "op")


class _Allocations(TorchDispatchMode):
    """Storages (pointer -> bytes) of every tensor that an aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.sizes = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                self.sizes[st.data_ptr()] = max(self.sizes.get(st.data_ptr(), 0), st.nbytes())
        return out


@pytest.mark.parametrize("cols", [1000, 20000])
def test_reference_temporaries_are_bounded(cols):
    """No temporary of the input's size: the largest tensor the reference allocates, outputs aside, holds
    at most max(HASH_CHUNK, 8 * cols) elements of 8 bytes."""
    x = torch.randn(1_000_000 // cols, cols)
    with _Allocations() as allocs:
        packed, lo, scale = reference.reference_quantize_groups(x, 8, 128, SEED)
    mine = {t.untyped_storage().data_ptr() for t in (x, packed, lo, scale)}
    temps = [n for p, n in allocs.sizes.items() if p not in mine]
    bound = 8 * max(reference.HASH_CHUNK, 8 * cols)
    assert max(temps) <= bound < x.numel() * 4, (max(temps), bound)  # below one float32 noise tensor


def test_opcheck_and_meta():
    x = torch.randn(37, 20, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.fewbit.quantize_groups.default, (x, 4, 8, SEED))
    torch.library.opcheck(torch.ops.fewbit.quantize_groups.default, (x.t(), 3, 5, None))
    packed, lo, scale = native.quantize_groups(torch.empty(1000, 77, device="meta"), 3, 32,
                                               torch.empty(1, dtype=torch.int64, device="meta"))
    assert packed.shape == (math.ceil(1000 * 77 * 3 / 8),) and packed.dtype == torch.uint8
    assert lo.shape == scale.shape == (1000, 3) and lo.dtype == torch.float32


def test_compiles_as_one_graph_with_a_tensor_seed():
    """A tensor seed drawn inside the compiled function: no .item(), one graph, the eager bytes."""

    def save(x, gen_seed):
        seed = (gen_seed * 6364136223846793005 + 1442695040888963407).reshape(1)
        packed, lo, scale = native.quantize_groups(x, 4, 32, seed)
        return packed, lo, scale, native.unpack_dequantize(packed, lo, scale, 4, x.shape[1], 32, torch.float32)

    x, s = torch.randn(50, 70), torch.tensor(11)
    compiled = torch.compile(save, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(x, s), save(x, s)):
        assert torch.equal(got, want)
    assert not torch.equal(compiled(x, s + 1)[0], save(x, s)[0])  # the seed is an input, not a constant


@pytest.mark.parametrize("kwargs, exc, msg", [
    (dict(x2=torch.randn(3, 4, 5)), TypeError, "x2 must be a 2-D floating-point tensor"),
    (dict(x2=torch.ones(3, 4, dtype=torch.int32)), TypeError, "x2 must be a 2-D floating-point tensor"),
    (dict(bits=1), ValueError, r"bits must be an int in 2\.\.8"),
    (dict(bits=9), ValueError, r"bits must be an int in 2\.\.8"),
    (dict(bits=4.0), TypeError, r"bits must be an int in 2\.\.8"),
    (dict(group_size=0), ValueError, "group_size must be a positive int"),
    (dict(group_size="2"), TypeError, "group_size must be a positive int"),
    (dict(seed=5), TypeError, "seed must be None .* or a one-element int64 tensor"),
    (dict(seed=torch.tensor([1, 2])), TypeError, "seed must be None"),
    (dict(seed=torch.tensor([1.0])), TypeError, "seed must be None"),
    (dict(seed=torch.tensor([1], device="meta")), ValueError, "seed must be on the CPU or on x2's device"),
])
def test_bad_arguments(kwargs, exc, msg):
    args = dict(x2=torch.randn(3, 4), bits=4, group_size=2, seed=None) | kwargs
    with pytest.raises(exc, match=msg):
        native.quantize_groups(**args)
