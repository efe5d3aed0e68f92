"""Batched replies for generative evals, calculator tool calls included.

`stream_chat` (inference/chat.py) serves one conversation; an eval has hundreds, so here a whole
batch goes through `Engine.generate` at once. Tool use works in rounds: every row generates until
<|assistant_end|>, <|python_end|> or its budget; rows that stopped on <|python_end|> get the
calculator's result forced in as <|output_start|> result <|output_end|> (as in SFT data and in
`stream_chat`) and continue in the next round, the others are done. Each row's result depends only
on its own prompt and seed, never on the rest of the batch (up to float rounding in batched matmuls).
"""
from __future__ import annotations

from dataclasses import replace
from fractions import Fraction

from picochat.calculator import run_tool
from picochat.inference.chat import Reply
from picochat.inference.sampling import Sampling
from picochat.tasks.gsm8k import last_number

MAX_TOOL_CALLS = 4


def _append(parts: list[dict], kind: str, text: str) -> None:
    if not text:
        return
    if parts and parts[-1]["type"] == kind:
        parts[-1]["text"] += text
    else:
        parts.append({"type": kind, "text": text})


def generate_replies(engine, tok, prompts: list[list[int]], max_tokens: int, sampling: Sampling = Sampling(0.0), *,
                     tools: bool = True, stop_texts: tuple[str, ...] = (), traces: list | None = None) -> list[Reply]:
    """One Reply per prompt, sampled with `sampling` (greedy by default; the seed one per prompt,
    None for 0 everywhere; each round moves it on). tools=False (base models): plain continuation,
    stopped at <|bos|> or at the first of `stop_texts` (cut off the reply's text).
    traces: a list to extend with one (ids, sampled) per prompt: the whole token sequence (prompt,
    reply, forced tool outputs) and per token whether the model sampled it (RL trains on those)."""
    sp = tok.encode_special
    py_start, py_end, out_start, out_end = (sp(n) for n in ("<|python_start|>", "<|python_end|>",
                                                            "<|output_start|>", "<|output_end|>"))
    stops = {tok.bos_token_id} | ({sp("<|assistant_end|>"), py_end} if tools else set())
    limit = engine.model.cos.size(0)  # rotary table: prompt + reply must fit in it
    B = len(prompts)
    seeds = [0] * B if sampling.seed is None else [int(s) for s in sampling.seed]
    replies = [Reply() for _ in range(B)]
    ids = [list(p) for p in prompts]
    sampled = [[False] * len(p) for p in prompts]
    calls = [0] * B
    active = list(range(B))
    rnd = 0
    while active:
        longest = max(len(ids[i]) for i in active)
        budgets = [min(max_tokens - replies[i].tokens, limit + 1 - longest) for i in active]
        todo = [(i, b) for i, b in zip(active, budgets) if b > 0]
        if not todo:
            break
        outs = engine.generate([ids[i] for i, _ in todo], [b for _, b in todo], stop_tokens=stops,
                               sampling=replace(sampling, seed=[seeds[i] + 7919 * rnd for i, _ in todo]))
        rnd += 1
        active = []
        for (i, _), out in zip(todo, outs):
            r = replies[i]
            r.tokens += len(out)
            ids[i] = ids[i] + out  # a new list: the engine may keep the prompt it was given
            sampled[i] += [True] * len(out)
            hit = out[-1] if out and out[-1] in stops else None
            body = out[:-1] if hit is not None else out
            if tools and py_start in body:  # text, then a tool call
                k = body.index(py_start)
                _append(r.parts, "text", tok.decode(body[:k]))
                code = tok.decode([t for t in body[k + 1:] if t != py_start])
                _append(r.parts, "python", code)
                if hit == py_end and calls[i] < MAX_TOOL_CALLS:
                    result = run_tool(code)
                    _append(r.parts, "python_output", result)
                    calls[i] += 1
                    forced = [out_start] + tok.encode(result) + [out_end]
                    ids[i] = ids[i] + forced
                    sampled[i] += [False] * len(forced)
                    active.append(i)
                    continue
            else:
                _append(r.parts, "text", tok.decode(body))
            r.finish_reason = "stop" if hit is not None else "length"
    if traces is not None:
        traces.extend(zip(ids, sampled))
    if not tools and stop_texts:
        for r in replies:
            text = r.text
            cut = min((text.find(s) for s in stop_texts if s in text), default=-1)
            if cut >= 0:
                r.parts = [{"type": "text", "text": text[:cut]}]
                r.finish_reason = "stop"
    return replies


def calculator_agreement(reply: Reply) -> bool | None:
    """Whether the reply's final answer (the last number of its text) equals the result of its last
    calculator call; None when it made no call with a numeric result. The quickstart's SFT model
    fails this one in its own way: `[calculator: 123 * 45 = 5535] 123 * 45 = 53535`."""
    outputs = [p["text"] for p in reply.parts if p["type"] == "python_output"]
    if not outputs:
        return None
    try:
        result = Fraction(outputs[-1].strip())
    except (ValueError, ZeroDivisionError):  # "error: ..." from the calculator
        return None
    answer = last_number(reply.text)
    return answer is not None and answer == result
