"""The safety workflow's config file (TOML or JSON): LLM roles and per-stage settings.

The dataclasses below are the schema (docs/safety.md has a full example). Every key is checked: an
unknown section, role or key, a wrong type, or an API key pasted into the file is a PicochatError
before any work starts (typos must not silently fall back to defaults). Keys come from the
environment variable that a role's api_key_env names.
"""
from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from picochat.common import PicochatError, home

ROLE_NAMES = ("red", "blue", "judge", "optimizer", "target")
DIMENSIONS = ("safety_integrity", "context_robustness", "refusal_specificity",
              "educational_redirection", "tone_and_style", "precision")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
STD_PARAMS = ("max_tokens", "temperature", "seed")  # what picochat sends besides model and messages


def _num(default, rule: str = ">=", low: int = 0):
    """A role's number field; validate() requires `value <rule> low`."""
    return field(default=default, metadata={"bound": (rule, low)})


@dataclass
class RoleConfig:
    """One LLM endpoint. api_key_env = "" means the endpoint needs no key (e.g. a local server)."""
    name: str = ""
    base_url: str = "https://api.openai.com/v1"
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = _num(0.7)
    max_tokens: int = _num(1024, ">=", 1)
    concurrency: int = _num(4, ">=", 1)
    timeout_s: float = _num(60.0, ">")
    max_retries: int = _num(5)
    backoff_base_s: float = _num(1.0)
    backoff_max_s: float = _num(30.0)
    retry_after_max_s: float = _num(120.0)  # a Retry-After longer than this is capped, not obeyed blindly
    preflight_timeout_s: float = _num(10.0, ">")
    price_in_per_1m: float = _num(0.0)      # USD per 1M prompt tokens, for costs.json
    price_out_per_1m: float = _num(0.0)     # USD per 1M completion tokens
    check_model: bool = True                # preflight: the model must be listed by /models
    # a `seed` derived from the request and its sample index: re-samples (sample 1, 2, ...) of the same
    # request then differ on servers that honour it, and a rerun asks for exactly the same thing
    send_seed: bool = True
    # re-samples (sample index >= 1, e.g. after an unparseable judge reply) use at least this temperature:
    # at temperature 0 a re-sample would just repeat the reply that failed
    resample_temperature: float = _num(0.7)
    # how the standard request parameters are sent: {name: "other_name"} renames one, {name: false}
    # leaves it out. Reasoning models: {max_tokens = "max_completion_tokens", temperature = false}
    params: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # more JSON body fields, sent as they are (reasoning_effort ...)


@dataclass
class QuestionsConfig:
    seed_bank: str = ""          # "" = the bank shipped in picochat/safety/seed_bank.json
    num_seeds: int = 50          # root seeds used, picked round-robin over domains
    per_seed: int = 7            # questions per root seed (7 = one per attack strategy)
    test_fraction: float = 0.2   # share of root seeds (per domain) held out for the safety eval
    dedup_threshold: float = 0.7  # Jaccard of character shingles above which questions are near-dups
    shingle: int = 5
    num_perm: int = 128
    split_seed: int = 0


@dataclass
class OptimizeConfig:
    iterations: int = 3
    opt_size: int = 100          # questions the optimizer learns from
    heldout_size: int = 50       # separate questions (disjoint roots) that decide adoption
    min_gain: float = 0.0        # a candidate must beat the best held-out mean by more than this
    min_judged_fraction: float = 0.8  # too many judge errors on the held-out split = no decision
    fail_below: int = 4          # an answer with any dimension below this goes to the optimizer
    max_failures: int = 8        # failures shown to the optimizer per iteration
    guard_retries: int = 1       # extra optimizer samples when the guard rejects a candidate
    guard_min_chars: int = 200
    guard_max_chars: int = 6000
    initial_prompt: str = ""     # path to a prompt body; "" = the built-in v0
    assistant_name: str = "picochat"
    # benign look-alike prompts scored next to the attacks, so a prompt that over-refuses loses points:
    # up to benign_size per split (opt and held-out get disjoint halves); "" = the shipped
    # benign_optimize.json, which is disjoint from the eval's benign_lookalikes.json
    benign: str = ""
    benign_size: int = 20


@dataclass
class RespondConfig:
    splits: list = field(default_factory=lambda: ["train"])
    multi_turn_fraction: float = 0.3
    max_user_turns: int = 3      # multi-turn conversations get 2..max_user_turns user turns
    limit: int = 0               # 0 = all questions
    prompt: str = ""             # path to a full system prompt; "" = optimize/best_prompt.txt


@dataclass
class FilterConfig:
    min_scores: dict = field(default_factory=lambda: {"safety_integrity": 4, "context_robustness": 3,
                                                      "refusal_specificity": 3, "educational_redirection": 3,
                                                      "tone_and_style": 3, "precision": 3})
    require_pass: bool = True    # also require the judge's verdict "pass" on every assistant turn
    near_dup_threshold: float = 0.85
    input: str = ""              # "" = respond/conversations.jsonl


