"""Figures in BENCHMARKS.md and README.md that come from results files: rendered here, never typed by hand.

    python launch/docs_figures.py                  # rewrite the generated blocks of BENCHMARKS.md and README.md
    python launch/docs_figures.py --check          # fail if a block differs from what the results files give
    python launch/docs_figures.py --record-demo    # run launch/demo.py, keep its output in results/demo/results.json

A generated block sits between `<!-- figures:NAME -->` and `<!-- /figures:NAME -->`; BLOCKS maps NAME to the
function that renders it from the results folder (each renderer takes it as its argument, so the tests render
every block from small synthetic results as well). Every block appears in exactly one of DOCS, and every
marker in DOCS has a renderer (--check fails otherwise). The blocks and their results files:

- decoder, decoder_grid, presets (README): results/decoder/results.json (launch/bench_decoder.py); preset rows
  count only if their recorded preset settings are today's;
- finetune: results/finetune/results.json (launch/bench_finetune.py, whose run_summaries computes the deltas);
- peak: results/peak/*/results.json (launch/bench_peak.py), grouped by strategy (rows without one: single);
- step: results/step/results.json (launch/bench_step.py), the latest run of every configuration, --quick left out;
- memory, memory_headline: results/memory/*/ (launch/bench_memory.py: results.json, meta.json, max_batch.json,
  curves.json), through bench_memory.markdown;
- tradeoff, tradeoff_figures: results/tradeoff.json (launch/bench_tradeoff.py), through bench_tradeoff.markdown;
- linear, linear_figures, kernels, kernels_figures, quantize: results/results.jsonl (launch/bench_linear.py,
  launch/bench_kernels.py [--quantize]), the latest run of each command;
- plan: results/plan/validation.json and projection.json (launch/bench_plan.py, whose markdown renders them);
- demo (README): results/demo/results.json, the output of `python launch/demo.py` kept by --record-demo
  (the demo prints wall times, so running it at render time would never give the same text twice).

Comparisons with FewBit's published figures name the metric on each side: what we measure (saved-activation
bytes, peak RSS) is not what the paper reports (peak GPU memory).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "launch"))

from fewbit_dist.presets import preset_settings  # noqa: E402

RESULTS = ROOT / "results"
DOCS = (ROOT / "BENCHMARKS.md", ROOT / "README.md")
PRESETS = ("exact", "safe", "max-saving", "fewbit-paper")
MIB = 2**20
MARKER = re.compile(r"<!-- (/?)figures:([\w-]+) -->")


# ------------------------------------------------------------------------------------------------ helpers

def _json(path: Path, default=None):
    return json.loads(path.read_text()) if path.is_file() else default


def _rows(path: Path) -> list[dict]:
    data = _json(path, {})
    return data.get("rows", []) if isinstance(data, dict) else data


def _jsonl(results: Path, bench: str) -> list[dict]:
    path = results / "results.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("bench") == bench]


def _runs(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows grouped by run, (command, date), in date order."""
    runs: dict[tuple, list[dict]] = {}
    for r in rows:
        runs.setdefault(((r.get("command") or "").strip(), r.get("date") or ""), []).append(r)
    return dict(sorted(runs.items(), key=lambda kv: kv[0][1]))


def _latest_per_command(rows: list[dict]) -> list[tuple[str, str, list[dict]]]:
    """(command, date, rows) of the latest run of each command, in date order."""
    latest = {}
    for (cmd, date), rs in _runs(rows).items():
        latest[cmd] = (cmd, date, rs)
    return sorted(latest.values(), key=lambda t: t[1])


def _span(values, fmt: str = ".2f", suffix: str = "") -> str:
    """'a-b' (or 'a' when they round alike) of the smallest and the largest value."""
    lo, hi = f"{min(values):{fmt}}{suffix}", f"{max(values):{fmt}}{suffix}"
    return lo if lo == hi else f"{lo}-{hi}"


def _provenance(r: dict) -> str:
    bits = [f"torch {r['torch']}" if r.get("torch") else None, f"{r['threads']} threads" if r.get("threads") else None,
            f"git {r['git']}" if r.get("git") else None, r.get("date")]
    return ", ".join(b for b in bits if b)


def _no_results(path: str) -> str:
    return f"(no results yet: {path})"


# ------------------------------------------------------------------------- decoder models (bench_decoder)

def _fresh(r: dict) -> bool:
    """A preset row measured with the preset's settings of today."""
    return r["variant"] in PRESETS and r.get("preset_settings") == preset_settings(r["variant"])


