"""CPU decoding setup (picochat/inference/cpu.py): which Linear layers go to oneDNN, that they
compute what F.linear computes, follow weight updates, never change training, and survive copies;
the allocator tuning's guards; and an Engine with packed weights generates what a plain one does."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from picochat.inference import cpu
from picochat.inference.cpu import ALWAYS_WEIGHTS, PACK_MIN_WEIGHTS, PackedLinear, pack_linears, unpack_linears
from picochat.inference.engine import Engine
from picochat.model.config import config_from_depth
from picochat.model.gpt import GPT
from tests.test_engine import random_prompts

pytestmark = pytest.mark.skipif(not cpu.onednn_available(), reason="this torch build has no oneDNN")


def layer(n_out, n_in, seed=0):
    torch.manual_seed(seed)
    return pack_linears(nn.Sequential(nn.Linear(n_in, n_out, bias=False)))[0]


def d2_model(seed=0):
    """n_embd 256 and a 2048 vocab: attention weights stay on MKL, the MLP packs for 2+ rows,
    the lm_head (2048 x 256 = 512K weights) always packs."""
    torch.manual_seed(seed)
    model = GPT(config_from_depth(2, vocab_size=2048, sequence_len=128, aspect_ratio=128))
    for p in model.parameters():
        nn.init.normal_(p, std=0.05)
    return model.eval()


def test_which_layers_pack_and_from_how_many_rows():
    model = pack_linears(d2_model())
    kinds = {name: (type(m).__name__, getattr(m, "min_rows", None)) for name, m in model.named_modules()
             if isinstance(m, nn.Linear)}
    assert kinds["transformer.h.0.attn.c_q"] == ("Linear", None)        # 64K weights: MKL always
    assert kinds["transformer.h.0.mlp.c_fc"] == ("PackedLinear", 2)     # 256K: oneDNN from 2 rows
    assert kinds["transformer.h.1.mlp.c_proj"] == ("PackedLinear", 2)
    assert kinds["lm_head"] == ("PackedLinear", 1)                      # 512K: oneDNN always
    assert PACK_MIN_WEIGHTS <= 1024 * 256 < ALWAYS_WEIGHTS <= 2048 * 256


@pytest.mark.parametrize("n_out,n_in", [(2048, 256), (1024, 256), (256, 1024)])
def test_packed_layers_compute_what_f_linear_computes(n_out, n_in):
    lin = layer(n_out, n_in)
    x = torch.randn(64, n_in)
    with torch.no_grad():
        ref = F.linear(x, lin.weight)
        for m in (1, 2, 5, 32, 64):
            torch.testing.assert_close(lin(x[:m]), ref[:m], rtol=1e-5, atol=1e-5)
        if lin.min_rows > 1:  # below min_rows the call is F.linear itself
            assert torch.equal(lin(x[:1]), F.linear(x[:1], lin.weight))
        # on oneDNN a row's result does not depend on how many rows share the call
        alone = torch.cat([lin(x[i:i + 1]) for i in range(64)]) if lin.min_rows == 1 else lin(x[:2])
        for m in (2, 7, 32, 64):
            assert torch.equal(lin(x[:m])[:len(alone)], alone[:m])
        # the shapes the model feeds it: (B, T, C) and a strided last-position slice
        x3 = x[:60].view(4, 15, n_in)
        torch.testing.assert_close(lin(x3), ref[:60].view(4, 15, n_out), rtol=1e-5, atol=1e-5)
        assert torch.equal(lin(x3[:, -1]), lin(x3[:, -1].contiguous()))
    assert lin._packed is not None  # the oneDNN path really ran


def test_packed_copy_follows_weight_updates_and_training_is_untouched():
    model = d2_model(seed=3)
    plain = copy.deepcopy(model)
    pack_linears(model)
    x = torch.randint(0, 2048, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-5)
    for m in (model, plain):  # a training step: the grad-enabled forward is F.linear
        m.train()
        m(x, targets=x).backward()
        with torch.no_grad():
            for p in m.parameters():
                p -= 0.1 * p.grad
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))
    with torch.no_grad():  # the in-place update bumped the weights' versions: repacked, not stale
        before = model(x)
        torch.testing.assert_close(before, plain(x), rtol=1e-5, atol=1e-5)
        plain.load_state_dict({k: v * 1.5 for k, v in plain.state_dict().items()})
        model.load_state_dict(plain.state_dict())
        assert (model(x) - before).abs().max() > 0.1
        torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-5)


def test_state_dict_copies_and_unpack():
    model = d2_model(seed=4)
    keys = list(model.state_dict())
    pack_linears(model)
    x = torch.randint(0, 2048, (3, 5))
    with torch.no_grad():
        out = model(x)  # builds the opaque oneDNN buffers, which copies leave out and rebuild
        assert list(model.state_dict()) == keys
        assert torch.equal(copy.deepcopy(model)(x), out)
        unpack_linears(model)
        assert not any(type(m) is PackedLinear for m in model.modules())
        torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-5)


def test_other_dtypes_fall_back_to_f_linear():
    lin = layer(2048, 256).to(torch.bfloat16)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(lin(x), F.linear(x, lin.weight))
        # one bf16 row (decoding) runs ATen's kernel, not oneDNN's: close to fp32, and the switch is restored
        one = lin(x[:1])
        with torch.backends.mkldnn.flags(enabled=False):
            assert torch.equal(one, F.linear(x[:1], lin.weight))
        assert torch.backends.mkldnn.is_available() and torch._C._get_mkldnn_enabled()
        torch.testing.assert_close(one.float(), F.linear(x[:1].float(), lin.weight.float()), rtol=0.02, atol=0.02)
    assert lin._packed is None  # never packed: the bf16 calls went to F.linear


def test_engine_packed_and_plain_generate_the_same_tokens():
    model = d2_model(seed=5)
    prompts = random_prompts(16, hi=60, seed=2, vocab=2048)
    plain = Engine(copy.deepcopy(model), cpu_tuning=False)
    fast = Engine(model)
    assert any(type(m) is PackedLinear for m in fast.model.modules())
    assert not any(type(m) is PackedLinear for m in plain.model.modules())
    a = fast.generate(prompts, 12, temperature=0.0, stop_tokens=set())
    assert a == plain.generate(prompts, 12, temperature=0.0, stop_tokens=set())
    assert len({tuple(o) for o in a}) > 8


def test_allocator_tuning_guards(monkeypatch):
    monkeypatch.setattr(cpu, "_malloc_tuned", None)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000")  # the user chose: leave glibc alone
    assert cpu.retain_freed_memory() is False
    monkeypatch.setattr(cpu, "_malloc_tuned", None)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    assert cpu.retain_freed_memory() is False
    monkeypatch.setattr(cpu, "_malloc_tuned", None)
    monkeypatch.setenv("LD_PRELOAD", "")
    import platform
    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert cpu.retain_freed_memory() is expected
    assert cpu.retain_freed_memory() is expected  # once per process, then remembered


def test_a_model_that_only_runs_keeps_one_copy_of_its_packed_weights():
    model = d2_model(seed=6)
    plain, packed = copy.deepcopy(model), pack_linears(copy.deepcopy(model))
    dense_lm_head = model.lm_head.weight.detach().clone()
    cpu.prepare_cpu_inference(model, release_dense=True)
    # the lm_head always runs on oneDNN: only its packed copy is left; the MLP (oneDNN from 2 rows) keeps both
    assert model.lm_head.weight.is_mkldnn and model.lm_head._packed is None
    assert not model.transformer.h[0].mlp.c_fc.weight.is_mkldnn
    x = torch.randint(0, 2048, (3, 7))
    with torch.no_grad():
        assert torch.equal(model(x), packed(x))  # the same oneDNN calls as before the release
        torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-5)  # grad on: rebuilt dense, F.linear
    prompts = random_prompts(8, hi=40, seed=3, vocab=2048)
    assert Engine(model).generate(prompts, 10, temperature=0.0, stop_tokens=set()) == \
        Engine(plain, cpu_tuning=False).generate(prompts, 10, temperature=0.0, stop_tokens=set())
    unpack_linears(model)  # e.g. for a compiled decode step: the dense weight comes back, exactly
    assert torch.equal(model.lm_head.weight, dense_lm_head)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-5)
