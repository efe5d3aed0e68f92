"""ONE training loop for base, mid, SFT and RL: accumulation, schedule, compile, checkpointing, DDP.

A `picochat train` command reads top to bottom: start_stage (device, torchrun, --resume or a fresh
tag) gives a Stage (settings, model, tokenizer, device); run_training trains it; finish_stage
reports and tears torchrun down. The stages differ only in the model they start from and the
loader they feed: every loader yields Batches (data/loader.py: inputs, targets with -1 where no
loss is wanted, the tokens they count, optional metrics for the history) and has state_dict(),
merge_states() and close(). RL (train/rl.py) adds two hooks: a `loss_fn` that turns its batches
(which also carry per-token advantages) into the policy-gradient loss, and an `eval_fn` that adds
held-out metrics at eval points; its batches' metrics (rewards, rollout speed) join the history.
Resume is exact: weights, optimizer moments, loader position, step and metric history all come
back from the checkpoint.

Performance knobs (docs/performance.md has the measurements): `compile` (torch.compile modes,
see compile_model for what each costs and the CPU fallbacks), `grad_checkpoint` (per-block
recomputation), and the loader's background workers; the loop measures how long each step
waits for its batches and reports that share ("data_wait") in the history and the summary.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from tqdm import tqdm

from picochat import checkpoint as ckpt_mod
from picochat.data.loader import Batch
from picochat.common import DistInfo, PicochatError, print0
from picochat.device import autocast_ctx, init_distributed, pick_device
from picochat.eval.bpb import evaluate_bpb, token_byte_lengths
from picochat.model.gpt import GPT
from picochat.train.optim import apply_schedule, build_optimizers
from picochat.train.settings import TrainSettings

CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile records CUDA graphs in these


def effective_compile_mode(mode: str, device: torch.device) -> tuple[str, str]:
    """(the mode that will actually run on `device`, why it differs or ""): the documented fallbacks."""
    if mode == "off" or device.type == "cuda":
        return mode, ""
    if device.type != "cpu":  # MPS & co: inductor training support is experimental; eager is safe
        return "off", f"torch.compile training is not supported on {device.type}"
    if not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c):
        # inductor's CPU backend generates C++; without a compiler it would fail at the first step
        return "off", "no C++ compiler found for inductor's CPU backend"
    # CUDA graphs exist only on CUDA: keep the rest of the mode, drop the graphs
    cpu_mode = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}.get(mode, mode)
    return cpu_mode, "" if cpu_mode == mode else "CUDA graphs need CUDA"


def compile_model(model: torch.nn.Module, mode: str, device: torch.device) -> torch.nn.Module:
    """torch.compile with static shapes (dynamic=False: every step has the same (B, T), which is what
    CUDA graphs need and lets inductor specialise kernels); falls back as effective_compile_mode says."""
    run_mode, why = effective_compile_mode(mode, device)
    if why:
        print0(f"note: --compile {mode} on {device.type}: {why}; using {run_mode}")
    if run_mode == "off":
        return model
    return torch.compile(model, mode=None if run_mode == "default" else run_mode, dynamic=False)


def lm_loss(model, batch: Batch) -> torch.Tensor:
    """The default loss: cross-entropy of the targets (-1: no loss), the model's own forward."""
    return model(batch.inputs, batch.targets)


@dataclass
class Stage:
    """A run ready to train, fresh or resumed: what start_stage returns and run_training takes."""
    settings: TrainSettings
    model: GPT
    tok: Any                              # the tokenizer: val bytes per token, stored with every checkpoint
    device: torch.device
    dist: DistInfo = field(default_factory=lambda: DistInfo(False, 0, 0, 1))  # torchrun's ranks; one process
    resume: ckpt_mod.Checkpoint | None = None  # the checkpoint to continue (--resume)

    def __post_init__(self):
        self.grad_accum = self.settings.validate(self.dist.world_size)  # the CLI checked before building anything


