"""`picochat sample`, `picochat chat` and `picochat data distill`: generation from a checkpoint.

    picochat sample --model base/d4 -p "To be"          continue a text
    picochat chat --model sft/d4                        multi-turn chat in the terminal (-p for one shot)
    picochat data distill --target base/d8 --name d8x   a corpus of the target's continuations (draft training)

Wired into the main CLI through `register(subparsers, data_subparsers)`.
"""
from __future__ import annotations

import time

from picochat.common import (THREADS_HELP, PicochatError, add_inference_flags, nonneg_float, nonneg_int, number_type,
                             positive_int)


def _engine(args):
    """An Engine over the model (in the dtype the inference flags ask for), and its tokenizer."""
    from picochat.checkpoint import load_tokenizer
    from picochat.device import pick_device
    from picochat.inference.decode_step import resolve_flags
    from picochat.inference.engine import Engine
    from picochat.inference.quant import load_for_inference
    device = pick_device(args.device)
    model, _ = load_for_inference(args.model, device, resolve_flags(args, device), args.quant)
    tok = load_tokenizer(args.model)
    return Engine(model, tok, decode_step=args.decode_step), tok


def cmd_sample(args):
    from picochat.inference.chat import Detokenizer
    from picochat.inference.sampling import Sampling, check_request
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)  # bad values fail before the model loads
    engine, tok = _engine(args)
    prompt = tok.encode(args.prompt, prepend=tok.bos_token_id)
    # the engine's own check, before the prompt is echoed (else the error line follows the prompt's text)
    check_request([prompt], args.max_tokens, engine.model.config.vocab_size, engine.model.cos.size(0), fed=1)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        text = Detokenizer(tok)
        print(args.prompt, end="")
        for step in engine.generate_stream([prompt], args.max_tokens, sampling.reseeded(i),  # sample i: seed + i
                                           stop_tokens={tok.bos_token_id}):
            if step[0] is None or step[0] == tok.bos_token_id:
                break
            new = text.add(step[0])
            if new is not None:
                print(new, end="", flush=True)
        print(text.rest())


def cmd_chat(args):
    """Multi-turn chat in the terminal (or one-shot with -p), streaming tokens as they come."""
    from picochat.inference.chat import Reply, stream_chat
    from picochat.inference.sampling import Sampling
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)  # bad values fail before the model loads
    engine, tok = _engine(args)
    history: list[dict] = []
    if args.system:
        history.append({"role": "system", "content": args.system})

    def turn(text: str) -> None:
        history.append({"role": "user", "content": text})
        reply = Reply()
        for piece in stream_chat(engine, tok, history, args.max_tokens, sampling, reply=reply):
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": reply.content() or " "})

    if args.prompt is not None:
        turn(args.prompt)
        return
    print(f"picochat chat with {args.model} (temperature {args.temperature}, top-k {args.top_k}, top-p {args.top_p}). "
          f"/clear starts over, /quit or Ctrl-D exits.")
    while True:
        try:
            text = input("\nYou: ").strip()
        except EOFError:
            print()
            return
        if text in ("/quit", "/exit"):
            return
        if text == "/clear":
            del history[int(bool(args.system)):]
            print("(conversation cleared)")
            continue
        if not text:
            continue
        print("Assistant: ", end="")
        turn(text)


def cmd_data_distill(args):
    """The target continues prefixes of a prepared corpus; the texts become a new prepared corpus."""
    import json
    import tempfile
    from pathlib import Path

    from tqdm import tqdm

    from picochat.checkpoint import load_model, load_tokenizer
    from picochat.common import data_dir
    from picochat.device import pick_device
    from picochat.data.corpus import iter_documents, prepare
    from picochat.inference.distill import distill_samples
    out = data_dir(args.name)
    if out.exists() and not args.overwrite:  # fail before minutes of generation
        raise PicochatError(f"{out} already exists; pass --overwrite to replace it")
    docs = [d for d in iter_documents(data_dir(args.source_data), "train") if len(d) > 200]
    if not docs:
        raise PicochatError(f"corpus {args.source_data!r} has no training documents longer than 200 characters")
    tok = load_tokenizer(args.target)
    model, _ = load_model(args.target, device=pick_device(args.device))
    t0 = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{args.name}.distill-") as tmp:
        path = Path(tmp) / f"{args.name}.jsonl"
        with open(path, "w") as f, tqdm(total=args.tokens, desc="distill", unit=" tok", disable=None) as bar:
            for prefix, cont, _ in distill_samples(model, tok, docs, args.tokens, seed=args.seed,
                                                   temperature=args.temperature, greedy_fraction=args.greedy_fraction,
                                                   batch=args.batch_size, length=args.length, progress=bar.update):
                f.write(json.dumps({"text": tok.decode(prefix + cont)}) + "\n")
        meta = prepare(f"local:{path}", out, overwrite=args.overwrite, val_fraction=args.val_fraction)
    print(f"distilled {args.target} -> {out}: {meta['train_docs']:,} train docs ({meta['train_chars']:,} chars), "
          f"{meta['val_docs']:,} val docs in {time.time() - t0:.1f}s; train a draft with "
          f"`picochat train base --depth 2 --data {args.name}`")


