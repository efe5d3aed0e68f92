"""Write tests/fixtures/nanochat/{v2026_d2,v2025_d2}: tiny REAL nanochat checkpoints plus what nanochat's own code
computes on them, the evidence behind tests/test_nanochat_import.py and tests/test_nanochat_everywhere.py.

Everything in a fixture is made by karpathy/nanochat's code at a pinned commit, run from a checkout of it:
  v2026_d2  92d63d4 (2026-07-03): value embeddings, resid/x0 lambdas, smear, backout, window pattern "SSSL", padded vocab
  v2025_d2  c6abcdf (2025-11-13): the original release
For each: parquet shards of Shakespeare (picochat's embedded corpus, nanochat's shard layout) -> nanochat's
`scripts.tok_train` (a VOCAB-token tokenizer) -> nanochat's GPT trained STEPS steps with its own optimizers and data
loader -> nanochat's `save_checkpoint` -> reference.pt from nanochat's forward, Engine and tokenizer.

Usage (from the repo root, with the venv: torch, tiktoken, rustbpe, pyarrow and filelock are what nanochat needs
here, plus psutil, which the 2025 tok_train imports for its report; put it on PYTHONPATH rather than in the venv:
`pip install --target /tmp/ncextra psutil`):
  PYTHONPATH=/tmp/ncextra python scripts/make_nanochat_fixtures.py --nanochat PATH [--out tests/fixtures/nanochat]
PATH is a nanochat git repository (bare or not) holding both commits, e.g. `git clone
https://github.com/karpathy/nanochat`. The vocabulary is small on purpose (300 tokens, padded to 320 by the 2026
code), so each fixture is well under 1 MB with fp32 logits.

Layout of each fixture (as nanochat writes it under its base dir):
  base_checkpoints/d2/model_<step>.pt, meta_<step>.json   nanochat's save_checkpoint
  tokenizer/tokenizer.pkl, token_bytes.pt                 nanochat's tok_train
  reference.pt: seqs (token ids, lengths 5, 64, SEQ), logits (full forward, fp32, (T, vocab)), prompts + greedy
  (Engine with KV cache, temperature 0: prompt + generated ids, up to position SEQ-1), texts + text_ids (encode,
  no BOS), conversation + conversation_ids + conversation_mask (render_conversation), config.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

RUN_SETTINGS = ("legacy", "depth", "aspect", "head_dim", "seq", "steps", "batch", "seed")  # into meta's user_config
DESIGNS = {"v2026_d2": ("92d63d4", False), "v2025_d2": ("c6abcdf", True)}
REPO = Path(__file__).resolve().parents[1]


def inner(a):
    """Runs inside a nanochat checkout (cwd, PYTHONPATH=.) with NANOCHAT_BASE_DIR holding data and the tokenizer."""
    import torch
    from dataclasses import asdict
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import get_tokenizer
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.engine import Engine
    torch.manual_seed(a.seed)
    tok = get_tokenizer()
    n_embd = a.depth * a.aspect
    n_head = max(1, n_embd // a.head_dim)
    kw = dict(sequence_len=a.seq, vocab_size=tok.get_vocab_size(), n_layer=a.depth, n_head=n_head,
              n_kv_head=n_head, n_embd=n_embd)
    if a.legacy:
        from nanochat.dataloader import tokenizing_distributed_data_loader
        cfg = GPTConfig(**kw)
        model = GPT(cfg)
        model.init_weights()
        opts = model.setup_optimizers()
        loader = tokenizing_distributed_data_loader(a.batch, a.seq, "train", device="cpu")
    else:
        from nanochat.dataloader import tokenizing_distributed_data_loader_bos_bestfit
        cfg = GPTConfig(**kw, window_pattern="SSSL")
        with torch.device("meta"):
            model = GPT(cfg)
        model.to_empty(device="cpu")
        model.init_weights()
        opts = [model.setup_optimizer()]
        loader = tokenizing_distributed_data_loader_bos_bestfit(tok, a.batch, a.seq, split="train", device="cpu")
    model.train()
    for _ in range(a.steps):
        x, y = next(loader)[:2]
        loss = model(x, y)
        loss.backward()
        for o in opts:
            o.step()
        model.zero_grad(set_to_none=True)
    print(f"trained {a.steps} steps, last loss {loss.item():.3f}")
    model.eval()
    save_checkpoint(os.path.join(a.out, "base_checkpoints", "d2"), a.steps, model.state_dict(), None,
                    {"step": a.steps, "val_bpb": None, "model_config": asdict(cfg), "user_config": {k: getattr(a, k) for k in RUN_SETTINGS},
                     "device_batch_size": a.batch, "max_seq_len": a.seq})
    shutil.copytree(os.path.join(os.environ["NANOCHAT_BASE_DIR"], "tokenizer"), os.path.join(a.out, "tokenizer"))
    g = torch.Generator().manual_seed(1000 + a.seed)
    seqs = [torch.randint(0, cfg.vocab_size, (1, n), generator=g) for n in (5, 64, a.seq)]
    texts = ["ROMEO. But soft, what light through yonder window breaks?", "Hello <|user_start|> world ünïcode 🙂 1234"]
    with torch.no_grad():
        logits = [model(s)[0].float() for s in seqs]
        prompts = [tok.encode(t, prepend=tok.get_bos_token_id()) for t in texts]
        eng = Engine(model, tok)
        greedy = []
        for p in prompts:
            out, _ = eng.generate_batch(p, num_samples=1, max_tokens=a.seq - len(p) - 1, temperature=0.0)
            greedy.append(out[0])
    conv = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
                         {"role": "user", "content": "Spell cat."}, {"role": "assistant", "content": "c-a-t"}]}
    ids, mask = tok.render_conversation(conv)
    torch.save({"seqs": [s[0] for s in seqs], "logits": logits, "prompts": prompts, "greedy": greedy, "texts": texts,
                "text_ids": [tok.encode(t) for t in texts], "conversation": conv, "conversation_ids": ids,
                "conversation_mask": mask, "config": asdict(cfg)}, os.path.join(a.out, "reference.pt"))
    print("wrote", a.out, json.dumps(asdict(cfg)))


def write_shards(data_dir: Path, max_chars: int):
    """Shakespeare (picochat's embedded corpus) as nanochat's shards: `text` column, the last shard is val."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from picochat.data.sources import embedded_works, split_work
    docs = [d for _, text, _ in embedded_works() for d in split_work(text)]
    train, val, n = [], [], 0
    for d in docs:
        (train if n < max_chars else val).append(d)
        n += len(d)
        if len(val) >= 20:
            break
    data_dir.mkdir(parents=True)
    for i, part in enumerate((train, val)):
        pq.write_table(pa.table({"text": part}), data_dir / f"shard_{i:05d}.parquet", row_group_size=64)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nanochat", help="a karpathy/nanochat git repository (bare or not) with both commits")
    ap.add_argument("--out", default=str(REPO / "tests" / "fixtures" / "nanochat"))
    ap.add_argument("--vocab", type=int, default=300)
    ap.add_argument("--tok-chars", type=int, default=1_000_000, help="characters of text for the tokenizer and shards")
    ap.add_argument("--designs", default=",".join(DESIGNS))
    # the inner run (inside a nanochat checkout)
    ap.add_argument("--inner", metavar="OUT_DIR", help=argparse.SUPPRESS)
    ap.add_argument("--legacy", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--aspect", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16, help="rows of SEQ tokens per step")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.inner:
        a.out = a.inner
        return inner(a)
    if not a.nanochat:
        ap.error("--nanochat PATH is required (git clone https://github.com/karpathy/nanochat)")
    work = Path(tempfile.mkdtemp(prefix="nanochat-fixtures-"))
    data = work / "data"
    write_shards(data, a.tok_chars)
    for name in a.designs.split(","):
        commit, legacy = DESIGNS[name]
        tree, base = work / f"nanochat-{commit}", work / f"base-{commit}"
        tree.mkdir()
        base.mkdir()
        archive = subprocess.run(["git", f"--git-dir={_git_dir(a.nanochat)}", "archive", commit],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        for sub in ("base_data", "base_data_climbmix"):  # the 2025 and the 2026 code's shard folders
            os.symlink(data, base / sub)
        path = os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH", "")) if p)
        env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), PYTHONPATH=path, OMP_NUM_THREADS="1")
        flag = "_" if legacy else "-"
        subprocess.run([sys.executable, "-m", "scripts.tok_train", f"--vocab{flag}size", str(a.vocab),
                        f"--max{flag}chars", str(a.tok_chars)], cwd=tree, env=env, check=True)
        dst = Path(a.out) / name
        shutil.rmtree(dst, ignore_errors=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--inner", str(dst), "--depth", str(a.depth),
               "--aspect", str(a.aspect), "--head-dim", str(a.head_dim), "--seq", str(a.seq), "--steps",
               str(a.steps), "--batch", str(a.batch), "--seed", str(a.seed)] + (["--legacy"] if legacy else [])
        subprocess.run(cmd, cwd=tree, env=env, check=True)
        total = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
        print(f"{name}: nanochat {commit}, {total:,} bytes")
    shutil.rmtree(work)


def _git_dir(path: str) -> str:
    p = Path(path)
    return str(p / ".git") if (p / ".git").exists() else str(p)


if __name__ == "__main__":
    main()
