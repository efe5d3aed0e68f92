"""Shared stage plumbing: run a stage's async body with an LLM client, preflight, progress and costs.

Every stage goes through `run_stage`, so every stage checks its endpoints before doing any work,
prints the per-role token/cost table at the end (also when it fails half-way), and merges its
costs into <out_dir>/costs.json.
"""
from __future__ import annotations

import asyncio
import sys
import time
from typing import Awaitable, Callable

from picochat.safety.client import LLM, format_costs, save_costs
from picochat.safety.config import SafetyConfig


def log(msg: str) -> None:
    print(msg, flush=True)


class Progress:
    """Prints "stage: done/total" roughly every 10% (and at the end), cheap enough for any size."""

    def __init__(self, stage: str, total: int, already: int = 0):
        self.stage, self.total, self.done, self.failed = stage, total, already, 0
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


def run_stage(cfg: SafetyConfig, stage: str, roles: list[str], body: Callable[[LLM], Awaitable]):
    """Run `body(llm)` in a fresh event loop; preflight first; save and print costs however it ends."""
    llm = LLM(cfg, roles)  # raises PicochatError on a missing key env var, before any traffic
    from picochat.common import write_json_atomic
    from picochat.safety.config import to_public_dict
    write_json_atomic(cfg.out_dir / "config.json", to_public_dict(cfg))  # provenance: env var NAMES, never keys

    async def main():
        try:
            if cfg.preflight and roles:
                await llm.preflight()
            return await body(llm)
        finally:
            await llm.aclose()

    try:
        return asyncio.run(main())
    finally:
        costs = llm.costs()
        if any(c["requests"] or c["cache_hits"] for c in costs["roles"].values()):
            save_costs(cfg.out_dir / "costs.json", stage, costs)
            log(f"{stage}: LLM usage (costs -> {cfg.out_dir / 'costs.json'})")
            log(format_costs(costs))
        sys.stdout.flush()


async def for_each(items, fn):
    """Run fn(item) for all items concurrently (the LLM semaphores bound the real concurrency)."""
    await asyncio.gather(*(fn(it) for it in items))
