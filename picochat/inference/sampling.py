"""How tokens are sampled: `Sampling(temperature, top_k, top_p, seed)`, what every generation path
takes (validated once, when it is made), `check_request` (the prompt and budget checks those paths
share) and the one sampling function (temperature, top-k, top-p, per row of a batch).

`probs_from_logits` gives the distribution actually sampled from; speculative decoding uses it for
both the draft and the target, so "same distribution as the target" means the same transform.
Every parameter may be a scalar or a per-row list; `SamplingParams` turns them into (B,) tensors
once per generation. Drawing is inverse-CDF with one uniform per row, and the engine pre-draws each
row's uniforms from the row's own seeded generator, so a row's samples depend only on its seed and
its logits, never on what else shares the batch.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch


def _as_list(value, B: int | None, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if B is not None and len(value) != B:
            raise ValueError(f"{name} has {len(value)} values for a batch of {B} rows")
        return list(value)
    return [value] * (1 if B is None else B)


def validate_sampling(temperature, top_k=None, top_p=None, batch_size: int | None = None) -> None:
    """Raise ValueError for any invalid value; each argument may be a scalar or a per-row list."""
    for t in _as_list(temperature, batch_size, "temperature"):
        if t is None or isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
    for k in _as_list(top_k, batch_size, "top_k"):
        if k is not None and (isinstance(k, bool) or not isinstance(k, numbers.Real) or not math.isfinite(k)
                              or int(k) != k or k < 0):
            raise ValueError(f"top_k must be an integer >= 0 (0 = disabled), got {k!r}")
    for p in _as_list(top_p, batch_size, "top_p"):
        if p is not None and (isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")


@dataclass(frozen=True)
class Sampling:
    """How one request samples: temperature (0 = greedy), top_k (None/0 = off), top_p (None/1 = off)
    and seed (None = torch's global RNG). Where a batch is generated together (Engine, speculative
    decoding) each field may also be a per-row list; an int seed gives row i the seed + i."""
    temperature: float | Sequence[float] = 1.0
    top_k: int | None | Sequence[int | None] = None
    top_p: float | None | Sequence[float | None] = None
    seed: int | None | Sequence[int] = None

    def __post_init__(self):
        validate_sampling(self.temperature, self.top_k, self.top_p)

    @classmethod
    def of(cls, sampling: "Sampling | None" = None, **knobs) -> "Sampling":
        """`sampling`, or one made of temperature=/top_k=/top_p=/seed= keywords (the entry points
        Engine.generate, generate_speculative and Scheduler.submit accept those as a shorthand)."""
        if sampling is None:
            return cls(**knobs)
        if knobs:
            raise TypeError(f"pass a Sampling or the keywords {sorted(knobs)}, not both")
        return sampling

    def params(self, batch_size: int, device, vocab_size: int) -> "SamplingParams":
        return SamplingParams.make(batch_size, self.temperature, self.top_k, self.top_p, device, vocab_size)

    def uniforms(self, batch_size: int, steps: int, device) -> torch.Tensor | None:
        """Each row's pre-drawn uniforms (draw_uniforms), None when every row is greedy."""
        greedy = all(float(t) == 0 for t in _as_list(self.temperature, None, "temperature"))
        return None if greedy else draw_uniforms(batch_size, steps, self.seed, device)

    def reseeded(self, offset: int) -> "Sampling":
        """seed + offset (an int seed): a later tool-call segment must not replay the same random
        stream. Without a seed there is nothing to move."""
        return self if self.seed is None else replace(self, seed=int(self.seed) + offset)

    @classmethod
    def rows(cls, each: "Sequence[Sampling]", seed: int | None = None) -> "Sampling":
        """One per-row Sampling from single-row ones (the scheduler's batch of requests), with `seed`."""
        return cls([s.temperature for s in each], [s.top_k for s in each], [s.top_p for s in each], seed)


