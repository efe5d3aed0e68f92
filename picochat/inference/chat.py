"""Chat turns on top of the Engine: render the conversation, stream the reply, run tool calls.

When the model writes <|python_start|> expr <|python_end|>, we evaluate expr with the safe
calculator (never eval), feed <|output_start|> result <|output_end|> back as forced tokens and let
the model continue: the same format the SFT data teaches. `tool_turns` is the one loop that does
this, for a streamed conversation (`stream_chat`: `picochat chat` and the server) and for a batch
(`generate_replies`: generative evals and RL rollouts). The reply comes back as text and as
structured assistant parts, so multi-turn history renders exactly as in training.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from picochat.calculator import run_tool
from picochat.inference.sampling import Sampling
from picochat.tokenizer import SPECIAL_TOKENS

MAX_TOOL_CALLS = 4  # calculator calls per reply; a call past these ends the reply


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
    """Append text to the reply's last part when it is of the same kind, else start a part."""
    if parts and parts[-1]["type"] == kind:
        parts[-1]["text"] += text
    else:
        parts.append({"type": kind, "text": text})


def _settle(tok, reply: Reply, body: list[int], py_start: int | None) -> str | None:
    """A batched round's tokens (its stop token left out) as reply parts (empty ones left out); the
    code of its tool call, if it wrote one (everything after the first <|python_start|>)."""
    k = body.index(py_start) if py_start in body else len(body)
    code = None if k == len(body) else tok.decode([t for t in body[k + 1:] if t != py_start])
    for kind, text in (("text", tok.decode(body[:k])), ("python", code)):
        if text:
            _add(reply.parts, kind, text)
    return code


def tool_turns(engine, tok, prompts: list[list[int]], max_tokens: int, sampling: Sampling, replies: list[Reply], *,
               tools: bool = True, stream: bool = False, max_tool_calls: int = MAX_TOOL_CALLS,
               on_tool: Callable[[str, str], None] | None = None, traces: list | None = None,
               stops: set[int] | None = None) -> Iterator[str]:
    """The one tool-call loop (chat, server, evals, RL rollouts): each round every active row
    generates until <|assistant_end|>, <|python_end|> or its budget; a row that stopped on
    <|python_end|> after a <|python_start|> gets the calculator's result forced in as
    <|output_start|> result <|output_end|> (as in the SFT data) and continues next round, up to
    max_tool_calls calls; the others are done. Fills `replies` (one per prompt).

    stream=True (one conversation, engine.generate_stream): yields the reply's text pieces as they
    come and '[calculator: code = result] ' for a call; the seed moves on by one per round.
    Otherwise (a batch, engine.generate): yields nothing; the round's text is decoded at its end;
    each row's seed (sampling.seed: one per prompt, None for 0) moves on by 7919 per round, and
    prompt + reply stop at the rotary table. tools=False (base models, the server's completions):
    stop at <|bos|> only, or at `stops`; a stream then hides every special token and ends with the
    text a last incomplete character held back.
    traces: extended with one (ids, sampled) per prompt: every token (prompt, reply, forced tool
    outputs) and whether the model sampled it (RL trains on those)."""
    sp = tok.encode_special
    py_start, py_end, out_start, out_end = (sp(n) for n in ("<|python_start|>", "<|python_end|>",
                                                            "<|output_start|>", "<|output_end|>"))
    if stops is None:
        stops = {tok.bos_token_id} | ({sp("<|assistant_end|>"), py_end} if tools else set())
    stray = {sp(n) for n in SPECIAL_TOKENS} - stops - ({py_start} if tools else set())
    B = len(prompts)
    ids, sampled = [list(p) for p in prompts], [[False] * len(p) for p in prompts]
    seeds = [0] * B if sampling.seed is None else [int(s) for s in sampling.seed] if not stream else None
    calls, active, rnd = [0] * B, list(range(B)), 0
    while active:
        if stream:  # one conversation, as long as its budget lasts
            todo = [(0, max_tokens - replies[0].tokens)] if replies[0].tokens < max_tokens else []
        else:
            longest = max(len(ids[i]) for i in active)
            limit = engine.model.cos.size(0)  # rotary table: prompt + reply must fit in it
            todo = [(i, b) for i in active if (b := min(max_tokens - replies[i].tokens, limit + 1 - longest)) > 0]
        if not todo:
            break
        if stream:  # tokens as they come: text pieces out once final (Detokenizer); a special token
            # out of place (<|user_start|>, a stray <|output_end|>) stays in the model's stream, not the text
            mode, segment, out = "text", Detokenizer(tok), []
            for step in engine.generate_stream([ids[0]], todo[0][1], sampling=sampling, stop_tokens=stops):
                if step[0] is None:
                    break
                out.append(t := step[0])
                replies[0].tokens += 1
                if t in stops:
                    break
                if t == py_start:
                    mode, segment = "python", Detokenizer(tok)
                elif t not in stray and (new := segment.add(t)) is not None:
                    _add(replies[0].parts, mode, new)
                    if mode == "text":
                        yield new
            if not tools and segment.rest():
                _add(replies[0].parts, mode, segment.rest())
                yield segment.rest()
            outs = [out]
            sampling = sampling.reseeded(1)  # a fresh segment must not replay the same random stream
        else:
            outs = engine.generate([ids[i] for i, _ in todo], [b for _, b in todo], stop_tokens=stops,
                                   sampling=replace(sampling, seed=[seeds[i] + 7919 * rnd for i, _ in todo]))
        rnd += 1
        active = []
        for (i, _), out in zip(todo, outs):
            r = replies[i]
            if not stream:
                r.tokens += len(out)
            ids[i] = ids[i] + out  # a new list: the engine may keep the prompt it was given
            sampled[i] += [True] * len(out)
            hit = out[-1] if out and out[-1] in stops else None
            body = out[:-1] if hit is not None else out
            # stream: the parts are written already; a batch's round is decoded here
            code = (tok.decode(segment.ids) if mode == "python" else None) if stream else \
                _settle(tok, r, body, py_start if tools else None)
            if hit == py_end and code is not None and calls[i] < max_tool_calls:
                result = run_tool(code)
                calls[i] += 1
                if stream or result:  # (a batch never keeps an empty part)
                    _add(r.parts, "python_output", result)
                if on_tool is not None:
                    on_tool(code, result)
                if stream:
                    yield f"[calculator: {code} = {result}] "
                forced = [out_start] + tok.encode(result) + [out_end]
                ids[i] = ids[i] + forced
                sampled[i] += [False] * len(forced)
                active.append(i)
                continue
            r.finish_reason = "stop" if hit is not None else "length"
    if traces is not None:
        traces.extend(zip(ids, sampled))