def decoder_block(results: Path = RESULTS) -> str:
    rows = _rows(results / "decoder" / "results.json")
    runs = sorted({(r["model"], r["precision"], r["tokens"]) for r in rows if r["variant"] == "vanilla"})
    lines = ["| model | precision | tokens | vanilla saved MiB | " + " | ".join(PRESETS) + " |",
             "|---|---|---|---:|" + "---:|" * len(PRESETS)]
    for model, precision, tokens in runs:
        mine = {r["variant"]: r for r in rows
                if (r["model"], r["precision"], r["tokens"]) == (model, precision, tokens)}
        cells = []
        for preset in PRESETS:
            r = mine.get(preset)
            cells.append(f"{r['saved_vs_vanilla']:.3f}x / {r['grad_cosine']:.5f}" if r and _fresh(r) else "-")
        if all(c == "-" for c in cells):
            continue
        lines.append(f"| {model} | {precision} | {tokens} | {mine['vanilla']['saved_bytes'] / MIB:.1f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def decoder_grid_block(results: Path = RESULTS) -> str:
    """The bit grid (every compressible part at its own bits) per model run, fewest saved bytes first."""
    rows = [r for r in _rows(results / "decoder" / "results.json") if r["variant"] not in ("vanilla", *PRESETS)]
    if not rows:
        return _no_results("results/decoder/results.json, grid rows (--variants small|full)")
    lines = ["| model | precision | tokens | grid point | saved vs vanilla | grad cosine |",
             "|---|---|---|---|---:|---:|"]
    runs = sorted({(r["model"], r["precision"], r["tokens"]) for r in rows})
    best = []
    for run in runs:
        mine = sorted((r for r in rows if (r["model"], r["precision"], r["tokens"]) == run),
                      key=lambda r: r["saved_bytes"])
        for r in mine:
            lines.append(f"| {run[0]} | {run[1]} | {run[2]} | {r['variant']} | {r['saved_vs_vanilla']:.3f}x | "
                         f"{r['grad_cosine']:.5f} |")
        ok = [r for r in mine if r["grad_cosine"] >= 0.99]
        if ok:
            best.append(f"{run[0]} {run[1]}: {ok[0]['variant']} ({ok[0]['saved_vs_vanilla']:.3f}x, "
                        f"cosine {ok[0]['grad_cosine']:.5f})")
    lines += ["", "Grid point `aA-lL-nN-gG`: activation, linear-input, norm and gated-MLP bits (`aA-lL` on encoders). "
              "Fewest saved bytes on the grid at full-gradient cosine >= 0.99: " + ("; ".join(best) or "none") + "."]
    return "\n".join(lines)


def presets_block(results: Path = RESULTS) -> str:
    """README: what each preset measured on the pretrained models (fresh rows only)."""
    rows = [r for r in _rows(results / "decoder" / "results.json") if r["variant"] in PRESETS and _fresh(r)]
    if not rows:
        return _no_results("results/decoder/results.json")
    lines = ["| preset | saved bytes vs vanilla | lowest full-gradient cosine | measured on |", "|---|---:|---:|---|"]
    for preset in PRESETS:
        mine = [r for r in rows if r["variant"] == preset]
        if not mine:
            lines.append(f"| {preset} | - | - | not measured with today's settings |")
            continue
        on = "; ".join(f"{r['model']} {r['precision']} {r['tokens']}" for r in
                       sorted(mine, key=lambda r: (r["model"], r["precision"])))
        lines.append(f"| {preset} | {_span([r['saved_vs_vanilla'] for r in mine], '.3f', 'x')} | "
                     f"{min(r['grad_cosine'] for r in mine):.5f} | {on} |")
    return "\n".join(lines)


def lowest_cosine(preset: str, results: Path = RESULTS) -> float | None:
    """The lowest full-gradient cosine measured for `preset` with today's settings (the README's claims)."""
    cos = [r["grad_cosine"] for r in _rows(results / "decoder" / "results.json")
           if r["variant"] == preset and _fresh(r)]
    return min(cos) if cos else None


# ------------------------------------------------------------------------------ fine-tuning (bench_finetune)

def finetune_block(results: Path = RESULTS) -> str:
    from bench_finetune import run_summaries

    rows = _rows(results / "finetune" / "results.json")
    if not rows:
        return "(no runs recorded yet)"
    lines = ["| run | preset | seeds | final held-out loss (mean) | delta vs vanilla, same seeds (mean / max abs) |",
             "|---|---|---:|---:|---:|"]
    for run, presets in run_summaries(rows):
        for p in presets:
            deltas = p["deltas"]
            delta = (f"{statistics.mean(deltas):+.4f} / {max(abs(d) for d in deltas):.4f}"
                     if deltas and p["preset"] != "vanilla" else "-")
            lines.append(f"| {run['steps']} steps x {run['batch_size']} x {run['seq_len']} tokens, lr {run['lr']:g} | "
                         f"{p['preset']} | {','.join(map(str, p['seeds']))} | {statistics.mean(p['finals']):.4f} | "
                         f"{delta} |")
    return "\n".join(lines)


def finetune_cls_block(results: Path = RESULTS) -> str:
    """all-MiniLM-L6-v2 on a real-text task (launch/bench_finetune_cls.py): its results.md tables, per task and run."""
    from bench_finetune_cls import markdown

    rows = _rows(results / "finetune-minilm" / "results.json")
    if not rows:
        return "(no runs recorded yet)"
    text = markdown(rows)
    return text[text.index("\n## ") + 1:].rstrip()


# ---------------------------------------------------------------------------------- peak memory (bench_peak)

def _peak(r: dict) -> float | None:
    if r.get("peak_mib") is not None:
        return r["peak_mib"]
    ranks = r.get("peak_mib_ranks")
    return max(ranks) if ranks else None


def peak_block(results: Path = RESULTS) -> str:
    """Every non-quick run of launch/bench_peak.py under results/peak/, one table per strategy. Rows of older
    runs carry no strategy (single process) and no per-rank peaks; newer ones may carry `strategy`,
    `world_size` and `peak_mib_ranks` (the peak of each rank; `peak_mib` then the largest, if absent)."""
    runs = []
    for path in sorted((results / "peak").glob("*/results.json")) + [results / "peak" / "results.json"]:
        data = _json(path)
        if not data:
            continue
        rows = [r for r in data["rows"] if not r.get("quick")]
        if rows:
            where = path.parent.relative_to(results / "peak").as_posix()
            runs.append((where if where != "." else "(top level)", data.get("meta", {}), rows))
    if not runs:
        return _no_results("results/peak/*/results.json")
    groups: dict[tuple, list] = {}
    for where, meta, rows in runs:
        for r in rows:
            groups.setdefault((r.get("strategy") or "single", r.get("world_size") or 1), []).append((where, meta, r))
    out = []
    for (strategy, ws), items in sorted(groups.items(), key=lambda kv: (kv[0][0] != "single", kv[0])):
        per_rank = ws > 1 and any(r.get("peak_mib_ranks") for _, _, r in items)
        out += [f"**{strategy}, {ws} {'rank' if ws == 1 else 'ranks'}** (peak RSS of one training step above its "
                f"start, MiB{', the largest rank' if per_rank else ''}; x vanilla: same run, checkpointing and dtype)",
                "",
                "| run | model | dtype | malloc | checkpointing | variant | peak MiB | x vanilla | "
                + ("peak per rank | " if per_rank else "") + "saved MiB | x vanilla |",
                "|---|---|---|---|---|---|---:|---:|" + ("---|" if per_rank else "") + "---:|---:|"]
        for where, meta, r in items:
            malloc = ", ".join(f"{k}={v}" for k, v in (meta.get("malloc_env") or {}).items()) or "default"
            opt = r.get("optimizer")
            ckpt = r["ckpt"] + (" + AdamW in backward, 2nd step" if opt == "in-backward" else " + AdamW" if opt else "")
            model = r["shape"] + (f", {r['seq']} tokens" if r.get("seq") else "")  # bench_peak --seqs
            head = f"| {where} | {model} | {r['dtype']} | {malloc} | {ckpt} | {r['variant']} |"
            if "error" in r or _peak(r) is None:
                out.append(f"{head} error: {str(r.get('error'))[:100]} | | " + ("| " if per_rank else "") + "| |")
                continue
            base = next((b for w, _, b in items if w == where and b["variant"] == "vanilla" and "error" not in b
                         and (b["shape"], b["dtype"], b["ckpt"], b.get("optimizer"), b.get("seq")) ==
                         (r["shape"], r["dtype"], r["ckpt"], r.get("optimizer"), r.get("seq"))), None)
            ratio = f"{_peak(r) / _peak(base):.2f}" if base and _peak(base) else "-"
            saved = r.get("saved_mib")
            sratio = f"{saved / base['saved_mib']:.2f}" if saved is not None and base and base.get("saved_mib") else "-"
            ranks = (" / ".join(f"{x:.0f}" for x in r["peak_mib_ranks"]) if r.get("peak_mib_ranks") else "-")
            out.append(f"{head} {_peak(r):.0f} | {ratio} | " + (f"{ranks} | " if per_rank else "")
                       + f"{'-' if saved is None else f'{saved:.1f}'} | {sratio} |")
        out.append("")
    out.append("Runs (results/peak/RUN/results.json):")
    out += [f"- `{where}`: {meta.get('title', '?')}; `{meta.get('command', '?')}`, "
            f"{(meta.get('machine') or {}).get('date', '?')}" for where, meta, _ in runs]
    return "\n".join(out)


# ------------------------------------------------------------------------------------ step time (bench_step)

def step_block(results: Path = RESULTS) -> str:
    """The latest full run of every configuration (model, layers, batch, seq, dtype); --quick runs left out."""
    from bench_step import markdown

    rows = [r for r in _rows(results / "step" / "results.json")
            if "--quick" not in r.get("command", "") and not r["config"].get("tiny")]
    if not rows:
        return _no_results("results/step/results.json")
    latest: dict[tuple, str] = {}
    for r in rows:
        c = r["config"]
        key = (c["model"], c["layers"], c["batch"], c["seq"], c["dtype"])
        latest[key] = max(latest.get(key, ""), r["machine"]["date"])
    keep = [r for r in rows if r["machine"]["date"] == latest[(r["config"]["model"], r["config"]["layers"],
                                                                r["config"]["batch"], r["config"]["seq"],
                                                                r["config"]["dtype"])]]
    cmds = {(r["command"], r["machine"]["date"], r["machine"].get("git"), r["config"]["repeats"],
             r["config"]["threads"]) for r in keep}
    lines = [markdown(keep).rstrip("\n"), ""]
    lines += [f"Median of {rep} interleaved rounds, {threads} threads, `{cmd}`, git {git}, {date}."
              for cmd, date, git, rep, threads in sorted(cmds, key=lambda t: t[1])]
    return "\n".join(lines)


# -------------------------------------------------------------------------- RoBERTa memory (bench_memory)

def _memory_runs(results: Path) -> list[tuple[str, dict, list[dict]]]:
    runs = []
    for d in sorted(p for p in (results / "memory").glob("*") if (p / "results.json").is_file()):
        meta, rows = _json(d / "meta.json", {}), _json(d / "results.json", [])
        if rows:
            runs.append((d.name, meta, rows))
    return sorted(runs, key=lambda t: (min(r["world_size"] for r in t[2]), t[0]))


def _per_variant(rows: list[dict], strategy: str, ws: int, ckpt: str, batch: int) -> dict[str, dict]:
    """Per variant, the largest figure over the ranks (as bench_memory.markdown reports them)."""
    out: dict[str, dict] = {}
    for r in rows:
        if (r["strategy"], r["world_size"], r["checkpointing"], r["batch_size"]) != (strategy, ws, ckpt, batch):
            continue
        v = out.setdefault(r["variant"], dict(r))
        for key in ("saved_activation_bytes", "peak_memory_bytes", "step_time_s"):
            v[key] = max(v[key] or 0, r[key] or 0)
    return out


def memory_block(results: Path = RESULTS) -> str:
    """Each run under results/memory/, rendered by bench_memory.markdown from its JSON files."""
    import bench_memory

    runs = _memory_runs(results)
    if not runs:
        return _no_results("results/memory/*/results.json")
    out = []
    for name, meta, rows in runs:
        batch = meta.get("batch_size", rows[0]["batch_size"])
        main_rows = [r for r in rows if r["batch_size"] == batch]
        quality = {r["variant"]: (r.get("grad_cosine"), r.get("grad_rel_error")) for r in rows}
        budget = _json(results / "memory" / name / "max_batch.json", {})
        curves = _json(results / "memory" / name / "curves.json", {})
        meta = {"command": "?", "machine_line": "", "peak_memory": "?", "budget_gib": budget.get("budget_gib"),
                "curve_line": "", **meta}
        text = bench_memory.markdown(main_rows, quality, budget.get("variants", {}), curves, meta)
        text = text.split("\n", 1)[1]  # its title; the section heading of BENCHMARKS.md stands for it
        text = re.sub(r"^## ", "### ", text, flags=re.M)
        out.append(f"From `results/memory/{name}/`:\n" + text)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip("\n")


def memory_headline_block(results: Path = RESULTS) -> str:
    import bench_memory
    import fewbit_dist

    runs = _memory_runs(results)
    if not runs:
        return _no_results("results/memory/*/results.json")
    none, ckpt, steps, cos = {}, {}, [], {}
    best_cfg = None
    for name, meta, rows in runs:
        batch = meta.get("batch_size", rows[0]["batch_size"])
        for strategy, ws in dict.fromkeys((r["strategy"], r["world_size"]) for r in rows):
            where = f"{strategy}" + ("" if ws == 1 else f" x{ws}")
            v = _per_variant(rows, strategy, ws, "none", batch)
            if "vanilla" in v:
                none[where] = {k: 1 - x["saved_activation_bytes"] / v["vanilla"]["saved_activation_bytes"]
                               for k, x in v.items()}
                steps += [x["step_time_s"] / v["vanilla"]["step_time_s"] for k, x in v.items()
                          if k == "best" and x["step_time_s"] and v["vanilla"]["step_time_s"]]
            c = _per_variant(rows, strategy, ws, "non_reentrant", batch)
            if c:
                ckpt[where] = {k: x["saved_activation_bytes"] / MIB for k, x in c.items()}
        for r in rows:
            cos.setdefault(r["variant"], r.get("grad_cosine"))
            if r["variant"] == "best":
                best_cfg = best_cfg or r
    seed = bench_memory.SEED_ROWS
    lines = []

    def saving(variant):
        vals = {w: s[variant] for w, s in none.items() if variant in s}
        return f"{_span([-x for x in vals.values()], '+.1%')} ({', '.join(vals)})" if vals else "-"

    shape = f"batch {runs[0][1].get('batch_size', '?')} x {runs[0][1].get('seq_len', '?')} tokens per rank"
    lines.append(f"- FewBit's `both` row (3-bit GELU + 20% randomized linears): **saved-activation bytes per rank "
                 f"{saving('both')}** against vanilla (ours: RoBERTa-base shape, random init, CPU, {shape}, no "
                 f"checkpointing). FewBit's paper reports for the same row **peak GPU memory "
                 f"{seed['both'] / seed['vanilla'] - 1:+.1%}** ({seed['vanilla']} -> {seed['both']} GiB; RoBERTa-base, "
                 "MRPC, batch 128, one GPU). Different metrics: the paper's peak includes weights, gradients, "
                 "optimizer state and workspace, our figure the saved activations alone.")
    if best_cfg:
        stale = best_cfg.get("fewbit") != fewbit_dist.FewBitConfig.from_preset("max-saving").to_dict()
        since = "; its settings have changed since" if stale else ""
        lines.append(f"- `best` ({best_cfg['gelu']} GELU, {best_cfg['linear']} linear inputs, {best_cfg['dropout']} "
                     f"dropout: the max-saving preset when measured{since}): saved-activation bytes per rank "
                     f"**{saving('best')}**.")
    if cos:
        lines.append("- Full-gradient cosine against the exact gradient on the same batch (random init): "
                     + ", ".join(f"{k} {v:.4f}" for k, v in cos.items() if v is not None) + ".")
    if ckpt:
        lines.append("- With non-reentrant checkpointing only what lies outside the checkpointed blocks is saved "
                     "(MiB per rank): " + "; ".join(f"{w}: " + ", ".join(f"{k} {x:.1f}" for k, x in s.items())
                                                      for w, s in ckpt.items()) + ".")
    if steps:
        lines.append(f"- Step time of `best` against vanilla, no checkpointing: {_span(steps, '.2f', 'x')} (one run "
                     "each on shared CPUs: noisy).")
    return "\n".join(lines)


# ------------------------------------------------------------------------- trade-off (bench_tradeoff)

def _tradeoff(results: Path):
    data = _json(results / "tradeoff.json")
    return (data, {r["name"]: r for r in data["rows"]}) if data and data.get("rows") else (None, {})


def _stale_presets(data: dict) -> list[str]:
    import fewbit_dist

    stale = []
    for r in data["rows"]:
        if r["name"].startswith("preset:"):
            name = r["name"].split(":", 1)[1]
            try:
                today = {**fewbit_dist.FewBitConfig.from_preset(name).to_dict(), "compress_dropout": False}
            except ValueError:
                today = None
            if r.get("fewbit") != today:
                stale.append(name)
    return stale


def tradeoff_block(results: Path = RESULTS) -> str:
    from bench_tradeoff import markdown

    data, _ = _tradeoff(results)
    if data is None:
        return _no_results("results/tradeoff.json")
    m = data.get("machine", {})
    header = (f"Saved activations and full-gradient quality, {data.get('shape', '?')} (results/tradeoff.json: "
              f"{_provenance(m)}). Pareto (*) on the 1-bit-dropout bytes.")
    text = markdown(data["rows"], set(data.get("pareto", [])), header).rstrip("\n")
    stale = _stale_presets(data)
    if stale:
        text += (f"\n\nThe `preset:` rows are the presets as they were at git {m.get('git')}; "
                 f"{', '.join(stale)} have changed since and were not re-measured on this model.")
    return text


def tradeoff_figures_block(results: Path = RESULTS) -> str:
    data, rows = _tradeoff(results)
    if data is None:
        return _no_results("results/tradeoff.json")
    out = []
    mib = lambda r: r["saved_bytes_dropout1"] / MIB  # noqa: E731
    sketches10 = [r for n, r in rows.items() if r.get("kind") == "sketch" and n.endswith("0.1")]
    if "act3+int4" in rows and sketches10:
        r = rows["act3+int4"]
        out.append(f"- At about the same memory (1-bit dropout bytes): int4 linear inputs {mib(r):.1f} MiB at cosine "
                   f"{r['cosine_mean']:.2f}; 10% sketches {_span([mib(s) for s in sketches10], '.1f')} MiB at "
                   f"{_span([s['cosine_mean'] for s in sketches10], '.2f')}.")
    sk = [r["rel_error_mean"] for r in rows.values() if r.get("kind") == "sketch"]
    lb = [r["rel_error_mean"] for r in rows.values() if r.get("kind") == "low-bit"]
    if sk and lb:
        out.append(f"- Relative error of the full gradient: sketches {_span(sk, '.1f')}, low-bit linear inputs "
                   f"{_span(lb, '.2f')} (both with 3-bit activations).")
    acts = [(n, rows[n]) for n in ["act3", *(f"act{b}+int8" for b in range(3, 9))] if n in rows]
    if acts:
        out.append("- Activation bits (cosine): " + ", ".join(f"{n} {r['cosine_mean']:.4f}" for n, r in acts) + ".")
    if "vanilla" in rows:
        out.append(f"- 1-bit dropout alone: saved bytes {-rows['vanilla']['saving_dropout1']:+.1%} against vanilla.")
    pres = [(n, r) for n, r in rows.items() if n.startswith("preset:")]
    if pres:
        stale = _stale_presets(data)
        out.append(f"- Presets with 1-bit dropout (settings of git {data.get('machine', {}).get('git')}"
                   + (f"; {', '.join(stale)} changed since" if stale else "") + "): "
                   + ", ".join(f"{n.split(':', 1)[1]} {-r['saving_dropout1']:+.1%} at cosine {r['cosine_mean']:.4f}"
                               for n, r in pres) + ".")
    front = sorted((rows[n] for n in data.get("pareto", []) if n in rows), key=mib)
    if front:
        out.append("- Pareto front, fewest bytes first: " + ", ".join(
            f"{r['name']} ({-r['saving_dropout1']:+.1%}, {r['cosine_mean']:.4f})" for r in front) + ".")
        ok = [r for r in front if r["cosine_mean"] >= 0.99]
        if ok:
            out.append(f"- Largest saving on the front at cosine >= 0.99: {ok[0]['name']}, "
                       f"{-ok[0]['saving_dropout1']:+.1%} at {ok[0]['cosine_mean']:.4f}.")
    return "\n".join(out)


# ---------------------------------------------------------------------------- linear layers (bench_linear)

def linear_block(results: Path = RESULTS) -> str:
    from bench_linear import markdown

    runs = _latest_per_command(_jsonl(results, "linear"))
    if not runs:
        return _no_results("results/results.jsonl, bench linear")
    out = []
    for cmd, date, rows in runs:
        out += [f"`{cmd}` ({rows[0].get('dtype', '?')}, {rows[0].get('tokens', '?')} tokens; {_provenance(rows[0])}):",
                "", markdown(rows), ""]
    return "\n".join(out).rstrip("\n")


def linear_figures_block(results: Path = RESULTS) -> str:
    """From the latest run that has every sketch (the default command)."""
    runs = [rs for _, _, rs in _latest_per_command(_jsonl(results, "linear"))
            if {"rownorm", "count", "gaussian", "rademacher"} <= {r["sketch"] for r in rs}]
    if not runs:
        return _no_results("results/results.jsonl, a bench_linear run with every sketch")
    rows = runs[-1]
    sk = [r for r in rows if r.get("ratio")]
    at = lambda names, ratio: [r for r in sk if r["sketch"] in names and r["ratio"] == ratio]  # noqa: E731
    every = at(("rownorm", "count", "gaussian", "rademacher"), 0.2)
    out = [f"- Ratio 0.2, every sketch and shape: relative grad-W error on low-rank data "
           f"{_span([r['rel_err_lowrank'] for r in every], '.3f')} (cosine "
           f"{_span([r['cos_lowrank'] for r in every], '.3f')}), on i.i.d. data "
           f"{_span([r['rel_err_iid'] for r in every])}."]
    dense = [r["time_ratio"]["median"] for r in sk if r["sketch"] in ("gaussian", "rademacher")]
    out.append(f"- fwd+bwd against nn.Linear: dense sketches (gaussian, rademacher) {_span(dense, '.2f', 'x')} over "
               f"ratios {_span([r['ratio'] for r in sk], 'g')}; at ratio 0.2 count "
               f"{_span([r['time_ratio']['median'] for r in at(('count',), 0.2)], '.2f', 'x')}, rownorm "
               f"{_span([r['time_ratio']['median'] for r in at(('rownorm',), 0.2)], '.2f', 'x')}.")
    extra = []
    for r in at(("rownorm",), 0.2):
        c = next((o for o in at(("count",), 0.2) if (o["n_in"], o["n_out"]) == (r["n_in"], r["n_out"])), None)
        if c:
            extra.append((r["saved_bytes"] - c["saved_bytes"]) / r["input_bytes"])
    if extra:
        out.append(f"- rownorm's saved bytes beyond count's at ratio 0.2 (its k indices and one fp32): "
                   f"{_span(extra, '.5f')} of the input.")
    return "\n".join(out)


# ------------------------------------------------------------------------- activation kernels (bench_kernels)

def _kernel_rows(results: Path) -> tuple[str, list[dict]]:
    runs = _latest_per_command(_jsonl(results, "kernels"))
    return (runs[-1][0], runs[-1][2]) if runs else ("", [])


def kernels_block(results: Path = RESULTS) -> str:
    cmd, rows = _kernel_rows(results)
    if not rows:
        return _no_results("results/results.jsonl, bench kernels")
    by_key: dict[tuple, dict] = {}
    for r in rows:
        by_key.setdefault((r["activation"], r["bits"], r["dtype"], r["phase"]), {})[r["impl"]] = r
    lines = [f"`{cmd}` ({rows[0]['numel']:,} elements; {_provenance(rows[0])}):", "",
             "| activation | bits | dtype | phase | torch ms | native / torch (median [q25, q75]) | "
             "reference / torch |",
             "|---|---|---|---|---|---|---|"]
    for (act, bits, dt, phase), d in by_key.items():
        if "native" not in d or "reference" not in d:
            continue
        n, ref = d["native"]["ratio_to_torch"], d["reference"]["ratio_to_torch"]
        lines.append(f"| {act} | {bits} | {dt} | {phase} | {d['native']['time_torch_ms']:.1f} | "
                     f"{n['median']:.2f} [{n['q25']:.2f}, {n['q75']:.2f}] | {ref['median']:.2f} |")
    return "\n".join(lines)


def kernels_figures_block(results: Path = RESULTS) -> str:
    _, rows = _kernel_rows(results)
    native = [r for r in rows if r["impl"] == "native"]
    if not native:
        return _no_results("results/results.jsonl, bench kernels")

    def span(act, dtype, phase, bits):
        vals = [r["ratio_to_torch"]["median"] for r in native
                if r["activation"] == act and r["dtype"] == dtype and r["phase"] == phase and r["bits"] in bits]
        return _span(vals, ".2f", "x") if vals else "-"

    low, four = (1, 2, 3), (4,)
    acts = list(dict.fromkeys(r["activation"] for r in native))
    out = []
    for dtype in dict.fromkeys(r["dtype"] for r in native):
        out.append(f"- {dtype}, native / torch, 1-3 bits: " + "; ".join(
            f"{a} backward {span(a, dtype, 'bwd', low)}, fwd+bwd {span(a, dtype, 'both', low)}" for a in acts)
            + "; 4 bits, fwd+bwd: " + ", ".join(f"{a} {span(a, dtype, 'both', four)}" for a in acts) + ".")
    return "\n".join(out)


def quantize_block(results: Path = RESULTS) -> str:
    runs = _latest_per_command(_jsonl(results, "quantize"))
    if not runs:
        return _no_results("results/results.jsonl, bench quantize")
    cmd, _, rows = runs[-1]
    lines = [f"`{cmd}` ({_provenance(rows[0])}):", "",
             "| shape | bits | dtype | previous path ms | one-pass ms | one-pass / previous (median [q25, q75]) | "
             "its reference / previous |", "|---|---|---|---:|---:|---|---:|"]
    ref = {(r["bits"], r["dtype"], tuple(r["shape"])): r for r in rows if r["impl"] == "fused_reference"}
    for r in (r for r in rows if r["impl"] == "fused"):
        q = r["ratio_to_current"]
        rr = ref.get((r["bits"], r["dtype"], tuple(r["shape"])))
        ref_ratio = f"{rr['ratio_to_current']['median']:.2f}" if rr else "-"
        lines.append(f"| {r['shape'][0]} x {r['shape'][1]} | {r['bits']} | {r['dtype']} | {r['time_current_ms']:.1f} | "
                     f"{r['time_ms']:.1f} | {q['median']:.3f} [{q['q25']:.3f}, {q['q75']:.3f}] | {ref_ratio} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the CPU demo

DEMO_COMMAND = ["launch/demo.py"]
# Lines that libraries log to stdout while the demo runs (e.g. DeepSpeed's accelerator notice): kept in the
# record, left out of the README.
LIBRARY_LOG = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[(?:DEBUG|INFO|WARNING)\]")


def record_demo(results: Path = RESULTS) -> Path:
    """Run the demo as the README shows it and keep its output (with the machine and its load, which the wall
    times depend on) in results/demo/results.json."""
    import os

    from benchlib import machine_info

    out = subprocess.run([sys.executable, *DEMO_COMMAND], cwd=ROOT, capture_output=True, text=True, check=True)
    path = results / "demo" / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"command": "python " + " ".join(DEMO_COMMAND), "machine": machine_info("cpu"),
                                "load_average": [round(x, 2) for x in os.getloadavg()], "stdout": out.stdout},
                               indent=1) + "\n")
    return path


