"""--quant int8 / int4 (inference/quant.py) and the server's KV-cache budget (scheduler.py, memory.py).

Each quantized layer is checked against its definition computed in plain torch (per-token int8
activations x per-channel int8 weights; group-wise int4 weights), rows must not depend on their
batch, and every inference path (cached decode, batched, speculative, the scheduler) must give
with a quantized model what the same quantized model gives alone and uncached.
"""
import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from picochat.common import PicochatError, parse_bytes
from picochat.inference.engine import Engine
from picochat.inference.memory import check_kv_budget
from picochat.inference.quant import INT4_GROUP, Int4Linear, Int8Linear, quantize, weight_bytes
from picochat.inference.sampling import Sampling
from picochat.inference.scheduler import Scheduler
from picochat.inference.speculative import generate_speculative
from picochat.model.config import config_from_depth
from picochat.model.gpt import GPT

pytestmark = pytest.mark.usefixtures("one_thread")


def model_of(seed=0, depth=2, vocab=512, std=0.05, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = config_from_depth(depth, vocab_size=vocab, sequence_len=128, aspect_ratio=64, head_dim=64, **kw)
    m = GPT(cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=std)
    return m.eval()


def prompts(n, vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (int(L),), generator=g).tolist() for L in torch.randint(3, 30, (n,), generator=g)]


@torch.no_grad()
def test_int8_linear_is_per_token_int8_times_per_channel_int8():
    torch.manual_seed(0)
    w, x = torch.randn(96, 128) * 0.02, torch.randn(5, 128) * torch.tensor([[0.01], [1], [30], [1e-4], [3]])
    got = Int8Linear(w)(x)
    # the definition: weights symmetric per row on [-127, 127]; each activation row scaled to max |x| = 1
    # and quantized on 7 bits with zero point 64 (the [-1, 1] range FBGEMM is given, reduce_range)
    sw = w.abs().amax(1) / 127
    wq = torch.round(w / sw[:, None]).clamp(-127, 127) * sw[:, None]
    sx = x.abs().amax(1, keepdim=True)
    step = 2 / 127
    xq = (torch.round(x / sx / step).clamp(-64, 63)) * step * sx
    want = xq @ wq.T
    # FBGEMM multiplies by 1/scale, so a row's extreme element (exactly +-63.5 steps) may round the
    # other way: allow that one element's step, nothing more
    assert ((got - want).abs() <= 1e-5 * want.abs().amax() + step * sx * wq.abs().amax()).all()
    assert (got - x @ w.T).norm() / (x @ w.T).norm() < 0.02  # and it is close to the float product


@torch.no_grad()
def test_int4_linear_is_groupwise_4bit():
    torch.manual_seed(1)
    w, x = torch.randn(64, 4 * INT4_GROUP) * 0.02, torch.randn(3, 4 * INT4_GROUP)
    got = Int4Linear(w)(x)
    g = w.view(64, -1, INT4_GROUP)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (hi - lo) / 15
    wq = (torch.round((g - lo) / scale).clamp(0, 15) * scale + lo).view_as(w)
    want = F.linear(x.bfloat16().float(), wq)
    assert (got - want).norm() / want.norm() < 1e-2  # bf16 activations and scales
    assert (got - x @ w.T).norm() / (x @ w.T).norm() < 0.1


@pytest.mark.parametrize("layer", [Int8Linear, Int4Linear])
@torch.no_grad()
def test_a_row_gives_the_same_bits_alone_and_in_any_batch(layer):
    torch.manual_seed(2)
    lin = layer(torch.randn(256, 128) * 0.02)
    x = torch.randn(9, 128) * torch.logspace(-2, 2, 9)[:, None]  # rows of very different scales
    together = lin(x)
    for i in range(9):
        assert torch.equal(lin(x[i:i + 1]), together[i:i + 1])
    assert torch.equal(lin(x[None])[0], together)  # (B, T, C) inputs too