def register(subparsers, data_subparsers) -> None:
    """Add `picochat sample` and `picochat chat` to the main CLI, and `distill` under `picochat data`."""
    p = data_subparsers.add_parser("distill", help="a corpus of a target model's continuations, to train a "
                                   "speculative-decoding draft on (docs/inference.md)")
    p.add_argument("--target", required=True, help="checkpoint tag of the target model, e.g. base/d8")
    p.add_argument("--name", required=True, help="name of the corpus to write under $PICOCHAT_HOME/data")
    p.add_argument("--source-data", default="embedded", help="prepared corpus whose training documents give the "
                   "prompts: 16-48-token prefixes from random lines (default %(default)s)")
    p.add_argument("--tokens", type=positive_int, default=200_000, help="tokens the target generates (default %(default)s)")
    p.add_argument("--length", type=positive_int, default=192, help="tokens per continuation (default %(default)s)")
    p.add_argument("--greedy-fraction", type=number_type(float, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
                   default=0.5, help="share of rows decoded greedily, the rest at --temperature (default %(default)s)")
    p.add_argument("--temperature", type=nonneg_float, default=1.0, help="temperature of the sampled rows (default %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="continuations generated together (default %(default)s)")
    p.add_argument("--val-fraction", type=number_type(float, lambda v: 0 < v < 1, "a number in (0, 1)"), default=0.05,
                   help="share held out for validation (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing corpus of that name")
    p.add_argument("--seed", type=int, default=0, help="seed for prompts and sampling (default %(default)s)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N|mps (default %(default)s)")
    p.add_argument("--threads", type=positive_int, default=None, help=THREADS_HELP)
    p.set_defaults(func=cmd_data_distill)

    p = subparsers.add_parser("sample", help="generate text from a checkpoint")
    p.add_argument("--model", default="base/d4", help="checkpoint tag (default %(default)s)")
    p.add_argument("-p", "--prompt", default="", help="text to continue")
    p.add_argument("--max-tokens", type=positive_int, default=100, help="tokens to generate (default %(default)s)")
    p.add_argument("--temperature", type=nonneg_float, default=0.8, help="0 = greedy (default %(default)s)")
    p.add_argument("--top-k", type=nonneg_int, default=50, help="keep the k most likely tokens; 0 = off (default %(default)s)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (unset: off)")
    p.add_argument("-n", "--num-samples", type=positive_int, default=1, help="how many samples (default %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps (default %(default)s)")
    add_inference_flags(p)
    p.add_argument("--threads", type=positive_int, default=None, help=THREADS_HELP)
    p.set_defaults(func=cmd_sample)

    p = subparsers.add_parser("chat", help="chat with a model in the terminal")
    p.add_argument("--model", default="sft/d4", help="checkpoint tag (default %(default)s)")
    p.add_argument("-p", "--prompt", default=None, help="one-shot: answer this message and exit")
    p.add_argument("--system", default=None, help="system message (merged into the first user turn)")
    p.add_argument("--max-tokens", type=positive_int, default=256, help="max tokens per reply (default %(default)s)")
    p.add_argument("--temperature", type=nonneg_float, default=0.6, help="0 = greedy (default %(default)s)")
    p.add_argument("--top-k", type=nonneg_int, default=50, help="0 = off (default %(default)s)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus mass in (0, 1] (unset: off)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible replies")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps (default %(default)s)")
    add_inference_flags(p)
    p.add_argument("--threads", type=positive_int, default=None, help=THREADS_HELP)
    p.set_defaults(func=cmd_chat)
