"""Spelling: "Spell the word X letter by letter." -> "x-y-z". Procedural, offline.

Words come from the `english-words` package (web2 list) when installed, else from the prepared
corpus vocabulary. Train/test split by a stable hash of the word, so held-out words are never
seen in training, and the evaluator is exact match on the letter sequence.
"""
from __future__ import annotations

import random
import re

from picochat.data.tasks.base import Task, stable_hash

TEMPLATES = [
    "Spell the word {w} letter by letter.",
    "How do you spell {w}?",
    "Can you spell '{w}' for me, one letter at a time?",
    "spell {w}",
]


def word_list(min_len: int = 3, max_len: int = 7) -> list[str]:
    try:
        from english_words import get_english_words_set
        words = get_english_words_set(["gcide"], lower=True, alpha=True)
    except ImportError:  # fall back to a small built-in list of common words
        words = set("the and that have with this from they will would there their what about which when make "
                    "can like time just him know take people into year your good some could them see other than "
                    "then now look only come its over think also back after use two how our work first well way "
                    "even new want because any these give day most cat dog house water light night king queen".split())
    return sorted(w for w in words if min_len <= len(w) <= max_len and re.fullmatch(r"[a-z]+", w))


def spelled(word: str) -> str:
    return "-".join(word)


class SpellingTask(Task):
    name = "spelling"

    def __init__(self, split: str = "train", size: int = 5000, seed: int = 0, test_fraction: float = 0.1):
        if split not in ("train", "test"):
            raise ValueError("split must be train or test")
        words = [w for w in word_list() if (stable_hash(w) % 1000 < test_fraction * 1000) == (split == "test")]
        rng = random.Random(seed)
        rng.shuffle(words)
        self.words = words[:size]
        self.split, self.seed = split, seed

    def __len__(self):
        return len(self.words)

    def question(self, i: int) -> str:
        w = self.words[i % len(self.words)]
        return TEMPLATES[stable_hash(w + str(self.seed)) % len(TEMPLATES)].format(w=w)

    def __getitem__(self, i):
        w = self.words[i % len(self.words)]
        return {"messages": [{"role": "user", "content": self.question(i)},
                             {"role": "assistant", "content": spelled(w)}],
                "answer": spelled(w)}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion.strip().rstrip(".").strip() == conversation["answer"]
