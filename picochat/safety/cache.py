"""Content-addressed on-disk cache of LLM calls: one JSON file per request, written atomically.

The key hashes only what determines the answer — base_url, model, messages, temperature,
max_tokens, the sample index and, for roles that change it, the shape of the request body — not the role name (two roles sharing an endpoint share entries)
and never the API key. An entry is written (tmp file + fsync + rename) before the caller gets the
reply, so after a kill -9 every finished call is on disk and a rerun does not pay for it again.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path


def request_key(base_url: str, model: str, messages: list[dict], temperature: float, max_tokens: int,
                sample: int, shape: dict | None = None) -> str:
    """shape: the request's extra body fields when a role renames, drops or adds any (params/extra);
    None for the plain OpenAI shape, so keys made before roles could say that stay valid."""
    payload = {"base_url": base_url.rstrip("/"), "model": model, "messages": messages,
               "temperature": round(float(temperature), 6), "max_tokens": int(max_tokens), "sample": int(sample)}
    if shape:
        payload["shape"] = shape
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class CallCache:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"  # fan out: no directory with 100k files

    def get(self, key: str) -> dict | None:
        p = self._path(key)
        try:
            with open(p, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            # cannot happen with atomic writes, but a hand-edited entry should cost a call, not a crash
            return None

    def put(self, key: str, entry: dict) -> None:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=p.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(entry, f, ensure_ascii=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*/*.json"))
