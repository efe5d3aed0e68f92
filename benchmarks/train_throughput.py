"""Training throughput and MFU for a given depth (random tokens: measures the model, not the data path).

    python benchmarks/train_throughput.py --depth 4 --steps 20

MFU = achieved model FLOPs/s / peak FLOPs/s. On CUDA the peak is the card's bf16 dense number
(H100 SXM 989 TFLOPs, A100 312); on CPU there is no datasheet number we can trust, so the peak
is *measured*: the best fp32 matmul rate of this machine (a large square matmul). CPU "MFU" is
therefore "share of this machine's achievable matmul throughput".
Prints a table and a final JSON line.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from picochat.device import autocast_ctx, pick_device
from picochat.model.config import config_from_depth
from picochat.model.gpt import GPT
from picochat.train.optim import build_optimizers

GPU_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}


def measured_matmul_peak(device, n=2048, reps=5) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def peak_flops(device) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for k, v in GPU_PEAK.items():
            if k in name:
                return v, f"{name} bf16 datasheet"
    return measured_matmul_peak(device), f"measured fp32 matmul on {device.type}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=4, help="model depth (default 4)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per row (default 256)")
    ap.add_argument("--batch-size", type=int, default=8, help="rows per step (default 8)")
    ap.add_argument("--vocab-size", type=int, default=4096, help="vocabulary (default 4096, the quickstart's)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed warmup steps (default 3)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = pick_device(args.device)
    torch.manual_seed(0)
    model = GPT(config_from_depth(args.depth, args.vocab_size, args.seq_len)).to(device)
    model.init_weights()
    opts = build_optimizers(model)
    x = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=device)
    y = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=device)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with autocast_ctx(device):
            loss = model(x, y)
        loss.backward()
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        loss.item()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    step = times[len(times) // 2]
    tokens = args.batch_size * args.seq_len
    tok_s = tokens / step
    peak, peak_src = peak_flops(device)
    mfu = tok_s * model.flops_per_token() / peak
    rows = [("depth", args.depth), ("params", f"{model.num_params():,}"), ("tokens/step", tokens),
            ("median step (s)", f"{step:.4f}"), ("tokens/s", f"{tok_s:,.0f}"),
            ("model FLOPs/token", f"{model.flops_per_token():,.0f}"), ("peak FLOPs/s", f"{peak:.3e} ({peak_src})"),
            ("MFU", f"{100 * mfu:.1f}%"), ("threads", torch.get_num_threads())]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print(json.dumps({"benchmark": "train_throughput", "device": device.type, "depth": args.depth,
                      "params": model.num_params(), "tokens_per_s": round(tok_s, 1), "step_s": round(step, 5),
                      "mfu": round(mfu, 4), "peak_flops": peak, "peak_source": peak_src}))


if __name__ == "__main__":
    main()
