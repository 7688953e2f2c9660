"""launch/bench_peak.py: its pure parts on synthetic rows (summaries, ratios, the markdown, argument checks,
results files written before strategies existed), the batch search on fake measurements, and (slow) quick
end-to-end runs: 2 ranks under DeepSpeed ZeRO-3 and FSDP2, and a batch search within a small budget."""

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


def test_a_sequence_sweep_compares_each_length_with_its_own_vanilla(bp):
    """--seqs: each row carries its length; ratios are taken against vanilla at the same length; the build
    makes that length's batch; the page labels each row with its length."""
    rows = bp.add_ratios([bp.summarize(dict(spec(variant, ckpt="hf"), seq=n), [rank(peak)])
                          for n, peaks in ((1024, (100, 50)), (4096, (400, 100)))
                          for variant, peak in zip(("vanilla", "max-saving"), peaks)])
    assert [(r["seq"], r["peak_vs_vanilla"]) for r in rows] == [(1024, 1.0), (1024, 0.5), (4096, 1.0), (4096, 0.25)]
    text = bp.markdown(rows, {"title": "t", "method": "m", "machine_line": "x", "command": "c"})
    assert "| hf, 4096 tokens | max-saving | 100 | 0.25 |" in text
    assert bp.parse_args(["--seqs", "1024,4096"]).seqs == [1024, 4096]
    pytest.importorskip("transformers")
    _, batch = bp.build(dict(spec(), quick=False, shape="smollm2", seq=64))
    assert tuple(batch["input_ids"].shape) == (bp.SHAPES["smollm2"]["batch"], 64)


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
       (["--world-size", "0"], "--world-size"), (["--repeats", "0"], "--repeats"), (["--threads", "0"], "--threads"),
       (["--optimizer", "--optimizer-in-backward"], "--optimizer-in-backward"),
       (["--optimizer-in-backward", "--strategies", "single,fsdp2"], "--strategies single"),
       (["--seqs", "1024,x"], "--seqs"), (["--seqs", "0"], "--seqs"), (["--seqs", "512", "--quick"], "--seqs")]


@pytest.mark.parametrize("argv, named", BAD)
def test_bad_arguments_are_named(bp, argv, named):
    with pytest.raises(SystemExit) as e:
        bp.parse_args(argv)
    assert named in str(e.value.code)


# -- the batch search on fake measurements -------------------------------------------------------------------

class FakeMeasure:
    """measure(batch) from a table: a peak in MiB, or an exception (an error row); calls are recorded."""

    def __init__(self, peaks):
        self.peaks, self.calls = peaks, []

    def __call__(self, batch):
        self.calls.append(batch)
        peak = self.peaks(batch) if callable(self.peaks) else self.peaks[batch]
        if isinstance(peak, Exception):
            return {"error": f"exit -9: {peak}"}
        return {"peak_mib": float(peak), "peak_mib_ranks": [float(peak)], "saved_mib": batch * 1.0}


def test_search_monotone(bp):
    fake = FakeMeasure(lambda b: 50 + 100 * b)
    found = bp.search_max_batch(fake, 700)  # 6 fits (650), 7 is over (750)
    assert found["max_batch"] == 6 and found["first_miss"] == 7 and not found["limit_reached"]
    assert fake.calls == [1, 2, 4, 8, 6, 7]  # doubling to the first miss, then bisection between 4 and 8
    assert [(p["batch"], p["fits"]) for p in found["probes"]] == [(1, True), (2, True), (4, True), (8, False),
                                                                   (6, True), (7, False)]
    assert found["probes"][3]["peak_mib"] == 850 and found["probes"][3]["peak_mib_ranks"] == [850]
    assert not found["non_monotone"] and found["peak_drops"] == [] and found["fits_above"] == []


def test_search_at_the_budget_fits(bp):
    found = bp.search_max_batch(FakeMeasure(lambda b: 100 * b), 400)
    assert found["max_batch"] == 4 and found["first_miss"] == 5


