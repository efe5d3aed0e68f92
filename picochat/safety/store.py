"""Kill-safe record storage for the safety stages.

Every stage appends one JSON line per finished record (flush + fsync) to a JSONL file keyed by the
record's "id", and on a rerun skips the ids already there. A record that is redone on purpose (a
judge error asked again with new samples) is appended again with `replace`; the last line of an id
wins when the file is read back. A kill -9 can only leave a torn last line
(no trailing newline or invalid JSON); the store ignores it when reading and cuts it away before
its first append, so the next record starts on a clean line. Whole-file artifacts (final datasets, summaries) go through
picochat.common.atomic_path instead.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from picochat.common import PicochatError, atomic_path


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
        self._load()
        self._f = None

    def _load(self) -> None:
        if not self.path.exists():
            return
        good_end = 0  # byte offset just past the last complete, parseable line
        with open(self.path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl < 0:
                break  # torn last line: written without its newline when the process died
            line = data[pos:nl]
            pos = nl + 1
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    # only the very last line can be torn; garbage in the middle is real corruption
                    if data[pos:].strip():
                        raise PicochatError(f"{self.path}: corrupt line at byte {good_end}; fix or delete the file")
                    break
                if isinstance(rec, dict) and "id" in rec:
                    self.records[str(rec["id"])] = rec  # append() never repeats an id; replace() means "newer"
            good_end = pos
        if good_end < len(data):
            self._torn_at = good_end  # cut off before the first append, not now: a run that stops at its
            # preflight leaves every file of the earlier run exactly as it was

    def __contains__(self, rid: str) -> bool:
        return rid in self.records

    def __len__(self) -> int:
        return len(self.records)

    def get(self, rid: str):
        return self.records.get(rid)

    def append(self, record: dict) -> None:
        if str(record["id"]) in self.records:
            return  # idempotent: a rerun never duplicates an id
        self.replace(record)

    def replace(self, record: dict) -> None:
        """Write `record` even if its id is there already (it supersedes the old line)."""
        rid = str(record["id"])
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
        self.records[rid] = record

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_jsonl(path: str | os.PathLike, *, strict: bool = True) -> list[dict]:
    """Read a JSONL file of objects. strict=False skips bad lines instead of raising."""
    path = Path(path)
    if not path.is_file():
        raise PicochatError(f"{path} not found")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                if strict:
                    raise PicochatError(f"{path}:{n}: invalid JSON ({e.msg})") from None
                continue
            out.append(rec)
    return out


def iter_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, line


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write a whole JSONL artifact at once: readers see the old file or the new one, never half."""
    n = 0
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
    return n
