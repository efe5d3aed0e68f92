"""The scheduler's model runner: every forward pass of the server happens here, on the scheduler thread.

It holds the running batch (requests in the KV cache's row order), its shared KV cache and its
sampling parameters, and `add`s newcomers (prefilled together, left-padded, then `KVCache.merge`d
into the running cache with just enough room for the longest remaining budget), `decode`s one
token for every row, `keep`s only some rows (`KVCache.select_rows`), or `speculate`s a row with
the draft (speculative.generate_speculative_batch, its own caches; one GammaController keeps
adaptive γ's measurements across chunks). Each row samples with its own parameters and pre-drawn
uniforms (Request.uniforms), so its tokens never depend on what else shares the batch.
"""
from __future__ import annotations

import torch

from picochat.inference.cpu import prepare_cpu_inference
from picochat.inference.decode_step import DecodeStep, resolve_mode
from picochat.inference.engine import prefill
from picochat.inference.sampling import Sampling, SamplingParams, sample_next
from picochat.inference.speculative import GammaController, generate_speculative_batch
from picochat.model.kv_cache import KVCache


class ModelRunner:
    def __init__(self, model, draft=None, *, pad_id: int = 0, decode_step: str = "eager", spec_chunk: int = 16):
        self.model, self.draft, self.pad_id, self.spec_chunk = model, draft, pad_id, spec_chunk
        self.device = next(model.parameters()).device
        self.decode_step = DecodeStep(model, resolve_mode(decode_step, self.device))
        if self.device.type == "cpu":  # oneDNN where it pays (not inside a compiled step), allocator (cpu.py)
            for m in (model, draft):
                if m is not None:
                    prepare_cpu_inference(m, enable=not (m is model and self.decode_step.static))
        self.gamma_ctrl = GammaController() if draft is not None else None
        self.max_positions = min(int(m.cos.size(0)) for m in (model, draft) if m is not None)
        self.rows: list = []            # Requests, in the cache's row order
        self.cache: KVCache | None = None
        self.params: SamplingParams | None = None

    def reset(self) -> None:
        self.rows, self.cache, self.params = [], None, None

    def kv_bytes_with(self, rows) -> int:
        """KV cache bytes at the peak of `add(rows)`: the merged cache (every row at the longest
        length any row can reach) plus the newcomers' prefill cache, alive while they merge."""
        everyone = self.rows + list(rows)
        if not everyone:
            return 0
        ctx = max((len(r.prompt) + len(r.tokens) for r in rows), default=0)
        end = max(self.cache.pos if self.rows else 0, ctx) + max(r.remaining for r in everyone)
        return (len(everyone) * end + len(rows) * ctx) * self.model.kv_bytes_per_token()

    def _params(self, rows) -> SamplingParams:
        return Sampling.rows([r.sampling for r in rows]).params(len(rows), self.device, self.model.config.vocab_size)

    def _sample(self, logits: torch.Tensor, rows, params: SamplingParams) -> list[int]:
        """Each row's next token, with the uniform pre-drawn for it (index = tokens so far)."""
        u = None
        if not params.all_greedy:
            zero = torch.zeros((), device=self.device)
            u = torch.stack([r.uniforms[min(len(r.tokens), r.max_tokens - 1)] if r.uniforms is not None else zero
                             for r in rows])
        return sample_next(logits, params=params, uniforms=u).tolist()

    def add(self, rows) -> list[int]:
        """Prefill the newcomers together, merge them into the batch; returns each one's sampled next
        token. A row coming back from speculation holds its next token already: it is fed all but
        that one (and the token sampled here is not used)."""
        contexts = [r.prompt + r.tokens[:-1] for r in rows]
        logits, cache = prefill(self.model, contexts, max(len(c) for c in contexts), self.pad_id, self.device)
        first = self._sample(logits, rows, self._params(rows))
        if self.cache is None or not self.rows:
            self.cache, self.rows = KVCache(0, 0, device=self.device), []
        everyone = self.rows + list(rows)
        self.cache.merge(cache, max(self.cache.pos, cache.pos) + max(r.remaining for r in everyone))
        self.rows, self.params = everyone, self._params(everyone)
        return first

    def decode(self) -> list[int]:
        """One decode step over every row: feed each row's newest token, sample the next."""
        x = torch.tensor([[r.tokens[-1]] for r in self.rows], dtype=torch.long, device=self.device)
        return self._sample(self.decode_step(x, self.cache), self.rows, self.params)

    def keep(self, keep: list[int]) -> None:
        """Only rows `keep` (indices into self.rows) stay in the batch and the cache."""
        if len(keep) == len(self.rows):
            return
        if not keep:
            return self.reset()
        self.rows = [self.rows[i] for i in keep]
        self.cache.select_rows(keep)
        self.params = self._params(self.rows)

    def speculate(self, rows) -> list[list[int]]:
        """Up to spec_chunk new tokens per row (fewer where a row's budget ends), by speculative
        decoding, with its own caches (the scheduler has dropped the shared batch). One seed drives
        the chunk's generator: the first row's, moved on by the tokens it has so far."""
        first = rows[0]
        seed = None if first.sampling.seed is None else int(first.sampling.seed) + len(first.tokens)
        out, _ = generate_speculative_batch(
            self.model, self.draft, [r.prompt + r.tokens for r in rows], min(self.spec_chunk, *(r.remaining for r in rows)),
            Sampling.rows([r.sampling for r in rows], seed=seed), stop_tokens=set().union(*(r.stop_tokens for r in rows)),
            pad_id=self.pad_id, controller=self.gamma_ctrl)
        return out
