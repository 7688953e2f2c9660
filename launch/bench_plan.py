"""The memory planner (fewbit_dist.plan) against measured peaks, and its projections at GPU scale.

    python launch/bench_plan.py validate     # every mmap-threshold run under results/peak: predicted vs measured
    python launch/bench_plan.py project      # Llama-3-8B (FSDP2) and Qwen2.5-7B (ZeRO-3) on 8 x 80 GB, per preset
    python launch/bench_plan.py gloo         # what gloo's reduce-scatter allocates on CPU (the sharded rows' gap)
    python launch/bench_plan.py long-context # the bench_peak --seqs sweep beside the planner, budgets, plot
    python launch/bench_plan.py              # all four

validate: each row of results/peak/*/results.json measured with MALLOC_MMAP_THRESHOLD_=65536 (freed tensors go back to
the OS, so the resident set follows the live tensors; runs with glibc's default threshold measure the allocator
as well and are left out) and without the optimizer stepped inside backward (the planner models the plain
loop) is planned at the same model shape, batch, dtype, checkpointing, strategy and world size, with no optimizer
step (the runs measure forward and backward of the first step). The planner's figure is the step's peak above its
start (`Plan.peak_above_start`), the same quantity the runs measure; saved-activation bytes are compared too.
Output: results/plan/validation.json.

project: labelled projections, not measurements: Llama-3-8B, bf16 autocast (fp32 master weights), AdamW, HF
checkpointing, FSDP2 on 8 ranks of 80 GiB: the peak at batch 1 and 8 x 4096 tokens and the longest sequence per
preset at batch 1 (multiples of 1024 tokens), and at batch 1 with compressed checkpoint boundaries (boundary8);
the same for Qwen2.5-7B under ZeRO-3.
Output: results/plan/projection.json.

`markdown(results_dir)` renders both for BENCHMARKS.md (launch/docs_figures.py's block "plan").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "launch"))

MIB = 2**20
GIB = 2**30
OUT = ROOT / "results" / "plan"
PROJECTIONS = (
    dict(model="llama-3-8b", strategy="fsdp2", world_size=8),
    dict(model="qwen2.5-7b", strategy="zero3", world_size=8),
)
PROJECTION_MEMORY = "80GiB"
PROJECTION_PRESETS = ("vanilla", "exact", "max-saving")
SEQ_LIMIT = 1 << 18  # the longest sequence searched: 262144 tokens
# (checkpointing, batch): HF's checkpointing at batch 1 and 8 x 4096 tokens; compressed boundaries
# (fewbit_dist.integrations.checkpointing, 8-bit block inputs) at batch 1
PROJECTION_RUNS = (("hf", 1), ("hf", 8), ("boundary8", 1))


def _machine() -> dict:
    from benchlib import machine_info

    return machine_info("cpu")


def _peak_shape(run_meta: dict, row: dict):
    """The transformers config, batch and sequence of a bench_peak row (its SHAPES entry)."""
    import transformers
    from bench_peak import QUICK, QUICK_SEQ, SHAPES

    shape = SHAPES[row["shape"]]
    cfg = dict(shape["config"], **(QUICK if row.get("quick") else {}))
    cls = transformers.LlamaConfig if shape["family"] == "llama" else transformers.RobertaConfig
    seq = QUICK_SEQ if row.get("quick") else row.get("seq") or shape["seq"]
    return cls(**cfg), row.get("batch") or shape["batch"], seq


def validate(out_dir: Path = OUT, runs_root: Path = ROOT / "results" / "peak") -> dict:
    from fewbit_dist.plan import PlanSpec, plan

    rows, skipped = [], []
    for path in sorted(runs_root.glob("*/results.json")):
        data = json.loads(path.read_text())
        meta = data.get("meta", {})
        malloc = (meta.get("malloc_env") or {}).get("MALLOC_MMAP_THRESHOLD_")
        run = path.parent.name
        if str(malloc) != "65536":
            skipped.append(f"{run}: glibc's default malloc threshold")
            continue
        for r in data.get("rows", []):
            if "peak_mib" not in r:
                continue
            if r.get("optimizer"):
                skipped.append(f"{run}: optimizer {r['optimizer']!r} rows (the planner models the plain loop)")
                break
            config, batch, seq = _peak_shape(meta, r)
            spec = PlanSpec(model=config, batch=batch, seq=seq, dtype="fp32" if r["dtype"] == "fp32" else
                            "bf16-autocast", optimizer="none", checkpointing=r["ckpt"],
                            strategy=r.get("strategy", "single"), world_size=r.get("world_size", 1))
            t0 = time.perf_counter()
            p = plan(spec, r["variant"], full_depth=True)
            rows.append(dict(run=run, git=meta.get("machine", {}).get("git"), shape=r["shape"], seq=seq, dtype=r["dtype"],
                             strategy=spec.strategy, world_size=spec.world_size, ckpt=r["ckpt"],
                             variant=r["variant"], measured_mib=round(r["peak_mib"], 1),
                             predicted_mib=round(p.peak_above_start / MIB, 1),
                             ratio=round(p.peak_above_start / MIB / r["peak_mib"], 3),
                             saved_measured_mib=round(r["saved_mib"], 2),
                             saved_predicted_mib=round(p.saved_activations / MIB, 2),
                             plan_s=round(time.perf_counter() - t0, 2)))
            print(f"{run} {spec.strategy} x{spec.world_size} {r['ckpt']:<9} {r['variant']:<10} measured "
                  f"{r['peak_mib']:7.1f} predicted {p.peak_above_start / MIB:7.1f} MiB", flush=True)
    result = {"meta": {"command": "python launch/bench_plan.py validate", "machine": _machine(),
                       "skipped": sorted(set(skipped))}, "rows": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "validation.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _write_projection(path: Path, rows: list) -> dict:
    order = [s["model"] for s in PROJECTIONS]
    runs = [list(run) for run in PROJECTION_RUNS]
    rows.sort(key=lambda r: (order.index(r["model"]), PROJECTION_PRESETS.index(r["preset"]),
                             runs.index([r["checkpointing"], r["batch"]])))
    result = {"meta": {"command": "python launch/bench_plan.py project", "memory": PROJECTION_MEMORY,
                       "dtype": "bf16-autocast (fp32 weights, gradients and AdamW state; bf16 compute)",
                       "checkpointing": "hf: Hugging Face's non-reentrant checkpointing of every block; boundary8: "
                                        "the same with each block's saved input quantized to 8 bits",
                       "machine": _machine()}, "rows": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def project(out_dir: Path = OUT, models: tuple = ()) -> dict:
    """The projections; with `models`, only those models' rows are planned again and the others are kept from
    the existing projection.json."""
    from fewbit_dist.plan import PlanSpec, fit, parse_memory, plan

    memory = parse_memory(PROJECTION_MEMORY)
    path = out_dir / "projection.json"
    rows = [r for r in json.loads(path.read_text())["rows"] if r["model"] not in models] \
        if models and path.is_file() else []
    for setting in PROJECTIONS:
        if models and setting["model"] not in models:
            continue
        for preset in PROJECTION_PRESETS:
            for ckpt, batch in PROJECTION_RUNS:
                spec = PlanSpec(model=setting["model"], batch=batch, seq=4096, dtype="bf16-autocast",
                                optimizer="adamw", checkpointing=ckpt, strategy=setting["strategy"],
                                world_size=setting["world_size"])
                t0 = time.perf_counter()
                p = plan(spec, preset)
                # the longest sequence at batch 1 only: a batch-8 search costs as much again for an answer
                # about an eighth as long
                longest = fit(spec, preset, memory, "seq", limit=SEQ_LIMIT, granularity=1024,
                              known={spec.seq: p.peak}) if batch == 1 else None
                rows.append(dict(model=setting["model"], strategy=spec.strategy, world_size=spec.world_size,
                                 checkpointing=ckpt, batch=batch, preset=preset, peak_4096_gib=round(p.peak / GIB, 2),
                                 peak_phase=p.peak_phase, max_seq=longest["value"] if longest else None,
                                 params_gib=round(p.params / GIB, 2), grads_gib=round(p.grads / GIB, 2),
                                 optimizer_gib=round(p.optimizer_state / GIB, 2),
                                 saved_gib=round(p.saved_activations / GIB, 2),
                                 framework_gib=round(p.framework_extra / GIB, 2),
                                 plan_s=round(time.perf_counter() - t0, 1)))
                _write_projection(path, rows)  # after every row: a long run keeps what it has
                print(f"{setting['model']} {spec.strategy} x{spec.world_size} {ckpt:<9} batch {batch} {preset:<10} peak at "
                      f"4096 {p.peak / GIB:6.2f} GiB" + (f", longest sequence in {PROJECTION_MEMORY}: "
                                                         f"{longest['value']}" if longest else ""), flush=True)
    return _write_projection(path, rows)


def markdown(results: Path) -> str:
    """BENCHMARKS.md's block: the validation table and the projections."""
    out = []
    val = results / "plan" / "validation.json"
    if val.is_file():
        data = json.loads(val.read_text())
        rows = data["rows"]
        ratios = [r["ratio"] for r in rows]
        out += ["**Predicted against measured** (`python launch/bench_plan.py validate`): peak RSS of one step above "
                "its start, MiB, runs with `MALLOC_MMAP_THRESHOLD_=65536`; the planner traced each row's shape "
                "under FakeTensorMode. "
                + (f"Predicted / measured: {min(ratios):.2f} to {max(ratios):.2f} over {len(rows)} rows."
                   if rows else "No rows."), "",
                "| run (git) | strategy | checkpointing | variant | measured | predicted | ratio | saved measured "
                "| saved predicted |", "|---|---|---|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            out.append(f"| {r['run']} ({r['git']}) | {r['strategy']} x{r['world_size']} | {r['ckpt']} | "
                       f"{r['variant']} | {r['measured_mib']:.0f} | {r['predicted_mib']:.0f} | {r['ratio']:.2f} | "
                       f"{r['saved_measured_mib']:.1f} | {r['saved_predicted_mib']:.1f} |")
        if data["meta"].get("skipped"):
            out += ["", "Left out: " + "; ".join(data["meta"]["skipped"]) + "."]
    proj = results / "plan" / "projection.json"
    if proj.is_file():
        data = json.loads(proj.read_text())
        meta = data["meta"]
        out += ["", f"**Projection, not a measurement** (`python launch/bench_plan.py project`): per rank, "
                f"{meta['dtype']}, AdamW, checkpointing {meta['checkpointing']}; {meta['memory']} per rank; the "
                "longest sequence is the largest multiple of 1024 tokens whose predicted peak fits, searched up to "
                f"{SEQ_LIMIT} tokens (not capped at the model's trained context).", "",
                "| model | strategy | checkpointing | batch | preset | peak at 4096 tokens, GiB | phase | longest "
                "sequence | x vanilla's (hf) | params | grads | optimizer | saved | framework |",
                "|---|---|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        vanilla = {r["model"]: r["max_seq"] for r in data["rows"]
                   if r["preset"] == "vanilla" and r.get("checkpointing", "hf") == "hf" and r["max_seq"]}
        for r in data["rows"]:
            times = f"{r['max_seq'] / vanilla[r['model']]:.1f}" if r["max_seq"] and r["model"] in vanilla else "-"
            out.append(f"| {r['model']} | {r['strategy']} x{r['world_size']} | {r.get('checkpointing', 'hf')} | "
                       f"{r['batch']} | {r['preset']} | "
                       f"{r['peak_4096_gib']:.2f} | {r['peak_phase']} | {r['max_seq'] or '-'} | {times} | "
                       f"{r['params_gib']:.2f} | {r['grads_gib']:.2f} | {r['optimizer_gib']:.2f} | "
                       f"{r['saved_gib']:.2f} | {r['framework_gib']:.2f} |")
    return "\n".join(out) if out else "_No planner results yet: run `python launch/bench_plan.py`._"


