"""`picochat export hf` at realistic sizes: wall time and the logits check's max |difference|.

    python benchmarks/export_hf.py --depths 4,8,12 --vocab 65536

Each depth gets a model with every matrix random (init_weights, then the zero-initialised output
projections and lm_head drawn like the other matrices, so logits are far from uniform), saved as a
checkpoint in a temporary $PICOCHAT_HOME with a small trained tokenizer (the model's vocab is
padded past it, as a real 65,536-entry vocab would be). The export's own check compares
transformers' and picochat's fp32 logits on a fixed 96-token prompt. Prints a table and a final
JSON line. Needs transformers >= 5.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depths", default="4,8,12", help="comma-separated depths (default 4,8,12)")
    ap.add_argument("--vocab", type=int, default=65536, help="model vocab size (default 65536, nanochat's)")
    ap.add_argument("--dtype", default="float32", help="export dtype (default float32)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="picochat-export-bench-") as root:  # GBs of checkpoints: cleaned up
        os.environ["PICOCHAT_HOME"] = root
        run(args)


def run(args) -> None:

    from picochat import checkpoint as ck
    from picochat.common import tokenizer_dir
    from picochat.export.hf import export_hf
    from picochat.export.hf_tokenizer import SAMPLE_TEXTS
    from picochat.model.config import config_from_depth
    from picochat.model.gpt import GPT
    from picochat.tokenizer import Tokenizer

    tok = Tokenizer.train(SAMPLE_TEXTS * 20 + ["the quick brown fox jumps over the lazy dog " * 50], vocab_size=1024)
    tok.save(tokenizer_dir())
    rows = []
    for depth in [int(d) for d in args.depths.split(",")]:
        torch.manual_seed(depth)
        cfg = config_from_depth(depth, vocab_size=args.vocab, sequence_len=2048)
        model = GPT(cfg)
        model.init_weights()
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, torch.nn.Linear) and not mod.weight.abs().sum():
                    mod.weight.normal_(0, 1 / math.sqrt(mod.weight.shape[1]))
        ck.save_checkpoint(f"base/d{depth}", 1, model, cfg, {"stage": "base", "tokenizer_vocab": tok.vocab_size})
        del model
        out = Path(os.environ["PICOCHAT_HOME"]) / "hf" / f"d{depth}"
        t0 = time.perf_counter()
        r = export_hf(f"base/d{depth}", out, dtype=args.dtype)
        seconds = time.perf_counter() - t0
        rows.append({"depth": depth, "params_M": round(sum(p.numel() for p in GPT(cfg).parameters()) / 1e6, 1),
                     "dtype": args.dtype, "export_s": round(seconds, 1),
                     "safetensors_MB": round((out / "model.safetensors").stat().st_size / 1e6, 1),
                     "max_abs_logit_diff": r["max_abs_logit_diff"], "prompt_tokens": r["prompt_tokens"]})
        print(rows[-1], flush=True)
    cols = list(rows[0])
    print("  ".join(f"{c:>18}" for c in cols))
    for row in rows:
        print("  ".join(f"{row[c]!s:>18}" for c in cols))
    print(json.dumps({"benchmark": "export_hf", "torch_threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
