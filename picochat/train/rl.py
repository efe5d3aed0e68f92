"""`picochat train rl`: on-policy reinforcement learning on verifiable rewards (GRPO-like REINFORCE).

Each optimizer step
1. draws P prompts from the tasks' training problems (a deterministic function of the step, so
   resume is exact) and samples K replies per prompt in ONE batched engine call: P x K rows,
   each with its own seed, finished rows compacted; calculator calls run inside the rollouts
   exactly as in chat (inference/chat.py's tool_turns);
2. grades every reply with its task's own grader (rewards.py: the grade `picochat eval` gives);
3. advantage = reward - mean reward of the prompt's K samples (no std division, no critic);
4. loss = -sum over sampled tokens of advantage x log p(token) / (sampled tokens in the global
   batch): token-level normalisation, so long and short replies weigh per token alike. Tokens
   the model did not sample (prompt, tool outputs, padding) carry no loss. --kl-coef C adds
   C x KL(policy || starting checkpoint) per token (the k3 estimator), off by default.

It is one more stage of the one loop (loop.py): RolloutLoader is its loader (RLBatches: a Batch
plus per-token weights; its state is the number of rollouts done), `policy_loss` its loss hook and
the held-out monitor its eval hook. Under torchrun the P prompts are sharded by rank; the weights are
normalised by the global token count so DDP's gradient average gives the same update as one
process with the same global batch (tests/test_rl.py).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch.nn.utils.rnn import pad_sequence

from picochat.common import PicochatError, print0
from picochat.device import autocast_ctx
from picochat.tasks.base import TaskMixture, stable_hash
from picochat.inference.chat import generate_replies
from picochat.inference.engine import Engine
from picochat.inference.sampling import Sampling
from picochat.train.rewards import add_agreement, heldout_metrics, load_reward_tasks, sum_over_ranks
from picochat.train.settings import RLOptions, flag_fields

HELDOUT_TASKS = ("arithmetic", "spelling")  # offline test problems: the held-out monitor needs no network


@dataclass
class RLBatch:
    """A loader Batch (data/loader.py: inputs, targets, tokens, metrics) plus what policy_loss needs."""
    inputs: torch.Tensor              # (b, L) input ids
    targets: torch.Tensor             # (b, L) next tokens; -1 where the model did not sample it
    weight: torch.Tensor              # (b, L) advantage x normalisation per target (0 where targets == -1)
    tokens: int = 0                   # its rows' reply budget (what the schedule counts; metrics: the sampled)
    metrics: dict = field(default_factory=dict)  # its rollout's, for the run history
    ref_logp: torch.Tensor | None = None  # (b, L) the reference model's log p(targets), for the KL term
    kl_weight: float = 0.0            # kl_coef x normalisation


def group_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """rewards (n*k,), consecutive groups of k samples of one prompt -> reward minus its group mean."""
    r = rewards.view(-1, k)
    return (r - r.mean(dim=1, keepdim=True)).view(-1)


def policy_loss(model, batch: RLBatch) -> torch.Tensor:
    """sum of weight x (-log p(y)) over sampled tokens, + kl_weight x the k3 estimate of
    KL(policy || reference) (exp(d) - d - 1 with d = log p_ref - log p: >= 0, unbiased)."""
    nll = model(batch.inputs, batch.targets, loss_reduction="none").view_as(batch.targets)  # 0 where no target
    loss = (batch.weight * nll).sum()
    if batch.ref_logp is not None and batch.kl_weight:
        d = torch.where(batch.targets >= 0, batch.ref_logp + nll, 0.0)
        loss = loss + batch.kl_weight * (d.exp() - d - 1).sum()
    return loss


def rollout_batches(traces: list[tuple[list[int], list[bool]]], advantages: torch.Tensor, rows: int,
                    scale: float, device, pad_id: int = 0) -> list[RLBatch]:
    """Rows (ids, sampled-mask) -> micro-batches of `rows` rows, right-padded to their longest row;
    weight = advantage x scale on the tokens the model sampled."""
    out = []
    for a in range(0, len(traces), rows):
        chunk = [(torch.tensor(ids, dtype=torch.long), torch.tensor(sampled)) for ids, sampled in traces[a:a + rows]]
        x = pad_sequence([ids[:-1] for ids, _ in chunk], batch_first=True, padding_value=pad_id)
        y = pad_sequence([torch.where(sampled[1:], ids[1:], -1) for ids, sampled in chunk], batch_first=True,
                         padding_value=-1)
        w = (y >= 0) * (advantages[a:a + rows, None].float() * scale)
        out.append(RLBatch(x.to(device), y.to(device), w.to(device)))
    return out


def row_seed(seed: int, rollout: int, prompt: int, sample: int) -> int:
    """Sample `sample` of global prompt `prompt` in rollout `rollout`: the same under any sharding."""
    return stable_hash(f"rl/{seed}/{rollout}/{prompt}/{sample}") % 2**31


class RolloutLoader:
    """The RL stage's loader: each optimizer step's grad_accum micro-batches come from one rollout.
    State: {"rollouts": n}, the rollouts generated so far (a step consumes exactly one)."""

    def __init__(self, model, tok, tasks, weights, opts: RLOptions, rank: int, world: int, grad_accum: int,
                 device, state: dict | None = None, seed: int = 0, ref_model=None, log_every: int = 1):
        self.model, self.tok, self.tasks, self.opts = model, tok, tasks, opts
        self.rank, self.world, self.grad_accum, self.device = rank, world, grad_accum, device
        self.engine = Engine(model, tok)
        self.mixture = TaskMixture(tasks, weights, seed=seed)  # only its (seed, i) -> (task, item) draw
        self.seed, self.ref_model, self.log_every = seed, ref_model, log_every
        self.rollouts = int((state or {}).get("rollouts", 0))
        self._queue: list[RLBatch] = []

    def __iter__(self):
        return self

    def __next__(self) -> RLBatch:
        if not self._queue:
            self._queue = self._rollout()
        return self._queue.pop(0)

    def state_dict(self) -> dict:
        return {"rollouts": self.rollouts}

    @staticmethod
    def merge_states(states: list[dict]) -> dict:
        return states[0]  # every rank has done the same rollouts

    def close(self) -> None:
        pass

    def _rollout(self) -> list[RLBatch]:
        o, P, K = self.opts, self.opts.prompts, self.opts.samples
        mine = list(range(self.rank, P, self.world))
        picks, prompts, seeds = [], [], []
        for p in mine:
            t, j = self.mixture.pick(self.rollouts * P + p)
            ex = self.tasks[t].examples[j]
            ids = self.tok.render_for_completion({"messages": self.tasks[t].chat_prompt(ex)})
            picks.append((self.tasks[t], ex))
            prompts += [ids] * K
            seeds += [row_seed(self.seed, self.rollouts, p, k) for k in range(K)]
        self.model.eval()
        t0 = time.perf_counter()
        traces: list = []
        replies = generate_replies(self.engine, self.tok, prompts, o.max_new_tokens,
                                   Sampling(o.temperature, o.top_k or None, seed=seeds), traces=traces)
        gen_s = time.perf_counter() - t0
        self.model.train()
        rewards = torch.tensor([task.reward(ex, r.text) for g, (task, ex) in enumerate(picks)
                                for r in replies[g * K:(g + 1) * K]])
        adv = group_advantages(rewards, K)
        metrics = self._step_metrics(picks, replies, rewards, adv, gen_s)
        n_tokens = metrics["tokens"]
        # DDP averages gradients over ranks and the loop divides by grad_accum: undo both so the
        # update is sum(adv x grad log p) / (sampled tokens in the global batch)
        scale = self.grad_accum * self.world / n_tokens
        rows = len(traces) // self.grad_accum
        batches = rollout_batches(traces, adv, rows, scale, self.device, self.tok.pad_token_id)
        for b in batches:
            b.tokens, b.metrics = len(b.inputs) * o.max_new_tokens, metrics
        if self.ref_model is not None and o.kl_coef:
            with torch.no_grad(), autocast_ctx(self.device):
                for b in batches:
                    b.ref_logp = -self.ref_model(b.inputs, b.targets, loss_reduction="none").view_as(b.targets).float()
                    b.kl_weight = o.kl_coef * scale
        self.rollouts += 1
        if self.rollouts % self.log_every == 0:
            m = metrics
            tasks = " ".join(f"{t.name} {m[f'pass_{t.name}']:.2f}" for t in self.tasks if f"pass_{t.name}" in m)
            agree = f", calc agree {m['calc_agree']:.2f}" if "calc_agree" in m else ""
            print0(f"rl rollout {self.rollouts}: reward {m['reward']:.3f} ({tasks}), reply {m['response_len']:.1f} "
                   f"tokens{agree}, {m['live_groups']:.0%} groups with signal, rollout {m['rollout_tok_per_s']:,.0f} "
                   f"tok/s")
        return batches

    def _step_metrics(self, picks, replies, rewards, adv, gen_s) -> dict:
        """This rollout's metrics over all ranks; "tokens": the sampled tokens of the global batch."""
        K = self.opts.samples
        s = dict.fromkeys(["tokens", "rows", "reward", "groups", "live", "calls", "agree", "tok_rate"]
                          + [f"{t.name}/{x}" for t in self.tasks for x in ("n", "ok")], 0.0)
        s["tokens"] += sum(r.tokens for r in replies)
        s["tok_rate"] += s["tokens"] / max(gen_s, 1e-9)  # summed over ranks: the job's rollout rate
        s["rows"] += len(replies)
        s["reward"] += float(rewards.sum())
        for g, (task, _) in enumerate(picks):
            s["groups"] += 1
            s["live"] += bool(adv[g * K:(g + 1) * K].abs().sum() > 0)
            s[f"{task.name}/n"] += K
            s[f"{task.name}/ok"] += float(rewards[g * K:(g + 1) * K].sum())
        add_agreement(s, replies)
        v = sum_over_ranks(s, self.device)
        m = {"tokens": max(1.0, v["tokens"]), "reward": v["reward"] / max(1.0, v["rows"]),
             "response_len": v["tokens"] / max(1.0, v["rows"]), "rollout_tok_per_s": v["tok_rate"],
             "live_groups": v["live"] / max(1.0, v["groups"])}
        for t in self.tasks:
            if v[f"{t.name}/n"]:
                m[f"pass_{t.name}"] = v[f"{t.name}/ok"] / v[f"{t.name}/n"]
        if v["calls"]:
            m["calc_agree"] = v["agree"] / v["calls"]
        return m