def run_training(stage: Stage, make_loader: Callable[[dict | None], Iterator[Batch]], val_loader=None,
                 loss_fn=lm_loss, eval_fn=None, stop_after=None, wandb_project=None, save_checkpoints=True) -> dict:
    """Train stage.model in place for settings.steps optimizer steps; returns a summary dict.

    make_loader(saved loader state or None) -> the loader (Batches; state_dict, merge_states, close).
    val_loader() -> Batches for val bits-per-byte at every eval point (None: no val data).
    loss_fn(train_model, batch) -> scalar loss; eval_fn() -> {metric: value} logged at every eval point
    (every rank calls it). wandb_project: log the history to Weights & Biases (optional dependency).
    save_checkpoints=False: save nothing (benchmarks); the history is in the returned summary."""
    settings, model, device, info, grad_accum = stage.settings, stage.model, stage.device, stage.dist, stage.grad_accum
    model.grad_checkpoint = settings.grad_checkpoint
    optimizers = build_optimizers(model, settings.matrix_lr, settings.embedding_lr, settings.unembedding_lr,
                                  settings.weight_decay)
    step, history, loader_state, train_time = 0, [], None, 0.0
    if stage.resume is not None:
        ckpt_mod.load_optimizer_state(stage.resume, optimizers)
        step = stage.resume.step
        loader_state = stage.resume.state.get("loader")
        history = stage.resume.state.get("history", [])
        train_time = stage.resume.state.get("train_time", 0.0)
        print0(f"resuming {settings.tag} from step {step}")
    token_bytes = token_byte_lengths(stage.tok, device) if val_loader else None
    loader = make_loader(loader_state)
    try:
        session_time = data_wait = 0.0
        train_model = compile_model(model, settings.compile, device)
        # CUDA graphs replay into fixed output buffers: tell the graph tree where each step begins
        mark_step = device.type == "cuda" and settings.compile in CUDAGRAPH_MODES
        if info.enabled:
            train_model = torch.nn.parallel.DistributedDataParallel(
                train_model, device_ids=[device.index] if device.type == "cuda" else None)
        tokens_per_step = settings.device_batch_size * settings.seq_len * info.world_size * grad_accum
        # tokens the batches count (Batch.tokens): SFT pads each batch only to its longest row, so its
        # steps hold fewer than rows x seq_len (base and mid always hold exactly that many)
        seen = stage.resume.meta.get("tokens", step * tokens_per_step) if stage.resume is not None else 0
        session_start = seen
        end = settings.steps if stop_after is None else min(settings.steps, stop_after)
        val_bpb = None

        def evaluate() -> None:
            """One history entry: val bpb (None without val data) and eval_fn's metrics."""
            nonlocal val_bpb
            entry = {"step": step, "val_bpb": None}
            if val_loader is not None:
                val_xy = ((b.inputs, b.targets) for b in val_loader())
                entry["val_bpb"] = evaluate_bpb(model, val_xy, token_bytes, max_batches=settings.eval_batches)
            if eval_fn is not None:
                entry.update(eval_fn())
            history.append(entry)
            val_bpb = entry["val_bpb"]

        def save(at_step: int) -> None:
            if not save_checkpoints:
                return
            states = [loader.state_dict()]
            if info.enabled:
                states = [None] * info.world_size
                dist.all_gather_object(states, loader.state_dict())
            if not info.is_master:
                return
            state = {"loader": loader.merge_states(states), "history": history, "train_time": train_time}
            meta = dict(tokenizer_vocab=stage.tok.vocab_size, stage=settings.stage, settings=asdict(settings),
                        val_bpb=val_bpb, tokens=seen, train_time=train_time, num_params=model.num_params(),
                        world_size=info.world_size, device=str(device.type))
            ckpt_mod.save_checkpoint(settings.tag, at_step, model, model.config, meta, optimizers, state,
                                     keep=settings.keep, tokenizer=stage.tok)

        log = _wandb_logger(wandb_project, settings) if info.is_master else None
        print0(f"{settings.stage}: {model.num_params():,} params, {settings.steps} steps x {tokens_per_step:,} tokens max "
               f"(grad accum {grad_accum}, world {info.world_size}), tag {settings.tag}")
        model.train()
        bar = tqdm(total=end, initial=step, desc=settings.stage, disable=not info.is_master, dynamic_ncols=True)
        smooth = None
        while step < end:
            if settings.eval_every and step % settings.eval_every == 0 and step > 0:
                evaluate()
                if log:
                    log(history[-1])
            t0 = time.perf_counter()
            mult = apply_schedule(optimizers, step, settings.steps, warmup_ratio=settings.warmup_ratio,
                                  warmdown_ratio=settings.warmdown_ratio, final_lr_frac=settings.final_lr_frac)
            total = torch.zeros((), device=device)
            wait, step_tokens = 0.0, 0
            for micro in range(grad_accum):
                tw = time.perf_counter()
                batch = next(loader)
                wait += time.perf_counter() - tw
                step_tokens += batch.tokens * info.world_size
                if mark_step:
                    torch.compiler.cudagraph_mark_step_begin()
                sync = micro == grad_accum - 1 or not info.enabled
                ctx = train_model.no_sync() if not sync else contextlib.nullcontext()
                with ctx, autocast_ctx(device):
                    loss = loss_fn(train_model, batch) / grad_accum
                    loss.backward()
                total += loss.detach()
            for opt in optimizers:
                opt.step()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            if info.enabled:
                dist.all_reduce(total, op=dist.ReduceOp.AVG)
            loss_val = total.item()  # also a sync point, so the timing below is real
            if not math.isfinite(loss_val):
                raise PicochatError(f"loss became {loss_val} at step {step}; lower the learning rates")
            dt = time.perf_counter() - t0
            train_time += dt
            session_time += dt
            data_wait += wait
            step += 1
            seen += step_tokens
            smooth = loss_val if smooth is None else 0.9 * smooth + 0.1 * loss_val
            if step % settings.log_every == 0 or step == end:
                # what the step did, from its last batch; RL's "tokens" are the ones it really sampled
                metrics = dict(batch.metrics)
                tokens = metrics.pop("tokens", step_tokens)
                history.append({"step": step, "loss": loss_val, "lr_mult": mult, "tok_per_s": tokens / dt,
                                "time": train_time, "data_wait": wait / dt, **metrics})
                if log:
                    log(history[-1])
            bar.update(1)
            bar.set_postfix(loss=f"{smooth:.3f}", tok_s=f"{step_tokens / dt:,.0f}")
            if settings.save_every and step % settings.save_every == 0 and step < end:
                save(step)
        bar.close()
        if step >= settings.steps:
            evaluate()
        if log:
            log(history[-1])
        save(step)
    finally:
        loader.close()  # stop background workers, also when training fails
    if val_bpb is not None:
        print0(f"{settings.stage} done: step {step}, val bpb {val_bpb:.4f}, {train_time:.1f}s training")
    return {"step": step, "loss": smooth, "val_bpb": val_bpb, "train_time": train_time,
            "tokens": seen, "tok_per_s": (seen - session_start) / max(session_time, 1e-9),
            "data_wait_share": data_wait / max(session_time, 1e-9), "history": history,
            "optimizer_state_bytes": sum(t.numel() * t.element_size() for opt in optimizers
                                         for st in opt.state.values() for t in st.values() if torch.is_tensor(t))}