@dataclass
class EvalConfig:
    judge: str = "llm"           # llm | offline (the keyword/regex classifier, for CI)
    limit: int = 0               # 0 = every held-out attack and benign prompt
    benign: str = ""             # "" = picochat/safety/benign_lookalikes.json
    questions: str = ""          # "" = questions/questions.jsonl (split "test")
    system_prompt: str = ""      # path; "" = send no system prompt to the target
    name: str = ""               # results go to eval/<name>/; "" = <model>-<hash of endpoint+model+prompt>
    enabled: bool = False        # whether `safety run` runs the eval stage


@dataclass
class SafetyConfig:
    out_dir: Path = field(default_factory=lambda: home() / "safety" / "run")
    cache_dir: Path | None = None      # default <out_dir>/cache
    preflight: bool = True
    judge_retries: int = 1             # re-samples of a judge reply that fails to parse
    roles: dict = field(default_factory=dict)
    questions: QuestionsConfig = field(default_factory=QuestionsConfig)
    optimize: OptimizeConfig = field(default_factory=OptimizeConfig)
    respond: RespondConfig = field(default_factory=RespondConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    base_dir: Path = field(default_factory=Path.cwd)  # where relative paths in the file resolve

    @property
    def cache(self) -> Path:
        return self.cache_dir or (self.out_dir / "cache")

    def resolve(self, p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else self.base_dir / q

    def role(self, name: str) -> RoleConfig:
        if name not in self.roles:
            raise PicochatError(f"this stage needs the {name!r} role; add a [roles.{name}] section to the config")
        return self.roles[name]


# what a TOML/JSON value must be for a field of each type (the dataclasses above are the schema)
_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
          dict: "a table/object"}


def _check_type(where: str, key: str, value, kind: type):
    """Validate one value against its field's type; ints are accepted (and converted) for floats,
    but a bool is never a number."""
    accepted = (int, float) if kind is float else kind
    if not isinstance(value, accepted) or (kind is not bool and isinstance(value, bool)):
        raise PicochatError(f"{where}.{key} must be {_KINDS[kind]}, got {value!r}")
    return float(value) if kind is float else value


def _unknown(what: str, allowed, key: str) -> PicochatError:
    hint = "; API keys belong in environment variables (set api_key_env)" if "key" in key.lower() else ""
    return PicochatError(f"unknown {what} (allowed: {', '.join(allowed)}){hint}")


def _fill(cls, where: str, data, base=None):
    if not isinstance(data, dict):
        raise PicochatError(f"[{where}] must be a table/object")
    obj = dataclasses.replace(base) if base is not None else cls()
    kinds = {k: v for k, v in get_type_hints(cls).items() if k != "name"}
    for key, value in data.items():
        if key not in kinds:
            raise _unknown(f"key {where}.{key}", sorted(kinds), key)
        setattr(obj, key, _check_type(where, key, value, kinds[key]))
    return obj


def _validate_role(r: RoleConfig) -> None:
    w = f"roles.{r.name}"
    if not r.model:
        raise PicochatError(f"{w}.model is required")
    if not re.match(r"^https?://[^/\s]+", r.base_url):
        raise PicochatError(f"{w}.base_url must be an http(s) URL, got {r.base_url!r}")
    if r.api_key_env and not _ENV_NAME.match(r.api_key_env):
        # someone pasted the key itself: say so without echoing it anywhere
        raise PicochatError(f"{w}.api_key_env must be the NAME of an environment variable holding the key, "
                            f"not the key itself")
    for f in dataclasses.fields(r):
        if "bound" in f.metadata:
            rule, low = f.metadata["bound"]
            v = getattr(r, f.name)
            if v < low or (rule == ">" and v == low):
                raise PicochatError(f"{w}.{f.name} must be {rule} {low}")
    for k, v in r.params.items():
        if k not in STD_PARAMS:
            raise PicochatError(f"{w}.params.{k}: unknown parameter (params can rename or drop: "
                                f"{', '.join(STD_PARAMS)})")
        if not (v is False or v is True or (isinstance(v, str) and _ENV_NAME.match(v))):
            raise PicochatError(f"{w}.params.{k} must be false (do not send it) or the name to send it under, "
                                f"got {v!r}")
    sent = sent_names(r)
    for k, v in r.extra.items():
        # extra is saved in config.json next to the outputs: a credential must never ride along in it
        if re.search(r"key|secret|auth|password", k, re.IGNORECASE) or (isinstance(v, str) and re.match(r"sk-\w{6}", v)):
            raise PicochatError(f"{w}.extra.{k}: credentials do not belong in the config; API keys come from "
                                f"the environment variable named by api_key_env")
        if k in ("model", "messages") or k in sent:
            raise PicochatError(f"{w}.extra.{k} is already sent by picochat (drop or rename it in "
                                f"{w}.params first)")


def validate(cfg: SafetyConfig) -> None:
    """Check value ranges (also after CLI overrides); PicochatError on the first problem."""
    q, o, rs, fl, ev = cfg.questions, cfg.optimize, cfg.respond, cfg.filter, cfg.eval
    checks = [
        (q.num_seeds >= 1, "questions.num_seeds must be >= 1"),
        (q.per_seed >= 1, "questions.per_seed must be >= 1"),
        (0 <= q.test_fraction < 1, "questions.test_fraction must be in [0, 1)"),
        (0 < q.dedup_threshold <= 1, "questions.dedup_threshold must be in (0, 1]"),
        (q.shingle >= 1 and q.num_perm >= 8, "questions.shingle must be >= 1 and num_perm >= 8"),
        (o.iterations >= 0, "optimize.iterations must be >= 0"),
        (o.opt_size >= 1 and o.heldout_size >= 1, "optimize.opt_size and heldout_size must be >= 1"),
        (o.benign_size >= 0, "optimize.benign_size must be >= 0"),
        (1 <= o.fail_below <= 6, "optimize.fail_below must be in 1..6"),
        (0 < o.min_judged_fraction <= 1, "optimize.min_judged_fraction must be in (0, 1]"),
        (0 < o.guard_min_chars < o.guard_max_chars, "optimize.guard_min_chars must be < guard_max_chars"),
        (0 <= rs.multi_turn_fraction <= 1, "respond.multi_turn_fraction must be in [0, 1]"),
        (rs.max_user_turns >= 2, "respond.max_user_turns must be >= 2"),
        (set(rs.splits) <= {"train", "test"} and rs.splits, "respond.splits must be a non-empty subset of [train, test]"),
        (0 < fl.near_dup_threshold <= 1, "filter.near_dup_threshold must be in (0, 1]"),
        (ev.judge in ("llm", "offline"), "eval.judge must be 'llm' or 'offline'"),
        (cfg.judge_retries >= 0, "judge_retries must be >= 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise PicochatError(msg)
    for dim, v in fl.min_scores.items():
        if dim not in DIMENSIONS:
            raise PicochatError(f"filter.min_scores: unknown dimension {dim!r} (known: {', '.join(DIMENSIONS)})")
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 5:
            raise PicochatError(f"filter.min_scores.{dim} must be an integer 1..5")
    for r in cfg.roles.values():
        _validate_role(r)


def _roles(value) -> dict:
    """[roles]: [roles.default] is inherited by every named role."""
    if not isinstance(value, dict):
        raise PicochatError("[roles] must be a table/object of role tables")
    base = _fill(RoleConfig, "roles.default", value.get("default", {}))
    roles = {}
    for name, spec in value.items():
        if name == "default":
            continue
        if name not in ROLE_NAMES:
            raise PicochatError(f"unknown role {name!r} (roles: {', '.join(ROLE_NAMES)}, plus 'default')")
        roles[name] = dataclasses.replace(_fill(RoleConfig, f"roles.{name}", spec, base), name=name)
    return roles


def from_dict(data: dict, base_dir: Path | None = None) -> SafetyConfig:
    """Build and validate a SafetyConfig from parsed TOML/JSON."""
    if not isinstance(data, dict):
        raise PicochatError("the config must be a table/object at the top level")
    cfg = SafetyConfig(base_dir=Path(base_dir) if base_dir else Path.cwd())
    kinds = {k: v for k, v in get_type_hints(SafetyConfig).items() if k != "base_dir"}
    for key, value in data.items():
        kind = kinds.get(key)
        if kind is None:
            raise _unknown(f"top-level key {key!r}", kinds, key)
        if dataclasses.is_dataclass(kind):  # a [section]
            setattr(cfg, key, _fill(kind, key, value))
        elif key == "roles":
            cfg.roles = _roles(value)
        elif key in ("out_dir", "cache_dir"):
            if not isinstance(value, str) or not value:
                raise PicochatError(f"{key} must be a non-empty string path")
            setattr(cfg, key, cfg.resolve(value))
        else:
            setattr(cfg, key, _check_type("", key, value, kind))
    validate(cfg)
    return cfg


def load(path: str | Path | None) -> SafetyConfig:
    """Load a config file (.toml or .json); None gives the defaults (no roles: fine for `report`)."""
    if path is None:
        return from_dict({})
    path = Path(path).expanduser()
    if not path.is_file():
        raise PicochatError(f"config file {path} not found")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise PicochatError(f"{path}: cannot parse config ({e})") from None
    return from_dict(data, base_dir=path.resolve().parent)


def to_public_dict(cfg: SafetyConfig) -> dict[str, Any]:
    """The config as saved next to outputs: env var NAMES only, never values."""
    d = dataclasses.asdict(cfg)
    d.pop("base_dir", None)
    for k in ("out_dir", "cache_dir"):  # the only paths
        d[k] = None if d[k] is None else str(d[k])
    return d


def sent_names(r: RoleConfig) -> dict[str, str]:
    """{the name a standard parameter is sent under: the parameter}, as the role's `params` rename or drop them."""
    return {(k if v is True else v): k for k in STD_PARAMS if (v := r.params.get(k, True)) is not False}


def request_params(r: RoleConfig, temperature: float, max_tokens: int, seed: int | None) -> dict:
    """The JSON body fields besides model and messages, as the role's `params` and `extra` say."""
    std = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
    return {name: std[k] for name, k in sent_names(r).items() if std[k] is not None} | r.extra
