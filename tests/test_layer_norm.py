"""LayerNorm (fewbit_dist.functional.layer_norm, fewbit_dist.models.layer_norm): forward bit-identical to
nn.LayerNorm (fp32, bf16, mixed, under autocast, with and without affine parameters), exact gradients equal to
autograd's, saved bytes, linear layers reading the output sharing what the norm saved, compressed gradients
close and unbiased, argument checks, the conversion of a module, and tiny BERT / GPT-2 models converted."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fewbit_dist
import fewbit_dist.functional.layer_norm as ln_mod
from fewbit_dist.functional.layer_norm import autocast_upcasts_layer_norm, layer_norm
from fewbit_dist.memory import SavedTensorMeter
from fewbit_dist.models.layer_norm import convert_layer_norm, is_layer_norm
from fewbit_dist.util import convert_linear

from utils import lowbit_saved_nbytes, relative_error

# (x dtype, parameter dtype, autocast)
PRECISIONS = {"fp32": (torch.float32, torch.float32, False), "bf16": (torch.bfloat16, torch.bfloat16, False),
              "x-bf16-w-fp32": (torch.bfloat16, torch.float32, False),
              "bf16-autocast": (torch.float32, torch.float32, True),
              "bf16-autocast-x-bf16": (torch.bfloat16, torch.float32, True)}
AFFINE = {"affine": dict(), "no-bias": dict(bias=False), "no-affine": dict(elementwise_affine=False)}


def ln_module(cols: int, dtype=torch.float32, seed: int = 0, **kwargs) -> nn.LayerNorm:
    """nn.LayerNorm with random (not the initial ones/zeros, which would hide a wrong gradient) parameters."""
    module = nn.LayerNorm(cols, eps=1e-5, **kwargs).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + 1.0)
    return module


def inputs(shape, dtype=torch.float32, seed: int = 1):
    """(x, grad_y): x with a nonzero mean and spread per row, as a residual stream has."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3 + torch.randn(shape[:-1] + (1,), generator=g)
    return x.to(dtype), torch.randn(shape, generator=g)


def run(module, x0, grad_y, autocast: bool):
    """y and the gradients (x, then parameters) of `module` on a fresh copy of x0, under bf16 autocast if asked."""
    module.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        y = module(x)
    y.backward(grad_y.to(y.dtype))
    return y, [x.grad] + [p.grad for p in module.parameters()]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), 0).item()


# ------------------------------------------------------------------------------------------ exact mode


@pytest.mark.parametrize("affine", list(AFFINE))
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_exact_equals_nn_layer_norm(precision, affine):
    """Values bit-identical to the module's (with and without autograd), in its dtype; every gradient bit for
    bit autograd's (backward is torch's own kernel on the same saved tensors)."""
    x_dtype, w_dtype, autocast = PRECISIONS[precision]
    ref = ln_module(96, w_dtype, **AFFINE[affine])
    module = copy.deepcopy(ref)
    assert convert_layer_norm(module, "exact", 8, 128, "stochastic")
    x0, grad_y = inputs((3, 17, 96), x_dtype)
    y_ref, grads_ref = run(ref, x0, grad_y, autocast)
    y, grads = run(module, x0, grad_y, autocast)
    assert y.dtype == y_ref.dtype and torch.equal(y, y_ref)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        assert torch.equal(module(x0), y_ref)
    assert len(grads) == len(grads_ref) == 1 + len(list(ref.parameters()))
    for a, b in zip(grads, grads_ref):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_autocast_policy_is_read_from_torch():
    """The float32 policy applies exactly when autocast makes F.layer_norm return float32."""
    assert not autocast_upcasts_layer_norm("cpu")
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype):
            torch_upcasts = F.layer_norm(torch.ones(2, 4, dtype=dtype), (4,)).dtype == torch.float32
            assert autocast_upcasts_layer_norm("cpu") == torch_upcasts


