"""CUDA kernels against the reference, bit for bit. Skipped without a GPU; CI still compiles and links them
(scripts/check_cuda_build.sh)."""

import pytest
import torch

import fewbit_dist
from fewbit_dist.ops import native
from fewbit_dist.quant import table

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_kernels_match_the_reference(bits, dtype):
    mod = native.native_module("cuda")
    assert mod is not None, native.native_state("cuda")
    tab = table("gelu", bits)
    om = torch.float64 if dtype == torch.float64 else torch.float32
    for n in (0, 1, 7, 9, 1001, 1 << 20):
        x = (torch.randn(n, dtype=torch.float64) * 3).to(dtype)
        if n > 4:
            x[3] = float("nan")
        borders, levels = torch.tensor(tab.borders, dtype=om), torch.tensor(tab.levels, dtype=om)
        expected = native.reference_encode_pack(x, borders, bits)
        packed = mod.encode_pack(x.cuda(), borders.cuda(), bits)
        assert torch.equal(packed.cpu(), expected), n
        g = torch.randn(n, dtype=torch.float64).to(dtype)
        got = mod.unpack_scale(packed, levels.cuda(), g.cuda(), bits)
        assert torch.equal(got.cpu(), native.reference_unpack_scale(expected, levels, g, bits)), n


def test_gelu_on_cuda_saves_packed_codes_and_matches_cpu():
    x = torch.randn(4099, 3)
    grads = []
    for device in ("cpu", "cuda"):
        xi = x.to(device).requires_grad_(True)
        with fewbit_dist.memory.SavedTensorMeter() as meter:
            y = fewbit_dist.GELU(bits=3)(xi)
        assert meter.nbytes == (x.numel() * 3 + 7) // 8
        y.backward(torch.ones_like(y))
        grads.append(xi.grad.cpu())
    assert torch.equal(*grads)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_lowbit_kernels_match_the_reference(bits, dtype):
    mod = native.native_module("cuda")
    assert mod is not None, native.native_state("cuda")
    torch.manual_seed(bits)
    for rows, cols, gs in [(37, 100, 32), (5, 3, 128), (640, 131, 7), (0, 5, 2)]:
        x = (torch.randn(rows, cols, dtype=torch.float64) * 3).to(dtype)
        groups = -(-cols // gs)
        lo, scale = torch.randn(rows, groups) - 2, torch.rand(rows, groups) + 0.01
        for noise in (torch.rand(rows, cols), None):
            want = native.reference_quantize_pack(x, lo, scale, noise, bits, gs)
            got = mod.quantize_pack(x.cuda(), lo.cuda(), scale.cuda(), None if noise is None else noise.cuda(), bits,
                                    gs)
            assert torch.equal(got.cpu(), want), (rows, cols, gs)
        back = mod.unpack_dequantize(want.cuda(), lo.cuda(), scale.cuda(), bits, cols, gs, dtype)
        assert torch.equal(back.cpu(), native.reference_unpack_dequantize(want, lo, scale, bits, cols, gs, dtype))


def test_lowbit_linear_and_dropout_on_cuda():
    torch.manual_seed(0)
    lin = fewbit_dist.LowBitLinear(256, 64, bits=4).cuda()
    x = torch.randn(1000, 256, device="cuda", requires_grad=True)
    with fewbit_dist.memory.SavedTensorMeter(lin) as meter:
        y = fewbit_dist.Dropout(0.2)(lin(x))
    assert meter.nbytes == 1000 * 256 // 2 + 8 * 1000 * 2 + (1000 * 64 + 7) // 8 + 2 * 4
    y.sum().backward()
    assert torch.isfinite(lin.weight.grad).all() and x.grad is not None


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_quantize_groups_matches_the_reference(bits, dtype):
    """The fused one-pass quantizer on the GPU: the reference's bytes, lo and scale, nearest and stochastic, the
    seed on the CPU or on the GPU, contiguous or not, spans that cut groups and rows (kSpan = 4096 elements)."""
    mod = native.native_module("cuda")
    assert mod is not None, native.native_state("cuda")
    torch.manual_seed(bits)
    seed = torch.tensor([0x0123_4567_89AB_CDEF])
    cases = [(37, 100, 32), (5, 3, 128), (640, 131, 7), (0, 5, 2), (3, 9000, 128), (257, 4096, 128), (64, 1000, 3000)]
    for rows, cols, gs in cases:
        x = (torch.randn(rows, cols, dtype=torch.float64) * 3).to(dtype)
        if rows * cols > 100:
            x.view(-1)[77] = float("nan")
        for xin in (x, x.t().contiguous().t()):
            for s in (None, seed, seed.cuda()):
                want = native.reference_quantize_groups(xin, bits, gs, None if s is None else seed)
                got = mod.quantize_groups(xin.cuda(), bits, gs, s)
                assert torch.equal(got[0].cpu(), want[0]), (rows, cols, gs)
                assert torch.equal(got[1].cpu().nan_to_num(), want[1].nan_to_num()), (rows, cols, gs)
                assert torch.equal(got[2].cpu(), want[2]), (rows, cols, gs)
    x = torch.randn(300, 200, device="cuda")
    packed, lo, scale = native.quantize_groups(x, 4, 64, seed.cuda())  # through the op, seed on the device
    back = native.unpack_dequantize(packed, lo, scale, 4, 200, 64, torch.float32)
    assert ((back - x).abs() <= scale.repeat_interleave(64, 1)[:, :200] * 1.0001).all()
