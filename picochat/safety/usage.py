"""LLM usage accounting that survives kill -9 and reruns: an append-only log, and costs.json made from it.

Every HTTP request and cache hit appends one JSON line to <out>/usage.jsonl the moment it completes,
so a kill -9 loses at most the requests still on the wire. costs.json is derived from the whole log
(`write_costs`), never merged by hand: a rerun served from the cache adds cache hits and no cost.
Line keys (short: a big run writes many): t, run, stage, role, model, event ("request" | "cache_hit"),
and for requests ok, retry and failure (kinds), in/out (tokens), est (estimated), trunc, cost (USD).
"""
from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from picochat.common import write_json_atomic

TOTAL_KEYS = ("requests", "cache_hits", "input_tokens", "output_tokens", "cost_usd", "failures", "retries")


def cost_of(role, tin: int, tout: int) -> float:
    return tin / 1e6 * role.price_in_per_1m + tout / 1e6 * role.price_out_per_1m


class UsageLog:
    """Appends usage lines for one stage run. Opened lazily: a run that sends nothing creates no file."""

    def __init__(self, path: str | os.PathLike, stage: str):
        self.path, self.stage = Path(path), stage
        self.run = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self._fd: int | None = None

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        size = os.fstat(fd).st_size
        if size:  # a kill -9 mid-write can leave a line without its newline: start on a fresh line
            with open(self.path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(fd, b"\n")
        return fd

    def record(self, role, **fields) -> None:
        if self._fd is None:
            self._fd = self._open()
        line = {"t": round(time.time(), 3), "run": self.run, "stage": self.stage, "role": role.name,
                "model": role.model, **fields}
        # one os.write of one line on an O_APPEND descriptor: no userspace buffer to lose on kill -9,
        # and lines from two processes sharing the out dir cannot interleave mid-line
        os.write(self._fd, (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8"))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass
class RoleStats:
    """One role's counts, from its usage lines: the client's live counts and aggregate()'s use one rule."""
    model: str = ""
    requests: int = 0          # HTTP requests actually sent (retries included)
    completed: int = 0         # calls answered by the endpoint
    cache_hits: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    estimated_tokens: bool = False
    truncated: int = 0
    retries: Counter = field(default_factory=Counter)   # by kind: 429, 500, timeout, empty, ...
    failures: Counter = field(default_factory=Counter)  # calls given up on, by kind
    cost_usd: float = 0.0

    def add(self, line: dict) -> None:
        if line.get("event") == "cache_hit":
            self.cache_hits += 1
            return
        self.requests += 1
        self.completed += bool(line.get("ok"))
        self.input_tokens += int(line.get("in", 0))
        self.output_tokens += int(line.get("out", 0))
        self.estimated_tokens |= bool(line.get("est"))
        self.truncated += bool(line.get("trunc"))
        self.cost_usd += float(line.get("cost", 0.0))
        if line.get("retry"):
            self.retries[line["retry"]] += 1
        if line.get("failure"):
            self.failures[line["failure"]] += 1

    def entry(self) -> dict:
        """As costs.json has it: counters as {kind: n}, the cost rounded."""
        return dict(vars(self), retries=dict(self.retries), failures=dict(self.failures),
                    cost_usd=round(self.cost_usd, 6))


def aggregate(path: str | os.PathLike) -> dict:
    """{"stages": {stage: {"roles": {role: ...}, "total": ..., "runs": n}}, "total": ...} over the whole log."""
    stages: dict[str, dict] = {}
    runs: dict[str, set] = {}
    p = Path(path)
    lines = p.read_text(encoding="utf-8").splitlines() if p.exists() else []
    for raw in lines:
        try:
            ln = json.loads(raw)
        except json.JSONDecodeError:
            continue  # a torn line from a kill -9: at most one request lost from the count
        if not isinstance(ln, dict) or "stage" not in ln or "role" not in ln:
            continue
        r = stages.setdefault(ln["stage"], {}).setdefault(ln["role"], RoleStats())
        runs.setdefault(ln["stage"], set()).add(ln.get("run"))
        r.model = ln.get("model", r.model)
        r.add(ln)
    out = {"stages": {}}
    for stage, stats in stages.items():
        roles = {name: r.entry() for name, r in stats.items()}
        out["stages"][stage] = {"roles": roles, "total": totals(roles.values()), "runs": len(runs[stage])}
    out["total"] = totals(r for s in out["stages"].values() for r in s["roles"].values())
    return out


def totals(roles) -> dict:
    """Sum role entries (retries/failures as {kind: n}) into one totals dict."""
    tot = dict.fromkeys(TOTAL_KEYS, 0)
    for r in roles:
        for k in ("requests", "cache_hits", "input_tokens", "output_tokens", "cost_usd"):
            tot[k] += r[k]
        tot["failures"] += sum(r["failures"].values())
        tot["retries"] += sum(r["retries"].values())
    tot["cost_usd"] = round(tot["cost_usd"], 6)
    return tot


def write_costs(out_dir: str | os.PathLike) -> dict:
    """Rebuild <out>/costs.json from <out>/usage.jsonl (atomic rewrite) and return it."""
    out_dir = Path(out_dir)
    data = aggregate(out_dir / "usage.jsonl")
    data["source"] = "usage.jsonl (every run of every stage; cache hits cost nothing)"
    write_json_atomic(out_dir / "costs.json", data)
    return data


def load_costs(run_dir: str | os.PathLike) -> dict | None:
    """The run's costs: from usage.jsonl when present (right even after a kill -9), else costs.json."""
    run_dir = Path(run_dir)
    if (run_dir / "usage.jsonl").exists():
        return aggregate(run_dir / "usage.jsonl")
    if (run_dir / "costs.json").exists():
        return json.loads((run_dir / "costs.json").read_text(encoding="utf-8"))
    return None


def format_costs(costs: dict) -> str:
    rows = [("role", "model", "requests", "cached", "retries", "failed", "in_tok", "out_tok", "cost_usd")]
    for name, c in costs["roles"].items():
        rows.append((name, c["model"][:24], c["requests"], c["cache_hits"], sum(c["retries"].values()),
                     sum(c["failures"].values()), c["input_tokens"], c["output_tokens"], f"{c['cost_usd']:.4f}"))
    t = costs["total"]
    rows.append(("total", "", t["requests"], t["cache_hits"], t["retries"], t["failures"], t["input_tokens"],
                 t["output_tokens"], f"{t['cost_usd']:.4f}"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)