@pytest.mark.parametrize("mode", ["exact", "compressed"])
def test_float32_autocast_policy(monkeypatch, mode):
    """Where autocast runs layer_norm in float32 (CUDA), the function does what autocast does: x, w and b cast
    to float32, a float32 output, gradients through the casts. Checked on CPU by switching the policy on: values
    and (exact) gradients bit for bit those of F.layer_norm on the float32 casts, while the input is saved in
    bfloat16 (half the bytes of the float32 copy autograd keeps)."""
    monkeypatch.setattr(ln_mod, "autocast_upcasts_layer_norm", lambda device_type: True)
    x0, grad_y = inputs((4, 24, 64), torch.bfloat16)
    w0, b0 = (torch.randn(64, generator=torch.Generator().manual_seed(s)).bfloat16() for s in (5, 6))

    x, w, b = x0.clone().requires_grad_(), nn.Parameter(w0.clone()), nn.Parameter(b0.clone())
    with SavedTensorMeter((w, b)) as meter_ref:
        y_ref = F.layer_norm(x.float(), (64,), w.float(), b.float(), 1e-5)
    y_ref.backward(grad_y)

    x2, w2, b2 = x0.clone().requires_grad_(), nn.Parameter(w0.clone()), nn.Parameter(b0.clone())
    with torch.autocast("cpu", torch.bfloat16), SavedTensorMeter((w2, b2)) as meter:
        y = layer_norm(x2, w2, b2, 1e-5, mode=mode, generator=torch.Generator().manual_seed(0))
    y.backward(grad_y)
    assert y.dtype == torch.float32 and torch.equal(y, y_ref)
    for a, r in ((x2, x), (w2, w), (b2, b)):
        assert a.grad.dtype == torch.bfloat16
        if mode == "exact":
            assert torch.equal(a.grad, r.grad)
        else:
            assert cosine(a.grad, r.grad) > 0.999
    rows = 4 * 24
    if mode == "exact":  # x in bf16, mean and rstd in fp32
        assert meter.nbytes == x0.numel() * 2 + 2 * rows * 4
        assert meter_ref.nbytes == x0.numel() * 4 + 2 * rows * 4 + 2 * 64 * 4  # + the float32 w and b casts
    else:
        assert meter.nbytes == lowbit_saved_nbytes(rows, 64, 8, 128) + rows * 4


def test_saved_bytes():
    """exact saves what nn.LayerNorm saves (x, and a mean and rstd per row); compressed saves xhat's packed
    codes, a float32 (lo, scale) per group and rstd. Parameters are not counted."""
    rows, cols, bits, group = 5 * 40, 96, 4, 64  # a partial last group
    for dtype in (torch.float32, torch.bfloat16):
        module = ln_module(cols, dtype)
        x = inputs((5, 40, cols), dtype)[0].requires_grad_()
        with SavedTensorMeter(module) as meter:
            module(x)
        vanilla = meter.nbytes
        size = x.element_size()  # torch keeps mean and rstd in x's dtype on CPU unless the parameters' differs
        with SavedTensorMeter(module) as meter:
            layer_norm(x, module.weight, module.bias, module.eps, mode="exact")
        assert meter.nbytes == vanilla == x.numel() * size + 2 * rows * size
        with SavedTensorMeter(module) as meter:
            layer_norm(x, module.weight, module.bias, module.eps, mode="compressed", bits=bits, group_size=group)
        assert meter.nbytes == lowbit_saved_nbytes(rows, cols, bits, group) + rows * size


# ------------------------------------------------------------------------------------- readers of y


def qkv(cls, cols=96, **kwargs):
    torch.manual_seed(0)
    return [cls(cols, n, **kwargs) for n in (48, 32, 32)]


def norm_and_readers(norm, layers, x0, grads, autocast):
    """Q/K/V-like `layers` reading `norm`'s output: (meter, [grad x, then every parameter's gradient])."""
    x = x0.clone().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast), SavedTensorMeter([norm, *layers]) as meter:
        h = norm(x)
        ys = [layer(h) for layer in layers]
    torch.autograd.backward(ys, [g.to(y.dtype) for g, y in zip(grads, ys)])
    return meter, [x.grad] + [p.grad for m in (norm, *layers) for p in m.parameters()]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("reader", ["ExactLinear", "LowBitLinear"])