def test_search_non_monotone_peaks_are_reported(bp):
    # allocator noise: batch 6 peaks below batch 4, batch 5 above batch 6
    fake = FakeMeasure({1: 100, 2: 200, 4: 400, 8: 800, 6: 380, 7: 690, 5: 520})
    found = bp.search_max_batch(fake, 650)
    assert fake.calls == [1, 2, 4, 8, 6, 7]
    assert found["max_batch"] == 6 and found["first_miss"] == 7
    assert found["non_monotone"] and found["peak_drops"] == [[4, 6]]
    # a fitted probe above the answer (the search's own probes cannot show one; a merged list can)
    probes = found["probes"] + [{"batch": 9, "fits": True, "peak_mib": 600.0}]
    check = bp.monotonicity(probes, found["max_batch"])
    assert check["fits_above"] == [9] and check["non_monotone"]
    assert bp.monotonicity([{"batch": 2, "fits": False, "error": "boom"}, {"batch": 3, "fits": True,
                                                                          "peak_mib": 5.0}], 3)["misses_below"] == [2]


def test_search_first_probe_over_budget_is_zero(bp):
    fake = FakeMeasure(lambda b: 1000 * b)
    found = bp.search_max_batch(fake, 500)
    assert found["max_batch"] == 0 and found["first_miss"] == 1 and fake.calls == [1]
    assert not found["non_monotone"]


def test_search_from_a_larger_start_bisects_below_it(bp):
    fake = FakeMeasure(lambda b: 100 * b)
    found = bp.search_max_batch(fake, 250, start=8)
    assert found["max_batch"] == 2 and fake.calls == [8, 4, 2, 3]


def test_search_limit_reached(bp):
    fake = FakeMeasure(lambda b: b)
    found = bp.search_max_batch(fake, 10**6, start=1, limit=20)
    assert fake.calls == [1, 2, 4, 8, 16, 20]  # the last doubling is cut to the limit
    assert found["max_batch"] == 20 and found["limit_reached"] and found["first_miss"] is None
    found = bp.search_max_batch(FakeMeasure(lambda b: b), 10**6, start=3, limit=3)
    assert found["max_batch"] == 3 and found["limit_reached"] and len(found["probes"]) == 1
    with pytest.raises(ValueError):
        bp.search_max_batch(fake, 100, start=8, limit=4)


def test_search_errors_count_as_misses(bp):
    oom = MemoryError("out of memory")
    fake = FakeMeasure(lambda b: oom if b >= 6 else 100 * b)
    logged = []
    found = bp.search_max_batch(fake, 10**6, log=logged.append)
    assert fake.calls == [1, 2, 4, 8, 6, 5] and found["max_batch"] == 5 and found["first_miss"] == 6
    failed = [p for p in found["probes"] if "error" in p]
    assert [p["batch"] for p in failed] == [8, 6] and all(not p["fits"] and "peak_mib" not in p for p in failed)
    assert "out of memory" in failed[0]["error"]
    assert logged == found["probes"] and not found["non_monotone"]
    # a configuration that cannot run at all: 0, its error kept
    found = bp.search_max_batch(FakeMeasure(lambda b: RuntimeError("convert: no preset")), 100)
    assert found["max_batch"] == 0 and "no preset" in found["probes"][0]["error"]


