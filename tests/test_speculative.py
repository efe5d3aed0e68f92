"""Speculative decoding: greedy output == the target's greedy output token for token; sampled
output follows the target's distribution exactly (chi-square over 20k samples of the first three
tokens), and a broken acceptance rule is caught by the same test; adaptive γ decisions."""
import pytest
import torch

from picochat.inference import speculative as spec
from picochat.inference.engine import Engine
from picochat.inference.sampling import probs_from_logits
from picochat.inference.speculative import GammaController, generate_speculative, generate_speculative_batch

from modelkit import random_model

pytestmark = pytest.mark.usefixtures("one_thread")


def prompts(n, seed=0, lo=1, hi=40, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.fixture(scope="module")
def pair():
    target = random_model(seed=0, depth=2)
    # a draft that agrees with the target often: the target's embeddings, head and first layer
    draft = random_model(seed=1, depth=1, n_embd=64)
    with torch.no_grad():
        draft.transformer.wte.weight.copy_(target.transformer.wte.weight)
        draft.lm_head.weight.copy_(target.lm_head.weight)
        for name, p in draft.transformer.h[0].named_parameters():
            p.copy_(target.transformer.h[0].get_parameter(name))
    return target, draft


@pytest.mark.parametrize("gamma,adaptive", [(1, False), (3, False), (6, False), (4, True)])
def test_greedy_equals_target_greedy(pair, gamma, adaptive):
    target, draft = pair
    engine = Engine(target)
    accepted = 0
    for p in prompts(5, seed=gamma):
        ref = engine.generate([p], 40, temperature=0.0, stop_tokens=set())[0]
        out, stats = generate_speculative(target, draft, p, 40, gamma=gamma, adaptive=adaptive, temperature=0.0)
        assert out == ref
        assert stats.tokens == 40 and 0 <= stats.acceptance_rate <= 1
        assert stats.tokens_per_target_forward >= 1
        accepted += stats.accepted
    if not adaptive:
        assert accepted > 0  # the rollback path and the bonus path were both exercised


def test_self_draft_accepts_everything(pair):
    target, _ = pair
    p = prompts(1, seed=9)[0]
    out, stats = generate_speculative(target, target, p, 30, gamma=4, adaptive=False, temperature=0.0)
    assert out == Engine(target).generate([p], 30, temperature=0.0, stop_tokens=set())[0]
    assert stats.acceptance_rate == 1.0
    assert stats.tokens_per_target_forward == 5.0  # 6 rounds of 4 drafts + 1 bonus token


def test_batched_greedy_with_stops_equals_engine(pair):
    target, draft = pair
    ps = prompts(7, seed=3)
    engine = Engine(target)
    free = engine.generate(ps, 30, temperature=0.0, stop_tokens=set())
    stops = {free[0][4], free[3][12]}
    ref = engine.generate(ps, 30, temperature=0.0, stop_tokens=stops)
    out, stats = generate_speculative_batch(target, draft, ps, 30, gamma=3, adaptive=False, temperature=0.0,
                                            stop_tokens=stops)
    assert out == ref
    assert stats.accepted > 0


# ---------------------------------------------------------------- distribution (chi-square)

def chi2_pvalue(stat: float, df: int) -> float:
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


V, N, PROMPT = 8, 20_000, [3, 1, 6]


@pytest.fixture(scope="module")
def tiny_pair():
    # different random models: the draft is often wrong, so rejections and residual draws are frequent
    return (random_model(seed=10, depth=2, vocab=V, std=0.3, n_embd=16, seq_len=16),
            random_model(seed=11, depth=1, vocab=V, std=0.3, n_embd=16, seq_len=16))


def exact_joint(target, **sampling) -> torch.Tensor:
    """P(x1, x2, x3) of the target after the sampling transform, by enumerating all V^3 continuations."""
    cont = torch.cartesian_prod(*[torch.arange(V)] * 3)                       # (V^3, 3)
    idx = torch.cat([torch.tensor(PROMPT).expand(len(cont), -1), cont], 1)
    with torch.no_grad():
        logits = target(idx)[:, len(PROMPT) - 1:len(PROMPT) + 2]              # predicts x1, x2, x3
    joint = torch.ones(len(cont), dtype=torch.float64)
    for i in range(3):
        probs = probs_from_logits(logits[:, i], **sampling).double()
        joint *= probs.gather(1, cont[:, i:i + 1]).squeeze(1)
    return joint


def first_three_counts(target, draft, seed, **sampling):
    """Counts of the V^3 possible first three tokens over N rows (one batched speculative run)."""
    out, stats = generate_speculative_batch(target, draft, [PROMPT] * N, 3, gamma=2, max_gamma=2, adaptive=False,
                                            seed=seed,
                                            **sampling)
    codes = torch.tensor([(o[0] * V + o[1]) * V + o[2] for o in out])
    return torch.bincount(codes, minlength=V ** 3).double(), stats


def chi2_test(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson chi-square p-value; cells expecting < 5 are pooled into one bin (if it has mass)."""
    big = expected >= 5
    obs, exp = counts[big], expected[big]
    if expected[~big].sum() > 0:
        obs = torch.cat([obs, counts[~big].sum()[None]])
        exp = torch.cat([exp, expected[~big].sum()[None]])
    stat = float(((obs - exp) ** 2 / exp).sum())
    return chi2_pvalue(stat, len(obs) - 1)


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.8, top_k=5, top_p=0.9)])
def test_sampling_matches_target_distribution(tiny_pair, sampling):
    target, draft = tiny_pair
    counts, stats = first_three_counts(target, draft, seed=1, **sampling)
    assert 0.1 < stats.acceptance_rate < 0.9  # both accepts and rejections (residual draws) are frequent
    expected = exact_joint(target, **sampling) * N
    assert counts[expected == 0].sum() == 0  # never a sequence the target cannot produce
    assert chi2_test(counts, expected) > 0.01


def test_broken_acceptance_rule_is_detected(tiny_pair, monkeypatch):
    """Always accepting yields the draft's distribution: the same test must reject it (power)."""
    def accept_all(p, q, drafts, generator=None):
        g = drafts.size(1)
        return torch.full((drafts.size(0),), g), spec.sample_from_probs(p[:, g], generator)

    monkeypatch.setattr(spec, "accept_drafts", accept_all)
    target, draft = tiny_pair
    counts, stats = first_three_counts(target, draft, seed=1, temperature=1.0)
    assert stats.acceptance_rate == 1.0
    assert chi2_test(counts, exact_joint(target, temperature=1.0) * N) < 1e-6


# ---------------------------------------------------------------- adaptive γ

def run_controller(alpha: float, t_draft: float, t_target: float, rounds=60, gamma=4) -> list[int]:
    """Feed the controller synthetic timings and acceptances (expected values, no noise)."""
    ctrl = GammaController(gamma=gamma, max_gamma=8)
    chosen = []
    for _ in range(rounds):
        g = ctrl.choose(limit=100)
        chosen.append(g)
        if g:
            ctrl.observe_draft(t_draft)
            n = 0
            while n < g and (n + 1) / (g + 1) <= alpha:  # deterministic stand-in for ~alpha acceptance
                n += 1
            ctrl.observe_acceptance(n, n + (n < g))
        ctrl.observe_verify(g + 1, t_target * (1 + 0.05 * g))
    return chosen


def test_adaptive_gamma_falls_back_to_plain_decoding_for_a_useless_draft():
    chosen = run_controller(alpha=0.0, t_draft=0.5, t_target=1.0)
    late = chosen[20:]
    assert late.count(0) >= 0.9 * len(late)       # plain decoding, with rare probes
    assert any(late)                                # ...but it keeps probing


def test_adaptive_gamma_grows_for_a_cheap_accurate_draft():
    chosen = run_controller(alpha=0.9, t_draft=0.05, t_target=1.0, gamma=2)
    assert chosen[-1] >= 5 and chosen[-20:].count(0) == 0


def test_invalid_arguments(pair):
    target, draft = pair
    with pytest.raises(ValueError):
        generate_speculative(target, random_model(seed=0, depth=1, vocab=100, n_embd=64), [1, 2], 5)
    with pytest.raises(ValueError):
        generate_speculative(target, draft, [], 5)
    with pytest.raises(ValueError):
        generate_speculative(target, draft, [1], 5, temperature=-1)
    with pytest.raises(ValueError):
        GammaController(gamma=9, max_gamma=8)
