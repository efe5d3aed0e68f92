"""Multi-digit arithmetic with calculator tool calls. Procedural, offline.

The assistant writes the expression inside <|python_start|>...<|python_end|>, the calculator's
result comes back inside <|output_start|>...<|output_end|> (not supervised: the tool, not the
model, produces it), then the assistant states the answer. The model only has to learn to copy
the numbers into a tool call and the tool's output into its answer. Graded by exact match of
what follows the reply's last "=".
"""
from __future__ import annotations

import random

from picochat.calculator import run_tool
from picochat.tasks.base import EvalTask, Task, exact_eval_task

KIND = "generative"
FIELDS = '{"question": str, "answer": "42"} (exact match on what follows the last "=")'

OPS = ["+", "-", "*"]
TEMPLATES = ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?", "Please calculate {a} {op} {b}"]
MAX_DIGITS = 4


class ArithmeticTask(Task):
    name = "arithmetic"

    def __init__(self, split: str = "train", size: int = 5000):
        self.size = size
        self.offset = 0 if split == "train" else 10_000_000  # disjoint seeds for train/test

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        rng = random.Random(self.offset + i)
        a = rng.randint(1, 10 ** rng.randint(1, MAX_DIGITS))
        b = rng.randint(1, 10 ** rng.randint(1, MAX_DIGITS))
        op = rng.choice(OPS)
        q = rng.choice(TEMPLATES).format(a=a, op=op, b=b)
        expr = f"{a} {op} {b}"
        result = run_tool(expr)
        return {"messages": [
            {"role": "user", "content": q},
            {"role": "assistant", "content": [
                {"type": "python", "text": expr},
                {"type": "python_output", "text": result},
                {"type": "text", "text": f"{expr} = {result}"},
            ]}], "answer": result}


def extract(reply: str) -> str:
    """The part of a reply that is compared with the result: what follows its last "="."""
    return reply.strip().rstrip(".").strip().split("=")[-1].strip()


def train_task(name: str, split: str, size: int) -> Task:
    return ArithmeticTask(split, size=size)


def eval_task(name: str, data_file: str | None, limit: int | None, split: str, corpus: str) -> EvalTask:
    return exact_eval_task(name, data_file, limit, split, train_task, extract)
