"""Pretraining corpora: a text source (data/sources.py) -> parquet shards (one `text` column, one
document per row), and reading them back.

    out_dir/train_00000.parquet, train_00001.parquet, ...   (~shard_chars of text each, row groups of 1024 docs)
    out_dir/val_00000.parquet                                (always present, possibly with zero rows)
    out_dir/meta.json                                        (doc/char counts, how val was split, ...)

Everything is written into a temp dir next to out_dir and renamed into place at the end, so a crash
never leaves a half-written corpus where the loader would find it.

Same input + same seed -> the same documents in the same order. Docs are shuffled at prepare time
with a bounded, seeded buffer: the pretraining loader reads documents in order, and a corpus
stored play-by-play (or file-by-file) would otherwise feed each batch one play at a time and make
the val estimate (the first few val batches) cover only one play.
"""
from __future__ import annotations

import math
import os
import random
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from picochat.common import PicochatError, atomic_dir, data_dir as default_data_dir, write_json_atomic
from picochat.data.sources import Source, default_name, open_source

SPLITS = ("train", "val")
SCHEMA = pa.schema([("text", pa.string())])
SHARD_CHARS = 50_000_000   # ~50 MB of (mostly ASCII) text per shard, as in nanochat
ROW_GROUP_DOCS = 1024      # iter_documents(start=) skips whole row groups via metadata
SHUFFLE_BUFFER = 10_000    # docs; covers the whole embedded corpus, bounded memory for big ones


# --------------------------------------------------------------------------- writing

class _ShardWriter:
    """Appends docs (through a seeded shuffle buffer) to {split}_NNNNN.parquet files in `root`."""

    def __init__(self, root: Path, split: str, shard_chars: int, row_group_docs: int, seed: int):
        self.root, self.split, self.shard_chars, self.row_group_docs = root, split, shard_chars, row_group_docs
        self.rng = random.Random(f"{seed}:{split}")
        self.pending: list[str] = []          # shuffle buffer
        self.buf: list[str] = []              # next row group
        self.shards: list[Path] = []          # written shards, the open one last
        self.writer, self.open_chars = None, 0  # the open shard and the chars in it
        self.docs = self.chars = 0            # counted on add (before the buffer), for the caps

    def add(self, text: str) -> None:
        self.docs, self.chars = self.docs + 1, self.chars + len(text)
        self.pending.append(text)
        if len(self.pending) >= SHUFFLE_BUFFER:
            i = self.rng.randrange(len(self.pending))
            self.pending[i], self.pending[-1] = self.pending[-1], self.pending[i]
            self._emit(self.pending.pop())

    def _emit(self, text: str) -> None:
        self.buf.append(text)
        self.open_chars += len(text)
        if len(self.buf) >= self.row_group_docs:
            self._flush()
            if self.open_chars >= self.shard_chars:  # roll at row-group boundaries only
                self._close_shard()

    def _flush(self) -> None:
        if self.buf:
            if self.writer is None:
                self.shards.append(self.root / f"{self.split}_{len(self.shards):05d}.parquet")
                self.writer = pq.ParquetWriter(self.shards[-1], SCHEMA, compression="zstd")
            self.writer.write_table(pa.table({"text": self.buf}, schema=SCHEMA), row_group_size=self.row_group_docs)
            self.buf = []

    def _close_shard(self) -> None:
        self._flush()
        if self.writer is not None:
            self.writer.close()
            self.writer, self.open_chars = None, 0

    def _drain(self) -> None:
        self.rng.shuffle(self.pending)
        for t in self.pending:
            self._emit(t)
        self.pending = []
        self._close_shard()

    def pop_tail(self, n: int) -> list[str]:
        """Remove and return the last n written docs (rewriting only the shards they sit in)."""
        self._drain()
        texts: list[str] = []
        while self.shards and len(texts) < n:
            path = self.shards.pop()
            texts[:0] = pq.read_table(path, columns=["text"]).column(0).to_pylist()
            path.unlink()
        keep, tail = texts[:len(texts) - n], texts[len(texts) - n:]
        for t in keep:
            self._emit(t)
        self.docs, self.chars = self.docs - len(tail), self.chars - sum(map(len, tail))
        return tail

    def close(self) -> None:
        self._drain()
        if not self.shards:  # an empty split still gets a (zero-row) shard so readers find the files
            self.shards.append(self.root / f"{self.split}_00000.parquet")
            pq.write_table(pa.table({"text": []}, schema=SCHEMA), self.shards[0], compression="zstd")


def _write_splits(src: Source, train: _ShardWriter, val: _ShardWriter, val_fraction, max_docs, max_chars) -> bool:
    """Stream the source's docs into the two writers and close them; True if val is the carved-off tail."""
    # Limits apply to the total; in group mode each split gets its share of them (val at least 1).
    # In tail mode everything goes to train first and the val tail is carved off at the end.
    vf = 0.0 if src.tail else val_fraction

    def shares(m):  # one limit -> (val cap, train cap)
        if m is None:
            return math.inf, math.inf
        v = max(1, round(m * vf)) if vf > 0 else 0
        return v, max(1, m - v)

    (val_docs, train_docs), (val_chars, train_chars) = shares(max_docs), shares(max_chars)
    limits = {"train": (train_docs, train_chars), "val": (val_docs, val_chars)}
    full = lambda w: w.docs >= limits[w.split][0] or w.chars >= limits[w.split][1]
    with tqdm(desc="preparing corpus", unit=" docs", disable=None) as bar:
        try:
            for text, is_val in src.docs:
                if not text.strip():
                    src.info["empty_docs"] = src.info.get("empty_docs", 0) + 1
                    continue
                w = val if (is_val and not src.tail) else train
                if full(w):
                    if full(train) and (src.tail or full(val) or val_fraction == 0):
                        break
                    continue
                w.add(text)
                bar.update()
        finally:
            if hasattr(src.docs, "close"):
                src.docs.close()  # stop a lazy download generator early
    # tail mode (no natural groups), or a group split that ended up with no val docs: take the tail
    carved = val_fraction > 0 and val.docs == 0 and train.docs >= 2
    if carved:
        n_val = min(train.docs - 1, max(1, round(val_fraction * train.docs)))
        for t in train.pop_tail(n_val):
            val._emit(t)  # already shuffled by train's buffer
            val.docs, val.chars = val.docs + 1, val.chars + len(t)
    train.close()
    val.close()
    return carved


