"""`picochat eval base|chat` and `picochat report`: evaluate checkpoints, write the report card.

    picochat eval chat --model sft/d4 --tasks aime --data-file tests/fixtures/aime/aime_made_up.jsonl
    picochat eval base --model base/d4 --tasks bpb,arc-easy
    torchrun --nproc_per_node=2 -m picochat.cli eval chat --tasks spelling    (examples sharded)
    picochat report                                                          ($PICOCHAT_HOME/report/report.md)

Results go to eval_<base|chat>_<step>.json next to the checkpoint (eval-<int8|int4>_... with --quant;
one entry per task, merged with earlier runs), written atomically by rank 0. See docs/eval.md.
"""
from __future__ import annotations

import argparse
import json

from picochat.common import THREADS_HELP, PicochatError, add_inference_flags, nonneg_float, positive_int


def parse_tasks(spec: str) -> list[str]:
    from picochat.tasks import TASKS
    names = [t.strip() for t in spec.split(",") if t.strip()]
    if not names:
        raise PicochatError("--tasks is empty; give a comma-separated list, e.g. --tasks aime,gsm8k")
    for n in names:
        if n not in TASKS:
            raise PicochatError(f"unknown task {n!r}; choose from {', '.join(TASKS)}")
    if len(set(names)) != len(names):
        raise PicochatError(f"a task is listed twice in --tasks {spec!r}")
    return names


def parse_data_files(specs: list[str] | None, tasks: list[str]) -> dict[str, str]:
    """--data-file PATH (one task) or --data-file TASK=PATH (repeatable) -> {task: path}."""
    from picochat.tasks import TASKS
    files: dict[str, str] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not (sep and name in TASKS):  # a plain path (which may itself contain '=')
            if len(tasks) != 1:
                raise PicochatError(f"--data-file {spec!r}: with several tasks, name the task: --data-file TASK=PATH")
            name, path = tasks[0], spec
        if name not in tasks:
            raise PicochatError(f"--data-file {spec!r} is for task {name!r}, which is not in --tasks")
        if name in files:
            raise PicochatError(f"two --data-file values for task {name!r}")
        if not path:
            raise PicochatError(f"--data-file {spec!r} has no path")
        files[name] = path
    return files


def _summary(r: dict) -> str:
    if r["kind"] == "bpb":
        return f"bits per byte {r['bpb']:.4f} over {r['n']} rows of {r['rows_of_tokens']} tokens"
    if r["kind"] == "core":
        return f"{r['name']}: {r['core']:.4f} (mean centered accuracy over {len(r['tasks'])} tasks, {r['n']} rows)"
    line = f"accuracy {100 * r['accuracy']:5.1f}% ({r['correct']}/{r['n']})"
    if r["kind"] == "categorical":
        return line + f", chance {100 * r['chance']:.1f}%, by {r['mc_mode']}"
    line = f"pass@1 (greedy) {100 * r['pass@1']:5.1f}% ({r['correct']}/{r['n']})"
    if "tool_copy" in r:
        line += (f", answer == calculator result {100 * r['tool_copy']:.1f}% "
                 f"(of {r['tool_results']} replies with a result)")
    k = r.get("samples")
    if k:
        line += f", pass@{k} {100 * r[f'pass@{k}']:.1f}%"
        if f"maj@{k}" in r:
            line += f", maj@{k} {100 * r[f'maj@{k}']:.1f}%"
        line += f" (T={r['temperature']:g})"
    return line


def cmd_eval(args):
    import torch
    from picochat.checkpoint import load_tokenizer
    from picochat.common import write_json_atomic
    from picochat.device import init_distributed, pick_device
    from picochat.inference.decode_step import resolve_flags
    from picochat.eval import runner
    from picochat.tasks import make_eval_task
    from picochat.inference.engine import Engine
    from picochat.inference.quant import load_for_inference

    tasks = parse_tasks(args.tasks)
    files = parse_data_files(args.data_file, tasks)
    if args.samples > 1 and args.temperature == 0:
        raise PicochatError("--samples > 1 needs --temperature > 0 (greedy samples would all be the same)")
    device = pick_device(args.device)
    dtype = resolve_flags(args, device)  # before the data and the model: a bad flag fails at once
    info = init_distributed(device)
    try:
        # the data first: a bad file should fail before a model is loaded
        loaded = [make_eval_task(n, files.get(n), None if n == "bpb" else args.limit, args.corpus) for n in tasks]
        model, ckpt = load_for_inference(args.model, device, dtype, args.quant)
        tok = load_tokenizer(args.model)
        engine = Engine(model, tok, decode_step=args.decode_step)
        opts = runner.EvalOptions(chat=args.kind == "chat", batch_size=args.batch_size, max_tokens=args.max_tokens,
                                  samples=args.samples, temperature=args.temperature, top_k=args.top_k or None,
                                  seed=args.seed, mc_mode=args.mc_mode)
        results = {}
        for name, task in zip(tasks, loaded):
            if task.kind == "generative":
                r = runner.evaluate_generative(task, engine, tok, opts, info)
            elif task.kind == "categorical":
                r = runner.evaluate_categorical(task, model, tok, opts, info)
            elif task.kind == "core":
                from picochat.eval.core import evaluate_core
                r = evaluate_core(task, model, tok, opts, info)
            else:
                r = runner.evaluate_bits_per_byte(task, model, tok, opts, info, limit=args.limit)
            if r is None:  # not rank 0
                continue
            results[name] = r
            print(f"{args.model} {args.kind} {name:<13} {_summary(r)}  [{r['seconds']:.0f}s, {task.source}]")
            for ex in r.get("examples", [])[:args.show] if r["kind"] == "generative" else []:
                q = task.examples[ex["index"]]
                q = q.get("question") or q.get("task_id") or ""
                print(f"    {'✓' if ex['correct'] else '✗'} {q[:60]!r} -> {ex['reply'][:80]!r}")
        if info.is_master:
            # a quantized model's results sit beside the full-precision ones, not over them
            quant = "" if args.quant == "none" else f"eval-{args.quant}_"
            out = ckpt.path.parent / f"{quant or 'eval_'}{args.kind}_{ckpt.path.name}.json"
            try:
                old = json.loads(out.read_text()).get("results", {})
            except (OSError, ValueError, AttributeError):
                old = {}  # no old file, or an unreadable one: it is replaced, not merged
            write_json_atomic(out, {"model": args.model, "step": ckpt.step, "kind": args.kind, "quant": args.quant,
                                    "stage": ckpt.meta.get("stage"), "results": {**old, **results}})
            print(f"results -> {out}")
        if info.enabled:
            torch.distributed.barrier()  # all ranks finish before any tears down (train/loop.py finish_stage)
    finally:
        if info.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def cmd_report(args):
    from picochat.eval.report import write_report
    path = write_report(dollars_per_hour=args.dollars_per_hour, plots=not args.no_plots)
    print(f"report card -> {path}")


