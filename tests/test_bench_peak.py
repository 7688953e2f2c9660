"""launch/bench_peak.py: its pure parts on synthetic rows (summaries, ratios, the markdown, argument checks,
results files written before strategies existed), and (slow) a quick end-to-end run with 2 ranks under
DeepSpeed ZeRO-3 and FSDP2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from utils import load_launch_script

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


@pytest.fixture(scope="module")
def bp():
    return load_launch_script("bench_peak")


def spec(variant="vanilla", strategy="single", world_size=1, ckpt="none", dtype="fp32"):
    return dict(shape="smollm2", dtype=dtype, variant=variant, ckpt=ckpt, optimizer=False, quick=True, trace=False,
                threads=1, strategy=strategy, world_size=world_size)


def rank(peak_mib, saved_mib=10.0, loss=9.0, step_s=1.0):
    return {"peak_bytes": int(peak_mib * MIB), "start_bytes": 500 * MIB, "end_bytes": 0,
            "saved_bytes": None if saved_mib is None else int(saved_mib * MIB), "loss": loss, "step_s": step_s}


# -- summarize ----------------------------------------------------------------------------------------------

def test_summarize_single_keeps_the_old_keys(bp):
    row = bp.summarize(spec(), [rank(100), rank(120), rank(90)])
    for key in ("shape", "dtype", "variant", "ckpt", "peak_mib", "saved_mib", "peak_mib_runs", "start_mib", "loss",
                "step_s", "repeats"):
        assert key in row
    assert row["strategy"] == "single" and row["world_size"] == 1
    assert row["peak_mib"] == 100 and row["peak_mib_runs"] == [100, 120, 90] and row["repeats"] == 3
    assert row["peak_mib_ranks"] == [100]
    assert row["saved_mib"] == 10


def test_summarize_ranks_max_over_ranks_median_over_repeats(bp):
    runs = [{"ranks": [rank(100, saved_mib=10), rank(130, saved_mib=11)]},
            {"ranks": [rank(150, saved_mib=10), rank(110, saved_mib=11)]},
            {"ranks": [rank(105, saved_mib=10), rank(140, saved_mib=11)]}]
    row = bp.summarize(spec(strategy="zero3", world_size=2), runs)
    assert row["strategy"] == "zero3" and row["world_size"] == 2
    assert row["peak_mib_runs"] == [130, 150, 140]  # the max over ranks, each repeat
    assert row["peak_mib"] == 140  # their median
    assert row["peak_mib_ranks"] == [105, 130]  # each rank's median over repeats
    assert row["saved_mib"] == 11 and row["saved_mib_ranks"] == [10, 11]
    assert row["repeats"] == 3 and len(row["loss_ranks"]) == 2


def test_summarize_missing_saved_bytes_is_null_with_its_reason(bp):
    r = rank(100, saved_mib=None)
    r["saved_error"] = "RuntimeError: no forward outside the step"
    row = bp.summarize(spec(strategy="fsdp2", world_size=2), [{"ranks": [r, rank(110)]}])
    assert row["saved_mib"] is None and "no forward outside the step" in row["saved_error"]
    assert row["peak_mib"] == 110
    md = bp.markdown([bp.summarize(spec(strategy="fsdp2", world_size=2), [{"ranks": [rank(100), rank(100)]}]), row],
                     META)
    assert "n/a" in md and "no forward outside the step" in md


def test_summarize_errors(bp):
    row = bp.summarize(spec("max-saving", "zero3", 2), [{"error": "rank 1: training step: RuntimeError: boom"}])
    assert row["error"] == "rank 1: training step: RuntimeError: boom" and "peak_mib" not in row
    row = bp.summarize(spec(), [{"error": "timed out"}, rank(100)])
    assert row["peak_mib"] == 100 and row["errors"] == ["timed out"] and row["repeats"] == 1


# -- ratios and markdown -------------------------------------------------------------------------------------

META = {"title": "t", "method": "m", "machine_line": "machine", "command": "python launch/bench_peak.py"}


def synthetic_rows(bp):
    rows = []
    for strategy, ws, base in (("single", 1, 200), ("zero3", 2, 400), ("fsdp2", 2, 800)):
        for ckpt in ("none", "hf"):
            for variant, factor in (("vanilla", 1.0), ("max-saving", 0.5)):
                peak = base * factor * (1 if ckpt == "none" else 0.75)
                runs = [rank(peak)] if ws == 1 else [{"ranks": [rank(peak - 1), rank(peak)]}]
                rows.append(bp.summarize(spec(variant, strategy, ws, ckpt), runs))
    return rows


def test_ratios_against_the_same_strategys_vanilla(bp):
    rows = bp.add_ratios(synthetic_rows(bp))
    for r in rows:
        assert r["peak_vs_vanilla"] == pytest.approx(1.0 if r["variant"] == "vanilla" else 0.5)
        assert r["saved_vs_vanilla"] == pytest.approx(1.0)
    # no vanilla in a group: no ratio (not one borrowed from another strategy)
    lone = bp.add_ratios([bp.summarize(spec("max-saving", "fsdp2", 2), [{"ranks": [rank(50), rank(60)]}]),
                          bp.summarize(spec("vanilla", "single", 1), [rank(100)])])
    assert lone[0]["peak_vs_vanilla"] is None and lone[1]["peak_vs_vanilla"] == 1.0


def test_markdown_one_section_per_strategy(bp):
    md = bp.markdown(synthetic_rows(bp), META)
    heads = [line for line in md.splitlines() if line.startswith("## ")]
    assert heads == ["## smollm2, fp32", "## smollm2, fp32, DeepSpeed ZeRO-3, 2 ranks",
                     "## smollm2, fp32, FSDP2, 2 ranks"]
    zero3 = md.split("## smollm2, fp32, DeepSpeed ZeRO-3, 2 ranks")[1].split("## ")[0]
    assert "| none | vanilla | 400 | 1.00 | 10.0 | 1.00 | 399 / 400 | 400 |" in zero3
    assert "| none | max-saving | 200 | 0.50 | 10.0 | 1.00 | 199 / 200 | 200 |" in zero3
    assert "| hf | max-saving | 150 | 0.50 |" in zero3
    single = md.split("## smollm2, fp32\n")[1].split("## ")[0]
    assert "| none | max-saving | 100 | 0.50 | 10.0 | 1.00 | 100 |" in single
    for table in (single, zero3):  # every table row has its header's column count
        lines = [line for line in table.splitlines() if line.startswith("|")]
        assert len({line.count("|") for line in lines}) == 1


def test_markdown_error_rows_keep_the_columns(bp):
    rows = [bp.summarize(spec("vanilla", "zero3", 2), [{"ranks": [rank(100), rank(100)]}]),
            bp.summarize(spec("max-saving", "zero3", 2), [{"error": "rank 0: convert: ValueError: no"}])]
    md = bp.markdown(rows, META)
    lines = [line for line in md.splitlines() if line.startswith("|")]
    assert "error: rank 0: convert: ValueError: no" in md
    assert len({line.count("|") for line in lines}) == 1


@pytest.mark.parametrize("path", sorted((ROOT / "results" / "peak").glob("**/results.json")),
                         ids=lambda p: str(p.parent.relative_to(ROOT)))
def test_results_files_without_strategy_still_render(bp, path):
    """Rows written before strategies existed are single-process ones; their tables come out as before."""
    data = json.loads(path.read_text())
    md = bp.markdown(data["rows"], data["meta"])
    if not any("strategy" in r for r in data["rows"]):
        shipped = path.with_name("results.md")
        assert "DeepSpeed" not in md and "FSDP2" not in md
        if shipped.is_file():
            # the tables are the same (the method text of the page may since have been reworded)
            tables = lambda text: [line for line in text.splitlines() if line.startswith("|")]  # noqa: E731
            assert tables(md) == tables(shipped.read_text())


# -- the rank harness, with a stand-in for torchrun ----------------------------------------------------------

class FakeTorchrun:
    """Popen's stand-in: writes the rank files that `ranks` says (None: that rank writes nothing)."""

    ranks: list = []
    returncode = 0

    def __init__(self, cmd, **kwargs):
        assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node" in cmd
        assert kwargs["env"]["DS_ACCELERATOR"] == "cpu" and "RANK" not in kwargs["env"]
        spec = json.loads(cmd[-1])
        for i, r in enumerate(self.ranks):
            if r is not None:
                (Path(spec["result_dir"]) / f"rank{i}.json").write_text(json.dumps(dict(r, rank=i)))
        self.pid = None

    def communicate(self, timeout=None):
        return "", "torchrun: a worker failed\n"


