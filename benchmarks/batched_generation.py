"""Serial vs batched generation: tokens/s for batch sizes 1..32 with mixed prompt lengths.

    python benchmarks/batched_generation.py                       # random-weight d4 (runs anywhere)
    python benchmarks/batched_generation.py --model base/d4       # a checkpoint tag
    python benchmarks/batched_generation.py --compare             # also without the CPU tuning, same run
    python benchmarks/batched_generation.py --prefill-chunks 1    # one padded prefill (before chunking)
    python benchmarks/batched_generation.py --tuning onednn --batch-sizes 1,32 --reps 5   # one CPU knob alone

For each batch size B the same B prompts (random ids, lengths uniform in [4, 64]) are generated
(a) one at a time ("serial": B calls of Engine.generate([p])) and (b) as one batch, each for
--new-tokens tokens with stop tokens disabled, so both do the same work. Rows are seeded per row
(seed + i), so serial and batched outputs must be identical; the JSON line says whether they were.
Serial and batched runs are interleaved --reps times; the serial time is the sum of each prompt's
best time, the batched time the best batched run (the machine is shared: compare ratios, not
absolute numbers across runs). Prints a table and a final JSON line.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

from picochat.inference.cpu import pack_linears, retain_freed_memory
from picochat.inference.engine import Engine
from picochat.inference.sampling import Sampling
from picochat.model.config import config_from_depth
from picochat.model.gpt import GPT


def load_or_random(tag: str | None, depth: int, vocab: int = 4096, seed: int = 0, device="cpu") -> GPT:
    """The checkpoint `tag`, or a random-weight model of `depth` (all weights random so the
    logits are not degenerate: init_weights alone zeroes the output projections)."""
    if tag:
        from picochat.checkpoint import load_model
        return load_model(tag, device=device)[0]
    torch.manual_seed(seed)
    model = GPT(config_from_depth(depth, vocab_size=vocab, sequence_len=1024)).to(device)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and p.abs().max() == 0:
                torch.nn.init.normal_(p, std=0.02)
    return model.eval()


def make_prompts(n: int, vocab: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint tag (default: random weights)")
    ap.add_argument("--depth", type=int, default=4, help="depth of the random-weight model (default 4)")
    ap.add_argument("--batch-sizes", default="1,4,8,16,32")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--min-prompt", type=int, default=4)
    ap.add_argument("--max-prompt", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--reps", type=int, default=2, help="best of this many runs per measurement (default 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--compare", action="store_true",
                    help="first run the whole table with Engine(cpu_tuning=False) (MKL matmuls, glibc's "
                         "default allocator behaviour), then with the default tuning, in this one process")
    ap.add_argument("--prefill-chunks", type=int, default=4,
                    help="Engine.prefill_chunks: mixed-length prompts prefilled in up to this many length-sorted "
                         "chunks; 1 = one prefill padded to the longest prompt (default 4, the Engine's)")
    ap.add_argument("--tuning", choices=["both", "none", "onednn", "allocator"], default=None,
                    help="run the table with only this CPU tuning: both (the default Engine), none "
                         "(cpu_tuning=False), onednn (packed Linear layers only), allocator (glibc keeps freed "
                         "memory only); one setting per process, since the allocator setting is process-wide. "
                         "Decode step ms = 1000 x batch / 'decode tok/s'")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.tuning and args.compare:
        ap.error("--tuning and --compare are exclusive")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_or_random(args.model, args.depth)
    V = model.config.vocab_size
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    prompts_all = make_prompts(max(sizes), V, args.min_prompt, args.max_prompt, args.seed)
    kw = dict(stop_tokens=set())
    sampling = Sampling(args.temperature, args.top_k)
    print(f"model: {args.model or f'random d{args.depth}'} ({model.num_params() / 1e6:.1f}M params), "
          f"{args.new_tokens} new tokens, prompts {args.min_prompt}-{args.max_prompt}, "
          f"temperature {args.temperature}, threads {torch.get_num_threads()}")
    runs, identical = {}, True
    # untuned first: the allocator setting is process-wide and cannot be taken back
    for tuned in ([False, True] if args.compare else [True]):
        engine = Engine(model, cpu_tuning=tuned if args.tuning is None else args.tuning == "both")
        engine.prefill_chunks = args.prefill_chunks
        if args.tuning == "onednn":
            pack_linears(model)
        elif args.tuning == "allocator":
            retain_freed_memory()
        engine.generate(prompts_all[:2], 8, sampling, **kw)  # warm-up (allocator, first-call overheads)
        name = "cpu_tuning" if tuned else "untuned"
        desc = ("oneDNN-packed large weights, allocator keeps freed memory (cpu.py)" if tuned
                else "Engine(cpu_tuning=False): MKL for every matmul, default allocator")
        if args.tuning:
            desc = {"both": desc, "none": "Engine(cpu_tuning=False): MKL for every matmul, default allocator",
                    "onednn": "oneDNN-packed large weights only, default allocator",
                    "allocator": "MKL for every matmul, allocator keeps freed memory only"}[args.tuning]
            desc += f" (--tuning {args.tuning})"
        if args.prefill_chunks != 4:
            desc += f", prefill in up to {args.prefill_chunks} chunk(s)"
        print(f"\n{name}: {desc}")
        print(f"{'batch':>5} {'serial tok/s':>12} {'batched tok/s':>13} {'speedup':>8} {'decode tok/s':>12} "
              f"{'prefill ms':>10} {'KV MB':>7}")
        rows = runs[name] = []
        for B in sizes:
            prompts = prompts_all[:B]
            seeds = [args.seed + i for i in range(B)]
            # serial time = the sum over prompts of each prompt's best time, so a burst of load from
            # other jobs spoils one prompt's measurement, not the whole serial pass
            best_prompt, best_batched = [float("inf")] * B, float("inf")
            for _ in range(args.reps):
                serial = []
                for i, (p, s) in enumerate(zip(prompts, seeds)):
                    t0 = time.perf_counter()
                    serial.append(engine.generate([p], args.new_tokens, replace(sampling, seed=[s]), **kw)[0])
                    best_prompt[i] = min(best_prompt[i], time.perf_counter() - t0)
                t0 = time.perf_counter()
                batched = engine.generate(prompts, args.new_tokens, replace(sampling, seed=seeds), **kw)
                best_batched = min(best_batched, time.perf_counter() - t0)
                st = engine.last_stats
            best_serial = sum(best_prompt)
            identical &= serial == batched
            ntok = B * args.new_tokens
            r = dict(batch=B, serial_tok_s=round(ntok / best_serial, 1), batched_tok_s=round(ntok / best_batched, 1),
                     speedup=round(best_serial / best_batched, 2),
                     decode_tok_s=round(B * (args.new_tokens - 1) / st["decode_s"], 1),
                     prefill_ms=round(st["prefill_s"] * 1e3, 1), kv_cache_mb=round(st["kv_cache_bytes"] / 2 ** 20, 2))
            rows.append(r)
            print(f"{B:>5} {r['serial_tok_s']:>12.0f} {r['batched_tok_s']:>13.0f} {r['speedup']:>7.2f}x "
                  f"{r['decode_tok_s']:>12.0f} {r['prefill_ms']:>10.1f} {r['kv_cache_mb']:>7.2f}")
    print(f"KV cache: {engine.kv_bytes_per_token()} bytes per token per row "
          f"({model.kv_values_per_token()} values x {next(model.parameters()).element_size()} bytes), "
          f"allocated once per batch; serial == batched outputs: {identical}")
    print(json.dumps(dict(benchmark="batched_generation", model=args.model or f"random-d{args.depth}",
                          new_tokens=args.new_tokens, threads=torch.get_num_threads(),
                          kv_bytes_per_token=engine.kv_bytes_per_token(), outputs_identical=identical,
                          rows=runs["cpu_tuning"], **({"untuned_rows": runs["untuned"]} if args.compare else {}),
                          **({"tuning": args.tuning} if args.tuning else {}),
                          **({"prefill_chunks": args.prefill_chunks} if args.prefill_chunks != 4 else {}))))


if __name__ == "__main__":
    main()