def register(sub) -> None:
    from picochat.tasks import FIELDS, TASKS
    fields = "\n".join(f"  {names}: {what}" for names, what in FIELDS.items())
    p = sub.add_parser("eval", help="evaluate a checkpoint on tasks (accuracy, pass@k, bits per byte)")
    kinds = p.add_subparsers(dest="kind", required=True, parser_class=type(p))
    for kind, default, how in (
            ("chat", "sft/d4", "prompts in the chat template, calculator tool on, multiple choice by letter"),
            ("base", "base/d4", "plain-text prompts, multiple choice by option log-likelihood")):
        q = kinds.add_parser(kind, help=f"evaluate a {kind} model ({how})",
                             formatter_class=argparse.RawDescriptionHelpFormatter,
                             description=f"Evaluate a {kind} model: {how}.\n\n--data-file: one JSON object per "
                                         f"line, fields per task:\n{fields}\n\nSee docs/eval.md.")
        q.add_argument("--model", default=default, help="checkpoint tag (default %(default)s)")
        q.add_argument("--tasks", default="spelling,arithmetic",
                       help=f"comma-separated, from: {', '.join(TASKS)} (default %(default)s)")
        q.add_argument("--limit", type=positive_int, default=None,
                       help="first N examples per task; for bpb, N rows of the model's context; for core, N rows of "
                            "each CORE task after a fixed shuffle; unset = all")
        q.add_argument("--data-file", action="append", metavar="[TASK=]FILE.jsonl",
                       help="read a task's examples from local JSONL instead of its default source (offline); "
                            "a plain path with one task, TASK=PATH (repeatable) with several. Fields per task in "
                            "the description above and docs/eval.md")
        q.add_argument("--samples", type=positive_int, default=1,
                       help="k > 1: also sample k replies per example for pass@k and majority vote maj@k "
                            "(pass@1 is always the greedy reply) (default %(default)s)")
        q.add_argument("--max-tokens", type=positive_int, default=None,
                       help="reply budget in tokens (unset: per task, aime 1024, gsm8k/humaneval 256, "
                            "spelling/arithmetic 64)")
        q.add_argument("--temperature", type=nonneg_float, default=0.8,
                       help="temperature of the --samples (default %(default)s)")
        q.add_argument("--top-k", type=int, default=50, help="top-k of the --samples; 0 = off (default %(default)s)")
        q.add_argument("--batch-size", type=positive_int, default=8,
                       help="prompts per generation batch / rows per scoring forward (default %(default)s)")
        q.add_argument("--mc-mode", default="auto", choices=["auto", "letters", "options"],
                       help="multiple choice by the letter's log-prob or the option text's summed log-prob "
                            "(default %(default)s; auto = letters for chat, options for base)")
        q.add_argument("--corpus", default="embedded",
                       help="prepared corpus whose val split the bpb task reads (default %(default)s)")
        q.add_argument("--show", type=int, default=3, help="generative replies to print per task (default %(default)s)")
        q.add_argument("--seed", type=int, default=0, help="seed of the --samples (default %(default)s)")
        q.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N|mps (default %(default)s)")
        add_inference_flags(q)
        q.add_argument("--threads", type=positive_int, default=None, help=THREADS_HELP)
        q.set_defaults(func=cmd_eval)

    r = sub.add_parser("report", help="write the report card: $PICOCHAT_HOME/report/report.md + PNG plots",
                       description="Gather tokenizer, training (base/mid/SFT), eval results, hardware, wall "
                                   "times and a cost estimate into one Markdown file with plots.")
    r.add_argument("--dollars-per-hour", type=nonneg_float, default=0.10,
                   help="machine price for the cost estimate (default %(default)s: a small cloud CPU VM; "
                        "an 8xH100 node is ~24)")
    r.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    r.set_defaults(func=cmd_report)

