"""Inference in bfloat16 (--dtype bf16), on CPU at tiny sizes: close to fp32, batched == alone,
speculative decoding == plain decoding, MLA absorb == expand, rotary tables kept in fp32, KV cache
in bf16, sampling in fp32; and --dtype refusals.

Tolerances. bf16 keeps 8 significant bits: one rounding is a relative error of at most 2^-9 (0.2%),
and a forward pass rounds every weight, activation and partial result. Logits here are soft-capped
to [-15, 15] with a spread (std) of about 2 on these models, so errors of a few hundredths are
expected: measured max |bf16 - fp32| 0.11 on both models here (5-7% of the spread); 0.25 is the
bound used for bf16 vs fp32, about 2x margin for other CPUs' kernels (a real mapping error, such as
a missing layer or a wrong scale, moves logits by whole units).
Two bf16 computations of the same math (a row alone vs in a padded batch, one token at a time vs a
verified speculation) run different kernel shapes and may round differently: their logits agree to
LOGIT_TOL, and greedy tokens may only differ after a step where the top two logits were within
2 x LOGIT_TOL of each other (a near-tie that either rounding may break) — asserted, not assumed.
"""
import pytest
import torch

from picochat.common import PicochatError
from picochat.device import resolve_dtype
from picochat.inference.engine import Engine
from picochat.inference.speculative import generate_speculative
from picochat.model.config import GPTConfig, config_from_depth
from picochat.model.gpt import GPT
from picochat.model.kv_cache import KVCache
from picochat.model.mla import set_mla_mode
from modelkit import random_gpt

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 256
LOGIT_TOL = 0.1


def model(cfg: GPTConfig, seed=0, dtype=torch.bfloat16) -> GPT:
    m = random_gpt(cfg, seed).to(dtype)
    m.reset_rotary()  # as checkpoint.load_model does: fp32 tables whatever the weights
    return m


CFG = config_from_depth(2, VOCAB, 64, aspect_ratio=32, head_dim=16, attention="gqa", n_kv_head=1)
CFG_2026 = GPTConfig(sequence_len=64, vocab_size=VOCAB, n_layer=3, n_head=2, n_kv_head=1, n_embd=32, value_embeds=True,
                     layer_scalars=True, smear=True, backout=True, window_pattern="SSL", short_window=5, qk_scale=1.2)


def prompts(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (k,), generator=g).tolist() for k in (1, 19, 7, 30, 4)[:n]]


