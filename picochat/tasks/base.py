"""Shared types and helpers of the tasks (one file per task in this package, named in __init__.py).

A Task is a sized, indexable list of training conversations ({"messages": [...]}); answers are
graded by the task's EvalTask (below), the one grader. A TaskMixture draws from several tasks with
given weights. Its order is a pure function of (seed, index), so a loader
can resume from an index with no other state, and every process of a torchrun job sees the same
order. An EvalTask is what `picochat eval` measures and `picochat train rl` rewards: examples, where
they came from, and (generative tasks) prompt builders and a grader.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from picochat.common import PicochatError, read_jsonl_numbered

LETTERS = "ABCDEFGHIJ"
# what a --data-file line of a multiple-choice task (arc-easy, arc-challenge, mmlu) must hold
MC_FIELDS = ('{"question": str, "choices": [str, ...] or {"text": [...], "label": [...]}, '
             '"answer": index | letter | choice text} (or "answerKey": letter, as in ARC)')


# --------------------------------------------------------------------------- training conversations

class Task:
    name = "task"

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict:
        raise NotImplementedError


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

    def __init__(self, tasks: list[Task], weights: list[float], length: int | None = None, seed: int = 0):
        if not tasks:
            raise ValueError("a mixture needs at least one task")
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


def multiple_choice(question: str, choices: list[str], answer_idx: int) -> dict:
    """A multiple-choice conversation (answer: the letter), keeping the raw fields for scoring."""
    body = question + "\n" + "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return {"messages": [{"role": "user", "content": body + "\nAnswer with the letter."},
                         {"role": "assistant", "content": LETTERS[answer_idx]}],
            "letters": LETTERS[:len(choices)], "answer": LETTERS[answer_idx],
            # the raw fields, for option-likelihood scoring in `picochat eval`
            "question": question, "choices": list(choices), "answer_index": answer_idx}


def hf_rows(repo: str, config: str | None, split: str, limit: int | None = None):
    """The first `limit` rows of a Hugging Face hub dataset (online only). Offline (as on our CI
    machines) one clear line names the offline alternatives, instead of a hang or a traceback."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise PicochatError(f"loading {repo} needs the `datasets` package: pip install 'picochat[hf]'") from None
    try:
        rows = load_dataset(repo, config, split=split)
    except Exception as e:  # offline / not found / auth: all the same to the user
        raise PicochatError(f"cannot load {repo} from the Hugging Face hub ({type(e).__name__}); offline? use the "
                            f"procedural tasks, or local JSONL: --data (training), --data-file (eval)") from None
    return rows.select(range(min(limit or len(rows), len(rows))))


# --------------------------------------------------------------------------- evaluation

@dataclass
class EvalTask:
    name: str
    kind: str                                   # categorical | generative | bpb | core
    examples: list                              # dicts (categorical/generative) or texts (bpb)
    source: str                                 # where the examples came from, for the results file
    max_tokens: int = 256                       # default reply budget of a generative task
    grade: Callable[[dict, str], bool] | None = None
    extract: Callable[[str], object] | None = None  # None: no majority vote (e.g. code)
    chat_prompt: Callable[[dict], list[dict]] | None = None   # messages for chat models
    base_prompt: Callable[[dict], str] | None = None          # plain text for base models
    stop_text: tuple[str, ...] = ("\n\n",)                  # base-model replies end at these

    def __len__(self):
        return len(self.examples)

    @property
    def has_reward(self) -> bool:
        return self.kind == "generative" and self.grade is not None

    def reward(self, ex: dict, reply: str) -> float:
        """RL reward of a reply (`picochat train rl`): its grade, 1.0 or 0.0, by the same grader that
        `picochat eval` uses, so what RL optimises is exactly what the eval measures."""
        if not self.has_reward:
            raise PicochatError(f"task {self.name!r} has no reward ({self.kind} tasks are scored, not graded)")
        return 1.0 if self.grade(ex, reply) else 0.0


