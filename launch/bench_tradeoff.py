"""Memory against gradient quality: which compression wins at each memory budget.

    python launch/bench_tradeoff.py [--config configs/roberta.json] [--batch-size 4] [--seq-len N]
                                    [--seeds 3] [--out results/tradeoff] [--quick]

For one model (the config's "model" section, randomly initialized: no weights can be downloaded) and one
batch of the embedded sentence-pair task it measures, per variant:
- saved-activation bytes of one training forward (dropout as configured), with and without 1-bit dropout
  masks (compress_dropout);
- the full parameter gradient (all parameters, flattened) against the exact one on the same batch: cosine
  and relative error, mean and worst over --seeds draws of the estimator. Dropout is switched off for this
  part so the exact and the compressed model see the same network; 1-bit dropout is exact given the mask
  (tests/test_dropout.py), so it changes memory only.
Variants: vanilla; 3-bit activations; 3-bit activations plus each sketch at ratios 0.1/0.2/0.5, plus
low-bit linear inputs at 2/3/4/8 bits, plus mixed per-layer policies (the shipped presets). The classifier head
stays exact in every variant (its input is a handful of rows).

Writes OUT.json (rows), OUT.md (the table with the Pareto front marked) and OUT.png (the plot), and appends
the rows to results/results.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "launch"))

import fewbit_dist  # noqa: E402
from benchlib import append_results, machine_info  # noqa: E402
from data import SentencePairTask  # noqa: E402
from fewbit_dist.memory import SavedTensorMeter  # noqa: E402

SKETCHES = ("rownorm", "count", "gaussian", "rademacher")
RATIOS = (0.1, 0.2, 0.5)
LINEAR_BITS = (2, 3, 4, 8)
BASE = {"activation_bits": 3, "exclude": ["classifier"]}


def preset_variants() -> list[tuple[str, dict]]:
    """The shipped presets (fewbit_dist.presets), measured like every other variant."""
    out = []
    for name in fewbit_dist.presets.list_presets():
        cfg = fewbit_dist.FewBitConfig.from_preset(name).to_dict()
        cfg["compress_dropout"] = False  # measured both ways below
        out.append((f"preset:{name}", cfg))
    return out


def variants(quick: bool = False) -> list[tuple[str, dict | None]]:
    out: list[tuple[str, dict | None]] = [("vanilla", None), ("act3", dict(BASE))]
    for sketch in (("rownorm",) if quick else SKETCHES):
        for ratio in ((0.2,) if quick else RATIOS):
            out.append((f"act3+{sketch}{ratio:g}", {**BASE, "proj_dim_ratio": ratio, "sketch": sketch}))
    for bits in ((4,) if quick else LINEAR_BITS):
        out.append((f"act3+int{bits}", {**BASE, "linear_bits": bits}))
    if not quick:
        for act in (4, 5, 6, 8):  # the activation-bit axis, with the most faithful linear inputs
            out.append((f"act{act}+int8", {**BASE, "activation_bits": act, "linear_bits": 8}))
        out.append(("act3+int8attn+int4ffn", {**BASE, "linear_bits": 4,
                                               "overrides": [{"pattern": "*.attention", "linear_bits": 8}]}))
        out.append(("act3+int4attn+int3ffn", {**BASE, "linear_bits": 3,
                                               "overrides": [{"pattern": "*.attention", "linear_bits": 4}]}))
        out += preset_variants()
    return out


def build_model(model_cfg: dict, seed: int = 0, dropout: bool = True):
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = dict(model_cfg)
    if not dropout:
        cfg["hidden_dropout_prob"] = cfg["attention_probs_dropout_prob"] = 0.0
    torch.manual_seed(seed)
    return transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**cfg))


def converted(model, fewbit_cfg):
    m = copy.deepcopy(model)
    if fewbit_cfg is not None:
        fewbit_dist.convert(m, fewbit_cfg)
    m.train()
    return m


def saved_bytes(model, batch, seed: int = 0) -> int:
    torch.manual_seed(seed)
    with SavedTensorMeter(model) as meter:
        loss = model(**batch).loss
    del loss
    return meter.nbytes


def flat_grad(model, batch, seed: int) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    model(**batch).loss.backward()
    grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in model.parameters()]
    return torch.cat(grads).double()


def pareto(rows: list[dict]) -> set[str]:
    """Names of the rows no other row beats on both saved bytes (less) and cosine (more)."""
    front = set()
    for r in rows:
        if not any(o["saved_bytes"] <= r["saved_bytes"] and o["cosine_mean"] >= r["cosine_mean"]
                   and (o["saved_bytes"], o["cosine_mean"]) != (r["saved_bytes"], r["cosine_mean"]) for o in rows):
            front.add(r["name"])
    return front


def markdown(rows: list[dict], front: set[str], header: str) -> str:
    lines = [header, "",
             "| variant | saved MiB | vs vanilla | +1-bit dropout MiB | vs vanilla | grad cosine (mean / worst) "
             "| grad rel. error (mean / worst) | Pareto |",
             "|---|---:|---:|---:|---:|---|---|:-:|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['saved_bytes'] / 2**20:.1f} | {-r['saving'] + 0.0:+.1%} | "
            f"{r['saved_bytes_dropout1'] / 2**20:.1f} | {-r['saving_dropout1'] + 0.0:+.1%} | "
            f"{r['cosine_mean']:.4f} / {r['cosine_worst']:.4f} | {r['rel_error_mean']:.3f} / {r['rel_error_worst']:.3f} "
            f"| {'*' if r['name'] in front else ''} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], front: set[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    kinds = {"sketch": ("o", "tab:orange"), "low-bit": ("s", "tab:blue"), "activation bits": ("v", "tab:purple"),
             "mixed": ("D", "tab:green"), "other": ("^", "tab:gray")}
    for r in rows:
        marker, color = kinds[r["kind"]]
        for key, filled in (("saved_bytes", False), ("saved_bytes_dropout1", True)):
            ax.scatter(r[key] / 2**20, 1 - r["cosine_mean"] + 1e-7, marker=marker, s=36,
                       facecolors=color if filled else "none", edgecolors=color)
        ax.annotate(r["name"].replace("act3+", ""), (r["saved_bytes_dropout1"] / 2**20, 1 - r["cosine_mean"] + 1e-7),
                    fontsize=6, xytext=(3, 2), textcoords="offset points")
    pts = sorted((r["saved_bytes_dropout1"] / 2**20, 1 - r["cosine_mean"] + 1e-7) for r in rows if r["name"] in front)
    if pts:
        ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", color="black", lw=0.8, label="Pareto front")
    for kind, (marker, color) in kinds.items():
        ax.scatter([], [], marker=marker, facecolors=color, edgecolors=color, label=kind)
    ax.set_yscale("log")
    ax.set_xlabel("saved activations per forward, MiB (hollow: torch dropout masks, filled: 1-bit masks)")
    ax.set_ylabel("1 - cosine(full gradient, exact)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def kind_of(name: str) -> str:
    if name.startswith("preset:") or "attn" in name:
        return "mixed"
    if "+int" in name and not name.startswith("act3"):
        return "activation bits"
    if "+int" in name:
        return "low-bit"
    if any(s in name for s in SKETCHES):
        return "sketch"
    return "other"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "roberta.json"))
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=None, help="default: the config's training.seq_len")
    ap.add_argument("--seeds", type=int, default=3, help="draws of the estimator per variant")
    ap.add_argument("--out", default=str(ROOT / "results" / "tradeoff"), help="output path without extension")
    ap.add_argument("--quick", action="store_true", help="a handful of variants (tests, smoke runs)")
    ap.add_argument("--no-record", action="store_true", help="do not append to results/results.jsonl")
    args = ap.parse_args(argv)
    with open(args.config) as fh:
        cfg = json.load(fh)
    if args.seq_len is None:
        args.seq_len = int(cfg.get("training", {}).get("seq_len", 128))
    if args.batch_size < 1 or args.seq_len < 8 or args.seeds < 1:
        ap.error("--batch-size >= 1, --seq-len >= 8 and --seeds >= 1 are required")
    model_cfg = cfg["model"]
    task = SentencePairTask(model_cfg["vocab_size"], args.seq_len, seed=0)
    batch = task.batch(0, args.batch_size)
    with_dropout = build_model(model_cfg, dropout=True)
    no_dropout = build_model(model_cfg, dropout=False)
    exact = flat_grad(converted(no_dropout, None), batch, seed=0)

    rows, vanilla = [], {}
    t0 = time.perf_counter()
    for name, fcfg in variants(args.quick):
        drop_cfg = None if fcfg is None else {**fcfg, "compress_dropout": True}
        row = {"bench": "tradeoff", "name": name, "kind": kind_of(name), "fewbit": fcfg,
               "batch_size": args.batch_size, "seq_len": args.seq_len,
               "saved_bytes": saved_bytes(converted(with_dropout, fcfg), batch),
               "saved_bytes_dropout1": saved_bytes(converted(with_dropout, drop_cfg or {"activation_bits": None,
                                                                                        "compress_dropout": True}),
                                                   batch)}
        model = converted(no_dropout, fcfg)
        cos, rel = [], []
        for seed in range(args.seeds if fcfg is not None else 1):
            g = flat_grad(model, batch, seed)
            cos.append(float(torch.nn.functional.cosine_similarity(g, exact, dim=0)))
            rel.append(float((g - exact).norm() / exact.norm()))
        row.update(cosine_mean=sum(cos) / len(cos), cosine_worst=min(cos), rel_error_mean=sum(rel) / len(rel),
                   rel_error_worst=max(rel), seeds=len(cos))
        if name == "vanilla":
            vanilla = row
        row["saving"] = 1 - row["saved_bytes"] / vanilla["saved_bytes"]
        row["saving_dropout1"] = 1 - row["saved_bytes_dropout1"] / vanilla["saved_bytes"]
        rows.append(row)
        print(f"{name:28s} {row['saved_bytes'] / 2**20:8.1f} MiB ({-row['saving']:+.1%})  1-bit dropout "
              f"{row['saved_bytes_dropout1'] / 2**20:8.1f} MiB ({-row['saving_dropout1']:+.1%})  cos "
              f"{row['cosine_mean']:.4f}/{row['cosine_worst']:.4f}  rel {row['rel_error_mean']:.3f}  "
              f"[{time.perf_counter() - t0:.0f} s]", flush=True)

    front = pareto([{**r, "saved_bytes": r["saved_bytes_dropout1"]} for r in rows])
    info = machine_info("cpu")
    shape = (f"{model_cfg['num_hidden_layers']} layers x {model_cfg['hidden_size']} hidden, batch "
             f"{args.batch_size} x {args.seq_len} tokens, fp32, random init")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".json"), "w") as fh:
        json.dump({"machine": info, "config": args.config, "shape": shape, "pareto": sorted(front), "rows": rows},
                  fh, indent=1)
    cmd = "python launch/bench_tradeoff.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"Saved activations and full-gradient quality, {shape} (`{cmd.strip()}`, torch {info['torch']}, "
              f"git {info.get('git')}). Pareto (*) on the 1-bit-dropout bytes.")
    out.with_suffix(".md").write_text(markdown(rows, front, header))
    plot(rows, front, out.with_suffix(".png"), f"Memory vs gradient quality: {shape}")
    if not args.no_record:
        append_results([{**info, **r} for r in rows])
    print(f"wrote {out.with_suffix('.json')}, .md, .png; Pareto front: {', '.join(sorted(front))}")
    return 0 if all(math.isfinite(r["cosine_mean"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
