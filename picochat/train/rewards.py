"""What RL optimises and how it is measured: each task's own grader as the reward and the held-out
monitor (with eval/generate.py's "final answer == calculator result" check).

Rewards are not a second implementation of grading: `EvalTask.reward` (tasks/base.py) is the
grade that `picochat eval` gives the same reply, 1.0 or 0.0, so a reward going up is the eval
score going up. RL draws its prompts from the tasks' *training* problems (`split="train"`:
procedural arithmetic/spelling with disjoint seeds/words, GSM8K's train split), the held-out
monitor from the eval's test problems (the first `limit`, as `picochat eval chat --limit`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from picochat.common import PicochatError, print0
from picochat.eval.generate import calculator_agreement, generate_replies  # noqa: F401 (rl.py imports it from here)
from picochat.tasks import GENERATIVE, TASKS, TRAIN_SPLIT, EvalTask, make_eval_task, parse_weighted


def parse_task_specs(spec: str) -> list[tuple[str, float]]:
    """--tasks "arithmetic=2,spelling" -> [(name, weight)]; one clear error for an empty or repeated list."""
    specs = [parse_weighted(s) for s in spec.split(",") if s.strip()]
    names = [n for n, _ in specs]
    if not specs:
        raise PicochatError("--tasks is empty; give e.g. --tasks arithmetic,spelling")
    if len(set(names)) != len(names):
        raise PicochatError(f"a task is listed twice in --tasks {spec!r}")
    if sum(w for _, w in specs) <= 0:
        raise PicochatError(f"--tasks {spec!r}: the weights must not all be 0")
    return specs


def check_reward_tasks(names: list[str]) -> None:
    """Fail fast (before any model or data is loaded) on a task that cannot give a reward."""
    for n in names:
        if n not in TASKS:
            raise PicochatError(f"unknown task {n!r}; RL tasks (with a reward): {', '.join(GENERATIVE)}")
        if n not in GENERATIVE:
            raise PicochatError(f"task {n!r} has no reward: RL needs a generative task whose replies are graded "
                                f"({', '.join(GENERATIVE)}); {n} is scored, not graded")


def load_reward_tasks(names: list[str], data_files: dict[str, str], size: int) -> list[EvalTask]:
    """The RL prompt sources, in `names` order: each task's training problems (at most `size`)."""
    check_reward_tasks(names)
    tasks = []
    for n in names:
        task = make_eval_task(n, data_files.get(n), limit=size, split="train")
        if n not in TRAIN_SPLIT and n not in data_files:
            print0(f"note: {n} has no training split; RL prompts are its evaluation problems ({task.source}), "
                   f"so its eval afterwards is not held out (give --data-file {n}=FILE for other problems)")
        if not task.examples:
            raise PicochatError(f"task {n!r} has no problems to train on ({task.source})")
        tasks.append(task)
    return tasks


class Tally:
    """Sums that every rank adds to and one all_reduce combines (keys fixed before the reduce)."""

    def __init__(self, keys: list[str]):
        self.keys = list(keys)
        self.values = dict.fromkeys(self.keys, 0.0)

    def add(self, key: str, value: float) -> None:
        self.values[key] += float(value)

    def reduce(self, device: torch.device | str = "cpu") -> dict[str, float]:
        """The sums over all ranks (`device`: where the backend reduces, CUDA for nccl)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([self.values[k] for k in self.keys], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            self.values = dict(zip(self.keys, t.tolist()))
        return self.values


def heldout_metrics(engine, tok, tasks: list[EvalTask], rank: int = 0, world: int = 1) -> dict[str, float]:
    """Greedy pass@1 per task on its eval problems (sharded across ranks like `picochat eval`),
    graded by the task's grader, plus the calculator agreement over all replies that used it."""
    tally = Tally([f"{t.name}/{x}" for t in tasks for x in ("n", "ok")] + ["calls", "agree"])
    limit = engine.model.cos.size(0)
    for task in tasks:
        mine = [task.examples[i] for i in range(rank, len(task), world)]
        if not mine:
            continue
        prompts = [tok.render_for_completion({"messages": task.chat_prompt(ex)}) for ex in mine]
        replies = generate_replies(engine, tok, prompts, min(task.max_tokens, limit // 2))  # greedy
        for ex, r in zip(mine, replies):
            tally.add(f"{task.name}/n", 1)
            tally.add(f"{task.name}/ok", task.reward(ex, r.text))
            agree = calculator_agreement(r)
            if agree is not None:
                tally.add("calls", 1)
                tally.add("agree", agree)
    v = tally.reduce(engine.device)
    out = {f"heldout_{t.name}": v[f"{t.name}/ok"] / max(1.0, v[f"{t.name}/n"]) for t in tasks}
    if v["calls"]:
        out["heldout_calc_agree"] = v["agree"] / v["calls"]
    return out
