"""picochat's Engine against nanochat's own Engine: the same weights, the same greedy decode, side by side.

    python benchmarks/vs_nanochat.py --nanochat /path/to/nanochat --depths 4,12,20

PATH is a checkout of karpathy/nanochat (its 2026 design, e.g. 92d63d4): the script imports its
`nanochat.gpt` and `nanochat.engine` as they are. Per depth it builds nanochat's GPT (vocabulary
32,768, context 2,048, window pattern SSSL, nanochat's own init_weights, then every weight given
random noise so nothing is degenerate), hands the same state_dict to picochat's nanochat import
(`nanochat_config` + `build_model`), and times a batch-1 greedy generation of --new-tokens after a
--prompt-len prompt with each: nanochat (its compute dtype), picochat fp32, and picochat with each
--quant. TPOT = (total - time to first token) / (tokens - 1); best of --reps; the first tokens of
the two fp32 runs must agree. Prints a table and a final JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path


class FakeTokenizer:
    """What nanochat's Engine asks a tokenizer for: special-token ids (never generated here) and BOS."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def encode_special(self, s: str) -> int:
        return self.vocab - 1 - hash(s) % 8

    def get_bos_token_id(self) -> int:
        return self.vocab - 9


def time_nanochat(engine, prompt, n) -> tuple[float, float, list[int]]:
    t0 = time.perf_counter()
    first, out = None, []
    for column, _ in engine.generate(prompt, num_samples=1, max_tokens=n, temperature=0.0):
        first = first or time.perf_counter() - t0
        out.append(column[0])
    total = time.perf_counter() - t0
    return first, (total - first) / max(1, len(out) - 1), out


def time_picochat(engine, prompt, n) -> tuple[float, float, list[int]]:
    from picochat.inference.sampling import Sampling
    out = engine.generate([prompt], n, Sampling(0.0), stop_tokens=set())[0]
    s = engine.last_stats
    return s["prefill_s"], s["decode_s"] / max(1, s["decode_steps"]), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nanochat", required=True, help="a checkout of karpathy/nanochat (2026 design)")
    ap.add_argument("--depths", default="4,12,20", help="comma-separated depths (default %(default)s)")
    ap.add_argument("--quant", default="int8", help="picochat --quant modes to add (default %(default)s)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(args.nanochat).resolve()))
    import torch
    from nanochat.engine import Engine as NanoEngine
    from nanochat.gpt import GPT as NanoGPT, GPTConfig as NanoConfig

    import picochat.checkpoint as ck
    from picochat.export.nanochat import nanochat_config
    from picochat.inference.engine import Engine
    from picochat.inference.quant import quantize
    if args.threads:
        torch.set_num_threads(args.threads)
    V, rows = 32768, []
    for depth in map(int, args.depths.split(",")):
        n_embd = 64 * depth
        heads = max(1, n_embd // 128)
        cfg = NanoConfig(sequence_len=2048, vocab_size=V, n_layer=depth, n_head=heads, n_kv_head=heads,
                         n_embd=n_embd, window_pattern="SSSL")
        torch.manual_seed(0)
        with torch.device("meta"):
            nano = NanoGPT(cfg)
        nano.to_empty(device="cpu")
        nano.init_weights()
        with torch.no_grad():
            for p in nano.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        nano.eval()
        state = {k: v.detach().clone() for k, v in nano.state_dict().items()}
        config, _ = nanochat_config({"model_config": asdict(cfg)}, state, Path("random"))
        pico = ck.build_model(config, state, "nanochat weights do not fit")
        prompt = torch.randint(0, V - 16, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
        engines = {"nanochat": (NanoEngine(nano, FakeTokenizer(V)), time_nanochat),
                   "picochat fp32": (Engine(pico), time_picochat)}
        for q in [m for m in args.quant.split(",") if m and m != "none"]:
            engines[f"picochat {q}"] = (Engine(quantize(ck.build_model(config, state, "x"), q)), time_picochat)
        with torch.inference_mode():
            best = {}
            for name, (eng, fn) in engines.items():
                fn(eng, prompt, 4)  # warm-up
            for _ in range(args.reps):  # interleaved, so a busy moment hurts every engine alike
                for name, (eng, fn) in engines.items():
                    ttft, tpot, out = fn(eng, prompt, args.new_tokens)
                    if name not in best or tpot < best[name][1]:
                        best[name] = (ttft, tpot, out)
        agree = sum(a == b for a, b in zip(best["nanochat"][2], best["picochat fp32"][2]))
        for name, (ttft, tpot, _) in best.items():
            rows.append(dict(depth=depth, engine=name, ttft_ms=1e3 * ttft, tpot_ms=1e3 * tpot, tokens_per_s=1 / tpot,
                             vs_nanochat=best["nanochat"][1] / tpot, first_tokens_agree=agree))
        print(f"d{depth}: " + ", ".join(f"{r['engine']} {r['tokens_per_s']:.1f} tok/s" for r in rows[-len(best):]),
              file=sys.stderr, flush=True)
    print(f"{'depth':>5} {'engine':<16} {'TTFT ms':>8} {'TPOT ms':>8} {'tok/s':>8} {'x nanochat':>10} {'fp32 tokens agree':>17}")
    for r in rows:
        print(f"{r['depth']:>5} {r['engine']:<16} {r['ttft_ms']:8.1f} {r['tpot_ms']:8.2f} {r['tokens_per_s']:8.1f} "
              f"{r['vs_nanochat']:9.2f}x {r['first_tokens_agree']:>10}/{args.new_tokens}")
    print(json.dumps({"bench": "vs_nanochat", "threads": torch.get_num_threads(), "prompt_len": args.prompt_len,
                      "new_tokens": args.new_tokens, "rows": rows}))


if __name__ == "__main__":
    main()
