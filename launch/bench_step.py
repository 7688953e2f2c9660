"""Training-step time of converted models against vanilla, side by side on the CPU, per preset.

    python launch/bench_step.py                 # RoBERTa-base and SmolLM2 shapes (4 layers), fp32 and bf16 autocast
    python launch/bench_step.py --quick         # 2 layers, batches of 2 x 128 tokens, 3 repeats

Every variant (vanilla, then one model per preset, each built from the same seed and converted with
`fewbit_dist.convert(model, preset)`) runs one forward + backward per round, in turn, after a warm-up round;
the ratio is the median of the per-round ratios converted / vanilla (benchlib.ratio_stats). A preset that does
not resolve or does not apply is recorded with its error instead of a time. Rows (long format: machine,
versions, config, variant, median seconds, ratio) are appended to results/step/results.json and the run's
table is written to results/step/results.md, after each configuration.

The model shapes (also used by launch/gpu_check.py on a GPU, at full depth and batch):
- roberta-base: RobertaForSequenceClassification, hidden 768, 12 heads, FFN 3072, vocab 50265, 2 labels;
- smollm2: LlamaForCausalLM shaped like SmolLM2-135M, hidden 576, 9 heads, 3 KV heads, FFN 1536, vocab 49152,
  tied embeddings, with labels (the causal-LM loss).
Weights are random (no download); the time of a step does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import ROOT, machine_info, ratio_stats, sync  # noqa: E402

PRESETS = ("exact", "safe", "max-saving", "fewbit-paper")
RESULTS_DIR = ROOT / "results" / "step"
DTYPES = {"fp32": None, "bf16": torch.bfloat16}

# Full-size shapes; `layers` and the batch are chosen per run.
SHAPES = {
    "roberta-base": dict(vocab_size=50265, hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                         max_position_embeddings=514, type_vocab_size=1, num_labels=2),
    "smollm2": dict(vocab_size=49152, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=True),
}
# A few-second stand-in of each shape for dry runs and tests (same classes, tiny widths).
TINY = {
    "roberta-base": dict(vocab_size=1000, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=64, type_vocab_size=1, num_labels=2),
    "smollm2": dict(vocab_size=1000, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=True),
}


def build_model(shape: str, layers: int, tiny: bool = False, device="cpu") -> torch.nn.Module:
    """A randomly initialized model of `shape` with `layers` layers, in training mode, built after
    torch.manual_seed(0) so every variant starts from the same weights."""
    import transformers

    kwargs = dict((TINY if tiny else SHAPES)[shape], num_hidden_layers=layers)
    torch.manual_seed(0)
    if shape == "roberta-base":
        model = transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**kwargs))
    elif shape == "smollm2":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs))
    else:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
    return model.to(device).train()


def make_batch(shape: str, model: torch.nn.Module, batch: int, seq: int, device="cpu") -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=g)
    if shape == "roberta-base":
        out = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                   labels=torch.randint(0, model.config.num_labels, (batch,), generator=g))
    else:
        out = dict(input_ids=ids, labels=ids.clone())
    return {k: v.to(device) for k, v in out.items()}


def make_variant(shape: str, preset, layers: int, tiny: bool = False, device="cpu"):
    """(model, error): vanilla for preset None, else converted with the named preset; the error (a string) if
    the preset does not resolve or does not apply (the model is then None)."""
    model = build_model(shape, layers, tiny, device)
    if preset is None:
        return model, None
    try:
        import fewbit_dist

        return fewbit_dist.convert(model, preset), None
    except Exception as exc:  # a preset name that does not resolve, a pattern that matches nothing, ...
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def train_step(model: torch.nn.Module, batch: dict, autocast_dtype) -> None:
    """One forward and backward (the loss from the labels in `batch`); gradients freed afterwards."""
    device_type = next(model.parameters()).device.type
    with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def versions() -> dict:
    import transformers

    import fewbit_dist

    return {"torch": torch.__version__, "transformers": transformers.__version__, "fewbit_dist": fewbit_dist.__version__}


def bench_config(shape, dtype, layers, batch, seq, presets, repeats, tiny=False) -> list[dict]:
    """Rows for one (shape, dtype): vanilla and every preset, interleaved rounds, medians and ratios."""
    names = ["vanilla", *presets]
    variants, errors = {}, {}
    for name in names:
        model, err = make_variant(shape, None if name == "vanilla" else name, layers, tiny)
        if err is None:
            variants[name] = model
        else:
            errors[name] = err
    data = make_batch(shape, variants["vanilla"], batch, seq)
    samples = {name: [] for name in variants}
    for r in range(1 + repeats):  # round 0 warms up
        for name, model in variants.items():
            t0 = time.perf_counter()
            train_step(model, data, DTYPES[dtype])
            sync("cpu")
            if r:
                samples[name].append(time.perf_counter() - t0)
    config = {"model": shape, "layers": layers, "batch": batch, "seq": seq, "dtype": dtype, "device": "cpu",
              "threads": torch.get_num_threads(), "repeats": repeats, "tiny": tiny}
    rows = []
    for name in names:
        row = {"bench": "step", "config": config, "variant": name}
        if name in errors:
            row |= {"status": "error", "error": errors[name]}
        else:
            xs = sorted(samples[name])
            row |= {"status": "ok", "median_s": xs[len(xs) // 2], "samples_s": samples[name],
                    "ratio": ratio_stats(samples[name], samples["vanilla"])}
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | layers | batch x seq | dtype | variant | median step (s) | ratio to vanilla [q25, q75] |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["config"]
        head = f"| {c['model']} | {c['layers']} | {c['batch']} x {c['seq']} | {c['dtype']} | {r['variant']} |"
        if r["status"] != "ok":
            lines.append(f"{head} - | not run: {r['error'][:120]} |")
        else:
            q = r["ratio"]
            lines.append(f"{head} {r['median_s']:.3f} | {q['median']:.3f} [{q['q25']:.3f}, {q['q75']:.3f}] |")
    return "\n".join(lines) + "\n"


def append_json(rows: list[dict], path: Path) -> None:
    old = json.loads(path.read_text()) if path.exists() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(old + rows, indent=1, sort_keys=True) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 layers, batches of 2 x 128 tokens, 3 repeats")
    ap.add_argument("--models", default="roberta-base,smollm2")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--layers", type=int, default=None, help="default 4 (2 with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="default 5 (3 with --quick)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    layers = args.layers or (2 if args.quick else 4)
    repeats = args.repeats or (3 if args.quick else 5)
    batches = {"roberta-base": (2, 128) if args.quick else (16, 128),
               "smollm2": (2, 128) if args.quick else (4, 512)}
    presets = [p for p in args.presets.split(",") if p]
    info = {"machine": machine_info("cpu"), "versions": versions(),
            "command": "python launch/bench_step.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    for dtype in args.dtypes.split(","):
        if dtype not in DTYPES:
            raise ValueError(f"--dtypes must be among {sorted(DTYPES)}, got {dtype!r}")
    rows = []
    for shape in args.models.split(","):
        for dtype in args.dtypes.split(","):
            b, s = batches[shape]
            new = [r | info for r in bench_config(shape, dtype, layers, b, s, presets, repeats)]
            rows += new
            print(markdown(new), flush=True)
            if not args.no_save:  # saved as it goes: a long run that is stopped keeps what it measured
                append_json(new, args.out / "results.json")
                (args.out / "results.md").write_text(
                    f"# Step time, converted / vanilla (CPU)\n\n`{info['command']}`, torch {torch.__version__}, "
                    f"{info['machine']['threads']} threads, {info['machine']['date']}\n\n{markdown(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
