"""Inference engine: batched prefill once, then decode token by token with one KV cache.

Prompts of different lengths are left-padded with BOS; the cache's `pad` gives each row its own
rotary positions and a mask over its padding, so every row computes what it would alone
(tests/test_engine.py checks this token for token). Per generation the engine pre-draws each
row's uniforms from its own seed (sampling.py), allocates the KV cache once for the longest
sequence it can reach, and syncs with the host once per step (how many rows are done): that
drives early exit and compaction, `cache.select_rows` dropping finished rows (not with a compiled
decode step, where a new batch size is a new compile). A row finishes on a stop token or a stop
sequence of token ids (both included in its output), or at its max_new_tokens.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch

from picochat.inference.cpu import prepare_cpu_inference
from picochat.inference.decode_step import DecodeStep, resolve_mode
from picochat.inference.sampling import Sampling, check_request, sample_next
from picochat.model.kv_cache import KVCache

STATIC_LEN_BUCKET = 64  # a compiled decode step's cache length is rounded up to a multiple of this


def length_chunks(lengths: Sequence[int], max_chunks: int = 4, min_rows: int = 4, max_waste: float = 0.25) -> list[list[int]]:
    """Split a batch for prefill: row indices sorted by length (longest first) in up to `max_chunks`
    equal groups of at least `min_rows`, or one group when padding to the longest would waste at
    most `max_waste` of the tokens. Each group is then padded only to its own longest prompt."""
    B = len(lengths)
    order = sorted(range(B), key=lambda i: -lengths[i])
    n = min(max_chunks, B // min_rows)
    if n <= 1 or B * max(lengths) <= (1 + max_waste) * sum(lengths):
        return [order]
    bounds = [round(k * B / n) for k in range(n + 1)]
    return [order[a:b] for a, b in zip(bounds, bounds[1:])]


def prefill(model, contexts: list[list[int]], max_len: int, pad_id: int = 0, device=None,
            max_chunks: int = 4) -> tuple[torch.Tensor, KVCache]:
    """Feed every context through the model: (logits (B, V) at each context's last token, a KVCache
    of B rows left-padded to the longest context, room for max_len positions). Mixed lengths are
    prefilled in length-sorted chunks copied into one cache (`KVCache.place` right-aligns them), so
    a batch costs about the tokens it holds, not B x the longest (measured in docs/inference.md)."""
    device = device if device is not None else next(model.parameters()).device

    def run(rows: list[int], room: int) -> tuple[torch.Tensor, KVCache]:
        L = max(len(contexts[i]) for i in rows)
        pad = [L - len(contexts[i]) for i in rows]
        ids = torch.tensor([[pad_id] * n + list(contexts[i]) for n, i in zip(pad, rows)], dtype=torch.long,
                           device=device)
        cache = KVCache(len(rows), max(room, L), device=device, pad=pad)
        return model.logits(model.hidden(ids, kv_cache=cache)[:, -1]), cache

    chunks = length_chunks([len(c) for c in contexts], max_chunks)
    if len(chunks) == 1:
        return run(list(range(len(contexts))), max_len)
    L = max(len(c) for c in contexts)
    cache = KVCache(len(contexts), max_len, device=device, pad=[L - len(c) for c in contexts])
    cache.advance(L)  # every row's context ends at L; place() right-aligns each chunk there
    logits = None
    for rows in chunks:
        lg, part = run(rows, 0)
        cache.place(rows, part)
        if logits is None:
            logits = lg.new_empty(len(contexts), lg.size(-1))
        logits[rows] = lg
    return logits, cache


def default_stop_tokens(tokenizer) -> set[int]:
    """<|assistant_end|> and <|bos|> when the tokenizer has them (a chat turn or a document ended)."""
    stops = set()
    for name in ("<|assistant_end|>", "<|bos|>"):
        try:
            stops.add(int(tokenizer.encode_special(name)))
        except (AttributeError, KeyError, ValueError):
            pass
    return stops


class Engine:
    def __init__(self, model, tokenizer=None, device: torch.device | str | None = None,
                 cpu_tuning: bool = True, decode_step: str = "auto"):
        """cpu_tuning: cpu.py's prepare_cpu_inference on `model` (in place; False undoes it).
        decode_step: eager | compiled | cuda-graphs | auto (decode_step.py)."""
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.decode = DecodeStep(model, resolve_mode(decode_step, self.device))
        if self.device.type == "cpu":
            # oneDNN's prepacked path runs outside torch.compile only: a compiled step keeps F.linear
            prepare_cpu_inference(model, enable=cpu_tuning and not self.decode.static)
        self.last_stats: dict = {}  # what the last generation did (cache size, timings)
        self.prefill_chunks = 4     # mixed-length prompts: prefill in up to this many length-sorted chunks

    def default_stop_tokens(self) -> set[int]:
        return default_stop_tokens(self.tokenizer)

    def kv_bytes_per_token(self) -> int:  # per row, all layers
        return self.model.kv_bytes_per_token()

    def _steps(self, prompts, max_new_tokens, sampling: Sampling, stop_tokens, stop_sequences):
        """Yield (row_ids, rows, tokens, live) per decode step: the original index of every row still
        in the batch (a list, and the same as a device tensor), its new token and whether the row
        was still live before this token (device tensors)."""
        V = self.model.config.vocab_size
        # the last sampled token is never fed back, so prompt + budget may reach one past the table
        budgets = check_request(prompts, max_new_tokens, V, self.model.cos.size(0), fed=1)
        B, L, steps = len(prompts), max(len(p) for p in prompts), int(max(budgets))
        max_len = L + max(steps - 1, 0)
        params = sampling.params(B, self.device, V)
        if stop_tokens is None:
            stop_tokens = self.default_stop_tokens()
        seqs = [torch.tensor(list(s), dtype=torch.long, device=self.device) for s in (stop_sequences or [])]
        if any(s.numel() == 0 for s in seqs):
            raise ValueError("stop sequences must not be empty")
        if steps == 0:
            return
        if self.decode.static:  # a compiled step: few distinct cache lengths, so few graphs to record
            max_len = min(-(-max_len // STATIC_LEN_BUCKET) * STATIC_LEN_BUCKET, self.model.cos.size(0))
        dev = self.device
        uniforms = sampling.uniforms(B, steps, dev)
        stop = torch.tensor(sorted(int(t) for t in stop_tokens), dtype=torch.long, device=dev)
        per_row_budget = len(set(budgets)) > 1
        budget = torch.tensor(budgets, dtype=torch.long, device=dev)
        hist = torch.zeros(B, steps, dtype=torch.long, device=dev) if seqs else None
        row_ids, rows = list(range(B)), torch.arange(B, device=dev)
        done = budget == 0
        stats = self.last_stats = dict(batch_size=B, padded_prompt_len=L, max_len=max_len,
                                       kv_cache_bytes=B * max_len * self.kv_bytes_per_token(),
                                       kv_bytes_per_token=self.kv_bytes_per_token(), decode_steps=0, compactions=0)
        t0 = time.perf_counter()
        pad_id = self.tokenizer.pad_token_id if self.tokenizer is not None else 0
        logits, cache = prefill(self.model, prompts, max_len, pad_id, dev, self.prefill_chunks)
        t1 = time.perf_counter()
        stats["prefill_s"] = t1 - t0
        for t in range(steps):
            tok = sample_next(logits, params=params, uniforms=None if uniforms is None else uniforms[:, t])
            stats["decode_s"] = time.perf_counter() - t1
            yield row_ids, rows, tok, ~done
            hit = torch.isin(tok, stop) if stop.numel() else torch.zeros_like(done)
            if per_row_budget:
                hit |= budget <= t + 1
            if hist is not None:
                hist[:, t] = tok
                for s in seqs:
                    if t + 1 >= s.numel():
                        hit |= (hist[:, t + 1 - s.numel():t + 1] == s).all(dim=1)
            done |= hit
            n_done = int(done.sum())  # the one per-step sync: early exit and compaction need it
            if n_done == len(row_ids) or t == steps - 1:
                break
            if n_done and n_done * 4 >= len(row_ids) and not self.decode.static:
                # enough finished rows to repay one copy of the cache: drop them from the batch
                keep = (~done).nonzero().view(-1)
                cache.select_rows(keep)
                row_ids, rows = [row_ids[i] for i in keep.tolist()], rows[keep]
                tok, done, budget, params = tok[keep], done[keep], budget[keep], params.select(keep)
                uniforms = None if uniforms is None else uniforms[keep]
                hist = None if hist is None else hist[keep]
                stats["compactions"] += 1
            logits = self.decode(tok[:, None], cache)
            stats["decode_steps"] += 1

    @torch.inference_mode()
    def generate_stream(self, prompts: list[list[int]], max_new_tokens: int | list[int], sampling: Sampling | None = None,
                        *, stop_tokens: set[int] | None = None, stop_sequences: list[list[int]] | None = None,
                        **knobs) -> Iterator[list[int | None]]:
        """Yield, per decode step, one new token per prompt (None for rows that already finished).

        sampling: a Sampling (its fields may be per-row lists), or temperature=/top_k=/top_p=/seed=
        keywords (Sampling.of); max_new_tokens may be a per-row list. stop_tokens None means the
        tokenizer's <|assistant_end|> and <|bos|>; pass an empty set to disable."""
        B = len(prompts)
        for row_ids, _, tok, live in self._steps(prompts, max_new_tokens, Sampling.of(sampling, **knobs),
                                                 stop_tokens, stop_sequences):
            step: list[int | None] = [None] * B
            for r, x, alive in zip(row_ids, tok.tolist(), live.tolist()):
                if alive:
                    step[r] = x
            yield step

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_new_tokens: int | list[int], sampling: Sampling | None = None,
                 *, stop_tokens: set[int] | None = None, stop_sequences: list[list[int]] | None = None,
                 **knobs) -> list[list[int]]:
        """Generated tokens per prompt (same arguments as generate_stream). Tokens stay on the
        device until the end: one transfer per generation, not one per step."""
        steps = int(max(max_new_tokens, default=0)) if isinstance(max_new_tokens, Sequence) else int(max_new_tokens)
        out = torch.full((len(prompts), max(steps, 0)), -1, dtype=torch.long, device=self.device)
        t = 0
        for _, rows, tok, live in self._steps(prompts, max_new_tokens, Sampling.of(sampling, **knobs),
                                              stop_tokens, stop_sequences):
            out[rows, t] = torch.where(live, tok, -1)
            t += 1
        # a finished row's later slots stay -1, so its output is the prefix before the first -1
        return [[x for x in row if x >= 0] for row in out[:, :t].tolist()]
