"""Memory benchmarks: FewBit's table reproduced per rank, for every strategy, with speed and gradient quality.

    python launch/bench_memory.py --config configs/roberta-tiny.json --strategies single --world-sizes 1 --out DIR
    python launch/bench_memory.py --config configs/roberta.json --seq-len 128 --batch-size 4 \\
        --strategies zero3,fsdp2 --world-sizes 2 --checkpointing none,non_reentrant --out DIR
    # on a machine with N GPUs (peak memory = torch.cuda.max_memory_allocated, max batch by search):
    python launch/bench_memory.py --config configs/roberta.json --device cuda --batch-size 32 \\
        --strategies ddp,zero1,zero2,zero3,fsdp2 --world-sizes N --checkpointing none,non_reentrant \\
        --budget-gib 80 --out DIR

Every configuration (variant x strategy x world size x checkpointing x batch size) runs launch/train.py in
fresh processes that this harness starts (python for `single`, torchrun otherwise), for --steps steps. Per
rank it records the peak memory (CUDA: max_memory_allocated; CPU: the peak RSS of the fresh process), the
saved-activation bytes of a training forward and the mean step time (first step excluded).

Variants (--variants): FewBit's four rows, vanilla / gelu3 (3-bit activation derivatives) / rand20 (20%
randomized linears) / both, plus `best` (the max-saving preset) and any preset by name. The
classifier head stays exact in all of them.

Beside memory: the gradient of each variant against the exact one on the same batch (cosine, relative
error; in process, dropout off, --quality-seeds draws), loss curves of --curve-steps steps for
--curve-seeds seeds (single process, --curve-config, default --config), and the largest batch that fits
--budget-gib per rank: a search on CUDA; on CPU an extrapolation from the batch sweep (labelled as such).

Writes into --out: results.json (one row per rank and configuration), results.md (the seed-style tables),
memory.png, memory_vs_batch.png, loss_curves.png, curves.json, max_batch.json, meta.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "launch"))

TRAIN = ROOT / "launch" / "train.py"
STRATEGIES = {"single": [], "ddp": [], "zero1": ["--deepspeed_config", "configs/ds/zero1.json"],
              "zero2": ["--deepspeed_config", "configs/ds/zero2.json"],
              "zero3": ["--deepspeed_config", "configs/ds/zero3.json"], "fsdp2": ["--fsdp"]}
CHECKPOINTING = ("none", "non_reentrant", "reentrant", "deepspeed")
HEAD = ["classifier"]
SEED_ROWS = {  # FewBit's table (RoBERTa, MRPC, batch 128, one GPU): peak GiB
    "vanilla": 11.30, "gelu3": 9.75, "rand20": 9.20, "both": 7.60}
BASE_VARIANTS = {
    "vanilla": {"activation_bits": None},
    "gelu3": {"activation_bits": 3, "exclude": HEAD},
    "rand20": {"activation_bits": None, "proj_dim_ratio": 0.2, "exclude": HEAD},
    "both": {"activation_bits": 3, "proj_dim_ratio": 0.2, "exclude": HEAD},
}


def variant_config(name: str) -> dict:
    """A variant's fewbit settings: one of BASE_VARIANTS, `best` (the max-saving preset) or a preset name."""
    if name in BASE_VARIANTS:
        return dict(BASE_VARIANTS[name])
    import fewbit_dist

    preset = "max-saving" if name == "best" else name
    presets = fewbit_dist.presets.list_presets()
    if preset not in presets:
        raise SystemExit(f"--variants: unknown variant {name!r}; valid: {', '.join([*BASE_VARIANTS, 'best', *presets])}")
    return fewbit_dist.FewBitConfig.from_preset(preset).to_dict()