def test_exact_norm_readers_save_nothing(reader, autocast):
    """Linear layers reading an exact norm's output keep no copy of it: they rebuild it bit for bit from the
    norm's saved input (plus d-element copies of w and b), so every gradient, the low-bit layers' weight
    gradients included, is autograd's bit for bit."""
    x0, _ = inputs((3, 17, 96))
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(3, 17, n, generator=g) for n in (48, 32, 32)]
    ref_meter, ref = norm_and_readers(ln_module(96), qkv(nn.Linear), x0, grads, autocast)
    norm = ln_module(96)
    assert convert_layer_norm(norm, "exact", 8, 64, "stochastic")
    kwargs = dict(bits=4, group_size=64) if reader == "LowBitLinear" else {}
    meter, ours = norm_and_readers(norm, qkv(getattr(fewbit_dist, reader), **kwargs), x0, grads, autocast)
    assert [(r.shape, r.dtype) for r in meter.records] == [
        ((3, 17, 96), torch.float32), ((3, 17, 1), torch.float32), ((3, 17, 1), torch.float32),
        ((96,), torch.float32), ((96,), torch.float32)]
    # nn.Linear keeps y (one copy, or under autocast three bf16 casts of it and three bf16 weight copies)
    kept = 3 * 51 * 96 * 2 + 2 * 96 * (48 + 32 + 32) if autocast else 51 * 96 * 4
    assert ref_meter.nbytes == meter.nbytes - 2 * 96 * 4 + kept
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_compressed_norm_readers_share_the_codes():
    """Low-bit linear layers reading a compressed norm's output save no codes of their own (they take the
    norm's: the saved bytes are the norm's plus the w and b copies); an exact linear layer cannot take codes
    and keeps one copy of y for all three."""
    x0, _ = inputs((3, 17, 96))
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(3, 17, n, generator=g) for n in (48, 32, 32)]
    rows, cols, bits, group = 51, 96, 6, 64
    norm = ln_module(cols)
    assert convert_layer_norm(norm, "compressed", bits, group, "stochastic")
    own = lowbit_saved_nbytes(rows, cols, bits, group) + rows * 4
    meter, ours = norm_and_readers(norm, qkv(fewbit_dist.LowBitLinear, bits=4, group_size=32), x0, grads, False)
    assert meter.nbytes == own + 2 * cols * 4
    meter, ours = norm_and_readers(norm, qkv(fewbit_dist.ExactLinear), x0, grads, False)
    assert meter.nbytes == own + rows * cols * 4
    _, ref = norm_and_readers(ln_module(cols), qkv(nn.Linear), x0, grads, False)
    for a, b in zip(ours[4:], ref[4:]):  # the exact readers' gradients are exact
        assert torch.equal(a, b)


@pytest.mark.parametrize("affine", list(AFFINE))
def test_offered_forms_rebuild_the_output(affine):
    """What the norm offers its readers: exact mode rebuilds y bit for bit (in any dtype asked); compressed mode
    rebuilds it within its codes' rounding, and only for readers that accept a lossy form."""
    from fewbit_dist.functional import shared_input

    module = ln_module(96, **AFFINE[affine])
    x = inputs((5, 96))[0].requires_grad_()
    for mode, bits in (("exact", 8), ("compressed", 8), ("compressed", 3)):
        convert_layer_norm(module, mode, bits, 32, "stochastic")
        shared_input.clear()
        y = module(x)
        _, exact_form = shared_input.take(y, exact=True)
        _, form = shared_input.take(y, exact=False)
        assert (exact_form is None) == (mode == "compressed") and form is not None
        rebuilt = form.restorer()(form.tensors(), torch.float32)
        if mode == "exact":
            assert torch.equal(rebuilt, y.detach()) and torch.equal(form.restorer()(form.tensors(), torch.bfloat16),
                                                                    y.detach().bfloat16())
        else:
            # within one rounding step of xhat (its group's scale), times |w|
            step = form.tensors()[2].repeat_interleave(32, dim=1)[:, :96]
            w = module.weight.detach().abs() if module.weight is not None else 1.0
            assert ((rebuilt - y.detach()).abs() <= step * w + 1e-5).all(), (mode, bits)
            assert relative_error(rebuilt, y) > 1e-4  # really the codes
    shared_input.clear()


