"""The training settings: one dataclass whose fields carry the `picochat train` flags' defaults, types and
help, the per-stage differences next to it, the one validation (which also gives gradient accumulation),
and building a fresh run's settings from the command line (train/loop.py's start_stage resumes one);
`train rl`'s own options (RLOptions) the same way.

Torch-free, so the CLI parser can read the defaults without loading the training loop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from picochat.common import PicochatError, nonneg_float, nonneg_int, positive_int

COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def flag(default, kind, what: str, name: str | None = None):
    """A settings field that is also a `picochat train` flag (--<field-name> unless `name`), with its type and help."""
    return field(default=default, metadata={"type": kind, "help": what, "flag": name})


def flag_fields(cls) -> list[tuple[str, object]]:
    """(flag, field) for each field of dataclass `cls` that is a flag, in declaration order."""
    return [(f.metadata["flag"] or "--" + f.name.replace("_", "-"), f) for f in fields(cls) if "help" in f.metadata]


@dataclass
class TrainSettings:
    stage: str                          # base | mid | sft | rl (recorded in checkpoints and the report)
    tag: str                            # checkpoint tag to write, e.g. base/d4
    steps: int = flag(300, positive_int, "optimizer steps")
    device_batch_size: int = flag(8, positive_int, "rows per micro-batch per process")
    seq_len: int = 256                  # tokens per row (each stage has its own --seq-len flag)
    total_batch_size: int = flag(-1, int, "tokens per optimizer step; a multiple of device_batch x seq_len x "
                                 "processes; the rest is made up by gradient accumulation; -1 = one micro-batch "
                                 "per process")
    matrix_lr: float = flag(0.02, nonneg_float, "Muon learning rate for hidden matrices")
    embedding_lr: float = flag(0.2, nonneg_float, "AdamW lr for the token embedding, scaled by width")
    unembedding_lr: float = flag(0.004, nonneg_float, "AdamW lr for lm_head, scaled by width")
    weight_decay: float = flag(0.0, nonneg_float, "AdamW weight decay")
    warmup_ratio: float = flag(0.0, nonneg_float, "fraction of steps with linear lr warmup")
    warmdown_ratio: float = flag(0.2, nonneg_float, "fraction of steps with linear lr decay at the end")
    final_lr_frac: float = 0.0
    eval_every: int = flag(100, nonneg_int, "steps between val bits-per-byte evals; 0 = only at the end")
    eval_batches: int = flag(8, positive_int, "val batches per eval")
    save_every: int = flag(0, nonneg_int, "steps between checkpoints; 0 = only at the end")
    log_every: int = flag(10, positive_int, "steps between loss entries in the run history")
    keep: int = flag(2, positive_int, "checkpoints kept per tag")
    compile: str = "off"
    grad_checkpoint: bool = False
    seed: int = flag(0, int, "seed for weight init")
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


# the flags that are TrainSettings fields, in this order; each stage's default comes from stage_default
# and the help shows it, so the two cannot drift apart
SETTINGS_FLAGS = [f for _, f in flag_fields(TrainSettings)]


@dataclass
class RLOptions:
    """`picochat train rl`'s own options (the flags after --model and --tasks take defaults and help from here)."""
    tasks: list[str]                  # "name=weight" specs
    samples: int = flag(16, positive_int, "K replies per prompt; the advantage is a reply's reward minus its "
                        "K-group's mean (>= 2)", "--samples-per-prompt")
    prompts: int = flag(8, positive_int, "P prompts per optimizer step, all processes together; P x K rows are "
                        "generated in one batch", "--prompts-per-step")
    # reply budget; tool outputs are not counted
    max_new_tokens: int = flag(64, positive_int, "reply budget in tokens")
    # 1.0: the samples follow the policy whose log-probs are trained (top-k makes them off-policy too)
    temperature: float = flag(1.0, nonneg_float, "sampling temperature")
    top_k: int = flag(0, nonneg_int, "top-k of the rollouts; 0 = off")
    kl_coef: float = flag(0.0, nonneg_float, "weight of a per-token KL penalty to the starting checkpoint (loads "
                          "it a second time); 0 = no reference model")
    task_size: int = flag(5000, positive_int, "training problems per task")
    data_files: dict | None = None    # task -> JSONL of problems (eval's --data-file fields)
    eval_limit: int = flag(100, nonneg_int, "held-out arithmetic/spelling problems graded greedily before, at "
                           "--eval-every and after training; 0 = none")

    def validate(self, world_size: int = 1) -> None:
        if self.samples < 2:
            raise PicochatError(f"--samples-per-prompt must be >= 2, got {self.samples}: the advantage compares "
                                f"a reply with the other samples of its prompt")
        if self.prompts < 1 or self.prompts % world_size:
            raise PicochatError(f"--prompts-per-step {self.prompts} must be a positive multiple of the "
                                f"{world_size} processes (prompts are sharded by rank)")
        if self.max_new_tokens < 1:
            raise PicochatError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")


def settings_from_args(args, stage: str, tag: str, seq_len: int, extra: dict):
    return TrainSettings(stage=stage, tag=tag, seq_len=seq_len, compile=args.compile or "off",
                         grad_checkpoint=bool(args.grad_checkpoint), extra=extra,
                         **{f.name: getattr(args, f.name) for f in SETTINGS_FLAGS})
