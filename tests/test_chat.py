"""Chat turns: tool calls are evaluated by the calculator and fed back; SFT masks and batches."""
import pytest
import torch

from picochat.data.chat_loader import SFTLoader, sft_batch
from picochat.tasks.arithmetic import ArithmeticTask
from picochat.tasks.base import ListTask
from picochat.inference.chat import Reply, stream_chat
from picochat.tokenizer import Tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ? " * 50)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT], vocab_size=300)


class ScriptedEngine:
    """Stands in for Engine: replies with scripted token lists and records the prompts it saw."""

    def __init__(self, script):
        self.script, self.prompts = list(script), []

    def generate_stream(self, prompts, max_new_tokens, stop_tokens=None, **kw):
        self.prompts.append(list(prompts[0]))
        for t in self.script.pop(0)[:max_new_tokens]:
            yield [t]
            if t in stop_tokens:
                return


def test_tool_call_output_is_fed_back(tok):
    sp = tok.encode_special
    call = [sp("<|python_start|>")] + tok.encode("12*12") + [sp("<|python_end|>")]
    answer = tok.encode("It is 144.") + [sp("<|assistant_end|>")]
    engine = ScriptedEngine([call, answer])
    reply = Reply()
    pieces = list(stream_chat(engine, tok, [{"role": "user", "content": "What is 12*12?"}], reply=reply))
    # the second generation continued from the forced calculator output
    tail = engine.prompts[1][-(len(tok.encode("144")) + 2):]
    assert tail == [sp("<|output_start|>")] + tok.encode("144") + [sp("<|output_end|>")]
    assert reply.parts == [{"type": "python", "text": "12*12"}, {"type": "python_output", "text": "144"},
                           {"type": "text", "text": "It is 144."}]
    assert reply.finish_reason == "stop" and "".join(pieces).endswith("It is 144.")
    # the history form renders back to the same tokens the model produced
    ids, _ = tok.render_conversation([{"role": "user", "content": "What is 12*12?"},
                                      {"role": "assistant", "content": reply.content()}])
    assert ids[:len(engine.prompts[1])] == engine.prompts[1]


def test_stray_special_tokens_are_not_text(tok):
    sp = tok.encode_special
    script = tok.encode("Hi") + [sp("<|output_start|>"), sp("<|user_start|>")] + tok.encode(" there") + \
        [sp("<|assistant_end|>")]
    reply = Reply()
    pieces = list(stream_chat(ScriptedEngine([script]), tok, [{"role": "user", "content": "hello"}], reply=reply))
    assert "".join(pieces) == "Hi there" and reply.text == "Hi there" and "<|" not in reply.text
    assert reply.tokens == len(script)


def test_hostile_tool_call_is_not_executed(tok):
    sp = tok.encode_special
    call = [sp("<|python_start|>")] + tok.encode("__import__('os')") + [sp("<|python_end|>")]
    engine = ScriptedEngine([call, [sp("<|assistant_end|>")]])
    reply = Reply()
    list(stream_chat(engine, tok, [{"role": "user", "content": "hi"}], reply=reply))
    assert reply.parts[1]["type"] == "python_output" and reply.parts[1]["text"].startswith("error:")


def test_length_limit_finishes_with_length(tok):
    engine = ScriptedEngine([tok.encode("the the the the the the")])
    reply = Reply()
    list(stream_chat(engine, tok, [{"role": "user", "content": "hi"}], max_tokens=3, reply=reply))
    assert reply.finish_reason == "length" and reply.tokens == 3


def test_sft_batch_supervises_only_assistant_tokens(tok):
    conv = ArithmeticTask("train", 3)[0]
    x, y = sft_batch([conv, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
                     tok, max_len=64)
    ids, mask = tok.render_conversation(conv)
    n = len(ids) - 1
    assert x[0, :n].tolist() == ids[:-1]
    expected = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
    assert y[0, :n].tolist() == expected
    assert (y[0, n:] == -1).all()
    # tool output tokens are never targets
    out = tok.encode_special("<|output_start|>")
    pos = ids.index(out)
    assert all(v == -1 for v in y[0, pos:pos + 3].tolist())


def test_sft_packing_keeps_every_supervised_token_in_fewer_rows(tok):
    convs = [ArithmeticTask("train", 40)[i] for i in range(12)] + \
        [{"messages": [{"role": "user", "content": "hi" * k}, {"role": "assistant", "content": "yo"}]} for k in (1, 5, 9)]
    x_pad, y_pad = sft_batch(convs, tok, max_len=64)
    x, y = sft_batch(convs, tok, max_len=64, pack=True)
    assert x.shape[1] == x_pad.shape[1] and x.shape[0] < x_pad.shape[0]  # as wide, fewer rows
    assert sorted(y[y >= 0].tolist()) == sorted(y_pad[y_pad >= 0].tolist())
    # each conversation sits whole in one row, inputs and targets exactly as padding has them
    used, taken = [0] * x.shape[0], set()
    for i in range(len(convs)):
        ids, mask = tok.render_conversation(convs[i], max_tokens=65)
        n = len(ids) - 1
        spots = [(r, o) for r in range(x.shape[0]) for o in range(x.shape[1] - n + 1)
                 if (r, o) not in taken and x[r, o:o + n].tolist() == ids[:-1] and
                 y[r, o:o + n].tolist() == y_pad[i, :n].tolist()]
        assert spots, f"conversation {i} not found whole"
        taken.add(spots[0])
        used[spots[0][0]] += n + 1
    # best fit leaves no two rows that would have fit in one
    capacity = x.shape[1] + 1
    assert all(used[a] + used[b] > capacity for a in range(len(used)) for b in range(a + 1, len(used)))


def test_sft_loader_resume_and_slots(tok):
    convs = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
             for i in range(40)]
    task = ListTask(convs)
    full = SFTLoader(task, tok, 2, 32, grad_accum=2)
    batches = [next(full) for _ in range(6)]
    part = SFTLoader(task, tok, 2, 32, grad_accum=2)
    for _ in range(3):
        next(part)
    resumed = SFTLoader(task, tok, 2, 32, grad_accum=2, state=part.state_dict())
    for a, b in zip(batches[3:], (next(resumed) for _ in range(3))):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # rank r of 2 with no accumulation sees exactly micro-step r of one process with accumulation 2
    r0, r1 = SFTLoader(task, tok, 2, 32, rank=0, world_size=2), SFTLoader(task, tok, 2, 32, rank=1, world_size=2)
    assert torch.equal(next(r0)[0], batches[0][0]) and torch.equal(next(r1)[0], batches[1][0])


def test_sample_cli_refuses_an_over_long_budget_before_printing_anything(tmp_path, tok, monkeypatch, capsys):
    """`picochat sample` echoes the prompt as it generates: a budget past the context is one error line with
    nothing on stdout (not the prompt followed by the error), and a fitting one prints prompt + continuation."""
    from picochat.checkpoint import save_checkpoint
    from picochat.cli import main
    from picochat.model.config import GPTConfig
    from picochat.model.gpt import GPT
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=32, vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    model = GPT(cfg)
    save_checkpoint("base/tiny", 1, model, cfg, {"stage": "base"})
    tok.save(tmp_path / "tokenizer")
    assert main(["sample", "--model", "base/tiny", "-p", "The quick", "--max-tokens", "100000"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("picochat: error: prompt (") and len(err.strip().splitlines()) == 1, (out, err)
    assert main(["sample", "--model", "base/tiny", "-p", "The quick", "--max-tokens", "3", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("The quick")
