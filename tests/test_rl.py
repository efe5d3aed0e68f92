"""picochat train rl: rewards are the eval graders, advantages and the loss equal a naive reference,
the expected reward of a toy task rises (exact binomial test, stated power), resume is exact,
torchrun x2 == one process, and bad input is one clear line."""
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from evalkit import REPO, TEXT, make_home, tiny_model
from picochat import checkpoint as ck
from picochat.common import PicochatError
from picochat.eval.generate import generate_replies
from picochat.tasks import EvalTask, make_eval_task
from picochat.inference.chat import Reply
from picochat.inference.sampling import Sampling
from picochat.tokenizer import Tokenizer
from picochat.train.loop import Stage, TrainSettings, run_training
from picochat.train.rewards import calculator_agreement, check_reward_tasks
from picochat.train.rl import RLOptions, RolloutLoader, group_advantages, policy_loss, rollout_batches
from test_eval_runner import ScriptedEngine


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT], vocab_size=300)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ----------------------------------------------------------------------------- rewards

def test_rewards_are_the_eval_graders(tmp_path):
    cases = {
        "arithmetic": ({"question": "What is 12 + 30?", "answer": "42"},
                       ["12 + 30 = 42", "12 + 30 = 42.", " 42 "], ["12 + 30 = 41", "42 apples", ""]),
        "spelling": ({"question": "Spell 'cat'.", "answer": "c-a-t"}, ["c-a-t", "c-a-t."], ["c-a-t-s", "cat"]),
        "gsm8k": ({"question": "How many?", "answer": "#### 1,234"},
                  ["So 1,234 in all.", "The answer is 1234."], ["1,234 then 5", "no idea"]),
        "aime": ({"question": "Find n.", "answer": "42"}, ["so \\boxed{42}", "\\boxed{042}", "Answer: 42."],
                 ["\\boxed{42} no, \\boxed{41}", "\\boxed{4.2}"]),
    }
    for name, (row, good, bad) in cases.items():
        task = make_eval_task(name, write_jsonl(tmp_path / f"{name}.jsonl", [row]), split="train")
        ex = task.examples[0]
        assert task.has_reward
        assert [task.reward(ex, r) for r in good] == [1.0] * len(good), name
        assert [task.reward(ex, r) for r in bad] == [0.0] * len(bad), name
        assert all(task.reward(ex, r) == float(task.grade(ex, r)) for r in good + bad)
    mc = make_eval_task("arc-easy", write_jsonl(tmp_path / "mc.jsonl", [{"question": "q", "choices": ["a", "b"],
                                                                          "answer": 0}]))
    assert not mc.has_reward
    with pytest.raises(PicochatError, match="no reward"):
        mc.reward(mc.examples[0], "A")
    for bad in ("mmlu", "bpb"):
        with pytest.raises(PicochatError, match="has no reward"):
            check_reward_tasks(["arithmetic", bad])


def test_training_problems_are_not_the_eval_problems():
    train = make_eval_task("spelling", limit=400, split="train")
    test = make_eval_task("spelling", limit=400)
    words = lambda t: {ex["answer"] for ex in t.examples}  # noqa: E731
    assert "train split" in train.source and words(train) and not words(train) & words(test)
    assert [ex["question"] for ex in make_eval_task("arithmetic", limit=50, split="train").examples] != \
        [ex["question"] for ex in make_eval_task("arithmetic", limit=50).examples]


def test_calculator_agreement():
    def reply(*parts):
        return Reply(parts=[{"type": k, "text": t} for k, t in parts])
    call = [("python", "123 * 45"), ("python_output", "5535")]
    assert calculator_agreement(reply(*call, ("text", "123 * 45 = 53535"))) is False  # the quickstart's garble
    assert calculator_agreement(reply(*call, ("text", "123 * 45 = 5535"))) is True
    assert calculator_agreement(reply(*call, ("text", "It is 5,535."))) is True
    assert calculator_agreement(reply(*call, ("text", "no number"))) is False
    assert calculator_agreement(reply(("text", "5535"))) is None
    assert calculator_agreement(reply(("python", "1/0"), ("python_output", "error: division by zero"))) is None
    assert calculator_agreement(reply(("python", "7/2"), ("python_output", "3.5"), ("text", "= 3.50"))) is True


# ----------------------------------------------------------------------------- advantages, loss, batches

