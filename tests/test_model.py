"""The GPT: cache decode == full forward, left padding == alone, overfitting, accounting."""
import pytest
import torch

from picochat.model.config import GPTConfig, config_from_depth
from picochat.model.gpt import GPT
from picochat.model.kv_cache import KVCache
from picochat.train.optim import build_optimizers

from modelkit import random_model

TOL = 1e-4  # fp32; observed differences are ~1e-5 (different summation order in SDPA)


@pytest.mark.parametrize("attention,n_kv", [("mha", None), ("gqa", 2), ("gqa", 1)])
def test_kv_cache_decode_equals_full_forward(attention, n_kv):
    model = random_model(300, attention=attention, n_kv_head=n_kv)
    idx = torch.randint(0, 300, (3, 24))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(3, 32)
        parts = [model(idx[:, :9], kv_cache=cache)]
        for t in range(9, 24):
            parts.append(model(idx[:, t:t + 1], kv_cache=cache))
    inc = torch.cat(parts, 1)
    assert cache.pos == 24
    torch.testing.assert_close(inc, full, atol=TOL, rtol=0)


def test_left_padded_rows_equal_rows_alone():
    model = random_model(300, attention="gqa", n_kv_head=2)
    pads = [0, 4, 11]
    rows = [torch.randint(1, 300, (20 - p,)) for p in pads]
    batch = torch.stack([torch.cat([torch.zeros(p, dtype=torch.long), r]) for p, r in zip(pads, rows)])
    nxt = torch.randint(1, 300, (3, 1))
    with torch.no_grad():
        cache = KVCache(3, 32, pad=pads)
        prefill = model(batch, kv_cache=cache)
        step = model(nxt, kv_cache=cache)
        for i, p in enumerate(pads):
            alone = model(torch.cat([rows[i], nxt[i]])[None])
            torch.testing.assert_close(prefill[i, p:], alone[0, :-1], atol=TOL, rtol=0)
            torch.testing.assert_close(step[i, 0], alone[0, -1], atol=TOL, rtol=0)
            assert torch.isfinite(prefill[i, :p]).all()  # padding positions stay finite


def test_cache_rollback_and_row_selection():
    model = random_model(300)
    idx = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        cache = KVCache(2, 16)
        model(idx[:, :8], kv_cache=cache)
        model(torch.randint(0, 300, (2, 3)), kv_cache=cache)   # speculative tokens, then rejected
        cache.truncate(8)
        after = model(idx[:, 8:], kv_cache=cache)
        cache.select_rows([1])
        model(idx[1:, :1], kv_cache=cache)
    torch.testing.assert_close(after, model(idx)[:, 8:], atol=TOL, rtol=0)
    assert cache.batch_size == 1 and cache.pos == 13
    with pytest.raises(ValueError, match="overflow"):
        model(torch.zeros(1, 4, dtype=torch.long), kv_cache=cache)


def test_cache_place_right_aligns_rows_and_refuses_overflow():
    """KVCache.place copies a shorter cache into chosen rows, ending at the target's pos."""
    big, small = KVCache(3, 10), KVCache(1, 4)
    big.advance(6)
    small.update(0, "k", torch.arange(4.0).view(1, 1, 4, 1), seq_dim=2)
    small.advance(4)
    big.place([2], small)
    k = big.layers[0]["k"][0]
    assert k.shape == (3, 1, 10, 1)
    assert k[2, 0, :, 0].tolist() == [0, 0, 0, 1, 2, 3, 0, 0, 0, 0]   # positions 2..5 = small's 0..3
    assert k[:2].abs().sum() == 0
    early = KVCache(1, 10)
    early.advance(3)
    with pytest.raises(ValueError, match="cannot place 4 positions before position 3"):
        early.place([0], small)


def test_kv_bytes_per_token_matches_accounting():
    model = random_model(300, attention="gqa", n_kv_head=1)
    cache = KVCache(2, 10)
    with torch.no_grad():
        model(torch.randint(0, 300, (2, 5)), kv_cache=cache)
    assert cache.bytes_per_token() == model.kv_values_per_token() * 4  # fp32


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    cfg = config_from_depth(2, vocab_size=128, sequence_len=32, aspect_ratio=32, head_dim=16)
    model = GPT(cfg)
    model.init_weights()
    opts = build_optimizers(model, matrix_lr=0.05, embedding_lr=0.5, unembedding_lr=0.05)
    x = torch.randint(0, 128, (4, 32))
    y = torch.randint(0, 128, (4, 32))
    first = None
    for _ in range(150):
        loss = model(x, y)
        first = first if first is not None else loss.item()
        loss.backward()
        for o in opts:
            o.step()
            o.zero_grad()
    assert first > 4.0  # ~ln(128) at init
    assert loss.item() < 0.1


def test_masked_targets_are_ignored():
    model = random_model(300)
    x = torch.randint(0, 300, (2, 10))
    y = torch.randint(0, 300, (2, 10))
    y_masked = y.clone()
    y_masked[:, :5] = -1
    per_tok = model(x, y, loss_reduction="none").view(2, 10)
    torch.testing.assert_close(model(x, y_masked), per_tok[:, 5:].mean())


def test_seed_parameter_table():
    """The seed's table: d4 / n_embd 256 / 2 heads: MHA 1.05M, GQA(n_kv_head=1) 0.79M attention params."""
    mha = GPT(config_from_depth(4, vocab_size=512))
    gqa = GPT(config_from_depth(4, vocab_size=512, attention="gqa", n_kv_head=1))
    assert (mha.config.n_embd, mha.config.n_head) == (256, 2)
    assert mha.attention_params() == 4 * 4 * 256 * 256 == 1_048_576
    assert gqa.attention_params() == 786_432


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_head=6, n_kv_head=4)
    with pytest.raises(ValueError, match="attention"):
        GPTConfig(attention="flash")
    with pytest.raises(ValueError, match="unknown config keys"):
        GPTConfig.from_dict({"n_layer": 2, "bogus": 1})
    assert config_from_depth(20, vocab_size=65536).n_embd == 1280