@pytest.mark.parametrize("ranks, code, expect", [
    ([rank(100), rank(110)], 0, None),
    ([rank(100), {"error": "training step: RuntimeError: boom", "traceback": "x"}], 1,
     "rank 1: training step: RuntimeError: boom"),
    ([rank(100), None], 1, "exit 1, no result from rank(s) [1]: torchrun: a worker failed"),
])
def test_run_ranks(bp, monkeypatch, ranks, code, expect):
    fake = type("Fake", (FakeTorchrun,), {"ranks": ranks, "returncode": code})
    monkeypatch.setattr(bp.subprocess, "Popen", fake)
    out = bp.run_child(spec(strategy="fsdp2", world_size=2), 10, {})
    if expect is None:
        assert [r["peak_bytes"] for r in out["ranks"]] == [100 * MIB, 110 * MIB]
    else:
        assert out["error"] == expect


def test_error_text_names_no_machine_folders(bp):
    text = (f'  File "{bp.ROOT}/launch/bench_peak.py", line 5\n'
            '  File "/opt/x/.venv/lib/python3.11/site-packages/torch/nn/modules/module.py", line 9\n'
            '  File "/usr/lib/python3.11/json/__init__.py", line 3\n'
            f"ValueError: no file {bp.ROOT}/configs/x.json")
    assert bp.relative_paths(text) == ('  File "launch/bench_peak.py", line 5\n'
                                       '  File "site-packages/torch/nn/modules/module.py", line 9\n'
                                       '  File "python3.11/json/__init__.py", line 3\n'
                                       "ValueError: no file configs/x.json")


