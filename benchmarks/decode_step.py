"""Eager decoding vs the static decode step under torch.compile (CUDA graphs on CUDA), side by side.

    python benchmarks/decode_step.py                         # random d4 on CPU: batch 1 and 32
    python benchmarks/decode_step.py --device cuda --depth 12 --dtype bf16 --batch 1,8,32

Same model, same prompts, greedy; the compiled step is warmed up first (its compile time is
reported apart), then eager and compiled generations alternate `--reps` times and the best of each
is kept. Tokens must be identical (fp32; in bf16 the two kernels may round differently and the
table says how many rows agree). Prints a table and a final JSON line with the ratios.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from picochat.device import pick_device, resolve_dtype
from picochat.inference.engine import Engine
from picochat.inference.sampling import Sampling
from picochat.model.config import config_from_depth
from picochat.model.gpt import GPT


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(engine, prompts, n, device) -> tuple[float, list[list[int]]]:
    sync(device)
    t0 = time.perf_counter()
    out = engine.generate(prompts, n, Sampling(0.0), stop_tokens=set())
    sync(device)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depth", type=int, default=4, help="model depth (random weights; default %(default)s)")
    ap.add_argument("--model", default=None, help="a checkpoint tag instead of a random model")
    ap.add_argument("--vocab", type=int, default=4096, help="vocabulary of the random model (default %(default)s)")
    ap.add_argument("--batch", default="1,32", help="comma-separated batch sizes (default %(default)s)")
    ap.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per row (default %(default)s)")
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated per row (default %(default)s)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions of each, alternating (default %(default)s)")
    ap.add_argument("--device", default="auto", help="auto|cpu|cuda (default %(default)s)")
    ap.add_argument("--dtype", default="auto", help="auto|fp32|bf16|fp16 (default %(default)s)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 = torch's default")
    ap.add_argument("--fast", default="auto", choices=["auto", "compiled", "cuda-graphs", "eager"],
                    help="the step compared with eager: auto = cuda-graphs on CUDA, compiled elsewhere; eager only "
                         "checks the script (default %(default)s)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.model:
        from picochat.checkpoint import load_model
        model, _ = load_model(args.model, device=device, dtype=dtype)
    else:
        torch.manual_seed(0)
        model = GPT(config_from_depth(args.depth, args.vocab, 1024)).to(device)
        model.init_weights()
        for p in model.parameters():  # trained-like, not the zero-initialised heads
            torch.nn.init.normal_(p, std=0.05)
        model.to(dtype)
        model.reset_rotary(device)
        model.eval()
    fast_mode = args.fast if args.fast != "auto" else "cuda-graphs" if device.type == "cuda" else "compiled"
    eager, fast = Engine(model, decode_step="eager"), Engine(model, decode_step=fast_mode)
    V = model.config.vocab_size
    rows = []
    for B in (int(b) for b in args.batch.split(",")):
        g = torch.Generator().manual_seed(B)
        prompts = torch.randint(0, V, (B, args.prompt_len), generator=g).tolist()
        t0 = time.perf_counter()
        timed(fast, prompts, args.tokens, device)  # compiles (once per batch shape)
        compile_s = time.perf_counter() - t0
        best = {"eager": float("inf"), "fast": float("inf")}
        outs = {}
        for _ in range(args.reps):
            for name, eng in (("eager", eager), ("fast", fast)):
                dt, outs[name] = timed(eng, prompts, args.tokens, device)
                best[name] = min(best[name], dt)
        same = sum(a == b for a, b in zip(outs["eager"], outs["fast"]))
        n_tok = B * args.tokens
        rows.append({"batch": B, "eager_tok_s": round(n_tok / best["eager"], 1),
                     "fast_tok_s": round(n_tok / best["fast"], 1),
                     "ratio": round(best["eager"] / best["fast"], 3), "first_call_s": round(compile_s, 1),
                     "rows_identical": f"{same}/{B}"})
    print(f"{model.num_params() / 1e6:.1f}M params on {device}, {str(dtype).removeprefix('torch.')}, "
          f"{args.prompt_len}-token prompts, {args.tokens} new tokens, best of {args.reps}; fast = {fast_mode}")
    print(f"{'batch':>5} {'eager tok/s':>12} {'fast tok/s':>11} {'ratio':>6} {'first call s':>13} {'identical':>10}")
    for r in rows:
        print(f"{r['batch']:>5} {r['eager_tok_s']:>12,.1f} {r['fast_tok_s']:>11,.1f} {r['ratio']:>6.2f} "
              f"{r['first_call_s']:>13.1f} {r['rows_identical']:>10}")
    print(json.dumps({"device": str(device), "dtype": str(dtype), "fast": fast_mode, "rows": rows}))


if __name__ == "__main__":
    main()
