"""launch/bench_finetune.py end to end on a tiny Qwen2 saved with save_pretrained and a local text file: one row
per preset and seed with a held-out curve, and the exact preset fine-tunes exactly as vanilla does (its
gradients are vanilla's up to float rounding), so its final held-out loss is vanilla's."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from test_train_hf import make_tiny_qwen2, sample_text  # noqa: E402
from utils import load_launch_script  # noqa: E402



def bench():
    return load_launch_script("bench_finetune")


@pytest.mark.slow
def test_exact_fine_tunes_as_vanilla_does(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(sample_text(600))
    model = make_tiny_qwen2(tmp_path / "model", text.read_text())
    config = tmp_path / "run.json"
    config.write_text(json.dumps({
        "model": {"pretrained": str(model), "task": "causal-lm"},
        "data": {"task": "text", "path": str(text), "eval_fraction": 0.1, "eval_examples": 8},
        "training": {"batch_size": 4, "seq_len": 32, "lr": 1e-3, "steps": 4, "seed": 0, "precision": "fp32",
                     "eval_every": 2, "max_grad_norm": 1.0, "weight_decay": 0.0, "optimizer": "adamw"}}))
    out = tmp_path / "out"
    mod = bench()
    assert mod.main(["--config", str(config), "--out", str(out), "--presets", "vanilla", "exact", "max-saving",
                     "--seeds", "0", "1", "--steps", "4", "--eval-every", "2", "--seq-len", "32"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert sorted((r["preset"], r["seed"]) for r in rows) == sorted(
        (p, s) for p in ("vanilla", "exact", "max-saving") for s in (0, 1))
    by = {(r["preset"], r["seed"]): r for r in rows}
    for r in rows:
        assert [p["step"] for p in r["eval_curve"]] == [0, 2, 4] and len(r["losses"]) == 4
    for seed in (0, 1):
        van, exact, saving = by["vanilla", seed], by["exact", seed], by["max-saving", seed]
        assert van["eval_curve"][0] == exact["eval_curve"][0] == saving["eval_curve"][0]  # the same start
        assert exact["eval_loss"] == pytest.approx(van["eval_loss"], abs=1e-4)
        assert saving["eval_loss"] == pytest.approx(van["eval_loss"], abs=0.05)
        assert van["eval_loss"] < van["eval_curve"][0]["eval_loss"]  # it learned
    assert by["vanilla", 0]["losses"] != by["vanilla", 1]["losses"]  # seeds change the data order
    table = (out / "results.md").read_text()
    assert "| exact | 0,1 |" in table and "| max-saving | 0,1 |" in table


def test_table_deltas_are_per_seed():
    mod = bench()
    run = {"steps": 3, "seq_len": 8, "batch_size": 2, "lr": 0.1}
    rows = [{"preset": p, "seed": s, "eval_loss": loss, "eval_curve": [{"step": 0, "eval_loss": 5.0}], "run": run}
            for p, s, loss in (("vanilla", 0, 4.0), ("vanilla", 1, 4.2), ("max-saving", 0, 4.1),
                               ("max-saving", 1, 4.25))]
    line = next(x for x in mod.markdown(rows).splitlines() if x.startswith("| max-saving"))
    # final mean 4.175, spread 0.15, deltas +0.10 and +0.05 -> mean +0.075, max 0.10
    assert line == "| max-saving | 0,1 | 5.0000 | 4.1750 | 0.1500 | +0.0750 | 0.1000 |"
