"""`picochat serve`: the OpenAI-compatible API and the web chat UI over one checkpoint.

    picochat serve --model sft/d4                      http://127.0.0.1:8000 (UI at /, API at /v1)
    picochat serve --model sft/d4 --draft base/d2      speculative decoding when the batch is small
    picochat serve --model sft/d4 --host 0.0.0.0 --api-key KEY   reachable from other machines: set a key

Wired into the main CLI through `register(subparsers)`.
"""
from __future__ import annotations

import argparse
import os
import socket

from picochat.common import PicochatError, number_type

_pos = number_type(int, lambda v: v >= 1, "a positive integer")
_nonneg = number_type(int, lambda v: v >= 0, "an integer >= 0")
_port = number_type(int, lambda v: 0 <= v <= 65535, "a port number in [0, 65535]")

API_KEY_ENV = "PICOCHAT_API_KEY"


def cmd_serve(args) -> None:
    import uvicorn

    from picochat.checkpoint import load_model
    from picochat.common import pick_device, tokenizer_dir
    from picochat.serve.app import create_app
    from picochat.tokenizer import Tokenizer

    try:  # before loading anything: uvicorn would log a bind failure over several lines
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((args.host, args.port))
    except OSError as e:
        raise PicochatError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e})") from None
    device = pick_device(args.device)
    tok = Tokenizer.load(tokenizer_dir())
    model, _ = load_model(args.model, device=device)
    draft = None
    if args.draft:
        draft, _ = load_model(args.draft, device=device)
        if draft.config.vocab_size != model.config.vocab_size:
            raise PicochatError(f"--draft {args.draft} has vocabulary {draft.config.vocab_size}, "
                                f"--model {args.model} has {model.config.vocab_size}: they must match")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"picochat: warning: serving on {args.host} without an API key: anyone who can reach it can use it")
    app = create_app(model, tok, model_name=args.model, draft=draft, api_key=api_key, max_batch=args.max_batch,
                     max_queue=args.max_queue, max_body_bytes=args.max_body_bytes,
                     default_max_tokens=args.default_max_tokens, context_length=args.context_length)
    print(f"picochat serve: {args.model}{' + draft ' + args.draft if draft is not None else ''} on {device}; "
          f"chat UI http://{args.host}:{args.port}/  API http://{args.host}:{args.port}/v1"
          f"{' (Bearer key required)' if api_key else ''}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)


def register(subparsers) -> None:
    """Add `picochat serve` to the main CLI's subparsers."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible API (+ web chat UI) over a checkpoint",
                              description="\n\n".join(__doc__.split("\n\n")[:2]) + "\n\nAPI reference: docs/serving.md",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sft/d4", help="checkpoint tag to serve; also the API's model id (default sft/d4)")
    p.add_argument("--draft", default=None, metavar="TAG",
                   help="smaller checkpoint (same tokenizer) for speculative decoding while the batch is small (default off)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it, set --api-key)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on every /v1 route (default: ${API_KEY_ENV} if set, else none)")
    p.add_argument("--max-batch", type=_pos, default=16,
                   help="most requests decoded together in the continuous batch (default 16)")
    p.add_argument("--max-queue", type=_nonneg, default=64,
                   help="requests waiting beyond the batch before new ones get 503 + Retry-After (default 64)")
    p.add_argument("--max-body-bytes", type=_pos, default=1 << 20, help="request body size limit, else 413 (default 1048576)")
    p.add_argument("--default-max-tokens", type=_pos, default=512,
                   help="reply length when a request sets no max_tokens (capped by the context; default 512)")
    p.add_argument("--context-length", type=_pos, default=None, metavar="N",
                   help="max prompt + completion tokens per request; up to 10x the trained context is allowed, "
                        "but quality degrades past it (default: the model's trained sequence length)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N|mps (default auto)")
    p.add_argument("--threads", type=_nonneg, default=0, help="CPU threads for torch (applied by picochat.cli.main); 0 = torch's default (default 0)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (default info)")
    p.set_defaults(func=cmd_serve)
