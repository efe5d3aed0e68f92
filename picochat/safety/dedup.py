"""Exact and near-duplicate detection: character-shingle MinHash with LSH banding, written out here.

Why not `datasketch`: the whole thing is ~100 lines of numpy, deterministic across machines (hashes
come from blake2b, not Python's salted hash()), and saves a dependency.

Near-duplicates are decided on the exact Jaccard similarity of the shingle sets; MinHash+LSH only
proposes candidate pairs so the cost stays ~linear instead of all-pairs.
"""
from __future__ import annotations

import hashlib
import re

import numpy as np

_P = (1 << 31) - 1  # Mersenne prime: (a*x + b) stays below 2**62, no uint64 overflow


def normalize(text: str) -> str:
    """Lowercase, drop punctuation, collapse whitespace: "Hello,  World!" == "hello world"."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return re.sub(r"\s+", " ", text).strip()


def exact_key(text: str) -> str:
    return hashlib.sha256(normalize(text).encode("utf-8")).hexdigest()


def shingles(text: str, k: int = 5) -> set[str]:
    t = normalize(text)
    if len(t) <= k:
        return {t}
    return {t[i:i + k] for i in range(len(t) - k + 1)}


def jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _h31(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "little") % _P


def lsh_params(num_perm: int, threshold: float) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm whose S-curve midpoint (1/b)^(1/r) is nearest the threshold,
    preferring more bands (fewer missed pairs: candidates are verified exactly anyway)."""
    best = None
    for r in range(1, num_perm + 1):
        b = num_perm // r
        if b < 1:
            break
        mid = (1.0 / b) ** (1.0 / r)
        score = abs(mid - threshold) + (0.05 if mid > threshold else 0.0)  # err towards recall
        if best is None or score < best[0]:
            best = (score, b, r)
    return best[1], best[2]


class MinHasher:
    def __init__(self, num_perm: int = 128, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, _P, size=num_perm, dtype=np.uint64)
        self.b = rng.integers(0, _P, size=num_perm, dtype=np.uint64)
        self.num_perm = num_perm

    def signature(self, sh: set[str]) -> np.ndarray:
        xs = np.fromiter((_h31(s) for s in sh), dtype=np.uint64, count=len(sh))
        if xs.size == 0:
            return np.full(self.num_perm, _P, dtype=np.uint64)
        return ((self.a[:, None] * xs[None, :] + self.b[:, None]) % _P).min(axis=1)


class NearDupIndex:
    """Insert texts one by one; `query` returns the id of an earlier near-duplicate, or None."""

    def __init__(self, threshold: float = 0.7, k: int = 5, num_perm: int = 128):
        self.threshold, self.k = threshold, k
        self.hasher = MinHasher(num_perm)
        self.bands, self.rows = lsh_params(num_perm, threshold)
        self.buckets: list[dict] = [dict() for _ in range(self.bands)]
        self.sets: dict[str, set] = {}

    def _band_keys(self, sig: np.ndarray):
        for i in range(self.bands):
            yield i, sig[i * self.rows:(i + 1) * self.rows].tobytes()

    def query(self, text: str) -> tuple[str | None, float, set, np.ndarray]:
        sh = shingles(text, self.k)
        sig = self.hasher.signature(sh)
        cands = []
        for i, key in self._band_keys(sig):
            cands.extend(self.buckets[i].get(key, ()))
        best, best_j = None, 0.0
        for cid in dict.fromkeys(cands):  # dedupe, keep first-seen order
            j = jaccard(sh, self.sets[cid])
            if j >= self.threshold and j > best_j:
                best, best_j = cid, j
        return best, best_j, sh, sig

    def add(self, rid: str, sh: set, sig: np.ndarray) -> None:
        self.sets[rid] = sh
        for i, key in self._band_keys(sig):
            self.buckets[i].setdefault(key, []).append(rid)


def find_duplicates(items: list[tuple[str, str]], threshold: float = 0.7, k: int = 5,
                    num_perm: int = 128) -> dict[str, dict]:
    """items: (id, text) in priority order (earlier wins). Returns {dup_id: {"of": id, "kind", "jaccard"}}."""
    seen_exact: dict[str, str] = {}
    index = NearDupIndex(threshold, k, num_perm)
    dups: dict[str, dict] = {}
    for rid, text in items:
        ek = exact_key(text)
        if ek in seen_exact:
            dups[rid] = {"of": seen_exact[ek], "kind": "exact", "jaccard": 1.0}
            continue
        seen_exact[ek] = rid
        other, j, sh, sig = index.query(text)
        if other is not None:
            dups[rid] = {"of": other, "kind": "near", "jaccard": round(j, 3)}
            continue
        index.add(rid, sh, sig)
    return dups