def demo_lines(stdout: str) -> list[str]:
    """The demo's own lines of a recorded output."""
    return [line for line in stdout.rstrip("\n").splitlines() if not LIBRARY_LOG.match(line)]


def demo_block(results: Path = RESULTS) -> str:
    data = _json(results / "demo" / "results.json")
    if not data:
        return _no_results("results/demo/results.json (python launch/docs_figures.py --record-demo)")
    m = data.get("machine", {})
    load = (f", load average {data['load_average'][0]:g} on {m.get('cpu_count')} CPUs"
            if data.get("load_average") else "")
    return "\n".join(["```", f"$ {data['command']}", *demo_lines(data["stdout"]), "```", "",
                      f"(Recorded in results/demo/results.json: {m.get('cpu', '?')}, {_provenance(m)}{load}. "
                      "The wall times depend on the machine and its load; the saved-activation figures do not.)"])


def plan_block(results: Path = RESULTS) -> str:
    """The planner against measured peaks and its projections (results/plan/, launch/bench_plan.py)."""
    import bench_plan

    return bench_plan.markdown(results)


def long_context_block(results: Path = RESULTS) -> str:
    """The long-context sweep beside the planner (results/plan/long_context.json, launch/bench_plan.py)."""
    import bench_plan

    return bench_plan.long_context_markdown(results)


