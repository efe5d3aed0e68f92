"""`picochat train base|mid|sft|rl`: each stage's flags, its setup (model, tokenizer, resume, loaders)
and the call into the one training loop (train/loop.py; RL's stage lives in train/rl.py).

    picochat train base --depth 4                       pretraining (also under torchrun)
    picochat train base --depth 4 --arch nanochat-2026  nanochat's 2026 design
    picochat train mid --model base/d4                  packed chat-format conversations
    picochat train sft --model mid/d4                   whole conversations, loss on assistant tokens
    picochat train rl --model sft/d4                    RL on verifiable rewards (docs/rl.md)

Wired into the main CLI through `register(subparsers)` (picochat/cli.py's COMMAND_MODULES).
"""
from __future__ import annotations

import time

from picochat.common import THREADS_HELP, PicochatError
from picochat.common import nonneg_float as _nonneg_float
from picochat.common import nonneg_int as _nonneg_int
from picochat.common import positive_int as _positive_int


def add_train_flags(p, stage: str):
    p.add_argument("--tag", help=f"checkpoint tag to write (default {stage}/d<depth>)")
    p.add_argument("--steps", type=_positive_int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--device-batch-size", type=_positive_int, default=8, help="rows per micro-batch per process (default 8)")
    p.add_argument("--total-batch-size", type=int, default=-1,
                   help="tokens per optimizer step; a multiple of device_batch x seq_len x processes; the rest is "
                        "made up by gradient accumulation (default -1: one micro-batch per process)")
    p.add_argument("--matrix-lr", type=_nonneg_float, default=0.02, help="Muon learning rate for hidden matrices (default 0.02)")
    p.add_argument("--embedding-lr", type=_nonneg_float, default=0.2, help="AdamW lr for the token embedding (default 0.2, scaled by width)")
    p.add_argument("--unembedding-lr", type=_nonneg_float, default=0.004, help="AdamW lr for lm_head (default 0.004, scaled by width)")
    p.add_argument("--weight-decay", type=_nonneg_float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--warmup-ratio", type=_nonneg_float, default=0.0, help="fraction of steps with linear lr warmup (default 0)")
    p.add_argument("--warmdown-ratio", type=_nonneg_float, default=0.2, help="fraction of steps with linear lr decay at the end (default 0.2)")
    p.add_argument("--eval-every", type=_nonneg_int, default=100, help="steps between val bits-per-byte evals; 0 = only at the end (default 100)")
    p.add_argument("--eval-batches", type=_positive_int, default=8, help="val batches per eval (default 8)")
    p.add_argument("--save-every", type=_nonneg_int, default=0, help="steps between checkpoints; 0 = only at the end (default 0)")
    p.add_argument("--log-every", type=_positive_int, default=10, help="steps between loss entries in the run history (default 10)")
    p.add_argument("--keep", type=_positive_int, default=2, help="checkpoints kept per tag (default 2)")
    p.add_argument("--compile", default=None, help=COMPILE_HELP)
    p.add_argument("--grad-checkpoint", action="store_true", default=None, help="recompute each block's activations "
                   "in backward (torch.utils.checkpoint, non-reentrant): less activation memory, ~1 extra forward of "
                   "compute. With --resume, --compile and --grad-checkpoint apply to the rest of the run (they change "
                   "how it trains, not what); every other setting comes from the checkpoint")
    from picochat.data.workers import default_workers
    p.add_argument("--loader-workers", type=_nonneg_int, default=None, help="background processes that tokenize "
                   "training data (0 = in the training process); default: available cores minus one, split across "
                   f"torchrun ranks, at most 8 (here {default_workers()})")
    p.add_argument("--tokenizer-batch-size", type=_positive_int, default=None, help="documents tokenized per "
                   "request (default 64 for base, 32 conversations for mid; does not change the token stream)")
    p.add_argument("--threads", type=_positive_int, default=None, help=THREADS_HELP)
    p.add_argument("--prefetch", type=_positive_int, default=4, help="ready batches queued ahead per process when "
                   "--loader-workers > 0 (default 4)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N|mps (default auto)")
    p.add_argument("--seed", type=int, default=0, help="seed for weight init (default 0)")
    p.add_argument("--wandb", metavar="PROJECT", default=None, help="log to Weights & Biases under PROJECT (off by default)")
    p.add_argument("--resume", action="store_true", help="continue the run saved under --tag exactly where it stopped")
    p.add_argument("--overwrite", action="store_true", help="start fresh even if --tag already has checkpoints")
    p.add_argument("--stop-after", type=_positive_int, help="stop (and checkpoint) after this many steps without changing "
                   "the schedule; continue later with --resume")


COMPILE_HELP = (
    "torch.compile mode: off | default (fused kernels) | reduce-overhead (default + CUDA graphs: replays the "
    "step with almost no launch overhead, but the graphs' private memory pool keeps the step's activations "
    "and workspaces alive between steps, about one extra copy of activation memory per distinct batch shape; "
    "shapes are therefore static: fixed batch and --seq-len, SFT rows padded to --seq-len) | max-autotune "
    "(also tunes kernels at startup, minutes; CUDA graphs too) | max-autotune-no-cudagraphs. On CPU the "
    "CUDA-graph modes drop only the graphs (reduce-overhead -> default, max-autotune -> "
    "max-autotune-no-cudagraphs); without a C++ compiler, or on MPS, training runs uncompiled with a note "
    "(default off)")


def loader_kwargs(args, tokenizer_batch: int) -> dict:
    """Background-loader options shared by every training command (none of them changes the data)."""
    from picochat.data.workers import default_workers
    workers = default_workers() if args.loader_workers is None else args.loader_workers
    return {"workers": workers, "tokenizer_batch": args.tokenizer_batch_size or tokenizer_batch,
            "prefetch": args.prefetch}


def settings_from_args(args, stage: str, tag: str, seq_len: int, extra: dict):
    from picochat.train.loop import TrainSettings
    return TrainSettings(
        stage=stage, tag=tag, steps=args.steps, device_batch_size=args.device_batch_size, seq_len=seq_len,
        total_batch_size=args.total_batch_size, matrix_lr=args.matrix_lr, embedding_lr=args.embedding_lr,
        unembedding_lr=args.unembedding_lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
        warmdown_ratio=args.warmdown_ratio, eval_every=args.eval_every, eval_batches=args.eval_batches,
        save_every=args.save_every, log_every=args.log_every, keep=args.keep, compile=args.compile or "off",
        grad_checkpoint=bool(args.grad_checkpoint), seed=args.seed, extra=extra)


def resume_settings(resume, args):
    """The checkpoint's settings, except the execution knobs given again on the command line."""
    from picochat.train.loop import TrainSettings
    settings = TrainSettings(**resume.meta["settings"])
    if args.compile is not None:
        settings.compile = args.compile
    if args.grad_checkpoint:
        settings.grad_checkpoint = True
    return settings


def resume_run(args, device):
    """--resume of a run started from another checkpoint (mid, sft, rl): the checkpoint under --tag,
    its settings, its model and its tokenizer."""
    from picochat import checkpoint as ck
    if not args.tag:
        raise PicochatError("--resume needs --tag (the run to continue)")
    resume = ck.read_checkpoint(args.tag)
    model, _ = ck.load_model(args.tag, device=device)
    return resume, resume_settings(resume, args), model, ck.load_tokenizer(args.tag)


def run_stage(args, model, settings, make_loader, val_batches, tok, device, info, resume, t0: float) -> None:
    """The shared tail of every training command: run the loop, report, tear down torchrun."""
    import torch
    from picochat.eval.bpb import token_byte_lengths
    from picochat.train.loop import run_training
    summary = run_training(model, settings, make_loader, device, info, val_batches=val_batches,
                           token_bytes=token_byte_lengths(tok, device), resume=resume, stop_after=args.stop_after,
                           base_meta={"tokenizer_vocab": tok.vocab_size}, wandb_project=args.wandb, tokenizer=tok)
    if info.is_master:
        print(f"wall time {time.time() - t0:.1f}s, {summary['tok_per_s']:,.0f} tokens/s, "
              f"{100 * summary['data_wait_share']:.1f}% of step time waiting for data")
    if info.enabled:
        torch.distributed.destroy_process_group()


def cmd_train_base(args):
    import torch
    from picochat import checkpoint as ck
    from picochat.common import data_dir, tokenizer_dir
    from picochat.device import init_distributed, pick_device
    from picochat.data.corpus import list_shards
    from picochat.data.loader import PretrainLoader
    from picochat.model.config import config_from_depth
    from picochat.model.gpt import GPT
    from picochat.tokenizer import Tokenizer

    t0 = time.time()
    device = pick_device(args.device)
    info = init_distributed(device)
    tag = args.tag or f"base/d{args.depth}"
    resume = None
    if args.resume:
        tok = ck.load_tokenizer(tag)
        resume = ck.read_checkpoint(tag)
        settings = resume_settings(resume, args)
        model, _ = ck.load_model(tag, device=device)
        model.train()
    else:
        if (ck.tag_dir(tag) / "latest").exists() and not args.overwrite:
            raise PicochatError(f"tag {tag} already has checkpoints; pass --resume to continue it or --overwrite to start over")
        tok = Tokenizer.load(tokenizer_dir())
        settings = settings_from_args(args, "base", tag, args.seq_len, {"data": args.data})
        settings.validate(info.world_size)
        config = config_from_depth(args.depth, tok.vocab_size, args.seq_len, attention=args.attention,
                                   n_kv_head=args.n_kv_head, kv_lora_rank=args.kv_lora_rank,
                                   qk_rope_head_dim=args.qk_rope_head_dim, q_lora_rank=args.q_lora_rank,
                                   arch=args.arch)
        torch.manual_seed(args.seed)
        model = GPT(config).to(device)
        model.init_weights()
    grad_accum = settings.validate(info.world_size)
    B, T = settings.device_batch_size, settings.seq_len
    data = data_dir(settings.extra["data"])
    list_shards(data, "train")  # clear error if the corpus is missing

    def make_loader(state):
        return PretrainLoader(data, tok, B, T, "train", info.rank, info.world_size, grad_accum, state, device=device,
                              **loader_kwargs(args, 64))

    def val_batches():
        return PretrainLoader(data, tok, B, T, "val", info.rank, info.world_size, 1, None, device=device)

    run_stage(args, model, settings, make_loader, val_batches, tok, device, info, resume, t0)


def cmd_train_chat(args):
    """Midtraining (packed conversations, all tokens) or SFT (padded, assistant tokens only)."""
    from picochat import checkpoint as ck
    from picochat.device import init_distributed, pick_device
    from picochat.data.chat_loader import MidLoader, SFTLoader
    from picochat.tasks import build_mixture

    t0 = time.time()
    stage = args.stage
    device = pick_device(args.device)
    info = init_distributed(device)
    resume = None
    if args.resume:
        resume, settings, model, tok = resume_run(args, device)
    else:
        model, source = ck.load_model(args.model, device=device)
        tok = ck.load_tokenizer(args.model)  # the model's own: an imported model keeps its tokenizer
        tag = args.tag or f"{stage}/" + args.model.split("/")[-1]
        if (ck.tag_dir(tag) / "latest").exists() and not args.overwrite:
            raise PicochatError(f"tag {tag} already has checkpoints; pass --resume to continue it or --overwrite to start over")
        settings = settings_from_args(args, stage, tag, args.seq_len or model.config.sequence_len,
                             {"source": args.model, "source_step": source.step,
                              "tasks": args.tasks.split(",") if args.tasks else [], "data": args.data or [],
                              "task_size": args.task_size})
        settings.validate(info.world_size)
    model.train()
    extra = settings.extra
    mixture = build_mixture(extra["tasks"], extra["data"], "train", extra["task_size"], seed=settings.seed)
    offline = [t for t in extra["tasks"] if t.split("=")[0] in ("spelling", "arithmetic")]
    val_mixture = build_mixture(offline, [], "test", 500, seed=settings.seed + 1) if offline else None
    grad_accum = settings.validate(info.world_size)
    B, T = settings.device_batch_size, settings.seq_len

    def make_loader(state):
        kw = loader_kwargs(args, 32)
        if stage == "mid":
            return MidLoader(mixture, tok, B, T, info.rank, info.world_size, grad_accum, state, device=device, **kw)
        # compiled training wants one static shape: pad every SFT row to T (loss unchanged)
        return SFTLoader(mixture, tok, B, T, info.rank, info.world_size, grad_accum, state, device=device,
                         workers=kw["workers"], prefetch=kw["prefetch"], pad_to=T if settings.compile != "off" else None)

    def val_batches():
        return SFTLoader(val_mixture, tok, B, T, info.rank, info.world_size, 1, None, device=device)

    run_stage(args, model, settings, make_loader, val_batches if val_mixture is not None else None, tok, device, info,
         resume, t0)


def cmd_train_rl(args):
    """Reinforcement learning on verifiable rewards (train/rl.py): rollouts graded by the eval graders."""
    from picochat.train.rl import train_rl
    train_rl(args)


def register(sub) -> None:
    train = sub.add_parser("train", help="training stages").add_subparsers(dest="stage", required=True)
    p = train.add_parser("base", help="pretrain a GPT on the prepared corpus")
    p.add_argument("--depth", type=_positive_int, default=4, help="number of layers; width = 64 x depth (default 4)")
    p.add_argument("--seq-len", type=_positive_int, default=256, help="context length in tokens (default 256)")
    p.add_argument("--attention", default="mha", choices=["mha", "gqa", "mla"], help="attention variant (default mha)")
    p.add_argument("--arch", default="picochat", choices=["picochat", "nanochat-2026"],
                   help="picochat: nanochat's 2025 design; nanochat-2026: adds value embeddings, per-layer resid/x0 "
                        "lambdas, smear, backout, SSSL sliding windows, rotary base 1e5, q/k scale 1.2, vocab padded "
                        "to 64 (default picochat)")
    p.add_argument("--n-kv-head", type=_positive_int, help="key/value heads for GQA (default: n_head, or n_head/2 for gqa)")
    p.add_argument("--kv-lora-rank", type=_positive_int, help="mla: latent K/V dimension (default n_embd/4)")
    p.add_argument("--qk-rope-head-dim", type=_positive_int, help="mla: shared rotary key dimension, even "
                   "(default min(head_dim/4, n_embd/8), at least 8)")
    p.add_argument("--q-lora-rank", type=_nonneg_int, default=0, help="mla: low-rank query dimension; 0 = none (default 0)")
    p.add_argument("--data", default="embedded", help="prepared corpus name under $PICOCHAT_HOME/data (default: embedded)")
    add_train_flags(p, "base")
    p.set_defaults(func=cmd_train_base)

    for stage, source, what in (("mid", "base/d4", "continue training on packed chat-format conversations"),
                                ("sft", "mid/d4", "supervised fine-tuning: whole conversations, loss on assistant tokens")):
        p = train.add_parser(stage, help=what)
        p.add_argument("--model", default=source, help=f"checkpoint tag to start from (default {source})")
        p.add_argument("--tasks", default="spelling=2,arithmetic=1,identity=0.2",
                       help="comma-separated NAME=WEIGHT: spelling, arithmetic, identity (offline); smoltalk, gsm8k, "
                            "mmlu, arc-easy, arc-challenge (online) (default spelling=2,arithmetic=1,identity=0.2)")
        p.add_argument("--data", action="append", metavar="FILE.jsonl[=WEIGHT]",
                       help="conversation JSONL to mix in (repeatable), e.g. safety data")
        p.add_argument("--task-size", type=_positive_int, default=5000, help="examples per procedural task (default 5000)")
        p.add_argument("--seq-len", type=_positive_int, default=None, help="max tokens per row (default: the model's context)")
        add_train_flags(p, stage)
        p.set_defaults(func=cmd_train_chat, steps=200 if stage == "mid" else 150)

    p = train.add_parser("rl", help="reinforcement learning on verifiable rewards: the model's own replies, "
                         "graded by the eval graders (docs/rl.md)",
                         description="On-policy RL: P prompts x K samples per step, reward = the task's eval grade, "
                         "advantage = reward - group mean, token-level loss. Defaults that differ from the flag "
                         "texts below: --steps 120, learning rates 1/10 of SFT's (matrix 0.002, embedding 0.02, "
                         "unembedding 0.0004), --device-batch-size = all rollout rows of a process, --log-every 1, "
                         "--eval-every 0; --total-batch-size, --compile and the loader flags do not apply.")
    p.add_argument("--model", default="sft/d4", help="chat checkpoint to start from (default sft/d4)")
    p.add_argument("--tasks", default="arithmetic", help="comma-separated NAME[=WEIGHT] with a reward: arithmetic, "
                   "spelling (offline), gsm8k, aime, humaneval (default arithmetic)")
    p.add_argument("--data-file", action="append", metavar="[TASK=]FILE.jsonl", help="a task's problems from "
                   "JSONL (fields as for `picochat eval`); repeatable as TASK=PATH")
    p.add_argument("--samples-per-prompt", type=_positive_int, default=16, help="K replies per prompt; the "
                   "advantage is a reply's reward minus its K-group's mean (>= 2, default 16)")
    p.add_argument("--prompts-per-step", type=_positive_int, default=8, help="P prompts per optimizer step, all "
                   "processes together; P x K rows are generated in one batch (default 8)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64, help="reply budget in tokens (default 64)")
    p.add_argument("--temperature", type=_nonneg_float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-k", type=_nonneg_int, default=0, help="top-k of the rollouts; 0 = off (default 0)")
    p.add_argument("--kl-coef", type=_nonneg_float, default=0.0, help="weight of a per-token KL penalty to the "
                   "starting checkpoint (loads it a second time); 0 = no reference model (default 0)")
    p.add_argument("--task-size", type=_positive_int, default=5000, help="training problems per task (default 5000)")
    p.add_argument("--eval-limit", type=_nonneg_int, default=100, help="held-out arithmetic/spelling problems "
                   "graded greedily before, at --eval-every and after training; 0 = none (default 100)")
    add_train_flags(p, "rl")
    p.set_defaults(func=cmd_train_rl, steps=120, device_batch_size=None, matrix_lr=0.002, embedding_lr=0.02,
                   unembedding_lr=0.0004, eval_every=0, log_every=1)
