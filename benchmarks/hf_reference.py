"""Outside reference: the batched workload through HF transformers generate() vs picochat's Engine.

    pip install transformers        # a benchmark-only dependency
    python benchmarks/hf_reference.py [--model base/d4] [--batch-sizes 1,8,32]

HF side: a Llama-architecture model of about the same size as picochat d4 with random weights
(LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=2, intermediate_size=1024,
vocab_size=4096): rotary, RMSNorm, SwiGLU; 6.3M params vs picochat d4's 5.2M -- its MLP has three
matrices instead of two), left padding with an attention mask, exactly --new-tokens new tokens
(min_new_tokens = max_new_tokens), its static KV cache off/on as HF chooses by default.
picochat side: Engine.generate on the same prompts (same lengths), stop tokens off. Both sample
with the same temperature (or are greedy with --temperature 0). The two run interleaved, best of
--reps. Prints a table and a final JSON line.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from batched_generation import load_or_random, make_prompts
from picochat.inference.engine import Engine


def hf_model(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=2, intermediate_size=1024,
                      vocab_size=vocab, max_position_embeddings=2048, pad_token_id=0, bos_token_id=0,
                      eos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def hf_generate(model, prompts, new_tokens, temperature):
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(do_sample=True, temperature=temperature, top_k=0) if temperature > 0 else dict(do_sample=False)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=0, **kw)
    assert out.shape == (len(prompts), L + new_tokens)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="picochat checkpoint tag (default: random d4)")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--min-prompt", type=int, default=4)
    ap.add_argument("--max-prompt", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    ours = load_or_random(args.model, args.depth)
    engine = Engine(ours)
    V = ours.config.vocab_size
    hf = hf_model(V)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    prompts_all = make_prompts(max(sizes), V, args.min_prompt, args.max_prompt, args.seed)
    hf_generate(hf, prompts_all[:2], 8, args.temperature)  # warm-up both
    engine.generate(prompts_all[:2], 8, temperature=args.temperature, stop_tokens=set())
    print(f"transformers {transformers.__version__}: Llama {sum(p.numel() for p in hf.parameters()) / 1e6:.1f}M params; "
          f"picochat {args.model or f'random d{args.depth}'} {ours.num_params() / 1e6:.1f}M params; "
          f"{args.new_tokens} new tokens, temperature {args.temperature}, threads {torch.get_num_threads()}")
    print(f"{'batch':>5} {'HF tok/s':>9} {'picochat tok/s':>14} {'picochat / HF':>13}")
    rows = []
    for B in sizes:
        prompts = prompts_all[:B]
        t_hf = t_pc = float("inf")
        for _ in range(args.reps):
            t0 = time.perf_counter()
            hf_generate(hf, prompts, args.new_tokens, args.temperature)
            t_hf = min(t_hf, time.perf_counter() - t0)
            t0 = time.perf_counter()
            engine.generate(prompts, args.new_tokens, temperature=args.temperature, seed=args.seed, stop_tokens=set())
            t_pc = min(t_pc, time.perf_counter() - t0)
        n = B * args.new_tokens
        r = dict(batch=B, hf_tok_s=round(n / t_hf, 1), picochat_tok_s=round(n / t_pc, 1), ratio=round(t_hf / t_pc, 2))
        rows.append(r)
        print(f"{B:>5} {r['hf_tok_s']:>9.0f} {r['picochat_tok_s']:>14.0f} {r['ratio']:>12.2f}x")
    print(json.dumps(dict(benchmark="hf_reference", transformers=transformers.__version__, new_tokens=args.new_tokens,
                          temperature=args.temperature, threads=torch.get_num_threads(), rows=rows)))


if __name__ == "__main__":
    main()