def test_search_measures_each_probe_once_as_a_row(bp, monkeypatch, tmp_path):
    """main --search-batch: each probe one run_child at its batch (one repeat), summarized as a row; results.json
    keeps the rows' key (empty) and the searches under "max_batch"; the ratio is to the same ckpt's vanilla."""
    seen = []

    def fake_run_child(spec, timeout, malloc_env):
        seen.append((spec["variant"], spec["ckpt"], spec["batch"]))
        per = {"vanilla": 100, "max-saving": 40}[spec["variant"]] * (0.5 if spec["ckpt"] == "hf" else 1)
        return rank(20 + per * spec["batch"])

    monkeypatch.setattr(bp, "run_child", fake_run_child)
    import benchlib
    monkeypatch.setattr(benchlib, "machine_info", lambda device: {"cpu": "cpu", "cpu_count": 2, "torch": "x",
                                                                 "date": "today"})
    bp.main(["--quick", "--search-batch", "--budget-mib", "420", "--presets", "max-saving", "--ckpt", "none,hf",
             "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["rows"] == [] and data["meta"]["search"]["repeats_per_probe"] == 1
    got = {(e["variant"], e["ckpt"]): e for e in data["max_batch"]}
    assert {k: e["max_batch"] for k, e in got.items()} == {("vanilla", "none"): 4, ("max-saving", "none"): 10,
                                                           ("vanilla", "hf"): 8, ("max-saving", "hf"): 20}
    assert got[("max-saving", "none")]["vs_vanilla"] == pytest.approx(2.5)
    assert got[("max-saving", "hf")]["vs_vanilla"] == pytest.approx(2.5)
    for e in data["max_batch"]:
        assert e["seq"] == 128 and e["budget_mib"] == 420 and e["strategy"] == "single"
        probed = [p["batch"] for p in e["probes"]]
        assert [b for v, c, b in seen if (v, c) == (e["variant"], e["ckpt"])] == probed  # one run per probe
    md = (tmp_path / "results.md").read_text()
    assert "## smollm2, fp32: largest batch per rank within 420 MiB (real peak, search)" in md
    assert "| max-saving | none | 10 | 2.50 |" in md
    # docs_figures renders only rows: a search-only results file adds nothing to its peak table
    docs = load_launch_script("docs_figures")
    (tmp_path / "peak" / "search").mkdir(parents=True)
    (tmp_path / "results.json").rename(tmp_path / "peak" / "search" / "results.json")
    assert "search" not in docs.peak_block(tmp_path).split("Runs (")[0]


def synthetic_search():
    def entry(variant, ckpt, answer, probes, **kw):
        e = {"shape": "smollm2", "dtype": "fp32", "variant": variant, "ckpt": ckpt, "optimizer": False, "quick": True,
             "strategy": "single", "world_size": 1, "threads": 2, "seq": 512, "budget_mib": 1500.0, "batch_start": 1,
             "batch_limit": 64, "repeats_per_probe": 1, "max_batch": answer, "limit_reached": False,
             "first_miss": answer + 1, "probes": probes}
        e.update(kw)
        e.update({k: v for k, v in (("fits_above", []), ("misses_below", []), ("peak_drops", []),
                                    ("non_monotone", False)) if k not in e})
        return e

    def p(b, peak):
        return {"batch": b, "peak_mib": float(peak), "fits": peak <= 1500}

    return [
        entry("vanilla", "none", 6, [p(1, 300), p(2, 500), p(4, 950), p(8, 1800), p(6, 1400), p(7, 1600)]),
        entry("max-saving", "none", 12, [p(1, 200), p(2, 300), p(4, 500), p(8, 900), p(16, 1700), p(12, 1200),
                                         p(14, 1550), p(13, 1520)]),
        entry("vanilla", "hf", 64, [p(b, 10 * b) for b in (1, 2, 4, 8, 16, 32, 64)], limit_reached=True,
              first_miss=None),
        entry("max-saving", "hf", 5, [p(1, 300), p(2, 500), p(4, 900), p(8, 1400), p(6, 1200)] +
              [{"batch": 7, "fits": False, "error": "exit -9: killed"}, p(5, 1100)],
              peak_drops=[[4, 5]]),
    ]


def test_search_markdown(bp):
    entries = synthetic_search()
    entries[1].update(peak_drops=[[12, 13]], non_monotone=True)  # non-monotone: noted, not hidden
    entries[3].update(fits_above=[8], non_monotone=True)
    md = bp.markdown([], META, entries)
    assert "## smollm2, fp32: largest batch per rank within 1500 MiB (real peak, search)" in md
    assert "one repeat (no median)" in md
    assert ("| vanilla | none | 6 | 1.00 | 1: 300 fit, 2: 500 fit, 4: 950 fit, 8: 1800 over, 6: 1400 fit, "
            "7: 1600 over |") in md
    assert "| max-saving | none | 12 | 2.00 |" in md
    assert "| vanilla | hf | 64 (limit) | 1.00 |" in md
    assert "| max-saving | hf | 5 | 0.08 |" in md and "7: error" in md
    assert "vanilla / hf: the limit 64 fitted" in md
    assert "max-saving / hf: batch 7 failed (counted as over): exit -9: killed" in md
    assert "max-saving / none: non-monotone peaks (allocator noise): the peak fell from batch 12 to 13" in md
    assert "max-saving / hf: non-monotone peaks (allocator noise): batch 8 above the answer fitted" in md
    assert "vanilla / none: non-monotone" not in md
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 6 and len({line.count("|") for line in table}) == 1
    # vanilla at 0: no ratio for the group
    zero = synthetic_search()
    zero[0].update(max_batch=0, probes=[{"batch": 1, "peak_mib": 1600.0, "fits": False}])
    assert "| max-saving | none | 12 |  |" in bp.search_markdown(zero)


def test_search_markdown_one_section_per_strategy(bp):
    entries = synthetic_search()[:2]
    entries += [dict(e, strategy="fsdp2", world_size=2) for e in entries]
    heads = [line for line in bp.search_markdown(entries).splitlines() if line.startswith("## ")]
    assert heads == ["## smollm2, fp32: largest batch per rank within 1500 MiB (real peak, search)",
                     "## smollm2, fp32, FSDP2, 2 ranks: largest batch per rank within 1500 MiB (real peak, search)"]


def test_probe_batch_is_the_models_batch(bp):
    pytest.importorskip("transformers")
    model, batch = bp.build(dict(spec(), batch=3))
    assert tuple(batch["input_ids"].shape) == (3, bp.QUICK_SEQ)
    _, batch = bp.build(spec())
    assert batch["input_ids"].shape[0] == bp.SHAPES["smollm2"]["batch"]


SEARCH_BAD = [(["--search-batch"], "--budget-mib"), (["--budget-mib", "100"], "--search-batch"),
              (["--search-batch", "--budget-mib", "0"], "--budget-mib"),
              (["--search-batch", "--budget-mib", "100", "--batch-start", "0"], "--batch-start"),
              (["--search-batch", "--budget-mib", "100", "--batch-start", "8", "--batch-limit", "4"], "--batch-limit"),
              (["--search-batch", "--budget-mib", "100", "--repeats", "3"], "--repeats")]


@pytest.mark.parametrize("argv, named", SEARCH_BAD)
def test_search_arguments(bp, argv, named):
    with pytest.raises(SystemExit) as e:
        bp.parse_args(argv)
    assert named in str(e.value.code)


def test_search_arguments_parsed(bp):
    args = bp.parse_args(["--search-batch", "--budget-mib", "1536"])
    assert args.search_batch and args.budget_mib == 1536 and args.batch_start == 1 and args.batch_limit == 256
    assert not bp.parse_args([]).search_batch


# -- end to end (slow) ---------------------------------------------------------------------------------------

def _require_peak_memory():
    from fewbit_dist.memory import PeakMemory, PeakMemoryUnavailable

    try:
        with PeakMemory("cpu"):
            pass
    except PeakMemoryUnavailable as exc:
        pytest.skip(str(exc))


@pytest.mark.slow
def test_quick_zero3_and_fsdp2_two_ranks(bp, tmp_path):
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")
    _require_peak_memory()
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


@pytest.mark.slow
def test_quick_batch_search_within_a_small_budget(bp, tmp_path):
    """--search-batch at --quick (2 layers, 128 tokens), single process, vanilla and max-saving, ckpt none, with
    MALLOC_MMAP_THRESHOLD_=65536 (repeatable peaks). The budget is vanilla's batch-1 peak plus 10 MiB, measured
    first by a one-probe search (a few MiB per sample at this shape: the answer lands at a few samples on any
    machine). The answer's probe fitted, the next batch up was probed and did not."""
    pytest.importorskip("transformers")
    _require_peak_memory()
    common = ["--quick", "--search-batch", "--mmap-threshold", "65536", "--ckpt", "none", "--timeout", "300"]
    bp.main(common + ["--budget-mib", "100000", "--batch-limit", "1", "--presets", "", "--out", str(tmp_path / "b1")])
    first = json.loads((tmp_path / "b1" / "results.json").read_text())["max_batch"][0]["probes"][0]
    budget = round(first["peak_mib"] + 10)
    bp.main(common + ["--budget-mib", str(budget), "--batch-limit", "16", "--presets", "max-saving",
                      "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["rows"] == []
    entries = data["max_batch"]
    assert [(e["variant"], e["ckpt"], e["strategy"]) for e in entries] == [("vanilla", "none", "single"),
                                                                          ("max-saving", "none", "single")]
    for e in entries:
        probes = {p["batch"]: p for p in e["probes"]}
        assert len(probes) == len(e["probes"]) <= 8, e["probes"]  # no batch probed twice
        for p in e["probes"]:
            assert "error" not in p, p["error"]
            assert math.isfinite(p["peak_mib"]) and p["peak_mib"] > 0
            assert p["fits"] == (p["peak_mib"] <= budget)
            assert p["peak_mib_ranks"] == [p["peak_mib"]]
        answer = e["max_batch"]
        assert 1 <= answer < 16, e["probes"]  # batch 1 well inside the budget, batch 16 far above it
        assert probes[answer]["fits"] and not e["limit_reached"]
        assert e["first_miss"] == answer + 1 and not probes[answer + 1]["fits"]
        # the saved bytes grow with the batch: each probe ran its own batch
        saved = [probes[b]["saved_mib"] for b in sorted(probes)]
        assert saved == sorted(saved) and saved[0] < saved[-1]
    van, best = entries
    assert best["vs_vanilla"] == pytest.approx(best["max_batch"] / van["max_batch"])
    md = (tmp_path / "results.md").read_text()
    assert f"largest batch per rank within {budget} MiB (real peak, search)" in md


@pytest.mark.slow
def test_quick_optimizer_in_backward_measures_the_second_step(bp, tmp_path):
    """--optimizer-in-backward at --quick: every variant's second step, AdamW stepped inside backward. The loss
    measured is the second step's (below the first's: the first step updated the parameters), and the rows
    carry the loop, so their ratios compare within it."""
    pytest.importorskip("transformers")
    _require_peak_memory()
    common = ["--quick", "--presets", "max-saving", "--ckpt", "hf", "--repeats", "1", "--timeout", "300"]
    bp.main(common + ["--optimizer-in-backward", "--out", str(tmp_path / "oib")])
    bp.main(common + ["--out", str(tmp_path / "plain")])
    oib = json.loads((tmp_path / "oib" / "results.json").read_text())
    plain = json.loads((tmp_path / "plain" / "results.json").read_text())
    for a, b in zip(oib["rows"], plain["rows"]):
        assert "error" not in a and "error" not in b
        assert a["optimizer"] == "in-backward" and b["optimizer"] is False
        assert a["variant"] == b["variant"] and a["loss"] < b["loss"]  # one AdamW step taken before
    assert oib["rows"][1]["peak_vs_vanilla"] == pytest.approx(oib["rows"][1]["peak_mib"] / oib["rows"][0]["peak_mib"])
    assert "second training step" in oib["meta"]["method"]