# --------------------------------------------------------------------------------------- compressed mode


@pytest.mark.parametrize("affine", list(AFFINE))
def test_compressed_gradients_close(affine):
    """The forward is exact whatever is saved; 8-bit codes give gradients at cosine > 0.999 (grad_b is exact up to
    summation order); 2-bit ones are visibly worse (the codes are really what backward reads)."""
    ref = ln_module(256, **AFFINE[affine])
    x0, grad_y = inputs((8, 32, 256))
    y_ref, grads_ref = run(ref, x0, grad_y, False)
    errors = {}
    for bits in (8, 2):
        module = copy.deepcopy(ref)
        convert_layer_norm(module, "compressed", bits, 128, "stochastic")
        torch.manual_seed(bits)
        y, grads = run(module, x0, grad_y, False)
        assert torch.equal(y, y_ref)
        if affine == "affine":
            torch.testing.assert_close(grads[2], grads_ref[2], rtol=1e-5, atol=1e-5)
        errors[bits] = [relative_error(a, b) for a, b in zip(grads[:2], grads_ref[:2])]
        if bits == 8:
            assert min(cosine(a, b) for a, b in zip(grads, grads_ref)) > 0.999
    assert max(errors[8]) < 0.01, errors
    assert min(errors[2]) > 5 * max(errors[8]), errors


def test_compressed_weight_gradient_is_unbiased():
    """With stochastic rounding the mean of grad_w over rounding seeds converges to the exact one (its error
    falls like 1/sqrt(n)); with nearest rounding it cannot (every seed gives the same, biased, estimate)."""
    ref = ln_module(48)
    x0, grad_y = inputs((16, 48))
    _, grads_ref = run(ref, x0, grad_y, False)
    exact_w = grads_ref[1]
    x = x0.clone().requires_grad_()
    estimates = {}
    for rounding in ("stochastic", "nearest"):
        gen = torch.Generator().manual_seed(0)
        gw = [torch.autograd.grad(layer_norm(x, ref.weight, ref.bias, ref.eps, mode="compressed", bits=2,
                                             group_size=16, rounding=rounding, generator=gen), ref.weight,
                                  grad_y)[0] for _ in range(400)]
        estimates[rounding] = (relative_error(gw[0], exact_w), relative_error(torch.stack(gw).mean(0), exact_w))
    single, mean = estimates["stochastic"]
    assert mean < 0.15 * single, estimates  # 1/sqrt(400) = 0.05 for an unbiased estimate
    assert estimates["nearest"][1] > 0.5 * estimates["nearest"][0], estimates


# ------------------------------------------------------------------------------------- arguments, modules


def test_rejects_bad_arguments():
    x, w, b = torch.randn(2, 8, requires_grad=True), torch.ones(8), torch.zeros(8)
    cases = [(dict(mode="fast"), ValueError, "mode"), (dict(bits=1), ValueError, "bits"),
             (dict(bits=9), ValueError, "bits"), (dict(bits=True), TypeError, "bits"), (dict(bits=4.0), TypeError, "bits"),
             (dict(group_size=0), ValueError, "group_size"), (dict(rounding="up"), ValueError, "rounding")]
    for kwargs, exc, name in cases:
        with pytest.raises(exc, match=name):
            layer_norm(x, w, b, 1e-5, **kwargs)
    for eps, exc in ((-1.0, ValueError), (float("nan"), ValueError), ("1e-5", TypeError), (None, TypeError)):
        with pytest.raises(exc, match="eps"):
            layer_norm(x, w, b, eps)
    with pytest.raises(ValueError, match="weight"):
        layer_norm(x, torch.ones(7), b, 1e-5)
    with pytest.raises(ValueError, match="bias"):
        layer_norm(x, w, torch.zeros(2, 8), 1e-5)
    with pytest.raises(TypeError, match="weight"):
        layer_norm(x, [1.0] * 8, b, 1e-5)
    with pytest.raises(TypeError, match="x must be a tensor"):
        layer_norm(x.tolist(), w, b, 1e-5)
    with pytest.raises(ValueError, match="x must have"):
        layer_norm(torch.tensor(1.0), None, None, 1e-5)
    with pytest.raises(ValueError, match="mode"):
        convert_layer_norm(nn.LayerNorm(8), "fast", 8, 128, "stochastic")
    with pytest.raises(ValueError, match="bits"):
        convert_layer_norm(nn.LayerNorm(8), "compressed", 12, 128, "stochastic")


