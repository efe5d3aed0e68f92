"""The static decode step (decode_step.py, kv_cache.StaticStep): the same tokens as eager decoding
for every attention kind and for nanochat's 2026 features, batched with left padding; under
torch.compile (default mode: CUDA graphs need CUDA) too; CUDA-only modes refused without CUDA."""
import pytest
import torch

from picochat.common import PicochatError
from picochat.inference.decode_step import DecodeStep, resolve_mode
from picochat.inference.engine import Engine
from picochat.model.config import GPTConfig, config_from_depth
from modelkit import random_gpt

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 256




CONFIGS = {
    "mha": config_from_depth(2, VOCAB, 64, aspect_ratio=32, head_dim=16),
    "gqa": config_from_depth(2, VOCAB, 64, aspect_ratio=32, head_dim=16, attention="gqa", n_kv_head=1),
    "mla": config_from_depth(2, VOCAB, 64, aspect_ratio=32, head_dim=16, attention="mla"),
    "nanochat-2026": GPTConfig(sequence_len=64, vocab_size=250, n_layer=3, n_head=2, n_kv_head=1, n_embd=32,
                               value_embeds=True, layer_scalars=True, smear=True, backout=True, window_pattern="SSL",
                               short_window=5, qk_scale=1.2, pad_vocab_to=64),
}


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 250, (k,), generator=g).tolist() for k in (1, 17, 9, 30, 4)[:n]]


class Uncompiled(DecodeStep):
    """The static step run eagerly: checks StaticStep itself, without paying for a compile."""

    def __init__(self, model):
        super().__init__(model, "eager")
        self._fn = self._static


@pytest.mark.parametrize("name", CONFIGS)
def test_static_step_equals_eager(name):
    model = random_gpt(CONFIGS[name])
    ps = prompts(5)
    eager = Engine(model, decode_step="eager")
    static = Engine(model, decode_step="eager")
    static.decode = Uncompiled(model)
    kw = dict(temperature=0.0, stop_tokens=set())
    ref = eager.generate(ps, 20, **kw)
    assert static.generate(ps, 20, **kw) == ref
    assert len({tuple(r) for r in ref}) > 2
    sampled = dict(temperature=1.0, top_k=40, seed=[1, 2, 3, 4, 5], stop_tokens=set())
    assert static.generate(ps, 12, **sampled) == eager.generate(ps, 12, **sampled)


def test_compiled_step_equals_eager():
    """torch.compile of the static step (default mode; one graph for every step)."""
    model = random_gpt(CONFIGS["nanochat-2026"], seed=1)
    ps = prompts(3, seed=2)
    kw = dict(temperature=0.0, stop_tokens=set())
    compiled = Engine(model, decode_step="compiled")
    out = compiled.generate(ps, 16, **kw)
    assert compiled.decode.mode == "compiled"  # it compiled (no fallback to eager)
    eager = Engine(model, decode_step="eager")
    assert out == eager.generate(ps, 16, **kw)
    # another batch size and cache length: the same compiled step, still the eager tokens
    more = prompts(5, seed=3)
    assert compiled.generate(more, 70, **kw) == eager.generate(more, 70, **kw)
    assert compiled.decode.mode == "compiled"


def test_modes_and_cuda_only_refusal():
    cpu = torch.device("cpu")
    assert resolve_mode("auto", cpu) == "eager" and resolve_mode("auto", torch.device("cuda")) == "cuda-graphs"
    with pytest.raises(PicochatError, match="cuda-graphs needs a CUDA device"):
        resolve_mode("cuda-graphs", cpu)
    with pytest.raises(PicochatError, match="decode step must be one of"):
        resolve_mode("fast", cpu)