def read_jsonl(path: str | Path, what: str) -> list[dict]:
    """Objects of a JSONL file (.gz allowed); one clear error for a missing file or a bad line."""
    rows = read_jsonl_numbered(path, what)
    for n, obj in rows:
        if not isinstance(obj, dict):
            raise PicochatError(f"{Path(path).expanduser()}: line {n}: expected a JSON object")
    return [obj for _, obj in rows]


def need(row: dict, key: str, where: str) -> str:
    """row[key], which must be a non-empty string."""
    if not isinstance(row.get(key), str) or not row[key].strip():
        raise PicochatError(f"{where}: missing or empty {key!r} (expected a string)")
    return row[key]


def qa_chat(ex: dict) -> list[dict]:
    return [{"role": "user", "content": ex["question"]}]


def qa_text(ex: dict) -> str:
    return f"Question: {ex['question']}\nAnswer:"


def exact_eval_task(name: str, data_file: str | None, limit: int | None, split: str,
                    train_task: Callable[[str, str, int], Task], extract: Callable[[str], str]) -> EvalTask:
    """A generative task graded by exact match of `extract(reply)` (spelling, arithmetic): rows of
    `data_file`, else the first `limit` (default 1000) problems of its procedural `split`."""
    if data_file:
        rows = []
        for i, r in enumerate(read_jsonl(data_file, name), 1):
            where = f"{data_file}: example {i}"
            rows.append({"question": need(r, "question", where), "answer": str(r.get("answer", "")).strip()})
            if not rows[-1]["answer"]:
                raise PicochatError(f"{where}: missing 'answer'")
        source = data_file
    else:
        task = train_task(name, split, limit or 1000)
        rows = [{"question": task[i]["messages"][0]["content"], "answer": task[i]["answer"]} for i in range(len(task))]
        source = f"procedural {name} ({split} split)"
    return EvalTask(name, "generative", rows[:limit], source, max_tokens=64,
                    grade=lambda ex, reply: extract(reply) == ex["answer"], extract=extract,
                    chat_prompt=qa_chat, base_prompt=qa_text)


def mc_example(row: dict, where: str) -> dict:
    """Normalise one multiple-choice row (our format, ARC's or MMLU's) to question/choices/answer_index."""
    q = need(row, "question", where)
    choices, labels = row.get("choices"), None
    if isinstance(choices, dict):  # ARC: {"text": [...], "label": ["A", ...]}
        labels, choices = choices.get("label"), choices.get("text")
    if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) for c in choices)):
        raise PicochatError(f"{where}: 'choices' must be a list of at least 2 strings")
    labels = [str(x) for x in labels] if labels else [chr(ord("A") + i) for i in range(len(choices))]
    ans = row.get("answer", row.get("answerKey"))
    idx = None
    if isinstance(ans, int) and not isinstance(ans, bool):
        idx = ans
    elif isinstance(ans, str):
        a = ans.strip()
        idx = labels.index(a) if a in labels else choices.index(a) if a in choices else (
            int(a) if a.isdigit() else None)
    if idx is None or not 0 <= idx < len(choices):
        raise PicochatError(f"{where}: answer {ans!r} is not an index, label or text of the {len(choices)} choices")
    return {"question": q, "choices": choices, "answer_index": idx}


def mc_eval_task(name: str, data_file: str | None, limit: int | None,
                 offline: Callable[[], tuple[list[dict], str] | None],
                 train_task: Callable[[str, str, int | None], ListTask], hub: str) -> EvalTask:
    """A multiple-choice task (scored by categorical.py): rows of `data_file`, else its `offline`
    test set (None when the optional package is absent), else the test split of Hub dataset `hub`."""
    if data_file:
        rows = [mc_example(r, f"{data_file}: example {i}") for i, r in enumerate(read_jsonl(data_file, name), 1)]
        source = data_file
    elif (found := offline()) is not None:
        rows, source = found
    else:
        convs = train_task(name, "test", limit).conversations
        rows = [{k: c[k] for k in ("question", "choices", "answer_index")} for c in convs]
        source = f"hf:{hub} test"
    return EvalTask(name, "categorical", rows[:limit], source)