def test_conversion_keeps_the_module():
    """Same object and class, parameters, state_dict and hooks; converting again replaces the settings; other
    modules (a subclass, a 2-D normalized shape, a Linear) are left alone; a wrong input raises torch's error."""
    class MyNorm(nn.LayerNorm):
        pass

    for other in (MyNorm(8), nn.LayerNorm((4, 8)), nn.Linear(8, 8), nn.RMSNorm(8)):
        forward = other.forward
        assert not is_layer_norm(other) and not convert_layer_norm(other, "exact", 8, 128, "stochastic")
        assert other.forward == forward and "forward" not in other.__dict__

    ref = ln_module(32)
    module = copy.deepcopy(ref)
    calls = []
    module.register_forward_hook(lambda m, args, out: calls.append(out.shape))
    params = list(module.parameters())
    assert convert_layer_norm(module, "exact", 8, 128, "stochastic") and is_layer_norm(module)
    assert convert_layer_norm(module, "compressed", 4, 16, "nearest")
    assert type(module) is nn.LayerNorm and list(module.parameters()) == params
    assert module.__dict__["_fewbit_layer_norm"] == dict(mode="compressed", bits=4, group_size=16, rounding="nearest")
    assert module.state_dict().keys() == ref.state_dict().keys()
    x0, grad_y = inputs((5, 32))
    y, _ = run(module, x0, grad_y, False)
    assert torch.equal(y, ref(x0)) and calls == [(5, 32)]
    with pytest.raises(RuntimeError):
        module(torch.randn(5, 31, requires_grad=True))


def test_awkward_inputs():
    """Empty and non-contiguous inputs; float64 (gradcheck of exact mode); meta tensors (shapes only)."""
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    w, b = (torch.randn(7, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda *t: layer_norm(*t, 1e-5), (x, w, b))
    for mode in ("exact", "compressed"):
        x, w = torch.empty(4, 8, device="meta", requires_grad=True), torch.empty(8, device="meta", requires_grad=True)
        layer_norm(x, w, None, 1e-5, mode=mode).sum().backward()
        assert x.grad.shape == x.shape and w.grad.shape == w.shape
    ref = ln_module(40)
    module = copy.deepcopy(ref)
    for mode in ("exact", "compressed"):
        convert_layer_norm(module, mode, 8, 16, "stochastic")
        for x0 in (torch.randn(0, 40), torch.randn(40, 6).t()):
            grad_y = torch.randn(x0.shape)
            y_ref, grads_ref = run(ref, x0, grad_y, False)
            y, grads = run(module, x0, grad_y, False)
            assert torch.equal(y, y_ref)
            for a, b in zip(grads, grads_ref):
                if mode == "exact":
                    assert torch.equal(a, b)
                else:
                    torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)


# ---------------------------------------------------------------------------------- transformers models

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def convert_all(model: nn.Module, mode=None, linears=None) -> nn.Module:
    """Convert every nn.LayerNorm (when `mode`) and every nn.Linear / Conv1D (to `linears`: None, 'exact' or
    'low_bit' at 8 bits) of `model`, in place."""
    from fewbit_dist.models.conv1d import convert_conv1d

    for name, module in list(model.named_modules()):
        if mode is not None and is_layer_norm(module):
            assert convert_layer_norm(module, mode, 8, 128, "stochastic")
        if linears is not None:
            kwargs = dict(bits=8, group_size=128) if linears == "low_bit" else {}
            convert_conv1d(module, linears, **kwargs)
            for child_name, child in list(module.named_children()):
                if type(child) is nn.Linear:
                    cls = fewbit_dist.LowBitLinear if linears == "low_bit" else fewbit_dist.ExactLinear
                    setattr(module, child_name, convert_linear(child, cls, **kwargs))
    return model


