"""How much memory inference may use: the KV-cache budget the server admits requests by.

The weights are fixed once loaded; the KV cache grows with every request in the running batch
(rows x tokens x kv_bytes_per_token). Without a budget a 16-row batch of long requests at d20
asks for ~7 GB of fp32 cache and a laptop swaps or the process is killed; with one, requests that
would pass it wait in the queue (inference/scheduler.py).
"""
from __future__ import annotations

import os

import torch

from picochat.common import PicochatError, fmt_bytes

CPU_SHARE = 0.5    # of the memory available after loading: the rest stays for the OS, the tokenizer, the server
GPU_SHARE = 0.8    # of the card's free memory: activations and the allocator's slack need the rest


def available_bytes(device: torch.device) -> int:
    """Memory free for new allocations now: the card's free memory, or the OS's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    # not Linux: a quarter of physical memory, a guess that does not assume the machine is idle
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def default_kv_budget(device: torch.device) -> int:
    return int(available_bytes(device) * (GPU_SHARE if device.type == "cuda" else CPU_SHARE))


def check_kv_budget(budget: int, context: int, bytes_per_token: int) -> None:
    """One request of the full context must fit, or the server could never run it: one clear error."""
    need = 2 * context * bytes_per_token  # prefill cache + decode cache (scheduler.kv_bytes_alone)
    if budget < need:
        raise PicochatError(f"--kv-memory {fmt_bytes(budget)} is less than one request of the full context needs "
                            f"({context} tokens x {fmt_bytes(bytes_per_token)} per token, prefill and decode: "
                            f"{fmt_bytes(need)}); raise --kv-memory or lower --context-length")