def stream_chat(engine, tokenizer, messages: list[dict], max_tokens: int = 256, sampling: Sampling = Sampling(0.8, 50),
                max_tool_calls: int = MAX_TOOL_CALLS, reply: Reply | None = None,
                on_tool: Callable[[str, str], None] | None = None) -> Iterator[str]:
    """Yield text pieces of the assistant reply as they are generated; fill `reply` as we go.
    on_tool(code, result) hears of each calculator call just before its '[calculator: ...]' piece."""
    ids = tokenizer.render_for_completion({"messages": messages})
    yield from tool_turns(engine, tokenizer, [ids], max_tokens, sampling, [reply if reply is not None else Reply()],
                          stream=True, max_tool_calls=max_tool_calls, on_tool=on_tool)


def generate_replies(engine, tok, prompts: list[list[int]], max_tokens: int, sampling: Sampling = Sampling(0.0), *,
                     tools: bool = True, stop_texts: tuple[str, ...] = (), traces: list | None = None) -> list[Reply]:
    """One Reply per prompt, a whole batch at once (evals, RL rollouts), sampled with `sampling`
    (greedy by default; the seed one per prompt, None for 0 everywhere). Each row's result depends
    only on its own prompt and seed, never on the rest of the batch (up to float rounding in batched
    matmuls). tools=False (base models): plain continuation, stopped at <|bos|> or at the first of
    `stop_texts` (cut off the reply's text). traces: see tool_turns."""
    replies = [Reply() for _ in prompts]
    for _ in tool_turns(engine, tok, prompts, max_tokens, sampling, replies, tools=tools, traces=traces):
        pass
    if not tools and stop_texts:
        for r in replies:
            text = r.text
            cut = min((text.find(s) for s in stop_texts if s in text), default=-1)
            if cut >= 0:
                r.parts = [{"type": "text", "text": text[:cut]}]
                r.finish_reason = "stop"
    return replies