GLOO_CHILD = """
import json, os, resource, sys, torch, torch.distributed as dist
rank, numel = int(sys.argv[1]), int(sys.argv[2])
dist.init_process_group("gloo", rank=rank, world_size=2)
x, out = torch.ones(numel), torch.empty(numel // 2)
dist.barrier()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
dist.reduce_scatter_tensor(out, x)
grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(json.dumps({"rank": rank, "grew": grew}))
dist.destroy_process_group()
"""


def gloo(out_dir: Path = OUT) -> dict:
    """What gloo's reduce_scatter_tensor allocates on CPU beyond its input and output (NCCL reduces in place on a
    GPU; the planner plans for NCCL): 2 fresh ranks, the tied SmolLM2 embedding's gradient (49152 x 576 float32),
    MALLOC_MMAP_THRESHOLD_=65536, the growth of each rank's high-water mark over the call."""
    import os
    import socket
    import subprocess

    numel = 49152 * 576
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", GLOO_CHILD, str(rank), str(numel)], env=env,
                              stdout=subprocess.PIPE, text=True) for rank in range(2)]
    grew = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1])["grew"] for p in procs]
    result = {"meta": {"command": "python launch/bench_plan.py gloo", "machine": _machine()},
              "tensor_mib": round(numel * 4 / MIB, 1), "high_water_growth_mib": [round(g / MIB, 1) for g in grew]}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gloo_reduce_scatter.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"gloo reduce_scatter_tensor of {result['tensor_mib']} MiB: high-water growth per rank "
          f"{result['high_water_growth_mib']} MiB")
    return result


