"""CORE: the DCLM base-model benchmark that nanochat reports, scored with picochat's own machinery.

The benchmark (DCLM's eval bundle, eval_bundle.zip, as nanochat uses it):
- core.yaml lists `icl_tasks`: label, dataset_uri (JSONL under eval_data/), num_fewshot (a list; the
  first is used), icl_task_type, continuation_delimiter (default " "). The real bundle has 22 tasks.
- eval_meta_data.csv gives each task's "Random baseline", in percent.
- Three task types, one JSON row each:
  multiple_choice {"query", "choices", "gold"}: one prompt per choice, query + delimiter + choice;
  schema {"context_options", "continuation", "gold"}: one prompt per context, context + delimiter + continuation;
  language_modeling {"context", "continuation"}: context (stripped) + delimiter + continuation.
  The task's few-shot examples come first, each rendered with its gold answer and a blank line after.
- Scoring: MC and schema pick the option whose scored tokens have the lowest mean loss (the tokens
  after the prompts' common token prefix for MC; the common token suffix for schema); LM is right
  iff greedy argmax reproduces every continuation token.
- centered accuracy = (acc - b) / (1 - b), b the random baseline as a fraction; CORE = their mean.
We seed as nanochat does (rows shuffled by Random(1337) before --limit; the few-shot rows of row i
drawn by Random(1234 + i) from the other rows), so `--limit N` scores the same prompts as its
`--max-per-task N`. Differences: an over-long row keeps BOS and its end (nanochat drops BOS).

Where the tasks come from (the bundle, its download, the offline subset): eval/core_data.py.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from picochat.device import autocast_ctx
from picochat.eval.categorical import keep_end, right_padded, score_options

MC, SCHEMA, LM = "multiple_choice", "schema", "language_modeling"
FIELDS = {MC: ("query", "choices", "gold"), SCHEMA: ("context_options", "continuation", "gold"),
          LM: ("context", "continuation")}
# DCLM's 22 CORE tasks: type, few-shot count, random baseline (%). Used to build the offline subset;
# a bundle's own core.yaml and eval_meta_data.csv are what count when it is there.
CORE_22 = {
    "hellaswag_zeroshot": (MC, 0, 25), "jeopardy": (LM, 10, 0), "bigbench_qa_wikidata": (LM, 10, 0),
    "arc_easy": (MC, 10, 25), "arc_challenge": (MC, 10, 25), "copa": (MC, 0, 50), "commonsense_qa": (MC, 10, 20),
    "piqa": (MC, 10, 50), "openbook_qa": (MC, 0, 25), "lambada_openai": (LM, 0, 0), "hellaswag": (MC, 10, 25),
    "winograd": (SCHEMA, 0, 50), "winogrande": (SCHEMA, 0, 50), "bigbench_dyck_languages": (LM, 10, 0),
    "agi_eval_lsat_ar": (MC, 3, 20), "bigbench_cs_algorithms": (LM, 10, 0), "bigbench_operators": (LM, 10, 0),
    "bigbench_repeat_copy_logic": (LM, 10, 0), "squad": (LM, 10, 0), "coqa": (LM, 0, 0), "boolq": (MC, 10, 62),
    "bigbench_language_identification": (MC, 10, 25)}
CHUNK = 256  # rows tokenized and scored at a time: 10-shot prompts of 10k rows would not fit in memory at once


@dataclass
class CoreTask:
    label: str
    icl_type: str        # multiple_choice | schema | language_modeling
    shots: int
    delimiter: str
    baseline: float      # random baseline as a fraction
    rows: list


# --------------------------------------------------------------------------- prompts and spans

def fewshot_indices(n: int, i: int, k: int) -> list[int]:
    """k rows other than i, drawn by Random(1234 + i): the draw of a sample over the n - 1 other rows,
    mapped past i (the same rows as sampling the list without i, in O(k))."""
    if k <= 0:
        return []
    return [j + (j >= i) for j in random.Random(1234 + i).sample(range(n - 1), min(k, n - 1))]


def render(task: CoreTask, item: dict, shots: list[dict]) -> list[str]:
    """The prompts of one row: one per option (MC, schema), or [without, with] the continuation (LM)."""
    d = task.delimiter
    if task.icl_type == MC:
        head = "".join(f"{ex['query']}{d}{ex['choices'][ex['gold']]}\n\n" for ex in shots)
        return [f"{head}{item['query']}{d}{c}" for c in item["choices"]]
    if task.icl_type == SCHEMA:
        head = "".join(f"{ex['context_options'][ex['gold']]}{d}{ex['continuation']}\n\n" for ex in shots)
        return [f"{head}{c}{d}{item['continuation']}" for c in item["context_options"]]
    body = "".join(f"{ex['context'].strip()}{d}{ex['continuation']}\n\n" for ex in shots)
    body += item["context"].strip() + d
    return [body.strip(), body + item["continuation"]]


def _common(seqs: list[list[int]], reverse: bool = False) -> int:
    n = 0
    for toks in zip(*(reversed(s) if reverse else s for s in seqs)):
        if any(t != toks[0] for t in toks):
            break
        n += 1
    return n


def spans(icl_type: str, seqs: list[list[int]]) -> list[tuple[list[int], int]]:
    """(tokens, start of the scored tokens) per prompt. At least one token is scored and BOS never is."""
    shortest = min(len(s) for s in seqs)
    if icl_type == MC:
        start = min(_common(seqs), shortest - 1)
        return [(s, start) for s in seqs]
    if icl_type == SCHEMA:
        k = max(1, min(_common(seqs, reverse=True), shortest - 1))
        return [(s, len(s) - k) for s in seqs]
    without, with_ = seqs
    start = len(without) if with_[:len(without)] == without else _common(seqs)
    return [(with_, max(1, min(start, len(with_) - 1)))]


# --------------------------------------------------------------------------- scoring

@torch.no_grad()
def greedy_matches(model, items: list[tuple[list[int], int]], batch_size: int, max_len: int) -> list[bool]:
    """Per (tokens, start): does the argmax at each position reproduce tokens[start:]? Long rows keep BOS
    and their end; rows are right-padded and batched by length."""
    device = next(model.parameters()).device
    out = [False] * len(items)
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        rows = [(keep_end(seq, max_len), max(1, start - max(0, len(seq) - max_len))) for seq, start in
                (items[i] for i in idx)]
        with autocast_ctx(device):
            pred = model(right_padded([seq for seq, _ in rows], device)).argmax(dim=-1).cpu()
        for r, (i, (seq, start)) in enumerate(zip(idx, rows)):
            out[i] = pred[r, start - 1:len(seq) - 1].tolist() == seq[start:]
    return out


def score_rows(task: CoreTask, indices: list[int], model, tok, batch_size: int = 8) -> list[bool]:
    """Right or wrong, per row index, with the task's few-shot prompts."""
    max_len = model.config.sequence_len
    verdicts = []
    for c in range(0, len(indices), CHUNK):
        chunk = indices[c:c + CHUNK]
        prompts = [render(task, task.rows[i], [task.rows[j] for j in fewshot_indices(len(task.rows), i, task.shots)])
                   for i in chunk]
        flat = tok.encode([p for ps in prompts for p in ps], prepend=tok.bos_token_id)
        per_row, k = [], 0
        for ps in prompts:
            per_row.append(spans(task.icl_type, flat[k:k + len(ps)]))
            k += len(ps)
        if task.icl_type == LM:
            verdicts += greedy_matches(model, [s[0] for s in per_row], batch_size, max_len)
            continue
        # MC: one context, one option per choice; schema: one example per context option
        contexts, options, owner = [], [], []
        for r, sp in enumerate(per_row):
            groups = [sp] if task.icl_type == MC else [[s] for s in sp]
            for g in groups:
                contexts.append(g[0][0][:g[0][1]])
                options.append([seq[start:] for seq, start in g])
                owner.append(r)
        scores = score_options(model, contexts, options, batch_size=batch_size, max_len=max_len)
        means = [[] for _ in chunk]
        for r, opts, sc in zip(owner, options, scores):
            means[r] += [s / len(o) for s, o in zip(sc, opts)]  # mean log-prob = minus the mean loss
        for i, m in zip(chunk, means):
            verdicts.append(max(range(len(m)), key=m.__getitem__) == task.rows[i]["gold"])
    return verdicts


