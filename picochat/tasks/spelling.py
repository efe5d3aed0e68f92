"""Spelling: "Spell the word X letter by letter." -> "x-y-z". Procedural, offline.

Words are dictionary words (the `english-words` package's GCIDE list, 3-6 letters) that are also
common: they occur at least 10 times in the embedded Shakespeare text (always installed, so the
list is the same on every machine, ~2,600 words). A small model can only spell a word it has never
been asked about by spelling its *tokens*, which it learns from other words that share them; common
words are made of common tokens, while GCIDE's 36k obscure words (the first version) gave a d4
model 1,400 distinct tokens to learn from 5,000 examples and it learned none of them.
Train/test split by a stable hash of the word, so held-out words are never seen in training, and
the grader (`picochat eval`'s and RL's) is exact match on the letter sequence.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import random
import re

from picochat.tasks.base import EvalTask, Task, exact_eval_task, stable_hash

KIND = "generative"
FIELDS = '{"question": str, "answer": "c-a-t"} (exact match)'

# The word is always quoted: after a quote the tokenizer splits it into short no-space pieces
# ("'fret'" -> ' + f + ret + '), which recur across many words, so spellings learned for the
# training words' pieces carry over to held-out words. Unquoted, a common word is often one
# " word" token that no training example ever spells (held-out words are never trained on).
TEMPLATES = [
    "Spell the word '{w}' letter by letter.",
    'How do you spell "{w}"?',
    "Can you spell '{w}' for me, one letter at a time?",
    'spell "{w}"',
]


@functools.lru_cache(maxsize=1)
def _corpus_counts() -> collections.Counter:
    """Word counts of the embedded Shakespeare text (empty if the package is missing)."""
    counts: collections.Counter = collections.Counter()
    with contextlib.suppress(Exception):  # shakespeare not installed: fall back to the dictionary alone
        from picochat.data.sources import embedded_works
        for _, text, _ in embedded_works():
            counts.update(re.findall(r"[a-z]+", text.lower()))
    return counts


def common_words(min_len: int = 3, max_len: int = 6, min_count: int = 10) -> list[str]:
    """Dictionary words that occur >= min_count times in the embedded corpus (all of them if the
    corpus package is missing)."""
    try:
        from english_words import get_english_words_set
        words = get_english_words_set(["gcide"], lower=True, alpha=True)
    except ImportError:  # fall back to a small built-in list of common words
        words = set("the and that have with this from they will would there their what about which when make "
                    "can like time just him know take people into year your good some could them see other than "
                    "then now look only come its over think also back after use two how our work first well way "
                    "even new want because any these give day most cat dog house water light night king queen".split())
    words = sorted(w for w in words if min_len <= len(w) <= max_len and re.fullmatch(r"[a-z]+", w))
    counts = _corpus_counts()
    return [w for w in words if counts[w] >= min_count] if counts else words


class SpellingTask(Task):
    name = "spelling"

    def __init__(self, split: str = "train", size: int = 5000, seed: int = 0, test_fraction: float = 0.1):
        if split not in ("train", "test"):
            raise ValueError("split must be train or test")
        words = [w for w in common_words() if (stable_hash(w) % 1000 < test_fraction * 1000) == (split == "test")]
        random.Random(seed).shuffle(words)
        self.words = words[:size]
        self.split, self.seed = split, seed

    def __len__(self):
        return len(self.words)

    def __getitem__(self, i):
        w = self.words[i % len(self.words)]
        question = TEMPLATES[stable_hash(w + str(self.seed)) % len(TEMPLATES)].format(w=w)
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "-".join(w)}],
                "answer": "-".join(w)}


def extract(reply: str) -> str:
    """The part of a reply that is compared with the spelling."""
    return reply.strip().rstrip(".").strip()


def train_task(name: str, split: str, size: int) -> Task:
    return SpellingTask(split, size=size)


def eval_task(name: str, data_file: str | None, limit: int | None, split: str, corpus: str) -> EvalTask:
    return exact_eval_task(name, data_file, limit, split, train_task, extract)