def describe(fcfg: dict) -> dict:
    """The seed table's columns for a fewbit config: gelu, linear, dropout."""
    bits, lin = fcfg.get("activation_bits"), fcfg.get("linear_bits")
    ratio = fcfg.get("proj_dim_ratio")
    linear = f"int{lin}" if lin else f"randomized {ratio:.0%}" if ratio else "exact"
    return {"gelu": f"{bits}-bit" if bits else "exact", "linear": linear,
            "dropout": "1-bit" if fcfg.get("compress_dropout") else "torch"}


def child_env(device: str, world_size: int) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // world_size)))
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_train(cfg_path: Path, fcfg: dict, strategy: str, world_size: int, checkpointing: str, batch: int,
              steps: int, device: str, out: Path, timeout: float, seed: int | None = None) -> dict | None:
    """One configuration in fresh processes: train.py's metrics, or None when it failed (the log is kept)."""
    args = [str(TRAIN), "--no-progress", "--fewbit-config", str(cfg_path), "--fewbit", json.dumps(fcfg),
            "--checkpointing", checkpointing, "--max-steps", str(steps), "--batch-size", str(batch),
            "--metrics-out", str(out), *STRATEGIES[strategy]]
    if seed is not None:
        args += ["--seed", str(seed)]
    if strategy == "single":
        cmd = [sys.executable, *args]
    else:
        torchrun = Path(sys.executable).parent / "torchrun"
        cmd = [str(torchrun), "--standalone", "--nproc_per_node", str(world_size), *args]
    log = out.with_suffix(".log")
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=child_env(device, world_size), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        log.write_text(f"timeout after {timeout} s: {' '.join(cmd)}\n")
        return None
    log.write_text(" ".join(cmd) + "\n" + proc.stdout[-20000:] + "\n" + proc.stderr[-20000:])
    if proc.returncode != 0 or not out.is_file():
        return None
    return json.loads(out.read_text())


def gradient_quality(cfg: dict, variants: dict, batch: int, seeds: int) -> dict:
    """{variant: (cosine, relative error)} of the full parameter gradient against the exact one, one batch,
    dropout off (the same network for both), mean over `seeds` draws of the estimators."""
    import torch

    import bench_tradeoff as bt
    from data import SentencePairTask

    task = SentencePairTask(cfg["model"]["vocab_size"], cfg["training"]["seq_len"], seed=0)
    data = task.batch(0, batch)
    model = bt.build_model(cfg["model"], seed=cfg["training"]["seed"], dropout=False)
    exact = bt.flat_grad(bt.converted(model, None), data, seed=0)
    out = {}
    for name, fcfg in variants.items():
        m = bt.converted(model, fcfg)
        cos, rel = [], []
        for s in range(seeds):
            g = bt.flat_grad(m, data, s)
            cos.append(float(torch.nn.functional.cosine_similarity(g, exact, dim=0)))
            rel.append(float((g - exact).norm() / exact.norm()))
        out[name] = (statistics.fmean(cos), statistics.fmean(rel))
    return out


def max_batch(sweep: list[dict], budget: float, device: str) -> dict:
    """CPU: extrapolated from the batch sweep: (budget - memory that is not saved activations at the largest
    measured batch) / per-sample saved-activation bytes (least-squares slope)."""
    pts = sorted({(r["batch_size"], r["saved_activation_bytes"], r["peak_memory_bytes"]) for r in sweep})
    if len(pts) < 2:
        return {"method": "extrapolated", "max_batch": None, "note": "needs two batch sizes in the sweep"}
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    b0, s0, p0 = pts[-1]
    other = p0 - s0
    fit = math.floor((budget - other) / slope) if slope > 0 and budget > other else 0
    return {"method": "extrapolated (CPU)", "max_batch": fit, "per_sample_activation_bytes": slope,
            "non_activation_bytes": other, "from_batch": b0}


def search_max_batch(run, start: int, budget: float, limit: int = 1 << 14) -> dict:
    """CUDA: the largest per-rank batch whose run succeeds within `budget` bytes of peak memory (doubling,
    then bisection; each probe a fresh run)."""
    def fits(b):
        m = run(b)
        return m is not None and max(r["peak_memory_bytes"] for r in m["ranks"]) <= budget

    lo, hi = 0, start
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return {"method": "search (CUDA)", "max_batch": lo}


