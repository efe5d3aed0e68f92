"""Memory that holds: many long requests against `picochat serve --kv-memory`, with the server's RSS watched.

    python benchmarks/serve_memory.py --depth 20 --clients 32 --prompt 1920 --max-tokens 128 --kv-memory 4G --quant int8

Writes a random-weight checkpoint of the given depth (vocabulary 32,768, as nanochat's) to a
temporary PICOCHAT_HOME, starts the real `picochat serve` on a loopback port, and sends --clients
completions at once, each --prompt tokens long asking for --max-tokens more (together 2,048 by
default: the trained context). The KV budget lets only some run together; the rest must wait, and
all must complete. The server's peak RSS (VmHWM from /proc) is compared with weights + budget +
1 GiB. Prints a table and a final JSON line.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_checkpoint(home: Path, depth: int, tag: str) -> None:
    """A random d{depth} picochat checkpoint with a 32,768-token tokenizer (two-byte tokens, no training)."""
    import torch

    from picochat.checkpoint import save_checkpoint
    from picochat.model.config import config_from_depth
    from picochat.model.gpt import GPT
    from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer
    os.environ["PICOCHAT_HOME"] = str(home)
    n = 32768 - len(SPECIAL_TOKENS)
    ranks = {bytes([i]): i for i in range(256)}
    ranks.update({bytes([(i - 256) // 256, (i - 256) % 256]): i for i in range(256, n)})
    tok = Tokenizer(ranks, r"\S+|\s+")
    cfg = config_from_depth(depth, vocab_size=tok.vocab_size, sequence_len=2048)
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.02)
    save_checkpoint(tag, 1, model, cfg, {"stage": "bench"}, tokenizer=tok)


def rss(pid: int) -> tuple[int, int]:
    """(current, peak) resident bytes of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    get = lambda key: int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) * 1024  # noqa: E731
    return get("VmRSS"), get("VmHWM")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--clients", type=int, default=32, help="requests sent at once (default %(default)s)")
    ap.add_argument("--prompt", type=int, default=1920, help="prompt tokens per request (default %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=128, help="new tokens per request (default %(default)s)")
    ap.add_argument("--kv-memory", default="4G", help="the server's --kv-memory (default %(default)s)")
    ap.add_argument("--quant", default="int8", help="the server's --quant (default %(default)s)")
    ap.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch (default %(default)s)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds before giving up (default %(default)s)")
    ap.add_argument("--out", help="also write the JSON result here")
    args = ap.parse_args()
    import httpx

    from picochat.common import parse_bytes
    with tempfile.TemporaryDirectory(prefix="picochat-serve-mem-") as tmp:
        home, tag = Path(tmp), f"bench/d{args.depth}"
        make_checkpoint(home, args.depth, tag)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "picochat.cli", "serve", "--model", tag, "--port", str(port), "--quant", args.quant,
               "--kv-memory", args.kv_memory, "--max-batch", str(args.max_batch), "--max-queue", str(args.clients),
               "--log-level", "warning"]
        server = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PICOCHAT_HOME": str(home)},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            banner = [server.stdout.readline() for _ in range(3)]
            url = f"http://127.0.0.1:{port}"
            deadline = time.time() + 300
            while time.time() < deadline:
                if server.poll() is not None:
                    raise SystemExit(f"the server exited: {''.join(banner)}{server.stdout.read()}".strip())
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            limits = httpx.get(url + "/health").json()
            idle_rss = rss(server.pid)[0]
            prompt = "ab" * (args.prompt - 1)  # the tokenizer's tokens are byte pairs: P - 1 tokens, + BOS
            t0 = time.time()

            def one(i: int) -> dict:
                r = httpx.post(url + "/v1/completions", timeout=args.timeout, json=dict(
                    model=tag, prompt=prompt, max_tokens=args.max_tokens, temperature=0, seed=i))
                return {"status": r.status_code, "tokens": r.json().get("usage", {}).get("completion_tokens"),
                        "done_s": time.time() - t0, "error": None if r.status_code == 200 else r.text[:300]}

            with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
                futures = [pool.submit(one, i) for i in range(args.clients)]
                trace = []  # (seconds, RSS, rows in the batch, queued): where the peak happens
                while not concurrent.futures.wait(futures, timeout=0.5).not_done == set():
                    h = httpx.get(url + "/health", timeout=30).json()
                    trace.append((round(time.time() - t0, 1), rss(server.pid)[0], h["active_slots"], h["queued"]))
                results = [f.result() for f in futures]
            wall = time.time() - t0
            health = httpx.get(url + "/health").json()
            _, hwm = rss(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=30)
    budget = parse_bytes(args.kv_memory)
    m = re.search(r"memory: weights ([0-9.]+ [KMGT]?B)", "".join(banner))
    weight_bytes = parse_bytes(m.group(1).replace(" ", "")) if m else 0
    ok = sum(r["status"] == 200 and r["tokens"] == args.max_tokens for r in results)
    for err in {r["error"] for r in results if r["error"]}:
        print(f"error: {err}")
    out = dict(bench="serve_memory", depth=args.depth, quant=args.quant, clients=args.clients, prompt=args.prompt,
               max_tokens=args.max_tokens, kv_memory=budget, weight_bytes=weight_bytes, completed=ok,
               wall_s=wall, idle_rss=idle_rss, peak_rss=hwm, limit=weight_bytes + budget + (1 << 30),
               within_limit=hwm <= weight_bytes + budget + (1 << 30), stats=health["stats"], banner="".join(banner),
               first_done_s=min(r["done_s"] for r in results), last_done_s=max(r["done_s"] for r in results),
               trace_peak=max(trace, key=lambda x: x[1], default=None), trace=trace[::10])
    print("".join(banner).rstrip())
    print(f"{'clients':>7} {'completed':>9} {'wall s':>7} {'max batch':>9} {'KV peak':>9} {'budget':>7} {'weights':>8} "
          f"{'RSS idle':>8} {'RSS peak':>8} {'limit':>7} ok")
    gb = 1 << 30
    print(f"{args.clients:>7} {ok:>9} {wall:7.0f} {health['stats']['max_batch_seen']:>9} "
          f"{health['stats']['kv_peak_bytes'] / gb:8.2f}G {budget / gb:6.2f}G {weight_bytes / gb:7.2f}G "
          f"{idle_rss / gb:7.2f}G {hwm / gb:7.2f}G {out['limit'] / gb:6.2f}G {'yes' if out['within_limit'] else 'NO'}")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
