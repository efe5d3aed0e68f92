"""`picochat train base|mid|sft|rl`: each stage's flags, how it makes a fresh run's model, tokenizer and
settings, and its loaders; then the steps every stage shares, in train/loop.py: start_stage (a Stage:
settings, model, tokenizer, device), run_training (the one loop), finish_stage. RL's lives in train/rl.py.

    picochat train base --depth 4                       pretraining (also under torchrun)
    picochat train base --depth 4 --arch nanochat-2026  nanochat's 2026 design
    picochat train mid --model base/d4                  packed chat-format conversations
    picochat train sft --model mid/d4                   whole conversations, loss on assistant tokens
    picochat train rl --model sft/d4                    RL on verifiable rewards (docs/rl.md)

Wired into the main CLI through `register(subparsers)` (picochat/cli.py's COMMAND_MODULES).
"""
from __future__ import annotations

import time

from picochat.common import THREADS_HELP, nonneg_int, positive_int
from picochat.train.settings import SETTINGS_FLAGS, RLOptions, flag_fields, settings_from_args, stage_default

COMPILE_HELP = (
    "torch.compile mode: off | default (fused kernels) | reduce-overhead (default + CUDA graphs: replays the "
    "step with almost no launch overhead, but the graphs' private memory pool keeps the step's activations "
    "and workspaces alive between steps, about one extra copy of activation memory per distinct batch shape; "
    "shapes are therefore static: fixed batch and --seq-len, SFT rows padded to --seq-len) | max-autotune "
    "(also tunes kernels at startup, minutes; CUDA graphs too) | max-autotune-no-cudagraphs. On CPU the "
    "CUDA-graph modes drop only the graphs (reduce-overhead -> default, max-autotune -> "
    "max-autotune-no-cudagraphs); without a C++ compiler, or on MPS, training runs uncompiled with a note. "
    "Unset: off (with --resume: the checkpoint's mode)")


def _flags(p, flags) -> None:
    """One line per stage-specific flag: (name, type, default, help); help shows the default."""
    for name, kind, default, what in flags:
        p.add_argument(name, type=kind, default=default, help=what + ("" if default is None else " (default %(default)s)"))


def add_train_flags(p, stage: str):
    from picochat.data.workers import default_workers
    named = "d<depth>" if stage == "base" else "<last part of --model>"
    p.add_argument("--tag", help=f"checkpoint tag to write (unset: {stage}/{named})")
    _flags(p, [("--" + f.name.replace("_", "-"), f.metadata["type"], stage_default(stage, f.name), f.metadata["help"])
               for f in SETTINGS_FLAGS])
    p.add_argument("--compile", default=None, help=COMPILE_HELP)
    p.add_argument("--grad-checkpoint", action="store_true", default=None, help="recompute each block's activations "
                   "in backward (torch.utils.checkpoint, non-reentrant): less activation memory, ~1 extra forward of "
                   "compute. With --resume, --compile and --grad-checkpoint apply to the rest of the run (they change "
                   "how it trains, not what); every other setting comes from the checkpoint")
    _flags(p, (
        ("--loader-workers", nonneg_int, None, "background processes that tokenize training data (0 = in the "
         "training process); unset: available cores minus one, split across torchrun ranks, at most 8 "
         f"(here {default_workers()})"),
        ("--tokenizer-batch-size", positive_int, 64 if stage == "base" else 32, "documents (base) or conversations "
         "(mid) tokenized per request; does not change the token stream"),
        ("--threads", positive_int, None, THREADS_HELP),
        ("--prefetch", positive_int, 4, "ready batches queued ahead per process when --loader-workers > 0"),
        ("--device", str, "auto", "auto|cpu|cuda|cuda:N|mps"),
    ))
    p.add_argument("--wandb", metavar="PROJECT", default=None, help="log to Weights & Biases under PROJECT (off by default)")
    p.add_argument("--resume", action="store_true", help="continue the run saved under --tag exactly where it stopped")
    p.add_argument("--overwrite", action="store_true", help="start fresh even if --tag already has checkpoints")
    p.add_argument("--stop-after", type=positive_int, help="stop (and checkpoint) after this many steps without changing "
                   "the schedule; continue later with --resume")


def loader_kwargs(args) -> dict:
    """Background-loader options shared by every training command (none of them changes the data)."""
    from picochat.data.workers import default_workers
    workers = default_workers() if args.loader_workers is None else args.loader_workers
    return {"workers": workers, "tokenizer_batch": args.tokenizer_batch_size, "prefetch": args.prefetch}


