"""The training settings: one dataclass whose defaults are the `picochat train` flags' defaults, the
per-stage differences next to it, and the one validation (which also gives gradient accumulation).

Torch-free, so the CLI parser can read the defaults without loading the training loop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from picochat.common import PicochatError

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
    "sft": {"steps": 150, "seq_len": None},
    "rl": {"steps": 120, "device_batch_size": None, "matrix_lr": 0.002, "embedding_lr": 0.02,
           "unembedding_lr": 0.0004, "eval_every": 0, "log_every": 1},
}


def stage_default(stage: str, name: str):
    """The default of setting `name` for `stage`: the stage's own, else TrainSettings'."""
    if name in STAGE_DEFAULTS[stage]:
        return STAGE_DEFAULTS[stage][name]
    return TrainSettings.__dataclass_fields__[name].default
