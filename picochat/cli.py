"""The one `picochat` command: a dispatcher. Each command group lives next to its code and adds its own
subcommands, flags and defaults through `register(subparsers)` (COMMAND_MODULES below); a command line
imports only its command's module, so parsing never loads torch (`picochat safety` is HTTP only).

    picochat data prepare --source embedded       corpus -> parquet shards (data/cli.py)
    picochat tokenizer train|eval                 BPE tokenizer (tokenizer_cli.py)
    picochat train base --depth 4                 pretraining (also under torchrun; train/cli.py)
    picochat sample --model base/d4 -p "..."      generate text from a checkpoint (inference/cli.py)

Errors the user can fix (PicochatError, bad flags, a path the OS refuses) print one line and exit non-zero.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from picochat.common import PicochatError, apply_threads


class _Parser(argparse.ArgumentParser):
    """argparse prints usage + error over two lines; we print one line and point at --help."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser. Given the command line, only its command's module is imported, so that `picochat safety`
    (HTTP only) never loads torch; without one, or for --help or an unknown command, every module is."""
    parser = _Parser(prog="picochat", description="Train, evaluate and serve your own small ChatGPT.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    from picochat.data import cli as data_cli
    from picochat.inference import cli as inference_cli
    # `picochat data` has members from two modules: prepare (data/cli.py) and distill (inference/cli.py)
    data = data_cli.register(sub)
    inference_cli.register(sub, data)  # also picochat sample|chat
    # command groups that live next to their code: each module has register(subparsers)
    command = next((a for a in argv or () if not a.startswith("-")), None)
    if command in sub.choices:  # data, sample, chat: registered above
        return parser
    for name in dict.fromkeys([COMMAND_MODULES[command]] if command in COMMAND_MODULES else COMMAND_MODULES.values()):
        importlib.import_module(name).register(sub)
    return parser


COMMAND_MODULES = {  # the command -> the module that registers it
    "tokenizer": "picochat.tokenizer_cli",  # picochat tokenizer train|eval
    "train": "picochat.train.cli",          # picochat train base|mid|sft|rl
    "safety": "picochat.safety.cli",        # picochat safety ...
    "serve": "picochat.serve.cli",          # picochat serve
    "eval": "picochat.eval.cli",            # picochat eval base|chat
    "report": "picochat.eval.cli",          # picochat report
    "bench": "picochat.bench.cli",          # picochat bench attention|train
    "export": "picochat.export.cli",        # picochat export hf
    "import": "picochat.export.cli",        # picochat import hf|nanochat
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    apply_threads(getattr(args, "threads", None))  # before any torch work of the command
    try:
        args.func(args)
    except (PicochatError, ValueError) as e:  # ValueError: invalid values caught deep inside (sampling, configs)
        if os.environ.get("PICOCHAT_DEBUG") and not isinstance(e, PicochatError):
            raise
        print(f"picochat: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a path the OS refuses: missing folder, a file in the way, no permission, full disk
        if os.environ.get("PICOCHAT_DEBUG"):
            raise
        print(f"picochat: error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("picochat: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