def cmd_train_base(args):
    import torch
    from picochat.common import data_dir, tokenizer_dir
    from picochat.data.corpus import list_shards
    from picochat.data.loader import PretrainLoader
    from picochat.model.config import config_from_depth
    from picochat.model.gpt import GPT
    from picochat.tokenizer import Tokenizer
    from picochat.train.loop import finish_stage, run_training, start_stage

    t0 = time.time()
    args.tag = args.tag or f"base/d{args.depth}"  # --resume needs no --tag here: it follows --depth

    def fresh(tag, device, info):
        tok = Tokenizer.load(tokenizer_dir())
        settings = settings_from_args(args, "base", tag, args.seq_len, {"data": args.data})
        settings.validate(info.world_size)  # before any model is built
        config = config_from_depth(args.depth, tok.vocab_size, args.seq_len, attention=args.attention,
                                   n_kv_head=args.n_kv_head, kv_lora_rank=args.kv_lora_rank,
                                   qk_rope_head_dim=args.qk_rope_head_dim, q_lora_rank=args.q_lora_rank,
                                   arch=args.arch)
        torch.manual_seed(args.seed)
        model = GPT(config).to(device)
        model.init_weights()
        return settings, model, tok

    stage = start_stage(args, args.tag, fresh)
    info, tok, B, T = stage.dist, stage.tok, stage.settings.device_batch_size, stage.settings.seq_len
    data = data_dir(stage.settings.extra["data"])
    list_shards(data, "train")  # clear error if the corpus is missing

    def make_loader(state):
        return PretrainLoader(data, tok, B, T, "train", info.rank, info.world_size, stage.grad_accum, state,
                              device=stage.device, **loader_kwargs(args))

    def val_loader():
        return PretrainLoader(data, tok, B, T, "val", info.rank, info.world_size, 1, None, device=stage.device)

    summary = run_training(stage, make_loader, val_loader, stop_after=args.stop_after, wandb_project=args.wandb)
    finish_stage(stage, summary, time.time() - t0)


def cmd_train_chat(args):
    """Midtraining (packed conversations, all tokens) or SFT (padded, assistant tokens only)."""
    from picochat import checkpoint as ck
    from picochat.data.chat_loader import MidLoader, SFTLoader
    from picochat.tasks import build_mixture
    from picochat.train.loop import finish_stage, run_training, start_stage

    t0 = time.time()
    name = args.stage

    def fresh(tag, device, info):
        model, source = ck.load_model(args.model, device=device)
        tok = ck.load_tokenizer(args.model)  # the model's own: an imported model keeps its tokenizer
        settings = settings_from_args(args, name, tag, args.seq_len or model.config.sequence_len,
                                      {"source": args.model, "source_step": source.step,
                                       "tasks": args.tasks.split(",") if args.tasks else [], "data": args.data or [],
                                       "task_size": args.task_size, "pack": getattr(args, "pack", False)})
        return settings, model, tok

    stage = start_stage(args, f"{name}/" + args.model.split("/")[-1], fresh)
    settings, info, tok, device = stage.settings, stage.dist, stage.tok, stage.device
    extra = settings.extra
    mixture = build_mixture(extra["tasks"], extra["data"], "train", extra["task_size"], seed=settings.seed)
    offline = [t for t in extra["tasks"] if t.split("=")[0] in ("spelling", "arithmetic")]
    val_mixture = build_mixture(offline, [], "test", 500, seed=settings.seed + 1) if offline else None
    B, T, accum = settings.device_batch_size, settings.seq_len, stage.grad_accum

    def make_loader(state):
        kw = loader_kwargs(args)
        if name == "mid":
            return MidLoader(mixture, tok, B, T, info.rank, info.world_size, accum, state, device=device, **kw)
        # compiled training wants one static shape: pad every SFT row to T (loss unchanged)
        return SFTLoader(mixture, tok, B, T, info.rank, info.world_size, accum, state, device=device,
                         workers=kw["workers"], prefetch=kw["prefetch"], pad_to=T if settings.compile != "off" else None,
                         pack=extra.get("pack", False))

    def val_loader():
        return SFTLoader(val_mixture, tok, B, T, info.rank, info.world_size, 1, None, device=device)

    summary = run_training(stage, make_loader, val_loader if val_mixture is not None else None,
                           stop_after=args.stop_after, wandb_project=args.wandb)
    finish_stage(stage, summary, time.time() - t0)


