"""Build a TaskMixture from CLI-style specs: `--tasks spelling=1,arithmetic=1` and `--data file.jsonl=2`.

Names: spelling, arithmetic, identity (offline, procedural/template); smoltalk, gsm8k, mmlu,
arc-easy, arc-challenge (online, Hugging Face hub). Any JSONL of conversations joins with --data.
"""
from __future__ import annotations

from picochat.common import PicochatError, print0
from picochat.data.conversations import load_jsonl
from picochat.data.tasks.base import ListTask, Task, TaskMixture

OFFLINE = ("spelling", "arithmetic", "identity")
ONLINE = ("smoltalk", "gsm8k", "mmlu", "arc-easy", "arc-challenge")


def parse_weighted(spec: str) -> tuple[str, float]:
    name, _, w = spec.partition("=")
    try:
        weight = float(w) if w else 1.0
    except ValueError:
        raise PicochatError(f"bad weight in {spec!r}: expected NAME=NUMBER") from None
    if not weight >= 0:
        raise PicochatError(f"weight in {spec!r} must be >= 0")
    return name.strip(), weight


def make_task(name: str, split: str = "train", size: int = 5000) -> Task:
    if name == "spelling":
        from picochat.data.tasks.spelling import SpellingTask
        return SpellingTask(split, size=size)
    if name == "arithmetic":
        from picochat.data.tasks.arithmetic import ArithmeticTask
        return ArithmeticTask(split, size=size)
    if name == "identity":
        from picochat.data.tasks.identity import IdentityTask
        return IdentityTask()
    from picochat.data.tasks import hf
    if name == "smoltalk":
        return hf.smoltalk("train" if split == "train" else "test", limit=size)
    if name == "gsm8k":
        return hf.gsm8k(split, limit=size)
    if name == "mmlu":
        return hf.mmlu("auxiliary_train" if split == "train" else "test", limit=size)
    if name in ("arc-easy", "arc-challenge"):
        return hf.arc("ARC-Easy" if name == "arc-easy" else "ARC-Challenge", split, limit=size)
    raise PicochatError(f"unknown task {name!r}; choose from {', '.join(OFFLINE + ONLINE)} or pass --data FILE.jsonl")


def build_mixture(task_specs: list[str], data_specs: list[str], split: str = "train", size: int = 5000,
                  seed: int = 0) -> TaskMixture:
    tasks, weights = [], []
    for spec in task_specs:
        name, w = parse_weighted(spec)
        tasks.append(make_task(name, split, size))
        weights.append(w)
    for spec in data_specs:
        path, w = parse_weighted(spec)
        convs, report = load_jsonl(path)
        print0(report.summary())
        tasks.append(ListTask(convs, name=path))
        weights.append(w)
    if not tasks:
        raise PicochatError("no training data: give --tasks and/or --data")
    return TaskMixture(tasks, weights, seed=seed)
