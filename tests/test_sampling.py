"""Sampling: greedy/top-k/top-p semantics on hand-made distributions, per-row params and seeds,
the inverse-CDF sampler's frequencies, and clear errors for invalid values."""
import math

import pytest
import torch

from picochat.inference.sampling import (SamplingParams, draw_uniforms, probs_from_logits, sample_from_probs,
                                         sample_next, validate_sampling)

pytestmark = pytest.mark.usefixtures("one_thread")

def chi2_pvalue(stat: float, df: int) -> float:
    """Upper tail of the chi-square distribution (regularised upper incomplete gamma)."""
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


HAND = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])


def hand_logits(perm=(3, 0, 4, 1, 2)):
    """The hand-made distribution in a scrambled token order (so sorting is exercised)."""
    probs = torch.empty(5)
    probs[list(perm)] = HAND
    return probs.log()[None], list(perm)


def test_top_k_1_equals_greedy():
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(0)) * 3
    greedy = sample_next(logits, temperature=0)
    for t in (0.5, 1.0, 2.0):
        sampled = sample_next(logits, temperature=t, top_k=1, generator=torch.Generator().manual_seed(1))
        assert torch.equal(sampled, greedy)
    assert torch.equal(greedy, logits.argmax(-1))
    assert torch.equal(probs_from_logits(logits, 0.0).argmax(-1), greedy)


@pytest.mark.parametrize("p,kept", [(0.45, 1), (0.5, 1), (0.65, 2), (0.75, 3), (0.8, 3), (0.9, 4), (0.99, 5), (1.0, 5)])
def test_top_p_keeps_smallest_set_reaching_p(p, kept):
    logits, perm = hand_logits()
    probs = probs_from_logits(logits, 1.0, top_p=p)[0]
    expect = torch.zeros(5)
    expect[perm[:kept]] = HAND[:kept] / HAND[:kept].sum()
    torch.testing.assert_close(probs, expect, atol=1e-6, rtol=0)


def test_top_k_and_temperature():
    logits, perm = hand_logits()
    probs = probs_from_logits(logits, 1.0, top_k=3)[0]
    expect = torch.zeros(5)
    expect[perm[:3]] = HAND[:3] / HAND[:3].sum()
    torch.testing.assert_close(probs, expect, atol=1e-6, rtol=0)
    hot = probs_from_logits(logits, 2.0)[0]
    torch.testing.assert_close(hot, torch.softmax(logits[0] / 2, -1), atol=1e-6, rtol=0)
    # top-k first, then top-p over the renormalised top-k: 0.5/0.85 = 0.59 < 0.6 <= 0.82
    both = probs_from_logits(logits, 1.0, top_k=3, top_p=0.6)[0]
    assert (both > 0).sum() == 2


def test_per_row_params_match_rows_alone():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    temps, ks, ps = [0.0, 0.7, 1.3, 1.0], [5, 0, 10, None], [0.9, 0.5, None, 1.0]
    batch = probs_from_logits(logits, temps, ks, ps)
    for i in range(4):
        alone = probs_from_logits(logits[i:i + 1], temps[i], ks[i], ps[i])
        torch.testing.assert_close(batch[i:i + 1], alone)
    assert batch[0].max() == 1.0  # greedy row is one-hot


def test_per_row_seeds_do_not_depend_on_the_batch():
    u = draw_uniforms(3, 10, seed=[7, 8, 9])
    assert torch.equal(u[1], draw_uniforms(1, 10, seed=[8])[0])
    assert torch.equal(draw_uniforms(3, 10, seed=7)[2], draw_uniforms(1, 10, seed=9)[0])  # int seed: row i -> seed + i
    assert not torch.equal(u[0], u[1])


def test_inverse_cdf_sampler_matches_probabilities():
    probs = torch.tensor([0.0, 0.3, 0.0, 0.45, 0.2, 0.05, 0.0])  # zeros must never be drawn
    n = 40_000
    draws = sample_from_probs(probs.expand(n, -1), generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=7).double()
    assert counts[probs == 0].sum() == 0
    nz = probs > 0
    exp = probs[nz].double() * n
    stat = float(((counts[nz] - exp) ** 2 / exp).sum())
    assert chi2_pvalue(stat, int(nz.sum()) - 1) > 0.01
    # unnormalised weights are fine (the residual of speculative decoding is not normalised)
    assert torch.equal(sample_from_probs(3 * probs[None], uniforms=torch.tensor([0.5])), torch.tensor([3]))
    # u just below 1 picks the last token with mass, never a zero-mass tail token
    assert sample_from_probs(probs[None], uniforms=torch.tensor([1 - 2 ** -24])).item() == 5


def test_chi2_pvalue_helper():
    assert math.isclose(chi2_pvalue(3.841458820694124, 1), 0.05, rel_tol=1e-6)
    assert math.isclose(chi2_pvalue(18.307038053275146, 10), 0.05, rel_tol=1e-6)


@pytest.mark.parametrize("kw", [
    dict(temperature=-0.1), dict(temperature=float("nan")), dict(temperature=float("inf")), dict(temperature=None),
    dict(top_p=0.0), dict(top_p=1.5), dict(top_p=-0.2), dict(top_p=float("nan")),
    dict(top_k=-1), dict(top_k=1.5), dict(top_k=float("inf")),
    dict(temperature=[1.0, -1.0]), dict(top_k=[1, -3]), dict(top_p=[0.5, 2.0]), dict(temperature=[1.0, 1.0, 1.0]),
])
def test_invalid_values_raise(kw):
    args = dict(temperature=1.0, top_k=None, top_p=None)
    args.update(kw)
    with pytest.raises(ValueError):
        SamplingParams.make(2, args["temperature"], args["top_k"], args["top_p"])
    with pytest.raises(ValueError):
        sample_next(torch.zeros(2, 10), **args)


def test_valid_edge_values():
    validate_sampling(0, 0, 1.0)
    validate_sampling(1e-3, 1, 1e-6)
    validate_sampling([0.0, 2.0], [None, 4], [None, 0.3], batch_size=2)
    # top_k >= vocab means "keep everything": identical to no filter
    logits = torch.randn(2, 10)
    torch.testing.assert_close(probs_from_logits(logits, 1.0, top_k=50), probs_from_logits(logits, 1.0))