# -- arguments -----------------------------------------------------------------------------------------------

def test_default_strategy_is_single(bp):
    args = bp.parse_args([])
    assert args.strategies == ["single"] and args.world_size == 2
    assert args.dtypes == ["fp32", "bf16"] and args.ckpt == ["none", "hf", "boundary8"]
    assert bp.parse_args(["--quick"]).dtypes == ["fp32"]


def test_strategies_parsed(bp):
    args = bp.parse_args(["--strategies", "single, zero3,fsdp2", "--world-size", "2", "--presets", "max-saving"])
    assert args.strategies == ["single", "zero3", "fsdp2"] and args.presets == ["max-saving"]
    assert bp.parse_args(["--presets", ""]).presets == []


def test_unknown_strategy_names_the_argument_and_the_allowed_values(bp):
    with pytest.raises(SystemExit) as e:
        bp.parse_args(["--strategies", "zero3,ddp"])
    msg = str(e.value.code)
    assert "--strategies" in msg and "'ddp'" in msg
    for name in ("single", "zero3", "fsdp2"):
        assert name in msg


BAD = [(["--dtypes", "fp16"], "--dtypes"), (["--ckpt", "reentrant"], "--ckpt"), (["--strategies", ""], "--strategies"),
       (["--world-size", "0"], "--world-size"), (["--repeats", "0"], "--repeats"), (["--threads", "0"], "--threads")]


@pytest.mark.parametrize("argv, named", BAD)
def test_bad_arguments_are_named(bp, argv, named):
    with pytest.raises(SystemExit) as e:
        bp.parse_args(argv)
    assert named in str(e.value.code)


# -- end to end (slow) ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_quick_zero3_and_fsdp2_two_ranks(bp, tmp_path):
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")
    from fewbit_dist.memory import PeakMemory, PeakMemoryUnavailable

    try:
        with PeakMemory("cpu"):
            pass
    except PeakMemoryUnavailable as exc:
        pytest.skip(str(exc))
    bp.main(["--quick", "--strategies", "zero3,fsdp2", "--world-size", "2", "--presets", "max-saving",
             "--ckpt", "none", "--repeats", "1", "--timeout", "300", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    rows = data["rows"]
    assert [(r["strategy"], r["variant"]) for r in rows] == [
        ("zero3", "vanilla"), ("zero3", "max-saving"), ("fsdp2", "vanilla"), ("fsdp2", "max-saving")]
    for r in rows:
        assert "error" not in r, r["error"]
        assert r["world_size"] == 2 and r["ckpt"] == "none" and r["dtype"] == "fp32"
        assert len(r["peak_mib_ranks"]) == 2
        assert all(math.isfinite(p) and p > 0 for p in r["peak_mib_ranks"]), r["peak_mib_ranks"]
        assert r["peak_mib"] == pytest.approx(max(r["peak_mib_ranks"]), abs=0.1)
        assert r["saved_mib"] is not None and r["saved_mib"] > 0
        assert math.isfinite(r["loss"])
        base = next(b for b in rows if b["strategy"] == r["strategy"] and b["variant"] == "vanilla")
        assert r["peak_vs_vanilla"] == pytest.approx(r["peak_mib"] / base["peak_mib"])
        assert r["saved_vs_vanilla"] == pytest.approx(r["saved_mib"] / base["saved_mib"])
    # the exact forward: max-saving's loss is vanilla's, rank by rank, within each strategy
    for strategy in ("zero3", "fsdp2"):
        van, best = [r for r in rows if r["strategy"] == strategy]
        assert best["loss_ranks"] == pytest.approx(van["loss_ranks"], rel=1e-4)
    md = (tmp_path / "results.md").read_text()
    assert "## smollm2, fp32, DeepSpeed ZeRO-3, 2 ranks" in md and "## smollm2, fp32, FSDP2, 2 ranks" in md
