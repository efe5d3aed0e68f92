"""bpb: bits per byte of held-out text (scored by eval/runner.py with eval/bpb.py).

Texts: `--data-file` (JSONL of {"text"}, or a plain .txt file: one document), else the val split
of the prepared corpus.
"""
from __future__ import annotations

from pathlib import Path

from picochat.common import PicochatError
from picochat.tasks.base import EvalTask, need, read_jsonl

KIND = "bpb"
FIELDS = '{"text": str} per line (or a plain .txt file: one document)'


def eval_task(name: str, data_file: str | None, limit: int | None, split: str, corpus: str) -> EvalTask:
    if data_file:
        path = Path(data_file).expanduser()
        if path.suffix == ".txt":
            try:
                texts = [path.read_text(encoding="utf-8")]
            except OSError as e:
                raise PicochatError(f"cannot read bpb data file {path}: {e}") from None
        else:
            texts = [need(r, "text", f"{data_file}: line {i}") for i, r in enumerate(read_jsonl(data_file, "bpb"), 1)]
        return EvalTask("bpb", "bpb", texts, data_file)
    from picochat.common import data_dir
    from picochat.data.corpus import iter_documents
    return EvalTask("bpb", "bpb", list(iter_documents(data_dir(corpus), "val")), f"corpus {corpus} (val split)")
