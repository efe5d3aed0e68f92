"""`picochat tokenizer train|eval`: the byte-level BPE tokenizer on the command line.

    picochat tokenizer train --vocab-size 4096     train on the prepared corpus -> $PICOCHAT_HOME/tokenizer
    picochat tokenizer eval                        compression (bytes per token) on train and val text

Wired into the main CLI through `register(subparsers)`.
"""
from __future__ import annotations

from picochat.common import positive_int


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


def register(sub) -> None:
    tokp = sub.add_parser("tokenizer", help="train or evaluate the BPE tokenizer").add_subparsers(dest="action", required=True)
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
