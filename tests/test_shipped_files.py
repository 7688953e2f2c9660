import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from utils import load_launch_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_builtin_tables_and_docs_are_up_to_date():
    """The shipped tables and docs/tables.md equal a fresh recomputation (about 40 s)."""
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "make_tables.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def figures():
    return load_launch_script("docs_figures")


SAVED = re.compile(r"^ *(\w+): saved activations +([\d.]+ \w+) per step", re.M)


def test_demo_runs_and_reports_memory():
    """The demo runs, and the README's recorded output (results/demo/results.json) still gives the saved bytes
    the code gives now: they depend on the model and batch only, not on the number of steps or the machine."""
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "demo.py"), "--steps", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "saved-activation memory:" in out.stdout and "after conversion" in out.stdout
    recorded = json.loads((ROOT / "results" / "demo" / "results.json").read_text())["stdout"]
    assert SAVED.findall(out.stdout) == SAVED.findall(recorded) != [], (
        "the saved-activation figures of the README's demo output are stale: python launch/docs_figures.py "
        "--record-demo")


def test_generated_figures_are_current():
    """The generated blocks of BENCHMARKS.md and README.md equal what launch/docs_figures.py renders from the
    results files, and the two documents hold every block exactly once between them."""
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "docs_figures.py"), "--check"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_figure_marker_in_the_docs_has_a_renderer():
    """A marker in BENCHMARKS.md or README.md that names no renderer (or is malformed, so the renderer would
    skip it) fails here; so does a renderer whose block is in neither document."""
    mod = figures()
    loose = re.compile(r"<!--\s*/?\s*figures\s*:\s*([^\s>]*)\s*-->")
    placed = []
    for doc in mod.DOCS:
        text = doc.read_text()
        assert len(loose.findall(text)) == len(mod.MARKER.findall(text)), f"{doc.name}: a malformed figures marker"
        unknown = sorted({name for name in loose.findall(text) if name not in mod.BLOCKS})
        assert not unknown, f"{doc.name}: figure blocks without a renderer: {unknown}"
        placed += mod.block_names(text, doc.name)
    assert sorted(placed) == sorted(mod.BLOCKS), (f"blocks in no document: {sorted(set(mod.BLOCKS) - set(placed))}; "
                                                  f"placed twice or unknown: {sorted(placed)}")


def test_a_marker_without_a_renderer_is_an_error(tmp_path):
    mod = figures()
    doc = tmp_path / "B.md"
    doc.write_text("<!-- figures:finetune -->\n<!-- /figures:finetune -->\n<!-- figures:no_such -->\nx\n"
                   "<!-- /figures:no_such -->\n")
    with pytest.raises(ValueError, match="no_such.*no renderer"):
        mod.main(["--doc", str(doc), "--check"])
    doc.write_text("<!-- figures:finetune -->\nnever closed\n")
    with pytest.raises(ValueError, match="never closed"):
        mod.main(["--doc", str(doc)])


