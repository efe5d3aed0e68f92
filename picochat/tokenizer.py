"""Byte-level BPE tokenizer: trained with rustbpe, run with tiktoken, plus the chat format.

Training (`rustbpe`) and inference (`tiktoken`) are separate libraries on purpose, as in nanochat:
rustbpe learns merges fast from a streaming iterator, tiktoken encodes fast. They agree because
both implement GPT-4-style BPE over the same split regex and the same rank table
(token bytes -> rank; the 256 single bytes are ranks 0..255, merges follow in learned order).

The special tokens are appended after the BPE ranks, so with N ranks they get ids N..N+8 and
`vocab_size` == N + 9: `Tokenizer.train(texts, vocab_size)` asks rustbpe for vocab_size - 9
ranks. On a tiny corpus rustbpe runs out of pairs and stops early, so the real vocab can be
smaller than requested: always size the model from `tok.vocab_size`.

Chat format (nanochat's): <|bos|> then per turn
    <|user_start|> text <|user_end|>                                   mask 0
    <|assistant_start|>                                                mask 0
        text | <|python_start|> code <|python_end|>                    mask 1
             | <|output_start|> tool output <|output_end|>             mask 0
    <|assistant_end|>                                                  mask 1
The mask marks the tokens the model is trained to predict (SFT loss only where mask == 1).

On disk (a directory): `tokenizer.tiktoken` (one "<base64 token bytes> <rank>" line per rank,
tiktoken's own format) and `tokenizer.json` (pattern, special tokens with ids, vocab_size, and a
hash of the ranks file so a half-finished save is detected instead of silently mis-tokenizing).
"""
from __future__ import annotations

import base64
import hashlib
import itertools
import json
from pathlib import Path
from typing import Iterable, Iterator

import tiktoken

from picochat.common import PicochatError, atomic_path, write_json_atomic

# GPT-4's split pattern, except numbers split into chunks of at most 2 digits (not 3): with a
# small vocab, spending merges on all 1000 three-digit numbers is wasteful (nanochat's choice).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)

SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document; also the pad token (left padding)
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the calculator tool...
    "<|python_end|>",
    "<|output_start|>",  # ...and the tool's output is pasted back in (never predicted)
    "<|output_end|>",
]

RANKS_FILE = "tokenizer.tiktoken"
META_FILE = "tokenizer.json"
FORMAT = "picochat-tokenizer-v1"
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


