"""The training settings: one dataclass whose defaults are the `picochat train` flags' defaults, the
per-stage differences next to it, the flag table built from them, the one validation (which also gives
gradient accumulation), and building or resuming a run's settings from the command line.

Torch-free, so the CLI parser can read the defaults without loading the training loop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from picochat.common import PicochatError, nonneg_float, nonneg_int, positive_int

COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainSettings:
    stage: str                          # base | mid | sft | rl (recorded in checkpoints and the report)
    tag: str                            # checkpoint tag to write, e.g. base/d4
    steps: int = 300                    # optimizer steps
    device_batch_size: int = 8          # rows per micro-batch per process
    seq_len: int = 256                  # tokens per row
    total_batch_size: int = -1          # tokens per optimizer step; -1 = one micro-batch per process
    matrix_lr: float = 0.02
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.2
    final_lr_frac: float = 0.0
    eval_every: int = 100               # steps between val bpb evals (0 = only at the end)
    eval_batches: int = 8
    save_every: int = 0                 # steps between checkpoints (0 = only at the end)
    keep: int = 2                       # checkpoints kept per tag
    log_every: int = 10
    compile: str = "off"
    grad_checkpoint: bool = False
    seed: int = 0
    extra: dict = field(default_factory=dict)  # stage-specific facts for meta.json (data mixture, ...)

    def validate(self, world_size: int = 1) -> int:
        """Check values; return gradient-accumulation steps."""
        for name in ("steps", "device_batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise PicochatError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.compile not in COMPILE_MODES:
            raise PicochatError(f"--compile must be one of {', '.join(COMPILE_MODES)}; got {self.compile!r}")
        for name in ("matrix_lr", "embedding_lr", "unembedding_lr"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise PicochatError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
        per_step = self.device_batch_size * self.seq_len * world_size
        if self.total_batch_size == -1:
            return 1
        if self.total_batch_size <= 0 or self.total_batch_size % per_step:
            raise PicochatError(f"--total-batch-size {self.total_batch_size} must be a positive multiple of "
                                f"device_batch_size x seq_len x world_size = {per_step}")
        return self.total_batch_size // per_step


# where a stage's defaults differ from TrainSettings' (RL: 1/10 of SFT's learning rates, one micro-batch
# = all rollout rows of a process, a loss entry every step); the CLI flags take their defaults from here
STAGE_DEFAULTS = {
    "base": {},
    "mid": {"steps": 200, "seq_len": None},
    # 9,600 conversations in batches of 32: the d4 quickstart's held-out spelling, arithmetic and
    # calculator copying all rose with both the count and the batch (docs/performance.md)
    "sft": {"steps": 300, "device_batch_size": 32, "seq_len": None},
    "rl": {"steps": 120, "device_batch_size": None, "matrix_lr": 0.002, "embedding_lr": 0.02,
           "unembedding_lr": 0.0004, "eval_every": 0, "log_every": 1},
}


def stage_default(stage: str, name: str):
    """The default of setting `name` for `stage`: the stage's own, else TrainSettings'."""
    if name in STAGE_DEFAULTS[stage]:
        return STAGE_DEFAULTS[stage][name]
    return TrainSettings.__dataclass_fields__[name].default


# the flags that are TrainSettings fields: (field, type, help); each stage's default comes from
# train/settings.py (stage_default) and the help shows it, so the two cannot drift apart
SETTINGS_FLAGS = (
    ("steps", positive_int, "optimizer steps"),
    ("device_batch_size", positive_int, "rows per micro-batch per process"),
    ("total_batch_size", int, "tokens per optimizer step; a multiple of device_batch x seq_len x processes; the "
                              "rest is made up by gradient accumulation; -1 = one micro-batch per process"),
    ("matrix_lr", nonneg_float, "Muon learning rate for hidden matrices"),
    ("embedding_lr", nonneg_float, "AdamW lr for the token embedding, scaled by width"),
    ("unembedding_lr", nonneg_float, "AdamW lr for lm_head, scaled by width"),
    ("weight_decay", nonneg_float, "AdamW weight decay"),
    ("warmup_ratio", nonneg_float, "fraction of steps with linear lr warmup"),
    ("warmdown_ratio", nonneg_float, "fraction of steps with linear lr decay at the end"),
    ("eval_every", nonneg_int, "steps between val bits-per-byte evals; 0 = only at the end"),
    ("eval_batches", positive_int, "val batches per eval"),
    ("save_every", nonneg_int, "steps between checkpoints; 0 = only at the end"),
    ("log_every", positive_int, "steps between loss entries in the run history"),
    ("keep", positive_int, "checkpoints kept per tag"),
    ("seed", int, "seed for weight init"),
)


def settings_from_args(args, stage: str, tag: str, seq_len: int, extra: dict):
    return TrainSettings(stage=stage, tag=tag, seq_len=seq_len, compile=args.compile or "off",
                         grad_checkpoint=bool(args.grad_checkpoint), extra=extra,
                         **{name: getattr(args, name) for name, _, _ in SETTINGS_FLAGS})


def check_fresh(tag: str, args) -> None:
    """A fresh run must not silently mix into an existing run's checkpoints."""
    from picochat import checkpoint as ck
    if (ck.tag_dir(tag) / "latest").exists() and not args.overwrite:
        raise PicochatError(f"tag {tag} already has checkpoints; pass --resume to continue it or --overwrite to start over")


def resume_run(args, device, tag: str | None = None):
    """--resume: the checkpoint under `tag` (base: from --depth) or --tag, its settings (except the
    execution knobs given again on the command line), its model and its tokenizer."""
    from picochat import checkpoint as ck
    tag = tag or args.tag
    if not tag:
        raise PicochatError("--resume needs --tag (the run to continue)")
    resume = ck.read_checkpoint(tag)
    settings = TrainSettings(**resume.meta["settings"])
    if args.compile is not None:
        settings.compile = args.compile
    if args.grad_checkpoint:
        settings.grad_checkpoint = True
    model, _ = ck.load_model(tag, device=device)
    return resume, settings, model, ck.load_tokenizer(tag)