def test_traces_mark_only_sampled_tokens(tok):
    """Tool outputs are forced into the sequence, not sampled: they must carry no loss."""
    sp = tok.encode_special
    prompt = tuple(tok.encode("What is 12*12?"))
    first = tok.encode("Let me see. ") + [sp("<|python_start|>")] + tok.encode("12*12") + [sp("<|python_end|>")]
    second = tok.encode("It is 144.") + [sp("<|assistant_end|>")]
    traces = []
    generate_replies(ScriptedEngine({prompt: [first, second]}), tok, [list(prompt)], 50, traces=traces)
    forced = [sp("<|output_start|>")] + tok.encode("144") + [sp("<|output_end|>")]
    ((ids, sampled),) = traces
    assert ids == list(prompt) + first + forced + second
    assert sampled == [False] * len(prompt) + [True] * len(first) + [False] * len(forced) + [True] * len(second)


def test_group_advantages():
    r = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 0, 1, 1, 1, 0])
    adv = group_advantages(r, 4)
    assert adv.tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, 0.25, 0.25, 0.25, -0.75]
    assert torch.allclose(adv.view(3, 4).sum(1), torch.zeros(3))


def reference_loss(model, ref_model, traces, adv, kl_coef):
    """The objective written out row by row: -(1/N) sum_rows adv sum_sampled log p + kl_coef/N sum k3."""
    n = sum(sum(s) for _, s in traces)
    total = 0.0
    for (ids, sampled), a in zip(traces, adv):
        x = torch.tensor([ids])
        logp = F.log_softmax(model(x)[0], dim=-1)
        ref = F.log_softmax(ref_model(x)[0], dim=-1).detach()
        for t in range(1, len(ids)):
            if sampled[t]:
                lp, lr = logp[t - 1, ids[t]], ref[t - 1, ids[t]]
                total = total - a * lp + kl_coef * (torch.exp(lr - lp) - (lr - lp) - 1)
    return total / n


def test_loss_equals_reference_computation(tok):
    model, ref_model = tiny_model(tok.vocab_size, seed=1), tiny_model(tok.vocab_size, seed=2)
    g = torch.Generator().manual_seed(0)
    traces = []
    for i in range(6):  # prompts of 3-6 tokens, replies of 2-9 tokens with a forced stretch in some
        p, r = 3 + i % 4, 2 + (3 * i) % 8
        ids = torch.randint(0, tok.vocab_size, (p + r,), generator=g).tolist()
        sampled = [False] * p + [not (i % 2 and 1 <= j <= 2) for j in range(r)]
        traces.append((ids, sampled))
    adv = group_advantages(torch.tensor([1.0, 0, 1, 0, 0, 1]), 3)
    n = sum(sum(s) for _, s in traces)
    for kl in (0.0, 0.3):
        expected = reference_loss(model, ref_model, traces, adv.tolist(), kl)
        g_ref = torch.autograd.grad(expected, list(model.parameters()))
        for micro in (6, 3, 2):  # one batch or accumulated micro-batches: the same objective
            accum = 6 // micro
            batches = rollout_batches(traces, adv, micro, accum / n, "cpu")
            total = 0.0
            for b in batches:
                with torch.no_grad():
                    b.ref_logp = -ref_model(b.inputs, b.targets, loss_reduction="none").view_as(b.targets)
                b.kl_weight = kl * accum / n
                total = total + policy_loss(model, b) / accum  # what the loop does with grad_accum
            torch.testing.assert_close(total, expected, atol=1e-6, rtol=1e-5)
            for a, b in zip(torch.autograd.grad(total, list(model.parameters())), g_ref):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------------------- learning a toy task

def binomial_tail(n, k, p):
    """P(X >= k) for X ~ Binomial(n, p), exactly."""
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))


