"""Multiple-choice scoring: the log-likelihood of each option's tokens given the prompt, batched.

`score_options(model, contexts, options)` returns, per example, the sum of log-probs of each
option's tokens after its context. Two prompt formats use it (`mc_prompts`):
- **options**: the answer text is the continuation (" Paris"), the classic base-model eval;
- **letters**: the choices are listed as "A. ... B. ..." and the continuation is the letter; for a
  chat model the context ends with <|assistant_start|>, exactly as SFT taught it to answer.
  A one-token option needs only the logits after its context, so an example whose options are
  all single tokens (letters) costs one row, whatever its number of options.

Rows are right-padded (a causal model's earlier positions do not see the padding), sorted by
length so a batch wastes little, and truncated on the left if longer than the model's context.
"""
from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from picochat.device import autocast_ctx
from picochat.tasks.base import LETTERS, multiple_choice


def mc_prompts(tok, ex: dict, chat: bool, mode: str) -> tuple[list[int], list[list[int]]]:
    """(context ids, option ids) for one {"question", "choices"} example."""
    if mode not in ("letters", "options"):
        raise ValueError(f"multiple-choice mode must be letters or options, got {mode!r}")
    choices = ex["choices"]
    if len(choices) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} choices, got {len(choices)}")
    letters = LETTERS[:len(choices)]
    if chat:
        body = (multiple_choice(ex["question"], choices, 0)["messages"][0]["content"] if mode == "letters"
                else ex["question"])
        ctx = tok.render_for_completion({"messages": [{"role": "user", "content": body}]})
        opts = [tok.encode(x) for x in (letters if mode == "letters" else choices)]
    else:
        listing = "".join(f"\n{L}. {c}" for L, c in zip(letters, choices)) if mode == "letters" else ""
        ctx = tok.encode(f"Question: {ex['question']}{listing}\nAnswer:", prepend=tok.bos_token_id)
        opts = [tok.encode(" " + x) for x in (letters if mode == "letters" else choices)]
    return ctx, opts


def keep_end(ids: list[int], room: int) -> list[int]:
    """At most `room` tokens of `ids`: its first token (BOS) and its end."""
    return ids if len(ids) <= room else ids[:1] + ids[len(ids) - room + 1:]


def right_padded(seqs: list[list[int]], device) -> torch.Tensor:
    """One row per sequence, zero-padded on the right to the longest."""
    return pad_sequence([torch.tensor(s, dtype=torch.long) for s in seqs], batch_first=True).to(device)


def _rows(contexts, options, max_len: int):
    """One row per example whose options are single tokens, else one row per option.
    A row is (tokens, [(example, option, start, option tokens)]), start = index of the first option token."""
    rows = []
    for e, (ctx, opts) in enumerate(zip(contexts, options)):
        if any(len(o) == 0 for o in opts):
            raise ValueError(f"example {e}: an option encodes to no tokens")
        if all(len(o) == 1 for o in opts):
            seq = _fit(ctx, 1, max_len)
            rows.append((seq, [(e, i, len(seq), o) for i, o in enumerate(opts)]))
        else:
            for i, o in enumerate(opts):
                seq = _fit(ctx, len(o), max_len)
                rows.append((seq + o, [(e, i, len(seq), o)]))
    return rows


def _fit(ctx: list[int], n_option: int, max_len: int) -> list[int]:
    """Left-truncate the context (keeping its first token, BOS) so context + option fits."""
    if max_len - n_option < 2:
        raise ValueError(f"an option of {n_option} tokens does not fit the model's context of {max_len}")
    return keep_end(ctx, max_len - n_option)


@torch.no_grad()
def score_options(model, contexts: list[list[int]], options: list[list[list[int]]], batch_size: int = 16,
                  max_len: int | None = None) -> list[list[float]]:
    """Sum of log p(option tokens | context), per option, per example (float64 sums)."""
    device = next(model.parameters()).device
    max_len = max_len or model.config.sequence_len
    rows = sorted(_rows(contexts, options, max_len), key=lambda r: len(r[0]))
    scores = [[0.0] * len(o) for o in options]
    for b in range(0, len(rows), batch_size):
        chunk = rows[b:b + batch_size]
        with autocast_ctx(device):
            logits = model(right_padded([seq for seq, _ in chunk], device))
        for i, (_, targets) in enumerate(chunk):
            for e, o, start, toks in targets:
                # the logits at position p predict token p + 1
                logp = torch.log_softmax(logits[i, start - 1:start - 1 + len(toks)].double(), dim=-1)
                idx = torch.tensor(toks, device=logp.device)[:, None]
                scores[e][o] = logp.gather(1, idx).sum().item()
    return scores
