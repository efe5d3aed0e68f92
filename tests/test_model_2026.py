"""nanochat's 2026 design as picochat configuration: sliding windows, smear, value embeddings,
lambdas, backout and a padded vocab behave as specified, and every inference path (batched
left-padded decoding, chunked prefill, speculative decoding, the server's continuous batching)
computes what each prompt computes alone. Also: `train base --arch nanochat-2026` and its groups."""
import dataclasses

import pytest
import torch

from picochat.inference import engine as engine_mod
from picochat.inference.engine import Engine
from picochat.inference.scheduler import Scheduler
from picochat.inference.speculative import generate_speculative_batch
from picochat.model.config import GPTConfig, config_from_depth
from picochat.model.gpt import GPT
from picochat.model.kv_cache import KVCache
from picochat.train.optim import build_optimizers
from modelkit import random_gpt

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 250  # padded to 256 rows




def config(**kw) -> GPTConfig:
    base = dict(sequence_len=64, vocab_size=VOCAB, n_layer=3, n_head=2, n_kv_head=1, n_embd=32,
                value_embeds=True, layer_scalars=True, smear=True, backout=True, window_pattern="SSL",
                short_window=5, qk_scale=1.2, rope_base=100000.0, pad_vocab_to=64)
    return GPTConfig(**dict(base, **kw))


def random_model(seed=0, **kw) -> GPT:
    return random_gpt(config(**kw), seed)