LONG_CONTEXT_BUDGETS_MIB = (512, 1024, 2048)


def long_context(results: Path = ROOT / "results", out_dir: Path = OUT) -> dict:
    """The long-context sweep (`bench_peak.py --seqs`) with the planner beside it: per checkpointing mode and
    variant, the measured peak at each length and the predicted one (validation.json's rows), and per budget
    the longest swept length whose measured peak fits and the planner's longest length (128-token steps).
    Writes results/plan/long_context.json and long_context.png."""
    from fewbit_dist.plan import PlanSpec, fit

    val = json.loads((out_dir / "validation.json").read_text())["rows"]
    predicted = {(r["run"], r["seq"], r["ckpt"], r["variant"]): r["predicted_mib"] for r in val}
    series = {}
    run_names = []
    for path in sorted((results / "peak").glob("*/results.json")):
        data = json.loads(path.read_text())
        rows = [r for r in data.get("rows", []) if r.get("seq") and "peak_mib" in r
                and r.get("strategy", "single") == "single"]
        if not rows or str((data["meta"].get("malloc_env") or {}).get("MALLOC_MMAP_THRESHOLD_")) != "65536":
            continue
        run_names.append(path.parent.name)
        for r in rows:
            key = f"{r['shape']} {r['dtype']} {r['ckpt']} {r['variant']}"
            series.setdefault(key, dict(shape=r["shape"], dtype=r["dtype"], ckpt=r["ckpt"], variant=r["variant"],
                                        points=[]))["points"].append(dict(
                seq=r["seq"], measured_mib=round(r["peak_mib"], 1),
                predicted_mib=predicted.get((path.parent.name, r["seq"], r["ckpt"], r["variant"]))))
    for s in series.values():
        s["points"].sort(key=lambda p: p["seq"])
        s["longest"] = {}
        config, batch, _ = _peak_shape({}, {"shape": s["shape"]})
        spec = PlanSpec(model=config, batch=batch, seq=s["points"][0]["seq"], dtype="fp32" if s["dtype"] == "fp32"
                        else "bf16-autocast", optimizer="none", checkpointing=s["ckpt"])
        start = _start_bytes(spec, s["variant"])  # fit compares whole peaks; the runs measure above the start
        probes = {}  # every budget's search reuses the plans of the searches before it
        for budget in LONG_CONTEXT_BUDGETS_MIB:
            fits = [p["seq"] for p in s["points"] if p["measured_mib"] <= budget]
            found = fit(spec, s["variant"], budget * MIB + start, "seq", limit=SEQ_LIMIT, full_depth=True,
                        known=probes)
            probes.update(found["probes"])
            s["longest"][str(budget)] = {"measured_swept": max(fits) if fits else 0, "planned": found["value"]}
    result = {"meta": {"command": "python launch/bench_plan.py long-context", "runs": run_names,
                       "budgets_mib": list(LONG_CONTEXT_BUDGETS_MIB), "machine": _machine()},
              "series": list(series.values())}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "long_context.json").write_text(json.dumps(result, indent=1) + "\n")
    _plot_long_context(result, out_dir / "long_context.png")
    return result


