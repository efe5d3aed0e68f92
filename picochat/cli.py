"""The one `picochat` command. Each subcommand is a thin function over the modules.

    picochat data prepare --source embedded       corpus -> parquet shards
    picochat tokenizer train|eval                 BPE tokenizer
    picochat train base --depth 4                 pretraining (also under torchrun; train/cli.py)
    picochat sample --model base/d4 -p "..."      generate text from a checkpoint

Errors the user can fix (PicochatError, bad flags) print one line and exit non-zero.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

from picochat.common import PicochatError, apply_threads, number_type, positive_int
from picochat.inference import cli as inference_cli


class _Parser(argparse.ArgumentParser):
    """argparse prints usage + error over two lines; we print one line and point at --help."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


_positive_int = positive_int
_fraction = number_type(float, lambda v: 0 < v < 1, "a number in (0, 1)")


# ----------------------------------------------------------------------------- data

def cmd_data_prepare(args):
    from picochat.common import data_dir
    from picochat.data.corpus import prepare
    t0 = time.time()
    meta = prepare(args.source, data_dir(args.name), overwrite=args.overwrite, val_fraction=args.val_fraction,
                   max_docs=args.max_docs, max_chars=args.max_chars, hf_config=args.hf_config,
                   text_field=args.text_field)
    print(f"prepared {args.source} -> {data_dir(args.name)}: {meta['train_docs']:,} train docs "
          f"({meta['train_chars']:,} chars), {meta['val_docs']:,} val docs ({meta['val_chars']:,} chars) "
          f"in {time.time() - t0:.1f}s")


# ----------------------------------------------------------------------------- tokenizer

def cmd_tokenizer_train(args):
    from picochat.common import data_dir, tokenizer_dir
    from picochat.data.corpus import sample_texts
    from picochat.tokenizer_stats import train_tokenizer
    texts = sample_texts(data_dir(args.data), "train", args.max_chars)
    tok, stats = train_tokenizer(texts, args.vocab_size, tokenizer_dir())
    print(f"trained tokenizer: vocab {tok.vocab_size:,} on {sum(map(len, texts)):,} chars in "
          f"{stats.get('seconds', 0):.1f}s -> {tokenizer_dir()}")


def cmd_tokenizer_eval(args):
    from picochat.common import data_dir, tokenizer_dir
    from picochat.data.corpus import sample_texts
    from picochat.tokenizer import Tokenizer
    from picochat.tokenizer_stats import evaluate_tokenizer, format_table
    tok = Tokenizer.load(tokenizer_dir())
    for split in ("train", "val"):
        texts = sample_texts(data_dir(args.data), split, args.max_chars)
        print(f"== {split} ({sum(map(len, texts)):,} chars)")
        print(format_table(evaluate_tokenizer(tok, texts)))


# ----------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="picochat", description="Train, evaluate and serve your own small ChatGPT.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    data = sub.add_parser("data", help="prepare pretraining corpora").add_subparsers(dest="action", required=True)
    p = data.add_parser("prepare", help="write a corpus as parquet shards with a val split")
    p.add_argument("--source", default="embedded", help="embedded (Shakespeare, offline) | hf:REPO (online, e.g. "
                   "hf:HuggingFaceFW/fineweb-edu) | local:PATH (folder/file of .txt/.jsonl/.parquet) (default embedded)")
    p.add_argument("--name", default="embedded", help="name to store it under $PICOCHAT_HOME/data (default embedded)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared corpus of that name")
    p.add_argument("--val-fraction", type=_fraction, default=0.05, help="share of text held out for validation (default 0.05)")
    p.add_argument("--max-docs", type=_positive_int, help="stop after this many documents")
    p.add_argument("--max-chars", type=_positive_int, help="stop after this many characters")
    p.add_argument("--hf-config", help="dataset config for hf: sources (e.g. sample-10BT)")
    p.add_argument("--text-field", default="text", help="text column/field for hf/jsonl/parquet sources (default text)")
    p.set_defaults(func=cmd_data_prepare)

    tokp = sub.add_parser("tokenizer", help="train or evaluate the BPE tokenizer").add_subparsers(dest="action", required=True)
    p = tokp.add_parser("train", help="train a byte-level BPE on the prepared corpus")
    p.add_argument("--data", default="embedded", help="prepared corpus name (default embedded)")
    p.add_argument("--vocab-size", type=_positive_int, default=4096, help="vocabulary size incl. special tokens (default 4096)")
    p.add_argument("--max-chars", type=_positive_int, default=20_000_000, help="characters of training text to use (default 20M)")
    p.set_defaults(func=cmd_tokenizer_train)
    p = tokp.add_parser("eval", help="compression (bytes per token) on train and val text")
    p.add_argument("--data", default="embedded", help="prepared corpus name (default embedded)")
    p.add_argument("--max-chars", type=_positive_int, default=2_000_000, help="characters per split to evaluate (default 2M)")
    p.set_defaults(func=cmd_tokenizer_eval)

    inference_cli.register(sub, data)  # picochat sample|chat, picochat data distill (picochat/inference/cli.py)

    # command groups that live next to their code: each module has register(subparsers)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


COMMAND_MODULES = (
    "picochat.train.cli",    # picochat train base|mid|sft|rl
    "picochat.safety.cli",   # picochat safety ...
    "picochat.serve.cli",    # picochat serve
    "picochat.eval.cli",     # picochat eval base|chat, picochat report
    "picochat.bench.cli",    # picochat bench attention|train
    "picochat.export.cli",   # picochat export hf / import hf
)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_threads(getattr(args, "threads", None))  # before any torch work of the command
    try:
        args.func(args)
    except PicochatError as e:
        print(f"picochat: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # invalid values caught deep inside (sampling params, configs)
        if os.environ.get("PICOCHAT_DEBUG"):
            raise
        print(f"picochat: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("picochat: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
