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
