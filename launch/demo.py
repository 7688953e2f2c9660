"""Demo: a small Hugging Face RoBERTa, trained a few steps on CPU before and after `fewbit_dist.convert`.

    python launch/demo.py [--config configs/roberta-demo.json] [--steps 20] [--bits 3]

Builds the model from a config (no downloads), trains a vanilla copy and a converted copy from the same
initial weights on the same embedded sentence-pair batches, and prints, per model, the saved-activation
bytes of one training forward (what autograd keeps for backward, parameters excluded) and the losses.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "launch"))

import fewbit_dist  # noqa: E402
from data import SentencePairTask  # noqa: E402
from fewbit_dist.memory import SavedTensorMeter, format_bytes  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "roberta-demo.json"


def build(cfg: dict):
    import transformers

    transformers.logging.set_verbosity_error()
    model_cfg = transformers.RobertaConfig(**cfg["model"])
    return transformers.RobertaForSequenceClassification(model_cfg)


def train(model, task, steps, batch_size, lr):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses, saved, t0 = [], None, time.perf_counter()
    for step in range(steps):
        batch = task.batch(step, batch_size)
        torch.manual_seed(step)  # same dropout masks for both models
        with SavedTensorMeter(model) as meter:
            loss = model(**batch).loss
        saved = meter.nbytes
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, saved, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="JSON with model, fewbit and training sections")
    ap.add_argument("--steps", type=int, default=None, help="training steps per model (default: from the config)")
    ap.add_argument("--bits", type=int, default=None, help="override fewbit.activation_bits")
    args = ap.parse_args(argv)

    cfg = json.loads(Path(args.config).read_text())
    train_cfg = cfg["training"]
    steps = args.steps if args.steps is not None else train_cfg["steps"]
    if steps < 1:
        ap.error(f"--steps must be >= 1, got {steps}")
    fb_cfg = fewbit_dist.FewBitConfig.load(cfg.get("fewbit"))
    if args.bits is not None:
        fb_cfg = fb_cfg.replace(activation_bits=args.bits)

    torch.manual_seed(train_cfg.get("seed", 0))
    vanilla = build(cfg)
    converted = fewbit_dist.convert(copy.deepcopy(vanilla), fb_cfg)
    task = SentencePairTask(cfg["model"]["vocab_size"], train_cfg["seq_len"], seed=train_cfg.get("seed", 0))

    print(f"model: RoBERTa {cfg['model']['num_hidden_layers']} layers, hidden {cfg['model']['hidden_size']}, "
          f"batch {train_cfg['batch_size']} x {train_cfg['seq_len']} tokens, {steps} steps on CPU")
    print(fewbit_dist.conversion_report(converted))
    results = {}
    for name, model in (("vanilla", vanilla), ("fewbit", converted)):
        results[name] = train(model, task, steps, train_cfg["batch_size"], train_cfg["lr"])
        losses, saved, secs = results[name]
        k = max(1, min(10, len(losses) // 4))
        print(f"{name:>8}: saved activations {format_bytes(saved):>10} per step | mean loss of the first {k} "
              f"steps {sum(losses[:k]) / k:.4f}, of the last {k} {sum(losses[-k:]) / k:.4f} | {secs:.1f} s")
    before, after = results["vanilla"][1], results["fewbit"][1]
    print(f"saved-activation memory: {format_bytes(before)} before, {format_bytes(after)} after "
          f"conversion ({100 * (before - after) / before:.1f}% less)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