def fmt_mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def pct(a, b) -> str:
    """The change from vanilla b to a: -36.5% is a saving."""
    return "-" if a is None or not b else f"{a / b - 1:+.1%}"


def markdown(rows: list[dict], quality: dict, budget_rows: dict, curves: dict, meta: dict) -> str:
    out = [f"# Memory benchmark\n\n`{meta['command']}`\n\n{meta['machine_line']}\n",
           "Per rank; memory columns are the largest over the ranks. Change = variant / vanilla - 1 of the same "
           "strategy, world size, checkpointing and batch. Step time: ratio to vanilla, one run each (noisy on "
           f"shared CPUs). Peak memory: {meta['peak_memory']}.\n"]
    groups = {}
    for r in rows:
        groups.setdefault((r["strategy"], r["world_size"], r["checkpointing"], r["batch_size"]), []).append(r)
    for (strategy, ws, ckpt, batch), grp in groups.items():
        by_variant = {}
        for r in grp:
            v = by_variant.setdefault(r["variant"], dict(r))
            for key in ("saved_activation_bytes", "peak_memory_bytes", "step_time_s"):
                v[key] = max(v[key] or 0, r[key] or 0)
        base = by_variant.get("vanilla")
        out.append(f"\n## {strategy}, {ws} rank(s), checkpointing {ckpt}, batch {batch} x {grp[0]['seq_len']} "
                   "tokens per rank\n")
        out.append("| variant | GELU | linear | dropout | saved activations MiB | change | peak MiB | change "
                   "| step time vs vanilla | grad cosine | grad rel. error |")
        out.append("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, v in by_variant.items():
            q = quality.get(name, (None, None))
            ratio = (f"{v['step_time_s'] / base['step_time_s']:.2f}x" if base and base["step_time_s"]
                     and v["step_time_s"] else "-")
            out.append(f"| {name} | {v['gelu']} | {v['linear']} | {v['dropout']} | {fmt_mib(v['saved_activation_bytes'])} "
                       f"| {pct(v['saved_activation_bytes'], base and base['saved_activation_bytes'])} "
                       f"| {fmt_mib(v['peak_memory_bytes'])} | {pct(v['peak_memory_bytes'], base and base['peak_memory_bytes'])} "
                       f"| {ratio} | {'-' if q[0] is None else f'{q[0]:.4f}'} | {'-' if q[1] is None else f'{q[1]:.3f}'} |")
    out.append("\nFewBit's published figures (RoBERTa-base, MRPC, batch 128, one GPU, peak GiB): "
               + ", ".join(f"{k} {v}" for k, v in SEED_ROWS.items())
               + f" (both: {1 - SEED_ROWS['both'] / SEED_ROWS['vanilla']:.1%}).\n")
    if budget_rows:
        out.append(f"\n## Largest batch per rank within {meta['budget_gib']} GiB\n")
        out.append("| variant | max batch | method | per-sample saved activations MiB |")
        out.append("|---|---:|---|---:|")
        for name, b in budget_rows.items():
            per = b.get("per_sample_activation_bytes")
            out.append(f"| {name} | {b['max_batch'] if b['max_batch'] is not None else '-'} | {b['method']} | "
                       f"{'-' if per is None else f'{per / 2**20:.2f}'} |")
    if curves:
        out.append(f"\n## Loss curves ({meta['curve_line']})\n")
        out.append("| variant | first loss (mean) | final loss (mean over seeds) | final loss range |")
        out.append("|---|---:|---:|---|")
        for name, runs in curves.items():
            finals = [c[-1] for c in runs if c]
            firsts = [c[0] for c in runs if c]
            if finals:
                out.append(f"| {name} | {statistics.fmean(firsts):.4f} | {statistics.fmean(finals):.4f} | "
                           f"{min(finals):.4f} .. {max(finals):.4f} |")
    return "\n".join(out) + "\n"


def plots(rows: list[dict], sweep: list[dict], curves: dict, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # memory per configuration
    groups = []
    for r in rows:
        key = f"{r['strategy']} x{r['world_size']}\n{r['checkpointing']}\nb={r['batch_size']}"
        if key not in groups:
            groups.append(key)
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(groups) + 3), 4.5))
    width = 0.8 / max(1, len(variants))
    for ax, key, label in ((axes[0], "saved_activation_bytes", "saved activations per rank, MiB"),
                           (axes[1], "peak_memory_bytes", "peak memory per rank, MiB")):
        for i, v in enumerate(variants):
            vals = []
            for g in groups:
                sel = [r[key] for r in rows if r["variant"] == v and
                       f"{r['strategy']} x{r['world_size']}\n{r['checkpointing']}\nb={r['batch_size']}" == g]
                vals.append(max(sel) / 2**20 if sel else 0)
            ax.bar([j + i * width for j in range(len(groups))], vals, width, label=v)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups, fontsize=7)
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=120)
    plt.close(fig)

    # memory against batch size
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for v in variants:
        pts = sorted({(r["batch_size"], r["saved_activation_bytes"], r["peak_memory_bytes"])
                      for r in sweep if r["variant"] == v and r["rank"] == 0})
        if pts:
            axes[0].plot([p[0] for p in pts], [p[1] / 2**20 for p in pts], marker="o", label=v)
            axes[1].plot([p[0] for p in pts], [p[2] / 2**20 for p in pts], marker="o", label=v)
    for ax, label in ((axes[0], "saved activations, MiB"), (axes[1], "peak memory, MiB")):
        ax.set_xlabel("batch size per rank")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Memory against batch size (rank 0): {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "memory_vs_batch.png", dpi=120)
    plt.close(fig)

    # loss curves
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (v, runs) in enumerate(curves.items()):
        runs = [c for c in runs if c]
        if not runs:
            continue
        n = min(len(c) for c in runs)
        mean = [statistics.fmean(c[s] for c in runs) for s in range(n)]
        lo = [min(c[s] for c in runs) for s in range(n)]
        hi = [max(c[s] for c in runs) for s in range(n)]
        color = f"C{i}"
        ax.plot(range(n), mean, color=color, lw=1, label=f"{v} ({len(runs)} seeds)")
        ax.fill_between(range(n), lo, hi, color=color, alpha=0.15)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Loss curves: mean and range over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)


