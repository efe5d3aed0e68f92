"""`picochat data prepare`: a pretraining corpus (embedded, Hugging Face or local files) as parquet shards.

    picochat data prepare --source embedded                     the offline Shakespeare corpus
    picochat data prepare --source hf:HuggingFaceFW/fineweb-edu --hf-config sample-10BT --max-docs 100000
    picochat data prepare --source local:~/my_texts              stored as corpus my_texts (--data my_texts)

Wired into the main CLI through `register(subparsers)`, which returns the `data` subcommands so
that `picochat data distill` (picochat/inference/cli.py) can join them.
"""
from __future__ import annotations

import time

from picochat.common import number_type, positive_int


def cmd_data_prepare(args):
    from picochat.common import data_dir
    from picochat.data.corpus import prepare
    from picochat.data.sources import default_name
    # named after its source by default, so the user's data never silently takes the embedded corpus's place
    name = args.name or default_name(args.source)
    t0 = time.time()
    meta = prepare(args.source, data_dir(name), overwrite=args.overwrite, val_fraction=args.val_fraction,
                   max_docs=args.max_docs, max_chars=args.max_chars, hf_config=args.hf_config,
                   text_field=args.text_field)
    print(f"prepared {args.source} as corpus {name!r} -> {data_dir(name)}: {meta['train_docs']:,} train docs "
          f"({meta['train_chars']:,} chars), {meta['val_docs']:,} val docs ({meta['val_chars']:,} chars) "
          f"in {time.time() - t0:.1f}s; train on it with --data {name} "
          f"(picochat tokenizer train --data {name}, picochat train base --data {name})")


def register(sub):
    """Add `picochat data prepare`; return the `data` subparsers."""
    data = sub.add_parser("data", help="prepare pretraining corpora").add_subparsers(dest="action", required=True)
    p = data.add_parser("prepare", help="write a corpus as parquet shards with a val split")
    p.add_argument("--source", default="embedded", help="embedded (Shakespeare, offline) | hf:REPO (online, e.g. "
                   "hf:HuggingFaceFW/fineweb-edu) | local:PATH (folder/file of .txt/.jsonl/.parquet) (default %(default)s)")
    p.add_argument("--name", help="name to store it under $PICOCHAT_HOME/data, passed as --data to the later stages "
                   "(default: named after the source: embedded, local:DIR/my_texts -> my_texts, hf:ORG/REPO -> REPO)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared corpus of that name")
    p.add_argument("--val-fraction", type=number_type(float, lambda v: 0 < v < 1, "a number in (0, 1)"), default=0.05,
                   help="share of text held out for validation (default %(default)s)")
    p.add_argument("--max-docs", type=positive_int, help="stop after this many documents")
    p.add_argument("--max-chars", type=positive_int, help="stop after this many characters")
    p.add_argument("--hf-config", help="dataset config for hf: sources (e.g. sample-10BT)")
    p.add_argument("--text-field", default="text", help="text column/field for hf/jsonl/parquet sources "
                   "(default %(default)s)")
    p.set_defaults(func=cmd_data_prepare)
    return data
