"""Task and TaskMixture: the unit of chat data for midtraining, SFT and evaluation.

A Task is a sized, indexable list of conversations ({"messages": [...]}); a task that can grade
answers also implements `evaluate(conversation, completion) -> bool`. A TaskMixture draws from
several tasks with given weights. Its order is a pure function of (seed, index), so a loader can
resume from an index with no other state, and every process of a torchrun job sees the same order.
"""
from __future__ import annotations

import hashlib
import random


class Task:
    name = "task"

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict:
        raise NotImplementedError

    def evaluate(self, conversation: dict, completion: str) -> bool:  # pragma: no cover - optional
        raise NotImplementedError(f"{self.name} has no evaluator")


class ListTask(Task):
    """A task over an in-memory list of conversations (e.g. a JSONL file)."""

    def __init__(self, conversations: list[dict], name: str = "list"):
        if not conversations:
            raise ValueError(f"task {name} has no conversations")
        self.conversations = conversations
        self.name = name

    def __len__(self):
        return len(self.conversations)

    def __getitem__(self, i):
        return self.conversations[i % len(self.conversations)]


def stable_hash(text: str) -> int:
    """Process-independent hash (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


class TaskMixture(Task):
    """Item i: pick a task with probability proportional to its weight, then an item of it.

    `length` (default: total size of the tasks) is what one epoch means to the loaders.
    Draws are with replacement, seeded by (seed, i): deterministic and random-access.
    """

    name = "mixture"

    def __init__(self, tasks: list[Task], weights: list[float] | None = None, length: int | None = None, seed: int = 0):
        if not tasks:
            raise ValueError("a mixture needs at least one task")
        weights = [1.0] * len(tasks) if weights is None else list(weights)
        if len(weights) != len(tasks) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"need one non-negative weight per task (sum > 0), got {weights}")
        self.tasks, self.seed = tasks, seed
        total = sum(weights)
        self.probs = [w / total for w in weights]
        self.length = length if length is not None else sum(len(t) for t in tasks)

    def __len__(self):
        return self.length

    def pick(self, i: int) -> tuple[int, int]:
        """(task index, item index) of mixture item i."""
        rng = random.Random(self.seed * 1_000_003 + i)
        t = rng.choices(range(len(self.tasks)), weights=self.probs)[0]
        return t, rng.randrange(len(self.tasks[t]))

    def __getitem__(self, i):
        t, j = self.pick(i)
        return self.tasks[t][j]
