"""Inference engine: batched prefill, then decode token by token over one KV cache (ModelRunner).

`ModelRunner` is the one decode loop of picochat: Engine.generate / generate_stream drive it for a
batch that arrives together, the server's scheduler (scheduler.py) for requests that join and
leave a running batch. It holds each row's state as device tensors (its last token, how many it
sampled, its budget, stop tokens, pre-drawn uniforms) and has one place that samples and checks
stop tokens, stop sequences and budgets (`step`) and one that drops rows (`keep`). Prompts of
different lengths are left-padded with BOS; the cache's `pad` gives each row its own rotary
positions and a mask over its padding, so every row computes what it would alone
(tests/test_engine.py checks this token for token). Each row samples with its own uniforms, drawn
up front from its own seed (sampling.py), so its tokens never depend on the rest of the batch.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from picochat.inference.decode_step import DecodeStep, resolve_mode
from picochat.inference.sampling import Sampling, SamplingParams, _as_list, check_request, sample_next
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
            max_chunks: int = 4, max_tokens: int | None = None) -> tuple[torch.Tensor, KVCache]:
    """Feed every context through the model: (logits (B, V) at each context's last token, a KVCache
    of B rows left-padded to the longest context, room for max_len positions). Mixed lengths are
    prefilled in length-sorted chunks copied into one cache (`KVCache.place` right-aligns them), so
    a batch costs about the tokens it holds, not B x the longest (measured in docs/inference.md).
    max_tokens: at most this many (padded) tokens per forward, at least one row: a forward's
    activations (attention scores are rows x heads x T x T) stay bounded whatever joins at once."""
    device = device if device is not None else next(model.parameters()).device

    def run(rows: list[int], room: int) -> tuple[torch.Tensor, KVCache]:
        L = max(len(contexts[i]) for i in rows)
        pad = [L - len(contexts[i]) for i in rows]
        ids = torch.tensor([[pad_id] * n + list(contexts[i]) for n, i in zip(pad, rows)], dtype=torch.long,
                           device=device)
        cache = KVCache(len(rows), max(room, L), device=device, pad=pad)
        return model.logits(model.hidden(ids, kv_cache=cache)[:, -1]), cache

    chunks = length_chunks([len(c) for c in contexts], max_chunks)
    if max_tokens is not None:  # rows are longest first within a chunk: its first row sets the padded length
        chunks = [rows[i:i + max(1, max_tokens // len(contexts[rows[0]]))] for rows in chunks
                  for i in range(0, len(rows), max(1, max_tokens // len(contexts[rows[0]])))]
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


def _cat(a: torch.Tensor, b: torch.Tensor, fill) -> torch.Tensor:
    """Rows of a, then rows of b; (B, W) tensors of different widths are right-filled with `fill`."""
    if a.dim() == 2 and a.size(1) != b.size(1):
        W = max(a.size(1), b.size(1))
        a, b = (torch.nn.functional.pad(x, (0, W - x.size(1)), value=fill) for x in (a, b))
    return torch.cat([a, b])


# each row's state: (fill value when rows of different widths are concatenated)
ROW_STATE = dict(last=0, count=0, budget=0, done=False, stops=-1, uniforms=0.0, hist=-1)


class ModelRunner:
    """Rows decoding together over one KV cache: `add` prefills newcomers (and samples their first
    token), `step` decodes one token for every row, `keep` drops rows. `rows` holds whatever the
    caller identifies a row by (Engine: its prompt's index; scheduler: its Request), in cache order.
    Rows stay in the batch after they finish (`done`) until the caller drops them: the engine when a
    quarter has finished (never with a static-shape decode step), the scheduler at once."""

    def __init__(self, model, decode: DecodeStep, pad_id: int = 0, prefill_chunks: int = 4,
                 stop_sequences: Sequence[Sequence[int]] = (), prefill_tokens: int | None = None):
        """prefill_tokens: most tokens per prefill forward (prefill's max_tokens; None: no limit)."""
        self.model, self.decode, self.pad_id, self.prefill_chunks = model, decode, pad_id, prefill_chunks
        self.prefill_tokens = prefill_tokens
        self.device = next(model.parameters()).device
        self.seqs = [torch.tensor(list(s), dtype=torch.long, device=self.device) for s in stop_sequences]
        if any(s.numel() == 0 for s in self.seqs):
            raise ValueError("stop sequences must not be empty")
        self.reset()

    def reset(self) -> None:
        self.rows: list = []
        self.knobs: list[tuple] = []   # (temperature, top_k, top_p) per row
        self.cache: KVCache | None = None
        self.params: SamplingParams | None = None
        self.state: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def done(self) -> torch.Tensor:
        return self.state["done"]

    def add(self, rows: list, contexts: list[list[int]], budgets: list[int], knobs: list[tuple],
            uniforms: torch.Tensor, stops: list, *, counts: list[int] | None = None,
            given: list[int | None] | None = None, max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill `contexts` together and sample each one's next token; the newcomers join the batch.
        Returns their (tokens, live) as step() does. uniforms (B, W): each row's pre-drawn uniforms;
        counts: tokens each row had sampled before (the index of its next uniform); given: a row
        whose next token is already known (back from speculation) keeps it instead of the sample.
        max_len: the first batch's cache length (else the merged cache gets just enough room)."""
        B, dev = len(rows), self.device
        logits, cache = prefill(self.model, contexts, max_len or max(len(c) for c in contexts), self.pad_id, dev,
                                self.prefill_chunks, self.prefill_tokens)
        budget = torch.tensor(budgets, dtype=torch.long, device=dev)
        K = max((s.numel() for s in self.seqs), default=0)
        new = dict(last=torch.zeros(B, dtype=torch.long, device=dev),
                   count=torch.tensor(counts or [0] * B, dtype=torch.long, device=dev), budget=budget,
                   done=budget == 0, stops=pad_sequence([torch.tensor(sorted(int(t) for t in s), dtype=torch.long)
                                                         for s in stops], batch_first=True, padding_value=-1).to(dev),
                   uniforms=uniforms, hist=torch.full((B, K), -1, dtype=torch.long, device=dev))
        need = budget - new["count"]  # positions each newcomer may still feed (room for the merge below)
        tok, live = self.step(logits, new, self._params(knobs))
        if given is not None and any(g is not None for g in given):
            known = torch.tensor([g is not None for g in given], device=dev)
            new["last"] = tok = torch.where(known, torch.tensor([g or 0 for g in given], device=dev), tok)
            new["done"] &= ~known  # its stop check was the scheduler's, when the token came out
        if self.cache is None and max_len is not None:  # a first batch: its prefill cache has the room
            self.cache, self.state = cache, new
        else:  # join the running batch, with just enough room for the longest remaining budget
            left = torch.cat([self.state["budget"] - self.state["count"], need]) if self.rows else need
            if not self.rows:
                self.cache = KVCache(0, 0, device=dev)
            self.cache.merge(cache, max(self.cache.pos, cache.pos) + int(left.max()))
            self.state = {k: _cat(self.state[k], v, ROW_STATE[k]) if self.rows else v for k, v in new.items()}
        self.rows, self.knobs = self.rows + list(rows), self.knobs + list(knobs)
        self.params = self._params(self.knobs)
        return tok, live

    def keep(self, keep: torch.Tensor | list[int]) -> None:
        """Only rows `keep` (indices into rows) stay in the batch and the cache: one copy of the cache,
        so that finished rows stop costing compute and memory."""
        if len(keep) == len(self.rows):
            return
        if len(keep) == 0:
            return self.reset()
        idx = torch.as_tensor(keep, dtype=torch.long, device=self.device)
        self.cache.select_rows(idx)
        self.state = {k: v[idx] for k, v in self.state.items()}
        keep = idx.tolist()
        self.rows, self.knobs = [self.rows[i] for i in keep], [self.knobs[i] for i in keep]
        self.params = self._params(self.knobs)

    def _params(self, knobs: list[tuple]) -> SamplingParams:
        return SamplingParams.make(len(knobs), *zip(*knobs), self.device, self.model.config.vocab_size)

    def step(self, logits: torch.Tensor | None = None, s: dict | None = None,
             params: SamplingParams | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed every row its last token and sample the next (or sample newcomers from their prefill
        `logits`, state `s`): (tokens (B,), live (B,): whether the row was still generating before
        this token), device tensors in row order. The one place that samples, each row from its own
        uniform, and that checks whether a row finished: a stop token, a stop sequence (both kept in
        its output) or its budget. Rows already done sample on, unused."""
        if logits is None:
            s, params = self.state, self.params
            logits = self.decode(s["last"][:, None], self.cache)
        u = None if params.all_greedy else s["uniforms"].gather(
            1, s["count"].clamp(max=s["uniforms"].size(1) - 1)[:, None])[:, 0]
        tok = sample_next(logits, params=params, uniforms=u)
        live = ~s["done"]
        s["count"] += 1
        hit = (tok[:, None] == s["stops"]).any(1) | (s["count"] >= s["budget"])
        if self.seqs:
            s["hist"] = torch.cat([s["hist"][:, 1:], tok[:, None]], 1)  # the last K tokens of each row
            for q in self.seqs:
                hit |= (s["hist"][:, -q.numel():] == q).all(1)
        s["done"], s["last"] = s["done"] | hit, tok
        return tok, live


class Engine:
    def __init__(self, model, tokenizer=None, device: torch.device | str | None = None,
                 cpu_tuning: bool = True, decode_step: str = "auto"):
        """cpu_tuning: cpu.py's prepare_cpu_inference on `model` (in place; False undoes it; done by
        the DecodeStep). decode_step: eager | compiled | cuda-graphs | auto (decode_step.py)."""
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.decode = DecodeStep(model, resolve_mode(decode_step, self.device), cpu_tuning=cpu_tuning)
        self.last_stats: dict = {}  # what the last generation did (cache size, timings)
        self.prefill_chunks = 4     # mixed-length prompts: prefill in up to this many length-sorted chunks

    def default_stop_tokens(self) -> set[int]:
        return default_stop_tokens(self.tokenizer)

    def kv_bytes_per_token(self) -> int:  # per row, all layers
        return self.model.kv_bytes_per_token()

    def _run(self, prompts, max_new_tokens, sampling: Sampling, stop_tokens, stop_sequences):
        """Yield (runner, tokens, live) per decode step (runner.rows: each row's prompt index)."""
        V = self.model.config.vocab_size
        # the last sampled token is never fed back, so prompt + budget may reach one past the table
        budgets = check_request(prompts, max_new_tokens, V, self.model.cos.size(0), fed=1)
        B, L, steps = len(prompts), max(len(p) for p in prompts), int(max(budgets))
        sampling.params(B, self.device, V)  # validates the per-row lists before anything runs
        runner = ModelRunner(self.model, self.decode, self.tokenizer.pad_token_id if self.tokenizer else 0,
                             self.prefill_chunks, stop_sequences or ())
        if steps == 0:
            return
        max_len = L + steps - 1
        if self.decode.static:  # a compiled step: few distinct cache lengths, so few graphs to record
            max_len = min(-(-max_len // STATIC_LEN_BUCKET) * STATIC_LEN_BUCKET, self.model.cos.size(0))
        stops = self.default_stop_tokens() if stop_tokens is None else stop_tokens
        uniforms = sampling.uniforms(B, steps, self.device)
        knobs = list(zip(*(_as_list(x, B, n) for x, n in ((sampling.temperature, "temperature"),
                                                           (sampling.top_k, "top_k"), (sampling.top_p, "top_p")))))
        stats = self.last_stats = dict(batch_size=B, padded_prompt_len=L, max_len=max_len,
                                       kv_cache_bytes=B * max_len * self.kv_bytes_per_token(),
                                       kv_bytes_per_token=self.kv_bytes_per_token(), decode_steps=0, compactions=0)
        t0 = time.perf_counter()
        tok, live = runner.add(list(range(B)), prompts, budgets, knobs,
                               torch.zeros(B, 1, device=self.device) if uniforms is None else uniforms,
                               [stops] * B, max_len=max_len)
        t1 = time.perf_counter()
        stats["prefill_s"] = t1 - t0
        while True:
            stats["decode_s"] = time.perf_counter() - t1
            yield runner, tok, live
            n_done = int(runner.done.sum())  # the one per-step sync: early exit and compaction need it
            if n_done == len(runner):
                break
            if n_done * 4 >= len(runner) and not self.decode.static:
                # enough finished rows to repay one copy of the cache (a static step keeps its shape)
                runner.keep((~runner.done).nonzero().view(-1))
                stats["compactions"] += 1
            tok, live = runner.step()
            stats["decode_steps"] += 1

    @torch.inference_mode()
    def generate_stream(self, prompts: list[list[int]], max_new_tokens: int | list[int], sampling: Sampling | None = None,
                        *, stop_tokens: set[int] | None = None, stop_sequences: list[list[int]] | None = None,
                        **knobs) -> Iterator[list[int | None]]:
        """Yield, per decode step, one new token per prompt (None for rows that already finished).

        sampling: a Sampling (its fields may be per-row lists), or temperature=/top_k=/top_p=/seed=
        keywords (Sampling.of); max_new_tokens may be a per-row list. stop_tokens None means the
        tokenizer's <|assistant_end|> and <|bos|>; pass an empty set to disable."""
        for runner, tok, live in self._run(prompts, max_new_tokens, Sampling.of(sampling, **knobs),
                                           stop_tokens, stop_sequences):
            step: list[int | None] = [None] * len(prompts)
            for r, x, alive in zip(runner.rows, tok.tolist(), live.tolist()):
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
        t, index = 0, None
        for runner, tok, live in self._run(prompts, max_new_tokens, Sampling.of(sampling, **knobs),
                                           stop_tokens, stop_sequences):
            if index is None or len(index) != len(runner):  # each row's prompt index, again after a compaction
                index = torch.tensor(runner.rows, dtype=torch.long, device=self.device)
            out[index, t] = torch.where(live, tok, -1)
            t += 1
        # a finished row's later slots stay -1, so its output is the prefix before the first -1
        return [[x for x in row if x >= 0] for row in out[:, :t].tolist()]