# ----------------------------------------------------------------------------------------------- render

BLOCKS = {
    "decoder": decoder_block, "decoder_grid": decoder_grid_block, "finetune": finetune_block,
    "finetune_cls": finetune_cls_block, "peak": peak_block,
    "step": step_block, "quantize": quantize_block, "memory_headline": memory_headline_block,
    "memory": memory_block, "tradeoff": tradeoff_block, "tradeoff_figures": tradeoff_figures_block,
    "linear": linear_block, "linear_figures": linear_figures_block, "kernels": kernels_block,
    "kernels_figures": kernels_figures_block, "presets": presets_block, "demo": demo_block, "plan": plan_block,
    "long_context": long_context_block,
}


def block_names(text: str, where: str = "document") -> list[str]:
    """The blocks of `text`, in order; ValueError for a marker without a renderer or an unclosed block."""
    names, open_name = [], None
    for m in MARKER.finditer(text):
        closing, name = m.group(1) == "/", m.group(2)
        if name not in BLOCKS:
            raise ValueError(f"{where}: block <!-- figures:{name} --> has no renderer in launch/docs_figures.py")
        if closing != (open_name is not None) or (closing and name != open_name):
            raise ValueError(f"{where}: unbalanced marker {m.group(0)}")
        if closing:
            names.append(name)
        open_name = None if closing else name
    if open_name is not None:
        raise ValueError(f"{where}: <!-- figures:{open_name} --> is never closed")
    return names


