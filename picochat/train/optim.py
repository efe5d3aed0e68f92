"""Muon for hidden matrices + AdamW for embedding and lm_head, and the learning-rate schedule.

Muon (orthogonalised momentum) works on 2-D weight matrices; embeddings and the output head
are not "matrices acting on hidden states" in the same sense and train better with AdamW at
their own learning rates (nanochat / modded-nanogpt recipe). AdamW lrs are scaled by
(n_embd / 768) ** -0.5 so one set of defaults serves every depth.
"""
from __future__ import annotations

import torch

from picochat.model.gpt import GPT


def build_optimizers(model: GPT, matrix_lr: float = 0.02, embedding_lr: float = 0.2, unembedding_lr: float = 0.004,
                     weight_decay: float = 0.0) -> list[torch.optim.Optimizer]:
    scale = (model.config.n_embd / 768) ** -0.5
    matrix, other = [], []
    for p in model.transformer.h.parameters():
        (matrix if p.ndim == 2 else other).append(p)
    adam_groups = [
        dict(params=list(model.lm_head.parameters()), lr=unembedding_lr * scale),
        dict(params=list(model.transformer.wte.parameters()), lr=embedding_lr * scale),
    ]
    if other:  # vectors inside blocks (none in the classic GPT; an extension may add some)
        adam_groups.append(dict(params=other, lr=unembedding_lr * scale))
    adamw = torch.optim.AdamW(adam_groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay)
    muon = torch.optim.Muon(matrix, lr=matrix_lr, momentum=0.95, nesterov=True, weight_decay=0.0)
    optimizers = [adamw, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def lr_multiplier(step: int, total_steps: int, warmup_ratio: float = 0.0, warmdown_ratio: float = 0.2,
                  final_lr_frac: float = 0.0) -> float:
    """Linear warmup, flat, then linear warmdown to final_lr_frac over the last warmdown_ratio of steps."""
    warmup = round(warmup_ratio * total_steps)
    warmdown = round(warmdown_ratio * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if step <= total_steps - warmdown:
        return 1.0
    progress = (total_steps - step) / max(1, warmdown)
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int, warmup_steps: int = 300) -> float:
    """Muon momentum ramps 0.85 -> 0.95 over the first steps (stabilises the start)."""
    frac = min(step / warmup_steps, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def apply_schedule(optimizers: list[torch.optim.Optimizer], step: int, total_steps: int, **kw) -> float:
    mult = lr_multiplier(step, total_steps, **kw)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * mult
        if isinstance(opt, torch.optim.Muon):
            for group in opt.param_groups:
                group["momentum"] = muon_momentum(step)
    return mult
