"""Real chat/eval datasets from the Hugging Face hub (online only): SmolTalk, GSM8K, MMLU, ARC, HumanEval.

Each loader turns rows into conversations. Offline (as on our CI machines) they fail with one
clear line naming the offline alternatives, instead of hanging or dumping a traceback.
"""
from __future__ import annotations

from picochat.common import PicochatError
from picochat.data.tasks.base import ListTask

LETTERS = "ABCDEFGHIJ"


def _load(repo: str, config: str | None, split: str):
    try:
        from datasets import load_dataset
    except ImportError:
        raise PicochatError(f"loading {repo} needs the `datasets` package: pip install 'picochat[hf]'") from None
    try:
        return load_dataset(repo, config, split=split)
    except Exception as e:  # offline / not found / auth: all the same to the user
        raise PicochatError(f"cannot load {repo} from the Hugging Face hub ({type(e).__name__}); offline? use the "
                            f"procedural tasks, or local JSONL: --data (training), --data-file (eval)") from None


def smoltalk(split: str = "train", limit: int | None = None) -> ListTask:
    rows = _load("HuggingFaceTB/smol-smoltalk", None, split)
    convs = [{"messages": r["messages"]} for r in rows.select(range(min(limit or len(rows), len(rows))))]
    return ListTask(convs, "smoltalk")


def gsm8k(split: str = "train", limit: int | None = None) -> ListTask:
    rows = _load("openai/gsm8k", "main", split)
    convs = []
    for r in rows.select(range(min(limit or len(rows), len(rows)))):
        reasoning, answer = r["answer"].split("####")
        convs.append({"messages": [{"role": "user", "content": r["question"]},
                                   {"role": "assistant", "content": f"{reasoning.strip()}\nThe answer is {answer.strip()}."}],
                      "answer": answer.strip().replace(",", "")})
    return ListTask(convs, "gsm8k")


def multiple_choice(question: str, choices: list[str], answer_idx: int) -> dict:
    body = question + "\n" + "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return {"messages": [{"role": "user", "content": body + "\nAnswer with the letter."},
                         {"role": "assistant", "content": LETTERS[answer_idx]}],
            "letters": LETTERS[:len(choices)], "answer": LETTERS[answer_idx],
            # the raw fields, for option-likelihood scoring in `picochat eval`
            "question": question, "choices": list(choices), "answer_index": answer_idx}


def mmlu(split: str = "auxiliary_train", limit: int | None = None) -> ListTask:
    rows = _load("cais/mmlu", "all" if split != "auxiliary_train" else "auxiliary_train", split if split != "auxiliary_train" else "train")
    convs = [multiple_choice(r["question"], r["choices"], r["answer"]) for r in rows.select(range(min(limit or len(rows), len(rows))))]
    return ListTask(convs, "mmlu")


def arc(subset: str = "ARC-Easy", split: str = "train", limit: int | None = None) -> ListTask:
    rows = _load("allenai/ai2_arc", subset, split)
    convs = []
    for r in rows.select(range(min(limit or len(rows), len(rows)))):
        labels = r["choices"]["label"]
        convs.append(multiple_choice(r["question"], r["choices"]["text"], labels.index(r["answerKey"])))
    return ListTask(convs, f"arc-{subset.split('-')[-1].lower()}")


def humaneval(limit: int | None = None) -> list[dict]:
    """HumanEval problems as raw rows (task_id, prompt, entry_point, test): graded by execution."""
    rows = _load("openai/openai_humaneval", None, "test")
    return [{k: r[k] for k in ("task_id", "prompt", "entry_point", "test")}
            for r in rows.select(range(min(limit or len(rows), len(rows))))]