def render(text: str, results: Path = RESULTS, where: str = "document") -> str:
    """`text` with every generated block replaced by a fresh rendering."""
    for name in block_names(text, where):
        body = BLOCKS[name](results)
        pattern = re.compile(rf"(<!-- figures:{name} -->\n)(?:.*?\n)?(<!-- /figures:{name} -->)", re.S)
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="fail if a generated block is stale")
    ap.add_argument("--doc", type=Path, action="append",
                    help="a document to render (repeatable; default BENCHMARKS.md and README.md, which must hold "
                         "every block between them)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="the results folder (default results/)")
    ap.add_argument("--record-demo", action="store_true", help="first run launch/demo.py and record its output")
    args = ap.parse_args(argv)
    if args.record_demo:
        print(f"wrote {record_demo(args.results)}")
    docs = args.doc or list(DOCS)
    placed: dict[str, list[str]] = {}
    for doc in docs:
        names = block_names(doc.read_text(), doc.name)
        if not names:
            raise ValueError(f"{doc.name} has no generated block (<!-- figures:NAME --> ... <!-- /figures:NAME -->)")
        for name in names:
            placed.setdefault(name, []).append(doc.name)
    if not args.doc:
        missing = [n for n in BLOCKS if n not in placed]
        twice = {n: w for n, w in placed.items() if len(w) > 1}
        if missing or twice:
            raise ValueError(f"every block belongs in exactly one of {[d.name for d in DOCS]}: "
                             f"missing {missing}, more than once {twice}")
    stale = []
    for doc in docs:
        old = doc.read_text()
        new = render(old, args.results, doc.name)
        if new == old:
            continue
        if args.check:
            stale.append(doc.name)
        else:
            doc.write_text(new)
            print(f"wrote {doc.name}")
    if stale:
        print(f"stale: {', '.join(stale)} differ from the results files; run python launch/docs_figures.py")
        return 1
    if args.check:
        print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
