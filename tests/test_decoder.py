"""Decoder LLMs (Llama, Qwen2, Qwen3, Mistral, Gemma; GPT-2): the presets on tiny random causal LMs (same loss,
same gradients for `exact`, saved-activation bytes against the unconverted model), the causal-LM head's
outputs, tied embeddings, and the ops the decoder handlers use checked against autograd: RMSNorm
(fewbit_dist.functional.norm), the gated product (fewbit_dist.functional.gated), the chunked loss
(fewbit_dist.functional.loss) and ExactLinear under autocast."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import fewbit_dist
from fewbit_dist.functional.gated import gated_product
from fewbit_dist.functional.loss import chunk_rows_for, chunked_causal_lm_loss, fuse_head, is_fused_head
from fewbit_dist.functional.norm import rms_norm
from fewbit_dist.memory import SavedTensorMeter

from conftest import TOL
from utils import lowbit_saved_nbytes, relative_error

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

FAMILIES = ["Llama", "Qwen2", "Qwen3", "Mistral", "Gemma"]
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256)


def causal_lm(family: str, seed: int = 0, **overrides) -> nn.Module:
    """A random `<family>ForCausalLM` (TINY sizes unless overridden), built after torch.manual_seed(seed)."""
    config = getattr(transformers, f"{family}Config")(**{**TINY, **overrides})
    torch.manual_seed(seed)
    return getattr(transformers, f"{family}ForCausalLM")(config)


def tokens(batch: int, length: int, vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def train_step(model: nn.Module, x: torch.Tensor, autocast: bool):
    """`model(input_ids=x, labels=x).loss.backward()` (under bf16 autocast if asked): (loss, {name: grad in
    float32}, saved-activation bytes of the forward)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)  # the same rounding seeds for every model given the same conversion
    with SavedTensorMeter(model) as meter, torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        out = model(input_ids=x, labels=x)
    out.loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, meter.nbytes


def cosine(a: dict, b: dict) -> float:
    """Cosine of two full-parameter gradients (dicts of the same names), in float64."""
    assert a.keys() == b.keys()
    dot = na = nb = 0.0
    for name in a:
        x, y = a[name].double().flatten(), b[name].double().flatten()
        dot, na, nb = dot + (x @ y).item(), na + (x @ x).item(), nb + (y @ y).item()
    return dot / math.sqrt(na * nb)


def expected_swaps(family: str, layers: int) -> dict:
    """What `convert` swaps in a causal LM of `layers` blocks under the exact preset."""
    norms_per_layer = 4 if family == "Qwen3" else 2  # Qwen3 adds q_norm and k_norm
    return {f"{family}RMSNorm": norms_per_layer * layers + 1, f"{family}MLP": layers,
            "Linear": 7 * layers + 1, f"{family}ForCausalLM": 1}


# ------------------------------------------------------------------------------------ presets on models


@pytest.mark.parametrize("precision", ["bf16-autocast", "fp32", "bf16-weights"])
@pytest.mark.parametrize("family", FAMILIES)
def test_exact_and_max_saving_presets(family, precision):
    """exact: the same loss, the same full gradient (cosine >= 0.9999), <= 0.65x the saved bytes; max-saving:
    the same loss (forward values are exact), <= 0.30x the saved bytes, gradients still close."""
    base = causal_lm(family)
    if precision == "bf16-weights":
        base = base.to(torch.bfloat16)
    autocast = precision == "bf16-autocast"
    x = tokens(2, 64, TINY["vocab_size"])
    loss0, grads0, bytes0 = train_step(base, x, autocast)

    exact = fewbit_dist.convert(copy.deepcopy(base), "exact")
    assert fewbit_dist.conversion_report(exact).counts() == expected_swaps(family, TINY["num_hidden_layers"])
    loss, grads, nbytes = train_step(exact, x, autocast)
    torch.testing.assert_close(loss, loss0, rtol=1e-6, atol=1e-6)
    assert grads.keys() == grads0.keys()
    assert cosine(grads, grads0) >= 0.9999
    assert nbytes <= 0.65 * bytes0, nbytes / bytes0

    saving = fewbit_dist.convert(copy.deepcopy(base), "max-saving")
    loss, grads, nbytes = train_step(saving, x, autocast)
    torch.testing.assert_close(loss, loss0, rtol=1e-6, atol=1e-6)
    assert nbytes <= 0.30 * bytes0, nbytes / bytes0
    assert cosine(grads, grads0) >= 0.99  # measured 0.996-0.9998 on these random models


