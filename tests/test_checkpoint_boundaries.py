"""Compressed checkpoint boundaries (fewbit_dist.integrations.checkpointing): the forward is exact, the saved
bytes are the quantized inputs' (an exact formula), the recompute replays the RNG, and the gradients stay
close to plain checkpointing, on tiny Llama and BERT models, under bf16 autocast and under FSDP2."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

import fewbit_dist
from fewbit_dist.integrations import checkpointing as ck
from fewbit_dist.integrations.checkpointing import CompressedCheckpoint, boundary_nbytes
from fewbit_dist.memory import SavedTensorMeter

ROOT = Path(__file__).resolve().parents[1]


def cosine(a, b):
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def grads(module):
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


class Block(nn.Module):
    def __init__(self, d=200):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x, mask=None, scale=1.0):
        y = self.fc2(F.gelu(self.fc1(x))) * scale
        return y if mask is None else y * mask


@pytest.mark.parametrize("bits,shape,group_size", [(8, (3, 7, 200), 128), (4, (5, 200), 64), (2, (1, 200), 200),
                                                   (3, (2, 9, 200), 128)])
def test_exact_forward_and_saved_bytes(bits, shape, group_size):
    torch.manual_seed(0)
    block = Block(shape[-1])
    x = torch.randn(shape, requires_grad=True)
    mask = (torch.rand(shape[:-1] + (1,)) > 0.3).float()  # no grad: kept as it is
    fn = CompressedCheckpoint(bits, group_size=group_size)
    with SavedTensorMeter(block) as meter:
        y = fn(block, x, mask, scale=0.5)
    assert torch.equal(y, block(x, mask, scale=0.5))  # bit for bit
    assert meter.nbytes == boundary_nbytes(shape, bits, group_size) + mask.numel() * 4
    rows = x.numel() // shape[-1]
    assert boundary_nbytes(shape, bits, group_size) == \
        -(-rows * shape[-1] * bits // 8) + 8 * rows * -(-shape[-1] // group_size)
    y.sum().backward()
    g, gx = grads(block), x.grad.clone()
    block.zero_grad()
    x.grad = None
    block(x, mask, scale=0.5).sum().backward()
    floor = {8: 0.9999, 4: 0.99, 3: 0.97, 2: 0.8}[bits]  # 2 bits: four levels per row
    assert cosine(g, grads(block)) > floor and cosine(gx, x.grad) > floor


def test_non_grad_inputs_pass_unchanged_and_parameters_get_grads_without_input_grads():
    torch.manual_seed(0)
    block = Block(16)
    x = torch.randn(4, 16)  # requires no grad: kept exactly, and the parameters still get their gradients
    with SavedTensorMeter(block) as meter:
        y = ck.checkpoint(block, x)
    assert meter.nbytes == x.numel() * 4
    y.sum().backward()
    g = grads(block)
    block.zero_grad()
    block(x).sum().backward()
    assert torch.equal(g, grads(block))  # the input was exact: so are the gradients
    with torch.no_grad():  # no grad: the function runs as it is
        assert not ck.checkpoint(block, x).requires_grad


def test_tensor_keyword_arguments_get_their_gradients():
    torch.manual_seed(0)
    block = Block(16)
    x = torch.randn(4, 16, requires_grad=True)
    mask = torch.rand(4, 16, requires_grad=True)
    ck.checkpoint(block, x, mask=mask).sum().backward()
    got = mask.grad.clone()
    mask.grad = None
    block(x, mask=mask).sum().backward()
    assert cosine(got, mask.grad) > 0.9999


def test_recompute_replays_the_rng_and_leaves_the_stream_alone():
    """Dropout in the block: the recomputed mask is the forward's (grad_x of a block linear in x is exact)."""
    w = torch.randn(64, requires_grad=True)

    def block(x):
        return F.dropout(x * w, 0.5) * 3

    x = torch.randn(8, 64, requires_grad=True)
    for rounding in ("nearest", "stochastic"):
        torch.manual_seed(1)
        y = CompressedCheckpoint(4, rounding)(block, x)
        after = torch.rand(4)
        y.sum().backward()
        got, x.grad = x.grad, None
        torch.manual_seed(1)
        y_ref = torch_checkpoint(block, x, use_reentrant=False)
        assert torch.equal(torch.rand(4), after)  # the compressed call drew nothing from torch's RNG
        assert torch.equal(y, y_ref)
        y_ref.sum().backward()
        assert torch.equal(got, x.grad)
        x.grad = None


