"""Generative evaluation: prompt with each task example, generate a reply, grade it.

The prompt is the example's conversation up to (not including) its final assistant turn,
rendered exactly as in SFT; the reply runs through the same chat path as the CLI and the
server (`inference.chat.stream_chat`), calculator tool calls included. Greedy by default,
so results are reproducible. Results go to a JSON file next to the checkpoint.
"""
from __future__ import annotations

import time

from tqdm import tqdm

from picochat.inference.chat import Reply, stream_chat


def prompt_messages(conversation: dict) -> list[dict]:
    messages = conversation["messages"]
    return messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages


def evaluate_generative(engine, tokenizer, task, limit: int | None = None, max_tokens: int = 64,
                        temperature: float = 0.0, seed: int = 0, show: int = 3) -> dict:
    n = len(task) if limit is None else min(limit, len(task))
    correct, examples = 0, []
    t0 = time.time()
    for i in tqdm(range(n), desc=f"eval {task.name}", leave=False):
        conv = task[i]
        reply = Reply()
        for _ in stream_chat(engine, tokenizer, prompt_messages(conv), max_tokens=max_tokens,
                             temperature=temperature, top_k=None, seed=seed + i, reply=reply):
            pass
        ok = bool(task.evaluate(conv, reply.text))
        correct += ok
        if len(examples) < show:
            examples.append({"prompt": prompt_messages(conv)[-1]["content"], "reply": reply.text, "correct": ok})
    return {"task": task.name, "n": n, "correct": correct, "accuracy": correct / max(1, n),
            "seconds": time.time() - t0, "examples": examples}
