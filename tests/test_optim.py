"""fewbit_dist.optim.OptimizerInBackward: the same updates as the optimizer in a plain loop, no gradient left."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import fewbit_dist
from fewbit_dist.optim import OptimizerInBackward


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 12), nn.LayerNorm(12))


def _groups(model):
    """Decay on matrices, none on biases and norms (the usual split), to check per-group options."""
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]


def _batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 12, generator=g), torch.randn(8, 12, generator=g)) for _ in range(n)]


def _loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


@pytest.mark.parametrize("opt_cls,kw", [(torch.optim.AdamW, dict(lr=1e-2, foreach=False)),
                                        (torch.optim.SGD, dict(lr=1e-1, momentum=0.9, foreach=False))])
def test_updates_equal_the_plain_loop(opt_cls, kw):
    ref, model = _mlp(), _mlp()
    opt = opt_cls(_groups(ref), **kw)
    oib = OptimizerInBackward(_groups(model), opt_cls, **kw)
    for x, y in _batches(4):
        _loss(ref, x, y).backward()
        opt.step()
        opt.zero_grad()
        _loss(model, x, y).backward()
        assert all(p.grad is None for p in model.parameters())  # stepped and freed inside backward
    for (n, a), b in zip(ref.named_parameters(), model.parameters()):
        assert torch.equal(a, b), n


def test_tied_and_checkpointed_decoder_matches_the_plain_loop():
    """A tiny Llama with tied embeddings (one parameter read twice: one update per backward, with the summed
    gradient), converted with max-saving and under HF non-reentrant checkpointing."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg)
    model = copy.deepcopy(ref)
    for m in (ref, model):
        fewbit_dist.convert(m, "max-saving")
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, foreach=False)
    oib = OptimizerInBackward(model.parameters(), torch.optim.AdamW, lr=1e-3, foreach=False)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    for step in range(3):
        torch.manual_seed(10 + step)  # the same stochastic rounding draws in both
        ref(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        torch.manual_seed(10 + step)
        model(input_ids=ids, labels=ids).loss.backward()
    assert len(oib.param_groups) == len(list(model.parameters()))  # the tied weight is one parameter
    for (n, a), b in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)


def test_state_dict_round_trip_and_lr():
    ref, model = _mlp(), _mlp()
    a = OptimizerInBackward(ref.parameters(), torch.optim.AdamW, lr=1e-2, foreach=False)
    data = _batches(3)
    for x, y in data[:2]:
        _loss(ref, x, y).backward()
    model.load_state_dict(ref.state_dict())
    b = OptimizerInBackward(model.parameters(), torch.optim.AdamW, lr=5.0, foreach=False)
    buf = io.BytesIO()  # through a file, as checkpoints go (a live state_dict shares its tensors, as torch's does)
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf))
    assert {g["lr"] for g in b.param_groups} == {1e-2}
    for m in (ref, model):
        _loss(m, *data[2]).backward()
    for p, q in zip(ref.parameters(), model.parameters()):
        assert torch.equal(p, q)
    a.set_lr(0.0)
    before = [p.detach().clone() for p in ref.parameters()]
    _loss(ref, *data[0]).backward()
    assert all(torch.equal(p, q) for p, q in zip(before, ref.parameters()))  # lr 0 with weight decay: no change
    with pytest.raises(ValueError, match="per-parameter optimizer states"):
        OptimizerInBackward(_mlp()[0].parameters(), torch.optim.AdamW).load_state_dict(a.state_dict())


def test_remove_restores_plain_gradients_and_frozen_parameters_are_left_alone():
    model = _mlp()
    model[3].weight.requires_grad_(False)
    frozen = model[3].weight.detach().clone()
    oib = OptimizerInBackward(model.parameters(), torch.optim.SGD, lr=0.1)
    _loss(model, *_batches(1)[0]).backward()
    assert torch.equal(model[3].weight, frozen)
    oib.remove()
    _loss(model, *_batches(1)[0]).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_bad_arguments_name_the_problem():
    model = _mlp()
    with pytest.raises(TypeError, match="optimizer_class"):
        OptimizerInBackward(model.parameters(), "adamw")
    with pytest.raises(ValueError, match="params is empty"):
        OptimizerInBackward([], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="twice"):
        OptimizerInBackward([model[0].weight, model[0].weight], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        OptimizerInBackward([torch.zeros(3)], torch.optim.SGD, lr=0.1)
    zero3 = nn.Parameter(torch.zeros(3))
    zero3.ds_id = 0  # what DeepSpeed ZeRO-3 marks its partitioned parameters with
    with pytest.raises(ValueError, match="sharded by FSDP or DeepSpeed"):
        OptimizerInBackward([zero3], torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match=r"params\[1\]"):
        OptimizerInBackward([{"params": [model[0].weight]}, 3], torch.optim.SGD, lr=0.1)
