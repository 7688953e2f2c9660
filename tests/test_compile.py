"""torch.compile of converted models: one graph (fullgraph=True), values equal to eager's.

Every converted module (few-bit activations, LowBitLinear, RandomizedLinear, ExactLinear, the gated MLP, the
norms, the chunked loss) traces without a graph break. Seeds are graph values: a compiled layer draws a fresh
seed from torch's RNG on every call, as eager does, so `torch.manual_seed` reproduces a compiled step and two
steps round differently. Under compile the layers do not share saved inputs (fewbit_dist.functional.
shared_input): each rounds its own copy, so compressed presets' gradients are other draws of the same
estimate, not eager's bit for bit."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import fewbit_dist
from fewbit_dist.nn import LowBitLinear, RandomizedLinear

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def one_layer_llama():
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def step(model, x, seed=5):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def cosine(a, b):
    return float(torch.dot(a.double(), b.double()) / (a.double().norm() * b.double().norm()))


@pytest.mark.parametrize("preset", ["exact", "safe", "max-saving", "fewbit-paper"])
def test_converted_llama_compiles_in_one_graph(preset):
    model = fewbit_dist.convert(one_layer_llama(), preset)
    x = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # a graph break raises
    loss_c, grad_c = step(compiled, x)
    loss_e, grad_e = step(model, x)
    torch.testing.assert_close(loss_c, loss_e, rtol=0, atol=0)  # forward values are exact in every preset
    if preset == "exact":
        torch.testing.assert_close(grad_c, grad_e)
    else:  # another draw of the rounding (no sharing under compile): close, not equal
        assert cosine(grad_c, grad_e) > (0.9 if preset == "fewbit-paper" else 0.99)
    assert torch.isfinite(grad_c).all()


@pytest.mark.parametrize("layer", ["lowbit", "randomized"])
def test_compiled_layers_draw_a_fresh_seed_per_call(layer):
    """The seed is not baked into the graph: the compiled layer's weight gradient follows torch.manual_seed
    exactly as eager's does, and differs between seeds."""
    torch.manual_seed(0)
    lin = LowBitLinear(64, 32, bits=2) if layer == "lowbit" else RandomizedLinear(64, 32, proj_dim=4)
    x = torch.randn(16, 64)
    compiled = torch.compile(lin, backend="aot_eager", fullgraph=True)

    def grad(fn, seed):
        lin.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        fn(x).square().sum().backward()
        return lin.weight.grad.clone()

    grads = [grad(compiled, s) for s in (1, 2, 3)]
    for s, g in zip((1, 2, 3), grads):
        torch.testing.assert_close(g, grad(lin, s), rtol=0, atol=0)
    assert not torch.equal(grads[0], grads[1]) and not torch.equal(grads[1], grads[2])


@pytest.mark.slow
def test_converted_llama_compiles_with_inductor():
    """The same one graph through inductor (C++ codegen on CPU, about a minute): the loss equals eager's."""
    model = fewbit_dist.convert(one_layer_llama(), "max-saving")
    x = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    loss_c, grad_c = step(torch.compile(model, fullgraph=True), x)
    loss_e, grad_e = step(model, x)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    assert cosine(grad_c, grad_e) > 0.99 and math.isfinite(float(grad_c.norm()))


def test_converted_gpt2_compiles_in_one_graph():
    """GPT-2 under max-saving: LayerNorms, Conv1D projections, 1-bit dropout masks and the few-bit tanh-GELU in
    one graph, the loss equal to eager's."""
    config = transformers.GPT2Config(vocab_size=512, n_embd=64, n_layer=1, n_head=4, n_positions=128)
    torch.manual_seed(0)
    model = fewbit_dist.convert(transformers.GPT2LMHeadModel(config), "max-saving")
    counts = fewbit_dist.conversion_report(model).counts()
    assert {"LayerNorm", "Conv1D", "Dropout", "NewGELUActivation"} <= counts.keys(), counts
    x = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    loss_c, grad_c = step(torch.compile(model, backend="aot_eager", fullgraph=True), x)
    loss_e, grad_e = step(model, x)
    torch.testing.assert_close(loss_c, loss_e, rtol=0, atol=0)
    assert cosine(grad_c, grad_e) > 0.99
