"""Figures in BENCHMARKS.md that come from results files: rendered here, never typed by hand.

    python launch/docs_figures.py            # rewrite the generated blocks of BENCHMARKS.md
    python launch/docs_figures.py --check    # fail if a block differs from what the results files give

A generated block sits between `<!-- figures:NAME -->` and `<!-- /figures:NAME -->`; BLOCKS maps NAME to the
function that renders it from its results file:
- decoder:  the shipped presets on the pretrained models (results/decoder/results.json, rows of
  launch/bench_decoder.py whose recorded preset settings are today's);
- finetune: held-out loss after fine-tuning per preset (results/finetune/results.json, launch/bench_finetune.py).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fewbit_dist.presets import preset_settings  # noqa: E402

DOC = ROOT / "BENCHMARKS.md"
PRESETS = ("exact", "safe", "max-saving", "fewbit-paper")


def _rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def decoder_block(results: Path = ROOT / "results" / "decoder" / "results.json") -> str:
    rows = _rows(results)
    runs = sorted({(r["model"], r["precision"], r["tokens"]) for r in rows if r["variant"] == "vanilla"})
    lines = ["| model | precision | tokens | vanilla saved MiB | " + " | ".join(PRESETS) + " |",
             "|---|---|---|---:|" + "---:|" * len(PRESETS)]
    for model, precision, tokens in runs:
        mine = {r["variant"]: r for r in rows if (r["model"], r["precision"], r["tokens"]) == (model, precision, tokens)}
        cells = []
        for preset in PRESETS:
            r = mine.get(preset)
            fresh = r is not None and r.get("preset_settings") == preset_settings(preset)
            cells.append(f"{r['saved_vs_vanilla']:.3f}x / {r['grad_cosine']:.5f}" if fresh else "-")
        if all(c == "-" for c in cells):
            continue
        lines.append(f"| {model} | {precision} | {tokens} | {mine['vanilla']['saved_bytes'] / 2**20:.1f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def finetune_block(results: Path = ROOT / "results" / "finetune" / "results.json") -> str:
    rows = _rows(results)
    if not rows:
        return "(no runs recorded yet)"
    lines = ["| run | preset | seeds | final held-out loss (mean) | delta vs vanilla, same seeds (mean / max abs) |",
             "|---|---|---:|---:|---:|"]
    runs = sorted({(r["run"]["steps"], r["run"]["batch_size"], r["run"]["seq_len"], r["run"]["lr"]) for r in rows})
    for steps, batch, seq, lr in runs:
        mine = [r for r in rows if (r["run"]["steps"], r["run"]["batch_size"], r["run"]["seq_len"], r["run"]["lr"])
                == (steps, batch, seq, lr)]
        vanilla = {r["seed"]: r["eval_loss"] for r in mine if r["preset"] == "vanilla"}
        for preset in ("vanilla", *PRESETS):
            rs = sorted((r for r in mine if r["preset"] == preset), key=lambda r: r["seed"])
            if not rs:
                continue
            deltas = [r["eval_loss"] - vanilla[r["seed"]] for r in rs if r["seed"] in vanilla]
            delta = (f"{statistics.mean(deltas):+.4f} / {max(abs(d) for d in deltas):.4f}"
                     if deltas and preset != "vanilla" else "-")
            lines.append(f"| {steps} steps x {batch} x {seq} tokens, lr {lr:g} | {preset} | "
                         f"{','.join(str(r['seed']) for r in rs)} | "
                         f"{statistics.mean(r['eval_loss'] for r in rs):.4f} | {delta} |")
    return "\n".join(lines)


BLOCKS = {"decoder": decoder_block, "finetune": finetune_block}


def render(text: str) -> str:
    """`text` with every generated block replaced by a fresh rendering."""
    for name, fn in BLOCKS.items():
        pattern = re.compile(rf"(<!-- figures:{name} -->\n)(?:.*?\n)?(<!-- /figures:{name} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"{DOC.name} has no block <!-- figures:{name} --> ... <!-- /figures:{name} -->")
        body = fn()
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="fail if a generated block is stale")
    ap.add_argument("--doc", type=Path, default=DOC)
    args = ap.parse_args(argv)
    old = args.doc.read_text()
    new = render(old)
    if args.check:
        if new != old:
            print(f"stale: {args.doc.name} differs from its results files; run python launch/docs_figures.py")
            return 1
        print("ok")
        return 0
    args.doc.write_text(new)
    print(f"wrote {args.doc.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
