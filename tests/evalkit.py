"""Shared by the eval tests: a private PICOCHAT_HOME with a tiny tokenizer and tiny random checkpoints."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TEXT = ("Question: What is 12 + 30? Answer: 42. Spell cat: c-a-t. The quick brown fox jumps over the lazy dog. "
        "Find the number of minutes the walk takes her, $\\frac{1}{2}$ kilometers per hour \\boxed{204}. " * 40)


def tiny_model(vocab_size: int, seed: int = 0, depth: int = 1, seq_len: int = 64):
    """A random GPT whose outputs depend on its input (init_weights zeroes the output layers)."""
    from picochat.model.config import config_from_depth
    from picochat.model.gpt import GPT
    torch.manual_seed(seed)
    model = GPT(config_from_depth(depth, vocab_size, seq_len))
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "wte" not in name:
                p.normal_(0, 0.5 / p.shape[1] ** 0.5)
    return model.eval()


def make_home(home: Path, tags=("sft/t",), history: list | None = None) -> dict:
    """Tokenizer (vocab 300) + one random checkpoint per tag under `home`; returns an env for subprocesses."""
    os.environ["PICOCHAT_HOME"] = str(home)
    from picochat import checkpoint as ck
    from picochat.tokenizer import Tokenizer
    tok = Tokenizer.train([TEXT], vocab_size=300)
    tok.save(home / "tokenizer")
    for i, tag in enumerate(tags):
        model = tiny_model(tok.vocab_size, seed=i)
        stage = tag.split("/")[0]
        ck.save_checkpoint(tag, 3, model, model.config,
                           {"stage": stage, "num_params": model.num_params(), "tokens": 3 * 128, "train_time": 1.5,
                            "val_bpb": 3.0 - i, "settings": {"extra": {"source": "base/t"} if stage != "base" else {}}},
                           state={"history": history or []})
    return dict(os.environ, PICOCHAT_HOME=str(home), OMP_NUM_THREADS="1")


def picochat(args: list[str], env: dict, torchrun: int = 0, check: bool = True) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}", "--standalone"]
                if torchrun else [sys.executable])
    proc = subprocess.run([*launcher, "-m", "picochat.cli", *args], env=env, capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"picochat {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc
