"""Scale curves: what picochat costs at d4..d20+ of both designs, for docs/performance.md.

    python benchmarks/scale.py --depths 4,8,12,20 --archs picochat,nanochat-2026 --out scale.json

Per (design, depth), each measured in its own child process so peak memory is its own:
  - parameters and weight bytes; decode tok/s and MBU at fp32/int8/int4 x batch 1/8/32
    (`picochat bench infer`, prompt 64, 32 new tokens) and TTFT of a 512-token prompt at batch 1;
  - one training step (forward, backward, Muon + AdamW step) on one 2,048-token row: seconds,
    tokens/s, peak RSS;
  - `picochat import nanochat` of a nanochat-format checkpoint of that size (random weights, torch.save
    like nanochat, a 32,768-token tokenizer pickle): seconds and peak RSS against the file's size,
    then load + first token of the imported model in fp32 (as `picochat chat` does), with its RSS
    after that token and its peak.
Prints a table and a final JSON line. Random weights: speed and memory do not depend on the values.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VOCAB = 32768


# a child's own peak RSS: VmHWM belongs to its address space (ru_maxrss would carry the parent's
# peak over fork + exec, and this parent holds whole checkpoints while writing them)
PEAK_RSS = ("int(__import__('re').search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024")


def child(code: str, env: dict | None = None) -> tuple[dict, float]:
    """Run python -c code (its last stdout line is JSON); (that JSON, wall seconds)."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, cwd=REPO)
    if p.returncode:
        raise SystemExit(f"child failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1]), time.perf_counter() - t


def bench_infer(depth: int, arch: str, extra: list[str]) -> dict:
    code = ("import sys; from picochat.cli import main; "
            f"sys.exit(main(['bench', 'infer', '--depth', '{depth}', '--arch', '{arch}', *{extra!r}]))")
    return child(code)[0]


TRAIN_STEP = """
import json, time, torch
from picochat.model.config import config_from_depth
from picochat.model.gpt import GPT
from picochat.train.optim import build_optimizers
cfg = config_from_depth({depth}, vocab_size={vocab}, sequence_len=2048, arch={arch!r})
model = GPT(cfg); model.init_weights()
opts = build_optimizers(model)
x = torch.randint(0, {vocab}, (1, 2049))
times = []
for _ in range(2):  # the first step allocates optimizer state; the second is the one reported
    t = time.perf_counter()
    loss = model(x[:, :-1], x[:, 1:]); loss.backward()
    for o in opts: o.step(); o.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t)
print(json.dumps(dict(step_s=times[-1], tokens_per_s=2048 / times[-1], params=model.num_params(),
                      peak_rss={peak})))
"""


def write_nanochat_checkpoint(out: Path, depth: int, arch: str) -> int:
    """A nanochat-format folder (model_*.pt, meta_*.json, tokenizer.pkl) of random weights; its .pt size."""
    import tiktoken
    import torch

    from picochat.model.config import config_from_depth
    from picochat.model.gpt import GPT
    from picochat.tokenizer import SPECIAL_TOKENS
    cfg = config_from_depth(depth, vocab_size=VOCAB, sequence_len=2048, arch=arch)
    with torch.device("meta"):
        model = GPT(cfg)
    state = {k: torch.randn(v.shape) * 0.02 for k, v in model.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    torch.save(state, out / "model_000001.pt")
    del state
    (out / "meta_000001.json").write_text(json.dumps({"step": 1, "model_config": dict(
        sequence_len=2048, vocab_size=VOCAB, n_layer=cfg.n_layer, n_head=cfg.n_head, n_kv_head=cfg.n_kv_head,
        n_embd=cfg.n_embd, window_pattern="SSSL" if arch == "nanochat-2026" else "L")}))
    n = VOCAB - len(SPECIAL_TOKENS)
    ranks = {bytes([i]): i for i in range(256)}
    for i in range(256, n):  # distinct two-byte tokens: enough for a tokenizer of the right size
        ranks[bytes([(i - 256) // 256 % 256, (i - 256) % 256])] = i
    enc = tiktoken.Encoding("scale", pat_str=r"\S+|\s+", mergeable_ranks=ranks,
                            special_tokens={s: n + j for j, s in enumerate(SPECIAL_TOKENS)})
    with open(out / "tokenizer.pkl", "wb") as f:
        pickle.dump(enc, f)
    return (out / "model_000001.pt").stat().st_size


FIRST_TOKEN = """
import json, time, torch
from picochat.inference.quant import load_for_inference
from picochat.inference.engine import Engine
from picochat.checkpoint import load_tokenizer
t = time.perf_counter(); model, _ = load_for_inference({tag!r}, 'cpu'); loaded = time.perf_counter() - t
tok = load_tokenizer({tag!r}); e = Engine(model, tok)
t = time.perf_counter(); e.generate([tok.encode('Hello there', prepend=tok.bos_token_id)], 1, temperature=0)
first = time.perf_counter() - t
rss = int(__import__('re').search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024
print(json.dumps(dict(load_s=loaded, first_token_s=first, chat_rss=rss, chat_peak_rss={peak})))
"""


PARTS = ("decode", "train", "import")


def measure(depth: int, arch: str, work: Path, parts=PARTS) -> dict:
    row: dict = {"depth": depth, "arch": arch}
    if "decode" in parts:
        row.update(decode_part(depth, arch))
    if "train" in parts:
        train, _ = child(TRAIN_STEP.format(depth=depth, vocab=VOCAB, arch=arch, peak=PEAK_RSS))
        row.update(params=train["params"], train_step_s=train["step_s"], train_tokens_per_s=train["tokens_per_s"],
                   train_peak_rss=train["peak_rss"])
    if "import" in parts:
        row.update(import_part(depth, arch, work))
    return row


def decode_part(depth: int, arch: str) -> dict:
    row: dict = {}
    inf = bench_infer(depth, arch, ["--quant", "none,int8,int4", "--batch", "1,8,32", "--prompt-len", "64",
                                    "--new-tokens", "32", "--reps", "2", "--vocab", str(VOCAB)])
    row["decode"] = [{k: r[k] for k in ("quant", "batch", "tokens_per_s", "mbu", "tpot_ms", "weight_bytes")}
                     for r in inf["rows"]]
    row["read_gbs"] = inf["read_bytes_per_s"] / 1e9
    ttft = bench_infer(depth, arch, ["--quant", "none,int8,int4", "--batch", "1", "--prompt-len", "512",
                                     "--new-tokens", "2", "--reps", "1", "--vocab", str(VOCAB)])
    row["ttft512_ms"] = {r["quant"]: r["ttft_ms"] for r in ttft["rows"]}
    return row


def import_part(depth: int, arch: str, work: Path) -> dict:
    row: dict = {}
    src = work / f"{arch}-d{depth}"
    row["pt_bytes"] = write_nanochat_checkpoint(src, depth, arch)
    home = {"PICOCHAT_HOME": str(work / "home")}
    tag = f"scale/{arch}-d{depth}"
    code = ("import sys, json; from picochat.cli import main; "
            f"main(['import', 'nanochat', '--path', {str(src)!r}, '--tag', {tag!r}]); "
            f"print(json.dumps(dict(rss={PEAK_RSS})))")
    imp, wall = child(code, home)
    row.update(import_s=wall, import_peak_rss=imp["rss"], import_rss_over_file=imp["rss"] / row["pt_bytes"])
    first, _ = child(FIRST_TOKEN.format(tag=tag, peak=PEAK_RSS), home)
    row.update(first)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depths", default="4,8,12,20", help="comma-separated depths (default %(default)s)")
    ap.add_argument("--archs", default="picochat,nanochat-2026", help="comma-separated designs (default %(default)s)")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated, from %(default)s")
    ap.add_argument("--out", help="also write the JSON result here")
    args = ap.parse_args()
    parts = args.parts.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="picochat-scale-") as tmp:
        for arch in args.archs.split(","):
            for depth in map(int, args.depths.split(",")):
                print(f"measuring {arch} d{depth} ...", file=sys.stderr, flush=True)
                rows.append(measure(depth, arch, Path(tmp), parts))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    gb = 1e9
    print(f"{'design':<14} {'d':>3} {'params':>7} {'fp32 GB':>8} | {'tok/s b1 fp32/int8/int4':>24} {'MBU b1':>14} | "
          f"{'tok/s b32 fp32/int8/int4':>25} | {'TTFT512 ms':>10} | {'train s':>7} {'tok/s':>6} {'RSS GB':>6} | "
          f"{'import s':>8} {'RSS/file':>8} {'1st tok s':>9}")
    for r in rows if set(PARTS) <= set(parts) else []:  # the full table needs every part
        d = {(x["quant"], x["batch"]): x for x in r["decode"]}
        b1 = "/".join(f"{d[(q, 1)]['tokens_per_s']:.1f}" for q in ("none", "int8", "int4"))
        m1 = "/".join(f"{d[(q, 1)]['mbu']:.0%}" for q in ("none", "int8", "int4"))
        b32 = "/".join(f"{d[(q, 32)]['tokens_per_s']:.0f}" for q in ("none", "int8", "int4"))
        print(f"{r['arch']:<14} {r['depth']:>3} {r['params'] / 1e6:6.0f}M {d[('none', 1)]['weight_bytes'] / gb:8.2f} | "
              f"{b1:>24} {m1:>14} | {b32:>25} | {r['ttft512_ms']['none']:10.0f} | {r['train_step_s']:7.1f} "
              f"{r['train_tokens_per_s']:6.0f} {r['train_peak_rss'] / gb:6.2f} | {r['import_s']:8.1f} "
              f"{r['import_rss_over_file']:8.2f} {r['first_token_s']:9.2f}")
    out = {"bench": "scale", "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
