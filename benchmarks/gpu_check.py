"""The GPU check: one command that measures what a GPU user compares, in under 10 minutes on one H100/H200.

    bash scripts/gpu_check.sh             # on a CUDA machine: table + final JSON line (docs/gpu.md)
    bash scripts/gpu_check.sh --dry-run   # anywhere: print the plan, then run every part tiny on CPU

Parts (each a real code path of picochat, on random weights and random tokens: a GPU machine may
have no network, corpus or tokenizer; throughput and memory do not depend on the values):
 1. training tokens/s and MFU (model FLOPs per token x tokens/s / the card's dense bf16 peak) at d12 and
    d20, bf16 autocast, torch.compile default, through the real training loop (benchmarks/train.py's child);
 2. grad checkpointing at d20: peak memory with / without (CUDA max allocated) and the speed cost;
 3. decode tokens/s in bf16 at batch 1/8/32, eager and with the CUDA-graph decode step; the batched
    speed-up over batch 1 and the CUDA-graph over eager ratio (benchmarks/decode_step.py);
 3b. `picochat bench infer` at d20: bf16 weights, --quant int8 and int4 at batch 1/8/32 (TTFT, TPOT, tokens/s,
    MBU against the measured read bandwidth, weight bytes); off the CPU the int8/int4 weights are
    dequantized inside the matmul (inference/quant.py), so this is their first GPU measurement;
 4. speculative decoding (batch 1, greedy) with a layer-skip self-draft: the target's first quarter of
    layers with its embeddings and head (no second model can be trained inside a 10-minute check;
    with random weights the acceptance rate says little, the ratio measures the machinery);
 5. MLA vs MHA decode at context 4096, batch 16 (`picochat bench attention --decode`);
 6. a 1-GPU torchrun smoke run of `picochat train base` (nccl) on a corpus made of this repo's docs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# dense bf16 tensor-core peak FLOP/s by card name (vendor datasheets, no sparsity)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
             "RTX 4090": 165e12, "RTX 3090": 71e12}


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def plan(dry: bool) -> dict:
    """Sizes per part: the real ones, or tiny ones for --dry-run on CPU."""
    if dry:
        return dict(device="cpu", vocab=512, train=[(2, 64, 2)], steps=3, warmup=1, ckpt_depth=2, compile="off", dtype="fp32",
                    decode=dict(depth=2, batch="1,2", tokens=8, prompt=8, fast="eager"), spec_depth=4,
                    attn=dict(depth=2, ctx="64", batch="2"), smoke_steps=3,
                    infer=dict(depth=2, batch="1,2", tokens="8", prompt="8"))
    return dict(device="cuda", vocab=65536, train=[(12, 2048, 16), (20, 2048, 16)], steps=12, warmup=4, ckpt_depth=20,
                compile="default", dtype="bf16", decode=dict(depth=12, batch="1,8,32", tokens=128, prompt=128,
                                                                  fast="cuda-graphs"),
                spec_depth=12, attn=dict(depth=12, ctx="4096", batch="16"), smoke_steps=20,
                infer=dict(depth=20, batch="1,8,32", tokens="64", prompt="64"))


def run_json(cmd: list[str], env: dict | None = None) -> dict:
    """Run a command that ends with a JSON line; its JSON, or a clear failure."""
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed: {tail}")
    out = json.loads(lines[-1])
    out["_wall_s"] = round(time.time() - t0, 1)
    return out


def train_part(p: dict, gpu: str) -> list[dict]:
    from train import _run_child  # benchmarks/train.py: this script's folder is on sys.path
    from picochat.model.config import config_from_depth
    from picochat.model.gpt import GPT
    import torch
    rows = []
    variants = [(d, T, B, False) for d, T, B in p["train"]] + [(p["ckpt_depth"], *p["train"][-1][1:], True)]
    for depth, T, B, ckpt in variants:
        cfg = {"depth": depth, "steps": p["steps"], "warmup": p["warmup"], "B": B, "T": T, "data": "random",
               "vocab": p["vocab"], "device": p["device"], "workers": 0, "compile": p["compile"], "grad_checkpoint": ckpt}
        r = _run_child(cfg)
        with torch.device("meta"):
            flops = GPT(config_from_depth(depth, p["vocab"], T)).flops_per_token()
        peak = peak_flops(gpu)
        rows.append({"depth": depth, "seq": T, "batch": B, "grad_ckpt": ckpt, "params_M": round(r["params"] / 1e6, 1),
                     "tok_s": round(r["tok_per_s"]), "mfu": round(flops * r["tok_per_s"] / peak, 4) if peak else None,
                     "peak_mem_GiB": round(r["peak_mb"] / 1024, 2), "compile": r["compile_ran"]})
    return rows


def decode_part(p: dict) -> dict:
    d = p["decode"]
    return run_json([sys.executable, "benchmarks/decode_step.py", "--device", p["device"], "--dtype", p["dtype"],
                     "--depth", str(d["depth"]), "--vocab", str(p["vocab"]), "--batch", d["batch"], "--tokens", str(d["tokens"]),
                     "--prompt-len", str(d["prompt"]), "--reps", "2", "--fast", d["fast"]])


def infer_part(p: dict) -> dict:
    """`picochat bench infer` at d20: bf16 weights, int8 and int4 (TTFT, TPOT, tok/s, MBU, MFU)."""
    d = p["infer"]
    return run_json([sys.executable, "-m", "picochat.cli", "bench", "infer", "--device", p["device"], "--dtype", p["dtype"],
                     "--quant", "none,int8,int4", "--depth", str(d["depth"]), "--vocab", str(p["vocab"]),
                     "--batch", d["batch"], "--new-tokens", d["tokens"], "--prompt-len", d["prompt"], "--reps", "2"])


def speculative_part(p: dict) -> dict:
    import torch
    from picochat.device import pick_device, resolve_dtype
    from picochat.inference.engine import Engine
    from picochat.inference.speculative import generate_speculative
    from picochat.model.config import config_from_depth
    from picochat.model.gpt import GPT
    device = pick_device(p["device"])
    torch.manual_seed(0)
    depth = p["spec_depth"]
    target = GPT(config_from_depth(depth, p["vocab"], 1024)).to(device)
    target.init_weights()
    for prm in target.parameters():
        torch.nn.init.normal_(prm, std=0.02)
    draft = GPT(dataclasses.replace(target.config, n_layer=max(1, depth // 4))).to(device)
    draft.load_state_dict({k: v for k, v in target.state_dict().items() if k in draft.state_dict()})
    dtype = resolve_dtype(p["dtype"], device)
    for m in (target, draft):
        m.to(dtype)
        m.reset_rotary(device)
        m.eval()
    prompt = torch.randint(0, p["vocab"], (64,)).tolist()
    engine = Engine(target, decode_step="eager")
    n = 128 if device.type == "cuda" else 16
    engine.generate([prompt], n, temperature=0.0, stop_tokens=set())  # warm-up
    generate_speculative(target, draft, prompt, n, temperature=0.0)
    t0 = time.perf_counter()
    plain = engine.generate([prompt], n, temperature=0.0, stop_tokens=set())[0]
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    spec, stats = generate_speculative(target, draft, prompt, n, temperature=0.0)
    t_spec = time.perf_counter() - t0
    return {"draft": f"layer-skip: first {draft.config.n_layer} of {depth} layers", "ratio": round(t_plain / t_spec, 3),
            "acceptance": round(stats.acceptance_rate, 3), "identical": spec == plain or "bf16 rounding may differ"}


def attention_part(p: dict) -> dict:
    a = p["attn"]
    return run_json([sys.executable, "-m", "picochat.cli", "bench", "attention", "--depth", str(a["depth"]),
                     "--vocab-size", str(p["vocab"]), "--decode", "--contexts", a["ctx"], "--batches", a["batch"],
                     "--decode-steps", "5", "--device", p["device"]])


def smoke_part(p: dict) -> dict:
    """torchrun x1: data prepare (this repo's docs) -> tokenizer -> train base, under torchrun."""
    with tempfile.TemporaryDirectory() as home:
        env = dict(os.environ, PICOCHAT_HOME=home, OMP_NUM_THREADS="1")
        cli = [sys.executable, "-m", "picochat.cli"]
        texts = Path(home) / "texts"
        texts.mkdir()
        for md in sorted(ROOT.glob("docs/*.md")) + [ROOT / "README.md"]:  # a local corpus: plain .txt files
            (texts / f"{md.stem}.txt").write_text(md.read_text(encoding="utf-8"), encoding="utf-8")
        for cmd in (cli + ["data", "prepare", "--source", f"local:{texts}", "--name", "docs"],
                    cli + ["tokenizer", "train", "--data", "docs", "--vocab-size", "512"]):
            subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=ROOT)
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                               "-m", "picochat.cli", "train", "base", "--data", "docs", "--depth", "2", "--seq-len",
                               "128", "--device-batch-size", "4", "--steps", str(p["smoke_steps"]), "--eval-every",
                               "0", "--device", p["device"], "--loader-workers", "0"],
                              capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun smoke run failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        last = [ln for ln in proc.stdout.splitlines() if "done: step" in ln]
        return {"ok": True, "wall_s": round(time.time() - t0, 1), "result": last[-1].strip() if last else ""}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="print the plan and run every part tiny on CPU")
    ap.add_argument("--only", default="train,decode,infer,speculative,attention,smoke",
                    help="comma-separated parts to run (default: all, %(default)s)")
    args = ap.parse_args()
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device; run with --dry-run to check the plan on CPU", file=sys.stderr)
        return 1
    p = plan(args.dry_run)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.dry_run else "cpu (dry run)"
    print(f"gpu_check on {gpu}, torch {torch.__version__}{' (dry run: tiny sizes on CPU)' if args.dry_run else ''}")
    for name, what in (("train", f"train tok/s + MFU at depths {[d for d, _, _ in p['train']]}, {p['compile']} compile; "
                                 f"grad checkpointing at d{p['ckpt_depth']}"),
                       ("decode", f"decode {p['dtype']} at batch {p['decode']['batch']}: eager vs {p['decode']['fast']}"),
                       ("infer", f"bench infer d{p['infer']['depth']} {p['dtype']}, int8, int4 at batch {p['infer']['batch']}"),
                       ("speculative", f"speculative decoding, layer-skip self-draft of a d{p['spec_depth']}"),
                       ("attention", f"MLA vs MHA decode at context {p['attn']['ctx']}, batch {p['attn']['batch']}"),
                       ("smoke", "torchrun --nproc_per_node=1 picochat train base (tiny)")):
        print(f"  [{name}] {what}")
    parts = {"train": lambda: train_part(p, gpu), "decode": lambda: decode_part(p), "infer": lambda: infer_part(p),
             "speculative": lambda: speculative_part(p), "attention": lambda: attention_part(p),
             "smoke": lambda: smoke_part(p)}
    results, failed = {"gpu": gpu, "torch": torch.__version__, "dry_run": args.dry_run}, []
    for name in [s.strip() for s in args.only.split(",") if s.strip()]:
        t0 = time.time()
        try:
            results[name] = parts[name]()
        except Exception as e:  # noqa: BLE001 - one failing part must not hide the others' numbers
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            failed.append(name)
        print(f"  [{name}] {time.time() - t0:.0f} s: {json.dumps(results[name])[:400]}", flush=True)
    print_table(results)
    print(json.dumps(results))
    return 1 if failed else 0


