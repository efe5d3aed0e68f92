"""Checkpoints by tag: safetensors weights + JSON config/meta + optimizer/loader state, atomic.

Layout under $PICOCHAT_HOME/checkpoints/<tag>/ (a tag is like "base/d4" or "sft/d4"):

    step_000200/model.safetensors   weights (fp32 or the training dtype)
    step_000200/config.json         GPTConfig: enough to rebuild the model
    step_000200/meta.json           stage, step, metrics, train args, sha256 of every file
    step_000200/optim.pt            optimizer state dicts (only for resumable checkpoints)
    step_000200/state.json          data-loader position and anything else needed to resume
    step_000200/tokenizer.tiktoken  the model's own tokenizer (tokenizer.py's format), with
    step_000200/tokenizer.json        tokenizer.json: models with different tokenizers share one home
    latest                          name of the newest complete step directory

Checkpoints from before tokenizers travelled with them use the home's tokenizer
($PICOCHAT_HOME/tokenizer) when its vocabulary matches. A step directory is written under a
temporary name and renamed into place, then `latest` is replaced atomically: a crash at any moment
leaves the previous checkpoint loadable. On load every file's sha256 is checked against meta.json,
so a truncated or corrupt file is an error, not garbage.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from picochat.common import PicochatError, atomic_dir, home, tokenizer_dir, write_text_atomic
from picochat.model.config import GPTConfig
from picochat.model.gpt import GPT
from picochat.tokenizer import META_FILE, Tokenizer

TAG_RE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


def checkpoints_root() -> Path:
    return home() / "checkpoints"


def tag_dir(tag: str) -> Path:
    if not TAG_RE.match(tag) or any(part in (".", "..") for part in tag.split("/")):
        raise PicochatError(f"invalid checkpoint tag {tag!r}: use names like base/d4 (letters, digits, . _ - and /)")
    return checkpoints_root() / tag


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def list_tags() -> list[str]:
    root = checkpoints_root()
    if not root.exists():
        return []
    return sorted(str(p.parent.relative_to(root)) for p in root.rglob("latest"))


def save_checkpoint(tag: str, step: int, model: torch.nn.Module, config: GPTConfig, meta: dict,
                    optimizers: list[torch.optim.Optimizer] | None = None, state: dict | None = None,
                    keep: int = 2, tokenizer: Tokenizer | None = None) -> Path:
    """Write a complete checkpoint for `step` and point `latest` at it. Returns its directory.
    `tokenizer` (the one the model reads) is stored with it; load it back with load_tokenizer."""
    root = tag_dir(tag)
    name = f"step_{step:06d}"
    final = root / name
    with atomic_dir(final) as tmp:  # re-saving a step (final save == periodic save) replaces it
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        if optimizers is not None:
            torch.save([opt.state_dict() for opt in optimizers], tmp / "optim.pt")
        (tmp / "state.json").write_text(json.dumps(state or {}, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        meta = dict(meta, step=step, tag=tag, files=files)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for p in tmp.iterdir():  # durable before the rename makes it visible
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    write_text_atomic(root / "latest", name + "\n")
    # prune old steps, never the one just written
    steps = sorted(p for p in root.glob("step_*") if p.is_dir() and p != final)
    for old in steps[: max(0, len(steps) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


@dataclass
class Checkpoint:
    path: Path
    config: GPTConfig
    meta: dict
    state: dict

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))

    def weights(self) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(self.path / "model.safetensors"), device="cpu")
        except Exception as e:  # safetensors raises its own error types for bad headers/truncation
            raise PicochatError(f"checkpoint {self.path} has unreadable weights ({e})") from None


def resolve(tag: str, step: int | None = None) -> Path:
    root = tag_dir(tag)
    if step is not None:
        path = root / f"step_{step:06d}"
    else:
        latest = root / "latest"
        if not latest.exists():
            known = ", ".join(list_tags()) or "none yet"
            raise PicochatError(f"no checkpoint with tag {tag!r} under {checkpoints_root()} (known tags: {known})")
        path = root / latest.read_text().strip()
    if not path.is_dir():
        raise PicochatError(f"checkpoint {path} is missing")
    return path


def read_checkpoint(tag: str, step: int | None = None, verify: bool = True) -> Checkpoint:
    path = resolve(tag, step)
    try:
        meta = json.loads((path / "meta.json").read_text())
        config = GPTConfig.from_dict(json.loads((path / "config.json").read_text()))
        state = json.loads((path / "state.json").read_text()) if (path / "state.json").exists() else {}
    except (OSError, ValueError, TypeError) as e:
        raise PicochatError(f"checkpoint {path} is corrupt ({type(e).__name__}: {e})") from None
    if verify:
        for fname, digest in meta.get("files", {}).items():
            f = path / fname
            if not f.exists():
                raise PicochatError(f"checkpoint {path} is incomplete: {fname} is missing")
            if _sha256(f) != digest:
                raise PicochatError(f"checkpoint {path} is corrupt: {fname} does not match its checksum")
    return Checkpoint(path=path, config=config, meta=meta, state=state)


def load_model(tag: str, device: torch.device | str = "cpu", step: int | None = None,
               dtype: torch.dtype | None = None) -> tuple[GPT, Checkpoint]:
    """Rebuild the model of a checkpoint, in eval mode, on `device`."""
    ckpt = read_checkpoint(tag, step)
    misfit = f"checkpoint {ckpt.path} does not fit its config"
    return build_model(ckpt.config, ckpt.weights(), misfit, device, dtype), ckpt


def build_model(config: GPTConfig, weights: dict[str, torch.Tensor], misfit: str, device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None) -> GPT:
    """The GPT of `config` holding `weights`, in eval mode on `device` (the imports use it too), or one
    error, `misfit` followed by the names that do not fit."""
    with torch.device("meta"):
        model = GPT(config)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    wrong = [k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape]
    if missing or unexpected or wrong:
        raise PicochatError(f"{misfit} (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                            f"wrong shape {sorted(wrong)[:3]})")
    # the model takes the loaded tensors over (assign) instead of copying them into fresh ones:
    # one copy of the weights in memory while loading, not two (moved only if device or dtype differ)
    model.load_state_dict({k: w.to(device=device, dtype=expected[k].dtype) for k, w in weights.items()},
                          assign=True, strict=True)
    if dtype is not None:
        model.to(dtype=dtype)
    model.reset_rotary(device)  # derived, not saved: rebuilt on the device, and fp32 whatever the weights' dtype
    return model.eval()


def load_tokenizer(tag: str, step: int | None = None) -> Tokenizer:
    """The tokenizer of checkpoint `tag`: its own copy, or for a checkpoint saved without one, the
    home's tokenizer if its vocabulary is the one the model was trained with."""
    ckpt = read_checkpoint(tag, step, verify=False)  # load_model verifies; here only tokenizer files are read
    if (ckpt.path / META_FILE).exists():
        tok = Tokenizer.load(ckpt.path)
    else:
        tok = Tokenizer.load(tokenizer_dir())
        trained = ckpt.meta.get("tokenizer_vocab", ckpt.config.vocab_size)
        if tok.vocab_size != trained:
            raise PicochatError(f"checkpoint {tag} has no tokenizer of its own, and the one in {tokenizer_dir()} "
                                f"has vocab {tok.vocab_size}, not the {trained} it was trained with")
    if tok.vocab_size > ckpt.config.vocab_size:
        raise PicochatError(f"checkpoint {tag}'s tokenizer has {tok.vocab_size} tokens but the model only "
                            f"{ckpt.config.vocab_size}")
    return tok


def load_optimizer_state(ckpt: Checkpoint, optimizers: list[torch.optim.Optimizer]) -> None:
    f = ckpt.path / "optim.pt"
    if not f.exists():
        raise PicochatError(f"checkpoint {ckpt.path} has no optimizer state; it cannot be resumed")
    states = torch.load(f, map_location="cpu", weights_only=True)
    if len(states) != len(optimizers):
        raise PicochatError(f"checkpoint {ckpt.path} has {len(states)} optimizer states, expected {len(optimizers)}")
    for opt, sd in zip(optimizers, states):
        opt.load_state_dict(sd)
