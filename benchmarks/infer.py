"""`picochat bench infer`: TTFT, TPOT, tokens/s, MBU and MFU per batch size, dtype, quantization and decode step.

    picochat bench infer --depth 20 --batch 1,8,32 --quant none,int8,int4      random d20, side by side
    picochat bench infer --model sft/d4 --dtype fp32,bf16                        a checkpoint
    picochat bench infer --depth 12 --arch nanochat-2026 --decode-step eager,compiled

Every configuration runs the same greedy generation (B prompts of --prompt-len tokens, --new-tokens
each, no early stop) after a warm-up; the best of --reps is kept. TTFT is the prefill (first token),
TPOT the mean decode step, tokens/s = B / TPOT.

MBU (model bandwidth utilisation) = the bytes one decode step must read / TPOT / the machine's read
bandwidth. The bytes: every weight that is streamed (linear layers at their stored size, quantized
or not; embedding tables only for the rows looked up), plus the KV cache read at the mean context.
The bandwidth is measured at start (a sum over a 1 GiB tensor, best of 5, with the threads decoding
uses), so MBU says how close decoding runs to what this machine can read. MFU = 2 x streamed
parameters x B + attention's 4 x layers x width x context x B FLOPs per step, over the matmul peak
measured for the arithmetic the configuration runs (fp32, bf16, or FBGEMM int8 for --quant int8;
int4 dequantizes to bf16). Prints a card and a final JSON line.
"""
from __future__ import annotations

import copy
import json
import platform
import resource
import time

DEFAULT_BATCHES = "1,8,32"


def add_parser(bench) -> None:
    from picochat.common import DECODE_STEPS, DTYPE_NAMES, QUANT_MODES, positive_int
    p = bench.add_parser("infer", help="TTFT, TPOT, tokens/s, MBU and MFU per batch size, dtype and --quant",
                         description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, metavar="TAG", help="a checkpoint to measure (unset: a random --depth model)")
    src.add_argument("--depth", type=positive_int, default=4, help="depth of the random model (default %(default)s)")
    p.add_argument("--arch", default="picochat", choices=("picochat", "nanochat-2026"),
                   help="design of the random model (default %(default)s)")
    p.add_argument("--vocab", type=positive_int, default=32768, help="vocabulary of the random model (default %(default)s)")
    p.add_argument("--batch", default=DEFAULT_BATCHES, help="comma-separated batch sizes (default %(default)s)")
    p.add_argument("--dtype", default="fp32", help=f"comma-separated, from {', '.join(DTYPE_NAMES)} (default %(default)s)")
    p.add_argument("--quant", default="none", help=f"comma-separated, from {', '.join(QUANT_MODES)} (default %(default)s)")
    p.add_argument("--decode-step", default="eager", help=f"comma-separated, from {', '.join(DECODE_STEPS[1:])} "
                   "(default %(default)s)")
    p.add_argument("--prompt-len", type=positive_int, default=64, help="tokens per prompt (default %(default)s)")
    p.add_argument("--new-tokens", type=positive_int, default=64, help="tokens generated per row (default %(default)s)")
    p.add_argument("--reps", type=positive_int, default=3, help="timed generations per cell; the best is kept "
                   "(default %(default)s)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda (default %(default)s)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: torch's, one per core)")
    p.add_argument("--out", help="also write the JSON result to this file")
    p.set_defaults(func=run)


def _list(spec: str, allowed, flag: str) -> list[str]:
    from picochat.common import PicochatError
    items = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise PicochatError(f"{flag} takes a comma-separated list from {', '.join(allowed)}, got {spec!r}")
    return items


def _batches(spec: str) -> list[int]:
    from picochat.common import PicochatError
    try:
        out = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise PicochatError(f"--batch takes comma-separated positive integers such as 1,8,32, got {spec!r}")
    return out


def sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def machine_peaks(device) -> dict:
    """Read bandwidth (bytes/s, a sum over 1 GiB) and matmul FLOP/s, measured here and now."""
    import torch
    x = torch.ones(1 << 28, device=device)  # 1 GiB of fp32
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        x.sum()
        sync(device)
        best = min(best, time.perf_counter() - t)
    del x
    n = 2048 if device.type == "cpu" else 8192
    peaks = {}
    for name in ("fp32", "bf16", "int8"):
        if name == "int8":  # what --quant int8 multiplies with: FBGEMM's dynamic linear (CPU only)
            if device.type != "cpu":
                continue
            from picochat.inference.quant import Int8Linear
            lin, a = Int8Linear(torch.randn(n, n)), torch.randn(n, n)
            fn = lambda: lin(a)  # noqa: E731
        else:
            a = torch.randn(n, n, device=device, dtype=torch.float32 if name == "fp32" else torch.bfloat16)
            fn = lambda: a @ a  # noqa: E731
        best_mm = float("inf")
        for _ in range(3):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            best_mm = min(best_mm, time.perf_counter() - t)
        peaks[name] = 2 * n ** 3 / best_mm
    return {"read_bytes_per_s": (1 << 30) / best, "matmul_flops_per_s": peaks}


def mfu_peak(peaks: dict, dtype: str, quant: str) -> float:
    """The matmul peak a configuration's arithmetic runs at: int8 for --quant int8, else its dtype's
    (int4 dequantizes to bf16 arithmetic)."""
    key = "int8" if quant == "int8" and "int8" in peaks else "bf16" if quant == "int4" or dtype != "fp32" else "fp32"
    return peaks.get(key, peaks["fp32"])


def step_cost(model, batch: int, context: float) -> tuple[float, float]:
    """(bytes read, FLOPs) of one decode step of `batch` rows at mean `context` (module docstring)."""
    from picochat.inference.quant import weight_bytes
    c = model.config
    tables = [model.transformer.wte] + (list(model.value_embeds.values()) if c.value_embeds else [])
    table_bytes = sum(t.weight.numel() * t.weight.element_size() for t in tables)
    rows_read = batch * sum(t.weight.size(1) * t.weight.element_size() for t in tables)
    kv = batch * context * model.kv_bytes_per_token()
    streamed_params = _streamed_params(model)
    flops = batch * (2 * streamed_params + 4 * c.n_layer * c.n_embd * context)
    return weight_bytes(model) - table_bytes + rows_read + kv, flops


def _streamed_params(model) -> int:
    import torch.nn as nn
    embeds = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    dense = sum(p.numel() for p in model.parameters() if id(p) not in embeds)
    quant = sum(m.in_features * m.out_features for m in model.modules() if hasattr(m, "nbytes"))
    return dense + quant


def random_model(args, device):
    import torch
    from picochat.model.config import config_from_depth
    from picochat.model.gpt import GPT
    torch.manual_seed(0)
    cfg = config_from_depth(args.depth, vocab_size=args.vocab, sequence_len=2048, arch=args.arch)
    with torch.device(device):
        model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():  # all random: zero-initialised projections would flatter int8
            p.normal_(std=0.02)
    return model.eval()


def measure(engine, batch: int, args, device) -> dict:
    import torch
    from picochat.inference.sampling import Sampling
    V = engine.model.config.vocab_size
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(1, V, (batch, args.prompt_len), generator=g).tolist()
    engine.generate(prompts, 2, Sampling(0.0), stop_tokens=set())  # warm-up: allocator, packing, compile
    best = None
    for _ in range(args.reps):
        sync(device)
        engine.generate(prompts, args.new_tokens, Sampling(0.0), stop_tokens=set())
        sync(device)
        s = dict(engine.last_stats)
        tpot = s["decode_s"] / max(1, s["decode_steps"])
        if best is None or tpot < best["tpot_s"]:
            best = {"ttft_s": s["prefill_s"], "tpot_s": tpot, "kv_cache_bytes": s["kv_cache_bytes"]}
        best["ttft_s"] = min(best["ttft_s"], s["prefill_s"])
    return best


