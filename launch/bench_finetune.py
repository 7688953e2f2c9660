"""Fine-tuning quality on real weights and real text: held-out loss curves per preset and seed.

    python launch/bench_finetune.py                          # SmolLM2-135M on Shakespeare, see the defaults
    python launch/bench_finetune.py --presets vanilla max-saving --seeds 0 1 2 --steps 40
    python launch/bench_finetune.py --report-only            # redo the table and plot from the results file

Each run is `launch/train.py --fewbit-config configs/smollm2.json --fewbit PRESET --seed S` in a fresh process
(one process, fp32, the config's batch and learning rate unless overridden), reading its metrics JSON: the
held-out loss before the first step and every --eval-every steps (eval_curve), and the training losses. The
seed fixes the data order, the model is the same pretrained one, and fewbit's rounding seeds follow torch's
RNG, so the preset is the only difference between the runs of one seed.

Writes results/finetune/results.json (one row per run: preset, seed, curve, losses, machine, versions, run
config; rows of other runs are kept), results.md (final held-out loss per preset: mean over seeds, spread,
and the difference to vanilla on the same seeds) and curves.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import ROOT, machine_info  # noqa: E402

OUT = ROOT / "results" / "finetune"
CONFIG = ROOT / "configs" / "smollm2.json"
PRESETS = ("vanilla", "exact", "safe", "max-saving", "fewbit-paper")


def run_one(preset: str, seed: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "m.json"
        cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--fewbit-config", str(args.config),
               "--fewbit", preset, "--seed", str(seed), "--max-steps", str(args.steps),
               "--eval-every", str(args.eval_every), "--metrics-out", str(metrics), "--no-progress"]
        for flag, value in (("--seq-len", args.seq_len), ("--batch-size", args.batch_size), ("--lr", args.lr)):
            if value is not None:
                cmd += [flag, str(value)]
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[1:])} failed:\n{out.stderr[-4000:]}")
        m = json.loads(metrics.read_text())
    return {"preset": preset, "seed": seed, "steps": args.steps, "eval_curve": m["eval_curve"],
            "eval_loss": m["eval_loss"], "losses": m["losses"], "tokens_per_s": m.get("tokens_per_s"),
            "command": "python launch/train.py " + " ".join(cmd[2:]).replace(str(ROOT) + os.sep, "")
            .replace(str(metrics), "M.json")}


def row_key(r: dict) -> tuple:
    return r["preset"], r["seed"], r["run"]["steps"], r["run"]["seq_len"], r["run"]["batch_size"], r["run"]["lr"]


def load_rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def run_summaries(rows: list[dict]) -> list[tuple[dict, list[dict]]]:
    """Per run (steps, seq_len, batch_size, lr), in that order: the run's settings and, for each preset of
    PRESETS it measured (in PRESETS order), its seeds, final held-out losses, held-out loss at step 0 and the
    per-seed differences to vanilla (final loss minus vanilla's on the same seed, for the seeds vanilla ran).
    The one place the per-seed deltas are computed: results.md and BENCHMARKS.md (launch/docs_figures.py) both
    render from it."""
    by_run: dict = {}
    for r in rows:
        run = r["run"]
        by_run.setdefault((run["steps"], run["seq_len"], run["batch_size"], run["lr"]), []).append(r)
    out = []
    for (steps, seq, batch, lr), group in sorted(by_run.items()):
        vanilla = {r["seed"]: r["eval_loss"] for r in group if r["preset"] == "vanilla"}
        presets = []
        for preset in PRESETS:
            rs = sorted((r for r in group if r["preset"] == preset), key=lambda r: r["seed"])
            if rs:
                presets.append({"preset": preset, "seeds": [r["seed"] for r in rs],
                                "finals": [r["eval_loss"] for r in rs], "start": rs[0]["eval_curve"][0]["eval_loss"],
                                "deltas": [r["eval_loss"] - vanilla[r["seed"]] for r in rs if r["seed"] in vanilla]})
        out.append(({"steps": steps, "seq_len": seq, "batch_size": batch, "lr": lr}, presets))
    return out


def markdown(rows: list[dict]) -> str:
    out = ["# Fine-tuning SmolLM2-135M on real text, per preset (launch/bench_finetune.py)", "",
           "Held-out loss (nats per token, the last 2% of the Shakespeare token stream) after the same steps from the "
           "same pretrained weights, one process, fp32; `delta` is the preset's final loss minus vanilla's on the "
           "same seed (mean and max over seeds).", ""]
    for run, presets in run_summaries(rows):
        out += [f"## {run['steps']} steps of {run['batch_size']} x {run['seq_len']} tokens, lr {run['lr']}", "",
                "| preset | seeds | held-out loss at step 0 | final held-out loss (mean) | spread (max - min) | "
                "delta vs vanilla (mean) | delta (max abs) |", "|---|---:|---:|---:|---:|---:|---:|"]
        for p in presets:
            finals, deltas = p["finals"], p["deltas"]
            d_mean = f"{statistics.mean(deltas):+.4f}" if deltas else "-"
            d_max = f"{max(abs(d) for d in deltas):.4f}" if deltas else "-"
            out.append(f"| {p['preset']} | {','.join(map(str, p['seeds']))} | {p['start']:.4f} | "
                       f"{statistics.mean(finals):.4f} | {max(finals) - min(finals):.4f} | {d_mean} | {d_max} |")
        out.append("")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = dict(zip(PRESETS, ("black", "tab:blue", "tab:green", "tab:red", "tab:orange")))
    seen = set()
    for r in rows:
        xs = [p["step"] for p in r["eval_curve"]]
        ys = [p["eval_loss"] for p in r["eval_curve"]]
        label = None if r["preset"] in seen else r["preset"]
        seen.add(r["preset"])
        ax.plot(xs, ys, color=colors.get(r["preset"], "gray"), alpha=0.7, label=label, marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("SmolLM2-135M fine-tuned on Shakespeare (one line per seed)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=None, help="default: the config's")
    ap.add_argument("--lr", type=float, default=None, help="default: the config's")
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.eval_every < 1:
        ap.error("--steps and --eval-every must be positive")
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.json"
    if not args.report_only:
        cfg = json.loads(args.config.read_text())["training"]
        run_cfg = {"config": str(args.config.relative_to(ROOT)) if args.config.is_relative_to(ROOT) else args.config.name,
                   "steps": args.steps, "eval_every": args.eval_every,
                   "seq_len": args.seq_len or cfg["seq_len"], "batch_size": args.batch_size or cfg["batch_size"],
                   "lr": args.lr or cfg["lr"]}
        info = machine_info("cpu")
        for seed in args.seeds:  # seed-major: a stopped run leaves whole seeds to compare
            for preset in args.presets:
                row = {**run_one(preset, seed, args), "run": run_cfg, "machine": info}
                print(f"{preset:>13} seed {seed}: held-out {row['eval_curve'][0]['eval_loss']:.4f} -> "
                      f"{row['eval_loss']:.4f}", flush=True)
                rows = [r for r in load_rows(results) if row_key(r) != row_key(row)] + [row]
                results.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    rows = load_rows(results)
    (args.out / "results.md").write_text(markdown(rows))
    plot(rows, args.out / "curves.png")
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
