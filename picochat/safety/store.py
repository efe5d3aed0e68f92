"""Kill-safe storage for the safety stages: JSONL record stores, the LLM call cache, whole-file artifacts.

A stage appends one fsynced JSON line per finished record, keyed by "id", and a rerun skips the ids
already there; a kill -9 can only leave a torn last line, which is ignored and cut away before the
next append. The call cache is one JSON file per request, on disk before the caller sees the reply.
"""
from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path

from picochat.common import PicochatError, atomic_path
from picochat.data.conversations import validate


def stable_hash(*parts: str, n: int = 16) -> str:
    """A short hex digest that is the same on every run and machine (unlike hash())."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\x00")  # separator, so ("ab", "c") and ("a", "bc") differ
    return h.hexdigest()[:n]


def unit_float(*parts: str) -> float:
    """A deterministic pseudo-random number in [0, 1) derived from the parts."""
    return int(stable_hash(*parts, n=13), 16) / float(16 ** 13)


class JsonlStore:
    """Append-only JSONL of records keyed by "id"; survives kill -9 at any point."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, dict] = {}
        self._torn_at: int | None = None
        self._f = None
        if self.path.exists():
            self._load(self.path.read_bytes())

    def _load(self, data: bytes) -> None:
        good_end = 0  # byte offset just past the last complete, parseable line
        for line in data.split(b"\n")[:-1]:  # what follows the last newline is nothing or a torn line
            end = good_end + len(line) + 1
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    # only the very last line can be torn; garbage in the middle is real corruption
                    if data[end:].strip():
                        raise PicochatError(f"{self.path}: corrupt line at byte {good_end}; fix or delete the file")
                    break
                if isinstance(rec, dict) and "id" in rec:
                    self.records[str(rec["id"])] = rec  # append() never repeats an id; replace() means "newer"
            good_end = end
        if good_end < len(data):
            self._torn_at = good_end  # cut off before the first append, not now: a run that stops at its
            # preflight leaves every file of the earlier run exactly as it was

    def __contains__(self, rid: str) -> bool:
        return rid in self.records

    def get(self, rid: str):
        return self.records.get(rid)

    def append(self, record: dict) -> None:
        if str(record["id"]) not in self.records:  # idempotent: a rerun never duplicates an id
            self.replace(record)

    def replace(self, record: dict) -> None:
        """Write `record` even if its id is there already (it supersedes the old line)."""
        if self._f is None:
            if self._torn_at is not None:
                with open(self.path, "r+b") as f:
                    f.truncate(self._torn_at)
                    os.fsync(f.fileno())
                self._torn_at = None
            self._f = open(self.path, "a", encoding="utf-8")
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())  # the record is on disk before we count it as done
        self.records[str(record["id"])] = record

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def request_key(base_url: str, model: str, messages: list[dict], temperature: float, max_tokens: int,
                sample: int, shape: dict | None = None) -> str:
    """The call cache's key: what determines the answer, never the role name (roles sharing an endpoint
    share entries) nor the API key. shape: the request's extra body fields when a role renames, drops or
    adds any (params/extra); None for the plain OpenAI shape, so keys made before roles could say that
    stay valid."""
    payload = {"base_url": base_url.rstrip("/"), "model": model, "messages": messages,
               "temperature": round(float(temperature), 6), "max_tokens": int(max_tokens), "sample": int(sample)}
    if shape:
        payload["shape"] = shape
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class CallCache:
    """Content-addressed cache of LLM calls: <root>/<key[:2]>/<key>.json, written atomically."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"  # fan out: no directory with 100k files

    def get(self, key: str) -> dict | None:
        try:
            return json.loads(self._path(key).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            # not cached; a broken entry cannot come from atomic writes, but a hand-edited one should cost a
            # call, not a crash
            return None

    def put(self, key: str, entry: dict) -> None:
        write_synced(self._path(key), json.dumps(entry, ensure_ascii=False))


def write_synced(path: str | os.PathLike, text: str) -> None:
    """Write a whole file at once, fsynced: readers see the old file or the new one, never half."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_jsonl_atomic(path: str | os.PathLike, records: list[dict]) -> None:
    write_synced(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of the non-blank lines of a text file; PicochatError when it is missing."""
    if not path.is_file():
        raise PicochatError(f"{path} not found")
    return [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1) if line.strip()]


def read_jsonl(path: str | os.PathLike, *, strict: bool = True) -> list[dict]:
    """Read a JSONL file of objects. strict=False skips bad lines instead of raising."""
    path = Path(path)
    out = []
    for n, line in _lines(path):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if strict:
                raise PicochatError(f"{path}:{n}: invalid JSON ({e.msg})") from None
    return out


def read_conversations(path: Path) -> tuple[list[tuple[int, dict, list[dict], dict]], list[dict]]:
    """Conversation JSONL (records or bare message lists) -> ([(line, record or {}, messages without the
    system one, meta)], [{line, reason} for each invalid line])."""
    good, bad = [], []
    for n, line in _lines(path):
        try:
            rec = json.loads(line)
            msgs = validate(rec)
        except ValueError as e:  # JSONDecodeError is one too
            bad.append({"line": n, "reason": f"invalid JSON ({e.msg})" if isinstance(e, json.JSONDecodeError)
                        else str(e)})
            continue
        rec = rec if isinstance(rec, dict) else {}
        meta = rec["meta"] if isinstance(rec.get("meta"), dict) else {}
        good.append((n, rec, [m for m in msgs if m["role"] != "system"], meta))  # SFT data has no system prompt
    return good, bad


def load_json(path, shipped: str, what: str) -> tuple[object, str]:
    """(data, where) of JSON file `path`, or of the file `shipped` with picochat/safety/ when path is empty."""
    where = str(path) if path else f"built-in {shipped}"
    try:
        f = Path(path).expanduser() if path else resources.files("picochat.safety").joinpath(shipped)
        return json.loads(f.read_text(encoding="utf-8")), where
    except FileNotFoundError:
        raise PicochatError(f"{what} {path} not found") from None
    except json.JSONDecodeError as e:
        raise PicochatError(f"{what} {where}: invalid JSON ({e.msg}, line {e.lineno})") from None