def centered(accuracy: float, baseline: float) -> float:
    """(acc - b) / (1 - b): 0 at chance, 1 when perfect; b a fraction."""
    return (accuracy - baseline) / (1.0 - baseline)


def core_name(labels: list[str]) -> str:
    ours = [x for x in labels if x in CORE_22]
    if len(ours) == len(CORE_22) == len(labels):
        return "CORE"
    extra = len(labels) - len(ours)
    return f"core-subset: {len(ours)} of {len(CORE_22)} tasks" + (f" (+{extra} not in CORE)" if extra else "")


def evaluate_core(task, model, tok, opts, info) -> dict | None:
    """Every CORE task of `task.examples`, rows sharded over ranks; per-task accuracy, centered accuracy, CORE."""
    from picochat.eval.runner import _gather
    t0, per_task = time.time(), {}
    for ct in task.examples:
        t1 = time.time()
        mine = list(range(info.rank, len(ct.rows), info.world_size))
        ok = score_rows(ct, mine, model, tok, batch_size=opts.batch_size)
        records = _gather([{"index": i, "correct": c} for i, c in zip(mine, ok)], info)
        if not info.is_master:
            continue
        n, right = len(records), sum(r["correct"] for r in records)
        acc = right / max(1, n)
        per_task[ct.label] = {"type": ct.icl_type, "shots": ct.shots, "n": n, "correct": right, "accuracy": acc,
                              "baseline": ct.baseline, "centered": centered(acc, ct.baseline)}
        print(f"  core {ct.label:<34} {ct.shots:>2}-shot {ct.icl_type:<17} accuracy {acc:.4f}  centered "
              f"{per_task[ct.label]['centered']:+.4f}  ({n} rows, {time.time() - t1:.0f}s)", flush=True)
    if not info.is_master:
        return None
    cs = [t["centered"] for t in per_task.values()]
    return {"task": "core", "kind": "core", "source": task.source, "name": core_name(list(per_task)),
            "n": sum(t["n"] for t in per_task.values()), "core": sum(cs) / max(1, len(cs)), "tasks": per_task,
            "mode": "chat" if opts.chat else "base", "seconds": time.time() - t0}
