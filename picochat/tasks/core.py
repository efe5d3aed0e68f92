"""core: DCLM's CORE, 22 few-shot base-model tasks, centered accuracy. Loading and scoring live in
eval/core.py; this entry hands the task to it.
"""
from __future__ import annotations

from picochat.tasks.base import EvalTask

KIND = "core"
FIELDS = ('not JSONL: an unpacked DCLM eval bundle directory (core.yaml, eval_meta_data.csv, eval_data/) '
          'or its eval_bundle.zip')


def eval_task(name: str, data_file: str | None, limit: int | None, split: str, corpus: str) -> EvalTask:
    """Examples: one CoreTask per CORE task, each with its own rows (the first `limit` of each)."""
    from picochat.eval.core import load_core
    return EvalTask("core", "core", *load_core(data_file, limit))
