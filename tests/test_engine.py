"""Engine: a batch computes exactly what each prompt computes alone (greedy and seeded sampling),
rows finish independently, the cache is allocated once, the streaming call shape the CLI uses."""
import pytest
import torch

from picochat.inference import engine as engine_mod
from picochat.inference.engine import Engine
from picochat.model.kv_cache import KVCache

from modelkit import random_model

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 256


def random_prompts(n, lo=1, hi=100, seed=0, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    lengths[:2] = [lo, hi]  # always cover both extremes
    return [torch.randint(0, vocab, (n_,), generator=g).tolist() for n_ in lengths]


@pytest.fixture(scope="module")
def engine():
    return Engine(random_model(VOCAB, attention="gqa", n_kv_head=1))


def test_batched_greedy_equals_each_prompt_alone(engine):
    prompts = random_prompts(20)
    batched = engine.generate(prompts, 24, temperature=0.0, stop_tokens=set())
    assert engine.last_stats["batch_size"] == 20
    for p, out in zip(prompts, batched):
        assert out == engine.generate([p], 24, temperature=0.0, stop_tokens=set())[0]
    assert all(len(o) == 24 for o in batched)
    assert len({tuple(o) for o in batched}) > 10  # the model is not degenerate


def test_batched_sampling_equals_alone_with_per_row_params(engine):
    prompts = random_prompts(6, 1, 40, seed=1)
    kw = dict(temperature=[0.0, 0.8, 1.0, 1.5, 1.0, 0.5], top_k=[None, 20, 0, 5, 50, None],
              top_p=[None, 0.9, 0.5, None, 1.0, 0.95], seed=[11, 12, 13, 14, 15, 16])
    batched = engine.generate(prompts, 20, stop_tokens=set(), **kw)
    for i, p in enumerate(prompts):
        alone = engine.generate([p], 20, stop_tokens=set(), **{k: [v[i]] for k, v in kw.items()})[0]
        assert batched[i] == alone
    again = engine.generate(prompts, 20, stop_tokens=set(), **kw)
    assert again == batched  # seeded: reproducible
    other = engine.generate(prompts, 20, stop_tokens=set(), **dict(kw, seed=[1, 2, 3, 4, 5, 6]))
    assert other[1:] != batched[1:]
    # an int seed gives row i the generator seed + i: row 3 alone with seed 103 reproduces it
    rows = engine.generate(prompts, 10, temperature=1.0, seed=100, stop_tokens=set())
    assert rows[3] == engine.generate([prompts[3]], 10, temperature=1.0, seed=103, stop_tokens=set())[0]


def test_top_k_1_sampling_equals_greedy(engine):
    prompts = random_prompts(8, 1, 30, seed=2)
    greedy = engine.generate(prompts, 16, temperature=0.0, stop_tokens=set())
    assert engine.generate(prompts, 16, temperature=1.3, top_k=1, seed=5, stop_tokens=set()) == greedy


def test_rows_finish_independently_and_compact(engine):
    prompts = random_prompts(16, 1, 60, seed=3)
    free = engine.generate(prompts, 40, temperature=0.0, stop_tokens=set())
    # stop on tokens the rows actually produce, at different steps
    stops = {free[0][3], free[1][10], free[2][25]}
    batched = engine.generate(prompts, 40, temperature=0.0, stop_tokens=stops)
    assert engine.last_stats["compactions"] >= 1
    lengths = set()
    for p, f, out in zip(prompts, free, batched):
        assert out == engine.generate([p], 40, temperature=0.0, stop_tokens=stops)[0]
        cut = next((i + 1 for i, t in enumerate(f) if t in stops), len(f))
        assert out == f[:cut]  # the stop token is included, nothing after it
        lengths.add(len(out))
    assert len(lengths) >= 3


def test_stop_sequences_and_per_row_budgets(engine):
    prompts = random_prompts(4, 5, 30, seed=4)
    free = engine.generate(prompts, 30, temperature=0.0, stop_tokens=set())
    seq = free[1][6:9]
    out = engine.generate(prompts, 30, temperature=0.0, stop_tokens=set(), stop_sequences=[seq])
    first = next(i for i in range(len(free[1]) - 2) if free[1][i:i + 3] == seq)
    assert out[1] == free[1][:first + 3]
    budgets = [0, 3, 30, 7]
    out = engine.generate(prompts, budgets, temperature=0.0, stop_tokens=set())
    assert out == [f[:n] for f, n in zip(free, budgets)]


def test_stream_call_shape_used_by_the_cli(engine):
    prompts = random_prompts(2, 5, 20, seed=5)
    free = engine.generate(prompts, 12, temperature=0.0, stop_tokens=set())
    stop = free[0][2]
    steps = list(engine.generate_stream(prompts, 12, temperature=0.0, top_k=None, top_p=None, seed=0,
                                        stop_tokens={stop}))
    col0 = [s[0] for s in steps]
    cut = free[0].index(stop) + 1
    assert col0[:cut] == free[0][:cut] and all(t is None for t in col0[cut:])
    # single prompt: the stream ends once its row finished
    single = [s[0] for s in engine.generate_stream([prompts[0]], 12, temperature=0.0, top_k=None, top_p=None,
                                                   seed=0, stop_tokens={stop})]
    assert single == free[0][:cut]


def count_caches(monkeypatch) -> list:
    """Record every KVCache the engine module builds from now on (the list fills as they are made)."""
    made = []

    class Counting(KVCache):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(engine_mod, "KVCache", Counting)
    return made


def test_cache_allocated_once_for_the_longest_sequence(engine, monkeypatch):
    made = count_caches(monkeypatch)
    prompts = random_prompts(5, 3, 17, seed=6)
    engine.generate(prompts, 9, temperature=0.0, stop_tokens=set())
    assert len(made) == 1
    cache = made[0]
    assert cache.max_len == 17 + 9 - 1 and cache.pos == cache.max_len  # exactly the length needed
    per_token = engine.kv_bytes_per_token()
    assert per_token == engine.model.kv_values_per_token() * 4
    assert cache.nbytes() == 5 * cache.max_len * per_token == engine.last_stats["kv_cache_bytes"]


def test_default_stop_tokens_come_from_the_tokenizer():
    class Tok:
        pad_token_id = bos_token_id = 3

        def encode_special(self, name):
            return {"<|assistant_end|>": 7, "<|bos|>": 3}[name]

    eng = Engine(random_model(VOCAB), Tok())
    assert eng.default_stop_tokens() == {3, 7}
    out = eng.generate([[1, 2, 5], [4]], 50, temperature=1.0, seed=0)
    for row in out:
        assert all(t not in (3, 7) for t in row[:-1])


@pytest.mark.parametrize("prompts,n,kw", [
    ([[]], 5, {}), ([], 5, {}), ([[1, 2]], -1, {}), ([[1, 2]], [1, 2], {}), ([[1, 2]], 5, dict(temperature=-1)),
    ([[1, 2]], 5, dict(top_p=0)), ([[1, 2]], 5, dict(top_k=-2)), ([[1, VOCAB]], 5, {}), ([[1] * 600], 100, {}),
])
def test_invalid_requests_raise(engine, prompts, n, kw):
    with pytest.raises(ValueError):
        engine.generate(prompts, n, **kw)


def test_zero_new_tokens(engine):
    assert engine.generate([[1, 2], [3]], 0) == [[], []]


def test_length_chunks_partition_sorted_rows():
    lengths = [5, 60, 7, 33, 1, 64, 12, 40, 2, 3, 50, 9]
    chunks = engine_mod.length_chunks(lengths, max_chunks=4, min_rows=3)
    assert len(chunks) == 4 and sorted(i for c in chunks for i in c) == list(range(12))
    flat = [lengths[i] for c in chunks for i in c]
    assert flat == sorted(lengths, reverse=True)
    assert len(engine_mod.length_chunks([30, 31, 32, 29] * 4)) == 1   # little padding: one chunk
    assert len(engine_mod.length_chunks(lengths, min_rows=4)) == 3     # 12 rows, at least 4 per chunk


@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_chunked_prefill_equals_one_padded_prefill(attention, monkeypatch):
    """Length-sorted chunked prefill gives the same logits, the same cache and the same generations,
    and still allocates one full-length cache (the chunks' own caches are prompt-sized)."""
    model = random_model(VOCAB, seed=3, attention=attention)
    prompts = random_prompts(16, 1, 90, seed=8)
    assert len(engine_mod.length_chunks([len(p) for p in prompts])) == 4
    made = count_caches(monkeypatch)
    with torch.inference_mode():
        lg1, c1 = engine_mod.prefill(model, prompts, 120, max_chunks=1)
        made.clear()
        lg4, c4 = engine_mod.prefill(model, prompts, 120, max_chunks=4)
    assert [c.max_len for c in made].count(120) == 1 and len(made) == 5
    assert all(c.max_len == max(len(prompts[i]) for i in rows)
               for c, rows in zip(made[1:], engine_mod.length_chunks([len(p) for p in prompts])))
    torch.testing.assert_close(lg4, lg1, atol=1e-5, rtol=0)
    assert c4.pos == c1.pos == max(len(p) for p in prompts)
    assert torch.equal(c4.pad, c1.pad) and c4.max_len == c1.max_len == 120
    for layer, names in c1.layers.items():
        for name, (buf, seq_dim) in names.items():
            other = c4.layers[layer][name][0]
            real = (torch.arange(c1.pos)[None, :] >= c1.pad[:, None])        # (B, pos): non-padding positions
            view = [1] * buf.dim()
            view[0], view[seq_dim] = buf.size(0), c1.pos
            mask = real.view(view).expand_as(buf.narrow(seq_dim, 0, c1.pos))
            a, b = buf.narrow(seq_dim, 0, c1.pos)[mask], other.narrow(seq_dim, 0, c1.pos)[mask]
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    one, four = Engine(model), Engine(model)
    one.prefill_chunks = 1
    kw = dict(temperature=0.0, stop_tokens=set())
    assert four.generate(prompts, 12, **kw) == one.generate(prompts, 12, **kw)


def test_prefill_under_a_token_cap_gives_the_same_logits_and_cache():
    """The server prefills at most max_tokens per forward (bounded activations): the same logits and
    cache as one forward, rows of any length (one longer than the cap runs alone)."""
    model = random_model(VOCAB, seed=4)
    contexts = random_prompts(7, lo=3, hi=60, seed=4)
    with torch.inference_mode():
        ref_logits, ref = engine_mod.prefill(model, contexts, 80)
        logits, cache = engine_mod.prefill(model, contexts, 80, max_tokens=50)
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    assert cache.pos == ref.pos and torch.equal(cache.pad, ref.pad)
    for i, names in ref.layers.items():  # every real position (padding is masked, whatever it holds)
        for name, (buf, seq_dim) in names.items():
            for b, p in enumerate(ref.pad.tolist()):
                got = cache.layers[i][name][0][b].narrow(seq_dim - 1, p, ref.pos - p)
                assert torch.allclose(got, buf[b].narrow(seq_dim - 1, p, ref.pos - p), atol=1e-5)
