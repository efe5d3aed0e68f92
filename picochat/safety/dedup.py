"""Exact and near-duplicate detection: character-shingle MinHash with LSH banding.

Written out (~100 lines of numpy; blake2b hashes, the same on every machine, unlike hash()) instead
of depending on datasketch. MinHash+LSH only proposes candidate pairs; exact Jaccard decides.
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


def shingles(text: str, k: int = 5) -> set[str]:
    t = normalize(text)
    return {t[i:i + k] for i in range(len(t) - k + 1)} if len(t) > k else {t}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


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


def find_duplicates(items: list[tuple[str, str]], threshold: float = 0.7, k: int = 5,
                    num_perm: int = 128) -> dict[str, dict]:
    """items: (id, text) in priority order (earlier wins). Returns {dup_id: {"of": id, "kind", "jaccard"}}."""
    hasher = MinHasher(num_perm)
    bands, rows = lsh_params(num_perm, threshold)
    buckets: list[dict] = [{} for _ in range(bands)]
    sets: dict[str, set] = {}
    seen_exact: dict[str, str] = {}
    dups: dict[str, dict] = {}
    for rid, text in items:
        ek = normalize(text)  # exact duplicates: the same text up to case, punctuation and spacing
        if ek in seen_exact:
            dups[rid] = {"of": seen_exact[ek], "kind": "exact", "jaccard": 1.0}
            continue
        seen_exact[ek] = rid
        sh = shingles(text, k)
        sig = hasher.signature(sh)
        keys = [sig[i * rows:(i + 1) * rows].tobytes() for i in range(bands)]
        best, best_j = None, 0.0
        for cid in dict.fromkeys(c for i, key in enumerate(keys) for c in buckets[i].get(key, ())):  # first-seen
            j = jaccard(sh, sets[cid])
            if j >= threshold and j > best_j:
                best, best_j = cid, j
        if best is not None:
            dups[rid] = {"of": best, "kind": "near", "jaccard": round(best_j, 3)}
            continue
        sets[rid] = sh
        for i, key in enumerate(keys):
            buckets[i].setdefault(key, []).append(rid)
    return dups
