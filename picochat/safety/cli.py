"""`picochat safety <stage>`: the safety SFT data workflow on the command line.

    picochat safety check     --config safety.toml     reach every configured endpoint, do nothing else
    picochat safety questions --config safety.toml     seed bank -> red-team questions (train/test by root)
    picochat safety optimize  --config safety.toml     APE loop on the blue system prompt, held-out check
    picochat safety respond   --config safety.toml     best prompt -> single/multi-turn SFT conversations
    picochat safety filter    --config safety.toml     judge every assistant turn, keep/reject, dedup
    picochat safety report    FILE.jsonl               data-quality report of any conversation JSONL
    picochat safety eval      --config safety.toml     refusal / over-refusal of a served model
    picochat safety run       --config safety.toml     all of the above from one config file

The main CLI wires this in with `picochat.safety.cli.register(subparsers)`; until then
`python -m picochat.safety.cli safety <stage> ...` runs it standalone. Each command is a thin
function over the stage modules; user-fixable errors are PicochatError (one line, exit 1).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from picochat.common import PicochatError, number_type


_pos = number_type(int, lambda v: v >= 1, "a positive integer")
_nonneg = number_type(int, lambda v: v >= 0, "an integer >= 0")
_unit = number_type(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
_nonneg_f = number_type(float, lambda v: v >= 0, "a number >= 0")


def _min_score(s: str):
    from picochat.safety.config import DIMENSIONS
    dim, _, val = s.partition("=")
    if dim not in DIMENSIONS or not val.isdigit() or not 1 <= int(val) <= 5:
        raise argparse.ArgumentTypeError(f"expected DIM=N with DIM in {', '.join(DIMENSIONS)} and N in 1..5, got {s!r}")
    return dim, int(val)


# ----------------------------------------------------------------------------- config + overrides

def _config(args, required: bool = True):
    from picochat.safety import config as C
    if required and not args.config:
        raise PicochatError("this command needs --config FILE (TOML or JSON; see docs/safety.md)")
    cfg = C.load(args.config)
    if getattr(args, "out", None):
        cfg.out_dir = Path(args.out).expanduser().resolve()
    if getattr(args, "cache_dir", None):
        cfg.cache_dir = Path(args.cache_dir).expanduser().resolve()
    if getattr(args, "no_preflight", False):
        cfg.preflight = False
    # stage flags override the file; None means "not given"
    mapping = {
        "seed_bank": (cfg.questions, "seed_bank", lambda v: str(Path(v).expanduser().resolve())),
        "num_seeds": (cfg.questions, "num_seeds", None), "per_seed": (cfg.questions, "per_seed", None),
        "test_fraction": (cfg.questions, "test_fraction", None),
        "dedup_threshold": (cfg.questions, "dedup_threshold", None),
        "iterations": (cfg.optimize, "iterations", None), "opt_size": (cfg.optimize, "opt_size", None),
        "heldout_size": (cfg.optimize, "heldout_size", None), "min_gain": (cfg.optimize, "min_gain", None),
        "initial_prompt": (cfg.optimize, "initial_prompt", lambda v: str(Path(v).expanduser().resolve())),
        "prompt": (cfg.respond, "prompt", lambda v: str(Path(v).expanduser().resolve())),
        "multi_turn_fraction": (cfg.respond, "multi_turn_fraction", None),
        "max_user_turns": (cfg.respond, "max_user_turns", None), "respond_limit": (cfg.respond, "limit", None),
        "splits": (cfg.respond, "splits", lambda v: [s.strip() for s in v.split(",") if s.strip()]),
        "input": (cfg.filter, "input", lambda v: str(Path(v).expanduser().resolve())),
        "near_dup_threshold": (cfg.filter, "near_dup_threshold", None),
        "judge": (cfg.eval, "judge", None), "eval_limit": (cfg.eval, "limit", None),
        "questions": (cfg.eval, "questions", lambda v: str(Path(v).expanduser().resolve())),
        "benign": (cfg.eval, "benign", lambda v: str(Path(v).expanduser().resolve())),
        "system_prompt": (cfg.eval, "system_prompt", lambda v: str(Path(v).expanduser().resolve())),
        "name": (cfg.eval, "name", None),
    }
    for flag, (obj, attr, conv) in mapping.items():
        v = getattr(args, flag, None)
        if v is not None:
            setattr(obj, attr, conv(v) if conv else v)
    if getattr(args, "min_score", None):
        cfg.filter.min_scores = dict(cfg.filter.min_scores, **dict(args.min_score))
    if getattr(args, "no_require_pass", False):
        cfg.filter.require_pass = False
    C.validate(cfg)
    return cfg


# ----------------------------------------------------------------------------- commands

def cmd_check(args):
    from picochat.safety.stage import run_stage
    cfg = _config(args)
    if not cfg.roles:
        raise PicochatError("the config defines no roles")
    cfg.preflight = True
    run_stage(cfg, "check", list(cfg.roles), lambda llm: _noop())
    print(f"check: all {len(cfg.roles)} roles reachable: " +
          ", ".join(f"{n}={r.model}@{r.base_url}" for n, r in cfg.roles.items()))


async def _noop():
    return None


def cmd_questions(args):
    from picochat.safety.redteam import run_questions
    run_questions(_config(args))


def cmd_optimize(args):
    from picochat.safety.optimize import run_optimize
    run_optimize(_config(args))


def cmd_respond(args):
    from picochat.safety.respond import run_respond
    run_respond(_config(args))


def cmd_filter(args):
    from picochat.safety.filter import run_filter
    run_filter(_config(args))


def cmd_report(args):
    from picochat.safety.report import run_report
    cfg = _config(args, required=False) if args.config or not args.input else None
    if args.input:
        src = Path(args.input)
        out = Path(args.out) if args.out else src.parent / f"{src.stem}_report"
    else:
        src = cfg.out_dir / "filter" / "kept.jsonl"
        out = Path(args.out) if args.out else cfg.out_dir / "report"
    rejected = args.rejected
    run_dir = args.run_dir
    if cfg is not None and not args.input:  # our own run: pick up rejections and stage counts
        rejected = rejected or (cfg.out_dir / "filter" / "rejected.jsonl")
        run_dir = run_dir or cfg.out_dir
    if rejected and not Path(rejected).exists():
        raise PicochatError(f"--rejected {rejected} not found")
    run_report(src, out, rejected=rejected, run_dir=run_dir)


def cmd_eval(args):
    from picochat.safety.evaluate import run_eval
    run_eval(_config(args))


STAGES = ("questions", "optimize", "respond", "filter", "report", "eval")
# the default order of `safety run`: the report comes last so it includes the eval results and their cost
RUN_ORDER = ("questions", "optimize", "respond", "filter", "eval", "report")


def cmd_run(args):
    from picochat.safety.evaluate import run_eval
    from picochat.safety.filter import run_filter
    from picochat.safety.optimize import run_optimize
    from picochat.safety.redteam import run_questions
    from picochat.safety.report import run_report
    from picochat.safety.respond import run_respond
    cfg = _config(args)
    stages = [s.strip() for s in args.stages.split(",")] if args.stages else \
        [s for s in RUN_ORDER if s != "eval" or cfg.eval.enabled or args.with_eval]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise PicochatError(f"unknown stage(s) {unknown} (stages: {', '.join(STAGES)})")
    # check every role the chosen stages need before the first one starts (no work, then a late failure)
    need = {"questions": ["red"], "optimize": ["blue", "judge", "optimizer"],
            "respond": ["blue"] + (["red"] if cfg.respond.multi_turn_fraction > 0 else []), "filter": ["judge"],
            "eval": ["target"] + (["judge"] if cfg.eval.judge == "llm" else []), "report": []}
    roles = sorted({r for s in stages for r in need[s]})
    for r in roles:
        cfg.role(r)
    if cfg.preflight and roles:
        from picochat.safety.stage import run_stage
        run_stage(cfg, "preflight", roles, lambda llm: _noop())
        cfg.preflight = False  # done once for all stages
    steps = {"questions": run_questions, "optimize": run_optimize, "respond": run_respond, "filter": run_filter,
             "eval": run_eval,
             "report": lambda c: run_report(c.out_dir / "filter" / "kept.jsonl", c.out_dir / "report",
                                            rejected=c.out_dir / "filter" / "rejected.jsonl", run_dir=c.out_dir)}
    for s in stages:
        print(f"== safety {s}", flush=True)
        steps[s](cfg)
    print(f"safety run: done ({', '.join(stages)}) -> {cfg.out_dir}", flush=True)


# ----------------------------------------------------------------------------- parser

def _common(p, config_required: bool = True):
    p.add_argument("--config", metavar="FILE", required=False,
                   help="workflow config, TOML or JSON (roles, stage settings, out_dir)" +
                   ("" if config_required else "; optional here"))
    p.add_argument("--out", metavar="DIR", help="output directory (overrides out_dir from the config)")
    if config_required:
        p.add_argument("--cache-dir", metavar="DIR", help="LLM call cache (default <out>/cache; safe to share between runs)")
        p.add_argument("--no-preflight", action="store_true",
                       help="skip the endpoint check (models.list) that normally runs before any work")


def register(subparsers) -> None:
    """Add the `safety` command and its stages to the main CLI's subparsers."""
    sp = subparsers.add_parser("safety", help="safety SFT data: red team, prompt optimization, blue team, filter, "
                               "report, eval", description="\n\n".join(__doc__.split("\n\n")[:2]),
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog="Config file format, outputs and examples: docs/safety.md")
    st = sp.add_subparsers(dest="safety_stage", required=True, parser_class=type(sp))

    p = st.add_parser("check", help="preflight every role in the config (URL, key, model) and exit")
    _common(p)
    p.set_defaults(func=cmd_check)

    p = st.add_parser("questions", help="red team: seed bank -> adversarial questions, balanced, deduped, split")
    _common(p)
    p.add_argument("--seed-bank", metavar="FILE", help="seed bank JSON (default: the one shipped with picochat)")
    p.add_argument("--num-seeds", type=_pos, metavar="N", help="root seeds to use, spread evenly over domains (default 50)")
    p.add_argument("--per-seed", type=_pos, metavar="N", help="questions per root seed, one attack strategy each (default 7)")
    p.add_argument("--test-fraction", type=_unit, metavar="F", help="share of root seeds held out per domain (default 0.2)")
    p.add_argument("--dedup-threshold", type=_unit, metavar="F", help="shingle Jaccard above which questions are near-duplicates (default 0.7)")
    p.set_defaults(func=cmd_questions)

    p = st.add_parser("optimize", help="APE loop: improve the blue system prompt, adopt only held-out gains")
    _common(p)
    p.add_argument("--iterations", type=_nonneg, metavar="N", help="optimizer iterations (default 3)")
    p.add_argument("--opt-size", type=_pos, metavar="N", help="questions the optimizer learns from (default 100)")
    p.add_argument("--heldout-size", type=_pos, metavar="N", help="held-out questions that decide adoption (default 50)")
    p.add_argument("--min-gain", type=_nonneg_f, metavar="F", help="held-out mean gain a candidate needs to be adopted (default 0)")
    p.add_argument("--initial-prompt", metavar="FILE", help="prompt body to start from (default: built-in v0)")
    p.set_defaults(func=cmd_optimize)

    p = st.add_parser("respond", help="blue team: single- and multi-turn SFT conversations with the best prompt")
    _common(p)
    p.add_argument("--prompt", metavar="FILE", help="full system prompt to use (default <out>/optimize/best_prompt.txt)")
    p.add_argument("--multi-turn-fraction", type=_unit, metavar="F", help="share of questions that become multi-turn (default 0.3)")
    p.add_argument("--max-user-turns", type=number_type(int, lambda v: v >= 2, "an integer >= 2"), metavar="N",
                   help="user turns in a multi-turn conversation: 2..N (default 3)")
    p.add_argument("--limit", dest="respond_limit", type=_nonneg, metavar="N", help="answer at most N questions (default 0 = all)")
    p.add_argument("--splits", help="comma-separated question splits to answer (default train)")
    p.set_defaults(func=cmd_respond)

    p = st.add_parser("filter", help="judge every assistant turn; write kept and rejected (with reasons)")
    _common(p)
    p.add_argument("--input", metavar="FILE", help="conversation JSONL to filter (default <out>/respond/conversations.jsonl)")
    p.add_argument("--min-score", metavar="DIM=N", type=_min_score, action="append",
                   help="minimum score for a dimension, repeatable (e.g. --min-score safety_integrity=5)")
    p.add_argument("--near-dup-threshold", type=_unit, metavar="F", help="Jaccard above which conversations are near-duplicates (default 0.85)")
    p.add_argument("--no-require-pass", action="store_true", help="do not require the judge verdict 'pass' on every turn")
    p.set_defaults(func=cmd_filter)

    p = st.add_parser("report", help="data-quality report (Markdown + PNG) of any conversation JSONL")
    p.add_argument("input", nargs="?", help="conversation JSONL (default <out>/filter/kept.jsonl of --config)")
    _common(p, config_required=False)
    p.add_argument("--rejected", metavar="FILE", help="rejected.jsonl whose reasons to tabulate")
    p.add_argument("--run-dir", metavar="DIR", help="a safety run directory whose failure/retry counts to include")
    p.set_defaults(func=cmd_report)

    p = st.add_parser("eval", help="refusal rate on held-out attacks + over-refusal on benign look-alikes of a served model")
    _common(p)
    p.add_argument("--judge", choices=("llm", "offline"), help="label replies with the judge role or the offline "
                   "keyword/regex classifier (default llm)")
    p.add_argument("--questions", metavar="FILE", help="attack questions JSONL; split 'test' is used (default <out>/questions/questions.jsonl)")
    p.add_argument("--benign", metavar="FILE", help="benign look-alike prompts JSON (default: shipped benign_lookalikes.json)")
    p.add_argument("--system-prompt", metavar="FILE", help="system prompt sent to the target (default: none)")
    p.add_argument("--limit", dest="eval_limit", type=_nonneg, metavar="N", help="at most N attack and N benign prompts (default all)")
    p.add_argument("--name", help="results directory name under <out>/eval/ (default <model>-<hash>)")
    p.set_defaults(func=cmd_eval)

    p = st.add_parser("run", help="run the stages in order from one config file")
    _common(p)
    p.add_argument("--stages", help=f"comma-separated subset, in order (default {','.join(STAGES[:-1])}, plus eval "
                   "before report when [eval] enabled = true)")
    p.add_argument("--with-eval", action="store_true", help="also run the eval stage")
    p.set_defaults(func=cmd_run)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: `python -m picochat.safety.cli safety <stage> ...`."""
    parser = argparse.ArgumentParser(prog="picochat")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except PicochatError as e:
        print(f"picochat: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("picochat: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