def prompts(n, lo=1, hi=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    lengths[:2] = [lo, hi]
    return [torch.randint(0, VOCAB, (k,), generator=g).tolist() for k in lengths]


@pytest.fixture(scope="module")
def model():
    return random_model()


def test_config_defaults_are_the_2025_design_and_presets_round_trip():
    c = GPTConfig()
    assert not (c.value_embeds or c.layer_scalars or c.smear or c.backout or c.window_pattern)
    assert c.layer_windows() == [None] * c.n_layer and c.padded_vocab_size == c.vocab_size
    n = config_from_depth(4, 4000, 256, arch="nanochat-2026")
    assert n.padded_vocab_size == 4032 and n.short_window == 128 and n.layer_windows() == [128, 128, 128, 256]
    assert GPTConfig.from_dict(n.to_dict()) == n
    assert [n.has_value_embed(i) for i in range(4)] == [False, True, False, True]  # alternating, last included
    with pytest.raises(ValueError, match="window_pattern may only contain S and L"):
        config(window_pattern="SX")
    with pytest.raises(ValueError, match="value_embeds and qk_scale belong to MHA/GQA"):
        config_from_depth(2, 300, 64, attention="mla", arch="nanochat-2026")


def test_padded_vocab_logits_are_cropped_and_equal_the_unpadded_model(model):
    plain = GPT(config(pad_vocab_to=1))
    padded = ("transformer.wte.weight", "lm_head.weight")
    state = {k: v[:VOCAB] if k in padded or k.startswith("value_embeds.") else v for k, v in model.state_dict().items()}
    plain.load_state_dict(state)
    plain.eval()
    x = torch.tensor([prompts(1, 20, 20)[0]])
    with torch.no_grad():
        a, b = model(x), plain(x)
    assert a.shape == (1, 20, VOCAB) and model.lm_head.weight.shape[0] == 256
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_window_means_a_query_sees_only_the_last_w_keys():
    """One layer, no smear: with rotary (relative positions only) the logits at position t of a long
    sequence equal the last logits of running just its window, tokens t-w .. t."""
    m = random_model(seed=1, n_layer=1, smear=False, window_pattern="S", short_window=4, sequence_len=4)
    x = torch.tensor([prompts(1, 24, 24, seed=2)[0]])
    with torch.no_grad():
        full = m(x)[0]
        for t in range(4, 24):
            alone = m(x[:, t - 4:t + 1])[0, -1]
            torch.testing.assert_close(full[t], alone, atol=1e-5, rtol=0)
        # and the windows matter: without them position 20 sees everything and differs
        wide = GPT(dataclasses.replace(m.config, window_pattern=""))
        wide.load_state_dict(m.state_dict())
        assert (wide.eval()(x)[0, 20] - full[20]).abs().max() > 1e-3


def test_cached_decoding_equals_the_full_forward(model):
    """Prefill + token-by-token decoding with the cache (windows, smear from the cached embedding)
    gives the logits of one full forward at every position."""
    x = torch.tensor([prompts(1, 40, 40, seed=3)[0]])
    with torch.no_grad():
        full = model(x)[0]
        cache = KVCache(1, 40)
        out = [model.logits(model.hidden(x[:, :7], kv_cache=cache))[0]]
        for t in range(7, 40):
            out.append(model.logits(model.hidden(x[:, t:t + 1], kv_cache=cache))[0])
    torch.testing.assert_close(torch.cat(out), full, atol=1e-4, rtol=0)


def test_each_feature_changes_the_output(model):
    x = torch.tensor([prompts(1, 30, 30, seed=4)[0]])
    with torch.no_grad():
        ref = model(x)
        for field in ("smear", "backout", "layer_scalars", "value_embeds", "window_pattern"):
            off = GPT(dataclasses.replace(model.config, **{field: "" if field == "window_pattern" else False}))
            off.load_state_dict(model.state_dict(), strict=False)
            assert (off.eval()(x) - ref).abs().max() > 1e-3, field


def test_batched_left_padded_generation_equals_alone(model):
    engine = Engine(model)
    ps = prompts(12, seed=5)
    batched = engine.generate(ps, 20, temperature=0.0, stop_tokens=set())
    for p, out in zip(ps, batched):
        assert out == engine.generate([p], 20, temperature=0.0, stop_tokens=set())[0]
    assert len({tuple(o) for o in batched}) > 6
    kw = dict(temperature=1.0, top_k=50, seed=[3 * i for i in range(12)])
    sampled = engine.generate(ps, 16, stop_tokens=set(), **kw)
    for i, p in enumerate(ps):
        assert sampled[i] == engine.generate([p], 16, stop_tokens=set(), temperature=1.0, top_k=50, seed=[3 * i])[0]


def test_chunked_prefill_equals_one_padded_prefill(model):
    ps = prompts(16, 1, 50, seed=8)
    assert len(engine_mod.length_chunks([len(p) for p in ps])) > 1
    one, four = Engine(model), Engine(model)
    one.prefill_chunks = 1
    kw = dict(temperature=0.0, stop_tokens=set())
    assert four.generate(ps, 12, **kw) == one.generate(ps, 12, **kw)


def test_speculative_decoding_is_exact_with_2026_target_and_draft(model):
    draft = random_model(seed=9, n_layer=1)
    with torch.no_grad():  # a draft that often agrees: the target's embeddings and head
        draft.transformer.wte.weight.copy_(model.transformer.wte.weight)
        draft.lm_head.weight.copy_(model.lm_head.weight)
    ps = prompts(5, 1, 30, seed=11)
    ref = Engine(model).generate(ps, 24, temperature=0.0, stop_tokens=set())
    out, stats = generate_speculative_batch(model, draft, ps, 24, gamma=3, adaptive=False, temperature=0.0)
    assert out == ref
    assert stats.accepted > 0 and stats.rejected > 0  # both acceptance and rollback ran


def test_server_scheduler_continuous_batching_equals_alone(model):
    """Requests join and leave a running decode batch (cache merge, row drops) with smear and windows."""
    ps = prompts(10, 1, 30, seed=12)
    budgets = [6 + 3 * (i % 4) for i in range(10)]
    engine = Engine(model)
    refs = [engine.generate([p], n, temperature=0.0, stop_tokens=set())[0] for p, n in zip(ps, budgets)]
    sched = Scheduler(model, max_batch=4).start()
    try:
        reqs = [sched.submit(p, n, temperature=0.0) for p, n in zip(ps, budgets)]
        got = [list(r) for r in reqs]
    finally:
        sched.close()
    assert got == refs


def test_arch_2026_trains_with_nanochat_groups():
    """Every parameter is in exactly one group; the scalars and value embeddings have nanochat's
    settings; a few steps lower the loss."""
    torch.manual_seed(0)
    m = GPT(config_from_depth(2, VOCAB, 32, aspect_ratio=32, head_dim=16, arch="nanochat-2026"))
    m.init_weights()
    assert m.resid_lambdas.tolist() == pytest.approx([1.15, 1.05]) and m.backout_lambda.item() == pytest.approx(0.2)
    adamw, muon = build_optimizers(m)
    groups = {id(p): g for g in adamw.param_groups for p in g["params"]}
    assert groups[id(m.x0_lambdas)]["betas"] == (0.96, 0.95) and groups[id(m.x0_lambdas)]["lr"] == 0.5
    assert groups[id(m.resid_lambdas)]["weight_decay"] == 0.05
    assert groups[id(m.smear_lambda)]["lr"] == groups[id(m.backout_lambda)]["lr"] == 0.2
    ve = next(iter(m.value_embeds.values())).weight
    assert groups[id(ve)]["lr"] == pytest.approx(0.5 * groups[id(m.transformer.wte.weight)]["lr"])
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    assert id(m.transformer.h[1].attn.ve_gate.weight) in in_muon
    assert len(groups) + len(in_muon) == len(list(m.parameters()))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 20, (4, 32), generator=g)  # a small alphabet: learnable in a few steps
    m.train()
    losses = []
    for _ in range(15):
        loss = m(x[:, :-1], x[:, 1:])
        loss.backward()
        for opt in (adamw, muon):
            opt.step()
        m.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0
