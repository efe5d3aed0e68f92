"""Generative evals' helpers: the batched tool-call loop itself is inference/chat.py's
`generate_replies` (re-exported here), shared with chat and RL rollouts.
"""
from __future__ import annotations

from fractions import Fraction

from picochat.inference.chat import Reply, generate_replies  # noqa: F401 -- re-exported for eval and RL code
from picochat.tasks.gsm8k import last_number


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
    return last_number(reply.text) == result  # None (no number) is not the result
