"""`picochat serve`: the OpenAI-compatible API and the web chat UI over one checkpoint.

    picochat serve --model sft/d4                      http://127.0.0.1:8000 (UI at /, API at /v1)
    picochat serve --model sft/d4 --draft base/d2      speculative decoding when the batch is small
    picochat serve --model sft/d4 --host 0.0.0.0 --api-key-file key.txt   reachable from other machines: set a key

Wired into the main CLI through `register(subparsers)`.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys

from picochat.common import PicochatError, add_inference_flags, byte_size, fmt_bytes, nonneg_int, number_type, positive_int
from picochat.serve import DEFAULT_MAX_TOKENS, MAX_BATCH, MAX_BODY_BYTES, MAX_QUEUE

_port = number_type(int, lambda v: 0 <= v <= 65535, "a port number in [0, 65535]")

API_KEY_ENV = "PICOCHAT_API_KEY"


def resolve_api_key(args, environ=os.environ) -> str | None:
    """--api-key-file (first line), else --api-key (with a warning: the command line is visible to
    every user of the machine, e.g. in `ps`), else $PICOCHAT_API_KEY, else None (no auth)."""
    if args.api_key_file:
        try:
            with open(args.api_key_file, encoding="utf-8") as f:
                key = f.readline().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise PicochatError(f"cannot read --api-key-file {args.api_key_file}: {e}") from None
        if not key:
            raise PicochatError(f"--api-key-file {args.api_key_file}: the first line is empty")
        return key
    if args.api_key:
        print(f"picochat: warning: --api-key is visible to other users of this machine (ps, /proc); "
              f"prefer --api-key-file PATH or ${API_KEY_ENV}", file=sys.stderr)
        return args.api_key
    return environ.get(API_KEY_ENV) or None


def _listen(host: str, port: int) -> socket.socket:
    """Bind now (a clear one-line error instead of uvicorn's several) and hand the socket to uvicorn,
    so that --port 0 serves, and prints, the port the system chose."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on such sockets (else every response
    # whose body is written apart from its headers waits ~40 ms for a delayed ACK)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise PicochatError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock


def banner(args, app, port: int, device, with_draft: bool, api_key: str | None) -> str:
    host = f"[{args.host}]" if ":" in args.host else args.host
    lim = app.state.limits
    return (f"picochat serve: {args.model}{' + draft ' + args.draft if with_draft else ''} on {device}; "
            f"chat UI http://{host}:{port}/  API http://{host}:{port}/v1{' (Bearer key required)' if api_key else ''}\n"
            f"limits: max batch {lim['max_batch']} decoded together, queue {lim['max_queue']} more (then 503), "
            f"context {lim['context_length']} tokens per request, body {lim['max_body_bytes']} bytes\n"
            f"memory: weights {fmt_bytes(lim['weight_bytes'])} ({lim['quant']}), KV cache budget "
            f"{fmt_bytes(lim['kv_memory'])} ({lim['kv_memory'] // lim['kv_bytes_per_token']:,} tokens at "
            f"{fmt_bytes(lim['kv_bytes_per_token'])} each; requests beyond it wait)")


def cmd_serve(args) -> None:
    import uvicorn

    from picochat.checkpoint import load_tokenizer
    from picochat.device import pick_device
    from picochat.inference.decode_step import resolve_flags
    from picochat.inference.memory import default_kv_budget
    from picochat.inference.quant import load_for_inference
    from picochat.serve.app import create_app

    api_key = resolve_api_key(args)
    _listen(args.host, args.port).close()  # fail fast, before loading anything
    device = pick_device(args.device)
    dtype = resolve_flags(args, device)
    model, _ = load_for_inference(args.model, device, dtype, args.quant)
    tok = load_tokenizer(args.model)  # each checkpoint carries its own (an imported model keeps nanochat's)
    draft = None
    if args.draft:
        draft, _ = load_for_inference(args.draft, device, dtype, args.quant)
        if draft.config.vocab_size != model.config.vocab_size or not load_tokenizer(args.draft).same_encoding(tok):
            raise PicochatError(f"--draft {args.draft} has another vocabulary than --model {args.model} "
                                f"({draft.config.vocab_size} vs {model.config.vocab_size} tokens, or the same size "
                                "with different tokens): a draft must share its target's tokenizer")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"picochat: warning: serving on {args.host} without an API key: anyone who can reach it can use it")
    app = create_app(model, tok, model_name=args.model, draft=draft, api_key=api_key, max_batch=args.max_batch,
                     max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                     default_max_tokens=args.default_max_tokens, context_length=args.context_length,
                     decode_step=args.decode_step, kv_memory=args.kv_memory or default_kv_budget(device))
    sock = _listen(args.host, args.port)
    print(banner(args, app, sock.getsockname()[1], device, draft is not None, api_key), flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5))
    with sock, contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock])


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible API (+ web chat UI) over a checkpoint",
                              description="\n\n".join(__doc__.split("\n\n")[:2]) + "\n\nAPI reference: docs/serving.md",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sft/d4", help="checkpoint tag to serve; also the API's model id (default %(default)s)")
    p.add_argument("--draft", default=None, metavar="TAG",
                   help="smaller checkpoint (same tokenizer) for speculative decoding while the batch is small (unset: off)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default %(default)s: this machine only; 0.0.0.0 exposes it: set a key)")
    p.add_argument("--port", type=_port, default=8000, help="port (default %(default)s)")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key-file", default=None, metavar="PATH",
                     help="require 'Authorization: Bearer KEY' on every /v1 route, KEY being the first line of PATH "
                          f"(default: ${API_KEY_ENV} if set, else no key)")
    key.add_argument("--api-key", default=None, metavar="KEY",
                     help="the same with KEY on the command line, where other users of the machine can see it "
                          "(prefer --api-key-file or $" + API_KEY_ENV + ")")
    p.add_argument("--max-batch", type=positive_int, default=MAX_BATCH,
                   help="most requests decoded together in the continuous batch (default %(default)s)")
    p.add_argument("--max-queue", type=nonneg_int, default=MAX_QUEUE,
                   help="requests waiting beyond the batch before new ones get 503 + Retry-After (default %(default)s)")
    p.add_argument("--max-body-bytes", type=positive_int, default=MAX_BODY_BYTES,
                   help="request body size limit, else 413 (default %(default)s)")
    p.add_argument("--default-max-tokens", type=positive_int, default=DEFAULT_MAX_TOKENS,
                   help="reply length when a request sets no max_tokens (capped by the context; default %(default)s)")
    p.add_argument("--context-length", type=positive_int, default=None, metavar="N",
                   help="max prompt + completion tokens per request; up to 10x the trained context is allowed, "
                        "but quality degrades past it (default: the model's trained sequence length)")
    p.add_argument("--kv-memory", type=byte_size, default=None, metavar="SIZE",
                   help="most memory the running batch's KV cache may take, e.g. 4G; requests that would pass it wait "
                        "in the queue (default: half the RAM available once the weights are loaded, or 80%% of the "
                        "GPU's free memory)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N|mps (default %(default)s)")
    add_inference_flags(p)
    p.add_argument("--threads", type=nonneg_int, default=0,
                   help="CPU threads used to run the model (default %(default)s: one per core). On a machine shared with other "
                        "busy programs, 1 is often faster")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (default %(default)s)")
    p.set_defaults(func=cmd_serve)
