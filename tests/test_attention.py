import math

import pytest
import torch

from fewbit_dist.functional.attention import scaled_dot_product_attention, sdpa_or_fewbit
from fewbit_dist.memory import SavedTensorMeter

from conftest import TOL


def reference(q, k, v, mask, p, is_causal, scale, seed):
    """Attention written out with autograd, the dropout noise drawn as torch draws it."""
    s = q @ k.transpose(-2, -1) * scale
    if is_causal:
        s = s.masked_fill(~torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    probs = torch.softmax(s, -1)
    torch.manual_seed(seed)
    noise = torch.empty_like(probs).bernoulli_(1 - p).div_(1 - p)
    return (probs * noise) @ v


def inputs(b=2, h=3, lq=9, lk=9, d=8, dtype=torch.float64):
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, dtype=dtype, requires_grad=True) for n in (lq, lk, lk))
    return q, k, v


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "float-grad", "causal"])
def test_matches_written_out_attention_given_the_mask(mask_kind):
    q, k, v = inputs()
    mask, causal = None, False
    if mask_kind == "bool":
        mask = torch.rand(2, 1, 9, 9) > 0.3
        mask[..., 0] = True  # no fully masked row
    elif mask_kind.startswith("float"):
        mask = torch.randn(1, 3, 9, 9, dtype=torch.float64, requires_grad=mask_kind == "float-grad")
    elif mask_kind == "causal":
        causal = True
    g = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    grads = []
    for fn in ("fewbit", "reference"):
        for t in (q, k, v, mask):
            if t is not None:
                t.grad = None
        if fn == "fewbit":
            torch.manual_seed(7)
            out = scaled_dot_product_attention(q, k, v, mask, 0.3, causal, 0.25)
        else:
            out = reference(q, k, v, mask, 0.3, causal, 0.25, seed=7)
        out.backward(g)
        grads.append([out.detach()] + [t.grad for t in (q, k, v, mask) if t is not None and t.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_saves_q_k_v_and_one_bit_per_probability():
    q, k, v = inputs(b=2, h=4, lq=33, lk=33, d=16, dtype=torch.float32)
    with SavedTensorMeter() as meter:
        out = scaled_dot_product_attention(q, k, v, None, 0.1)
    n = 2 * 4 * 33 * 33
    assert meter.nbytes == 3 * q.numel() * 4 + math.ceil(n / 8) + 2 * 4
    with SavedTensorMeter() as torch_meter:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
    assert torch_meter.nbytes > meter.nbytes + 3 * n * 4 * 0.9  # torch's math path keeps ~3 probability tensors
    out.sum().backward()


@pytest.mark.parametrize("p", [0.0, 0.5])
@pytest.mark.parametrize("fn", [scaled_dot_product_attention, sdpa_or_fewbit])
def test_gqa_and_no_dropout_paths(fn, p):
    """Grouped-query attention (4 query heads read 2 key/value heads: heads 2i and 2i+1 read head i), with and
    without dropout, through both entry points (on the CPU sdpa_or_fewbit is ours with dropout, torch's
    without), against attention written out: output and gradients."""
    torch.manual_seed(1)
    q = torch.randn(2, 4, 5, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    g = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    results = []
    for path in ("ours", "written out"):
        for t in (q, k, v):
            t.grad = None
        if path == "ours":
            torch.manual_seed(2)
            out = fn(q, k, v, dropout_p=p, enable_gqa=True)
        else:  # without dropout the reference's noise is all ones
            out = reference(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), None, p, False, 8 ** -0.5, 2)
        out.backward(g)
        results.append([out.detach(), q.grad, k.grad, v.grad])
    rtol, atol = TOL[torch.float64]
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_bad_arguments():
    q, k, v = inputs()
    with pytest.raises(ValueError, match=r"dropout probability p must be a number in \[0, 1\]"):
        scaled_dot_product_attention(q, k, v, dropout_p=1.5)
    with pytest.raises(ValueError, match="incompatible shapes"):
        scaled_dot_product_attention(q, k[..., :4], v, dropout_p=0.1)
