"""Run one evaluation task on a model: shard the examples, score or generate in batches, gather, aggregate.

Under torchrun each rank takes examples rank, rank + world, ... and the per-example records are
gathered on rank 0 (all_gather_object: gloo on CPU, nccl on GPU), sorted back into order, and
aggregated there, so the score does not depend on the number of processes (tested).

Generative tasks: pass@1 is always the greedy reply. With samples = k > 1, k more replies are
sampled per example at `temperature` and give pass@k (Chen et al.'s unbiased estimator with n = k,
i.e. "any of the k is right"), the sampled pass@1 (mean correct fraction) and maj@k (the most
common extracted answer, ties to the first seen, is right; aime.majority_vote).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from tqdm import tqdm

from picochat.common import DistInfo
from picochat.eval.categorical import keep_end, mc_prompts, score_options
from picochat.eval.generate import calculator_agreement, generate_replies
from picochat.inference.sampling import Sampling
from picochat.tasks import EvalTask
from picochat.tasks.aime import majority_vote, pass_at_k


@dataclass
class EvalOptions:
    chat: bool = True                 # chat template (and calculator) or plain text prompts
    batch_size: int = 8               # prompts (generative) or rows (categorical, bpb) per forward
    max_tokens: int | None = None     # reply budget; None = the task's default
    samples: int = 1                  # k for pass@k / maj@k (1 = greedy only)
    temperature: float = 0.8          # for the k samples (the pass@1 reply is always greedy)
    top_k: int | None = 50            # for the k samples
    seed: int = 0
    mc_mode: str = "auto"             # letters | options | auto (letters for chat, options for base)


def _gather(records: list[dict], info: DistInfo) -> list[dict]:
    if info.enabled and info.world_size > 1:
        parts = [None] * info.world_size
        dist.all_gather_object(parts, records)
        records = [r for part in parts for r in part]
    return sorted(records, key=lambda r: r["index"])


def _prompt_ids(task: EvalTask, tok, ex: dict, chat: bool) -> list[int]:
    if chat:
        return tok.render_for_completion({"messages": task.chat_prompt(ex)})
    return tok.encode(task.base_prompt(ex), prepend=tok.bos_token_id)


def _generate(task, engine, tok, prompts, max_tokens, opts, sampling, bar) -> list:
    """One Reply per prompt (text + parts, tool calls included), in prompt order."""
    out = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    for b in range(0, len(order), opts.batch_size):
        idx = order[b:b + opts.batch_size]
        replies = generate_replies(engine, tok, [prompts[i] for i in idx], max_tokens,
                                   replace(sampling, seed=[sampling.seed[i] for i in idx]), tools=opts.chat,
                                   stop_texts=() if opts.chat else task.stop_text)
        for i, r in zip(idx, replies):
            out[i] = r
        bar.update(len(idx))
    return out


def evaluate_generative(task: EvalTask, engine, tok, opts: EvalOptions, info: DistInfo) -> dict | None:
    t0 = time.time()
    mine = list(range(info.rank, len(task), info.world_size))
    examples = [task.examples[i] for i in mine]
    limit = engine.model.cos.size(0)
    max_tokens = min(opts.max_tokens or task.max_tokens, limit // 2)
    # over-long prompts keep BOS and their end, so that prompt + reply fit the rotary table
    prompts = [keep_end(_prompt_ids(task, tok, ex, opts.chat), limit - max_tokens) for ex in examples]
    k = opts.samples if opts.samples > 1 else 0
    bar = tqdm(total=len(mine) * (1 + k), desc=f"eval {task.name}", disable=not info.is_master, leave=False,
               dynamic_ncols=True)
    greedy_replies = _generate(task, engine, tok, prompts, max_tokens, opts, Sampling(0.0, seed=[0] * len(mine)), bar)
    greedy = [r.text for r in greedy_replies]
    sampled = []
    for j in range(k):  # sample j of example i is seeded by (seed, i, j): the same under any sharding
        seeds = [opts.seed + 1_000_003 * i + 7 * j for i in mine]
        sampled.append([r.text for r in _generate(task, engine, tok, prompts, max_tokens, opts,
                                                  Sampling(opts.temperature, opts.top_k, seed=seeds), bar)])
    bar.close()
    records = []
    grading = tqdm(list(zip(mine, examples)), desc=f"grade {task.name}", disable=not info.is_master, leave=False,
                   dynamic_ncols=True)  # HumanEval runs each reply in the sandbox: seconds, not microseconds
    for n, (i, ex) in enumerate(grading):
        rec = {"index": i, "correct": bool(task.grade(ex, greedy[n])), "reply": greedy[n]}
        if task.extract is not None:
            rec["prediction"] = _jsonable(task.extract(greedy[n]))
        rec.update({k: ex[k] for k in ("answer", "task_id") if k in ex})
        copied = calculator_agreement(greedy_replies[n])  # None: no calculator call with a numeric result
        if copied is not None:
            rec["tool_copy"] = copied
        if k:
            replies = [s[n] for s in sampled]
            ok = [bool(task.grade(ex, r)) for r in replies]
            rec["samples_correct"] = sum(ok)
            if task.extract is not None:
                answers = [task.extract(r) for r in replies]
                vote = majority_vote(answers)
                rec["majority"] = _jsonable(vote)
                rec["majority_correct"] = vote is not None and ok[answers.index(vote)]
        records.append(rec)
    records = _gather(records, info)
    if not info.is_master:
        return None
    n = len(records)
    out = {"task": task.name, "kind": "generative", "source": task.source, "n": n,
           "correct": sum(r["correct"] for r in records), "max_tokens": max_tokens,
           "mode": "chat" if opts.chat else "base"}
    out["accuracy"] = out["pass@1"] = out["correct"] / max(1, n)
    calls = [r["tool_copy"] for r in records if "tool_copy" in r]
    if calls:  # of the greedy replies that got a numeric calculator result, the share whose answer is it
        out.update({"tool_results": len(calls), "tool_copy": sum(calls) / len(calls)})
    if k:
        out.update({"samples": k, "temperature": opts.temperature, "top_k": opts.top_k,
                    f"pass@{k}": sum(pass_at_k(k, r["samples_correct"], k) for r in records) / max(1, n),
                    "sampled_pass@1": sum(r["samples_correct"] for r in records) / max(1, k * n)})
        if task.extract is not None:
            out[f"maj@{k}"] = sum(r["majority_correct"] for r in records) / max(1, n)
    out["seconds"] = time.time() - t0
    out["examples"] = records
    return out


def _jsonable(v):
    if v is None or isinstance(v, (int, str, float)):
        return v
    if getattr(v, "denominator", None) == 1:
        return int(v)
    return str(v)


def evaluate_categorical(task: EvalTask, model, tok, opts: EvalOptions, info: DistInfo) -> dict | None:
    t0 = time.time()
    mode = opts.mc_mode if opts.mc_mode != "auto" else ("letters" if opts.chat else "options")
    mine = list(range(info.rank, len(task), info.world_size))
    contexts, options = [], []
    for i in mine:
        c, o = mc_prompts(tok, task.examples[i], opts.chat, mode)
        contexts.append(c)
        options.append(o)
    scores = []
    step = max(1, opts.batch_size * 4)
    for b in tqdm(range(0, len(mine), step), desc=f"eval {task.name}", disable=not info.is_master, leave=False):
        scores += score_options(model, contexts[b:b + step], options[b:b + step], batch_size=opts.batch_size)
    records = []
    for i, s in zip(mine, scores):
        pred = max(range(len(s)), key=lambda j: s[j])
        ans = task.examples[i]["answer_index"]
        records.append({"index": i, "scores": s, "prediction": pred, "answer": ans, "correct": pred == ans})
    records = _gather(records, info)
    if not info.is_master:
        return None
    n = len(records)
    correct = sum(r["correct"] for r in records)
    chance = sum(1 / len(task.examples[r["index"]]["choices"]) for r in records) / max(1, n)
    return {"task": task.name, "kind": "categorical", "source": task.source, "n": n, "correct": correct,
            "accuracy": correct / max(1, n), "chance": chance, "mc_mode": mode,
            "mode": "chat" if opts.chat else "base", "seconds": time.time() - t0, "examples": records}


def evaluate_bits_per_byte(task: EvalTask, model, tok, opts: EvalOptions, info: DistInfo,
                           limit: int | None = None) -> dict | None:
    """Texts -> BOS-prefixed tokens, concatenated and cut into rows of the model's context; rows are
    sharded across ranks and evaluate_bpb all-reduces the sums. limit = number of rows."""
    from picochat.eval.bpb import evaluate_bpb, token_byte_lengths
    t0 = time.time()
    device = next(model.parameters()).device
    T = model.config.sequence_len
    stream: list[int] = []
    for ids in tok.encode(task.examples, prepend=tok.bos_token_id):
        stream += ids
        if limit is not None and len(stream) > limit * T + 1:
            break
    n_rows = max(0, math.ceil((len(stream) - 1) / T))
    if limit is not None:
        n_rows = min(n_rows, limit)
    rows = list(range(info.rank, n_rows, info.world_size))

    def batches():
        for b in range(0, len(rows), opts.batch_size):
            xs, ys = [], []
            for r in rows[b:b + opts.batch_size]:
                chunk = stream[r * T:r * T + T + 1]
                pad = T + 1 - len(chunk)  # the last row may be short: its padding is not scored
                xs.append(chunk[:-1] + [0] * pad)
                ys.append(chunk[1:] + [-1] * pad)
            yield torch.tensor(xs, device=device), torch.tensor(ys, device=device)

    bpb = evaluate_bpb(model, batches(), token_byte_lengths(tok, device))
    if not info.is_master:
        return None
    return {"task": "bpb", "kind": "bpb", "source": task.source, "n": n_rows, "rows_of_tokens": T,
            "bpb": bpb, "seconds": time.time() - t0}