def test_settings_are_checked():
    for bad, exc in ((1, ValueError), (9, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(exc, match="boundary_bits must be an int in 2..8"):
            CompressedCheckpoint(bad)
    with pytest.raises(ValueError, match="boundary_rounding must be one of"):
        CompressedCheckpoint(8, "up")
    with pytest.raises(TypeError, match="function must be callable"):
        ck.checkpoint(torch.randn(2), torch.randn(2))


# -- Hugging Face models ---------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
LAYERS, BATCH, SEQ, HIDDEN = 3, 2, 48, 96


def tiny_llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=300, hidden_size=HIDDEN, intermediate_size=160, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128))


def tiny_bert():
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=300, hidden_size=HIDDEN, intermediate_size=160, num_hidden_layers=LAYERS, num_attention_heads=4,
        max_position_embeddings=128))  # dropout 0.1 inside: the recompute must replay it


MODELS = {"llama": tiny_llama, "bert": tiny_bert}


def batch(name):
    ids = torch.randint(0, 300, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    labels = ids if name == "llama" else torch.tensor([0, 1])
    return dict(input_ids=ids, labels=labels)


def step(name, bits=None, rounding="nearest", convert=None, autocast=False):
    """One forward + backward of a freshly built (seeded) checkpointed model: loss, grads, saved bytes."""
    torch.manual_seed(0)
    model = MODELS[name]()
    if convert:
        fewbit_dist.convert(model, **convert)
    model.train()
    ck.enable(model, "non_reentrant", boundary_bits=bits, boundary_rounding=rounding)
    torch.manual_seed(2)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), SavedTensorMeter(model) as meter:
        loss = model(**batch(name)).loss
    loss.backward()
    return loss, grads(model), meter.nbytes


@pytest.mark.parametrize("name", sorted(MODELS))
def test_hf_loss_identical_gradients_close_bytes_exact(name):
    loss0, g0, saved0 = step(name)
    cos = {}
    for bits in (8, 4):
        loss, g, saved = step(name, bits)
        assert torch.equal(loss, loss0)  # the forward is exact, dropout included
        cos[bits] = cosine(g, g0)
        # Plain non-reentrant checkpointing keeps each layer's [batch, seq, hidden] fp32 input: now quantized.
        assert saved == saved0 - LAYERS * BATCH * SEQ * HIDDEN * 4 + LAYERS * boundary_nbytes(
            (BATCH, SEQ, HIDDEN), bits)
    print(f"\n{name}: gradient cosine against plain checkpointing: 8-bit {cos[8]:.6f}, 4-bit {cos[4]:.6f}")
    assert cos[8] > 0.9999 and cos[4] > 0.99


def test_hf_nearest_beats_stochastic_rounding():
    """The measurement behind the default: nearest rounding gives the closer gradients at 4 bits."""
    _, g0, _ = step("llama")
    near = cosine(step("llama", 4, "nearest")[1], g0)
    stoch = cosine(step("llama", 4, "stochastic")[1], g0)
    assert near > stoch, (near, stoch)


def test_hf_bf16_autocast_and_converted_layers():
    loss0, g0, _ = step("llama", autocast=True)
    loss, g, _ = step("llama", 8, autocast=True)
    assert torch.equal(loss, loss0) and cosine(g, g0) > 0.999
    # Few-bit and low-bit layers inside the block: their rounding seeds replay in the recompute.
    conv = dict(activation_bits=3, linear_bits=8)
    loss0, g0, _ = step("bert", convert=conv)
    loss, g, _ = step("bert", 8, convert=conv)
    assert torch.equal(loss, loss0) and cosine(g, g0) > 0.999


