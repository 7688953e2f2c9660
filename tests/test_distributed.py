"""launch/train.py end to end with 2 ranks on CPU over gloo: ZeRO-1/2/3 and FSDP2, with and without activation
checkpointing; equivalence with a single process; the deepspeed launcher, torchrun and mpirun; checkpoints
that load into an unconverted model and resume. Slow (several minutes on 2 cores): marked `slow`, run by CI."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from utils import run_checked

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
    return run_checked(cmd, cwd=ROOT, env=env(), timeout=timeout)


def torchrun(*args, nproc=2):
    return run([BIN / "torchrun", "--standalone", "--nproc_per_node", nproc, TRAIN, "--no-progress", *args])


def metrics(path):
    m = json.loads(Path(path).read_text())
    assert m["world_size"] == len(m["ranks"]) and sorted(r["rank"] for r in m["ranks"]) == list(range(m["world_size"]))
    for r in m["ranks"]:
        assert r["peak_memory_bytes"] > 0 and r["saved_activation_bytes"] > 0
    assert m["tokens_per_second"] > 0 and len(m["losses"]) == m["steps"] - m["start_step"]
    return m


STEPS = 24


def falls(losses, k=3):
    """The model learned: the mean training loss of the last k steps (each on a global batch of 16 examples
    before the step's update) is 0.1 below ln 2. On this balanced two-class task a model whose predictions do
    not depend on the input through learned features (zero, random or otherwise useless gradients; a learned
    bias at most) scores >= ln 2 in expectation, and its first steps sit there (measured 0.69-0.70); a
    learning run drops to 0.4-0.6 within 24 steps (measured 0.50 for the last 3 of 20 steps, FSDP2)."""
    return sum(losses[-k:]) / k < math.log(2) - 0.1


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
             "--max-steps", STEPS, "--metrics-out", out)
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
             "--max-steps", STEPS, "--metrics-out", out)
    m = metrics(out)
    assert m["checkpointing"] == checkpointing and falls(m["losses"]), m["losses"]


@pytest.mark.parametrize("checkpointing", ["none", "non_reentrant"])
@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
def test_low_bit_linears_and_one_bit_dropout(strategy, checkpointing, tmp_path):
    """The safe preset (8-bit LowBitLinear inputs, 1-bit dropout and attention masks) under ZeRO-3 and FSDP2."""
    out, vanilla = tmp_path / "m.json", tmp_path / "v.json"
    torchrun("--fewbit-config", TINY, "--fewbit", "safe",
             *STRATEGIES[strategy], "--checkpointing", checkpointing, "--max-steps", STEPS, "--metrics-out", out)
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


# Settings that two ranks must reproduce as one process (same global batch, SGD, no dropout). Stochastic
# layers cannot: each rank mixes its rank into the seed (fewbit_dist.functional.linear.draw_seed) and rounds
# or sketches its half of the batch on its own, so the deterministic form of each kind is what is compared:
# few-bit activations; low-bit linears with nearest rounding (a row's codes depend on that row only); sketched
# linears with k >= rows (proj_dim_ratio 1.0: the layer keeps its input), which checks their gradient path
# through ZeRO and FSDP (gathers, reduction) but not the sketch (unbiasedness: tests/test_linear.py).
DETERMINISTIC = {
    "activations": {"activation_bits": 3},
    "lowbit-nearest": {"activation_bits": 3, "linear_bits": 4, "linear_rounding": "nearest", "exclude": ["classifier"]},
    "sketch-k>=rows": {"activation_bits": 3, "proj_dim_ratio": 1.0, "exclude": ["classifier"]},
}


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    """variant -> a folder with the config, the initial weights and a 4-step single-process run (made once)."""
    made = {}

    def get(variant):
        if variant not in made:
            d = tmp_path_factory.mktemp(variant.replace(">=", "ge"))
            cfg = json.loads(TINY.read_text())
            cfg["fewbit"] = DETERMINISTIC[variant]
            cfg["model"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
            cfg["training"].update(optimizer="sgd", lr=0.05)
            (d / "cfg.json").write_text(json.dumps(cfg))
            torch.manual_seed(0)
            transformers.logging.set_verbosity_error()
            model = transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**cfg["model"]))
            model.save_pretrained(d / "init")  # every run starts from these weights, however it builds the model
            run([sys.executable, TRAIN, "--no-progress", "--fewbit-config", d / "cfg.json", "--model", d / "init",
                 "--batch-size", 16, "--max-steps", 4, "--save", d / "single", "--metrics-out", d / "single.json"])
            made[variant] = d
        return made[variant]

    return get


@pytest.fixture(scope="module")
def deterministic(single_runs):
    return single_runs("activations")


def load_hf(path):
    model, info = transformers.RobertaForSequenceClassification.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys: an unconverted model
    return model.state_dict()


@pytest.mark.parametrize("variant", sorted(DETERMINISTIC))
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_two_ranks_equal_one_process(strategy, variant, single_runs):
    """Two ranks with batch 8 each train as one process with batch 16 (see DETERMINISTIC for the settings)."""
    d = single_runs(variant)
    torchrun("--fewbit-config", d / "cfg.json", *STRATEGIES[strategy], "--model", d / "init", "--batch-size", 8,
             "--max-steps", 4, "--save", d / strategy, "--metrics-out", d / f"{strategy}.json")
    single, dist_run = load_hf(d / "single" / "hf"), load_hf(d / strategy / "hf")
    initial = load_hf(d / "init")
    moved = 0
    for key, value in single.items():
        torch.testing.assert_close(dist_run[key], value, rtol=1e-4, atol=1e-5, msg=f"{strategy}: {key}")
        # The weights move little in 4 steps, less than the tolerance above: compare the updates themselves,
        # to 0.1% of their size plus 1e-9 per element (rms). The key bias is left out: its gradient is zero in
        # exact arithmetic, so its update is Adam-normalized rounding noise. Rank-dependent rounding, or an
        # error of 1% in one rank's weight gradient, fails this (checked by mutation).
        update, dist_update = (value - initial[key]).double(), (dist_run[key] - initial[key]).double()
        if not key.endswith("key.bias"):
            allowed = 1e-3 * update.norm() + 1e-9 * update.numel() ** 0.5
            assert (dist_update - update).norm() <= allowed, f"{strategy}: {key}"
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
