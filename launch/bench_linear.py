"""Linear-layer benchmark: fwd+bwd time against nn.Linear, grad-W error, saved bytes, for RandomizedLinear per
sketch and ratio and for LowBitLinear per bit-width.

    python launch/bench_linear.py                       # CPU, fp32, 8192 tokens, 1024x1024 and 768x3072
    python launch/bench_linear.py --device cuda --dtype bf16

Time: fwd+bwd (grad input, weight and bias) of the layer divided by nn.Linear's, both run interleaved
on the same tensors, median and quartiles of the per-round ratios. Error: ||grad_W - exact|| / ||exact||,
RMS over --seeds sketches, on two kinds of data: "iid" (Gaussian x and g: the worst case, no structure for
a sketch to exploit) and "lowrank" (x and g dominated by a few shared directions, as activations and
gradients of trained networks are), with the cosine to the exact gradient. Saved: what autograd keeps for
backward (fewbit_dist.memory), against the input's bytes. Rows are appended to results/results.jsonl and a
markdown table is printed.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import append_results, machine_info, ratio_stats, time_interleaved  # noqa: E402
from fewbit_dist import LowBitLinear, RandomizedLinear  # noqa: E402
from fewbit_dist.functional.sketch import SKETCHES  # noqa: E402
from fewbit_dist.memory import SavedTensorMeter  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_data(kind, tokens, n_in, n_out, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "iid":
        x = torch.randn(tokens, n_in, generator=g)
        dy = torch.randn(tokens, n_out, generator=g)
    else:  # a few dominant shared directions plus noise
        r = 16
        z = torch.randn(tokens, r, generator=g)
        x = z @ torch.randn(r, n_in, generator=g) / math.sqrt(r) + 0.3 * torch.randn(tokens, n_in, generator=g)
        dy = z @ torch.randn(r, n_out, generator=g) / math.sqrt(r) + 0.3 * torch.randn(tokens, n_out, generator=g)
    return x.to(device, dtype), dy.to(device, dtype)


def grad_error(layer, ref_grad, x, dy, seeds):
    errs, coss = [], []
    for s in range(seeds):
        torch.manual_seed(1000 + s)
        layer.weight.grad = None
        layer(x).backward(dy)
        gw = layer.weight.grad.float()
        errs.append(((gw - ref_grad).norm() / ref_grad.norm()).item() ** 2)
        coss.append(torch.nn.functional.cosine_similarity(gw.flatten(), ref_grad.flatten(), dim=0).item())
    return math.sqrt(sum(errs) / len(errs)), sum(coss) / len(coss)


def bench_shape(tokens, n_in, n_out, ratios, sketches, dtype, device, repeats, seeds, low_bits=()):
    torch.manual_seed(0)
    ref = torch.nn.Linear(n_in, n_out, device=device, dtype=dtype)
    layers = {}
    for sk in sketches:
        for ratio in ratios:
            layers[(sk, ratio)] = RandomizedLinear(n_in, n_out, device=device, dtype=dtype, proj_dim_ratio=ratio,
                                                   sketch=sk)
    for bits in low_bits:
        layers[(f"int{bits}", None)] = LowBitLinear(n_in, n_out, device=device, dtype=dtype, bits=bits)
    for lin in layers.values():
        lin.weight, lin.bias = ref.weight, ref.bias  # the same parameters
    x, dy = make_data("iid", tokens, n_in, n_out, device, dtype)
    xg = x.clone().requires_grad_(True)

    def step(layer):
        def run():
            xg.grad = None
            layer.weight.grad = layer.bias.grad = None
            layer(xg).backward(dy)
        return run

    fns = {"linear": step(ref), **{f"{sk}@{r}": step(lin) for (sk, r), lin in layers.items()}}
    timing = time_interleaved(fns, repeats=repeats, warmup=1, device=device)

    exact = {}
    for kind in ("iid", "lowrank"):
        xd, dyd = make_data(kind, tokens, n_in, n_out, device, dtype, seed=1)
        ref.weight.grad = None
        ref(xd).backward(dyd)
        exact[kind] = (xd, dyd, ref.weight.grad.float().clone())

    rows = []
    for (sk, ratio), lin in layers.items():
        with SavedTensorMeter([lin, ref]) as meter:
            lin(xg)
        k = lin.projection_dim(tokens) if isinstance(lin, RandomizedLinear) else None
        row = {"bench": "linear", "sketch": sk, "ratio": ratio, "tokens": tokens, "n_in": n_in, "n_out": n_out,
               "dtype": str(dtype).replace("torch.", ""), "k": k,
               "time_linear_ms": 1e3 * timing["linear"]["median"],
               "time_ms": 1e3 * timing[f"{sk}@{ratio}"]["median"],
               "time_ratio": ratio_stats(timing[f"{sk}@{ratio}"]["samples"], timing["linear"]["samples"]),
               "saved_bytes": meter.nbytes, "input_bytes": x.numel() * x.element_size()}
        for kind, (xd, dyd, ref_grad) in exact.items():
            err, cos = grad_error(lin, ref_grad, xd, dyd, seeds)
            row[f"rel_err_{kind}"], row[f"cos_{kind}"] = err, cos
        rows.append(row)
    return rows


def markdown(rows) -> str:
    out = ["| shape | method | ratio | k | fwd+bwd vs nn.Linear (median [q25, q75]) | saved / input | "
           "grad-W rel. err iid | rel. err low-rank (cos) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["time_ratio"]
        out.append(f"| {r['tokens']}x{r['n_in']}->{r['n_out']} | {r['sketch']} | {r['ratio'] or '-'} | {r['k'] or '-'} | "
                   f"{t['median']:.2f} [{t['q25']:.2f}, {t['q75']:.2f}] | "
                   f"{r['saved_bytes'] / r['input_bytes']:.3f} | {r['rel_err_iid']:.2f} | "
                   f"{r['rel_err_lowrank']:.3f} ({r['cos_lowrank']:.3f}) |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--shapes", default="1024x1024,768x3072", help="comma-separated IN x OUT")
    ap.add_argument("--ratios", default="0.1,0.2,0.5")
    ap.add_argument("--sketches", default=",".join(sorted(SKETCHES)))
    ap.add_argument("--low-bits", default="2,4,8", help="LowBitLinear bit-widths ('' for none)")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=4, help="sketches per grad-error estimate")
    ap.add_argument("--no-save", action="store_true", help="print only; do not append to results/results.jsonl")
    args = ap.parse_args(argv)

    sketches = args.sketches.split(",")
    unknown = sorted(set(sketches) - set(SKETCHES))
    if unknown:
        ap.error(f"--sketches: unknown {unknown}; valid: {', '.join(sorted(SKETCHES))}")
    ratios = [float(r) for r in args.ratios.split(",")]
    low_bits = [int(b) for b in args.low_bits.split(",") if b.strip()]
    info = machine_info(args.device)
    rows = []
    for shape in args.shapes.split(","):
        n_in, n_out = (int(v) for v in shape.lower().split("x"))
        rows += bench_shape(args.tokens, n_in, n_out, ratios, sketches, DTYPES[args.dtype], args.device,
                            args.repeats, args.seeds, low_bits)
    for row in rows:
        row.update(info)
        row["command"] = "python launch/bench_linear.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(markdown(rows))
    if not args.no_save:
        append_results(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