def test_forward_keeps_no_autocast_weight_casts():
    """Under bf16 autocast the boundary's no-grad forward must not leave autocast's cached bf16 copies of the
    block's weights alive for the rest of the forward: four blocks of two 200 x 400 layers hold, after their
    forwards, only their outputs and 8-bit inputs (the cached copies would be 4 x 320 KB more)."""
    from fewbit_dist.plan import _timeline_tracker

    blocks = nn.ModuleList(Block() for _ in range(4))
    x = torch.randn(4, 200, requires_grad=True)
    cp = CompressedCheckpoint(8)
    tracker = _timeline_tracker()
    tracker.track_external(blocks, x)
    with tracker, torch.autocast("cpu", torch.bfloat16):
        tracker.mark("fwd")
        h = x
        for block in blocks:
            h = cp(block, h)
        tracker.mark("fwd")
        live = tracker.samples[-1][4]
    weight_casts = sum(p.numel() * 2 for p in blocks.parameters() if p.dim() == 2)
    assert live < weight_casts / 4, (live, weight_casts)  # codes and outputs: a few KB


def test_enable_checks_its_arguments():
    model = tiny_llama()
    with pytest.raises(ValueError, match="boundary_bits must be an int in 2..8"):
        ck.enable(model, boundary_bits=1)
    with pytest.raises(ValueError, match="boundary_rounding must be one of"):
        ck.enable(model, boundary_bits=8, boundary_rounding="floor")
    with pytest.raises(ValueError, match="boundary_bits needs method"):
        ck.enable(model, "deepspeed", boundary_bits=8)
    with pytest.raises(ValueError, match="not a Hugging Face model"):
        ck.enable(nn.Linear(2, 2), boundary_bits=8)
    ck.enable(model, "reentrant", boundary_bits=4, boundary_rounding="stochastic")
    fn = model.model.layers[0]._gradient_checkpointing_func
    assert isinstance(fn, CompressedCheckpoint) and (fn.bits, fn.rounding) == (4, "stochastic")


# -- FSDP2, 2 ranks over gloo ------------------------------------------------------------------------------

FSDP_WORKER = textwrap.dedent('''
    import functools, sys
    import torch, torch.distributed as dist, transformers
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointWrapper, apply_activation_checkpointing)
    from fewbit_dist.integrations import checkpointing as ck

    dist.init_process_group("gloo")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    Layer = transformers.models.llama.modeling_llama.LlamaDecoderLayer
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))  # the same batch on each rank

    def build(recipe):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg)
        if recipe == "hf":
            ck.enable(model, "non_reentrant", boundary_bits=8)
        elif recipe == "wrapper":
            apply_activation_checkpointing(model, checkpoint_wrapper_fn=ck.wrapper_fn(bits=8),
                                           check_fn=lambda m: isinstance(m, Layer))
        return model

    ref = build("hf")  # single process, unsharded, compressed
    ref(input_ids=ids, labels=ids).loss.backward()
    for recipe in ("hf", "wrapper"):
        model = build(recipe)
        # Shard the checkpointed unit: the HF layer, or the wrapper around it (the FSDP hooks outside the checkpoint).
        unit = Layer if recipe == "hf" else CheckpointWrapper
        for m in list(model.modules()):
            if isinstance(m, unit):
                fully_shard(m)
        fully_shard(model)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss  # a KV cache would be filled twice
        loss.backward()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            full = p.grad.full_tensor()
            cos = torch.nn.functional.cosine_similarity(full.flatten().double(), q.grad.flatten().double(), dim=0)
            assert cos > 0.9999, (recipe, name, cos.item())
        print(f"rank {dist.get_rank()} {recipe} loss {loss.item():.6f} ok", flush=True)
    dist.destroy_process_group()
''')


@pytest.mark.slow
def test_fsdp2_two_ranks(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(FSDP_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    torchrun = Path(sys.executable).parent / "torchrun"
    out = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(script)], capture_output=True,
                         text=True, timeout=300, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    # counted in the whole output: the two ranks' prints may land on one line
    assert len(re.findall(r"rank \d \w+ loss \S+ ok", out.stdout)) == 4, out.stdout