def test_docs_figures_replaces_only_its_blocks(tmp_path):
    mod = figures()
    doc = tmp_path / "B.md"
    doc.write_text("before 0.5x\n<!-- figures:decoder -->\n| typed by hand | 0.1x |\n<!-- /figures:decoder -->\n"
                   "between\n<!-- figures:finetune -->\n<!-- /figures:finetune -->\nafter\n")
    assert mod.main(["--doc", str(doc), "--check"]) == 1  # the hand-typed row is stale
    assert mod.main(["--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "typed by hand" not in text and text.startswith("before 0.5x\n") and text.endswith("\nafter\n")
    assert mod.decoder_block() in text and mod.finetune_block() in text
    assert mod.main(["--doc", str(doc), "--check"]) == 0
    doc.write_text("no blocks here\n")
    with pytest.raises(ValueError, match="no generated block"):
        mod.main(["--doc", str(doc)])


def test_preset_claims_hold_in_the_results():
    """The cosine bars the README and the shipped preset descriptions state hold for every measurement of the
    preset with today's settings (results/decoder/results.json)."""
    from fewbit_dist.presets import list_presets, preset_description

    mod = figures()
    bullets = re.findall(r"^- `([\w-]+)`:(.*?)(?=^- |^$)", (ROOT / "README.md").read_text(), re.M | re.S)
    claims = [(name, bar) for name, text in bullets for bar in re.findall(r"cosine >= (0\.\d+)", text)]
    assert {name for name, _ in claims} == {"safe", "max-saving"}, claims
    claims += [(name, bar) for name in list_presets() for bar in re.findall(r"cosine >= (0\.\d+)",
                                                                             preset_description(name))]
    for name, bar in claims:
        lowest = mod.lowest_cosine(name)
        assert lowest is not None and lowest >= float(bar), (name, lowest, bar)


def test_readme_lowbit_example_follows_the_formula():
    """The README's worked example of LowBitLinear's saved bytes is the formula's (tests/utils.lowbit_saved_nbytes,
    which tests/test_lowbit.py checks against the bytes autograd keeps)."""
    from utils import lowbit_saved_nbytes

    m = re.search(r"\((\d+) x (\d+)\s+fp32 at (\d+) bits: ([\d,]+) bytes, ([\d.]+)% of the input\)",
                  (ROOT / "README.md").read_text())
    assert m, "the README's LowBitLinear example is gone or reworded: update this test"
    rows, cols, bits = (int(x) for x in m.groups()[:3])
    nbytes = lowbit_saved_nbytes(rows, cols, bits, 128)
    assert int(m.group(4).replace(",", "")) == nbytes
    assert m.group(5) == f"{100 * nbytes / (rows * cols * 4):.1f}"


# -- every renderer on small synthetic results: a renderer bug fails here without the real files ----------------

MIB = 2**20


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))