def start_stage(args, default_tag: str, fresh) -> Stage:
    """What every stage starts with: the device, torchrun, then either --resume (the run under --tag: its
    settings, except that --compile and --grad-checkpoint apply when given again, its model and tokenizer)
    or a fresh run under --tag or `default_tag`: fresh(tag, device, info) -> (settings, model, tokenizer).
    The model is in training mode."""
    device = pick_device(args.device)
    info = init_distributed(device)
    resume = None
    if args.resume:
        if not args.tag:
            raise PicochatError("--resume needs --tag (the run to continue)")
        resume = ckpt_mod.read_checkpoint(args.tag)
        settings = TrainSettings(**resume.meta["settings"])
        if args.compile is not None:
            settings.compile = args.compile
        if args.grad_checkpoint:
            settings.grad_checkpoint = True
        model, _ = ckpt_mod.load_model(args.tag, device=device)
        tok = ckpt_mod.load_tokenizer(args.tag)
    else:
        tag = args.tag or default_tag
        # a fresh run must not silently mix into an existing run's checkpoints
        if (ckpt_mod.tag_dir(tag) / "latest").exists() and not args.overwrite:
            raise PicochatError(f"tag {tag} already has checkpoints; pass --resume to continue it or --overwrite to "
                                "start over")
        settings, model, tok = fresh(tag, device, info)
    model.train()
    return Stage(settings, model, tok, device, info, resume)


def finish_stage(stage: Stage, summary: dict, wall_s: float, report=None) -> None:
    """Every stage's tail: the closing lines on rank 0 (report(summary, wall_s); default: speed and
    data waits), torchrun's teardown."""
    if stage.dist.is_master:
        (report or _report_speed)(summary, wall_s)
    if stage.dist.enabled:
        # every rank reaches teardown before any closes its connections: a gloo peer closed while
        # another still talks aborted rank 1 ("terminate called without an active exception") once
        # in three suite runs on a loaded machine
        dist.barrier()
        dist.destroy_process_group()


def _report_speed(summary: dict, wall_s: float) -> None:
    print(f"wall time {wall_s:.1f}s, {summary['tok_per_s']:,.0f} tokens/s, "
          f"{100 * summary['data_wait_share']:.1f}% of step time waiting for data")


def _wandb_logger(project: str | None, settings: TrainSettings):
    if not project:
        return None
    try:
        import wandb
    except ImportError:
        raise PicochatError("--wandb needs the wandb package: pip install 'picochat[wandb]'") from None
    run = wandb.init(project=project, name=settings.tag, config=asdict(settings))
    return lambda entry: run.log({k: v for k, v in entry.items() if k != "step"}, step=entry["step"])
