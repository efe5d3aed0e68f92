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
from picochat.eval.generate import calculator_agreement, generate_replies
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


def sum_over_ranks(sums: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """Per-key sums over all ranks (every rank builds the same keys in the same order; `device`: where
    the backend reduces, CUDA for nccl)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor(list(sums.values()), dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return dict(zip(sums, t.tolist()))
    return sums


def add_agreement(sums: dict[str, float], replies) -> None:
    """Count into sums["calls"] the replies with a numeric calculator result, into sums["agree"] those
    whose final answer is it."""
    for r in replies:
        agree = calculator_agreement(r)
        if agree is not None:
            sums["calls"] += 1
            sums["agree"] += float(agree)


def heldout_metrics(engine, tok, tasks: list[EvalTask], rank: int = 0, world: int = 1) -> dict[str, float]:
    """Greedy pass@1 per task on its eval problems (sharded across ranks like `picochat eval`),
    graded by the task's grader, plus the calculator agreement over all replies that used it."""
    sums = dict.fromkeys([f"{t.name}/{x}" for t in tasks for x in ("n", "ok")] + ["calls", "agree"], 0.0)
    limit = engine.model.cos.size(0)
    for task in tasks:
        mine = [task.examples[i] for i in range(rank, len(task), world)]
        if not mine:
            continue
        prompts = [tok.render_for_completion({"messages": task.chat_prompt(ex)}) for ex in mine]
        replies = generate_replies(engine, tok, prompts, min(task.max_tokens, limit // 2))  # greedy
        for ex, r in zip(mine, replies):
            sums[f"{task.name}/n"] += 1
            sums[f"{task.name}/ok"] += float(task.reward(ex, r.text))
        add_agreement(sums, replies)
    v = sum_over_ranks(sums, engine.device)
    out = {f"heldout_{t.name}": v[f"{t.name}/ok"] / max(1.0, v[f"{t.name}/n"]) for t in tasks}
    if v["calls"]:
        out["heldout_calc_agree"] = v["agree"] / v["calls"]
    return out