def synthetic_results(root: Path) -> Path:
    from fewbit_dist.presets import preset_settings

    # launch/bench_decoder.py: vanilla, two presets with today's settings, one stale preset, two grid points
    dec = [dict(variant="vanilla", saved_bytes=100 * MIB, saved_vs_vanilla=1.0, grad_cosine=1.0),
           dict(variant="safe", saved_bytes=25 * MIB, saved_vs_vanilla=0.25, grad_cosine=0.9995,
                preset_settings=preset_settings("safe")),
           dict(variant="max-saving", saved_bytes=12.5 * MIB, saved_vs_vanilla=0.125, grad_cosine=0.99125,
                preset_settings=preset_settings("max-saving")),
           dict(variant="exact", saved_bytes=50 * MIB, saved_vs_vanilla=0.5, grad_cosine=1.0,
                preset_settings={"stale": True}),
           dict(variant="a4-l4-n4-g4", saved_bytes=10 * MIB, saved_vs_vanilla=0.1, grad_cosine=0.95),
           dict(variant="a6-l6-n6-g6", saved_bytes=20 * MIB, saved_vs_vanilla=0.2, grad_cosine=0.995)]
    _write(root / "decoder" / "results.json",
           {"rows": [dict(r, model="M", precision="fp32", tokens="2x8") for r in dec]})
    # launch/bench_finetune.py
    run = {"steps": 3, "seq_len": 8, "batch_size": 2, "lr": 0.1}
    _write(root / "finetune" / "results.json", {"rows": [
        {"preset": p, "seed": s, "eval_loss": loss, "eval_curve": [{"step": 0, "eval_loss": 5.0}], "run": run}
        for p, s, loss in (("vanilla", 0, 4.0), ("vanilla", 1, 4.2), ("max-saving", 0, 4.1), ("max-saving", 1, 4.25))]})
    # launch/bench_peak.py: an old-style run (no strategy), and a new-style one with per-rank peaks
    base = dict(shape="smollm2", dtype="fp32", optimizer=False, quick=False)
    _write(root / "peak" / "old" / "results.json", {"meta": {"title": "T-old", "command": "c-old", "malloc_env": {}},
           "rows": [dict(base, variant="vanilla", ckpt="none", peak_mib=200.0, saved_mib=100.0),
                    dict(base, variant="max-saving", ckpt="none", peak_mib=150.0, saved_mib=25.0),
                    dict(base, variant="exact", ckpt="none", peak_mib=1.0, saved_mib=1.0, quick=True)]})
    _write(root / "peak" / "new" / "results.json", {
        "meta": {"title": "T-new", "command": "c-new", "malloc_env": {"MALLOC_MMAP_THRESHOLD_": "65536"}},
        "rows": [dict(base, variant="vanilla", ckpt="hf", strategy="fsdp2", world_size=2, peak_mib=300.0,
                      peak_mib_ranks=[300.0, 280.0], saved_mib=40.0),
                 dict(base, variant="max-saving", ckpt="hf", strategy="fsdp2", world_size=2, peak_mib=240.0,
                      peak_mib_ranks=[240.0, 230.0], saved_mib=None, saved_error="x"),
                 dict(base, variant="vanilla", ckpt="none", strategy="single", world_size=1, peak_mib=123.0,
                      peak_mib_ranks=[123.0], saved_mib=50.0)]})
    # --optimizer-in-backward: its ratios against vanilla under the same loop, not the plain loop's vanilla
    _write(root / "peak" / "oib" / "results.json", {"meta": {"title": "T-oib", "command": "c-oib", "malloc_env": {}},
           "rows": [dict(base, variant=v, ckpt="hf", optimizer="in-backward", peak_mib=pk, saved_mib=sv)
                    for v, pk, sv in (("vanilla", 250.0, 100.0), ("max-saving", 50.0, 20.0))]
           + [dict(base, variant="vanilla", ckpt="hf", peak_mib=999.0, saved_mib=100.0)]})
    # launch/bench_step.py: an older run and a --quick run of the same configuration, left out
    cfg = {"model": "smollm2", "layers": 4, "batch": 4, "seq": 512, "dtype": "fp32", "repeats": 5, "threads": 2,
           "tiny": False}
    step = lambda v, med, q, date, cmd="python launch/bench_step.py --models smollm2", c=cfg: {  # noqa: E731
        "config": c, "variant": v, "status": "ok", "median_s": med, "command": cmd, "machine": {"date": date},
        "ratio": {"median": q[0], "q25": q[1], "q75": q[2]}}
    _write(root / "step" / "results.json", [
        step("vanilla", 2.0, (1, 1, 1), "2020-01-01"), step("max-saving", 9.0, (9.999, 9, 9), "2020-01-01"),
        step("vanilla", 2.0, (1, 1, 1), "2021-01-01"), step("max-saving", 3.0, (1.5, 1.25, 1.75), "2021-01-01"),
        step("max-saving", 1.0, (7.777, 7, 7), "2022-01-01", "python launch/bench_step.py --quick")])
    # launch/bench_memory.py
    mem = []
    for ckpt, saved in (("none", (400, 250, 100)), ("non_reentrant", (20, 20, 18))):
        for (variant, gelu, linear, dropout), s, t in zip(
                (("vanilla", "exact", "exact", "torch"), ("both", "3-bit", "randomized 20%", "torch"),
                 ("best", "6-bit", "int8", "1-bit")), saved, (1.0, 0.9, 1.25)):
            mem.append(dict(variant=variant, gelu=gelu, linear=linear, dropout=dropout, strategy="single",
                            world_size=1, rank=0, checkpointing=ckpt, batch_size=4, seq_len=128,
                            peak_memory_bytes=3000 * MIB, saved_activation_bytes=s * MIB, step_time_s=t,
                            fewbit={}, grad_cosine={"vanilla": 1.0, "both": 0.15, "best": 0.99}[variant],
                            grad_rel_error=0.1))
    _write(root / "memory" / "run" / "results.json", mem)
    _write(root / "memory" / "run" / "meta.json", {"command": "c-mem", "machine_line": "Machine: m.",
                                                   "peak_memory": "peak RSS", "batch_size": 4, "seq_len": 128,
                                                   "budget_gib": 16.0, "curve_line": ""})
    _write(root / "memory" / "run" / "max_batch.json", {"budget_gib": 16.0, "variants": {
        "vanilla": {"method": "extrapolated (CPU)", "max_batch": 12, "per_sample_activation_bytes": 100 * MIB}}})
    _write(root / "memory" / "run" / "curves.json", {})
    # launch/bench_tradeoff.py
    def trow(name, kind, saved, saved1, cos, rel, fewbit=None):
        return dict(name=name, kind=kind, saved_bytes=saved * MIB, saved_bytes_dropout1=saved1 * MIB,
                    saving=1 - saved / 400, saving_dropout1=1 - saved1 / 400, cosine_mean=cos, cosine_worst=cos,
                    rel_error_mean=rel, rel_error_worst=rel, fewbit=fewbit)
    _write(root / "tradeoff.json", {"machine": {"git": "abc1234", "date": "2021"}, "shape": "S", "pareto": [
        "vanilla", "act3+int4", "preset:safe"], "rows": [
        trow("vanilla", "other", 400, 300, 1.0, 0.0), trow("act3", "other", 350, 250, 0.9, 0.5),
        trow("act3+rownorm0.1", "sketch", 210, 111, 0.05, 12.5), trow("act3+int4", "low-bit", 209, 110, 0.8, 0.75),
        trow("act3+int8", "low-bit", 220, 120, 0.899, 0.5), trow("preset:safe", "mixed", 230, 130, 0.999, 0.04,
                                                                 {"stale": True})]})
    # results.jsonl: launch/bench_linear.py, launch/bench_kernels.py [--quantize]
    lin = [dict(bench="linear", command="python launch/bench_linear.py ", date="2021", tokens=8192, n_in=1024,
                n_out=1024, sketch=sk, ratio=0.2, k=1639, time_ratio={"median": t, "q25": t - 0.1, "q75": t + 0.1},
                saved_bytes=sb, input_bytes=32 * MIB, rel_err_iid=2.24, rel_err_lowrank=0.11, cos_lowrank=0.994,
                dtype="float32")
           for sk, t, sb in (("rownorm", 0.75, 6720000), ("count", 0.9, 6713440), ("gaussian", 2.5, 6713440),
                             ("rademacher", 2.0, 6713440))]
    ker = [dict(bench="kernels", command="python launch/bench_kernels.py ", date="2021", activation="GELU", bits=3,
                dtype="float32", numel=16, phase=phase, impl=impl, time_torch_ms=20.0,
                ratio_to_torch={"median": m, "q25": m - 0.05, "q75": m + 0.05})
           for phase, impl, m in (("bwd", "native", 0.8), ("bwd", "reference", 3.0), ("both", "native", 1.05),
                                  ("both", "reference", 3.5))]
    qua = [dict(bench="quantize", command="python launch/bench_kernels.py --quantize", date="2021", shape=[8192, 1024],
                bits=4, dtype="float32", impl=impl, time_current_ms=300.0, time_ms=ms,
                ratio_to_current={"median": r, "q25": r - 0.01, "q75": r + 0.01})
           for impl, ms, r in (("fused", 30.0, 0.1), ("fused_reference", 3600.0, 12.0))]
    _write(root / "results.jsonl", "".join(json.dumps(r) + "\n" for r in lin + ker + qua))
    # launch/demo.py, as --record-demo keeps it
    # launch/bench_finetune_cls.py: one run, vanilla and max-saving, seed 0
    cls_run = {"steps": 4, "eval_every": 2, "eval_examples": 8, "batch_size": 2, "seq_len": 16, "lr": 0.001,
               "task": "verse-prose", "words": 9}
    _write(root / "finetune-minilm" / "results.json", {"rows": [
        {"preset": p, "seed": 0, "run": cls_run, "eval_loss": loss, "eval_acc": acc, "saved_bytes": saved,
         "step_s": 1.0, "eval_curve": [{"step": 0, "eval_loss": 0.7, "eval_acc": 0.5},
                                       {"step": 4, "eval_loss": loss, "eval_acc": acc}]}
        for p, loss, acc, saved in (("vanilla", 0.5, 0.75, 4 << 20), ("max-saving", 0.55, 0.625, 1 << 20))]})
    _write(root / "demo" / "results.json", {"command": "python launch/demo.py", "machine": {"cpu": "c"},
                                            "stdout": "line one 49.13 MiB\n[2021-01-01 00:00:00,000] [WARNING] "
                                                      "[x.py:1:f] noise\nline two\n"})
    # launch/bench_plan.py: one validated row, one projected row
    _write(root / "plan" / "validation.json", {"meta": {"skipped": ["old-run: glibc's default malloc threshold"]},
                                               "rows": [dict(run="r", git="abc", strategy="zero3", world_size=2,
                                                             ckpt="hf", variant="exact", measured_mib=200.0,
                                                             predicted_mib=210.0, ratio=1.05, saved_measured_mib=40.0,
                                                             saved_predicted_mib=40.0)]})
    _write(root / "plan" / "projection.json", {"meta": {"dtype": "bf16-autocast", "checkpointing": "hf",
                                                        "memory": "80GiB"},
                                               "rows": [dict(model="m", strategy="fsdp2", world_size=8, batch=1,
                                                             preset=preset, peak_4096_gib=20.0, peak_phase="bwd",
                                                             max_seq=seq, params_gib=1.0, grads_gib=1.0,
                                                             optimizer_gib=2.0, saved_gib=3.0, framework_gib=4.0,
                                                             **({"checkpointing": "boundary8"} if seq == 65536
                                                                else {}))
                                                        for preset, seq in (("vanilla", 16384),
                                                                            ("max-saving", 65536))]})
    # bench_plan.py long-context: one series of two swept lengths
    _write(root / "plan" / "long_context.json", {
        "meta": {"runs": ["sweep"], "budgets_mib": [512]},
        "series": [dict(shape="s", dtype="fp32", ckpt="hf", variant="max-saving",
                        points=[dict(seq=1024, measured_mib=300.0, predicted_mib=290.0),
                                dict(seq=2048, measured_mib=400.0, predicted_mib=None)],
                        longest={"512": {"measured_swept": 2048, "planned": 3072}})]})
    return root