def print_table(r: dict) -> None:
    for row in r.get("train", []) if isinstance(r.get("train"), list) else []:
        print(f"train d{row['depth']:<3} seq {row['seq']} batch {row['batch']}{' grad-ckpt' if row['grad_ckpt'] else '':10} "
              f"{row['tok_s']:>10,} tok/s  MFU {row['mfu'] if row['mfu'] is not None else '-':>7}  "
              f"peak {row['peak_mem_GiB']} GiB")
    for row in r.get("decode", {}).get("rows", []) if isinstance(r.get("decode"), dict) else []:
        print(f"decode batch {row['batch']:>3}: eager {row['eager_tok_s']:>10,.0f} tok/s, fast {row['fast_tok_s']:>10,.0f}"
              f" tok/s ({row['ratio']:.2f}x), rows identical {row['rows_identical']}")
    for row in r.get("infer", {}).get("rows", []) if isinstance(r.get("infer"), dict) else []:
        print(f"infer {row['config']:<12} batch {row['batch']:>3}: {row['tokens_per_s']:>10,.0f} tok/s, TTFT "
              f"{row['ttft_ms']:.1f} ms, MBU {row['mbu']:.0%}, weights {row['weight_bytes'] / 2**30:.2f} GiB")
    if "ratio" in r.get("speculative", {}):
        s = r["speculative"]
        print(f"speculative: {s['ratio']:.2f}x plain, acceptance {s['acceptance']} ({s['draft']})")
    for variant, by_shape in r.get("attention", {}).get("decode", {}).items():
        for shape, tok_s in by_shape.items():
            print(f"attention decode {variant:<10} {shape}: {tok_s:>10,.0f} tok/s")


if __name__ == "__main__":
    sys.exit(main())