def options_from_args(args) -> RLOptions:
    """RLOptions from `picochat train rl` flags, checked before any model or data is loaded."""
    from picochat.eval.cli import parse_data_files
    from picochat.train.rewards import check_reward_tasks, parse_task_specs
    specs = parse_task_specs(args.tasks)
    names = [n for n, _ in specs]
    check_reward_tasks(names)
    if args.total_batch_size != -1:
        raise PicochatError("train rl sizes its batch by --prompts-per-step x --samples-per-prompt; "
                            "drop --total-batch-size (use --device-batch-size for micro-batches)")
    return RLOptions(tasks=[f"{n}={w:g}" for n, w in specs], data_files=parse_data_files(args.data_file, names),
                     **{f.name: getattr(args, flag[2:].replace("-", "_")) for flag, f in flag_fields(RLOptions)})


def train_rl(args) -> dict:
    """The `picochat train rl` command: set up (fresh or --resume), run the loop, report."""
    from picochat import checkpoint as ck
    from picochat.tasks import make_eval_task, parse_weighted
    from picochat.train.loop import finish_stage, run_training, start_stage
    from picochat.train.settings import settings_from_args

    t0 = time.time()

    def fresh(tag, device, info):
        opts = options_from_args(args)
        opts.validate(info.world_size)
        model, source = ck.load_model(args.model, device=device)
        if source.meta.get("stage") == "base":
            raise PicochatError(f"{args.model} is a base model: RL needs a chat model that answers in the chat "
                                f"format (train mid and sft on it first, then train rl --model sft/...)")
        tok = ck.load_tokenizer(args.model)
        rows = opts.prompts * opts.samples // info.world_size
        args.device_batch_size = args.device_batch_size or rows
        if rows % args.device_batch_size:
            raise PicochatError(f"--device-batch-size {args.device_batch_size} must divide the {rows} rollout rows "
                                f"per process (prompts-per-step x samples-per-prompt / processes)")
        args.total_batch_size = opts.prompts * opts.samples * opts.max_new_tokens
        settings = settings_from_args(args, "rl", tag, opts.max_new_tokens,
                                      {"source": args.model, "source_step": source.step, "rl": asdict(opts)})
        return settings, model, tok

    stage = start_stage(args, "rl/" + args.model.split("/")[-1], fresh)
    settings, model, tok, device, info = stage.settings, stage.model, stage.tok, stage.device, stage.dist
    opts = RLOptions(**settings.extra["rl"])
    opts.validate(info.world_size)
    if settings.compile != "off":
        raise PicochatError("train rl runs uncompiled: rollout rows change length every step")
    specs = [parse_weighted(s) for s in opts.tasks]
    tasks = load_reward_tasks([n for n, _ in specs], opts.data_files or {}, opts.task_size)
    ref_model = ck.load_model(settings.extra["source"], device=device)[0] if opts.kl_coef else None
    heldout = [make_eval_task(n, limit=opts.eval_limit) for n, _ in specs if n in HELDOUT_TASKS] \
        if opts.eval_limit else []
    monitor = Engine(model, tok)

    def eval_fn() -> dict:
        if not heldout:
            return {}
        model.eval()
        try:
            return heldout_metrics(monitor, tok, heldout, info.rank, info.world_size)
        finally:
            model.train()

    if stage.resume is None and heldout:
        settings.extra["heldout_before"] = eval_fn()
        print0(f"held-out before RL ({args.model}): {_fmt(settings.extra['heldout_before'])}")

    def make_loader(state):
        return RolloutLoader(model, tok, tasks, [w for _, w in specs], opts, info.rank, info.world_size,
                             stage.grad_accum, device, state, seed=settings.seed, ref_model=ref_model,
                             log_every=settings.log_every)

    def report(summary: dict, wall_s: float) -> None:
        after = {k: v for k, v in summary["history"][-1].items() if k.startswith("heldout_")}
        if after and summary["step"] >= settings.steps:
            print(f"held-out after RL ({settings.tag}): {_fmt(after)}")
        print(f"wall time {wall_s:.1f}s, {100 * summary['data_wait_share']:.0f}% of step time in rollouts")

    summary = run_training(stage, make_loader, loss_fn=policy_loss, eval_fn=eval_fn, stop_after=args.stop_after,
                           wandb_project=args.wandb)
    finish_stage(stage, summary, time.time() - t0, report)
    return summary


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k.removeprefix('heldout_')} {100 * v:.1f}%" for k, v in metrics.items())