# block: (what its rendering must contain, what it must not)
EXPECTED = {
    "decoder": (["| M | fp32 | 2x8 | 100.0 | - | 0.250x / 0.99950 | 0.125x / 0.99125 | - |"], []),
    "decoder_grid": (["| M | fp32 | 2x8 | a4-l4-n4-g4 | 0.100x | 0.95000 |",
                      "M fp32: a6-l6-n6-g6 (0.200x, cosine 0.99500)"], ["| safe |"]),
    "presets": (["| safe | 0.250x | 0.99950 | M fp32 2x8 |", "| exact | - | - | not measured"], []),
    "finetune": (["| 3 steps x 2 x 8 tokens, lr 0.1 | max-saving | 0,1 | 4.1750 | +0.0750 / 0.1000 |"], []),
    "finetune_cls": (["## verse-prose: 4 steps of 2 passages x 16 tokens, lr 0.001",
                      "| max-saving | 0 | 0.7000 | 0.5500 | +0.0500 | 62.5% | -12.5 | 1.0 | 0.25x | 1.00 |"],
                     ["# Fine-tuning"]),
    "peak": (["| old | smollm2 | fp32 | default | none | max-saving | 150 | 0.75 | 25.0 | 0.25 |",
              "**fsdp2, 2 ranks**",
              "| new | smollm2 | fp32 | MALLOC_MMAP_THRESHOLD_=65536 | hf | max-saving | 240 | 0.80 | 240 / 230 | - "
              "| - |",
              "| new | smollm2 | fp32 | MALLOC_MMAP_THRESHOLD_=65536 | none | vanilla | 123 | 1.00 | 50.0 | 1.00 |",
              "`old`: T-old; `c-old`",
              "| oib | smollm2 | fp32 | default | hf + AdamW in backward, 2nd step | max-saving | 50 | 0.20 | 20.0 "
              "| 0.20 |"],
             ["| exact |"]),
    "step": (["| smollm2 | 4 | 4 x 512 | fp32 | max-saving | 3.000 | 1.500 [1.250, 1.750] |"], ["9.999", "7.777"]),
    "memory": (["| best | 6-bit | int8 | 1-bit | 100.0 | -75.0% |", "| vanilla | 12 | extrapolated (CPU) | 100.00 |",
                "### single, 1 rank(s), checkpointing non_reentrant"], ["# Memory benchmark"]),
    "memory_headline": (["saved-activation bytes per rank -37.5% (single)", "peak GPU memory -32.7%",
                         "bytes per rank **-75.0% (single)**", "settings have changed since", "best 18.0", "1.25x"],
                        []),
    "tradeoff": (["| act3+int4 | 209.0 | -47.8% | 110.0 | -72.5% | 0.8000 / 0.8000 | 0.750 / 0.750 | * |",
                  "git abc1234; safe have changed since"], []),
    "tradeoff_figures": (["int4 linear inputs 110.0 MiB at cosine 0.80; 10% sketches 111.0 MiB at 0.05",
                          "sketches 12.5, low-bit linear inputs 0.50-0.75", "1-bit dropout alone: saved bytes -25.0%",
                          "act3 0.9000, act3+int8 0.8990", "safe -67.5% at cosine 0.9990"], []),
    "linear": (["| 8192x1024->1024 | gaussian | 0.2 | 1639 | 2.50 [2.40, 2.60] | 0.200 | 2.24 | 0.110 (0.994) |"], []),
    "linear_figures": (["dense sketches (gaussian, rademacher) 2.00x-2.50x", "rownorm 0.75x",
                        "count's at ratio 0.2 (its k indices and one fp32): 0.00020 of the input"], []),
    "kernels": (["| GELU | 3 | float32 | bwd | 20.0 | 0.80 [0.75, 0.85] | 3.00 |"], []),
    "kernels_figures": (["float32, native / torch, 1-3 bits: GELU backward 0.80x, fwd+bwd 1.05x"], []),
    "quantize": (["| 8192 x 1024 | 4 | float32 | 300.0 | 30.0 | 0.100 [0.090, 0.110] | 12.00 |"], []),
    "demo": (["$ python launch/demo.py\nline one 49.13 MiB\nline two\n```"], ["noise"]),
    "plan": (["Predicted / measured: 1.05 to 1.05 over 1 rows.", "| r (abc) | zero3 x2 | hf | exact | 200 | 210 | 1.05 |",
              "Left out: old-run: glibc's default malloc threshold.",
              "| m | fsdp2 x8 | boundary8 | 1 | max-saving | 20.00 | bwd | 65536 | 4.0 | 1.00 | 1.00 | 2.00 | 3.00 | "
              "4.00 |"], []),
    "long_context": (["runs sweep", "| hf | max-saving | 300 (290) | 400 |", "| hf | max-saving | 2048+ / 3072 |",
                      "results/plan/long_context.png"], []),
}


def test_every_block_renders_from_synthetic_results(tmp_path):
    mod = figures()
    results = synthetic_results(tmp_path / "results")
    assert sorted(EXPECTED) == sorted(mod.BLOCKS), "a renderer without a synthetic check here (or the reverse)"
    for name, fn in mod.BLOCKS.items():
        text = fn(results)
        want, unwanted = EXPECTED[name]
        for piece in want:
            assert piece in text, f"{name}: {piece!r} not in\n{text}"
        for piece in unwanted:
            assert piece not in text, f"{name}: {piece!r} in\n{text}"
    # without any results, every block still renders (and says so)
    empty = tmp_path / "empty"
    empty.mkdir()
    for name, fn in mod.BLOCKS.items():
        assert fn(empty).strip(), name
