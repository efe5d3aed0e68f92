"""RL rollout speed: P different prompts x K samples in one batched engine call, against sampling
each prompt's K samples separately (P calls of K rows), and optionally one row at a time.

    python benchmarks/rl_rollouts.py --model sft/d4                      # quickstart model, arithmetic prompts
    python benchmarks/rl_rollouts.py --model sft/d4 --prompts 16 --samples 8 --serial

Every mode generates the same rows through eval/generate.py's tool rounds (calculator calls run,
as in `picochat train rl`), each row with its own seed, so the replies must be identical across
modes (up to float rounding in batched matmuls: the JSON line counts rows that differ). Modes are
interleaved --reps times and each keeps its best time (the machine may be shared: compare ratios).
Prints a table and a final JSON line.
"""
from __future__ import annotations

import argparse
import json
import time

from picochat.common import apply_threads
from picochat.eval.generate import generate_replies
from picochat.inference.sampling import Sampling
from picochat.train.rl import row_seed


def rollout_prompts(tok, task_names: list[str], n: int) -> list[list[int]]:
    from picochat.train.rewards import load_reward_tasks
    tasks = load_reward_tasks(task_names, {}, n)
    picks = [(tasks[i % len(tasks)], i // len(tasks)) for i in range(n)]  # the tasks in turn
    return [tok.render_for_completion({"messages": t.chat_prompt(t.examples[j])}) for t, j in picks]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="sft/d4", help="chat checkpoint tag (default sft/d4)")
    ap.add_argument("--tasks", default="arithmetic", help="prompt sources, comma-separated (default arithmetic)")
    ap.add_argument("--prompts", type=int, default=8, help="P different prompts (default 8)")
    ap.add_argument("--samples", type=int, default=8, help="K samples per prompt (default 8)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--serial", action="store_true", help="also time one row at a time (slow)")
    ap.add_argument("--reps", type=int, default=3, help="best of this many runs per mode (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    from picochat.checkpoint import load_model, load_tokenizer
    from picochat.inference.engine import Engine
    model, _ = load_model(args.model)
    tok = load_tokenizer(args.model)
    engine = Engine(model, tok)
    P, K = args.prompts, args.samples
    base = rollout_prompts(tok, args.tasks.split(","), P)
    prompts = [p for p in base for _ in range(K)]
    seeds = [row_seed(0, 0, p, k) for p in range(P) for k in range(K)]

    def run(groups: list[list[int]]):
        """Generate the rows in `groups` (lists of row indices), one engine call per group."""
        out = [None] * len(prompts)
        t0 = time.perf_counter()
        for rows in groups:
            replies = generate_replies(engine, tok, [prompts[i] for i in rows], args.max_new_tokens,
                                       Sampling(args.temperature, seed=[seeds[i] for i in rows]))
            for i, r in zip(rows, replies):
                out[i] = r
        return time.perf_counter() - t0, out

    modes = {"batched (P x K in one call)": [list(range(P * K))],
             "per prompt (P calls of K)": [list(range(p * K, (p + 1) * K)) for p in range(P)]}
    if args.serial:
        modes["serial (P x K calls of 1)"] = [[i] for i in range(P * K)]
    run(modes["batched (P x K in one call)"])  # warm-up: allocator, oneDNN packing
    best, outs = {}, {}
    for _ in range(args.reps):
        for name, groups in modes.items():
            dt, out = run(groups)
            best[name] = min(best.get(name, dt), dt)
            outs[name] = out
    tokens = sum(r.tokens for r in outs["batched (P x K in one call)"])
    ref = [r.parts for r in outs["batched (P x K in one call)"]]
    print(f"{args.model}: P={P} prompts x K={K} samples, {tokens} generated tokens, T={args.temperature}")
    print(f"{'mode':<30} {'seconds':>8} {'tok/s':>9} {'speed-up':>9} {'rows differing':>15}")
    slow = best["per prompt (P calls of K)"]
    result = {"model": args.model, "P": P, "K": K, "tokens": tokens, "modes": {}}
    for name, dt in best.items():
        differ = sum(r.parts != p for r, p in zip(outs[name], ref))
        print(f"{name:<30} {dt:8.2f} {tokens / dt:9.0f} {slow / dt:8.2f}x {differ:15d}")
        result["modes"][name] = {"seconds": dt, "tok_per_s": tokens / dt, "rows_differing": differ}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
