"""Tasks: one file per task holding everything about it, and the one registry that names them.

A task module may define:
- `train_task(name, split, size) -> Task`: its training conversations (`picochat train mid|sft
  --tasks spelling=1,arithmetic=1`; a TaskMixture of them, see base.py);
- `KIND` ("categorical", "generative", "bpb" or "core"), `FIELDS` (what a `--data-file` line holds,
  shown in `picochat eval chat --help`) and `eval_task(name, data_file, limit, split, corpus) ->
  EvalTask`: what `picochat eval` measures and, for generative tasks, `picochat train rl` rewards.
Adding a task = its file + its name in NAMES. Any JSONL of conversations joins training with --data.
"""
from __future__ import annotations

from importlib import import_module

from picochat.common import PicochatError, print0
from picochat.data.conversations import load_jsonl
from picochat.tasks.base import EvalTask, ListTask, TaskMixture

# task names, in the order `picochat eval --help` lists the eval tasks; each lives in the module named
# by its part before any "-" (arc-easy and arc-challenge in arc.py, aime-2024 in aime.py)
NAMES = ("arc-easy arc-challenge mmlu aime aime-2024 aime-2025 gsm8k humaneval spelling arithmetic bpb core "
         "identity smoltalk").split()
REGISTRY = {name: import_module(f"{__name__}.{name.split('-')[0]}") for name in NAMES}
TASKS = tuple(n for n, m in REGISTRY.items() if hasattr(m, "eval_task"))          # `picochat eval --tasks`
GENERATIVE = tuple(n for n in TASKS if REGISTRY[n].KIND == "generative")           # graded: RL rewards
TRAINABLE = tuple(n for n, m in REGISTRY.items() if hasattr(m, "train_task"))      # `picochat train --tasks`
# generative tasks whose eval_task(split="train") reads training problems disjoint from the eval's
TRAIN_SPLIT = tuple(n for n in GENERATIVE if n in TRAINABLE)
# "names" -> what their --data-file lines hold; tasks with the same fields share one entry
FIELDS = {", ".join(n for n in TASKS if REGISTRY[n].FIELDS == f): f
          for f in dict.fromkeys(REGISTRY[n].FIELDS for n in TASKS)}


def parse_weighted(spec: str) -> tuple[str, float]:
    name, _, w = spec.partition("=")
    try:
        weight = float(w) if w else 1.0
    except ValueError:
        raise PicochatError(f"bad weight in {spec!r}: expected NAME=NUMBER") from None
    if not weight >= 0:
        raise PicochatError(f"weight in {spec!r} must be >= 0")
    return name.strip(), weight


def build_mixture(task_specs: list[str], data_specs: list[str], split: str = "train", size: int = 5000,
                  seed: int = 0) -> TaskMixture:
    """A TaskMixture from CLI-style specs: `--tasks spelling=1,arithmetic=1` and `--data file.jsonl=2`."""
    tasks, weights = [], []
    for spec in task_specs:
        name, w = parse_weighted(spec)
        if name not in TRAINABLE:
            raise PicochatError(f"unknown task {name!r}; choose from {', '.join(TRAINABLE)} or pass --data FILE.jsonl")
        tasks.append(REGISTRY[name].train_task(name, split, size))  # at most `size` of them for the sized ones
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


def make_eval_task(name: str, data_file: str | None = None, limit: int | None = None,
                   corpus: str = "embedded", split: str = "test") -> EvalTask:
    """Build task `name`, from `data_file` when given (see FIELDS), keeping the first `limit` examples.
    split="train" (RL prompts): spelling/arithmetic/gsm8k read their training split instead, disjoint
    from the eval's; the other tasks have only their evaluation problems (TRAIN_SPLIT)."""
    if name not in TASKS:
        hint = "AIME is aime, aime-2024 or aime-2025" if name.startswith("aime") else f"choose from {', '.join(TASKS)}"
        raise PicochatError(f"unknown task {name!r}; {hint}")
    return REGISTRY[name].eval_task(name, data_file, limit, split, corpus)
