"""`picochat bench attention`: what MHA, GQA and MLA cost, and (--train) how they compare.

    picochat bench attention --depth 4            parameter and KV-cache accounting (instant)
    picochat bench attention --decode             + decode tokens/s at several contexts/batches
    picochat bench attention --train              + train every variant on the same data and token
                                                  budget first; writes a Markdown table, a PNG and JSON

Accounting builds the models on the meta device (no memory, no time). Training goes through
picochat.train.loop.run_training exactly as `picochat train base` does (same loader, optimizers,
schedule, val bits-per-byte), one checkpoint tag per variant. Decode timing pretends a prompt of
`context` tokens was prefilled (the cache is filled with random values: a decode step costs the
same whatever they are) and times single-token steps through the model's own KV-cache path, so
MLA decodes with absorption ("mla"), and once more with the expand path ("mla-expand") for
comparison. Prints a table and a final JSON line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from picochat.common import PicochatError, number_type

_pos = number_type(int, lambda v: v >= 1, "a positive integer")
_nonneg = number_type(int, lambda v: v >= 0, "an integer >= 0")


def _int_list(s: str) -> list[int]:
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {s!r}")
    return vals


# ----------------------------------------------------------------------------- configs and accounting

def variant_configs(args, vocab_size: int) -> dict:
    """The three models compared: equal depth/width, only the attention differs."""
    from picochat.model.config import config_from_depth
    kw = dict(vocab_size=vocab_size, sequence_len=args.seq_len)
    return {
        "mha": config_from_depth(args.depth, attention="mha", **kw),
        "gqa": config_from_depth(args.depth, attention="gqa", n_kv_head=args.n_kv_head, **kw),
        "mla": config_from_depth(args.depth, attention="mla", kv_lora_rank=args.kv_lora_rank,
                                 qk_rope_head_dim=args.qk_rope_head_dim, q_lora_rank=args.q_lora_rank, **kw),
    }


def describe(cfg) -> str:
    if cfg.attention == "gqa":
        return f"gqa n_kv_head={cfg.n_kv_head}"
    if cfg.attention == "mla":
        q = f" q_lora={cfg.q_lora_rank}" if cfg.q_lora_rank else ""
        return f"mla latent={cfg.kv_lora_rank} rope={cfg.qk_rope_head_dim}{q}"
    return f"mha {cfg.n_head}x{cfg.head_dim}"


def accounting(cfg) -> dict:
    from picochat.model.gpt import GPT
    with torch.device("meta"):
        model = GPT(cfg)
    kv = model.kv_values_per_token()
    return dict(config=describe(cfg), params=model.num_params(), attention_params=model.attention_params(),
                kv_values_per_token=kv, kv_bytes_per_token_fp32=4 * kv, kv_bytes_per_token_bf16=2 * kv)


# ----------------------------------------------------------------------------- decode timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def decode_tokens_per_s(model, batch: int, context: int, steps: int, warmup: int = 2) -> tuple[float, float]:
    """(best, median) tokens/s of greedy single-token decode steps with `context` positions already
    cached, each step timed alone: on a shared machine the best step is the reproducible number
    (as timeit reports the minimum), the median shows how much contention there was."""
    from picochat.model.kv_cache import KVCache
    device = next(model.parameters()).device
    cache = KVCache(batch, context + warmup + steps + 1, device=device)
    tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
    model.hidden(tok, kv_cache=cache)  # allocates every layer's buffers (at max_len) in the layer's own layout
    for layer in cache.layers.values():
        for buf, _ in layer.values():
            buf.normal_()
    cache.pos = context  # as if a context-long prompt had been prefilled
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        tok = model.logits(model.hidden(tok, kv_cache=cache)[:, -1]).argmax(-1, keepdim=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    return batch / times[0], batch / times[len(times) // 2]


def decode_table(models: dict, contexts: list[int], batches: list[int], steps: int) -> tuple[dict, dict]:
    """Best and median {variant: {"b{B}_ctx{C}": tokens/s}}; MLA is timed absorbed ("mla") and
    expanded ("mla-expand")."""
    from picochat.model.mla import set_mla_mode
    best, median = {}, {}
    for name, model in models.items():
        modes = [("mla", "auto"), ("mla-expand", "expand")] if model.config.attention == "mla" else [(name, None)]
        for label, mode in modes:
            if mode:
                set_mla_mode(model, mode)
            best[label], median[label] = {}, {}
            for b in batches:
                for c in contexts:
                    key = f"b{b}_ctx{c}"
                    best[label][key], median[label][key] = decode_tokens_per_s(model, b, c, steps)
                    print(f"  decode {label:<11} batch {b:>3} context {c:>5}: best {best[label][key]:>9,.1f} tok/s, "
                          f"median {median[label][key]:>9,.1f}", flush=True)
            if mode:
                set_mla_mode(model, "auto")
    return best, median


def decode_model(cfg, max_len: int, device, dtype, state_dict=None):
    """The model rebuilt with rotary tables long enough for `max_len` positions (they cover 10x
    sequence_len; the weights do not depend on it), optionally with trained weights."""
    from picochat.model.gpt import GPT
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(cfg, sequence_len=max(cfg.sequence_len, -(-max_len // 10)))).to(device)
    model.init_weights()
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model.to(dtype)
    model.reset_rotary(device)  # rotary tables stay fp32, as load_model keeps them
    return model.eval()


# ----------------------------------------------------------------------------- training

def train_variant(name: str, cfg, args, tok, device) -> dict:
    """Train one variant with the `picochat train base` machinery; summary + val curve + weights."""
    from picochat import checkpoint as ck
    from picochat.common import data_dir
    from picochat.data.corpus import list_shards
    from picochat.data.loader import PretrainLoader
    from picochat.model.gpt import GPT
    from picochat.train.loop import Stage, TrainSettings, run_training
    data = data_dir(args.data)
    list_shards(data, "train")  # clear error if the corpus is missing
    tag = f"bench-attention/d{args.depth}-{name}"
    settings = TrainSettings(stage="base", tag=tag, steps=args.steps, device_batch_size=args.device_batch_size,
                             seq_len=args.seq_len, total_batch_size=args.total_batch_size, eval_every=args.eval_every,
                             eval_batches=args.eval_batches, keep=1, compile=args.compile, seed=args.seed,
                             extra={"data": args.data, "bench": "attention"})
    grad_accum = settings.validate(1)
    B, T = args.device_batch_size, args.seq_len
    torch.manual_seed(args.seed)  # same init stream for every variant
    model = GPT(cfg).to(device)
    model.init_weights()
    summary = run_training(
        Stage(settings, model, tok, device),
        lambda state: PretrainLoader(data, tok, B, T, "train", 0, 1, grad_accum, state, device=device),
        val_loader=lambda: PretrainLoader(data, tok, B, T, "val", 0, 1, 1, None, device=device))
    history = ck.read_checkpoint(tag, verify=False).state.get("history", [])
    return dict(tag=tag, val_bpb=summary["val_bpb"], train_tok_per_s=summary["tok_per_s"], tokens=summary["tokens"],
                train_time=summary["train_time"], history=history,
                state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()})


# ----------------------------------------------------------------------------- report

def _fmt_int(n) -> str:
    return f"{n:,}" if n is not None else "-"


def markdown(rows: dict, decode: dict, contexts: list[int], batches: list[int], command: str, env: str) -> str:
    cols = [(b, c) for b in batches for c in contexts]
    head = ["variant", "attention", "attn params", "params", "KV B/token (fp32)", "KV vs MHA", "val bpb",
            "train tok/s"] + [f"decode tok/s B{b} ctx{c}" for b, c in cols]
    lines = [f"`{command}`", "", env, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    mha_kv = rows["mha"]["kv_bytes_per_token_fp32"]
    for label in (list(decode) or list(rows)):
        r = rows[label.split("-")[0]]
        bpb = f"{r['val_bpb']:.4f}" if r.get("val_bpb") is not None else "-"
        if label.endswith("-expand"):
            bpb = "(same weights)" if r.get("val_bpb") is not None else "-"
        tps = f"{r['train_tok_per_s']:,.0f}" if r.get("train_tok_per_s") and not label.endswith("-expand") else "-"
        dec = [f"{decode[label][f'b{b}_ctx{c}']:,.1f}" if label in decode else "-" for b, c in cols]
        lines.append("| " + " | ".join([label, r["config"], _fmt_int(r["attention_params"]), _fmt_int(r["params"]),
                                        _fmt_int(r["kv_bytes_per_token_fp32"]),
                                        f"{r['kv_bytes_per_token_fp32'] / mha_kv:.1%}", bpb, tps] + dec) + " |")
    if decode and "mla" in decode:
        ratios = ", ".join(f"B{b} ctx{c}: {decode['mla'][f'b{b}_ctx{c}'] / decode['mha'][f'b{b}_ctx{c}']:.2f}x"
                           for b, c in cols)
        lines += ["", f"MLA (absorbed) decode speed / MHA: {ratios}"]
    if rows["mla"].get("val_bpb") is not None:
        d = rows["mla"]["val_bpb"] / rows["mha"]["val_bpb"] - 1
        lines += ["", f"MLA val bpb vs MHA: {d:+.2%} (GQA: {rows['gqa']['val_bpb'] / rows['mha']['val_bpb'] - 1:+.2%})"]
    return "\n".join(lines) + "\n"


def plot(path: Path, rows: dict, decode: dict, contexts: list[int], batches: list[int]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from picochat.common import atomic_path
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, r in rows.items():
        hist = r.get("history", [])
        loss = [(h["step"], h["loss"]) for h in hist if "loss" in h]
        val = [(h["step"], h["val_bpb"]) for h in hist if h.get("val_bpb") is not None]
        if loss:
            axes[0].plot(*zip(*loss), label=name)
        if val:
            axes[1].plot(*zip(*val), marker="o", label=name)
    axes[0].set(title="train loss (nats/token)", xlabel="step")
    axes[1].set(title="val bits per byte", xlabel="step")
    for label, d in decode.items():
        for b, style in zip(batches, ("-", "--", ":", "-.")):
            axes[2].plot(contexts, [d[f"b{b}_ctx{c}"] for c in contexts], style, marker="o", label=f"{label} B{b}")
    axes[2].set(title="decode tokens/s", xlabel="context (tokens)", xscale="log", yscale="log")
    axes[2].set_xticks(contexts, [str(c) for c in contexts], minor=False)
    axes[2].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------- command

def run(args) -> dict:
    import sys

    from picochat.common import home, write_json_atomic, write_text_atomic
    from picochat.device import pick_device
    device = pick_device(args.device)
    tok = None
    vocab = args.vocab_size
    if args.train:
        from picochat.common import tokenizer_dir
        from picochat.tokenizer import Tokenizer
        tok = Tokenizer.load(tokenizer_dir())
        vocab = tok.vocab_size
    configs = variant_configs(args, vocab)
    rows = {name: accounting(cfg) for name, cfg in configs.items()}
    print(f"depth {args.depth}: n_embd {configs['mha'].n_embd}, {configs['mha'].n_head} heads of {configs['mha'].head_dim}, "
          f"vocab {vocab}")
    print(f"{'variant':<8} {'attention':<28} {'attn params':>12} {'params':>12} {'KV values/tok':>14} "
          f"{'KV B/tok fp32':>14} {'vs MHA':>7}")
    for name, r in rows.items():
        print(f"{name:<8} {r['config']:<28} {r['attention_params']:>12,} {r['params']:>12,} "
              f"{r['kv_values_per_token']:>14,} {r['kv_bytes_per_token_fp32']:>14,} "
              f"{r['kv_bytes_per_token_fp32'] / rows['mha']['kv_bytes_per_token_fp32']:>7.1%}")
    weights = {}
    if args.train:
        for name, cfg in configs.items():
            print(f"== training {name} ({describe(cfg)})", flush=True)
            res = train_variant(name, cfg, args, tok, device)
            weights[name] = res.pop("state_dict")
            rows[name].update(res)
            print(f"   {name}: val bpb {res['val_bpb']:.4f}, {res['train_tok_per_s']:,.0f} train tokens/s", flush=True)
    decode = {}
    if args.train or args.decode:
        from picochat.device import resolve_dtype
        dtype = resolve_dtype(args.dtype, device)
        max_len = max(args.contexts) + args.decode_steps + 8
        models = {name: decode_model(cfg, max_len, device, dtype, weights.get(name)) for name, cfg in configs.items()}
        print(f"== decode ({dtype}, best of {args.decode_steps} timed steps after 2 warm-up steps, "
              f"{torch.get_num_threads()} CPU threads)", flush=True)
        decode, decode_median = decode_table(models, args.contexts, args.batches, args.decode_steps)
        del models
    result = dict(depth=args.depth, device=str(device), threads=torch.get_num_threads(), variants=rows, decode=decode)
    if decode:
        result["decode_median"] = decode_median
    if args.train or args.decode:
        out = Path(args.out) if args.out else home() / "bench" / "attention"
        command = "picochat bench attention " + " ".join(sys.argv[sys.argv.index("attention") + 1:]) \
            if "attention" in sys.argv else "picochat bench attention"
        env = (f"device {device.type}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "") +
               f", torch {torch.__version__}, {torch.get_num_threads()} threads, decode dtype "
               f"{'bf16' if device.type == 'cuda' else 'fp32'}; decode tok/s = batch / fastest of "
               f"{args.decode_steps} timed steps (medians in attention.json)")
        md = markdown(rows, decode, args.contexts, args.batches, command, env)
        write_text_atomic(out / "attention.md", md)
        if args.train:
            plot(out / "attention.png", rows, decode, args.contexts, args.batches)
        write_json_atomic(out / "attention.json", dict(result, command=command))
        print(md)
        print(f"results -> {out}")
    summary = {k: {kk: vv for kk, vv in v.items() if kk != "history"} for k, v in rows.items()}
    print(json.dumps(dict(result, variants=summary)))
    return result


def cmd_bench_attention(args) -> None:
    if args.train and args.steps < 1:
        raise PicochatError("--steps must be >= 1")
    run(args)


def add_parser(bench_sub) -> None:
    p = bench_sub.add_parser("attention", help="MHA vs GQA vs MLA: parameters, KV cache, (--train) quality and speed",
                             description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=_pos, default=4, help="model depth; width = 64 x depth (default %(default)s)")
    p.add_argument("--vocab-size", type=_pos, default=4096, help="vocabulary for the accounting without --train "
                   "(default %(default)s; --train uses the trained tokenizer's)")
    p.add_argument("--n-kv-head", type=_pos, default=1, help="key/value heads of the GQA variant (default %(default)s)")
    p.add_argument("--kv-lora-rank", type=_pos, help="MLA latent dimension (unset: n_embd/4)")
    p.add_argument("--qk-rope-head-dim", type=_pos, help="MLA shared rotary key dimension (unset: min(head_dim/4, n_embd/8))")
    p.add_argument("--q-lora-rank", type=_nonneg, default=0, help="MLA low-rank query dimension; 0 = none (default %(default)s)")
    p.add_argument("--decode", action="store_true", help="also time decoding (random weights unless --train)")
    p.add_argument("--train", action="store_true", help="train every variant on the same data and token budget, then "
                   "time decoding with the trained weights; writes attention.md/.png/.json under --out")
    p.add_argument("--out", help="output folder (unset: $PICOCHAT_HOME/bench/attention)")
    p.add_argument("--data", default="embedded", help="prepared corpus name (default %(default)s)")
    p.add_argument("--steps", type=_pos, default=300, help="optimizer steps per variant (default %(default)s)")
    p.add_argument("--device-batch-size", type=_pos, default=8, help="rows per micro-batch (default %(default)s)")
    p.add_argument("--seq-len", type=_pos, default=256, help="training context (default %(default)s)")
    p.add_argument("--total-batch-size", type=int, default=-1, help="tokens per step, a multiple of device batch x "
                   "seq len; -1 = one micro-batch, 2,048 tokens at the defaults (default %(default)s)")
    p.add_argument("--eval-every", type=_nonneg, default=100, help="steps between val bpb evals (default %(default)s)")
    p.add_argument("--eval-batches", type=_pos, default=32, help="val batches per eval (default %(default)s)")
    p.add_argument("--compile", default="off", help="torch.compile mode for training (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="init seed, the same for every variant (default %(default)s)")
    p.add_argument("--contexts", type=_int_list, default="256,1024,4096",
                   help="cached contexts to time decoding at (default %(default)s)")
    p.add_argument("--batches", type=_int_list, default="1,16", help="decode batch sizes (default %(default)s)")
    p.add_argument("--decode-steps", type=_pos, default=10, help="timed decode steps per point; the best is "
                   "reported (default %(default)s)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps (default %(default)s)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="decode timing dtype: "
                   "auto = bf16 on a CUDA card with bf16, fp32 otherwise (default %(default)s)")
    p.set_defaults(func=cmd_bench_attention)
