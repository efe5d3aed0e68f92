"""`picochat bench train`: each training-performance knob off vs on, measured on this machine.

    picochat bench train --depth 4 --steps 60
    picochat bench train --depth 8 --variants baseline,grad-ckpt --repeats 2

Every variant trains the same model on the same prepared corpus through the real training loop
(train/loop.run_training, no checkpoints written) in its own child process, so that
- peak memory is honest per variant: CUDA max_memory_allocated on GPU; on CPU the child's peak
  RSS (ru_maxrss) and "train memory" = peak RSS minus the RSS just before the model was built
  (weights + grads + optimizer state + activations: the CPU analogue of CUDA's allocated peak);
- compile caches, allocator state and loader workers never leak from one variant into the next.
Variants run round-robin (`--repeats` rounds, medians reported), so on a shared machine the
background load hits all of them alike. The first `--warmup` steps (compilation!) are excluded.
Prints a table and a final JSON line. `python benchmarks/train.py '<json config>'` is the child.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

# name -> overrides of the baseline (compile off, no checkpointing, tokenization in-process)
VARIANTS = {
    "baseline": {},
    "workers": {"workers": "auto"},
    "grad-ckpt": {"grad_checkpoint": True},
    "compile-default": {"compile": "default"},
    "compile-reduce-overhead": {"compile": "reduce-overhead"},
    "compile-max-autotune": {"compile": "max-autotune"},
    "compile-max-autotune-no-cudagraphs": {"compile": "max-autotune-no-cudagraphs"},
}
DEFAULT_VARIANTS = "baseline,workers,grad-ckpt,compile-default,compile-reduce-overhead"


def add_parser(bench) -> None:
    from picochat.common import nonneg_int as _nonneg_int
    from picochat.common import positive_int as _positive_int
    p = bench.add_parser("train", help="tokens/s, step time, peak memory and data-wait share per training knob",
                         description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=_positive_int, default=4, help="model depth (default %(default)s)")
    p.add_argument("--steps", type=_positive_int, default=60, help="measured steps per variant (default %(default)s)")
    p.add_argument("--warmup", type=_nonneg_int, default=5, help="untimed first steps per variant, where "
                   "compilation happens (default %(default)s)")
    p.add_argument("--device-batch-size", type=_positive_int, default=8, help="rows per step (default %(default)s)")
    p.add_argument("--seq-len", type=_positive_int, default=256, help="tokens per row (default %(default)s)")
    p.add_argument("--data", default="embedded", help="prepared corpus name (default %(default)s)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, from {', '.join(VARIANTS)} "
                   "(default %(default)s); every knob not named stays at the baseline")
    p.add_argument("--with", dest="common", default="", metavar="KNOBS", help="apply to every variant, e.g. "
                   "'workers' or 'workers,grad-ckpt'; empty = none")
    p.add_argument("--loader-workers", type=_nonneg_int, default=None,
                   help="worker count for 'workers' (unset: cores - 1, at most 8)")
    p.add_argument("--repeats", type=_positive_int, default=1, help="round-robin rounds over the variants; "
                   "medians are reported (default %(default)s)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda (default %(default)s)")
    p.add_argument("--out", help="also write the JSON result to this file")
    p.set_defaults(func=run)


def _parse_variants(spec: str) -> list[str]:
    from picochat.common import PicochatError
    names = [v.strip() for v in spec.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names:
        raise PicochatError(f"--variants: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(VARIANTS)}")
    return names


def run(args) -> None:
    from picochat.common import PicochatError, data_dir, tokenizer_dir, write_json_atomic
    from picochat.data.workers import default_workers
    names = _parse_variants(args.variants)
    common = {}
    for name in _parse_variants(args.common) if args.common else []:
        common.update(VARIANTS[name])
    if not (tokenizer_dir() / "tokenizer.json").exists() or not data_dir(args.data).exists():
        raise PicochatError(f"bench train needs a prepared corpus {args.data!r} and a tokenizer: run "
                            f"`picochat data prepare` and `picochat tokenizer train` first")
    workers = default_workers() if args.loader_workers is None else args.loader_workers
    base = {"depth": args.depth, "steps": args.steps, "warmup": args.warmup, "B": args.device_batch_size,
            "T": args.seq_len, "data": args.data, "device": args.device, "workers": 0, "compile": "off",
            "grad_checkpoint": False}
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.repeats):
        for name in names:
            cfg = dict(base, **common, **VARIANTS[name])
            if cfg["workers"] == "auto":
                cfg["workers"] = workers
            print(f"[round {r + 1}/{args.repeats}] {name}: {cfg}", file=sys.stderr, flush=True)
            runs[name].append(_run_child(cfg))
    results = {n: _median(rs) for n, rs in runs.items()}
    _print_table(results, names)
    out = {"benchmark": "train", "depth": args.depth, "steps": args.steps, "warmup": args.warmup,
           "device_batch_size": args.device_batch_size, "seq_len": args.seq_len, "repeats": args.repeats,
           "common": args.common, "cores": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "variants": results}
    if args.out:
        write_json_atomic(args.out, out)
    print(json.dumps(out))


def _run_child(cfg: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, json.dumps(cfg)], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        from picochat.common import PicochatError
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise PicochatError(f"bench variant {cfg} failed: {tail}")
    return json.loads(lines[-1])


def _median(rs: list[dict]) -> dict:
    out = dict(rs[0])
    for k, v in rs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = statistics.median(r[k] for r in rs)
    out["tok_per_s"] = out["tokens_per_step"] / out["step_s"]  # consistent with the median step time
    out["runs"] = len(rs)
    out["step_s_runs"] = [r["step_s"] for r in rs]
    return out


def _print_table(results: dict, names: list[str]) -> None:
    base = results.get("baseline")
    head = f"{'variant':<36} {'tok/s':>9} {'step ms':>9} {'x base':>7} {'peak MB':>8} {'train MB':>9} " \
           f"{'x base':>7} {'data wait':>9}  compile ran as"
    print(head)
    print("-" * len(head))
    for n in names:
        r = results[n]
        t_ratio = f"{r['step_s'] / base['step_s']:.2f}" if base else "-"
        m_ratio = f"{r['train_mb'] / base['train_mb']:.2f}" if base and base["train_mb"] > 0 else "-"
        print(f"{n:<36} {r['tok_per_s']:>9,.0f} {1000 * r['step_s']:>9.1f} {t_ratio:>7} {r['peak_mb']:>8,.0f} "
              f"{r['train_mb']:>9,.0f} {m_ratio:>7} {100 * r['data_wait_share']:>8.2f}%  {r['compile_ran']}")
    if base:
        print(f"(peak = {'CUDA max allocated' if base['device'] == 'cuda' else 'process peak RSS'}; train MB = "
              f"{'same' if base['device'] == 'cuda' else 'peak RSS minus RSS before the model was built'}; "
              f"medians of {base['runs']} run(s); static = weights+grads+optimizer state "
              f"{base['static_mb']:,.0f} MB)")


# ----------------------------------------------------------------------------- child process

class RandomTokens:
    """An endless loader of uniform random (x, y) batches: what a throughput check needs when no
    tokenizer or corpus is at hand (a GPU machine without network)."""

    def __init__(self, B: int, T: int, vocab: int, device):
        import torch
        self.gen = torch.Generator().manual_seed(0)
        self.B, self.T, self.vocab, self.device = B, T, vocab, device

    def __iter__(self):
        return self

    def __next__(self):
        import torch
        from picochat.data.loader import Batch
        ids = torch.randint(0, self.vocab, (self.B, self.T + 1), generator=self.gen).to(self.device)
        return Batch(ids[:, :-1], ids[:, 1:], self.B * self.T)

    def state_dict(self) -> dict:
        return {}

    def close(self) -> None:
        pass


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _child(cfg: dict) -> dict:
    import torch
    from picochat.common import data_dir, tokenizer_dir
    from picochat.device import pick_device
    from picochat.data.loader import PretrainLoader
    from picochat.model.config import config_from_depth
    from picochat.model.gpt import GPT
    from picochat.tokenizer import Tokenizer
    from picochat.train.loop import Stage, TrainSettings, effective_compile_mode, run_training

    device = pick_device(cfg["device"])
    B, T = cfg["B"], cfg["T"]
    random_data = cfg["data"] == "random"  # uniform random tokens: throughput and memory only (gpu_check)
    tok = None if random_data else Tokenizer.load(tokenizer_dir())
    vocab = cfg.get("vocab", 65536) if random_data else tok.vocab_size
    data = None if random_data else data_dir(cfg["data"])
    rss0 = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = GPT(config_from_depth(cfg["depth"], vocab, T)).to(device)
    model.init_weights()
    steps = cfg["warmup"] + cfg["steps"]
    settings = TrainSettings(stage="bench", tag="bench", steps=steps, device_batch_size=B, seq_len=T,
                             eval_every=0, log_every=1, warmdown_ratio=0.0, compile=cfg["compile"],
                             grad_checkpoint=cfg["grad_checkpoint"])
    holder = {}

    def make_loader(state):
        if random_data:
            return RandomTokens(B, T, vocab, device)
        holder["loader"] = PretrainLoader(data, tok, B, T, "train", state=state, device=device, workers=cfg["workers"])
        return holder["loader"]

    summary = run_training(Stage(settings, model, tok, device), make_loader, save_checkpoints=False)
    steps_h = [h for h in summary["history"] if "tok_per_s" in h][cfg["warmup"]:]
    dts = [B * T / h["tok_per_s"] for h in steps_h]
    waits = [h["data_wait"] * dt for h, dt in zip(steps_h, dts)]
    step_s = statistics.median(dts)
    # weights + their grads (alive during backward) + optimizer moments: memory no knob here can shrink
    static = 2 * sum(p.numel() * p.element_size() for p in model.parameters()) + summary["optimizer_state_bytes"]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        train = peak
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        train = peak - rss0
    return {"device": device.type, "params": model.num_params(), "tokens_per_step": B * T,
            "tok_per_s": B * T / step_s, "step_s": step_s,
            "data_wait_share": sum(waits) / sum(dts), "peak_mb": peak, "train_mb": train,
            "static_mb": static / 2**20, "workers": cfg["workers"], "compile": cfg["compile"],
            "compile_ran": effective_compile_mode(cfg["compile"], device)[0],
            "grad_checkpoint": cfg["grad_checkpoint"], "loss": summary["loss"], "torch_threads": torch.get_num_threads()}


if __name__ == "__main__":
    t0 = time.time()
    result = _child(json.loads(sys.argv[1]))
    result["wall_s"] = time.time() - t0
    print(json.dumps(result))
