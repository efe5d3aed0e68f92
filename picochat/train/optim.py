"""Muon for hidden matrices + AdamW for embedding and lm_head, and the learning-rate schedule.

Muon (orthogonalised momentum) works on 2-D weight matrices; embeddings and the output head
are not "matrices acting on hidden states" in the same sense and train better with AdamW at
their own learning rates (nanochat / modded-nanogpt recipe). AdamW lrs are scaled by
(n_embd / 768) ** -0.5 so one set of defaults serves every depth.

Muon is our own few lines rather than torch.optim.Muon: torch's version always runs the
Newton-Schulz iteration in bfloat16, which on CPUs without native bf16 matmuls (e.g. AVX2-only
AMD EPYC) made one optimizer step of a d4 model take ~15 s instead of milliseconds. Here the
iteration runs in bf16 on CUDA (as in Keller Jordan's reference) and in fp32 elsewhere.
"""
from __future__ import annotations

import math

import torch

from picochat.model.gpt import GPT

# quintic Newton-Schulz coefficients (Keller Jordan's Muon; the same as torch.optim.Muon)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximately U V^T of g = U S V^T (singular values pushed into ~[0.5, 1.5]) by a quintic
    Newton-Schulz iteration; works on the wide orientation so the Gram matrix is the small one."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """SGD-momentum (Nesterov) whose update is orthogonalised per 2-D matrix, scaled by
    sqrt(max(1, rows/cols)) as in the original Muon. State: `momentum_buffer` per parameter."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, mom = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.ndim != 2:
                    raise ValueError("Muon only handles 2-D parameters")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mom)
                update = p.grad.lerp(buf, mom) if group["nesterov"] else buf
                dtype = torch.bfloat16 if p.device.type == "cuda" else torch.float32
                update = orthogonalize(update, group["ns_steps"], dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * math.sqrt(max(1.0, p.size(0) / p.size(1))))
        return loss


SCALAR_LR = 0.5  # nanochat 2026's scalar_lr: x0 lambdas train at it, resid lambdas at 1/100 of it


def build_optimizers(model: GPT, matrix_lr: float = 0.02, embedding_lr: float = 0.2, unembedding_lr: float = 0.004,
                     weight_decay: float = 0.0) -> list[torch.optim.Optimizer]:
    scale = (model.config.n_embd / 768) ** -0.5
    # every block parameter is a matrix; anything else would be caught below as without a group
    matrix = [p for p in model.transformer.h.parameters() if p.ndim == 2]
    adam_groups = [
        dict(params=list(model.lm_head.parameters()), lr=unembedding_lr * scale),
        dict(params=list(model.transformer.wte.parameters()), lr=embedding_lr * scale),
        *nanochat_2026_groups(model, embedding_lr * scale),
    ]
    covered = {id(p) for g in adam_groups for p in g["params"]} | {id(p) for p in matrix}
    stray = [n for n, p in model.named_parameters() if id(p) not in covered]
    if stray:  # a new parameter must be given a group on purpose, not silently left untrained
        raise ValueError(f"parameters without an optimizer group: {stray[:5]}")
    adamw = torch.optim.AdamW(adam_groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay)
    muon = Muon(matrix, lr=matrix_lr, momentum=0.95, nesterov=True, weight_decay=0.0)
    optimizers = [adamw, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def nanochat_2026_groups(model: GPT, embedding_lr: float) -> list[dict]:
    """AdamW groups for nanochat 2026's extra parameters, with nanochat's learning rates, betas and
    weight decay (its setup_optimizer at 92d63d4). The value-embedding gates sit inside the blocks
    and train with Muon, as there. Empty for picochat's default design."""
    groups, c = [], model.config
    if c.value_embeds:
        groups.append(dict(params=list(model.value_embeds.parameters()), lr=embedding_lr * 0.5,
                           betas=(0.8, 0.995), weight_decay=0.01))
    if c.layer_scalars:
        groups.append(dict(params=[model.resid_lambdas], lr=SCALAR_LR * 0.01, betas=(0.8, 0.95), weight_decay=0.05))
        groups.append(dict(params=[model.x0_lambdas], lr=SCALAR_LR, betas=(0.96, 0.95), weight_decay=0.0))
    gates = ([model.smear_gate.weight, model.smear_lambda] if c.smear else []) + \
        ([model.backout_lambda] if c.backout else [])
    if gates:
        groups.append(dict(params=gates, lr=0.2, betas=(0.8, 0.95), weight_decay=0.0))
    return groups


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
        if isinstance(opt, Muon):
            for group in opt.param_groups:
                group["momentum"] = muon_momentum(step)
    return mult
