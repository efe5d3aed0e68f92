"""Identity / persona conversations from an editable template file (picochat/data/identity.json).
Training data only: no eval."""
from __future__ import annotations

import json
from pathlib import Path

from picochat.common import PicochatError
from picochat.tasks.base import ListTask

DEFAULT = Path(__file__).resolve().parents[1] / "data" / "identity.json"


class IdentityTask(ListTask):
    def __init__(self, path: str | Path | None = None):
        path = Path(path or DEFAULT)
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
            name, creator = spec["name"], spec["creator"]

            def render(s):  # str.replace, not str.format: user-edited text may contain braces of its own
                return s.replace("{name}", name).replace("{creator}", creator)
            pairs = [(render(q), render(a)) for q, a in spec["pairs"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PicochatError(f"identity file {path} is invalid ({type(e).__name__}: {e})") from None
        if not pairs:
            raise PicochatError(f"identity file {path} has no pairs")
        super().__init__([{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                          for q, a in pairs], "identity")


def train_task(name: str, split: str, size: int) -> ListTask:
    return IdentityTask()