def test_toy_task_expected_reward_rises(tok):
    """Reward 1 when the one-token reply is one of ten letters: the optimal policy puts all its mass
    there. The starting policy's expected reward p0 is exact (softmax of the prompt's logits).
    Test: n = 400 fresh samples of the trained policy, one-sided exact binomial test of H0: p <= p0 at
    alpha = 0.001; its power against p0 + 0.15 is computed below and required to be >= 0.99."""
    letters = "abcdefghij"
    target = [tok.encode(c) for c in letters]
    assert all(len(t) == 1 for t in target)
    target = [t[0] for t in target]
    task = EvalTask("toy", "generative", [{"question": f"pick {i}"} for i in range(4)], "toy",
                    grade=lambda ex, reply: reply in letters,
                    chat_prompt=lambda ex: [{"role": "user", "content": ex["question"]}])
    model = tiny_model(tok.vocab_size, seed=3)
    prompts = [tok.render_for_completion({"messages": task.chat_prompt(ex)}) for ex in task.examples]

    def expected_reward() -> float:
        with torch.no_grad():
            return sum(F.softmax(model(torch.tensor([p]))[0, -1], -1)[target].sum().item() for p in prompts) / 4

    p0 = expected_reward()
    opts = RLOptions(tasks=["toy=1"], samples=8, prompts=8, max_new_tokens=1, eval_limit=0)
    loader = RolloutLoader(model, tok, [task], [1.0], opts, 0, 1, 1, "cpu", seed=0, log_every=10**9)
    settings = TrainSettings(stage="rl", tag="rl/toy", steps=25, device_batch_size=64, seq_len=1,
                             matrix_lr=0.01, embedding_lr=0.05, unembedding_lr=0.02, warmdown_ratio=0.0,
                             eval_every=0, log_every=1)
    summary = run_training(Stage(settings, model, tok, torch.device("cpu")), lambda state: loader,
                           loss_fn=policy_loss, save_checkpoints=False)
    rewards = [h["reward"] for h in summary["history"] if "reward" in h]
    assert len(rewards) == 25 and all(0 <= h["live_groups"] <= 1 for h in summary["history"] if "reward" in h)
    p_after = expected_reward()
    assert p_after > p0 + 0.15, (p0, p_after)
    n, alpha = 400, 1e-3
    crit = next(k for k in range(n + 1) if binomial_tail(n, k, p0) <= alpha)
    power = binomial_tail(n, crit, min(1.0, p0 + 0.15))
    assert power >= 0.99, power
    model.eval()
    replies = generate_replies(loader.engine, tok, [prompts[i % 4] for i in range(n)], 1,
                               Sampling(1.0, seed=[10**6 + i for i in range(n)]))
    hits = sum(task.reward(None, r.text) for r in replies)
    assert hits >= crit, (hits, crit, p0, p_after)


# ----------------------------------------------------------------------------- CLI: resume, torchrun, errors

@pytest.fixture(scope="module")
def rl_home(tmp_path_factory):
    """Tiny random sft/base checkpoints and GSM8K-style problems whose answers (1-3) a random model hits
    now and then, so the rollouts carry signal and the weights really move."""
    root = tmp_path_factory.mktemp("rlhome")
    env = make_home(root, tags=("sft/t", "base/t"))
    data = write_jsonl(root / "g.jsonl", [{"question": f"Q{i}: what number?", "answer": str(i % 3 + 1)}
                                          for i in range(40)])
    return env, data


@pytest.fixture
def home(rl_home, monkeypatch):
    """rl_home, with PICOCHAT_HOME pointing at it for the test (in-process commands read it)."""
    monkeypatch.setenv("PICOCHAT_HOME", rl_home[0]["PICOCHAT_HOME"])
    return rl_home


def rl_args(data, *extra, tasks="gsm8k"):
    return ["train", "rl", "--model", "sft/t", "--tasks", tasks, "--data-file", f"gsm8k={data}",
            "--prompts-per-step", "4", "--samples-per-prompt", "8", "--max-new-tokens", "12", "--temperature", "1.5",
            "--eval-limit", "0", "--matrix-lr", "0.02", "--device", "cpu", *extra]


def cli(args, env):
    from picochat.cli import main
    assert main(args) == 0


def weights(env, tag):
    c = ck.read_checkpoint(tag)
    return load_file(str(c.path / "model.safetensors")), c