def prepare(source: str, out_dir=None, *, overwrite: bool = False, val_fraction: float = 0.05,
            max_docs: int | None = None, max_chars: int | None = None, hf_config: str | None = None,
            text_field: str = "text", seed: int = 0, shard_chars: int = SHARD_CHARS,
            row_group_docs: int = ROW_GROUP_DOCS) -> dict:
    """Write `source` as train/val parquet shards + meta.json under out_dir; returns the meta dict."""
    if not 0 <= val_fraction < 1:
        raise PicochatError(f"val_fraction must be in [0, 1), got {val_fraction}")
    for name, v in (("max_docs", max_docs), ("max_chars", max_chars), ("shard_chars", shard_chars),
                    ("row_group_docs", row_group_docs)):
        if v is not None and v < 1:
            raise PicochatError(f"{name} must be >= 1, got {v}")
    out = Path(out_dir).expanduser() if out_dir is not None else default_data_dir(default_name(source))
    src = open_source(source, hf_config=hf_config, text_field=text_field, val_fraction=val_fraction, seed=seed)
    _refuse_occupied(out, overwrite)  # checked again at the final rename
    with atomic_dir(out) as tmp:
        train, val = (_ShardWriter(tmp, split, shard_chars, row_group_docs, seed) for split in SPLITS)
        carved = _write_splits(src, train, val, val_fraction, max_docs, max_chars)
        if train.docs + val.docs == 0:
            raise PicochatError(f"source {source} produced no documents")
        if src.info.get("bad_lines"):
            print(f"warning: skipped {src.info['bad_lines']} bad JSONL line(s) (not JSON, or no string "
                  f"{text_field!r} field), e.g. {', '.join(src.info['bad_line_examples'])}", file=sys.stderr)
        meta = {"source": source, "train_docs": train.docs, "val_docs": val.docs, "train_chars": train.chars,
                "val_chars": val.chars, "val_split": f"last {val.docs} doc(s)" if carved else src.val_split,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "train_shards": len(train.shards), "val_shards": len(val.shards), "val_fraction": val_fraction,
                "max_docs": max_docs, "max_chars": max_chars, "hf_config": hf_config, "text_field": text_field,
                "seed": seed, **src.info}
        write_json_atomic(tmp / "meta.json", meta)
        _refuse_occupied(out, overwrite)  # it may have appeared while we were writing
    return meta


def _refuse_occupied(out: Path, overwrite: bool) -> None:
    if not overwrite and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PicochatError(f"{out} already exists; pass --overwrite to replace it")


# --------------------------------------------------------------------------- reading

_announced: set[Path] = set()  # corpora this process has said it reads


def list_shards(data_dir, split: str) -> list[Path]:
    """A split's shard files; every reader comes through here, so it says (once) which corpus it reads."""
    if split not in SPLITS:
        raise PicochatError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    shards = sorted(Path(data_dir).glob(f"{split}_*.parquet"))
    if not shards:
        # a user who prepared their own corpus and forgot --data NAME is told its name
        others = sorted(m.parent.name for m in Path(data_dir).parent.glob("*/meta.json"))
        raise PicochatError(f"no prepared data at {data_dir}; run `picochat data prepare --source embedded` first"
                            + (f" (prepared: {', '.join(others)}; pass --data NAME)" if others else ""))
    where = Path(data_dir).resolve()
    # a stage run on the wrong corpus (e.g. embedded while the user meant their own) is visible in its log;
    # stderr keeps stdout for results, and with torchrun only rank 0 speaks
    if where not in _announced and os.environ.get("RANK", "0") == "0":
        _announced.add(where)
        print(f"reading corpus {where.name} ({where})", file=sys.stderr)
    return shards


def count_documents(data_dir, split: str) -> int:
    return sum(pq.read_metadata(p).num_rows for p in list_shards(data_dir, split))


def iter_documents(data_dir, split: str, start: int = 0) -> Iterator[str]:
    """All docs of a split in stored order, from global doc index `start` (errors raise at call time)."""
    if start < 0:
        raise PicochatError(f"start must be >= 0, got {start}")
    shards = list_shards(data_dir, split)

    def gen(skip: int):
        for path in shards:
            pf = pq.ParquetFile(path)
            for rg in range(pf.num_row_groups):
                n = pf.metadata.row_group(rg).num_rows
                if skip >= n:  # a row group before start: skipped by its metadata, never read
                    skip -= n
                    continue
                yield from pf.read_row_group(rg, columns=["text"]).column(0).to_pylist()[skip:]
                skip = 0

    return gen(start)


def sample_texts(data_dir, split: str, max_chars: int | None) -> list[str]:
    """The first docs of a split totalling max_chars (the last one cut to fit); None = all."""
    out, total = [], 0
    for text in iter_documents(data_dir, split):
        if max_chars is not None and total + len(text) >= max_chars:
            if max_chars - total > 0:
                out.append(text[: max_chars - total])
            break
        out.append(text)
        total += len(text)
    return out