class Tokenizer:
    """A tiktoken Encoding with picochat's special tokens and chat rendering on top."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN):
        n = len(mergeable_ranks)
        # Specials go right after the ranks, so ranks must be exactly 0..N-1: a gap would leave
        # undecodable ids inside the vocab, a duplicate would collide. Catches corrupt files too.
        if sorted(mergeable_ranks.values()) != list(range(n)) or n < 256:
            raise ValueError("mergeable ranks must be exactly 0..N-1 with N >= 256")
        self._special = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        self._enc = tiktoken.Encoding(
            "picochat", pat_str=pattern, mergeable_ranks=mergeable_ranks, special_tokens=self._special
        )
        self._ranks = mergeable_ranks
        self._pattern = pattern

    # ------------------------------------------------------------------ training

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
            # rustbpe would *panic* (PanicException derives from BaseException) below 256
            raise ValueError(
                f"vocab_size must be an int >= {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} "
                f"special tokens), got {vocab_size!r}"
            )
        seen = [0]

        def checked() -> Iterator[str]:
            for t in texts:
                if not isinstance(t, str):
                    raise TypeError(f"tokenizer training texts must be str, got {type(t).__name__}")
                seen[0] += len(t)
                yield t

        import rustbpe  # only training needs it: loading and encoding run on tiktoken alone
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(checked(), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
        if seen[0] == 0:
            raise ValueError("no training text: the iterator yielded no characters")
        return cls(dict(bpe.get_mergeable_ranks()), bpe.get_pattern())

    # ------------------------------------------------------------------ persistence

    def save(self, directory) -> None:
        directory = Path(directory)
        lines = [f"{base64.b64encode(tok).decode('ascii')} {rank}"
                 for tok, rank in sorted(self._ranks.items(), key=lambda kv: kv[1])]
        ranks_text = "\n".join(lines) + "\n"
        meta = {
            "format": FORMAT,
            "pattern": self._pattern,
            "special_tokens": dict(self._special),
            "vocab_size": self.vocab_size,
            "ranks_sha256": hashlib.sha256(ranks_text.encode("ascii")).hexdigest(),
        }
        # Each file is replaced atomically; the json (with the ranks hash) goes last, so a crash
        # in between leaves a mismatch that load() reports rather than a silently wrong tokenizer.
        with atomic_path(directory / RANKS_FILE) as tmp:
            tmp.write_bytes(ranks_text.encode("ascii"))
        write_json_atomic(directory / META_FILE, meta)

    @classmethod
    def load(cls, directory) -> "Tokenizer":
        directory = Path(directory)
        ranks_path, meta_path = directory / RANKS_FILE, directory / META_FILE
        if not (ranks_path.is_file() and meta_path.is_file()):
            raise PicochatError(f"no tokenizer at {directory}; run `picochat tokenizer train` first")

        def corrupt(path: Path, why: str) -> PicochatError:
            return PicochatError(f"corrupt tokenizer file {path}: {why}; "
                                 "re-run `picochat tokenizer train`")

        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            pattern, specials, vocab_size = meta["pattern"], meta["special_tokens"], meta["vocab_size"]
        except (ValueError, KeyError, TypeError) as e:
            raise corrupt(meta_path, f"{type(e).__name__}: {e}") from None
        raw = ranks_path.read_bytes()
        if hashlib.sha256(raw).hexdigest() != meta.get("ranks_sha256"):
            raise corrupt(ranks_path, f"contents do not match {META_FILE} (edited, or an interrupted save?)")
        ranks: dict[bytes, int] = {}
        for lineno, line in enumerate(raw.decode("ascii", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                b64, rank = line.split(" ")
                ranks[base64.b64decode(b64, validate=True)] = int(rank)
            except ValueError:  # binascii.Error (bad base64) is one too
                raise corrupt(ranks_path, f"line {lineno} is not '<base64> <rank>'") from None
        try:
            tok = cls(ranks, pattern)
        except ValueError as e:
            raise corrupt(ranks_path, str(e)) from None
        if specials != tok._special or vocab_size != tok.vocab_size:
            raise corrupt(meta_path, "special tokens / vocab_size do not match this picochat version")
        return tok

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def bos_token_id(self) -> int:
        return self._special["<|bos|>"]

    @property
    def pad_token_id(self) -> int:
        # BOS doubles as pad: padded positions are masked out anyway, and left-padding with a
        # token the model has seen at every document start is harmless.
        return self.bos_token_id

    def encode_special(self, name: str) -> int:
        try:
            return self._special[name]
        except KeyError:
            raise KeyError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}") from None

    def id_to_token_bytes(self, token_id: int) -> bytes:
        return self._enc.decode_single_token_bytes(token_id)

    # ------------------------------------------------------------------ encode / decode

    def _as_id(self, tok: int | str) -> int:
        if isinstance(tok, str):
            return self.encode_special(tok)
        if isinstance(tok, int) and 0 <= tok < self.vocab_size:
            return tok
        raise ValueError(f"not a token id or special token name: {tok!r}")

    def encode(self, text: str | list[str], prepend: int | str | None = None,
               append: int | str | None = None, num_threads: int = 8) -> list[int] | list[list[int]]:
        """Encode ordinary text. Special-token *strings* in the text are encoded as plain text, so
        user input can never forge <|assistant_end|> etc.; specials only come from prepend/append."""
        pre = [] if prepend is None else [self._as_id(prepend)]
        post = [] if append is None else [self._as_id(append)]
        if isinstance(text, str):
            return pre + self._enc.encode_ordinary(text) + post
        if isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
            return [pre + ids + post for ids in self._enc.encode_ordinary_batch(list(text), num_threads=num_threads)]
        raise TypeError(f"encode expects str or list[str], got {type(text).__name__}")

    def decode(self, ids: list[int]) -> str:
        # Partial UTF-8 sequences (e.g. half an emoji at a truncation point) decode to U+FFFD.
        try:
            return self._enc.decode(list(ids))
        except (KeyError, OverflowError) as e:
            raise ValueError(f"cannot decode token ids: {e}") from None

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"

    def same_encoding(self, other: "Tokenizer") -> bool:
        """True when both map every text to the same ids (same ranks and split pattern; the special
        tokens follow from the ranks)."""
        return self._ranks == other._ranks and self._pattern == other._pattern

    # ------------------------------------------------------------------ chat rendering

    def render_conversation(self, conversation, max_tokens: int | None = None) -> tuple[list[int], list[int]]:
        """Tokenize a conversation for SFT: returns (ids, mask), mask[i] == 1 where the model is
        trained to predict ids[i]. See the module docstring for the layout."""
        messages = _messages(conversation)
        ids: list[int] = []
        mask: list[int] = []

        def add(toks: int | list[int], m: int) -> None:
            toks = [toks] if isinstance(toks, int) else toks
            ids.extend(toks)
            mask.extend([m] * len(toks))

        sp = self.encode_special
        add(self.bos_token_id, 0)
        for msg in messages:
            content = msg["content"]
            if msg["role"] == "user":
                add([sp("<|user_start|>"), *self.encode(content), sp("<|user_end|>")], 0)
                continue
            add(sp("<|assistant_start|>"), 0)
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                kind, text = part["type"], part["text"]
                if kind == "text":
                    add(self.encode(text), 1)
                elif kind == "python":  # the model learns to emit tool calls...
                    add([sp("<|python_start|>"), *self.encode(text), sp("<|python_end|>")], 1)
                else:  # ...but not to predict the tool's output, which the engine injects
                    add([sp("<|output_start|>"), *self.encode(text), sp("<|output_end|>")], 0)
            add(sp("<|assistant_end|>"), 1)  # learning to stop is part of the answer
        if max_tokens is not None:
            if max_tokens < 0:
                raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def render_for_completion(self, conversation) -> list[int]:
        """Prompt ids for generation: drops a trailing assistant turn (if any; it is the answer to
        be generated) and ends with <|assistant_start|>."""
        messages = _messages(conversation)  # a new list: popping from it leaves the caller's intact
        if messages[-1]["role"] == "assistant":
            messages.pop()
        if not messages or messages[-1]["role"] != "user":
            raise ValueError("render_for_completion needs a conversation ending in a user turn "
                             "(optionally followed by the assistant turn to drop)")
        ids, _ = self.render_conversation(messages)
        ids.append(self.encode_special("<|assistant_start|>"))
        return ids

    def visualize(self, ids: list[int], mask: list[int], color: bool = False) -> str:
        """Debug view of a rendered conversation: supervised (mask 1) runs are wrapped in [[...]],
        or shown green (and the rest dimmed) with color=True."""
        out = []
        for m, run in itertools.groupby(zip(ids, mask), key=lambda pair: pair[1]):
            text = self.decode([i for i, _ in run])
            if color:
                out.append(f"\033[32m{text}\033[0m" if m else f"\033[2m{text}\033[0m")
            else:
                out.append(f"[[{text}]]" if m else text)
        return "".join(out)


def _messages(conversation) -> list[dict]:
    """Validate a conversation and return its messages with any system prompt folded into the
    first user message (the model has no system token). Does not mutate the input."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else conversation
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("a conversation is a non-empty list of messages (or {'messages': [...]})")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r:.80}")
    messages, offset = list(messages), 0  # offset: report indices as the caller numbered them
    if messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("a system message must be followed by a user message")
        first_user = {**messages[1], "content": _as_text(messages[0], 0) + "\n\n" + _as_text(messages[1], 1)}
        messages, offset = [first_user] + messages[2:], 1
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ValueError(f"message {i + offset} has role {m['role']!r}, expected "
                             f"{expected!r}: roles must alternate user, assistant, user, ...")
        if expected == "user":
            _as_text(m, i + offset)
        elif not isinstance(m["content"], str):
            if not isinstance(m["content"], list):
                raise ValueError(f"assistant message {i + offset} content must be a str or list of parts")
            for part in m["content"]:
                if (not isinstance(part, dict) or part.get("type") not in ("text", "python", "python_output")
                        or not isinstance(part.get("text"), str)):
                    raise ValueError(f"assistant message {i + offset} has a bad part {part!r:.80}; expected "
                                     "{'type': 'text'|'python'|'python_output', 'text': str}")
    return messages


def _as_text(m: dict, i: int) -> str:
    if not isinstance(m["content"], str):
        raise ValueError(f"{m['role']} message {i} content must be a str")
    return m["content"]
