"""Model designs side by side on equal tokens, at each depth: val bpb curves of `picochat train base` runs.

By default picochat's design (nanochat 2025) vs `--arch nanochat-2026` (docs/nanochat.md):
    python benchmarks/arch_study.py                     # d4 x 400 steps and d8 x 200 steps, 2,048 tokens/step
    python benchmarks/arch_study.py --depths 4 --steps 100 --parallel 1     # a quick look
Any variants, each NAME=TRAIN FLAGS (the first is the reference), e.g. the MLA sweep in docs/attention.md:
    python benchmarks/arch_study.py --depths 8 --steps 300 --eval-batches 32 --plot docs/attention/mla_d8.png \
        --variants "mha=;mla 128+32=--attention mla;mla 128+64=--attention mla --qk-rope-head-dim 64"

Needs the prepared embedded corpus and a tokenizer in $PICOCHAT_HOME (`picochat data prepare`,
`picochat tokenizer train --vocab-size 4096`). Each run is an ordinary `picochat train base`
(tags study/<arch>/d<depth>), each architecture at its own defaults; runs go `--parallel` at a time
with `--threads` torch threads each (val bpb does not depend on either: the runs are deterministic).
Prints a table of final val bpb, writes the curves to --plot, and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ARCHS = "picochat=--arch picochat;nanochat-2026=--arch nanochat-2026"


def parse_variants(spec: str) -> list[tuple[str, list[str]]]:
    """"name=flags;name=flags" -> [(name, [flag, ...])], names unique and usable in a tag."""
    out = []
    for item in filter(None, (v.strip() for v in spec.split(";"))):
        name, sep, flags = item.partition("=")
        if not sep or not name.strip():
            raise SystemExit(f"arch_study: error: variant {item!r} is not NAME=FLAGS")
        out.append((name.strip(), flags.split()))
    if len({n for n, _ in out}) != len(out):
        raise SystemExit("arch_study: error: variant names must be unique")
    return out


def run(arch: str, depth: int, steps: int, args, flags: list[str]) -> dict:
    tag = f"study/{re.sub(r'[^A-Za-z0-9_.-]+', '-', arch)}/d{depth}"
    cmd = [sys.executable, "-m", "picochat.cli", "train", "base", "--depth", str(depth), *flags,
           "--steps", str(steps), "--seq-len", "256", "--device-batch-size", "8", "--eval-every", str(args.eval_every),
           "--eval-batches", str(args.eval_batches), "--threads", str(args.threads), "--loader-workers", "0",
           "--tag", tag, "--overwrite"]
    from picochat import checkpoint as ck
    t0 = time.time()
    done = args.reuse and ck.tag_dir(tag).exists() and ck.read_checkpoint(tag, verify=False).step == steps
    if not done:  # --reuse: a finished run of this variant (same tag and steps) is read, not trained again
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    c = ck.read_checkpoint(tag, verify=False)
    curve = [(h["step"], h["val_bpb"]) for h in c.state.get("history", []) if h.get("val_bpb") is not None]
    curve.append((c.step, c.meta["val_bpb"]))
    cfg = c.config  # KV-cache numbers per token per layer: MLA caches its latent + the shared rotary key
    kv = cfg.kv_lora_rank + cfg.qk_rope_head_dim if cfg.attention == "mla" else 2 * cfg.n_kv_head * (cfg.n_embd // cfg.n_head)
    return {"arch": arch, "depth": depth, "steps": steps, "tokens": c.meta["tokens"], "params": c.meta["num_params"],
            "kv_per_layer": kv, "kv_vs_mha": round(kv / (2 * cfg.n_embd), 4),
            "val_bpb": round(c.meta["val_bpb"], 4), "wall_s": None if done else round(time.time() - t0, 1), "curve": curve}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    depths = sorted({r["depth"] for r in rows})
    fig, axes = plt.subplots(1, len(depths), figsize=(5 * len(depths), 3.6), squeeze=False)
    for ax, d in zip(axes[0], depths):
        for r in (r for r in rows if r["depth"] == d):
            steps, bpb = zip(*r["curve"])
            ax.plot(steps, bpb, marker="o", ms=3, label=f"{r['arch']} ({r['params'] / 1e6:.1f}M params)")
        ax.set_title(f"d{d}, {rows[0]['tokens'] // rows[0]['steps']:,} tokens/step")
        ax.set_xlabel("step")
        ax.set_ylabel("val bits per byte")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depths", default="4,8", help="comma-separated depths (default 4,8)")
    ap.add_argument("--steps", default="400,200", help="steps per depth, same order (default 400,200)")
    ap.add_argument("--eval-every", type=int, default=50, help="val bpb every N steps (default 50)")
    ap.add_argument("--eval-batches", type=int, default=8, help="val batches per eval (default 8)")
    ap.add_argument("--variants", default=ARCHS, help="NAME=TRAIN FLAGS;... the first is the reference "
                    f"(default {ARCHS!r})")
    ap.add_argument("--reuse", action="store_true", help="read variants already trained to --steps under their "
                    "study/ tag instead of training them again (to add a variant to a table and plot)")
    ap.add_argument("--parallel", type=int, default=2, help="runs at a time (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    ap.add_argument("--plot", default="docs/arch/val_bpb.png", help="where to write the curves (default docs/arch/val_bpb.png)")
    args = ap.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    steps = [int(s) for s in args.steps.split(",")]
    if len(steps) != len(depths):
        ap.error("--steps needs one number per depth")
    variants = parse_variants(args.variants)
    jobs = [(a, d, s, f) for d, s in zip(depths, steps) for a, f in variants]
    with ThreadPoolExecutor(args.parallel) as pool:
        rows = list(pool.map(lambda j: run(*j[:3], args, j[3]), jobs))
    w = max(14, *(len(a) for a, _ in variants))
    print(f"{'depth':>5}  {'variant':<{w}} {'params':>9} {'tokens':>10} {'KV/MHA':>7} {'val bpb':>8} {'vs ' + variants[0][0]:>11} {'wall s':>7}")
    for r in rows:
        ref = next(x for x in rows if x["depth"] == r["depth"] and x["arch"] == variants[0][0])
        wall = "reused" if r["wall_s"] is None else f"{r['wall_s']:.1f}"
        print(f"{r['depth']:>5}  {r['arch']:<{w}} {r['params']:>9,} {r['tokens']:>10,} {r['kv_vs_mha']:>7.2%} {r['val_bpb']:>8.4f} "
              f"{100 * (r['val_bpb'] / ref['val_bpb'] - 1):>+10.2f}% {wall:>7}")
    plot(rows, Path(args.plot))
    print(json.dumps({"rows": [{k: v for k, v in r.items() if k != "curve"} for r in rows], "plot": args.plot}))


if __name__ == "__main__":
    main()
