"""Text cleanup and play parsing for corpora: normalize, cut long texts into documents, split a
Shakespeare play into scenes, and pick whole held-out groups (plays, files) for the val split."""
from __future__ import annotations

import bisect
import hashlib
import math
import re

DOC_CHARS = 8000           # long texts are cut into docs of at most this many chars at blank lines


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
