"""Shared stage plumbing: run a stage's async body with an LLM client, preflight, progress and costs.

A run whose preflight fails writes nothing into out_dir: the saved config.json of a finished run
is only replaced once the endpoints have answered and the stage is about to work.
"""
from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from typing import Awaitable, Callable

from picochat.common import write_json_atomic
from picochat.safety.client import LLM, preflight
from picochat.safety.config import SafetyConfig
from picochat.safety.usage import UsageLog, format_costs, write_costs

NO_WORK_STAGES = ("check", "preflight")  # endpoint checks only: they leave the run's config.json alone


def log(msg: str) -> None:
    print(msg, flush=True)


def md_table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


class Progress:
    """Prints "stage: done/total" roughly every 10% (and at the end), cheap enough for any size; counts
    the items given up on in this run by kind (the next run retries them)."""

    def __init__(self, stage: str, total: int, already: int = 0):
        self.stage, self.total, self.done, self.failed = stage, total, already, 0
        self.failures: Counter = Counter()
        self.failed_ids: list = []  # [item id, kind]
        self.t0 = time.time()
        self._next = 0
        if already:
            log(f"{stage}: resuming, {already}/{total} already done")

    def tick(self, ok: bool = True) -> None:
        self.done += ok
        self.failed += not ok
        n = self.done + self.failed
        if n >= self._next or n == self.total:
            self._next = n + max(1, self.total // 10)
            log(f"{self.stage}: {self.done}/{self.total} done, {self.failed} failed ({time.time() - self.t0:.1f}s)")

    def fail(self, kind: str, item_id: str | None = None) -> None:
        self.failures[kind] += 1
        if item_id is not None:
            self.failed_ids.append([item_id, kind])
        self.tick(False)


def run_stage(cfg: SafetyConfig, stage: str, roles: list[str], body: Callable[[LLM], Awaitable]):
    """Run `body(llm)` in a fresh event loop; preflight first; log usage as it happens, print it at the end."""
    # raises PicochatError on a missing key env var, before any traffic
    llm = LLM(cfg, roles, usage=UsageLog(cfg.out_dir / "usage.jsonl", stage))

    async def main():
        try:
            if cfg.preflight and roles:
                await preflight(llm)
            if stage not in NO_WORK_STAGES:  # provenance: env var NAMES, never keys
                write_json_atomic(cfg.out_dir / "config.json", cfg.model_dump(mode="json"))
            return await body(llm)
        finally:
            await llm.aclose()

    try:
        return asyncio.run(main())
    finally:
        costs = llm.costs()
        if any(c["requests"] or c["cache_hits"] for c in costs["roles"].values()):
            total = write_costs(cfg.out_dir)["total"]
            log(f"{stage}: LLM usage of this run (all runs: {total['requests']} requests, "
                f"${total['cost_usd']:.4f} -> {cfg.out_dir / 'costs.json'})")
            log(format_costs(costs))
        sys.stdout.flush()


async def for_each(items, fn) -> list:
    """Run fn(item) for all items concurrently (the LLM semaphores bound the real concurrency); the results
    in item order."""
    return await asyncio.gather(*(fn(it) for it in items))