def run(args) -> None:
    import torch

    from picochat.common import DECODE_STEPS, DTYPE_NAMES, QUANT_MODES, fmt_bytes, write_json_atomic
    from picochat.device import DTYPES, pick_device
    from picochat.inference.engine import Engine
    from picochat.inference.quant import load_for_inference, quantize, weight_bytes

    batches = _batches(args.batch)
    dtypes = _list(args.dtype, DTYPE_NAMES, "--dtype")
    quants = _list(args.quant, QUANT_MODES, "--quant")
    steps = _list(args.decode_step, DECODE_STEPS[1:], "--decode-step")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    peaks = machine_peaks(device)
    base = None if args.model else random_model(args, device)
    name = args.model or f"random d{args.depth} ({args.arch})"
    rows, ref = [], {}
    for dtype in dtypes:
        for quant in quants:
            if args.model:
                model, _ = load_for_inference(args.model, device, DTYPES[dtype], quant)
            else:
                model = quantize(copy.deepcopy(base).to(DTYPES[dtype]), quant)
            for step in steps:
                engine = Engine(model, None, decode_step=step)
                for B in batches:
                    r = measure(engine, B, args, device)
                    nbytes, flops = step_cost(model, B, args.prompt_len + args.new_tokens / 2)
                    label = f"{dtype}{'' if quant == 'none' else ' ' + quant}{'' if step == 'eager' else ' ' + step}"
                    row = dict(config=label, dtype=dtype, quant=quant, decode_step=step, batch=B,
                               weight_bytes=weight_bytes(model), ttft_ms=1e3 * r["ttft_s"], tpot_ms=1e3 * r["tpot_s"],
                               tokens_per_s=B / r["tpot_s"], step_bytes=nbytes,
                               mbu=nbytes / r["tpot_s"] / peaks["read_bytes_per_s"],
                               mfu=flops / r["tpot_s"] / mfu_peak(peaks["matmul_flops_per_s"], dtype, quant),
                               kv_cache_bytes=r["kv_cache_bytes"])
                    ref.setdefault(B, row["tokens_per_s"])
                    row["speedup"] = row["tokens_per_s"] / ref[B]
                    rows.append(row)
                    print(f"  {label:<22} batch {B:>3}: {row['tokens_per_s']:8.1f} tok/s  MBU {row['mbu']:.0%}", flush=True)
            del model
    cfg = (base.config if base is not None else None)
    cpu = platform.processor() or platform.machine()
    head = (f"picochat bench infer: {name}, {sum(p.numel() for p in base.parameters()) / 1e6:.0f} M params, "
            if base is not None else f"picochat bench infer: {name}, ")
    print(f"\n{head}prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, best of {args.reps}; "
          f"{device.type} ({cpu}, torch {torch.__version__}, ATen {torch.backends.cpu.get_cpu_capability()}), "
          f"{torch.get_num_threads()} threads")
    print(f"machine: read bandwidth {peaks['read_bytes_per_s'] / 1e9:.1f} GB/s (1 GiB sum); matmul peaks (MFU's "
          "denominators) " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks["matmul_flops_per_s"].items()))
    print(f"{'config':<22} {'weights':>9} {'batch':>5} {'TTFT ms':>8} {'TPOT ms':>8} {'tok/s':>8} {'x first':>7} "
          f"{'MBU':>5} {'MFU':>5} {'KV cache':>9}")
    for r in rows:
        print(f"{r['config']:<22} {fmt_bytes(r['weight_bytes']):>9} {r['batch']:>5} {r['ttft_ms']:8.1f} "
              f"{r['tpot_ms']:8.2f} {r['tokens_per_s']:8.1f} {r['speedup']:6.2f}x {r['mbu']:5.0%} {r['mfu']:5.1%} "
              f"{fmt_bytes(r['kv_cache_bytes']):>9}")
    out = {"bench": "infer", "model": name, "depth": cfg.n_layer if cfg else None, "arch": args.arch if cfg else None,
           "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "device": str(device),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **peaks, "rows": rows}
    if args.out:
        write_json_atomic(args.out, out)
    print(json.dumps(out))
