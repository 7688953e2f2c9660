import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import fewbit_dist
from fewbit_dist import LowBitLinear
from fewbit_dist.functional.linear import draw_seed
from fewbit_dist.functional.lowbit import (dequantize_input, group_ranges, low_bit_linear, quantize_input)
from fewbit_dist.memory import SavedTensorMeter
from fewbit_dist.ops import native

from conftest import TOL
from utils import (assert_product_close, check_autocast_exact_parts, linear_pair, lowbit_saved_nbytes as saved_nbytes,
                   relative_error, require_native)

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def pair(n_in, n_out, dtype=torch.float32, **kw):
    return linear_pair(LowBitLinear, n_in, n_out, dtype, **kw)


def expected_x_hat(x2, bits, group_size, rounding, seed):
    """The dequantized input the layer's grad W must use. Nearest rounding, written out from the documented
    formula: lo + clamp(floor((x - lo) / scale + 1/2), 0, 2**bits - 1) * scale in float32. Stochastic rounding:
    quantize_input with the layer's seed (its rounding is checked on its own: within one step, unbiased)."""
    if rounding == "stochastic":
        return dequantize_input(quantize_input(x2, bits, group_size, rounding, seed), torch.float32)
    cols = x2.shape[1]
    lo, scale = (t.repeat_interleave(group_size, 1)[:, :cols] for t in group_ranges(x2, bits, group_size))
    return ((x2.float() - lo) / scale + 0.5).floor().clamp(0, 2**bits - 1) * scale + lo


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "row-chunks"])
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
@pytest.mark.parametrize("shape", [(37, 24), (3, 11, 24), (2, 3, 5, 24)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64", "bf16", "fp16"])
def test_exact_parts_are_exact(rounding, shape, dtype, chunked, monkeypatch):
    """grad x and grad b are nn.Linear's (same dtype, tolerance table); grad W is g^T x_hat, with x_hat the
    input quantized as documented (from the layer's seed), also when backward rebuilds x_hat in row chunks
    (8-32 rows here, the last one partial)."""
    if chunked:
        monkeypatch.setattr(fewbit_dist.functional.linear, "RESTORE_CHUNK_BYTES", 8 * 24 * 8)
    lin, ref = pair(24, 10, dtype, bits=3, group_size=7, rounding=rounding)
    x = torch.randn(shape, dtype=dtype)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    torch.manual_seed(4)
    y = lin(a)
    torch.manual_seed(4)
    seed = draw_seed()  # the seed the layer drew
    y_ref = ref(b)
    assert torch.equal(y, y_ref)  # the forward is F.linear itself
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(lin.bias.grad, ref.bias.grad, rtol=rtol, atol=atol)
    assert lin.weight.grad.dtype == dtype and lin.weight.grad.shape == ref.weight.grad.shape
    g2 = g.reshape(-1, 10)
    x_hat = expected_x_hat(x.reshape(-1, 24), 3, 7, rounding, seed).to(dtype)
    assert_product_close(lin.weight.grad, g2.t(), x_hat)
    assert not torch.equal(lin.weight.grad, ref.weight.grad)  # an estimate: x_hat is not x


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_issue_bound_and_exact_saved_bytes(bits):
    """4096 x 1024 fp32 input: bits/8 of the input bytes for the codes plus 8 bytes per group of 128."""
    lin, _ = pair(1024, 64, bits=bits)
    x = torch.randn(4096, 1024, requires_grad=True)
    with SavedTensorMeter(lin) as meter:
        lin(x)
    assert meter.nbytes == saved_nbytes(4096, 1024, bits, 128)
    if bits == 4:
        assert meter.nbytes <= x.numel() * 4 / 8 + 4096 * 8 * 8  # the issue's bound: 1/8 plus the scales


@pytest.mark.parametrize("rows,cols,group_size", [(1, 1, 128), (13, 5, 2), (9, 130, 64), (3, 7, 7), (0, 4, 2)])
def test_awkward_shapes_saved_bytes(rows, cols, group_size):
    lin, ref = pair(cols, 3, bits=5, group_size=group_size)
    x = torch.randn(rows, cols, requires_grad=True)
    with SavedTensorMeter(lin) as meter:
        y = lin(x)
    assert meter.nbytes == saved_nbytes(rows, cols, 5, group_size)
    y.sum().backward()
    assert lin.weight.grad.shape == (3, cols) and torch.isfinite(lin.weight.grad).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dequantized_input_within_one_step(bits):
    torch.manual_seed(0)
    x = torch.randn(40, 77) * torch.linspace(0.01, 10, 77)  # very different ranges per group
    for rounding in ("stochastic", "nearest"):
        q = quantize_input(x, bits, 16, rounding, seed=5)
        x_hat = dequantize_input(q, torch.float32)
        step = q.scale.repeat_interleave(16, 1)[:, :77]
        limit = step if rounding == "stochastic" else step / 2
        assert ((x_hat - x).abs() <= limit * (1 + 1e-5)).all()
        lo = q.lo.repeat_interleave(16, 1)[:, :77]
        assert (x_hat >= lo).all() and (x_hat <= lo + step * (2**bits - 1) * (1 + 1e-6)).all()


def test_constant_groups_are_exact():
    x = torch.full((5, 20), 1.25)
    x[:, 10:] = -3.0
    q = quantize_input(x, 2, 10, "stochastic", seed=1)
    assert torch.equal(dequantize_input(q, torch.float32), x)
    assert torch.equal(q.scale, torch.ones(5, 2))


def test_group_ranges_cover_the_group():
    torch.manual_seed(2)
    x = torch.randn(6, 50, dtype=torch.bfloat16)
    lo, scale = group_ranges(x, 3, 16)
    assert lo.shape == scale.shape == (6, 4) and lo.dtype == scale.dtype == torch.float32
    xs = torch.nn.functional.pad(x.float(), (0, 14), value=float("nan")).view(6, 4, 16)
    assert torch.equal(lo, torch.from_numpy(__import__("numpy").nanmin(xs.numpy(), -1)))
    assert (lo + scale * 7 >= torch.from_numpy(__import__("numpy").nanmax(xs.numpy(), -1))).all()


@pytest.mark.parametrize("bits", [2, 4])
def test_stochastic_rounding_is_unbiased(bits):
    """The mean of N quantizations converges to x at the 1/sqrt(N) rate (no bias floor), and grad W too."""
    torch.manual_seed(3)
    x = torch.randn(24, 40, dtype=torch.float64)
    n = 2000
    est = torch.stack([dequantize_input(quantize_input(x, bits, 8, "stochastic", seed=s), torch.float64)
                       for s in range(n)])
    per_sample = ((est - x) ** 2).sum((1, 2)).mean()
    for m in (n // 16, n):
        err = ((est[:m].mean(0) - x) ** 2).sum()
        assert err < 2.0 * per_sample / m, (m, err.item(), (per_sample / m).item())
    # nearest rounding is biased: its error does not shrink with N (the same codes every time)
    near = dequantize_input(quantize_input(x, bits, 8, "nearest"), torch.float64)
    assert ((near - x) ** 2).sum() > 20 * per_sample / n


def test_weight_gradient_is_unbiased():
    torch.manual_seed(1)
    x = torch.randn(48, 10, dtype=torch.float64) * torch.linspace(0.2, 3, 48, dtype=torch.float64)[:, None]
    g = torch.randn(48, 9, dtype=torch.float64) + x[:, :1]
    w = torch.randn(9, 10, dtype=torch.float64, requires_grad=True)
    exact = g.t() @ x
    gen = torch.Generator().manual_seed(7)
    n = 1500
    est = torch.empty(n, 9, 10, dtype=torch.float64)
    for i in range(n):
        w.grad = None
        low_bit_linear(x.requires_grad_(False), w, None, bits=2, group_size=4, generator=gen).backward(g)
        est[i] = w.grad
    per_sample = ((est - exact) ** 2).sum((1, 2)).mean()
    for m in (n // 16, n):
        assert ((est[:m].mean(0) - exact) ** 2).sum() < 2.0 * per_sample / m
    assert ((1.05 * est.mean(0) - exact) ** 2).sum() > 2.0 * per_sample / n


def test_more_bits_less_error():
    torch.manual_seed(0)
    x = torch.randn(256, 96)
    errs = [(dequantize_input(quantize_input(x, b, 32, "stochastic", seed=0), torch.float32) - x).norm()
            for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < errs[0] / 30


def test_layers_reading_one_tensor_share_one_quantized_copy():
    torch.manual_seed(0)
    q, k, v = (LowBitLinear(64, 64, bits=4) for _ in range(3))
    x = torch.randn(10, 64, requires_grad=True)
    with SavedTensorMeter([q, k, v]) as meter:
        out = q(x) + k(x) + v(x)
    assert meter.nbytes == saved_nbytes(10, 64, 4, 128)  # once, not three times
    out.sum().backward()
    refs = [nn.Linear(64, 64) for _ in range(3)]
    for lin, ref in zip((q, k, v), refs):
        ref.load_state_dict(lin.state_dict())
    # every layer's grad W is g^T x_hat of the same x_hat; g = ones, so the three are equal
    assert torch.equal(q.weight.grad, k.weight.grad) and torch.equal(k.weight.grad, v.weight.grad)
    # an in-place change makes a new copy; so do other settings
    with SavedTensorMeter([q, k, v]) as meter:
        x2 = torch.randn(10, 64, requires_grad=True) * 1.0
        a = q(x2)
        with torch.no_grad():
            x2.mul_(2)
        b = k(x2)
    assert meter.nbytes == 2 * saved_nbytes(10, 64, 4, 128) + 0 * (a.sum() + b.sum()).item()


def test_fresh_rounding_every_step_reproducible_by_seed():
    lin, _ = pair(16, 4, bits=2, group_size=4)
    x = torch.randn(64, 16)

    def grad(seed=None):
        if seed is not None:
            torch.manual_seed(seed)
        lin.weight.grad = None
        lin(x).sum().backward()
        return lin.weight.grad.clone()

    a, b = grad(5), grad()
    assert not torch.equal(a, b)  # the same input tensor in the next step is quantized afresh
    assert torch.equal(grad(5), a)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_checkpointing(use_reentrant):
    torch.manual_seed(0)
    block = nn.Sequential(LowBitLinear(16, 32, bits=3), fewbit_dist.GELU(), LowBitLinear(32, 8, bits=3),
                          fewbit_dist.Dropout(0.1))
    x = torch.randn(4, 20, 16, requires_grad=True)

    def grads(ckpt):
        block.zero_grad()
        x.grad = None
        torch.manual_seed(11)
        y = checkpoint(block, x, use_reentrant=use_reentrant) if ckpt else block(x)
        y.pow(2).sum().backward()
        return [p.grad.clone() for p in block.parameters()] + [x.grad.clone()]

    for a, b in zip(grads(False), grads(True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_frozen_weight_saves_nothing_but_the_weight():
    lin, _ = pair(16, 4, bits=4)
    lin.weight.requires_grad_(False)
    x = torch.randn(30, 16, requires_grad=True)
    with SavedTensorMeter(lin) as meter:
        lin(x).sum().backward()
    assert meter.nbytes == 0 and x.grad is not None and lin.bias.grad is not None


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_autocast_bf16_on_cpu(rounding):
    """fp32 layer under bf16 autocast: the output and grad x, grad b are nn.Linear's under the same autocast;
    grad W (fp32, like nn.Linear's) is g^T x_hat in bf16, x_hat quantized from the fp32 tensor the layer reads
    (before autocast's cast, so that layers reading one tensor share one quantized copy)."""
    lin, ref = pair(32, 16, bits=4, group_size=8, rounding=rounding)
    x = torch.randn(50, 32)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(4)
        y = lin(a)
        torch.manual_seed(4)
        seed = draw_seed()
        y_ref = ref(b)
    g = check_autocast_exact_parts(y, y_ref, lin, ref, a, b)
    x_hat = expected_x_hat(x, 4, 8, rounding, seed).bfloat16()
    assert_product_close(lin.weight.grad, g.t(), x_hat, dtype=torch.bfloat16)
    assert_product_close(ref.weight.grad, g.t(), x.bfloat16(), dtype=torch.bfloat16)  # the same check holds for x


def test_state_dict_is_nn_linears_both_ways():
    lin, ref = pair(8, 3, bits=4)
    assert list(lin.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
    LowBitLinear(8, 3, bits=2).load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(lin.state_dict(), strict=True)
    assert "bits=4, group_size=128, rounding='stochastic'" in repr(lin)


@pytest.mark.parametrize("kwargs,exc,msg", [
    ({"bits": 1}, ValueError, r"bits must be an int in 2..8"),
    ({"bits": 9}, ValueError, r"bits must be an int in 2..8"),
    ({"bits": 4.0}, TypeError, r"bits must be an int in 2..8, got float 4.0"),
    ({"group_size": 0}, ValueError, "group_size must be a positive int"),
    ({"group_size": True}, TypeError, "group_size must be a positive int, got bool True"),
    ({"rounding": "floor"}, ValueError, r"rounding must be one of \('stochastic', 'nearest'\)"),
    ({"generator": 1}, TypeError, "generator must be a torch.Generator"),
])
def test_bad_arguments(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        LowBitLinear(4, 4, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64", "bf16", "fp16"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_native_equals_reference(dtype, bits):
    mod = require_native("cpu")
    torch.manual_seed(bits)
    for rows, cols, gs in [(37, 100, 32), (5, 3, 128), (64, 131, 7), (1, 1, 1), (0, 5, 2), (300, 257, 64)]:
        x = (torch.randn(rows, cols, dtype=torch.float64) * 3).to(dtype)
        if x.numel():
            x.view(-1)[0] = float("nan")
        groups = -(-cols // gs)
        lo, scale = torch.randn(rows, groups) - 2, torch.rand(rows, groups) + 0.01
        for noise in (torch.rand(rows, cols), None):
            a = mod.quantize_pack(x, lo, scale, noise, bits, gs)
            assert torch.equal(a, native.reference_quantize_pack(x, lo, scale, noise, bits, gs))
        assert torch.equal(mod.unpack_dequantize(a, lo, scale, bits, cols, gs, dtype),
                           native.reference_unpack_dequantize(a, lo, scale, bits, cols, gs, dtype))


def test_ops_opcheck_and_meta():
    x = torch.randn(9, 20)
    lo, scale = group_ranges(x, 4, 8)
    noise = torch.rand(9, 20)
    torch.library.opcheck(torch.ops.fewbit.quantize_pack.default, (x, lo, scale, noise, 4, 8))
    packed = torch.ops.fewbit.quantize_pack(x, lo, scale, None, 4, 8)
    torch.library.opcheck(torch.ops.fewbit.unpack_dequantize.default, (packed, lo, scale, 4, 20, 8, torch.bfloat16))
    meta = torch.ops.fewbit.quantize_pack(x.to("meta"), lo.to("meta"), scale.to("meta"), None, 3, 8)
    assert meta.shape == (math.ceil(180 * 3 / 8),) and meta.dtype == torch.uint8


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_reference_fallback_gives_the_same_gradients(monkeypatch, rounding):
    """The native kernels (FEWBIT_NATIVE=1: native or an error) and the reference (FEWBIT_NATIVE=0) give the
    same weight gradient bit for bit, and it is g^T x_hat."""
    require_native("cpu")
    calls = []  # which native kernels ran: the two modes must really take different paths

    class Counting:
        def __init__(self, mod):
            self.mod = mod

        def __getattr__(self, name):
            calls.append(name)
            return getattr(self.mod, name)

    find = native.native_module
    monkeypatch.setattr(native, "native_module", lambda *a, **k: (lambda m: m and Counting(m))(find(*a, **k)))
    torch.manual_seed(0)
    x = torch.randn(33, 50)
    w = torch.randn(7, 50, requires_grad=True)
    g = torch.randn(33, 7)
    grads = []
    for mode in ("1", "0"):
        monkeypatch.setenv("FEWBIT_NATIVE", mode)
        calls.clear()
        w.grad = None
        gen = torch.Generator().manual_seed(1)
        low_bit_linear(x, w, None, bits=3, group_size=16, rounding=rounding, generator=gen).backward(g)
        grads.append(w.grad.clone())
        native_ran = {"quantize_groups", "unpack_dequantize"} <= set(calls)
        assert native_ran == (mode == "1"), (mode, calls)
    assert torch.equal(*grads)
    seed = draw_seed(torch.Generator().manual_seed(1))
    assert_product_close(grads[0], g.t(), expected_x_hat(x, 3, 16, rounding, seed))


def test_sharing_cache_keeps_at_most_capacity_inputs_under_checkpointing():
    """Non-reentrant checkpointing drops saved tensors in forward; the sharing cache holds only the last
    CAPACITY (2) quantized inputs."""
    import gc
    import weakref

    from fewbit_dist.functional import shared_input

    torch.manual_seed(0)
    blocks = [(LowBitLinear(32, 32, bits=4), LowBitLinear(32, 32, bits=4)) for _ in range(3)]
    x = torch.randn(64, 32, requires_grad=True)
    h, refs = x, []
    for q, k in blocks:
        h = checkpoint(lambda t, q=q, k=k: q(t) + k(t), h, use_reentrant=False)
        refs.append(weakref.ref(shared_input._slot()[2].packed))
    gc.collect()
    assert shared_input.CAPACITY == 2
    assert [r() is None for r in refs] == [True, False, False]  # only the last two blocks' inputs are held
    h.sum().backward()
    assert all(q.weight.grad is not None and k.weight.grad is not None for q, k in blocks)


def test_aliases_of_one_tensor_share_and_others_do_not():
    """ZeRO-3 gives each submodule its own alias of an input: same memory, same quantized copy."""
    torch.manual_seed(0)
    q, k = LowBitLinear(16, 16, bits=4), LowBitLinear(16, 16, bits=4)
    x = torch.randn(12, 16, requires_grad=True)
    with SavedTensorMeter([q, k]) as meter:
        q(x.view_as(x))
        k(x.view(12, 16))
    assert meter.nbytes == saved_nbytes(12, 16, 4, 128)
    with SavedTensorMeter([q, k]) as meter:
        q(x[:6])
        k(x[6:])  # the same storage, other elements
    assert meter.nbytes == 2 * saved_nbytes(6, 16, 4, 128)


@pytest.mark.parametrize("mode", ["exact", "compressed"])
def test_sharing_stays_inside_one_checkpoint_region(mode):
    """A norm at the end of one non-reentrant checkpoint region and linears reading its output in the next
    (BERT's output LayerNorm and the next layer's Q/K/V): the readers must save the same tensors in the forward
    and in their region's recompute, so they do not take the norm's form across the boundary. Gradients are
    those of the unconverted layers (exact) or close (compressed)."""
    from fewbit_dist.functional import shared_input
    from fewbit_dist.functional.layer_norm import layer_norm

    torch.manual_seed(0)
    norm = nn.LayerNorm(32)
    q, k = LowBitLinear(32, 16, bits=8), fewbit_dist.nn.ExactLinear(32, 16)
    x = torch.randn(24, 32, requires_grad=True)

    def first(t):
        return layer_norm(t, norm.weight, norm.bias, norm.eps, mode=mode)

    def second(h):
        return q(h).square().sum() + k(h).square().sum()

    h = checkpoint(first, x, use_reentrant=False)
    out = checkpoint(second, h, use_reentrant=False)
    for _ in range(shared_input.CAPACITY):  # later layers' norms offer theirs: the first norm's entry is evicted
        layer_norm(torch.randn(4, 32, requires_grad=True), norm.weight, norm.bias, norm.eps, mode=mode)
    out.backward()  # raised CheckpointError when the readers shared across the boundary
    got = [t.grad.clone() for t in (x, norm.weight, q.weight, k.weight)]
    for t in (x, norm.weight, q.weight, k.weight):
        t.grad = None
    h = nn.functional.layer_norm(x, (32,), norm.weight, norm.bias, norm.eps)
    loss = nn.functional.linear(h, q.weight, q.bias).square().sum()
    (loss + nn.functional.linear(h, k.weight, k.bias).square().sum()).backward()
    exact_parts = mode == "exact"  # x, the norm's and k's weights; q's weight gradient is 8-bit either way
    for i, (a, b) in enumerate(zip(got, (x.grad, norm.weight.grad, q.weight.grad, k.weight.grad))):
        assert relative_error(a, b) < (1e-5 if exact_parts and i != 2 else 0.02), i
