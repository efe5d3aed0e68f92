"""Plain vs speculative decoding (batch 1) for a draft/target pair, at temperature 0 and 1.

    python benchmarks/speculative.py --draft draft/d2 --target base/d8    # a trained pair
                                    # (a distilled draft: `picochat data distill`, docs/inference.md)
    python benchmarks/speculative.py                                       # random d2 / d8 (runs anywhere)

Plain = Engine.generate([prompt]) on the target; speculative = generate_speculative(target, draft,
prompt) with adaptive γ (and, with --fixed-gamma 4 or 2,3,4,5, also fixed γ for comparison). Rows:
- the given pair at each temperature;
- "worst case": the same target with an untrained (random-weight) draft of the draft's shape,
  where speculation can only lose and adaptive γ has to fall back to plain decoding.
Prompts are lines of Shakespeare encoded with the tokenizer when one exists under $PICOCHAT_HOME,
else random token ids. Each cell is the best of --reps runs, plain and speculative interleaved.
Prints a table and a final JSON line.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from batched_generation import load_or_random, make_prompts
from picochat.inference.engine import Engine
from picochat.inference.sampling import Sampling
from picochat.inference.speculative import GammaController, generate_speculative

TEXTS = ["ROMEO:\nBut soft, what light through yonder window breaks?", "First Citizen:\nBefore we proceed any further,",
         "KING RICHARD III:\nNow is the winter of our discontent", "JULIET:\nO Romeo, Romeo! wherefore art thou"]


def load_prompts(vocab: int, n: int, seed: int) -> tuple[list[list[int]], str]:
    try:
        from picochat.common import tokenizer_dir
        from picochat.tokenizer import Tokenizer
        tok = Tokenizer.load(tokenizer_dir())
        if tok.vocab_size == vocab:
            return [tok.encode(t, prepend=tok.bos_token_id) for t in TEXTS[:n]], "shakespeare"
    except Exception:  # no tokenizer yet (or another vocabulary): random ids measure the same code
        pass
    return make_prompts(n, vocab, 8, 32, seed), "random ids"


def measure(target, draft, prompts, new_tokens, temperature, reps, seed, gamma, adaptive):
    engine = Engine(target)
    # one controller for all calls, as a long-lived decoder would keep it: the measured forward
    # times and the acceptance estimate carry over instead of being re-learned per request
    ctrl = GammaController(gamma, max(8, gamma), adaptive)
    t_plain = t_spec = 0.0
    agg = dict(tokens=0, drafted=0, accepted=0, rejected=0, row_forwards=0, gammas=[])
    same = True
    for i, p in enumerate(prompts):
        bp = bs = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            sampling = Sampling(temperature, seed=seed + i)
            ref = engine.generate([p], new_tokens, sampling, stop_tokens=set())[0]
            bp = min(bp, time.perf_counter() - t0)
            t0 = time.perf_counter()
            out, st = generate_speculative(target, draft, p, new_tokens, sampling, controller=ctrl)
            bs = min(bs, time.perf_counter() - t0)
        same &= temperature > 0 or out == ref
        t_plain, t_spec = t_plain + bp, t_spec + bs
        for k in ("tokens", "drafted", "accepted", "rejected", "row_forwards"):
            agg[k] += getattr(st, k)
        agg["gammas"] += st.gammas
    n = len(prompts) * new_tokens
    return dict(plain_tok_s=round(n / t_plain, 1), spec_tok_s=round(n / t_spec, 1), speedup=round(t_plain / t_spec, 3),
                acceptance=round(agg["accepted"] / max(1, agg["drafted"]), 3),
                alpha=round(agg["accepted"] / max(1, agg["accepted"] + agg["rejected"]), 3),
                tokens_per_target_forward=round(agg["tokens"] / agg["row_forwards"], 2),
                mean_gamma=round(sum(agg["gammas"]) / len(agg["gammas"]), 2),
                plain_rounds=sum(g == 0 for g in agg["gammas"]), rounds=len(agg["gammas"]),
                greedy_identical=same if temperature == 0 else None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--draft", default=None,
                    help="draft checkpoint tag(s), comma-separated (default: random weights, --draft-depth)")
    ap.add_argument("--target", default=None, help="target checkpoint tag (default: random weights, --target-depth)")
    ap.add_argument("--draft-depth", type=int, default=2)
    ap.add_argument("--target-depth", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--temperatures", default="0,1")
    ap.add_argument("--gamma", type=int, default=4, help="starting γ (adaptive) (default 4)")
    ap.add_argument("--fixed-gamma", default="0",
                    help="also measure this fixed γ, or several: 2,3,4,5 (a γ sweep) (default: skip)")
    ap.add_argument("--no-worst-case", action="store_true", help="skip the untrained-draft rows")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        fixed = [g for g in (int(x) for x in args.fixed_gamma.split(",")) if g > 0]
    except ValueError:
        ap.error(f"--fixed-gamma: integers, comma-separated, got {args.fixed_gamma!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    target = load_or_random(args.target, args.target_depth, seed=1)
    V = target.config.vocab_size
    tags = args.draft.split(",") if args.draft else [None]
    pairs = [(tag or f"random d{args.draft_depth}",
              load_or_random(tag, args.draft_depth, vocab=V, seed=2)) for tag in tags]
    if not args.no_worst_case:  # an untrained draft of the first draft's shape: speculation can only lose
        pairs.append(("untrained", load_or_random(None, pairs[0][1].config.n_layer, V, seed=3)))
    prompts, source = load_prompts(V, args.prompts, args.seed)
    print(f"target {args.target or f'random d{args.target_depth}'} ({target.num_params() / 1e6:.1f}M params); drafts "
          + ", ".join(f"{n} ({d.num_params() / 1e6:.1f}M)" for n, d in pairs)
          + f"; {len(prompts)} prompts ({source}), {args.new_tokens} new tokens, batch 1, threads {torch.get_num_threads()}")
    print(f"{'draft':>16} {'temp':>4} {'γ':>8} {'plain tok/s':>11} {'spec tok/s':>10} {'speedup':>8} {'accept':>6} "
          f"{'alpha':>5} {'tok/fwd':>7} {'mean γ':>6} {'plain rounds':>12}")
    generate_speculative(target, pairs[0][1], prompts[0], 8, Sampling(0.0))  # warm-up
    results = []
    for name, d in pairs:
        for temp in [float(t) for t in args.temperatures.split(",")]:
            modes = [("adaptive", args.gamma, True)] + [("fixed", g, False) for g in fixed]
            for mode, g, adaptive in modes:
                r = measure(target, d, prompts, args.new_tokens, temp, args.reps, args.seed, g, adaptive)
                r = dict(draft=name, temperature=temp, gamma=f"fixed {g}" if mode == "fixed" else "adaptive", **r)
                results.append(r)
                print(f"{name:>16} {temp:>4} {r['gamma']:>8} {r['plain_tok_s']:>11.1f} {r['spec_tok_s']:>10.1f} "
                      f"{r['speedup']:>7.2f}x {r['acceptance']:>6.2f} {r['alpha']:>5.2f} "
                      f"{r['tokens_per_target_forward']:>7.2f} {r['mean_gamma']:>6.2f} {r['plain_rounds']:>5}/{r['rounds']:<6}")
    if any(r["greedy_identical"] is False for r in results):
        print("WARNING: a greedy speculative output differed from plain greedy decoding")
    print(json.dumps(dict(benchmark="speculative", target=args.target or f"random-d{args.target_depth}",
                          drafts=[n for n, _ in pairs], prompts=source,
                          new_tokens=args.new_tokens, threads=torch.get_num_threads(), rows=results)))


if __name__ == "__main__":
    main()
