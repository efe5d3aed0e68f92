"""Bits per byte: the tokenizer-independent loss, used for validation during training and in evals.

bpb = (sum of cross-entropy in nats over target tokens) / (ln 2 * UTF-8 bytes those tokens decode to).
Special tokens decode to no text, so they count 0 bytes and are left out of both sums;
masked targets (-1) are left out too. Under torchrun the sums are all-reduced.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.distributed as dist

from picochat.device import autocast_ctx


def token_byte_lengths(tokenizer, device="cpu") -> torch.Tensor:
    """(vocab_size,) int64: bytes of each token; 0 for special tokens."""
    from picochat.tokenizer import SPECIAL_TOKENS
    special = {tokenizer.encode_special(name) for name in SPECIAL_TOKENS}
    lengths = [0 if i in special else len(tokenizer.id_to_token_bytes(i)) for i in range(tokenizer.vocab_size)]
    return torch.tensor(lengths, dtype=torch.int64, device=device)


@torch.no_grad()
def evaluate_bpb(model, batches, token_bytes: torch.Tensor, max_batches: int | None = None) -> float:
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    was_training = model.training
    model.eval()
    for x, y in itertools.islice(batches, max_batches):
        with autocast_ctx(x.device):
            loss = model(x, y, loss_reduction="none").view(-1)
        y = y.reshape(-1)
        nbytes = torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0)  # masked targets (-1) count 0 bytes
        total_nats += loss[nbytes > 0].double().sum()
        total_bytes += nbytes.sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    model.train(was_training)
    if total_bytes.item() == 0:
        return float("nan")
    return total_nats.item() / (math.log(2) * total_bytes.item())