def _start_bytes(spec, preset: str) -> int:
    """What the planned step starts with (parameters, here): `fit` compares whole peaks, the runs measure the
    peak above the start."""
    from fewbit_dist.plan import plan

    p = plan(replace(spec, seq=128), preset, full_depth=True)
    return p.peak - p.peak_above_start


def _plot_long_context(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"vanilla": "tab:gray", "exact": "tab:blue", "max-saving": "tab:red"}
    for s in result["series"]:
        xs = [p["seq"] for p in s["points"]]
        style = "-" if s["ckpt"] == "hf" else "--"
        ax.plot(xs, [p["measured_mib"] for p in s["points"]], style, marker="o", color=colors.get(s["variant"]),
                label=f"{s['variant']}, {s['ckpt']} checkpointing")
        pred = [(p["seq"], p["predicted_mib"]) for p in s["points"] if p["predicted_mib"] is not None]
        if pred:
            ax.plot(*zip(*pred), linestyle="none", marker="x", color=colors.get(s["variant"]))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("sequence length (tokens, batch 1)")
    ax.set_ylabel("peak RSS above the step's start (MiB)")
    ax.set_title("SmolLM2 shape (vocabulary 49152, 8 layers), fp32, one process: measured (o), planned (x)",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def long_context_markdown(results: Path) -> str:
    path = results / "plan" / "long_context.json"
    if not path.is_file():
        return "_No long-context results yet: run `python launch/bench_plan.py long-context`._"
    data = json.loads(path.read_text())
    series = data["series"]
    seqs = sorted({p["seq"] for s in series for p in s["points"]})
    out = ["Peak RSS of one training step above its start, MiB, measured (planned) per sequence length: "
           f"runs {', '.join(data['meta']['runs'])} (`python launch/bench_peak.py --shape smollm2-4k --seqs ...`, "
           "fresh processes, `MALLOC_MMAP_THRESHOLD_=65536`), the planner's prediction for the same step in "
           "parentheses.", "",
           "| checkpointing | variant | " + " | ".join(f"{n} tokens" for n in seqs) + " |",
           "|---|---|" + "---:|" * len(seqs)]
    for s in series:
        cells = {p["seq"]: f"{p['measured_mib']:.0f}" + (f" ({p['predicted_mib']:.0f})" if p["predicted_mib"]
                                                          else "") for p in s["points"]}
        out.append(f"| {s['ckpt']} | {s['variant']} | " + " | ".join(cells.get(n, "-") for n in seqs) + " |")
    budgets = data["meta"]["budgets_mib"]
    out += ["", "The longest sequence within a budget (MiB above the step's start): the longest swept length that "
            "fit, measured (N+: the longest swept length fitted) / the planner's longest (128-token steps).", "",
            "| checkpointing | variant | " + " | ".join(f"{b} MiB" for b in budgets) + " |",
            "|---|---|" + "---:|" * len(budgets)]
    for s in series:
        top = max(p["seq"] for p in s["points"])

        def swept(n):  # the longest swept length still fitted: the answer is that or more
            return f"{n}+" if n == top else str(n)

        out.append(f"| {s['ckpt']} | {s['variant']} | " + " | ".join(
            f"{swept(s['longest'][str(b)]['measured_swept'])} / {s['longest'][str(b)]['planned']}" for b in budgets)
            + " |")
    out += ["", "![peak against sequence length](results/plan/long_context.png)"]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", default="all", choices=("all", "validate", "project", "gloo", "long-context"))
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--models", default="", help="project: only these models (comma list), keep the other rows")
    args = ap.parse_args(argv)
    if args.what in ("all", "validate"):
        validate(args.out)
    if args.what in ("all", "project"):
        project(args.out, tuple(m for m in args.models.split(",") if m))
    if args.what in ("all", "gloo"):
        gloo(args.out)
    if args.what in ("all", "long-context"):
        long_context(out_dir=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
