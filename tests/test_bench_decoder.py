"""launch/bench_decoder.py on a tiny random Llama: the results file's structure, vanilla as the reference, the
exact preset's gradient, and the measured-presets file it writes."""

from __future__ import annotations

import json

import pytest

import fewbit_dist.presets

from utils import load_launch_script

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

TINY = ["--model", "tiny-llama", "--tokens", "2x16", "--layers", "1", "--hidden", "32", "--intermediate", "64",
        "--heads", "4", "--kv-heads", "2", "--vocab", "128"]


def bench():
    return load_launch_script("bench_decoder")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("decoder")
    mod = bench()
    mod.main(TINY + ["--precision", "both", "--out", str(out), "--write-presets",
                     "--presets-out", str(out / "measured.json")])
    return mod, out


def test_results_structure(run):
    mod, out = run
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["precision"] for r in rows} == {"bf16-autocast", "fp32"}
    for precision in ("bf16-autocast", "fp32"):
        names = [r["variant"] for r in rows if r["precision"] == precision]
        assert names == ["vanilla", *mod.PRESETS]
    for r in rows:
        assert r["model"] == "tiny-llama (random)" and r["tokens"] == "2x16"
        assert set(r["by_source"]) == set(mod.SOURCES)
        assert sum(r["by_source"].values()) == r["saved_bytes"] > 0  # every saved byte has one source
        assert {"torch", "transformers", "date"} <= set(r["machine"])
        assert r["run"]["layers"] == 1
    assert (out / "results.md").read_text().count("| vanilla |") == 2
    assert (out / "tradeoff.png").stat().st_size > 1000


def test_vanilla_reference_and_exact(run):
    _, out = run
    rows = json.loads((out / "results.json").read_text())["rows"]
    for precision in ("bf16-autocast", "fp32"):
        by = {r["variant"]: r for r in rows if r["precision"] == precision}
        assert by["vanilla"]["saved_vs_vanilla"] == 1.0 and by["vanilla"]["grad_cosine"] == pytest.approx(1.0)
        assert by["vanilla"]["by_source"]["loss / lm head"] > 0  # the vocabulary's logits
        exact = by["exact"]
        assert exact["grad_cosine"] > 0.9999
        assert exact["loss"] == pytest.approx(by["vanilla"]["loss"], rel=1e-5)
        assert exact["saved_bytes"] < by["vanilla"]["saved_bytes"]
        assert exact["by_source"]["loss / lm head"] < by["vanilla"]["by_source"]["loss / lm head"]
    bf16 = {r["variant"]: r for r in rows if r["precision"] == "bf16-autocast"}
    assert bf16["vanilla"]["by_source"]["linear weight copies"] > 0  # autocast's bf16 weights
    assert bf16["exact"]["by_source"]["linear weight copies"] == 0


def test_measured_presets(run):
    mod, out = run
    measured = json.loads((out / "measured.json").read_text())
    assert set(measured) == set(mod.PRESETS)
    fig = measured["exact"]["tiny-llama (random)"]
    assert fig["precision"] == "bf16-autocast" and fig["tokens"] == "2x16"  # bf16 preferred over fp32
    assert fig["grad_cosine"] > 0.9999 and 0 < fig["saved_vs_vanilla"] < 1
    # each figure records the settings it was measured with: today's, so describe() would show it
    for preset in mod.PRESETS:
        assert measured[preset]["tiny-llama (random)"]["config"] == fewbit_dist.presets.preset_settings(preset)


def test_bad_tokens():
    mod = bench()
    with pytest.raises(ValueError, match="--tokens"):
        mod.parse_tokens("4by512")
    with pytest.raises(SystemExit):
        mod.main(["--model", "tiny-llama", "--tokens", "0x8", "--out", "unused"])
