"""Identity / persona conversations from an editable template file (picochat/data/identity.json).
Training data only: no eval."""
from __future__ import annotations

import json
from pathlib import Path

from picochat.common import PicochatError
from picochat.tasks.base import Task

DEFAULT = Path(__file__).resolve().parents[1] / "data" / "identity.json"


class IdentityTask(Task):
    name = "identity"

    def __init__(self, path: str | Path | None = None):
        path = Path(path or DEFAULT)
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
            fill = {"name": spec["name"], "creator": spec["creator"]}
            # str.replace, not str.format: user-edited text may contain braces of its own
            def render(s):
                return s.replace("{name}", fill["name"]).replace("{creator}", fill["creator"])
            self.pairs = [(render(q), render(a)) for q, a in spec["pairs"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PicochatError(f"identity file {path} is invalid ({type(e).__name__}: {e})") from None
        if not self.pairs:
            raise PicochatError(f"identity file {path} has no pairs")

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        q, a = self.pairs[i % len(self.pairs)]
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def train_task(name: str, split: str, size: int) -> Task:
    return IdentityTask()