def test_resume_after_stop_after_continues_exactly(home):
    env, data = home
    cli(rl_args(data, "--steps", "4", "--tag", "rl/full"), env)
    cli(rl_args(data, "--steps", "4", "--tag", "rl/split", "--stop-after", "2"), env)
    assert weights(env, "rl/split")[1].step == 2
    cli(["train", "rl", "--tag", "rl/split", "--resume", "--device", "cpu"], env)
    (w_full, c_full), (w_split, c_split) = weights(env, "rl/full"), weights(env, "rl/split")
    start, _ = weights(env, "sft/t")
    assert c_full.step == c_split.step == 4 and c_split.meta["stage"] == "rl"
    assert any(not torch.equal(w_full[k], start[k]) for k in start)  # the run learned something
    for k in w_full:
        torch.testing.assert_close(w_split[k], w_full[k], atol=1e-6, rtol=0)
    keys = ("loss", "reward", "response_len", "pass_gsm8k", "live_groups")
    hist = lambda c: [h[k] for h in c.state["history"] if "reward" in h for k in keys]  # noqa: E731
    assert hist(c_split) == pytest.approx(hist(c_full), abs=1e-6)
    assert any(h["reward"] > 0 for h in c_full.state["history"] if "reward" in h)
    assert c_full.state["loader"] == {"rollouts": 4}
    assert (c_full.path / "tokenizer.json").exists()


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(home):
    env, data = home
    cli(rl_args(data, "--steps", "2", "--tag", "rl/one", "--device-batch-size", "8"), env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "picochat.cli",
           *rl_args(data, "--steps", "2", "--tag", "rl/two", "--device-batch-size", "8")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (w1, c1), (w2, c2) = weights(env, "rl/one"), weights(env, "rl/two")
    assert (c1.meta["world_size"], c2.meta["world_size"]) == (1, 2)
    keys = ("loss", "reward", "response_len", "live_groups")
    h = lambda c: [x[k] for x in c.state["history"] if "reward" in x for k in keys]  # noqa: E731
    assert h(c1) == pytest.approx(h(c2), abs=1e-5)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-4, rtol=1e-4)


def test_bad_input_gives_one_clear_line(home, capsys):
    from picochat.cli import main
    env, data = home
    for args, pattern in ((["--tasks", "mmlu"], "task 'mmlu' has no reward"),
                          (["--tasks", "arithmetic,bpb"], "task 'bpb' has no reward"),
                          (["--samples-per-prompt", "1"], "--samples-per-prompt must be >= 2"),
                          (["--model", "base/t"], "base/t is a base model"),
                          (["--device-batch-size", "5"], "--device-batch-size 5 must divide"),
                          (["--model", "sft/none"], "no checkpoint with tag 'sft/none'")):
        capsys.readouterr()
        assert main(["train", "rl", "--model", "sft/t", "--tasks", "arithmetic", "--device", "cpu", *args]) == 1
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(lines) == 1 and pattern in lines[0], (args, lines)


def test_report_card_plots_rl_runs(home):
    """The report card shows an RL run's held-out table and its per-step plot."""
    from picochat.cli import main
    env, data = home
    cli(rl_args(data, "--steps", "2", "--tag", "rl/report", "--eval-limit", "4", tasks="gsm8k,arithmetic"), env)
    assert main(["report"]) == 0
    out = ck.home() / "report"
    md = (out / "report.md").read_text()
    assert "## Reinforcement learning" in md and "](rl.png)" in md
    assert "| `rl/report` | sft/t | arithmetic |" in md
    assert (out / "rl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kl_to_the_start_is_zero_at_the_start_and_pulls_back_later(home):
    """--kl-coef loads the starting checkpoint as reference: at step 1 policy == reference, so the KL
    term and its gradient vanish (same loss and weights as without it); afterwards it changes the update."""
    env, data = home
    for tag, kl in (("rl/nokl", "0"), ("rl/kl", "1.0")):
        cli(rl_args(data, "--steps", "3", "--warmdown-ratio", "0", "--save-every", "1", "--keep", "3", "--tag", tag,
                    "--kl-coef", kl), env)
    hist = {t: [h for h in weights(env, t)[1].state["history"] if "reward" in h] for t in ("rl/nokl", "rl/kl")}
    assert hist["rl/kl"][0]["loss"] == pytest.approx(hist["rl/nokl"][0]["loss"], abs=1e-7)
    one = [load_file(str(ck.read_checkpoint(t, step=1).path / "model.safetensors")) for t in ("rl/nokl", "rl/kl")]
    for k in one[0]:
        torch.testing.assert_close(one[1][k], one[0][k], atol=1e-7, rtol=0)
    (w_no, _), (w_kl, _) = weights(env, "rl/nokl"), weights(env, "rl/kl")
    assert any(not torch.allclose(w_no[k], w_kl[k], atol=1e-6) for k in w_no)