def check_request(prompts: Sequence[Sequence[int]], max_new_tokens, vocab_size: int, positions: int, *,
                  fed: int = 0, growth: int = 1) -> list[int]:
    """The prompt and budget checks every generation path shares; returns the budget per prompt.
    max_new_tokens: an integer >= 0 or one per prompt. The longest prompt plus growth x the largest
    budget, less `fed` (tokens sampled last and never fed back), must fit the model's `positions`."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    budgets = list(max_new_tokens) if isinstance(max_new_tokens, Sequence) else [max_new_tokens] * len(prompts)
    if len(budgets) != len(prompts) or any(isinstance(n, bool) or int(n) != n or n < 0 for n in budgets):
        raise ValueError(f"max_new_tokens must be an integer >= 0 or one per prompt, got {max_new_tokens!r}")
    if any(not 0 <= int(t) < vocab_size for p in prompts for t in p):
        raise ValueError(f"prompt tokens must be ids in [0, {vocab_size})")
    L, steps = max(len(p) for p in prompts), int(max(budgets))
    if max(L, L + growth * steps - fed) > positions:
        raise ValueError(f"prompt ({L}) + max_new_tokens ({steps}) exceeds the model's {positions} positions")
    return budgets


@dataclass
class SamplingParams:
    """Validated per-row sampling parameters as (B,) tensors, plus batch-level shortcuts."""
    temperature: torch.Tensor   # float32; 0 = greedy
    top_k: torch.Tensor         # long; 0 = off
    top_p: torch.Tensor         # float32; 1 = off
    all_greedy: bool            # argmax suffices: no softmax, no sort, no uniforms
    any_greedy: bool
    filtered: bool              # some row has an active top-k or top-p (needs the sort)

    @classmethod
    def make(cls, batch_size: int, temperature=1.0, top_k=None, top_p=None, device="cpu",
             vocab_size: int | None = None) -> "SamplingParams":
        validate_sampling(temperature, top_k, top_p, batch_size)
        t = [float(x) for x in _as_list(temperature, batch_size, "temperature")]
        k = [0 if x is None else int(x) for x in _as_list(top_k, batch_size, "top_k")]
        p = [1.0 if x is None else float(x) for x in _as_list(top_p, batch_size, "top_p")]
        if vocab_size is not None:  # top_k >= V keeps everything: same as off, skip the sort
            k = [0 if x >= vocab_size else x for x in k]
        greedy = [x == 0 for x in t]
        # a greedy row ignores its filters; only sampled rows with a real filter need the sort
        filtered = any(not g and (kk > 0 or pp < 1) for g, kk, pp in zip(greedy, k, p))
        return cls(torch.tensor(t, dtype=torch.float32, device=device), torch.tensor(k, dtype=torch.long, device=device),
                   torch.tensor(p, dtype=torch.float32, device=device), all(greedy), any(greedy), filtered)

    def select(self, rows: torch.Tensor) -> "SamplingParams":
        """The parameters of `rows` only (the batch shrinks as rows finish). Flags stay conservative."""
        return SamplingParams(self.temperature[rows], self.top_k[rows], self.top_p[rows],
                              self.all_greedy, self.any_greedy, self.filtered)


def probs_from_logits(logits: torch.Tensor, temperature=1.0, top_k=None, top_p=None, *,
                      params: SamplingParams | None = None) -> torch.Tensor:
    """logits (B, V) -> probabilities (B, V) after temperature, top-k and top-p.

    temperature/top_k/top_p may be scalars or per-row lists (top_k 0/None and top_p 1/None disable
    those filters), or pass a prepared `params`. top-k keeps exactly k tokens (ties broken towards
    the lower id, like argmax); top-p then keeps the smallest prefix of the sorted distribution
    whose mass reaches p. Greedy rows get a one-hot on the argmax."""
    logits = logits.float()
    B, V = logits.shape
    if params is None:
        params = SamplingParams.make(B, temperature, top_k, top_p, logits.device, V)
    t = params.temperature
    scaled = logits / torch.where(t > 0, t, torch.ones_like(t))[:, None]
    if params.filtered:
        # stable: among equal logits the lower id ranks first, so top_k=1 picks what argmax picks
        sorted_logits, order = scaled.sort(dim=-1, descending=True, stable=True)
        k = params.top_k[:, None]
        remove = (k > 0) & (torch.arange(V, device=logits.device)[None, :] >= k)
        sorted_probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
        # nucleus: a token stays while the mass strictly before it is still < p, so the kept
        # prefix is the smallest whose mass reaches p, and the top token is always kept
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        remove |= mass_before >= params.top_p[:, None]
        scaled = torch.empty_like(scaled).scatter_(1, order, sorted_logits.masked_fill(remove, float("-inf")))
    probs = torch.softmax(scaled, dim=-1)
    if params.any_greedy:
        onehot = torch.zeros_like(probs).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where((t <= 0)[:, None], onehot, probs)
    return probs


def draw_uniforms(batch_size: int, steps: int, seed=None, device="cpu") -> torch.Tensor:
    """(B, steps) uniforms in [0, 1). Row i comes from its own generator seeded with seed + i (or
    seed[i] for a per-row list), so it is the same whatever else is in the batch; seed None uses
    torch's global RNG (not reproducible unless the caller seeds it)."""
    if seed is None:
        return torch.rand(batch_size, steps, device=device)
    seeds = _as_list(seed, batch_size, "seed")
    if not isinstance(seed, (list, tuple)):
        seeds = [int(seed) + i for i in range(batch_size)]
    rows = [torch.rand(steps, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows).to(device)


def sample_from_probs(probs: torch.Tensor, generator: torch.Generator | None = None,
                      uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) probabilities (need not be normalised) -> (B,) token ids, by inverse CDF: the first
    token whose cumulative mass exceeds u * total. A zero-probability token can never be picked
    (its cumulative mass equals its predecessor's). Pass per-row `uniforms` (B,) for per-row
    reproducibility, or a `generator` to draw them here."""
    if uniforms is None:
        uniforms = torch.rand(probs.size(0), generator=generator, device=probs.device)
    # float64 so that u * total stays strictly below the total for every u < 1
    cdf = probs.double().cumsum(dim=-1)
    target = uniforms.double().view(-1, 1) * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).clamp_(max=probs.size(-1) - 1).view(-1)


def sample_next(logits: torch.Tensor, temperature=1.0, top_k=None, top_p=None, generator=None, *,
                params: SamplingParams | None = None, uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, V) -> (B,) next token ids."""
    if params is None:
        params = SamplingParams.make(logits.size(0), temperature, top_k, top_p, logits.device, logits.size(-1))
    if params.all_greedy:
        return logits.argmax(dim=-1)  # fast path: pure greedy needs no softmax, sort or RNG
    return sample_from_probs(probs_from_logits(logits, params=params), generator, uniforms)