def cmd_train_rl(args):
    from picochat.train.rl import train_rl  # torch and the tasks load only when the command runs
    train_rl(args)


def register(sub) -> None:
    train = sub.add_parser("train", help="training stages").add_subparsers(dest="stage", required=True)
    p = train.add_parser("base", help="pretrain a GPT on the prepared corpus")
    _flags(p, (
        ("--depth", positive_int, 4, "number of layers; width = 64 x depth"),
        ("--seq-len", positive_int, stage_default("base", "seq_len"), "context length in tokens"),
        ("--n-kv-head", positive_int, None, "key/value heads for GQA (unset: n_head, or n_head/2 for gqa)"),
        ("--kv-lora-rank", positive_int, None, "mla: latent K/V dimension (unset: n_embd/4)"),
        ("--qk-rope-head-dim", positive_int, None, "mla: shared rotary key dimension, even "
                                                   "(unset: min(head_dim/4, n_embd/8), at least 8)"),
        ("--q-lora-rank", nonneg_int, 0, "mla: low-rank query dimension; 0 = none"),
        ("--data", str, "embedded", "prepared corpus name under $PICOCHAT_HOME/data"),
    ))
    p.add_argument("--attention", default="mha", choices=["mha", "gqa", "mla"], help="attention variant (default %(default)s)")
    p.add_argument("--arch", default="picochat", choices=["picochat", "nanochat-2026"],
                   help="picochat: nanochat's 2025 design; nanochat-2026: adds value embeddings, per-layer resid/x0 "
                        "lambdas, smear, backout, SSSL sliding windows, rotary base 1e5, q/k scale 1.2, vocab padded "
                        "to 64 (default %(default)s)")
    add_train_flags(p, "base")
    p.set_defaults(func=cmd_train_base)

    for stage, source, what in (("mid", "base/d4", "continue training on packed chat-format conversations"),
                                ("sft", "mid/d4", "supervised fine-tuning: whole conversations, loss on assistant tokens")):
        p = train.add_parser(stage, help=what)
        _flags(p, (
            ("--model", str, source, "checkpoint tag to start from"),
            ("--tasks", str, "spelling=2,arithmetic=1,identity=0.2", "comma-separated NAME=WEIGHT: spelling, "
             "arithmetic, identity (offline); smoltalk, gsm8k, mmlu, arc-easy, arc-challenge (online)"),
            ("--task-size", positive_int, 5000, "examples per procedural task"),
            ("--seq-len", positive_int, stage_default(stage, "seq_len"), "max tokens per row (unset: the model's context)"),
        ))
        p.add_argument("--data", action="append", metavar="FILE.jsonl[=WEIGHT]",
                       help="conversation JSONL to mix in (repeatable), e.g. safety data")
        if stage == "sft":
            p.add_argument("--pack", action="store_true", help="place each step's conversations whole into as few "
                           "rows as hold them (best fit, rows as wide as the longest) instead of one per padded row: "
                           "the same conversations and supervised tokens per step in about half the compute on short "
                           "chats; a conversation can attend to the one before it in its row, as in nanochat's SFT")
        add_train_flags(p, stage)
        p.set_defaults(func=cmd_train_chat)

    p = train.add_parser("rl", help="reinforcement learning on verifiable rewards: the model's own replies, "
                         "graded by the eval graders (docs/rl.md)",
                         description="On-policy RL: P prompts x K samples per step, reward = the task's eval grade, "
                         "advantage = reward - group mean, token-level loss. --device-batch-size unset = all rollout "
                         "rows of a process; --total-batch-size, --compile and the loader flags do not apply.")
    _flags(p, (
        ("--model", str, "sft/d4", "chat checkpoint to start from"),
        ("--tasks", str, "arithmetic", "comma-separated NAME[=WEIGHT] with a reward: arithmetic, spelling (offline), "
                                       "gsm8k, aime, humaneval"),
        *[(name, f.metadata["type"], f.default, f.metadata["help"]) for name, f in flag_fields(RLOptions)],
    ))
    p.add_argument("--data-file", action="append", metavar="[TASK=]FILE.jsonl", help="a task's problems from "
                   "JSONL (fields as for `picochat eval`); repeatable as TASK=PATH")
    add_train_flags(p, "rl")
    p.set_defaults(func=cmd_train_rl)
