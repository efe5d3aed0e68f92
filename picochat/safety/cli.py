"""`picochat safety <stage>`: the safety SFT data workflow on the command line.

    picochat safety check     --config safety.toml     reach every configured endpoint, do nothing else
    picochat safety questions --config safety.toml     seed bank -> red-team questions (train/test by root)
    picochat safety optimize  --config safety.toml     APE loop on the blue system prompt, held-out check
    picochat safety respond   --config safety.toml     best prompt -> single/multi-turn SFT conversations
    picochat safety filter    --config safety.toml     judge every assistant turn, keep/reject, dedup
    picochat safety report    FILE.jsonl               data-quality report of any conversation JSONL
    picochat safety eval      --config safety.toml     refusal / over-refusal of a served model
    picochat safety run       --config safety.toml     all of the above from one config file

The main CLI wires this in with `register(subparsers)`. Each command is a thin function over the
stage modules; user-fixable errors are PicochatError (one line, exit 1).
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
from pathlib import Path

from picochat.common import PicochatError, nonneg_int, number_type, positive_int


_unit = number_type(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
_nonneg_f = number_type(float, lambda v: v >= 0, "a number >= 0")


def _path(v: str) -> str:
    return str(Path(v).expanduser().resolve())


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
    # stage flags override the file (their dest is "cfg.<section>.<field>"); None means "not given"
    for dest, v in vars(args).items():
        if dest.startswith("cfg.") and v is not None:
            _, section, key = dest.split(".")
            setattr(getattr(cfg, section), key, v)
    if getattr(args, "min_score", None):
        cfg.filter.min_scores = dict(cfg.filter.min_scores, **dict(args.min_score))
    C.validate(cfg)
    return cfg


# ----------------------------------------------------------------------------- commands

def cmd_check(args):
    from picochat.safety.stage import run_stage
    cfg = _config(args)
    if not cfg.roles:
        raise PicochatError("the config defines no roles")
    cfg.preflight = True
    run_stage(cfg, "check", list(cfg.roles), lambda llm: asyncio.sleep(0))
    print(f"check: all {len(cfg.roles)} roles reachable: " +
          ", ".join(f"{n}={r.model}@{r.base_url}" for n, r in cfg.roles.items()))


# the stage modules' entry points, each run(cfg); imported on use (the stage modules pull in the HTTP client)
RUNNERS = {"questions": ("redteam", "run_questions"), "optimize": ("optimize", "run_optimize"),
           "respond": ("respond", "run_respond"), "filter": ("filter", "run_filter"), "eval": ("evaluate", "run_eval")}


def _runner(stage: str):
    module, name = RUNNERS[stage]
    return getattr(importlib.import_module(f"picochat.safety.{module}"), name)


def cmd_stage(args):
    """`picochat safety questions|optimize|respond|filter|eval`: one stage from the config."""
    _runner(args.safety_stage)(_config(args))


def cmd_report(args):
    from picochat.safety.report import run_report
    cfg = _config(args, required=False) if args.config or not args.input else None
    if args.input:
        src, rejected, run_dir = Path(args.input), args.rejected, args.run_dir
        out = Path(args.out) if args.out else src.parent / f"{src.stem}_report"
    else:  # our own run: pick up rejections and stage counts
        src = cfg.out_dir / "filter" / "kept.jsonl"
        out = Path(args.out) if args.out else cfg.out_dir / "report"
        rejected = args.rejected or cfg.out_dir / "filter" / "rejected.jsonl"
        run_dir = args.run_dir or cfg.out_dir
    if rejected and not Path(rejected).exists():
        raise PicochatError(f"--rejected {rejected} not found")
    run_report(src, out, rejected=rejected, run_dir=run_dir)


STAGES = ("questions", "optimize", "respond", "filter", "report", "eval")
# the default order of `safety run`: the report comes last so it includes the eval results and their cost
RUN_ORDER = ("questions", "optimize", "respond", "filter", "eval", "report")


def cmd_run(args):
    from picochat.safety.report import run_report
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
        run_stage(cfg, "preflight", roles, lambda llm: asyncio.sleep(0))
        cfg.preflight = False  # done once for all stages
    for s in stages:
        print(f"== safety {s}", flush=True)
        if s == "report":
            run_report(cfg.out_dir / "filter" / "kept.jsonl", cfg.out_dir / "report",
                       rejected=cfg.out_dir / "filter" / "rejected.jsonl", run_dir=cfg.out_dir)
        else:
            _runner(s)(cfg)
    print(f"safety run: done ({', '.join(stages)}) -> {cfg.out_dir}", flush=True)


# ----------------------------------------------------------------------------- parser

def _common(p, config_required: bool = True):
    p.add_argument("--config", metavar="FILE", required=False,
                   help="workflow config, TOML or JSON (roles, stage settings, out_dir)" +
                   ("" if config_required else "; optional here"))
    p.add_argument("--out", metavar="DIR", help="output directory (overrides out_dir from the config)")
    if config_required:
        p.add_argument("--cache-dir", metavar="DIR", help="LLM call cache (unset: <out>/cache; safe to share between runs)")
        p.add_argument("--no-preflight", action="store_true",
                       help="skip the endpoint check (models.list) that normally runs before any work")


# each stage's flags that override one field of the stage's config section (safety/config.py), with the
# help's default read from that field: (field, type, metavar, help, what an empty default means)
STAGE_FLAGS = {
    "questions": (
        ("seed_bank", _path, "FILE", "seed bank JSON", "the one shipped with picochat"),
        ("num_seeds", positive_int, "N", "root seeds to use, spread evenly over domains", None),
        ("per_seed", positive_int, "N", "questions per root seed, one attack strategy each", None),
        ("test_fraction", _unit, "F", "share of root seeds held out per domain", None),
        ("dedup_threshold", _unit, "F", "shingle Jaccard above which questions are near-duplicates", None)),
    "optimize": (
        ("iterations", nonneg_int, "N", "optimizer iterations", None),
        ("opt_size", positive_int, "N", "questions the optimizer learns from", None),
        ("heldout_size", positive_int, "N", "held-out questions that decide adoption", None),
        ("min_gain", _nonneg_f, "F", "held-out mean gain a candidate needs to be adopted", None),
        ("initial_prompt", _path, "FILE", "prompt body to start from", "built-in v0")),
    "respond": (
        ("prompt", _path, "FILE", "full system prompt to use", "<out>/optimize/best_prompt.txt"),
        ("multi_turn_fraction", _unit, "F", "share of questions that become multi-turn", None),
        ("max_user_turns", number_type(int, lambda v: v >= 2, "an integer >= 2"), "N",
         "user turns in a multi-turn conversation: 2..N", None),
        ("limit", nonneg_int, "N", "answer at most N questions; 0 = all", None),
        ("splits", lambda v: [s.strip() for s in v.split(",") if s.strip()], "SPLITS", "comma-separated question splits to answer", None)),
    "filter": (
        ("input", _path, "FILE", "conversation JSONL to filter", "<out>/respond/conversations.jsonl"),
        ("near_dup_threshold", _unit, "F", "Jaccard above which conversations are near-duplicates", None)),
    "eval": (
        ("judge", None, "{llm,offline}", "label replies with the judge role (llm) or the offline keyword/regex "
                                         "classifier", None),
        ("questions", _path, "FILE", "attack questions JSONL; split 'test' is used", "<out>/questions/questions.jsonl"),
        ("benign", _path, "FILE", "benign look-alike prompts JSON", "shipped benign_lookalikes.json"),
        ("system_prompt", _path, "FILE", "system prompt sent to the target", "none"),
        ("limit", nonneg_int, "N", "at most N attack and N benign prompts; 0 = all", None),
        ("name", None, "NAME", "results directory name under <out>/eval/", "<model>-<hash>")),
}


def _stage_flags(p, stage: str) -> None:
    try:
        from picochat.safety.config import SafetyConfig
        section = getattr(SafetyConfig(), stage)
    except ImportError:  # no pydantic (installed without the safety extra): `picochat --help` still works
        section = None
    for key, kind, metavar, what, empty in STAGE_FLAGS[stage]:
        default = getattr(section, key, "unknown")
        shown = empty or (",".join(default) if isinstance(default, list) else default)
        p.add_argument("--" + key.replace("_", "-"), dest=f"cfg.{stage}.{key}", type=kind, metavar=metavar,
                       choices=("llm", "offline") if key == "judge" else None, help=f"{what} (default {shown})")


def register(subparsers) -> None:
    """Add the `safety` command and its stages to the main CLI's subparsers."""
    sp = subparsers.add_parser("safety", help="safety SFT data: red team, prompt optimization, blue team, filter, "
                               "report, eval", description="\n\n".join(__doc__.split("\n\n")[:2]),
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog="Config file format, outputs and examples: docs/safety.md")
    st = sp.add_subparsers(dest="safety_stage", required=True, parser_class=type(sp))

    parsers = {}
    for name, what in (
            ("check", "preflight every role in the config (URL, key, model) and exit"),
            ("questions", "red team: seed bank -> adversarial questions, balanced, deduped, split"),
            ("optimize", "APE loop: improve the blue system prompt, adopt only held-out gains"),
            ("respond", "blue team: single- and multi-turn SFT conversations with the best prompt"),
            ("filter", "judge every assistant turn; write kept and rejected (with reasons)"),
            ("report", "data-quality report (Markdown + PNG) of any conversation JSONL"),
            ("eval", "refusal rate on held-out attacks + over-refusal on benign look-alikes of a served model"),
            ("run", "run the stages in order from one config file")):
        p = parsers[name] = st.add_parser(name, help=what)
        if name == "report":
            p.add_argument("input", nargs="?", help="conversation JSONL (unset: <out>/filter/kept.jsonl of --config)")
        _common(p, config_required=name != "report")
        if name in STAGE_FLAGS:
            _stage_flags(p, name)
        p.set_defaults(func={"check": cmd_check, "report": cmd_report, "run": cmd_run}.get(name, cmd_stage))

    p = parsers["filter"]
    p.add_argument("--min-score", metavar="DIM=N", type=_min_score, action="append",
                   help="minimum score for a dimension, repeatable (e.g. --min-score safety_integrity=5)")
    p.add_argument("--no-require-pass", dest="cfg.filter.require_pass", action="store_const", const=False,
                   help="do not require the judge verdict 'pass' on every turn")
    p = parsers["report"]
    p.add_argument("--rejected", metavar="FILE", help="rejected.jsonl whose reasons to tabulate")
    p.add_argument("--run-dir", metavar="DIR", help="a safety run directory whose failure/retry counts to include")
    p = parsers["run"]
    p.add_argument("--stages", help=f"comma-separated subset, in order (default {','.join(STAGES[:-1])}, plus eval "
                   "before report when [eval] enabled = true)")
    p.add_argument("--with-eval", action="store_true", help="also run the eval stage")
