"""Single-process checks of the integrations: checkpointing methods, block discovery, sharded-model refusal,
DeepSpeed argument parsing, distributed initialization. The multi-rank runs are in test_distributed.py."""

import argparse
import copy
import os

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import fewbit_dist
from fewbit_dist.integrations import checkpointing
from fewbit_dist.integrations.fsdp import block_classes
from fewbit_dist.memory import SavedTensorMeter

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def tiny_roberta():
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    return transformers.RobertaForSequenceClassification(cfg)


def grads(model, ids, labels):
    model.train()
    model.zero_grad()
    torch.manual_seed(7)  # the same dropout masks and sketch seeds in every run
    model(input_ids=ids, labels=labels).loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("method", ["non_reentrant", "reentrant", "deepspeed"])
def test_checkpointed_blocks_recompute_the_same_compressed_state(method):
    """Few-bit activations, randomized linears and dropout inside checkpointed blocks: the gradients equal
    those of the plain run (same seeds), so the recompute saved exactly what the first forward used."""
    if method == "deepspeed":
        pytest.importorskip("deepspeed")
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    base = fewbit_dist.convert(tiny_roberta(), proj_dim_ratio=0.3)
    ids, labels = torch.randint(0, 96, (2, 9)), torch.tensor([0, 1])
    plain = grads(base, ids, labels)
    model = checkpointing.enable(copy.deepcopy(base), method)
    for a, b in zip(plain, grads(model, ids, labels)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_non_reentrant_checkpoint_keeps_only_block_inputs():
    block = nn.Sequential(fewbit_dist.RandomizedLinear(64, 256, proj_dim_ratio=0.2), fewbit_dist.GELU(),
                          fewbit_dist.RandomizedLinear(256, 64, proj_dim_ratio=0.2))
    x = torch.randn(128, 64, requires_grad=True)
    with SavedTensorMeter(block) as plain:
        block(x)
    with SavedTensorMeter(block) as ckpt:
        y = checkpoint(block, x, use_reentrant=False)
    assert ckpt.nbytes < plain.nbytes
    y.sum().backward()  # the recompute passes torch's determinism check (same shapes and dtypes saved)


def test_checkpointing_enable_rejects_bad_input():
    with pytest.raises(ValueError, match="method must be one of"):
        checkpointing.enable(tiny_roberta(), "sometimes")
    with pytest.raises(ValueError, match="not a Hugging Face model"):
        checkpointing.enable(nn.Linear(2, 2))


def test_block_classes():
    model = tiny_roberta()
    classes = block_classes(model)  # transformers lists them in _no_split_modules (a set): sorted by name
    assert [c.__name__ for c in classes] == ["RobertaEmbeddings", "RobertaLayer"]
    assert block_classes(model, ["RobertaLayer"]) == (type(model.roberta.encoder.layer[0]),)
    with pytest.raises(ValueError, match="no _no_split_modules"):
        block_classes(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="none of the block classes"):
        block_classes(model, ["LlamaDecoderLayer"])


def test_add_fewbit_arguments(tmp_path):
    from fewbit_dist.integrations.deepspeed import add_fewbit_arguments

    parser = add_fewbit_arguments(argparse.ArgumentParser())
    assert parser.parse_args(["--fewbit-config", "a.json"]).fewbit_config == "a.json"
    assert parser.parse_args([]).fewbit_config is None


def test_auto_zero_buckets_are_sized_from_the_hidden_size():
    from fewbit_dist.integrations.deepspeed import resolve_auto_buckets

    model = nn.Linear(2, 2)
    model.config = type("Config", (), {"hidden_size": 576})()
    ds = {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                "stage3_param_persistence_threshold": "auto"}, "steps_per_print": 10}
    out = resolve_auto_buckets(ds, model)
    assert out["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 576 * 576,
                                        "stage3_prefetch_bucket_size": int(0.9 * 576 * 576),
                                        "stage3_param_persistence_threshold": 5760}
    assert ds["zero_optimization"]["reduce_bucket_size"] == "auto" and out["steps_per_print"] == 10  # a copy
    assert resolve_auto_buckets({"zero_optimization": {"stage": 2}}, model) == {"zero_optimization": {"stage": 2}}
    with pytest.raises(ValueError, match="zero_optimization.allgather_bucket_size is 'auto'"):
        resolve_auto_buckets({"zero_optimization": {"allgather_bucket_size": "auto"}}, model)
    with pytest.raises(ValueError, match="no config.hidden_size"):
        resolve_auto_buckets(ds, nn.Linear(2, 2))
