import math

import pytest
import torch
from torch import nn

import fewbit_dist
from fewbit_dist.functional import dropout
from fewbit_dist.memory import SavedTensorMeter

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64", "bf16", "fp16"])
@pytest.mark.parametrize("p", [0.1, 0.5, 1 / 3, 0.9])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "3d"])
def test_equals_torch_dropout_bit_for_bit_on_cpu(dtype, p, layout):
    """Same RNG state: the same output as nn.Dropout, and the same input gradient (exact given the mask)."""
    base = torch.randn(37, 129, dtype=dtype)
    x = {"contiguous": base, "transposed": base.t(), "3d": base[:36].reshape(4, 9, 129)}[layout]
    g = torch.randn(x.shape, dtype=dtype)
    outs = []
    for module in (nn.Dropout(p), fewbit_dist.Dropout(p)):
        a = x.clone().requires_grad_(True) if layout != "transposed" else base.clone().t().requires_grad_(True)
        torch.manual_seed(3)
        y = module(a)
        y.backward(g)
        outs.append((y.detach(), a.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("n", [1, 7, 8, 1000, 1_000_003])
def test_saves_one_bit_per_element(n):
    x = torch.randn(n, requires_grad=True)
    with SavedTensorMeter() as meter:
        y = fewbit_dist.Dropout(0.3)(x)
    # the packed mask and the two-entry level table (0 and 1 / (1 - p), float32)
    assert meter.nbytes == math.ceil(n / 8) + 2 * 4
    with SavedTensorMeter() as torch_meter:
        nn.Dropout(0.3)(x)
    assert torch_meter.nbytes == 4 * n  # torch's CPU path keeps the scaled noise in the input's dtype
    y.sum().backward()


def test_rate_and_scaling_in_distribution():
    torch.manual_seed(0)
    p, n = 0.3, 400_000
    y = fewbit_dist.Dropout(p)(torch.ones(n, requires_grad=True))
    kept = y != 0
    rate = 1 - kept.double().mean().item()
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert torch.equal(y[kept], torch.full((int(kept.sum()),), 1 / (1 - p)))
    assert abs(y.double().mean().item() - 1.0) < 0.01  # E[y] = x


def test_backward_is_exact_given_the_mask():
    torch.manual_seed(1)
    x = torch.randn(1000, requires_grad=True)
    y = fewbit_dist.Dropout(0.4)(x)
    g = torch.randn(1000)
    y.backward(g)
    kept = y != 0  # x has no zeros
    level = torch.ones(1).div_(0.6)  # the kept value, as torch computes its noise
    assert 0 < kept.sum() < 1000
    assert torch.equal(x.grad, torch.where(kept, g * level, torch.zeros(())))


def test_eval_p0_p1_and_inplace():
    x = torch.randn(50, requires_grad=True)
    d = fewbit_dist.Dropout(0.5).eval()
    assert d(x) is x
    assert fewbit_dist.Dropout(0.0)(x) is x
    y = fewbit_dist.Dropout(1.0)(x)
    assert torch.equal(y, torch.zeros(50))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros(50))
    # in place, as nn.Dropout(inplace=True): same values, same gradient
    base = torch.randn(40)
    results = []
    for cls in (nn.Dropout, fewbit_dist.Dropout):
        leaf = base.clone().requires_grad_(True)
        h = leaf * 1.0
        torch.manual_seed(2)
        out = cls(0.25, inplace=True)(h)
        assert out is h
        out.pow(2).sum().backward()
        results.append((out.detach(), leaf.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_no_grad_consumes_the_rng_like_torch():
    x = torch.randn(100)
    torch.manual_seed(4)
    with torch.no_grad():
        a = dropout(x, 0.5)
    torch.manual_seed(4)
    b = nn.functional.dropout(x, 0.5)
    assert torch.equal(a, b)


@pytest.mark.parametrize("p,exc", [(-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError),
                                   ("0.5", TypeError), (None, TypeError), (True, TypeError)])
def test_bad_p(p, exc):
    with pytest.raises(exc, match=r"dropout probability p must be a number in \[0, 1\]"):
        fewbit_dist.Dropout(p)


def test_integer_input_is_refused():
    with pytest.raises(TypeError, match="floating-point"):
        dropout(torch.ones(3, dtype=torch.long), 0.5)


def test_state_dict_and_repr():
    d = fewbit_dist.Dropout(0.2)
    assert d.state_dict() == {} and "p=0.2" in repr(d) and "mask_bits=1" in repr(d)
    assert isinstance(d, nn.Dropout)
