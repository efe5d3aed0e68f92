"""Chat turns on top of the Engine: render the conversation, stream the reply, run tool calls.

When the model writes <|python_start|> expr <|python_end|>, we evaluate expr with the safe
calculator (never eval), feed <|output_start|> result <|output_end|> back as forced tokens and let
the model continue: the same format the SFT data teaches. The reply is returned both as streamed
text and as structured assistant parts, so multi-turn history renders exactly as in training.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from picochat.calculator import run_tool
from picochat.inference.sampling import Sampling
from picochat.tokenizer import SPECIAL_TOKENS


@dataclass
class Reply:
    parts: list[dict] = field(default_factory=list)   # assistant content parts (text/python/python_output)
    tokens: int = 0                                     # generated tokens (tool outputs excluded)
    finish_reason: str = "length"                       # "stop" | "length"

    @property
    def text(self) -> str:
        return "".join(p["text"] for p in self.parts if p["type"] == "text")

    def content(self):
        """Message content for the history: a plain string unless tools were used."""
        if all(p["type"] == "text" for p in self.parts):
            return self.text
        return self.parts


class Detokenizer:
    """Token ids in, text out as it becomes final: a multi-byte character split over several tokens
    is held back until its last byte arrives."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.shown = tokenizer, [], ""

    def add(self, t: int) -> str | None:
        """The new text, or None while the last character is incomplete."""
        self.ids.append(t)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return None
        new, self.shown = text[len(self.shown):], text
        return new

    def rest(self) -> str:
        """What add() held back (at the end of the stream)."""
        return self.tok.decode(self.ids)[len(self.shown):]


def _add(parts: list[dict], kind: str, text: str) -> None:
    if parts and parts[-1]["type"] == kind:
        parts[-1]["text"] += text
    else:
        parts.append({"type": kind, "text": text})


def stream_chat(engine, tokenizer, messages: list[dict], max_tokens: int = 256, sampling: Sampling = Sampling(0.8, 50),
                max_tool_calls: int = 4, reply: Reply | None = None,
                on_tool: Callable[[str, str], None] | None = None) -> Iterator[str]:
    """Yield text pieces of the assistant reply as they are generated; fill `reply` as we go.
    on_tool(code, result) hears of each calculator call just before its '[calculator: ...]' piece."""
    reply = reply if reply is not None else Reply()
    tok = tokenizer
    special = {name: tok.encode_special(name) for name in
               ("<|assistant_end|>", "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")}
    ids = tok.render_for_completion({"messages": messages})
    stops = {special["<|assistant_end|>"], special["<|python_end|>"], tok.bos_token_id}
    # a special token the model emits out of place (<|user_start|>, a stray <|output_end|>) is not text:
    # it is kept in the token stream the model sees, never shown or stored as reply text
    stray = {tok.encode_special(name) for name in SPECIAL_TOKENS} - stops - {special["<|python_start|>"]}
    tool_calls, mode, segment = 0, "text", Detokenizer(tok)
    while reply.tokens < max_tokens:
        hit = None
        for step in engine.generate_stream([ids], max_tokens - reply.tokens, sampling=sampling, stop_tokens=stops):
            t = step[0]
            if t is None:
                break
            reply.tokens += 1
            ids = ids + [t]
            if t in stops:
                hit = t
                break
            if t == special["<|python_start|>"]:
                mode, segment = "python", Detokenizer(tok)
                continue
            if t in stray:
                continue
            new = segment.add(t)
            if new is not None:
                _add(reply.parts, mode, new)
                if mode == "text":
                    yield new
        sampling = sampling.reseeded(1)  # a fresh segment must not replay the same random stream
        if hit == special["<|python_end|>"] and mode == "python" and tool_calls < max_tool_calls:
            code = tok.decode(segment.ids)
            result = run_tool(code)
            tool_calls += 1
            _add(reply.parts, "python_output", result)
            if on_tool is not None:
                on_tool(code, result)
            yield f"[calculator: {code} = {result}] "
            ids = ids + [special["<|output_start|>"]] + tok.encode(result) + [special["<|output_end|>"]]
            mode, segment = "text", Detokenizer(tok)
            continue
        reply.finish_reason = "stop" if hit is not None else "length"
        return