@pytest.mark.slow
@pytest.mark.parametrize("family", ["Llama", "Qwen2", "Mistral"])
def test_smollm2_shaped_models_meet_the_targets(family):
    """The issue's bar on models proportioned like SmolLM2-135M (8 layers, vocab 8192), 4 x 512 tokens, bf16
    autocast: exact <= 0.65x at cosine >= 0.9999 and the same loss; max-saving <= 0.30x with the same loss.
    Llama at the full 8 layers; Qwen2 and Mistral (the same blocks) at 2 layers of that width, which keeps the
    suite's CPU time bounded (each 8-layer model costs about 6 CPU-minutes here) while a larger share of
    their bytes is the loss's."""
    shape = dict(num_hidden_layers=8 if family == "Llama" else 2, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                 num_key_value_heads=3, head_dim=64, vocab_size=8192, max_position_embeddings=1024)
    base = causal_lm(family, **shape)
    x = tokens(4, 512, shape["vocab_size"])
    loss0, grads0, bytes0 = train_step(base, x, autocast=True)
    for preset, ratio in (("exact", 0.65), ("max-saving", 0.30)):
        model = fewbit_dist.convert(copy.deepcopy(base), preset)
        loss, grads, nbytes = train_step(model, x, autocast=True)
        torch.testing.assert_close(loss, loss0, rtol=1e-6, atol=1e-6, msg=preset)
        assert nbytes <= ratio * bytes0, (preset, nbytes / bytes0)
        if preset == "exact":
            assert cosine(grads, grads0) >= 0.9999
        del model, grads


