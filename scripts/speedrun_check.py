"""Dry-run checker for gpu_speedrun.sh: parse every planned command without running anything.

Reads one shell-quoted command per line on stdin ("picochat ..." or "torchrun ... -m picochat.cli ...")
and, for each, runs torchrun's own argument parser, picochat's parser, the training settings'
validation (batch arithmetic against the torchrun world size, compile mode), the training task specs,
and `eval`'s --tasks and --data-file (the same checks `picochat eval` makes before loading anything).
Exits non-zero with the offending command on the first failure. Works on a CPU-only machine.
"""
from __future__ import annotations

import contextlib
import io
import os
import shlex
import sys


def check(line: str) -> str:
    """Return '' if the command parses, else the error message."""
    from picochat.cli import build_parser
    from picochat.train.settings import settings_from_args
    from picochat.common import PicochatError
    from picochat.tasks import TRAINABLE, parse_weighted
    argv = shlex.split(line)
    world = 1
    if argv[0] == "torchrun":
        from torch.distributed.run import get_args_parser
        try:
            with contextlib.redirect_stderr(io.StringIO()) as err:
                targs = get_args_parser().parse_args(argv[1:])
        except SystemExit:
            return f"torchrun flags: {err.getvalue().strip().splitlines()[-1]}"
        if not (targs.module and targs.training_script == "picochat.cli"):
            return "torchrun must run -m picochat.cli"
        world = int(targs.nproc_per_node)
        argv = ["picochat", *targs.training_script_args]
    if argv[0] != "picochat":
        return f"not a picochat command: {argv[0]}"
    try:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            args = build_parser().parse_args(argv[1:])
    except SystemExit:
        return err.getvalue().strip() or "argument parsing failed"
    if args.command == "train":
        try:
            seq_len = getattr(args, "seq_len", None) or 2048
            settings = settings_from_args(args, args.stage, args.tag or f"{args.stage}/check", seq_len, {})
            settings.validate(world)
            for spec in (getattr(args, "tasks", "") or "").split(","):
                if spec.strip() and parse_weighted(spec.strip())[0] not in TRAINABLE:
                    return f"unknown task in --tasks: {spec}"
        except PicochatError as e:
            return str(e)
    if args.command == "eval":
        from picochat.eval.cli import parse_data_files, parse_tasks
        try:
            parse_data_files(args.data_file, parse_tasks(args.tasks))
        except PicochatError as e:
            return str(e)
    return ""


def main() -> int:
    lines = [ln.strip() for ln in sys.stdin if ln.strip()]
    for i, line in enumerate(lines, 1):
        problem = check(line)
        if problem:
            print(f"gpu_speedrun.sh: error: command [{i}] does not check out: {problem}", file=sys.stderr)
            return 1
    print(f"dry run: all flags parse for {len(lines)} commands (torchrun world size {os.environ.get('GPUS', '?')}); "
          f"nothing was run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
