"""CPU matmuls of a decode step: MKL (plain F.linear) vs oneDNN on prepacked weights, by shape and rows.

    python benchmarks/cpu_linear.py                  # d4 and d8 shapes, rows 1..32
    python benchmarks/cpu_linear.py --depths 8 --rows 1,5,32

Table 1, per weight shape of the chosen depths: MKL time / oneDNN time for one call with `rows`
rows (above 1 = oneDNN faster). This is what picochat/inference/cpu.py's rule is read from.
Table 2, per depth: every Linear of a random-weight model (q, k, v, o, MLP in, MLP out per layer,
then lm_head) applied to a (rows, C) input, as one decode step of `rows` sequences (or one
verification of rows - 1 speculated tokens) does, three ways: all MKL, all oneDNN, and picochat's
mix (pack_linears). The variants run interleaved and each figure is the best of --reps timings.
Prints both tables and a final JSON line.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn as nn

from picochat.inference.cpu import PackedLinear, pack_linears
from picochat.model.config import config_from_depth
from picochat.model.gpt import GPT


def linears(depth: int, vocab: int) -> list[nn.Linear]:
    torch.manual_seed(0)
    model = GPT(config_from_depth(depth, vocab_size=vocab, sequence_len=256))
    with torch.no_grad():
        for p in model.parameters():
            nn.init.normal_(p, std=0.02)
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def all_onednn(layers: list[nn.Linear]) -> list[nn.Linear]:
    """Every layer on oneDNN whatever its size or rows (the rule in cpu.py switched off)."""
    for lin in layers:
        lin.__class__, lin.min_rows = PackedLinear, 1
    return layers


def best_ms(layers: list[nn.Linear], xs: dict[int, torch.Tensor], inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        for lin in layers:
            lin(xs[lin.in_features])
    return (time.perf_counter() - t0) / inner * 1e3


def compare(variants: dict[str, list[nn.Linear]], rows: int, reps: int, inner: int) -> dict[str, float]:
    xs = {n: torch.randn(rows, n) for n in {lin.in_features for lin in next(iter(variants.values()))}}
    best = {k: float("inf") for k in variants}
    for k, layers in variants.items():
        best_ms(layers, xs, 2)  # warm-up; packs the oneDNN weights once
    for _ in range(reps):  # interleaved: every variant sees the same machine load
        for k, layers in variants.items():
            best[k] = min(best[k], best_ms(layers, xs, inner))
    return best


@torch.inference_mode()
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depths", default="4,8", help="model depths whose Linear shapes to time (default 4,8)")
    ap.add_argument("--rows", default="1,2,4,8,16,32", help="row counts (batch x new tokens)")
    ap.add_argument("--vocab", type=int, default=4096, help="lm_head size (default 4096, the quickstart's)")
    ap.add_argument("--reps", type=int, default=7, help="best of this many timings (default 7)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows_list = [int(r) for r in args.rows.split(",")]
    depths = [int(d) for d in args.depths.split(",")]
    print(f"threads {torch.get_num_threads()}, best of {args.reps}")

    print("\nTable 1: one call, MKL time / oneDNN time (above 1 = oneDNN faster); * = picochat uses oneDNN")
    print(f"{'weight':>10} " + " ".join(f"{'rows ' + str(r):>8}" for r in rows_list))
    shapes, by_shape = [], []
    for d in depths:
        for lin in linears(d, args.vocab):
            if (lin.out_features, lin.in_features) not in shapes:
                shapes.append((lin.out_features, lin.in_features))
    for n_out, n_in in shapes:
        torch.manual_seed(0)
        mkl = nn.Linear(n_in, n_out, bias=False)
        dnn = all_onednn([nn.Linear(n_in, n_out, bias=False)])[0]
        mix = pack_linears(nn.Sequential(nn.Linear(n_in, n_out, bias=False)))[0]
        cells = []
        for r in rows_list:
            t = compare({"mkl": [mkl], "onednn": [dnn]}, r, args.reps, 50)
            used = type(mix) is PackedLinear and r >= mix.min_rows
            by_shape.append(dict(weight=f"{n_out}x{n_in}", rows=r, mkl_over_onednn=round(t["mkl"] / t["onednn"], 2),
                                 picochat_uses_onednn=used))
            cells.append(f"{t['mkl'] / t['onednn']:>7.2f}{'*' if used else ' '}")
        print(f"{n_out:>5}x{n_in:<4} " + " ".join(cells))

    print("\nTable 2: all Linear layers of one decode step, ms")
    print(f"{'depth':>5} {'rows':>5} {'MKL':>8} {'oneDNN':>8} {'picochat':>9} {'picochat vs MKL':>16}")
    per_step = []
    for d in depths:
        variants = dict(mkl=linears(d, args.vocab), onednn=all_onednn(linears(d, args.vocab)),
                        picochat=list(pack_linears(nn.ModuleList(linears(d, args.vocab)))))
        for r in rows_list:
            t = compare(variants, r, args.reps, 5)
            per_step.append(dict(depth=d, rows=r, **{f"{k}_ms": round(v, 3) for k, v in t.items()},
                                 speedup=round(t["mkl"] / t["picochat"], 2)))
            print(f"{d:>5} {r:>5} {t['mkl']:>8.2f} {t['onednn']:>8.2f} {t['picochat']:>9.2f} "
                  f"{t['mkl'] / t['picochat']:>15.2f}x")
    print(json.dumps(dict(benchmark="cpu_linear", threads=torch.get_num_threads(), by_shape=by_shape,
                          per_step=per_step)))


if __name__ == "__main__":
    main()