def bert(layers=2, hidden=64):
    config = transformers.BertConfig(vocab_size=300, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=4, intermediate_size=4 * hidden, max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.BertModel(config, add_pooling_layer=False).eval()  # eval: no dropout, same values


def gpt2(layers=2, hidden=64):
    config = transformers.GPT2Config(vocab_size=300, n_embd=hidden, n_layer=layers, n_head=4, n_positions=128)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def step(model, ids):
    """(loss, {name: grad}, saved bytes): BERT's loss is a fixed projection of its last hidden state."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)
    with SavedTensorMeter(model) as meter:
        if isinstance(model, transformers.BertModel):
            h = model(input_ids=ids).last_hidden_state
            loss = (h * torch.linspace(-1, 1, h.shape[-1])).sum() / h.numel()
        else:
            loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, meter.nbytes


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_models_with_converted_layer_norms(family):
    """exact: the same loss and the same gradients; with exact linear layers (nn.Linear, GPT-2's Conv1D) the
    norms' outputs they read are no longer kept: exactly rows * d floats fewer per such norm, less the d-element
    w and b copies. compressed: the same loss, gradients close."""
    base = bert() if family == "bert" else gpt2()
    layers, d = 2, 64
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    rows = ids.numel()
    loss0, grads0, bytes0 = step(base, ids)

    loss, grads, nbytes = step(convert_all(copy.deepcopy(base), "exact"), ids)
    assert torch.equal(loss, loss0) and grads.keys() == grads0.keys() and nbytes == bytes0
    for name in grads:
        torch.testing.assert_close(grads[name], grads0[name], rtol=1e-6, atol=1e-7, msg=name)

    _, grads_lin, bytes_lin = step(convert_all(copy.deepcopy(base), linears="exact"), ids)
    loss, grads, nbytes = step(convert_all(copy.deepcopy(base), "exact", linears="exact"), ids)
    # BERT: the embeddings' norm (read by Q/K/V), then per layer the attention output's norm (read by the
    # intermediate projection) and the layer output's (read by the next Q/K/V, none after the last layer).
    # GPT-2: ln_1 (c_attn) and ln_2 (c_fc) per layer and ln_f (the LM head).
    read = 2 * layers if family == "bert" else 2 * layers + 1
    assert nbytes == bytes_lin - read * (rows * d * 4 - 2 * d * 4), (bytes_lin - nbytes) / (rows * d * 4)
    torch.testing.assert_close(loss, loss0, rtol=1e-6, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_lin[name], rtol=1e-6, atol=1e-7, msg=name)

    _, _, bytes_lowbit = step(convert_all(copy.deepcopy(base), linears="low_bit"), ids)
    loss, grads, nbytes = step(convert_all(copy.deepcopy(base), "compressed", linears="low_bit"), ids)
    torch.testing.assert_close(loss, loss0, rtol=1e-6, atol=1e-6)
    flat = [torch.cat([g[n].flatten() for n in sorted(g)]) for g in (grads, grads0)]
    assert cosine(*flat) > 0.999
    # The 8-bit linear layers share the codes of the norms they read (the same size as their own), which no
    # longer keep their input and mean (the w and b copies come instead); BERT's last norm, read by no linear
    # layer, keeps its codes instead of its input and mean.
    shared = read * (rows * d * 4 + rows * 4 - 2 * d * 4)
    unread = rows * d * 4 + rows * 4 - lowbit_saved_nbytes(rows, d, 8, 128) if family == "bert" else 0
    assert nbytes == bytes_lowbit - shared - unread, (nbytes, bytes_lowbit)
