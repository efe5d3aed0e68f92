"""Draft distillation for speculative decoding: a corpus of what the target model says.

A draft pays only when it predicts the target's next token: a small model trained on the same data
agrees with a larger one too rarely to pay on a CPU (α ≈ 0.5, ~1.0x); trained on the target's own
continuations it reached α 0.89 and ~2x (docs/inference.md has the recipe). Each document is a
16-48-token prefix from a random line of a random training document plus the target's
continuation; `greedy_fraction` of the rows decode at temperature 0 (what a greedy speculative run
needs the draft to predict), the rest at `temperature`.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterator

from picochat.inference.engine import Engine
from picochat.inference.sampling import Sampling


def distill_samples(target, tokenizer, docs: list[str], n_tokens: int, *, seed: int = 0, temperature: float = 1.0,
                    greedy_fraction: float = 0.5, batch: int = 32, length: int = 192,
                    progress: Callable[[int], None] | None = None) -> Iterator[tuple[list[int], list[int], float]]:
    """Yield (prefix ids, the target's continuation ids, the temperature it was sampled at) until the
    target has generated `n_tokens` tokens; the text of a sample is decode(prefix + continuation).
    progress(k) is called with the number of new tokens after every batch."""
    if not docs:
        raise ValueError("distillation needs at least one source document")
    if not 0 <= greedy_fraction <= 1:
        raise ValueError(f"greedy_fraction must be in [0, 1], got {greedy_fraction}")
    rng = random.Random(seed)
    engine = Engine(target, tokenizer)
    bos = tokenizer.bos_token_id
    n_greedy = round(batch * greedy_fraction)
    temps = [0.0] * n_greedy + [temperature] * (batch - n_greedy)
    done, i = 0, 0
    while done < n_tokens:
        prefixes = []
        for _ in range(batch):
            doc = rng.choice(docs)
            start = doc.rfind("\n", 0, rng.randrange(max(1, len(doc) - 400))) + 1  # a line start
            prefixes.append(tokenizer.encode(doc[start:start + 400])[:rng.randint(16, 48)])
        rows = engine.generate([[bos] + p for p in prefixes], length, Sampling(temps, seed=seed + i * batch),
                               stop_tokens={bos})
        for prefix, row, t in zip(prefixes, rows, temps):
            yield prefix, [x for x in row if x != bos], t
        new = sum(map(len, rows))
        done += new
        i += 1
        if progress is not None:
            progress(new)