@pytest.mark.parametrize("mode,bound", [("int8", 0.05), ("int4", 0.25)])  # random weights: the worst case
@pytest.mark.parametrize("arch", [dict(), dict(attention="mla"), dict(arch="nanochat-2026")])
@torch.no_grad()
def test_quantized_logits_stay_near_fp32_and_weights_shrink(mode, bound, arch):
    m = model_of(**arch)
    q = quantize(copy.deepcopy(m), mode)
    ids = torch.tensor(prompts(1)[0])[None]
    ref, got = m(ids), q(ids)
    assert (got - ref).norm() / ref.norm() < bound
    assert weight_bytes(q) < (0.6 if mode == "int8" else 0.5) * weight_bytes(m)
    if arch.get("attention") == "mla":  # the absorbed projections are read as matrices: kept dense
        assert type(q.transformer.h[0].attn.c_uk) is torch.nn.Linear


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_every_inference_path_agrees_with_the_quantized_model_alone(mode):
    """cached decode == uncached forward, batched == one by one, speculative == target alone,
    the server's scheduler == Engine alone: for the quantized model, token for token (greedy)."""
    q = quantize(model_of(), mode)
    ps = prompts(4)
    engine = Engine(q, None)
    alone = [engine.generate([p], 8, Sampling(0.0), stop_tokens=set())[0] for p in ps]
    assert engine.generate(ps, 8, Sampling(0.0), stop_tokens=set()) == alone
    with torch.no_grad():  # cached decode vs the full forward, step by step
        ids = list(ps[0])
        for _ in range(8):
            ids.append(int(q(torch.tensor([ids]))[0, -1].argmax()))
    assert ids[len(ps[0]):] == alone[0]
    draft = quantize(model_of(seed=1, depth=1), mode)
    spec, _ = generate_speculative(q, draft, ps[1], 8, sampling=Sampling(0.0), stop_tokens=set())
    assert spec == alone[1]
    sched = Scheduler(q, max_batch=4).start()
    try:
        reqs = [sched.submit(p, 8, Sampling(0.0)) for p in ps]
        assert [list(r) for r in reqs] == alone
    finally:
        sched.close()


def test_the_scheduler_queues_what_the_kv_budget_cannot_hold():
    m = model_of()
    ps = [p[:20] + [7] * (20 - len(p[:20])) for p in prompts(6)]  # 20-token prompts
    alone = [Engine(m, None).generate([p], 12, Sampling(0.0), stop_tokens=set())[0] for p in ps]
    one = Scheduler(m).kv_bytes_alone(20, 12)
    budget = int(2.2 * one)  # about two requests at a time
    sched = Scheduler(m, max_batch=6, kv_budget=budget).start()
    try:
        reqs = [sched.submit(p, 12, Sampling(0.0)) for p in ps]
        assert [list(r) for r in reqs] == alone          # every request completes, unchanged
        assert sched.stats["max_batch_seen"] < 6          # memory, not --max-batch, held them back
        assert 0 < sched.stats["kv_peak_bytes"] <= budget
        assert sched.stats["kv_wait_steps"] > 0
        with pytest.raises(ValueError, match="more than the whole budget"):
            sched.submit(list(range(1, 100)), 20, Sampling(0.0))
    finally:
        sched.close()


def test_bad_quantization_and_budget_input_is_one_clear_error():
    with pytest.raises(PicochatError, match="--quant must be one of"):
        quantize(model_of(), "int3")
    torch.manual_seed(0)
    m = GPT(config_from_depth(2, vocab_size=256, sequence_len=64, aspect_ratio=36, head_dim=36))
    with pytest.raises(PicochatError, match=r"--quant int4 needs every linear's input width to be a multiple of 32"):
        quantize(m, "int4")
    quantize(m, "int8")  # int8 takes any width
    with pytest.raises(PicochatError, match="less than one request of the full context"):
        check_kv_budget(parse_bytes("1M"), 2048, 200_000)
    check_kv_budget(parse_bytes("1G"), 2048, 200_000)


@pytest.mark.parametrize("argv,message", [
    (["chat", "--quant", "int3"], "argument --quant: invalid choice: 'int3'"),
    (["serve", "--kv-memory", "lots"], "argument --kv-memory: expected a size"),
    (["bench", "infer", "--quant", "int8,int3"], "--quant takes a comma-separated list"),
])
def test_bad_flags_are_one_line(argv, message):
    r = subprocess.run([sys.executable, "-m", "picochat.cli", *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr


NANOCHAT = __import__("pathlib").Path(__file__).resolve().parent / "fixtures" / "nanochat"  # trained by nanochat's code


@pytest.mark.parametrize("design", ["v2026_d2", "v2025_d2"])
@pytest.mark.parametrize("mode,rel,kl", [("int8", 0.03, 5e-4), ("int4", 0.05, 5e-3)])
@torch.no_grad()
def test_quantized_logits_on_real_nanochat_weights(design, mode, rel, kl):
    """Trained weights (the committed nanochat fixtures): logits within `rel` (relative L2) of fp32
    and the next-token distribution within `kl` nats, on nanochat's own reference sequences."""
    import json

    import picochat.checkpoint as ck
    from picochat.export.nanochat import find_files, nanochat_config, read_state_dict
    model_file, meta_file, _, _ = find_files(NANOCHAT / design / "base_checkpoints" / "d2", None)
    state = read_state_dict(model_file)
    cfg, _ = nanochat_config(json.loads(meta_file.read_text()), state, model_file)
    m = ck.build_model(cfg, state, "fixture")
    q = quantize(copy.deepcopy(m), mode)
    for seq in torch.load(NANOCHAT / design / "reference.pt", weights_only=False)["seqs"]:
        a, b = m(seq[None])[0], q(seq[None])[0]
        assert (a - b).norm() / a.norm() < rel
        assert F.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="batchmean") < kl
