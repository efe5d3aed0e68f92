"""Conversation JSONL: the one input format for midtraining, SFT and the safety workflow.

One conversation per line, in the OpenAI chat shape:
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
A bare list of messages is accepted too. Rules: an optional system message first, then
user/assistant strictly alternating, starting with user and ending with assistant; every content a
non-empty string (assistant content may also be a list of parts {"type": "text"|"python"|
"python_output", "text": ...}, the tool-use form). Bad lines are reported by line number and
skipped with a count, never silently.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from picochat.common import PicochatError

PART_TYPES = ("text", "python", "python_output")


def _check_content(content, role: str, i: int) -> None:
    if isinstance(content, str):
        if not content.strip():
            raise ValueError(f"message {i} ({role}) has empty content")
        return
    if role == "assistant" and isinstance(content, list) and content:
        for part in content:
            if not (isinstance(part, dict) and part.get("type") in PART_TYPES and isinstance(part.get("text"), str)):
                raise ValueError(f"message {i}: assistant parts need a type in {PART_TYPES} and a text string")
        return
    raise ValueError(f"message {i} ({role}) content must be a non-empty string")


def validate(record) -> list[dict]:
    """Return the validated message list ({"messages": [...]} or a bare list) or raise ValueError
    saying what is wrong."""
    messages = record["messages"] if isinstance(record, dict) and "messages" in record else record
    if not isinstance(messages, list):
        raise ValueError('expected {"messages": [...]} or a list of messages')
    if not messages:
        raise ValueError("no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} needs 'role' and 'content'")
    start = 1 if messages[0]["role"] == "system" else 0
    for i, m in enumerate(messages):
        want = "system" if i < start else ("user", "assistant")[(i - start) % 2]
        if m["role"] != want:
            raise ValueError(f"message {i} has role {m['role']!r}, expected {want!r} "
                             f"(roles alternate user/assistant after an optional system message)")
        _check_content(m["content"], m["role"], i)
    if len(messages) == start:
        raise ValueError("no user/assistant messages after the system message")
    if messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be from the assistant")
    return messages


@dataclass
class LoadReport:
    path: str
    total: int = 0
    kept: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)

    def summary(self, show: int = 5) -> str:
        s = f"{self.path}: {self.kept} conversations, {len(self.bad)} bad lines skipped"
        for line, reason in self.bad[:show]:
            s += f"\n  line {line}: {reason}"
        if len(self.bad) > show:
            s += f"\n  ... and {len(self.bad) - show} more"
        return s


def load_jsonl(path: str | Path) -> tuple[list[dict], LoadReport]:
    """Load and validate a conversation JSONL file: (conversations, report). Blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise PicochatError(f"conversation file {path} not found")
    report = LoadReport(str(path))
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            report.total += 1
            try:
                out.append({"messages": validate(json.loads(line))})
            except json.JSONDecodeError as e:
                report.bad.append((n, f"invalid JSON ({e.msg})"))
            except ValueError as e:
                report.bad.append((n, str(e)))
    report.kept = len(out)
    if not out:
        raise PicochatError(f"{path} has no valid conversations ({len(report.bad)} bad lines; first: "
                            f"{report.bad[0] if report.bad else 'file is empty'})")
    return out, report
