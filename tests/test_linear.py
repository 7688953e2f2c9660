import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import fewbit_dist
from fewbit_dist import RandomizedLinear, conversion_report, convert
from fewbit_dist.functional.linear import draw_seed, randomized_linear
from fewbit_dist.functional.sketch import SKETCHES
from fewbit_dist.memory import SavedTensorMeter

from conftest import TOL
from utils import check_autocast_exact_parts, linear_pair, relative_error

ALL_SKETCHES = sorted(SKETCHES)


def pair(n_in, n_out, dtype=torch.float32, **kw):
    return linear_pair(RandomizedLinear, n_in, n_out, dtype, **kw)


def fp64_estimate(lin, x, g, seed, **kw):
    """grad W of a float64 copy of `lin` on the same input values and output gradient, with the sketch drawn
    from the same seed: what a half-precision estimate must equal up to its rounding."""
    lin64 = RandomizedLinear(lin.in_features, lin.out_features, dtype=torch.float64, **kw)
    lin64.load_state_dict({k: v.double() for k, v in lin.state_dict().items()})
    torch.manual_seed(seed)
    lin64(x.detach().double()).backward(g.double())
    return lin64.weight.grad


@pytest.mark.parametrize("sketch", ALL_SKETCHES)
@pytest.mark.parametrize("shape", [(37, 24), (3, 11, 24), (2, 3, 5, 24)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["fp32", "fp64", "bf16", "fp16"])
def test_exact_parts_are_exact(sketch, shape, dtype):
    """grad x and grad b are nn.Linear's (same dtype, tolerance table); grad W in every dtype is the float64
    estimate of the same sketch (same seed) up to the dtype's rounding, and the float64 estimate is unbiased
    (test_weight_gradient_is_unbiased)."""
    lin, ref = pair(24, 10, dtype, proj_dim_ratio=0.3, sketch=sketch)
    x = torch.randn(shape, dtype=dtype)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    torch.manual_seed(4)
    y = lin(a)
    y_ref = ref(b)
    assert torch.equal(y, y_ref)  # the forward is F.linear itself
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(lin.bias.grad, ref.bias.grad, rtol=rtol, atol=atol)
    assert lin.weight.grad.dtype == dtype and lin.weight.grad.shape == ref.weight.grad.shape
    estimate = fp64_estimate(lin, x, g, 4, proj_dim_ratio=0.3, sketch=sketch)
    assert relative_error(lin.weight.grad, estimate) <= rtol
    assert relative_error(estimate, ref.weight.grad) > 0.01  # a sketch, not the exact gradient


def test_rownorm_samples_uniformly_from_a_zero_input():
    lin, _ = pair(8, 3, proj_dim=4)
    x = torch.zeros(10, 8, requires_grad=True)
    lin(x).sum().backward()
    assert torch.equal(lin.weight.grad, torch.zeros(3, 8))
    rownorm = SKETCHES["rownorm"]
    x_s, extra = rownorm.compress(torch.zeros(10, 8), 4, seed=1)
    assert extra[1].item() == -1 and torch.equal(rownorm.weights(x_s, 10, extra), torch.full((4,), 2.5))


@pytest.mark.parametrize("sketch", ALL_SKETCHES)
def test_weight_gradient_is_unbiased(sketch):
    """Mean of N estimates -> exact at the 1/sqrt(N) rate: ||mean - exact||^2 ~ tr(Cov)/N, while any bias b
    would leave ||b||^2 however large N is. The ratio has mean 1 but a heavy tail (a few directions carry
    most of the covariance): over 5 generator seeds x 4 sketches it ranged 0.4-2.0, and a 5% mis-scaled
    estimate 4.4-12, so the bound is 3."""
    torch.manual_seed(1)
    rows, n_in, n_out, k = 48, 10, 9, 12
    x = torch.randn(rows, n_in, dtype=torch.float64) * torch.linspace(0.2, 3, rows, dtype=torch.float64)[:, None]
    g = torch.randn(rows, n_out, dtype=torch.float64) + x[:, :1]  # correlated with x, as in training
    w = torch.randn(n_out, n_in, dtype=torch.float64, requires_grad=True)
    exact = g.t() @ x
    n = 3000
    est = torch.empty(n, n_out, n_in, dtype=torch.float64)
    gen = torch.Generator().manual_seed(123)
    for i in range(n):
        w.grad = None
        randomized_linear(x, w, None, proj_dim=k, sketch=sketch, generator=gen).backward(g)
        est[i] = w.grad
    per_sample = ((est - exact) ** 2).sum((1, 2)).mean()  # tr(Cov) of one estimate
    for m in (n // 16, n):
        err = ((est[:m].mean(0) - exact) ** 2).sum()
        assert err < 3.0 * per_sample / m, (m, err.item(), (per_sample / m).item())
    # And a mis-scaled estimator would fail the same test: 5% off is far outside the noise at N = 3000.
    assert ((1.05 * est.mean(0) - exact) ** 2).sum() > 3.0 * per_sample / n


@pytest.mark.parametrize("sketch", ALL_SKETCHES)
def test_saved_bytes_are_the_sketch(sketch):
    lin, _ = pair(1024, 64, proj_dim_ratio=0.2, sketch=sketch)
    x = torch.randn(4096, 1024, requires_grad=True)
    k = math.ceil(0.2 * 4096)
    with SavedTensorMeter(lin) as meter:
        lin(x)
    extra = 4 * k + 4 if sketch == "rownorm" else 0  # k int32 row indices and one fp32 total
    assert meter.nbytes == k * 1024 * 4 + 8 + extra  # the sketch, its int64 seed, and the extras
    # The bound: at most 0.2 x the input's bytes plus a few KiB (k = ceil(0.2 B) rows).
    assert meter.nbytes <= 0.2 * x.numel() * 4 + 8 * 1024


def test_half_precision_saves_half_precision_sketch():
    lin, _ = pair(64, 8, torch.bfloat16, proj_dim=5, sketch="count")
    x = torch.randn(40, 64, dtype=torch.bfloat16, requires_grad=True)
    with SavedTensorMeter(lin) as meter:
        lin(x).sum().backward()
    assert meter.nbytes == 5 * 64 * 2 + 8 and lin.weight.grad.dtype == torch.bfloat16  # + the int64 seed


def test_large_k_keeps_the_input_and_is_exact():
    lin, ref = pair(16, 4, torch.float64, proj_dim=100)
    x = torch.randn(30, 16, dtype=torch.float64)
    with SavedTensorMeter(lin) as meter:
        y = lin(x)
    assert meter.nbytes == x.numel() * 8
    y.sum().backward()
    ref(x).sum().backward()
    torch.testing.assert_close(lin.weight.grad, ref.weight.grad)
    lin2, _ = pair(16, 4, torch.float64, proj_dim_ratio=1.0)
    lin2(x).sum().backward()
    torch.testing.assert_close(lin2.weight.grad, ref.weight.grad)


def test_frozen_weight_saves_nothing():
    lin, _ = pair(16, 4, proj_dim_ratio=0.5)
    lin.weight.requires_grad_(False)
    x = torch.randn(30, 16, requires_grad=True)
    with SavedTensorMeter(lin) as meter:
        lin(x).sum().backward()
    assert meter.nbytes == 0 and x.grad is not None


def test_fresh_sketch_every_step_reproducible_by_seed():
    lin, _ = pair(16, 4, proj_dim_ratio=0.25)
    x = torch.randn(64, 16)

    def grad():
        lin.weight.grad = None
        lin(x).sum().backward()
        return lin.weight.grad.clone()

    torch.manual_seed(5)
    first, second = grad(), grad()
    assert not torch.equal(first, second)  # consecutive steps: different sketches
    torch.manual_seed(5)
    assert torch.equal(grad(), first)  # torch.manual_seed reproduces them
    gen_lin, _ = pair(16, 4, proj_dim_ratio=0.25, generator=torch.Generator().manual_seed(9))
    gen_lin(x).sum().backward()
    a = gen_lin.weight.grad.clone()
    gen_lin.generator.manual_seed(9)
    gen_lin.weight.grad = None
    gen_lin(x).sum().backward()
    assert torch.equal(a, gen_lin.weight.grad)


def test_ranks_mix_into_the_seed(monkeypatch):
    torch.manual_seed(0)
    plain = draw_seed()
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    seeds = []
    for rank in range(3):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda rank=rank: rank)
        torch.manual_seed(0)
        seeds.append(draw_seed())
    assert seeds[0] == plain and len(set(seeds)) == 3 and all(0 <= s < 2**62 for s in seeds)


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("sketch", ["count", "rownorm"])
def test_activation_checkpointing_recomputes_the_same_sketch(use_reentrant, sketch):
    torch.manual_seed(0)
    block = nn.Sequential(RandomizedLinear(16, 32, proj_dim_ratio=0.3, sketch=sketch), fewbit_dist.GELU(),
                          RandomizedLinear(32, 8, proj_dim_ratio=0.3, sketch=sketch), nn.Dropout(0.1))
    x = torch.randn(4, 20, 16, requires_grad=True)

    def grads(ckpt):
        block.zero_grad()
        x.grad = None
        torch.manual_seed(11)
        y = checkpoint(block, x, use_reentrant=use_reentrant) if ckpt else block(x)
        y.pow(2).sum().backward()
        return [p.grad.clone() for p in block.parameters()] + [x.grad.clone()]

    plain = grads(False)
    for a, b in zip(plain, grads(True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ratio", [0.5, 1.0], ids=["sketched", "k>=rows"])
def test_autocast_bf16_on_cpu(ratio):
    """fp32 layer under bf16 autocast: output, grad x and grad b are nn.Linear's under the same autocast; grad W
    (fp32, like nn.Linear's) is nn.Linear's when k >= rows (the input is kept), else the float64 estimate of
    the same sketch of the bf16 operands, up to bf16 rounding."""
    lin, ref = pair(32, 16, proj_dim_ratio=ratio)
    x = torch.randn(50, 32)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(4)
        y = lin(a)
        y_ref = ref(b)
    g = check_autocast_exact_parts(y, y_ref, lin, ref, a, b)
    rtol, atol = TOL[torch.bfloat16]
    if ratio == 1.0:
        torch.testing.assert_close(lin.weight.grad, ref.weight.grad, rtol=rtol, atol=atol)
    else:
        bf16 = RandomizedLinear(32, 16, proj_dim_ratio=ratio)
        bf16.load_state_dict({k: v.bfloat16().float() for k, v in lin.state_dict().items()})
        estimate = fp64_estimate(bf16, x.bfloat16(), g, 4, proj_dim_ratio=ratio)
        assert relative_error(lin.weight.grad, estimate) <= rtol


def test_state_dict_is_nn_linears_both_ways():
    lin, ref = pair(8, 3, proj_dim=2)
    assert list(lin.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
    other = RandomizedLinear(8, 3, proj_dim=2)
    other.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(lin.state_dict(), strict=True)
    assert "proj_dim=2, sketch='rownorm'" in repr(other)


@pytest.mark.parametrize("kwargs,exc,msg", [
    ({}, ValueError, "exactly one of proj_dim_ratio"),
    ({"proj_dim_ratio": 0.2, "proj_dim": 4}, ValueError, "exactly one of proj_dim_ratio"),
    ({"proj_dim_ratio": 0.0}, ValueError, r"proj_dim_ratio must be a number in \(0, 1\]"),
    ({"proj_dim_ratio": 1.5}, ValueError, r"proj_dim_ratio must be a number in \(0, 1\]"),
    ({"proj_dim_ratio": float("nan")}, ValueError, r"proj_dim_ratio must be a number in \(0, 1\]"),
    ({"proj_dim": 0}, ValueError, "proj_dim must be a positive int"),
    ({"proj_dim": 2.5}, TypeError, "proj_dim must be a positive int"),
    ({"proj_dim_ratio": 0.2, "proj_dim_min": 8, "proj_dim_max": 4}, ValueError, r"proj_dim_min \(8\) must be <="),
    ({"proj_dim_ratio": 0.2, "sketch": "dct"}, ValueError,
     r"sketch must be one of \(None, 'count', 'gaussian', 'rademacher', 'rownorm'\)"),
    ({"proj_dim_ratio": 0.2, "generator": 3}, TypeError, "generator must be a torch.Generator"),
])
def test_bad_arguments(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        RandomizedLinear(4, 4, **kwargs)


def test_projection_dim_clamps():
    lin = RandomizedLinear(4, 4, proj_dim_ratio=0.1, proj_dim_min=16, proj_dim_max=100)
    assert lin.projection_dim(50) == 16 and lin.projection_dim(500) == 50 and lin.projection_dim(5000) == 100


transformers = pytest.importorskip("transformers")


def test_convert_hugging_face_with_classifier_kept_exact():
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    model = transformers.RobertaForSequenceClassification(cfg).eval()
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    convert(model, proj_dim_ratio=0.2, exclude=["classifier"])
    counts = conversion_report(model).counts()
    assert counts == {"GELUActivation": 2, "Linear": 12}  # q, k, v, o, up, down per layer
    assert all(type(m) is nn.Linear for m in model.classifier.modules() if isinstance(m, nn.Linear))
    assert list(model.state_dict()) == keys
    ids = torch.randint(0, 96, (2, 9))
    assert torch.equal(model(ids).logits, ref(ids).logits)
    g = torch.randn(2, 2)
    model(ids).logits.backward(g)
    ref(ids).logits.backward(g)
    # The classifier's gradients depend only on the exact forward: the unconverted model's, bit for bit.
    for (name, p), (_, q) in zip(model.classifier.named_parameters(), ref.classifier.named_parameters()):
        assert torch.equal(p.grad, q.grad), name
    # Every parameter gets its gradient: the sketched weights an estimate of it (k = 4 of 18 rows), the others
    # the exact one up to the 3-bit GELU derivatives.
    grads, ref_grads = dict(model.named_parameters()), dict(ref.named_parameters())
    assert grads.keys() == ref_grads.keys()
    for name, q in ref_grads.items():
        p = grads[name]
        assert p.grad is not None and p.grad.shape == q.grad.shape and torch.isfinite(p.grad).all(), name
    sketched = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, RandomizedLinear)}
    assert all(not torch.equal(grads[n].grad, ref_grads[n].grad) for n in sketched)

    def flat(names):
        return [torch.cat([d[n].grad.flatten() for n in sorted(names)]) for d in (grads, ref_grads)]

    assert relative_error(*flat(grads.keys() - sketched)) < 0.005  # measured 6e-4
    # and per parameter, so that a small error in one layer's grad_x is not hidden by the large classifier and
    # embedding gradients: the biases and norms get exact gradients up to the 3-bit GELU derivative (measured
    # <= 0.002), except the FFN's first bias, right below the GELU (measured 0.11); key.bias's is zero
    for name in sorted(grads.keys() - sketched):
        if name.endswith("key.bias") or name.startswith("classifier"):
            continue
        bound = 0.2 if "intermediate.dense" in name else 0.005
        assert relative_error(grads[name].grad, ref_grads[name].grad) < bound, name
    assert torch.nn.functional.cosine_similarity(*flat(sketched), dim=0) > 0.5  # measured 0.76
    fresh = transformers.RobertaForSequenceClassification(cfg)
    fresh.load_state_dict(model.state_dict(), strict=True)


def test_convert_keeps_tied_weights():
    transformers.logging.set_verbosity_error()
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=64, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg)
    convert(model, proj_dim=8, activation_bits=None)
    assert isinstance(model.lm_head, RandomizedLinear)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert conversion_report(model).counts() == {"Linear": 8}
