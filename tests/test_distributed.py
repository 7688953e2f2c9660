"""launch/train.py end to end with 2 ranks on CPU over gloo: ZeRO-1/2/3 and FSDP2, with and without activation
checkpointing; equivalence with a single process; the deepspeed launcher, torchrun and mpirun; checkpoints
that load into an unconverted model and resume. Slow (several minutes on 2 cores): marked `slow`, run by CI."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launch" / "train.py")
TINY = ROOT / "configs" / "roberta-tiny.json"
BIN = Path(sys.executable).parent


def env():
    e = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
             PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    e.pop("RANK", None)
    return e


def run(cmd, timeout=300):
    cmd = [str(c) for c in cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), cwd=ROOT)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    return out


def torchrun(*args, nproc=2):
    return run([BIN / "torchrun", "--standalone", "--nproc_per_node", nproc, TRAIN, "--no-progress", *args])


def metrics(path):
    m = json.loads(Path(path).read_text())
    assert m["world_size"] == len(m["ranks"]) and sorted(r["rank"] for r in m["ranks"]) == list(range(m["world_size"]))
    for r in m["ranks"]:
        assert r["peak_memory_bytes"] > 0 and r["saved_activation_bytes"] > 0
    assert m["tokens_per_second"] > 0 and len(m["losses"]) == m["steps"] - m["start_step"]
    return m


def falls(losses, k=4):
    return sum(losses[-k:]) / k < sum(losses[:k]) / k - 0.05


STRATEGIES = {"zero1": ["--deepspeed_config", "configs/ds/zero1.json"],
              "zero2": ["--deepspeed_config", "configs/ds/zero2.json"],
              "zero3": ["--deepspeed_config", "configs/ds/zero3.json"],
              "fsdp2": ["--fsdp"]}


@pytest.mark.parametrize("checkpointing", ["none", "non_reentrant"])
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_training_runs_and_loss_falls(strategy, checkpointing, tmp_path):
    """Few-bit activations and randomized linears (the tiny config), 2 ranks."""
    out = tmp_path / "m.json"
    torchrun("--fewbit-config", TINY, *STRATEGIES[strategy], "--checkpointing", checkpointing,
             "--max-steps", 20, "--metrics-out", out)
    m = metrics(out)
    assert m["strategy"] == strategy and m["world_size"] == 2 and m["checkpointing"] == checkpointing
    assert m["fewbit"]["activation_bits"] == 3 and m["fewbit"]["proj_dim_ratio"] == 0.2
    assert falls(m["losses"]), m["losses"]
    saved = [r["saved_activation_bytes"] for r in m["ranks"]]
    if checkpointing == "none":  # both ranks hold the same shapes: the same saved bytes
        assert saved[0] == saved[1]


@pytest.mark.parametrize("strategy,checkpointing", [("zero3", "deepspeed"), ("zero2", "reentrant")])
def test_reentrant_checkpointing_under_deepspeed(strategy, checkpointing, tmp_path):
    """DeepSpeed's own activation checkpointing (and torch's reentrant one) with randomized layers."""
    out = tmp_path / "m.json"
    torchrun("--fewbit-config", TINY, *STRATEGIES[strategy], "--checkpointing", checkpointing,
             "--max-steps", 20, "--metrics-out", out)
    m = metrics(out)
    assert m["checkpointing"] == checkpointing and falls(m["losses"]), m["losses"]


@pytest.mark.parametrize("checkpointing", ["none", "non_reentrant"])
@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
def test_low_bit_linears_and_one_bit_dropout(strategy, checkpointing, tmp_path):
    """The max-saving preset (LowBitLinear, 1-bit dropout and attention masks) under ZeRO-3 and FSDP2."""
    out, vanilla = tmp_path / "m.json", tmp_path / "v.json"
    torchrun("--fewbit-config", TINY, "--fewbit", ROOT / "configs" / "presets" / "max-saving.json",
             *STRATEGIES[strategy], "--checkpointing", checkpointing, "--max-steps", 20, "--metrics-out", out)
    m = metrics(out)
    assert m["fewbit"]["linear_bits"] == 8 and m["fewbit"]["compress_dropout"]
    assert falls(m["losses"]), m["losses"]
    if checkpointing == "none":
        torchrun("--fewbit-config", TINY, "--fewbit", '{"activation_bits": null}', *STRATEGIES[strategy],
                 "--max-steps", 2, "--metrics-out", vanilla)
        v = metrics(vanilla)
        assert v["fewbit"]["activation_bits"] is None
        for a, b in zip(m["ranks"], v["ranks"]):  # per rank, against the same run unconverted
            assert a["saved_activation_bytes"] < 0.5 * b["saved_activation_bytes"]


@pytest.fixture(scope="module")
def deterministic(tmp_path_factory):
    """Few-bit activations only, no dropout, SGD: a run that two strategies must reproduce exactly."""
    d = tmp_path_factory.mktemp("det")
    cfg = json.loads(TINY.read_text())
    cfg["fewbit"] = {"activation_bits": 3}
    cfg["model"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg["training"].update(optimizer="sgd", lr=0.05)
    (d / "cfg.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    model = transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**cfg["model"]))
    model.save_pretrained(d / "init")  # every run starts from these weights, however it builds the model
    run([sys.executable, TRAIN, "--no-progress", "--fewbit-config", d / "cfg.json", "--model", d / "init",
         "--batch-size", 16, "--max-steps", 4, "--save", d / "single", "--metrics-out", d / "single.json"])
    return d


def load_hf(path):
    model, info = transformers.RobertaForSequenceClassification.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys: an unconverted model
    return model.state_dict()


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_two_ranks_equal_one_process(strategy, deterministic):
    d = deterministic
    torchrun("--fewbit-config", d / "cfg.json", *STRATEGIES[strategy], "--model", d / "init", "--batch-size", 8,
             "--max-steps", 4, "--save", d / strategy, "--metrics-out", d / f"{strategy}.json")
    single, dist_run = load_hf(d / "single" / "hf"), load_hf(d / strategy / "hf")
    initial = load_hf(d / "init")
    moved = 0
    for key, value in single.items():
        torch.testing.assert_close(dist_run[key], value, rtol=1e-4, atol=1e-5, msg=f"{strategy}: {key}")
        moved += not torch.equal(value, initial[key])
    assert moved > len(single) // 2  # training really changed the weights
    losses_1 = json.loads((d / "single.json").read_text())["losses"]
    losses_2 = json.loads((d / f"{strategy}.json").read_text())["losses"]
    assert losses_2 == pytest.approx(losses_1, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
def test_resume_continues_the_same_run(strategy, deterministic, tmp_path):
    d = deterministic
    common = ["--fewbit-config", d / "cfg.json", *STRATEGIES[strategy], "--model", d / "init", "--batch-size", 8]
    torchrun(*common, "--max-steps", 2, "--save", tmp_path / "half")
    torchrun(*common, "--max-steps", 4, "--resume", tmp_path / "half", "--save", tmp_path / "full",
             "--metrics-out", tmp_path / "m.json")
    m = metrics(tmp_path / "m.json")
    assert m["start_step"] == 2 and len(m["losses"]) == 2
    straight = json.loads((d / "single.json").read_text())["losses"]
    assert m["losses"] == pytest.approx(straight[2:], rel=1e-4, abs=1e-5)
    for key, value in load_hf(d / "single" / "hf").items():
        torch.testing.assert_close(load_hf(tmp_path / "full" / "hf")[key], value, rtol=1e-4, atol=1e-5)


def test_deepspeed_launcher(tmp_path):
    out = tmp_path / "m.json"
    run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "29533", TRAIN, "--no-progress",
         "--fewbit-config", str(TINY), "--deepspeed_config", "configs/ds/zero3.json", "--max-steps", "4",
         "--metrics-out", str(out)], timeout=400)
    m = metrics(out)
    assert m["strategy"] == "zero3" and m["world_size"] == 2


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="no mpirun (Open MPI) on this machine")
def test_mpirun(tmp_path):
    pytest.importorskip("mpi4py")
    out = tmp_path / "m.json"
    run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable, TRAIN, "--no-progress",
         "--fewbit-config", str(TINY), "--deepspeed_config", "configs/ds/zero2.json", "--max-steps", "4",
         "--metrics-out", str(out)])
    m = metrics(out)
    assert m["launcher"] == "mpi" and m["strategy"] == "zero2" and m["world_size"] == 2


def test_plain_python_and_bad_arguments(tmp_path):
    out = tmp_path / "m.json"
    run([sys.executable, TRAIN, "--no-progress", "--max-steps", "2", "--metrics-out", str(out)])
    assert metrics(out)["strategy"] == "single"
    bad = subprocess.run([sys.executable, TRAIN, "--fsdp", "--deepspeed_config", "configs/ds/zero1.json"],
                         capture_output=True, text=True, env=env(), cwd=ROOT)
    assert bad.returncode != 0 and "two different strategies" in bad.stderr
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model": {}, "training": {"bacth_size": 4}}))
    bad = subprocess.run([sys.executable, TRAIN, "--fewbit-config", str(cfg)], capture_output=True, text=True,
                         env=env(), cwd=ROOT)
    assert bad.returncode != 0 and "unknown training key(s) ['bacth_size']" in bad.stderr
