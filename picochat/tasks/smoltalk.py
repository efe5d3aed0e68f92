"""SmolTalk (HuggingFaceTB/smol-smoltalk): general chat conversations from the Hugging Face hub
(online only). Training data only: no eval."""
from __future__ import annotations

from picochat.tasks.base import ListTask, hf_rows


def train_task(name: str, split: str, size: int) -> ListTask:
    rows = hf_rows("HuggingFaceTB/smol-smoltalk", None, "train" if split == "train" else "test", size)
    return ListTask([{"messages": r["messages"]} for r in rows], "smoltalk")
