"""PEFT: `fewbit_dist.convert` on a PeftModel with LoRA adapters (a tiny Llama, random init, LoRA B random so the
adapters change the outputs). Frozen base layers keep nothing for backward; the input the adapters need is kept
low-bit, once per tensor; adapters train and the base stays put; adapter checkpoints are PEFT's own."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import fewbit_dist  # noqa: E402
from fewbit_dist.memory import SavedTensorMeter  # noqa: E402

from test_train_hf import fewbit_preset  # noqa: E402

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, HIDDEN, TOKENS = 4, 64, 2 * 32


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))


def lora(base, targets=ALL, dropout=0.0, convert=None):
    """A PeftModel over a copy of `base` (the same adapter weights every time), converted when asked."""
    torch.manual_seed(1)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=RANK, lora_alpha=8, lora_dropout=dropout, target_modules=list(targets), init_lora_weights=False))
    return fewbit_dist.convert(model, convert) if convert is not None else model


def saved(model, ids) -> SavedTensorMeter:
    model.train()
    with SavedTensorMeter(model) as meter:
        model(input_ids=ids, labels=ids)
    return meter


def first_q_proj(model):
    return model.base_model.model.model.layers[0].self_attn.q_proj


def test_lora_layers_keep_only_what_the_adapters_need(base):
    vanilla, converted = lora(base), lora(base, convert=fewbit_preset())
    layer, ref = first_q_proj(converted), first_q_proj(vanilla)
    # convert swapped the frozen base layer and the adapters; PEFT still sees Linear layers
    assert isinstance(layer.base_layer, fewbit_dist.LowBitLinear)
    assert isinstance(layer.lora_A["default"], torch.nn.Linear)
    x = torch.randn(2, 32, HIDDEN, requires_grad=True)
    with SavedTensorMeter(layer) as base_only:  # frozen weight: no input kept for a weight gradient
        layer.base_layer(x)
    assert base_only.nbytes == 0
    with SavedTensorMeter(ref) as theirs:
        ref(x)
    with SavedTensorMeter(layer) as mine:
        layer(x)
    # vanilla keeps lora_A's fp32 input (the layer's input) and lora_B's (rank-wide); converted, low-bit codes
    assert theirs.nbytes == 4 * TOKENS * (HIDDEN + RANK)
    # max-saving keeps 8-bit codes: a quarter of fp32, plus a float32 (lo, scale) pair per group of a row
    assert mine.nbytes < 0.35 * theirs.nbytes
    assert not [r for r in mine.records if r.dtype.is_floating_point and r.storage_nbytes >= TOKENS * HIDDEN]


def test_whole_model_saves_less_and_computes_the_same(base, ids):
    vanilla, converted = lora(base), lora(base, convert=fewbit_preset())
    assert saved(converted, ids).nbytes < 0.5 * saved(vanilla, ids).nbytes
    vanilla.eval(), converted.eval()
    with torch.no_grad():  # the forward is exact: the same logits
        torch.testing.assert_close(converted(input_ids=ids).logits, vanilla(input_ids=ids).logits)


def test_exact_preset_gives_the_adapters_exact_gradients(base, ids):
    """Converted layers inside LoRA (base, adapters, gated MLP around LoRA-wrapped projections) keep the
    gradient math right: with the exact preset the adapter gradients are those of the unconverted PeftModel."""
    grads = []
    for model in (lora(base), lora(base, convert=fewbit_preset("exact"))):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4 * len(ALL)  # A and B, 7 targets, 2 layers
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_adapters_reading_one_tensor_share_one_low_bit_copy(base, ids):
    """q, k and v read the same normalized hidden state: adding adapters to k and v must cost no more than in
    vanilla torch, where the three adapters save that tensor once and only their rank-wide inputs add up."""
    preset = fewbit_preset()
    extra_vanilla = saved(lora(base, ALL), ids).nbytes - saved(lora(base, ALL[:1] + ALL[3:]), ids).nbytes
    extra_converted = (saved(lora(base, ALL, convert=preset), ids).nbytes
                       - saved(lora(base, ALL[:1] + ALL[3:], convert=preset), ids).nbytes)
    assert extra_converted <= extra_vanilla


def test_adapters_train_and_the_base_stays(base, ids):
    model = lora(base, dropout=0.1, convert=fewbit_preset())
    assert any(isinstance(m, fewbit_dist.Dropout) for m in model.modules())  # LoRA's dropout: 1-bit masks
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != p.requires_grad, name  # adapters moved, base weights did not
    assert sum(p.requires_grad for p in model.parameters()) == 4 * len(ALL)


def test_adapter_checkpoints_save_and_load_as_peft_does(base, ids, tmp_path):
    model = lora(base, convert=fewbit_preset())
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    model.save_pretrained(tmp_path)
    keys = set(peft.get_peft_model_state_dict(model))
    assert keys == set(peft.get_peft_model_state_dict(lora(base)))  # the unconverted PeftModel's keys
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    for target in (copy.deepcopy(base), fewbit_dist.convert(copy.deepcopy(base), fewbit_preset())):
        loaded = peft.PeftModel.from_pretrained(target, tmp_path).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