def csv_list(text: str, name: str, cast=str, allowed=None) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise SystemExit(f"--{name}: give at least one value")
    try:
        values = [cast(t) for t in items]
    except ValueError:
        raise SystemExit(f"--{name}: not a list of {cast.__name__}: {text!r}") from None
    if allowed is not None:
        bad = [v for v in values if v not in allowed]
        if bad:
            raise SystemExit(f"--{name}: unknown {bad}; valid: {', '.join(map(str, allowed))}")
    return values


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a train.py run config (model, training, data sections)")
    ap.add_argument("--strategies", default="single", help=f"comma list of {', '.join(STRATEGIES)}")
    ap.add_argument("--world-sizes", default="1", help="comma list of ranks per run (single needs 1, ddp >= 2)")
    ap.add_argument("--checkpointing", default="none,non_reentrant", help=f"comma list of {', '.join(CHECKPOINTING)}")
    ap.add_argument("--variants", default="vanilla,gelu3,rand20,both,best",
                    help="comma list: vanilla, gelu3, rand20, both, best (= max-saving preset), or a preset name")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--batch-size", type=int, default=None, help="per-rank batch (default: the config's)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the config's)")
    ap.add_argument("--sweep-batch-sizes", default=None,
                    help="comma list for memory against batch size (first strategy and world size, no "
                         "checkpointing); default: half, one and two times --batch-size")
    ap.add_argument("--steps", type=int, default=3, help="training steps per run (the first is not timed)")
    ap.add_argument("--budget-gib", type=float, default=None,
                    help="memory per rank for the largest-batch figure (default: 80 on CUDA, 16 on CPU)")
    ap.add_argument("--quality-seeds", type=int, default=2, help="estimator draws per variant for gradient quality")
    ap.add_argument("--curve-steps", type=int, default=100, help="loss-curve steps (0: no loss curves)")
    ap.add_argument("--curve-seeds", type=int, default=3)
    ap.add_argument("--curve-config", default=None, help="run config for the loss curves (default: --config)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    args = ap.parse_args(argv)
    args.strategies = csv_list(args.strategies, "strategies", allowed=tuple(STRATEGIES))
    args.world_sizes = csv_list(args.world_sizes, "world-sizes", int)
    args.checkpointing = csv_list(args.checkpointing, "checkpointing", allowed=CHECKPOINTING)
    args.variants = csv_list(args.variants, "variants")
    for name in ("steps", "quality_seeds", "curve_seeds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.curve_steps < 0 or any(w < 1 for w in args.world_sizes):
        ap.error("--curve-steps must be >= 0 and every world size >= 1")
    if "vanilla" not in args.variants:
        args.variants.insert(0, "vanilla")  # every saving is against it
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from benchlib import machine_info

    cfg = json.loads(Path(args.config).read_text())
    cfg.setdefault("training", {})
    if args.seq_len is not None:
        cfg["training"]["seq_len"] = args.seq_len
    if args.batch_size is not None:
        cfg["training"]["batch_size"] = args.batch_size
    batch = int(cfg["training"].get("batch_size", 8))
    seq_len = int(cfg["training"].get("seq_len", 128))
    cfg["training"].update(batch_size=batch, seq_len=seq_len, seed=cfg["training"].get("seed", 0))
    sweep_sizes = (csv_list(args.sweep_batch_sizes, "sweep-batch-sizes", int) if args.sweep_batch_sizes
                   else sorted({max(1, batch // 2), batch, 2 * batch}))
    variants = {name: variant_config(name) for name in args.variants}
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    run_cfg = out / "config.json"
    run_cfg.write_text(json.dumps(cfg, indent=1))

    combos = [(s, w, c) for s in args.strategies for w in args.world_sizes for c in args.checkpointing
              if not (s == "single" and w != 1) and not (s == "ddp" and w < 2)]
    skipped = [(s, w) for s in args.strategies for w in args.world_sizes if (s == "single" and w != 1)
               or (s == "ddp" and w < 2)]
    if skipped:
        print(f"skipping {skipped}: single runs 1 rank, ddp 2 or more", file=sys.stderr)
    if not combos:
        raise SystemExit("no valid (strategy, world size) combination: single needs 1 rank, ddp 2 or more")

    rows, failures, t0 = [], [], time.perf_counter()

    def run(name, strategy, ws, ckpt, b, steps=args.steps, seed=None, tag=""):
        path = out / "runs" / f"{name}-{strategy}-w{ws}-{ckpt}-b{b}{tag}.json"
        m = run_train(run_cfg, variants[name], strategy, ws, ckpt, b, steps, args.device, path, args.timeout, seed)
        if m is None:
            failures.append(str(path.with_suffix(".log").relative_to(out)))
        return m

    def record(m, name, ckpt, b):
        for r in m["ranks"]:
            rows.append({"variant": name, **describe(variants[name]), "strategy": m["strategy"],
                         "world_size": m["world_size"], "rank": r["rank"], "checkpointing": ckpt, "batch_size": b,
                         "seq_len": seq_len, "device": args.device, "peak_memory_bytes": r["peak_memory_bytes"],
                         "saved_activation_bytes": r["saved_activation_bytes"], "step_time_s": r["step_time_s"],
                         "fewbit": variants[name]})

    for strategy, ws, ckpt in combos:
        for name in variants:
            m = run(name, strategy, ws, ckpt, batch)
            if m is not None:
                record(m, name, ckpt, batch)
                worst = max(r["saved_activation_bytes"] for r in m["ranks"])
                print(f"[{time.perf_counter() - t0:6.0f} s] {name:8s} {strategy} x{ws} {ckpt:13s} b={batch}: saved "
                      f"{worst / 2**20:.1f} MiB, peak {max(r['peak_memory_bytes'] for r in m['ranks']) / 2**20:.0f} "
                      "MiB", flush=True)
    main_rows = list(rows)
    s0, w0 = combos[0][0], combos[0][1]
    for b in sweep_sizes:
        if b == batch and "none" in args.checkpointing:
            continue
        for name in variants:
            m = run(name, s0, w0, "none", b)
            if m is not None:
                record(m, name, "none", b)
    sweep = [r for r in rows if r["strategy"] == s0 and r["world_size"] == w0 and r["checkpointing"] == "none"]

    print("gradient quality ...", flush=True)
    quality = gradient_quality(cfg, variants, batch, args.quality_seeds)
    for r in rows:
        r["grad_cosine"], r["grad_rel_error"] = quality[r["variant"]]

    budget_gib = args.budget_gib if args.budget_gib is not None else (80.0 if args.device == "cuda" else 16.0)
    budget = budget_gib * 2**30
    budget_rows = {}
    for name in variants:
        if args.device == "cuda":
            budget_rows[name] = search_max_batch(
                lambda b, name=name: run(name, s0, w0, "none", b, steps=2, tag="-search"), batch, budget)
        else:
            budget_rows[name] = max_batch([r for r in sweep if r["variant"] == name and r["rank"] == 0], budget,
                                          args.device)

    curves = {}
    if args.curve_steps:
        curve_cfg = Path(args.curve_config) if args.curve_config else run_cfg
        for name in variants:
            for seed in range(args.curve_seeds):
                path = out / "runs" / f"curve-{name}-seed{seed}.json"
                m = run_train(curve_cfg, variants[name], "single", 1, "none",
                              json.loads(curve_cfg.read_text())["training"].get("batch_size", batch),
                              args.curve_steps, args.device, path, args.timeout, seed=seed)
                if m is None:
                    failures.append(str(path.with_suffix(".log").relative_to(out)))
                curves.setdefault(name, []).append(m["losses"] if m else [])
        print(f"[{time.perf_counter() - t0:6.0f} s] loss curves done", flush=True)

    info = machine_info(args.device)
    command = "python launch/bench_memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": command.strip(), "machine": info, "config": args.config, "batch_size": batch,
            "seq_len": seq_len, "budget_gib": budget_gib, "failures": failures,
            "peak_memory": "torch.cuda.max_memory_allocated" if args.device == "cuda" else
            "peak RSS of each fresh rank process (parameters, optimizer state and the interpreter included)",
            "machine_line": f"Machine: {info.get('gpu') or info['cpu']}, {info['cpu_count']} CPUs, torch {info['torch']}, "
                            f"git {info.get('git')}, {info['date']}.",
            "curve_line": f"{args.curve_steps} steps, {args.curve_seeds} seeds, single process, config "
                          f"{args.curve_config or args.config}"}
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    (out / "curves.json").write_text(json.dumps(curves))
    (out / "max_batch.json").write_text(json.dumps({"budget_gib": budget_gib, "variants": budget_rows}, indent=1))
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    (out / "results.md").write_text(markdown(main_rows, quality, budget_rows, curves, meta))
    title = (f"{Path(args.config).stem}: {cfg['model'].get('num_hidden_layers')} layers x "
             f"{cfg['model'].get('hidden_size')}, {seq_len} tokens, {args.device}")
    plots(main_rows, sweep, curves, out, title)
    print(f"wrote {out}/results.json, results.md, memory.png, memory_vs_batch.png, loss_curves.png"
          + (f"; {len(failures)} run(s) failed: {failures}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
