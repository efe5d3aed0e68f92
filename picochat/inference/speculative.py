"""Speculative decoding: a small draft proposes γ tokens, the target checks them in one forward.

One round (Leviathan et al. 2023; Chen et al. 2023): the draft samples d_1..d_γ from q_i; the
target runs once over [last token, d_1..d_γ] and gives p_1..p_{γ+1}; d_i is accepted with
probability min(1, p_i(d_i) / q_i(d_i)), left to right; at the first rejection one token is drawn
from normalize(max(0, p_i - q_i)), and if all γ are accepted a bonus token from p_{γ+1}. Every
emitted token is then distributed exactly as the target's (tests/test_speculative.py: chi-square).
p and q both come from `probs_from_logits`, so temperature/top-k/top-p apply as in plain sampling;
temperature 0 gives the target's greedy output.

The target caches every token but the last emitted one, the draft lags by one or more (fed at its
next turn); rejected positions are dropped with `cache.truncate`, and in a batch the rows that
accepted fewer tokens are shifted right (`cache.shift_right`) to line up again. `GammaController`
picks γ per round, or plain decoding when the draft does not pay (docs/inference.md).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from picochat.inference.cpu import prepare_cpu_inference
from picochat.inference.sampling import Sampling, check_request, probs_from_logits, sample_from_probs, sample_next
from picochat.model.kv_cache import KVCache


def accept_drafts(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, generator=None):
    """The acceptance rule. p (B, γ+1, V) target probs, q (B, γ, V) draft probs, drafts (B, γ).
    Returns (n accepted (B,), the token that follows them (B,))."""
    B, g = drafts.shape
    rows = torch.arange(B, device=p.device)
    p_d = p[:, :g].gather(2, drafts[..., None]).squeeze(2)
    q_d = q.gather(2, drafts[..., None]).squeeze(2)
    u = torch.rand(B, g, generator=generator, device=p.device)
    ok = u * q_d < p_d                               # probability min(1, p/q); q_d > 0 (d was drawn from q)
    n = ok.long().cumprod(dim=1).sum(dim=1)          # accepted = the leading run of oks
    p_n = p[rows, n]                                 # target distribution where the round stops
    q_n = torch.where((n < g)[:, None], q[rows, n.clamp(max=g - 1)], torch.zeros_like(p_n))
    resid = (p_n - q_n).clamp_(min=0)                # all accepted: q_n = 0, the bonus comes from p
    # a rejection implies p < q at the draft, so the residual has mass; guard rounding anyway
    resid = torch.where(resid.sum(1, keepdim=True) > 0, resid, p_n)
    return n, sample_from_probs(resid, generator)


@dataclass
class SpecStats:
    tokens: int = 0               # tokens emitted, all rows
    row_forwards: int = 0         # sum over target forwards (rounds) of rows in the batch
    drafted: int = 0              # draft tokens proposed, all rows
    accepted: int = 0
    rejected: int = 0             # speculative rounds (per row) that ended in a rejection
    gammas: list[int] = field(default_factory=list)  # γ of every round (0 = plain decoding)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def alpha(self) -> float:
        """Per-token acceptance probability: accepted / (accepted + rejected). The acceptance rate
        above also counts drafts never checked because an earlier one was rejected."""
        return self.accepted / (self.accepted + self.rejected) if self.accepted + self.rejected else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        return self.tokens / self.row_forwards if self.row_forwards else 0.0


class GammaController:
    """Picks γ for each round (0 = plain decoding): from a decayed acceptance rate α and measured
    forward times it predicts tokens/s for γ-1, γ, γ+1 (a round yields (1 - α^(γ+1)) / (1 - α)
    tokens) and for plain decoding; when plain wins, it re-probes the draft now and then (back-off)."""

    def __init__(self, gamma: int = 4, max_gamma: int = 8, adaptive: bool = True, probe_every: int = 4,
                 decay: float = 0.9):
        if not 0 <= gamma <= max_gamma:
            raise ValueError(f"need 0 <= gamma <= max_gamma, got gamma={gamma}, max_gamma={max_gamma}")
        self.gamma, self.max_gamma, self.adaptive = max(gamma, 1), max_gamma, adaptive
        self.fixed = gamma
        self.base_probe = self.probe_every = probe_every
        self.decay = decay
        self.acc, self.tested = 1.0, 2.0          # prior: α = 0.5 with the weight of two tokens
        self.t_draft: float | None = None         # EMA seconds per draft forward
        self.t_verify: dict[int, float] = {}      # k tokens fed -> EMA seconds (target forward + acceptance)
        self.plain_streak = 0

    @property
    def alpha(self) -> float:
        return self.acc / self.tested

    def observe_acceptance(self, accepted: int, tested: int) -> None:
        self.acc = self.decay * self.acc + accepted
        self.tested = self.decay * self.tested + tested

    def _ema(self, old, new):
        return new if old is None else 0.7 * old + 0.3 * new

    def observe_draft(self, seconds: float) -> None:
        self.t_draft = self._ema(self.t_draft, seconds)

    def observe_verify(self, k: int, seconds: float) -> None:
        self.t_verify[k] = self._ema(self.t_verify.get(k), seconds)

    def _tv(self, k: int) -> float:
        # unmeasured widths borrow the nearest measured one (optimistic: lets γ grow and be measured)
        return self.t_verify.get(k) or self.t_verify[min(self.t_verify, key=lambda j: (abs(j - k), j))]

    def rate(self, g: int) -> float:
        """Predicted tokens per second per row with γ = g."""
        if g == 0:
            return 1.0 / self._tv(1)
        a = min(self.alpha, 0.999)
        return (1 - a ** (g + 1)) / (1 - a) / (g * self.t_draft + self._tv(g + 1))

    def choose(self, limit: int) -> int:
        """γ for the next round; `limit` = most draft tokens still useful (remaining budget - 1)."""
        if limit <= 0:
            return 0
        if not self.adaptive:
            return min(self.fixed, limit)
        if 1 not in self.t_verify and self.t_verify:
            return 0  # measure plain decoding once, right after the first (prefill) round
        if self.t_draft is None or not self.t_verify:
            return min(self.gamma, limit)
        top = min(self.max_gamma, limit)
        cands = {g for g in (self.gamma - 1, self.gamma, self.gamma + 1) if 1 <= g <= top} or {min(self.gamma, top)}
        best = max(cands, key=self.rate)
        if self.rate(best) > self.rate(0):
            self.gamma, self.plain_streak, self.probe_every = best, 0, self.base_probe
            return best
        self.plain_streak += 1
        if self.plain_streak >= self.probe_every:  # re-check the draft now and then, backing off
            self.plain_streak, self.probe_every = 0, min(2 * self.probe_every, 256)
            return min(self.gamma, 2, limit)       # a cheap probe; γ grows again if it pays
        return 0


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.inference_mode()
def generate_speculative_batch(target, draft, prompts: list[list[int]], max_new_tokens: int,
                               sampling: Sampling | None = None, *, gamma: int = 4, max_gamma: int = 8,
                               adaptive: bool = True, stop_tokens=(), pad_id: int = 0,
                               controller: GammaController | None = None, **knobs) -> tuple[list[list[int]], SpecStats]:
    """Sample up to max_new_tokens per prompt from `target`, using `draft` to propose tokens.
    Returns the new tokens per prompt (a stop token is included and ends its row) and stats.
    sampling: a Sampling (or its keywords, Sampling.of) whose fields may be per-row lists, except
    the seed: one int seeds one generator for the whole batch."""
    sampling = Sampling.of(sampling, **knobs)
    V = target.config.vocab_size
    if draft.config.vocab_size != V:
        raise ValueError(f"draft and target vocabularies differ ({draft.config.vocab_size} vs {V})")
    ctrl = controller or GammaController(gamma, max_gamma, adaptive)
    B = len(prompts)
    # batch 1 grows by exactly what it emits; a batch also grows by its alignment padding
    growth = 1 if B == 1 else (ctrl.max_gamma if ctrl.adaptive else ctrl.fixed) + 1
    check_request(prompts, max_new_tokens, V, min(target.cos.size(0), draft.cos.size(0)), growth=growth)
    max_new_tokens = int(max_new_tokens)
    dev = next(target.parameters()).device
    if dev.type == "cpu":  # oneDNN makes a gamma + 1-token verification much cheaper than MKL (cpu.py)
        prepare_cpu_inference(target)
        prepare_cpu_inference(draft)
    L = max(len(p) for p in prompts)
    params = sampling.params(B, dev, V)
    cap = L + max_new_tokens * growth
    stats, out = SpecStats(), [[] for _ in prompts]
    if max_new_tokens == 0:
        return out, stats
    gen = None if sampling.seed is None else torch.Generator(device=dev).manual_seed(int(sampling.seed))
    pad = [L - len(p) for p in prompts]
    seq = torch.full((B, cap), pad_id, dtype=torch.long, device=dev)
    seq[:, :L] = torch.tensor([[pad_id] * n + list(p) for n, p in zip(pad, prompts)], dtype=torch.long)
    tcache, dcache = KVCache(B, cap, dev, pad=pad), KVCache(B, cap, dev, pad=pad)
    stop = {int(t) for t in stop_tokens}
    rows = list(range(B))          # original index of each row still generating
    end = L                        # seq[:, :end] holds every row's tokens so far (right-aligned)

    while rows:
        Bc = len(rows)
        g = ctrl.choose(max_new_tokens - min(len(out[r]) for r in rows) - 1)
        stats.gammas.append(g)
        # 1. draft proposes g tokens (its first forward also feeds whatever it has not seen yet)
        drafts = torch.empty(Bc, 0, dtype=torch.long, device=dev)
        if g:
            x, qs, ds = seq[:, dcache.pos:end], [], []
            for _ in range(g):
                t0 = _now(dev)
                logits = draft.logits(draft.hidden(x, kv_cache=dcache)[:, -1])
                if params.all_greedy:  # greedy needs no distributions, only argmaxes
                    qi, d = None, logits.argmax(-1)
                else:
                    qi = probs_from_logits(logits, params=params)
                    d = sample_from_probs(qi, gen)
                if x.size(1) <= 2:  # a long catch-up feed is not a typical draft step
                    ctrl.observe_draft(_now(dev) - t0)
                qs.append(qi)
                ds.append(d)
                x = d[:, None]
            drafts = torch.stack(ds, 1)
            q = None if params.all_greedy else torch.stack(qs, 1)
        # 2. target scores [pending..., d_1..d_g] in one forward
        feed = torch.cat([seq[:, tcache.pos:end], drafts], 1)
        t0 = _now(dev)
        h = target.hidden(feed, kv_cache=tcache)[:, -(g + 1):]
        logits = target.logits(h)
        # 3. accept / reject (g = 0 is a plain decoding step)
        if g and params.all_greedy:
            # one-hot p and q: the rule accepts exactly the drafts that match the target's argmax,
            # and the residual (or bonus) token is the target's argmax where the round stops
            best = logits.argmax(-1)                                        # (B, g+1)
            n = (drafts == best[:, :g]).long().cumprod(dim=1).sum(dim=1)
            nxt = best.gather(1, n[:, None]).squeeze(1)
        elif g:
            rep = params.select(torch.arange(Bc, device=dev).repeat_interleave(g + 1))
            p = probs_from_logits(logits.reshape(Bc * (g + 1), V), params=rep).view(Bc, g + 1, V)
            n, nxt = accept_drafts(p, q, drafts, gen)
        else:
            n = torch.zeros(Bc, dtype=torch.long, device=dev)
            nxt = sample_next(logits[:, 0], params=params, generator=gen)
        k = n + 1                                       # tokens emitted per row
        N = int(k.max()) if g else 1
        shift = N - k
        emitted = torch.cat([drafts, nxt[:, None]], 1).scatter_(1, n[:, None], nxt[:, None])
        if g and N != int(k.min()):
            # rows that emitted fewer move right by the difference: every row ends at end + N again
            seq = torch.gather(seq, 1, (torch.arange(cap, device=dev)[None] - shift[:, None]).clamp_(min=0))
            tcache.shift_right(shift)
            dcache.shift_right(shift)
        cols = torch.arange(N, device=dev)[None] - shift[:, None]
        seq[:, end:end + N] = torch.where(cols >= 0, emitted.gather(1, cols.clamp(min=0)), pad_id)
        tcache.truncate(end + N - 1)                    # keep all but the newest token
        if g:  # a row that accepted all g drafts has d_g unseen by the draft: it re-feeds two tokens
            dcache.truncate(min(dcache.pos, end + N - 1 - int(bool((n == g).any()))))
        end += N
        if ctrl.adaptive and feed.size(1) == g + 1:     # a typical round (not a prefill or catch-up)
            ctrl.observe_verify(g + 1, _now(dev) - t0)
        if g:
            tested = n + (n < g).long()                  # tokens checked: accepted ones + the first reject
            ctrl.observe_acceptance(int(n.sum()), int(tested.sum()))
            stats.drafted += g * Bc
            stats.accepted += int(n.sum())
            stats.rejected += int((n < g).sum())
        stats.row_forwards += Bc
        # 4. hand out tokens; rows finish on a stop token or their budget
        keep = []
        for i, (r, toks, kr) in enumerate(zip(rows, emitted.tolist(), k.tolist())):
            for t in toks[:kr]:
                out[r].append(t)
                if t in stop or len(out[r]) >= max_new_tokens:
                    break
            else:
                keep.append(i)
        if len(keep) < Bc:
            if not keep:
                break
            idx = torch.tensor(keep, dtype=torch.long, device=dev)
            tcache.select_rows(idx)
            dcache.select_rows(idx)
            seq, params = seq[idx], params.select(idx)
            rows = [rows[i] for i in keep]
    stats.tokens = sum(len(o) for o in out)
    return out, stats


def generate_speculative(target, draft, prompt: list[int], max_new_tokens: int, **kw) -> tuple[list[int], SpecStats]:
    """Batch-1 speculative decoding (the usual use): new tokens of `prompt` and the stats."""
    out, stats = generate_speculative_batch(target, draft, [list(prompt)], max_new_tokens, **kw)
    return out[0], stats