@pytest.mark.parametrize("preset", ["exact", "max-saving"])
@pytest.mark.parametrize("autocast", [True, False], ids=["bf16-autocast", "fp32"])
def test_causal_lm_outputs(preset, autocast):
    """Without labels the converted model returns the unconverted model's logits bit for bit (and no loss);
    with labels it returns the loss and logits=None."""
    base = causal_lm("Llama")
    model = fewbit_dist.convert(copy.deepcopy(base), preset)
    x = tokens(2, 40, TINY["vocab_size"])
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        ref = base(input_ids=x)
        torch.manual_seed(0)
        out = model(input_ids=x)
        with torch.no_grad():
            out_nograd = model(input_ids=x)
        with_labels = model(input_ids=x, labels=x)
        ref_loss = base(input_ids=x, labels=x).loss
    assert out.loss is None and torch.equal(out.logits, ref.logits)
    assert torch.equal(out_nograd.logits, ref.logits)
    assert with_labels.logits is None
    torch.testing.assert_close(with_labels.loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert out.past_key_values is not None and with_labels.past_key_values is not None


@pytest.mark.parametrize("preset", ["exact", "max-saving"])
def test_tied_embeddings_stay_tied(preset):
    base = causal_lm("Llama", tie_word_embeddings=True)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    model = fewbit_dist.convert(copy.deepcopy(base), preset)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    x = tokens(2, 48, TINY["vocab_size"])
    loss0, grads0, _ = train_step(base, x, autocast=False)
    loss, grads, _ = train_step(model, x, autocast=False)
    torch.testing.assert_close(loss, loss0, rtol=1e-6, atol=1e-6)
    assert "lm_head.weight" not in grads  # one Parameter, reported once, as in the unconverted model
    tied = "model.embed_tokens.weight"
    if preset == "exact":
        torch.testing.assert_close(grads[tied], grads0[tied], rtol=1e-4, atol=1e-6)
    assert cosine({tied: grads[tied]}, {tied: grads0[tied]}) >= 0.99
    with torch.no_grad():  # an update through one name is seen through the other
        model.model.embed_tokens.weight.add_(1.0)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


# --------------------------------------------------------------------------------------------- GPT-2


def gpt2():
    config = transformers.GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("preset", ["exact", "max-saving"])
def test_gpt2_conv1d_projections_are_converted(preset, autocast):
    """GPT-2's projections are transformers' Conv1D (x @ W + b, W stored (in, out)), not nn.Linear: each gets
    the preset's linear method, keeping its class, parameters and state_dict; its LayerNorms, the tied LM head
    and the loss are converted too. exact: the same loss and gradient with fewer saved bytes; max-saving: the same loss, far
    fewer bytes, gradient close."""
    base = gpt2()
    model = fewbit_dist.convert(copy.deepcopy(base), preset)
    counts = fewbit_dist.conversion_report(model).counts()
    assert counts.get("Conv1D") == 4 * 2  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert counts.get("LayerNorm") == 2 * 2 + 1  # ln_1, ln_2 per block and ln_f
    assert counts.get("Linear") == 1 and counts.get("GPT2LMHeadModel") == 1  # the LM head and the chunked loss
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.state_dict().keys() == base.state_dict().keys()
    assert all(type(m).__name__ == "Conv1D" for n, m in model.named_modules() if n.endswith(("c_attn", "c_fc")))
    x = tokens(2, 64, 512)
    loss0, grads0, bytes0 = train_step(base, x, autocast)
    loss, grads, nbytes = train_step(model, x, autocast)
    torch.testing.assert_close(loss, loss0, rtol=1e-6, atol=1e-6)
    assert grads.keys() == grads0.keys()
    if preset == "exact":
        assert cosine(grads, grads0) >= 0.9999
        # measured 0.83x in fp32 (the chunked loss; the projections reading a LayerNorm's output rebuild it;
        # the tanh-GELU stays as it is under exact), 0.65x under autocast, where no bf16 weight copy is kept
        assert nbytes < 0.87 * bytes0, nbytes / bytes0
    else:
        assert cosine(grads, grads0) >= 0.99
        assert nbytes < 0.35 * bytes0, nbytes / bytes0  # measured 0.27x (fp32) and 0.26x (autocast)


def test_gpt2_conv1d_exact_equals_addmm():
    """A converted Conv1D computes transformers' addmm exactly, and its gradients (input, weight (in, out),
    bias) are autograd's; a low-bit Conv1D's weight gradient is unbiased over rounding seeds."""
    from transformers.pytorch_utils import Conv1D

    from fewbit_dist.models.conv1d import convert_conv1d

    torch.manual_seed(0)
    ref = Conv1D(24, 16)
    x = torch.randn(3, 5, 16, requires_grad=True)
    for method, kwargs in (("exact", {}), ("low_bit", dict(bits=8, group_size=16, rounding="stochastic"))):
        mod = copy.deepcopy(ref)
        assert convert_conv1d(mod, method, **kwargs)
        y0, y = ref(x), mod(x)
        torch.testing.assert_close(y, y0, rtol=0, atol=0)
        g = torch.randn_like(y0)
        gx0, gw0, gb0 = torch.autograd.grad(y0, (x, ref.weight, ref.bias), g)
        gx, gw, gb = torch.autograd.grad(y, (x, mod.weight, mod.bias), g)
        torch.testing.assert_close(gx, gx0)
        torch.testing.assert_close(gb, gb0)
        assert gw.shape == (16, 24)
        if method == "exact":
            torch.testing.assert_close(gw, gw0)
        else:
            mean = torch.stack([torch.autograd.grad(mod(x), mod.weight, g)[0] for _ in range(200)]).mean(0)
            assert relative_error(mean, gw0) < 0.2 * relative_error(gw, gw0) + 1e-4
    assert not convert_conv1d(nn.Linear(4, 4), "exact")
    with pytest.raises(ValueError, match="method must be"):
        convert_conv1d(Conv1D(4, 4), "sketchy")


# --------------------------------------------------------------------------------------------- RMSNorm


def hf_norm(style: str, dim: int, weight_dtype: torch.dtype, seed: int = 0) -> nn.Module:
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    module = (LlamaRMSNorm if style == "llama" else GemmaRMSNorm)(dim, eps=1e-6).to(weight_dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # not the initial ones (ones / zeros), which would hide a wrong weight gradient
        module.weight.copy_(torch.randn(dim, generator=g) * 0.5 + (1.0 if style == "llama" else 0.0))
    return module


def norm_eps(module: nn.Module) -> float:
    return module.variance_epsilon if hasattr(module, "variance_epsilon") else module.eps


STYLES = ["llama", "gemma"]
FLOATS = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("weight_dtype", FLOATS, ids=["w-fp32", "w-bf16"])
@pytest.mark.parametrize("x_dtype", FLOATS, ids=["x-fp32", "x-bf16"])
@pytest.mark.parametrize("style", STYLES)
def test_rms_norm_exact_against_the_hf_module(style, x_dtype, weight_dtype):
    """Values bit-identical to the module's forward (with and without autograd), the weight gradient bit for
    bit, the input gradient within rounding (it is computed by the closed form, not autograd's chain)."""
    module = hf_norm(style, 96, weight_dtype)
    g = torch.Generator().manual_seed(1)
    x0 = (torch.randn(3, 17, 96, generator=g) * 3).to(x_dtype)
    x = x0.clone().requires_grad_()
    y_ref = module(x)
    grad_y = torch.randn(y_ref.shape, generator=g).to(y_ref.dtype)
    y_ref.backward(grad_y)

    x2 = x0.clone().requires_grad_()
    w2 = module.weight.detach().clone().requires_grad_()
    y = rms_norm(x2, w2, norm_eps(module), style=style, mode="exact")
    assert y.dtype == y_ref.dtype and torch.equal(y, y_ref)
    with torch.no_grad():
        assert torch.equal(rms_norm(x0, w2, norm_eps(module), style=style), y_ref)
    y.backward(grad_y)
    assert w2.grad.dtype == module.weight.grad.dtype and torch.equal(w2.grad, module.weight.grad)
    rtol, atol = TOL[x_dtype]
    torch.testing.assert_close(x2.grad, x.grad, rtol=rtol, atol=atol * x.grad.abs().max().item())


@pytest.mark.parametrize("style", STYLES)
def test_rms_norm_saved_bytes(style):
    """exact saves the input once plus one float32 rstd per row; compressed saves h's packed codes, a float32
    (lo, scale) per group and rstd; the Parameter is not counted (it lives anyway)."""
    rows, cols, bits, group = 5 * 40, 256, 4, 64
    module = hf_norm(style, cols, torch.float32)
    x = torch.randn(5, 40, cols, requires_grad=True)
    with SavedTensorMeter(module) as meter:
        module(x)
    vanilla = meter.nbytes
    with SavedTensorMeter(module) as meter:
        rms_norm(x, module.weight, norm_eps(module), style=style, mode="exact")
    assert meter.nbytes == x.numel() * 4 + rows * 4
    assert meter.nbytes < vanilla
    with SavedTensorMeter(module) as meter:
        rms_norm(x, module.weight, norm_eps(module), style=style, mode="compressed", bits=bits, group_size=group)
    assert meter.nbytes == lowbit_saved_nbytes(rows, cols, bits, group) + rows * 4


@pytest.mark.parametrize("style", STYLES)
def test_rms_norm_compressed_gradients(style):
    """8-bit codes give gradients within 1% of the exact ones; 2-bit ones are visibly worse (the codes are
    really what backward reads)."""
    module = hf_norm(style, 256, torch.float32)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(8, 32, 256, generator=g) * 2
    grad_y = torch.randn(8, 32, 256, generator=g)
    errors = {}
    x = x0.clone().requires_grad_()
    module(x).backward(grad_y)
    for bits in (8, 2):
        x2, w2 = x0.clone().requires_grad_(), module.weight.detach().clone().requires_grad_()
        y = rms_norm(x2, w2, norm_eps(module), style=style, mode="compressed", bits=bits,
                     generator=torch.Generator().manual_seed(bits))
        assert torch.equal(y, module(x0))  # the forward is exact whatever is saved
        y.backward(grad_y)
        errors[bits] = (relative_error(x2.grad, x.grad), relative_error(w2.grad, module.weight.grad))
    assert max(errors[8]) < 0.01, errors
    assert min(errors[2]) > 5 * max(errors[8]), errors


@pytest.mark.parametrize("style", STYLES)
def test_rms_norm_compressed_row_chunks_give_the_whole_tensors_gradients(monkeypatch, style):
    """The compressed norm's backward and its reader's weight gradient work on row chunks (functional.norm's
    NORM_CHUNK_BYTES, the rebuilt output's RESTORE_CHUNK_BYTES): with 8-row chunks of 35 x 3 rows, grad_x is
    the whole tensors' bit for bit (each row's arithmetic is its own) and the weight gradients, summed by
    chunk in float32, agree to rounding."""
    import fewbit_dist.functional.linear as linear
    import fewbit_dist.functional.norm as norm

    module = hf_norm(style, 64, torch.float32)
    g = torch.Generator().manual_seed(0)
    x0, w0 = torch.randn(3, 35, 64, generator=g) * 2, torch.randn(16, 64, generator=g)
    grad_out = torch.randn(3, 35, 16, generator=g)

    def run():
        x, nw, w = x0.clone().requires_grad_(), module.weight.detach().clone().requires_grad_(), \
            w0.clone().requires_grad_()
        gen = torch.Generator().manual_seed(1)
        y = rms_norm(x, nw, norm_eps(module), style=style, mode="compressed", bits=4, group_size=32, generator=gen)
        fewbit_dist.functional.lowbit.low_bit_linear(y, w, None, bits=4, generator=gen).backward(grad_out)
        return x.grad, nw.grad, w.grad

    whole = run()
    monkeypatch.setattr(norm, "NORM_CHUNK_BYTES", 8 * 64 * 4)
    monkeypatch.setattr(linear, "RESTORE_CHUNK_BYTES", 8 * 16 * 4 * 2)
    chunked = run()
    assert torch.equal(chunked[0], whole[0])
    torch.testing.assert_close(chunked[1], whole[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked[2], whole[2], rtol=1e-5, atol=1e-5)


def test_rms_norm_rejects_bad_arguments():
    x, w = torch.randn(2, 8), torch.ones(8)
    with pytest.raises(ValueError, match="style"):
        rms_norm(x, w, 1e-6, style="layernorm")
    with pytest.raises(ValueError, match="mode"):
        rms_norm(x, w, 1e-6, mode="fast")


# ------------------------------------------------------------------------------------------ gated product

ACTIVATIONS = ["silu", "gelu_pytorch_tanh", "gelu"]


@pytest.mark.parametrize("dtype", FLOATS, ids=["fp32", "bf16"])
@pytest.mark.parametrize("act_name", ACTIVATIONS)
def test_gated_product_exact_equals_autograd(act_name, dtype):
    act = transformers.activations.ACT2FN[act_name]
    g = torch.Generator().manual_seed(0)
    gate0, up0 = (torch.randn(4, 33, 160, generator=g) * 2).to(dtype), torch.randn(4, 33, 160, generator=g).to(dtype)
    grad_h = torch.randn(4, 33, 160, generator=g).to(dtype)
    gate, up = gate0.clone().requires_grad_(), up0.clone().requires_grad_()
    h_ref = act(gate) * up
    h_ref.backward(grad_h)
    gate2, up2 = gate0.clone().requires_grad_(), up0.clone().requires_grad_()
    with SavedTensorMeter() as meter:
        h = gated_product(gate2, up2, act, mode="exact")
    h.backward(grad_h)
    assert torch.equal(h, h_ref)
    assert torch.equal(gate2.grad, gate.grad) and torch.equal(up2.grad, up.grad)
    assert meter.nbytes == 2 * gate0.numel() * gate0.element_size()  # gate and up, nothing else


@pytest.mark.parametrize("mode", ["exact", "compressed"])
def test_gated_product_keeps_the_activation_hooks_out_of_backward(mode):
    """A forward hook on the activation module fires once per forward (backward's recomputes are not module
    calls), and a full backward hook on it does not break backward (it cannot run inside torch.func.vjp)."""
    act = nn.SiLU()
    fired = []
    act.register_forward_hook(lambda *_: fired.append("fwd"))
    act.register_full_backward_hook(lambda *_: fired.append("bwd"))
    gate, up = torch.randn(6, 16, requires_grad=True), torch.randn(6, 16, requires_grad=True)
    h = gated_product(gate, up, act, mode=mode)
    down = nn.Linear(16, 4)
    fewbit_dist.functional.linear.exact_linear(h, down.weight, down.bias).sum().backward()  # rebuilds h
    assert fired == ["fwd"]
    assert gate.grad is not None and up.grad is not None


@pytest.mark.parametrize("mode", ["exact", "compressed"])
def test_gated_product_row_chunks_give_the_whole_tensors_gradients(monkeypatch, mode):
    """Backward by row chunks (8 rows each here, the last one short) gives each element the gradient the
    whole tensors give: exact mode autograd's bit for bit, compressed mode the unchunked path's with the same
    codes. A down projection that rebuilds h in row chunks for its weight gradient agrees with one that
    rebuilds it whole (up to the order of the chunks' sums)."""
    import fewbit_dist.functional.gated as gated
    import fewbit_dist.functional.linear as linear

    act = transformers.activations.ACT2FN["silu"]
    g = torch.Generator().manual_seed(0)
    gate0, up0 = torch.randn(3, 35, 64, generator=g) * 2, torch.randn(3, 35, 64, generator=g)
    grad_y = torch.randn(3, 35, 16, generator=g)
    w0 = torch.randn(16, 64, generator=g)

    def run():
        gate, up, w = gate0.clone().requires_grad_(), up0.clone().requires_grad_(), w0.clone().requires_grad_()
        gen = torch.Generator().manual_seed(1)
        h = gated_product(gate, up, act, mode=mode, bits=4, generator=gen)
        y = fewbit_dist.functional.lowbit.low_bit_linear(h, w, None, bits=4, generator=gen)
        y.backward(grad_y)
        return gate.grad, up.grad, w.grad

    whole = run()
    monkeypatch.setattr(gated, "GATED_CHUNK_BYTES", 8 * 64 * 4)
    monkeypatch.setattr(linear, "RESTORE_CHUNK_BYTES", 8 * 16 * 4 * (2 if mode == "compressed" else 1))
    assert gated._chunk_rows(105, 64) == 8
    chunked = run()
    assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])
    torch.testing.assert_close(chunked[2], whole[2], rtol=1e-5, atol=1e-5)
    if mode == "exact":  # against autograd's own
        gate, up = gate0.clone().requires_grad_(), up0.clone().requires_grad_()
        (act(gate) * up).backward(torch.randn(3, 35, 64, generator=torch.Generator().manual_seed(2)))
        a, b = gate0.clone().requires_grad_(), up0.clone().requires_grad_()
        gated_product(a, b, act).backward(torch.randn(3, 35, 64, generator=torch.Generator().manual_seed(2)))
        assert torch.equal(a.grad, gate.grad) and torch.equal(b.grad, up.grad)


def test_gated_product_compressed_is_close_and_unbiased():
    """Stochastic rounding: one draw's error shrinks with the bits; the mean of 64 draws is ~8x closer than one
    draw (what independent zero-mean errors give; a bias would not average away). Saves two quantized copies."""
    act = transformers.activations.ACT2FN["silu"]
    g = torch.Generator().manual_seed(0)
    gate0, up0, grad_h = torch.randn(64, 256, generator=g) * 2, torch.randn(64, 256, generator=g), \
        torch.randn(64, 256, generator=g)
    gate, up = gate0.clone().requires_grad_(), up0.clone().requires_grad_()
    (act(gate) * up).backward(grad_h)

    def draws(bits, n):
        out = []
        for s in range(n):
            a, b = gate0.clone().requires_grad_(), up0.clone().requires_grad_()
            h = gated_product(a, b, act, mode="compressed", bits=bits, generator=torch.Generator().manual_seed(s))
            assert torch.equal(h, act(gate0) * up0)
            h.backward(grad_h)
            out.append((a.grad, b.grad))
        return out

    one8 = draws(8, 1)[0]
    assert relative_error(one8[0], gate.grad) < 0.03 and relative_error(one8[1], up.grad) < 0.03
    many = draws(4, 64)
    for i, ref in enumerate((gate.grad, up.grad)):
        single = relative_error(many[0][i], ref)
        mean = relative_error(torch.stack([d[i] for d in many]).mean(0), ref)
        assert single > 3 * relative_error(one8[i], ref)
        assert mean < 0.25 * single, (i, mean, single)

    a, b = gate0.clone().requires_grad_(), up0.clone().requires_grad_()
    with SavedTensorMeter() as meter:
        gated_product(a, b, act, mode="compressed", bits=4, group_size=128)
    assert meter.nbytes == 2 * lowbit_saved_nbytes(64, 256, 4, 128)


def test_gated_product_rejects_bad_arguments():
    a = torch.randn(2, 8)
    with pytest.raises(ValueError, match="mode"):
        gated_product(a, a, torch.sigmoid, mode="fast")
    with pytest.raises(TypeError, match="act"):
        gated_product(a, a, "silu")
    with pytest.raises(ValueError, match="shape"):
        gated_product(a, torch.randn(2, 9), torch.sigmoid)


# ------------------------------------------------------------------------------------------ chunked loss


def loss_case(seed=0, batch=2, length=13, hidden=24, vocab=50, fused=False, bias=False):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = nn.Linear(hidden, vocab, bias=bias)
    if fused:
        assert fuse_head(head)
    h = torch.randn(batch, length, hidden, generator=g)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[0, :4] = -100  # a padded prompt
    labels[1, 7] = -100
    return head, h, labels


def hf_loss(head, h, labels, softcap=None, **kwargs):
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = head(h)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return ForCausalLMLoss(logits, labels, head.out_features, **kwargs)


PATHS = pytest.mark.parametrize("fused", [False, True], ids=["checkpointed", "fused"])


@PATHS
@pytest.mark.parametrize("chunk_rows", [1, 5, 7, 26, 1000])
@pytest.mark.parametrize("items", [None, 17, "tensor"])
def test_chunked_loss_equals_transformers(chunk_rows, items, fused):
    """Value and gradients (hidden states and head weight) of transformers' ForCausalLMLoss, with ignored labels,
    num_items_in_batch (int or tensor), chunk sizes that do not divide the 26 rows; both paths."""
    head, h0, labels = loss_case(fused=fused)
    kwargs = {} if items is None else {"num_items_in_batch": torch.tensor(17) if items == "tensor" else items}
    h = h0.clone().requires_grad_()
    ref = hf_loss(head, h, labels, **kwargs)
    ref.backward()
    ref_grads = (h.grad, head.weight.grad.clone())
    head.zero_grad()
    h2 = h0.clone().requires_grad_()
    loss = chunked_causal_lm_loss(h2, head, labels, chunk_rows=chunk_rows, **kwargs)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h2.grad, ref_grads[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(head.weight.grad, ref_grads[1], rtol=1e-5, atol=1e-7)


@PATHS
def test_chunked_loss_bias_softcap_and_scaled_backward(fused):
    """A head with bias, Gemma-2's final logit soft-capping, and an upstream gradient that is not 1 (gradient
    accumulation, loss scaling): every gradient as transformers' times that factor."""
    head, h0, labels = loss_case(seed=2, fused=fused, bias=True)
    with torch.no_grad():
        head.weight.mul_(20)  # logits of tens: the soft cap (30) bends them
    h = h0.clone().requires_grad_()
    (hf_loss(head, h, labels, softcap=30.0) * 0.25).backward()
    ref = [h.grad, head.weight.grad.clone(), head.bias.grad.clone()]
    head.zero_grad()
    h2 = h0.clone().requires_grad_()
    (chunked_causal_lm_loss(h2, head, labels, chunk_rows=6, softcap=30.0) * 0.25).backward()
    for got, want in zip([h2.grad, head.weight.grad, head.bias.grad], ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # the soft cap changes the gradients (else this test could not tell a path that ignores it)
    head.zero_grad()
    h3 = h0.clone().requires_grad_()
    chunked_causal_lm_loss(h3, head, labels, chunk_rows=6).mul(0.25).backward()
    assert (h3.grad - ref[0]).abs().max() > 1e-3


@PATHS
def test_chunked_loss_shift_labels_ignore_index_and_autocast(fused):
    head, h0, labels = loss_case(seed=1, fused=fused)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    torch.testing.assert_close(chunked_causal_lm_loss(h0, head, shift_labels=shifted, chunk_rows=4),
                               hf_loss(head, h0, None, shift_labels=shifted), rtol=1e-6, atol=1e-6)
    other = labels.masked_fill(labels == -100, 3)  # another ignore_index (3 is also a real label here: ignored)
    torch.testing.assert_close(chunked_causal_lm_loss(h0, head, other, ignore_index=3, chunk_rows=6),
                               hf_loss(head, h0, other, ignore_index=3), rtol=1e-6, atol=1e-6)
    with torch.autocast("cpu", torch.bfloat16):
        h = h0.clone().requires_grad_()
        ref = hf_loss(head, h, labels)
        h2 = h0.clone().requires_grad_()
        loss = chunked_causal_lm_loss(h2, head, labels, chunk_rows=5)
    ref.backward()
    ref_w = head.weight.grad.clone()
    head.zero_grad()
    loss.backward()
    assert loss.dtype == torch.float32 and h2.grad.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    if fused:  # softmax - one-hot formed in another order, the weight gradient summed over chunks in fp32:
        # bf16 rounding of the same products (a bf16 ulp is 2^-8 of the largest entries)
        for got, want in ((h2.grad, h.grad), (head.weight.grad, ref_w)):
            torch.testing.assert_close(got, want, rtol=0, atol=2**-7 * want.abs().max().item())
    else:  # per-row logits: the same operations
        torch.testing.assert_close(h2.grad, h.grad, rtol=0, atol=0)


@PATHS
def test_chunked_loss_keeps_no_logits(fused):
    """What the loss keeps for backward: the chunks' inputs (checkpointed) or the hidden states' gradient
    (fused), nothing of vocabulary size."""
    head, h0, labels = loss_case(vocab=4096, fused=fused)
    h = h0.clone().requires_grad_()
    with SavedTensorMeter(head) as meter:
        chunked_causal_lm_loss(h, head, labels, chunk_rows=8)
    assert all(4096 not in r.shape for r in meter.records), meter.records
    assert meter.nbytes <= h0.numel() * 4 + labels.numel() * 8 + 64  # hidden states (or their gradient), targets, scalars
    with SavedTensorMeter(head) as vanilla:
        hf_loss(head, h, labels)
    assert meter.nbytes < 0.1 * vanilla.nbytes


def test_fused_loss_frozen_head_and_one_backward():
    """A frozen head (PEFT's base model): no weight gradient is formed, the hidden states' one is exact; the
    fused backward hands over what forward formed once, and says so on a second backward."""
    head, h0, labels = loss_case(fused=True)
    head.weight.requires_grad_(False)
    h = h0.clone().requires_grad_()
    hf_loss(head, h, labels).backward()
    h2 = h0.clone().requires_grad_()
    loss = chunked_causal_lm_loss(h2, head, labels, chunk_rows=7)
    loss.backward(retain_graph=True)
    assert head.weight.grad is None
    torch.testing.assert_close(h2.grad, h.grad, rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


def test_automatic_chunk_rows():
    """By default a chunk's float32 logits stay within 32 MiB (a multiple of 16 rows, at least 16); the default
    gives transformers' values on both paths."""
    assert chunk_rows_for(49152) == 160 and chunk_rows_for(8192) == 1024 and chunk_rows_for(10**7) == 16
    for fused in (False, True):
        head, h0, labels = loss_case(fused=fused)
        torch.testing.assert_close(chunked_causal_lm_loss(h0, head, labels), hf_loss(head, h0, labels),
                                   rtol=1e-6, atol=1e-6)


def test_fuse_head_only_plain_linear_heads():
    """fuse_head takes nn.Linear and ExactLinear (a call without a target is unchanged) and leaves other heads
    on the checkpointed path; convert fuses a causal LM's plain head."""
    plain, low_bit = nn.Linear(8, 5), fewbit_dist.LowBitLinear(8, 5, bits=4)
    x = torch.randn(3, 8)
    want = plain(x)
    assert fuse_head(plain) and is_fused_head(plain)
    torch.testing.assert_close(plain(x), want, rtol=0, atol=0)
    assert fuse_head(fewbit_dist.ExactLinear(8, 5))
    assert not fuse_head(low_bit) and not is_fused_head(low_bit)


def test_chunked_loss_rejects_bad_arguments():
    head, h, labels = loss_case()
    for bad, error in ((0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="chunk_rows"):
            chunked_causal_lm_loss(h, head, labels, chunk_rows=bad)
    with pytest.raises(ValueError, match="labels"):
        chunked_causal_lm_loss(h, head)
    with pytest.raises(ValueError, match="positions"):
        chunked_causal_lm_loss(h, head, labels[:, :5])


# ------------------------------------------------------------------------------------------ ExactLinear


def test_exact_linear_equals_nn_linear_under_autocast():
    """Values and every gradient bit for bit under bf16 autocast; saved: the bf16 input copy only (the
    Parameter instead of autocast's weight copy)."""
    torch.manual_seed(0)
    layer = fewbit_dist.ExactLinear(96, 80)
    ref = nn.Linear(96, 80)
    ref.load_state_dict(layer.state_dict())
    g = torch.Generator().manual_seed(1)
    x0, grad_y = torch.randn(3, 17, 96, generator=g), torch.randn(3, 17, 80, generator=g).bfloat16()
    results = []
    for module in (ref, layer):
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16), SavedTensorMeter(module) as meter:
            y = module(x)
        y.backward(grad_y)
        results.append((y, x.grad, module.weight.grad, module.bias.grad, meter))
    for a, b in zip(results[0][:4], results[1][:4]):
        assert a.dtype == b.dtype and torch.equal(a, b)
    vanilla, ours = results[0][4], results[1][4]
    assert any(r.shape == (96, 80) and r.dtype == torch.bfloat16 for r in vanilla.records)  # autocast's copy
    assert [(r.shape, r.dtype) for r in ours.records] == [((51, 96), torch.bfloat16)]


def test_exact_linear_saves_nothing_of_the_weight():
    """The saved bytes do not grow with the weight (out_features 16 or 1024)."""
    x = torch.randn(4, 10, 64, requires_grad=True)
    sizes = []
    for out_features in (16, 1024):
        layer = fewbit_dist.ExactLinear(64, out_features)
        with torch.autocast("cpu", torch.bfloat16), SavedTensorMeter(layer) as meter:
            layer(x)
        sizes.append(meter.nbytes)
    assert sizes[0] == sizes[1] == 40 * 64 * 2


@pytest.mark.parametrize("autocast", [True, False], ids=["bf16-autocast", "fp32"])
def test_qkv_reading_one_tensor_save_one_copy(autocast):
    """Q, K and V read one tensor: nn.Linear under autocast keeps three input casts and three weight copies;
    ExactLinear one input copy, and gradients bit for bit the same."""
    results = {}
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 17, 96, generator=g)
    grads = [torch.randn(3, 17, n, generator=g) for n in (48, 32, 32)]
    for cls in (nn.Linear, fewbit_dist.ExactLinear):
        torch.manual_seed(0)
        layers = cls(96, 48), cls(96, 32), cls(96, 32)
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast), SavedTensorMeter(layers) as meter:
            h = x * 2  # a non-leaf, as a norm's output is (a product by a number saves nothing)
            ys = [layer(h) for layer in layers]
        torch.autograd.backward(ys, [gy.to(y.dtype) for gy, y in zip(grads, ys)])
        results[cls] = (meter, [x.grad] + [p.grad for layer in layers for p in layer.parameters()])
    vanilla, ours = results[nn.Linear][0], results[fewbit_dist.ExactLinear][0]
    dtype = torch.bfloat16 if autocast else torch.float32
    assert [(r.shape, r.dtype) for r in ours.records] == [((51, 96), dtype)]  # one input copy, no weight
    if autocast:  # three input casts, three weight copies
        assert sorted(r.shape for r in vanilla.records) == [(51, 96)] * 3 + [(96, 32)] * 2 + [(96, 48)]
        assert vanilla.nbytes == 3 * ours.nbytes + 2 * 96 * (48 + 32 + 32)
    for a, b in zip(*(results[c][1] for c in (nn.Linear, fewbit_dist.ExactLinear))):
        assert torch.equal(a, b)