def alone_logits(m, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Logits (len(tokens), V) before each generated token, decoding the row alone."""
    with torch.inference_mode():
        cache = KVCache(1, len(prompt) + len(tokens))
        out = [m.logits(m.hidden(torch.tensor([prompt]), kv_cache=cache)[:, -1])]
        for t in tokens[:-1]:
            out.append(m.logits(m.hidden(torch.tensor([[t]]), kv_cache=cache)[:, -1]))
    return torch.cat(out)


def assert_same_or_near_tie(m, prompt, got: list[int], ref: list[int]) -> None:
    """got == ref, or they part where the reference's top two logits were a near-tie."""
    if got == ref:
        return
    i = next(i for i, (a, b) in enumerate(zip(got, ref)) if a != b)
    top2 = alone_logits(m, prompt, ref[:i + 1])[i].topk(2).values
    assert float(top2[0] - top2[1]) < 2 * LOGIT_TOL, f"diverged at step {i} without a near-tie"


@pytest.mark.parametrize("cfg", [CFG, CFG_2026], ids=["gqa", "nanochat-2026"])
def test_bf16_close_to_fp32_and_everything_stays_in_its_dtype(cfg):
    m16, m32 = model(cfg), model(cfg, dtype=torch.float32)
    m32.load_state_dict({k: v.float() for k, v in m16.state_dict().items()})  # the same (bf16-rounded) weights
    x = torch.tensor([prompts()[3]])
    with torch.inference_mode():
        cache = KVCache(1, 40)
        lg = m16.logits(m16.hidden(x, kv_cache=cache))
        ref = m32(x)
    assert m16.cos.dtype == torch.float32 and lg.dtype == torch.float32  # rotary tables and logits in fp32
    assert all(buf.dtype == torch.bfloat16 for layer in cache.layers.values() for buf, _ in layer.values())
    assert (lg - ref).abs().max() < 0.25


@pytest.mark.parametrize("cfg", [CFG, CFG_2026], ids=["gqa", "nanochat-2026"])
def test_bf16_batched_equals_alone(cfg):
    m = model(cfg)
    eng = Engine(m)
    ps = prompts()
    batched = eng.generate(ps, 16, temperature=0.0, stop_tokens=set())
    for p, got in zip(ps, batched):
        alone = eng.generate([p], 16, temperature=0.0, stop_tokens=set())[0]
        assert_same_or_near_tie(m, p, got, alone)
        # the logits themselves agree to the tolerance along the alone path
        with torch.inference_mode():
            L = max(len(q) for q in ps)
            cache = KVCache(len(ps), L + 1, pad=[L - len(q) for q in ps])
            first = m.logits(m.hidden(torch.tensor([[0] * (L - len(q)) + q for q in ps]), kv_cache=cache)[:, -1])
        assert (first[ps.index(p)] - alone_logits(m, p, alone[:1])[0]).abs().max() < LOGIT_TOL


def test_bf16_speculative_equals_plain_decoding():
    target = model(CFG, seed=0)
    draft = model(config_from_depth(1, VOCAB, 64, aspect_ratio=64, head_dim=16), seed=1)  # as wide as the target
    with torch.no_grad():
        draft.transformer.wte.weight.copy_(target.transformer.wte.weight)
        draft.lm_head.weight.copy_(target.lm_head.weight)
    eng = Engine(target)
    accepted = 0
    for p in prompts(4, seed=3):
        ref = eng.generate([p], 24, temperature=0.0, stop_tokens=set())[0]
        out, stats = generate_speculative(target, draft, p, 24, gamma=3, adaptive=False, temperature=0.0)
        assert_same_or_near_tie(target, p, out, ref)
        accepted += stats.accepted
    assert accepted > 0


def test_bf16_mla_absorb_equals_expand():
    m = model(config_from_depth(2, VOCAB, 64, aspect_ratio=32, head_dim=16, attention="mla"))
    p = prompts()[3]
    outs = {}
    for mode in ("absorb", "expand"):
        set_mla_mode(m, mode)
        with torch.inference_mode():
            cache = KVCache(1, 40)
            m.hidden(torch.tensor([p[:-5]]), kv_cache=cache)
            outs[mode] = torch.cat([m.logits(m.hidden(torch.tensor([[t]]), kv_cache=cache)[:, -1]) for t in p[-5:]])
    set_mla_mode(m, "auto")
    assert (outs["absorb"] - outs["expand"]).abs().max() < LOGIT_TOL


def test_dtype_choice_and_refusals(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32 and resolve_dtype("fp32", cpu) == torch.float32
    with pytest.raises(PicochatError, match="fp16 is not supported on CPU"):
        resolve_dtype("fp16", cpu)
    assert resolve_dtype("bf16", cpu) == torch.bfloat16  # on any CPU: a trade-off measured in docs/inference.md


@pytest.mark.parametrize("argv,message", [
    (["sample", "--dtype", "fp16"], "--dtype fp16 is not supported on CPU"),
    (["chat", "-p", "hi", "--decode-step", "cuda-graphs"], "--decode-step cuda-graphs needs a CUDA device"),
    (["eval", "chat", "--tasks", "arithmetic", "--dtype", "fp16"], "--dtype fp16 is not supported on CPU"),
])
def test_cli_refuses_gpu_only_choices_on_cpu_in_one_line(argv, message, capsys, tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the refusals are for machines without CUDA")
    from picochat.cli import main
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    assert main(argv + ["--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
