"""The safety workflow's config file (TOML or JSON): LLM roles and per-stage settings.

The pydantic models below are the schema: every key with its type, default and allowed range
(docs/safety.md has a full example). Every key is checked: an unknown section, role or key, a wrong
type, an out-of-range value or an API key pasted into the file is a PicochatError naming the key
before any work starts (typos must not silently fall back to defaults). Keys come from the
environment variable that a role's api_key_env names.
"""
from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from picochat.common import PicochatError, home

ROLE_NAMES = ("red", "blue", "judge", "optimizer", "target")
DIMENSIONS = ("safety_integrity", "context_robustness", "refusal_specificity",
              "educational_redirection", "tone_and_style", "precision")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
STD_PARAMS = ("max_tokens", "temperature", "seed")  # what picochat sends besides model and messages


class _Section(BaseModel):
    # strict: "4" is not an integer and true is not a number (an int is still a float)
    model_config = ConfigDict(extra="forbid", strict=True)


class RoleConfig(_Section):
    """One LLM endpoint. api_key_env = "" means the endpoint needs no key (e.g. a local server)."""
    name: str = ""
    base_url: str = "https://api.openai.com/v1"
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = Field(0.7, ge=0)
    max_tokens: int = Field(1024, ge=1)
    concurrency: int = Field(4, ge=1)
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(5, ge=0)
    backoff_base_s: float = Field(1.0, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    retry_after_max_s: float = Field(120.0, ge=0)  # a Retry-After longer than this is capped, not obeyed blindly
    preflight_timeout_s: float = Field(10.0, gt=0)
    price_in_per_1m: float = Field(0.0, ge=0)      # USD per 1M prompt tokens, for costs.json
    price_out_per_1m: float = Field(0.0, ge=0)     # USD per 1M completion tokens
    check_model: bool = True                        # preflight: the model must be listed by /models
    # a `seed` derived from the request and its sample index: re-samples (sample 1, 2, ...) of the same
    # request then differ on servers that honour it, and a rerun asks for exactly the same thing
    send_seed: bool = True
    # re-samples (sample index >= 1, e.g. after an unparseable judge reply) use at least this temperature:
    # at temperature 0 a re-sample would just repeat the reply that failed
    resample_temperature: float = Field(0.7, ge=0)
    # how the standard request parameters are sent: {name: "other_name"} renames one, {name: false}
    # leaves it out. Reasoning models: {max_tokens = "max_completion_tokens", temperature = false}
    params: dict = Field(default_factory=dict)
    extra: dict = Field(default_factory=dict)  # more JSON body fields, sent as they are (reasoning_effort ...)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError(f"must be an http(s) URL, got {v!r}")
        return v

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str) -> str:
        if v and not _ENV_NAME.match(v):  # someone pasted the key itself: say so without echoing it anywhere
            raise ValueError("must be the NAME of an environment variable holding the key, not the key itself")
        return v

    @model_validator(mode="after")
    def _request_fields(self) -> RoleConfig:
        if self.name and not self.model:  # [roles.default] may leave the model to each role
            raise ValueError("model is required")
        for k, v in self.params.items():
            if k not in STD_PARAMS:
                raise ValueError(f"params.{k}: unknown parameter (params can rename or drop: {', '.join(STD_PARAMS)})")
            if not (v is False or v is True or (isinstance(v, str) and _ENV_NAME.match(v))):
                raise ValueError(f"params.{k} must be false (do not send it) or the name to send it under, got {v!r}")
        sent = sent_names(self)
        for k, v in self.extra.items():
            # extra is saved in config.json next to the outputs: a credential must never ride along in it
            if re.search(r"key|secret|auth|password", k, re.IGNORECASE) or \
                    (isinstance(v, str) and re.match(r"sk-\w{6}", v)):
                raise ValueError(f"extra.{k}: credentials do not belong in the config; API keys come from "
                                 f"the environment variable named by api_key_env")
            if k in ("model", "messages") or k in sent:
                raise ValueError(f"extra.{k} is already sent by picochat (drop or rename it in params first)")
        return self


class QuestionsConfig(_Section):
    seed_bank: str = ""          # "" = the bank shipped in picochat/safety/seed_bank.json
    num_seeds: int = Field(50, ge=1)  # root seeds used, picked round-robin over domains
    per_seed: int = Field(7, ge=1)    # questions per root seed (7 = one per attack strategy)
    test_fraction: float = Field(0.2, ge=0, lt=1)   # share of root seeds (per domain) held out for the safety eval
    dedup_threshold: float = Field(0.7, gt=0, le=1)  # Jaccard of character shingles above which questions are near-dups
    shingle: int = Field(5, ge=1)
    num_perm: int = Field(128, ge=8)
    split_seed: int = 0


class OptimizeConfig(_Section):
    iterations: int = Field(3, ge=0)
    opt_size: int = Field(100, ge=1)     # questions the optimizer learns from
    heldout_size: int = Field(50, ge=1)  # separate questions (disjoint roots) that decide adoption
    min_gain: float = 0.0        # a candidate must beat the best held-out mean by more than this
    min_judged_fraction: float = Field(0.8, gt=0, le=1)  # too many judge errors on the held-out split = no decision
    fail_below: int = Field(4, ge=1, le=6)  # an answer with any dimension below this goes to the optimizer
    max_failures: int = 8        # failures shown to the optimizer per iteration
    guard_retries: int = 1       # extra optimizer samples when the guard rejects a candidate
    guard_min_chars: int = Field(200, gt=0)
    guard_max_chars: int = 6000
    initial_prompt: str = ""     # path to a prompt body; "" = the built-in v0
    assistant_name: str = "picochat"
    # benign look-alike prompts scored next to the attacks, so a prompt that over-refuses loses points:
    # up to benign_size per split (opt and held-out get disjoint halves); "" = the shipped
    # benign_optimize.json, which is disjoint from the eval's benign_lookalikes.json
    benign: str = ""
    benign_size: int = Field(20, ge=0)

    @model_validator(mode="after")
    def _guard_range(self) -> OptimizeConfig:
        if self.guard_min_chars >= self.guard_max_chars:
            raise ValueError("guard_min_chars must be < guard_max_chars")
        return self


class RespondConfig(_Section):
    splits: list[Literal["train", "test"]] = Field(default_factory=lambda: ["train"], min_length=1)
    multi_turn_fraction: float = Field(0.3, ge=0, le=1)
    max_user_turns: int = Field(3, ge=2)  # multi-turn conversations get 2..max_user_turns user turns
    limit: int = 0               # 0 = all questions
    prompt: str = ""             # path to a full system prompt; "" = optimize/best_prompt.txt


class FilterConfig(_Section):
    min_scores: dict[str, int] = Field(default_factory=lambda: {
        "safety_integrity": 4, "context_robustness": 3, "refusal_specificity": 3, "educational_redirection": 3,
        "tone_and_style": 3, "precision": 3})
    require_pass: bool = True    # also require the judge's verdict "pass" on every assistant turn
    near_dup_threshold: float = Field(0.85, gt=0, le=1)
    input: str = ""              # "" = respond/conversations.jsonl

    @field_validator("min_scores")
    @classmethod
    def _dimensions(cls, scores: dict) -> dict:
        for dim, v in scores.items():
            if dim not in DIMENSIONS:
                raise ValueError(f"unknown dimension {dim!r} (known: {', '.join(DIMENSIONS)})")
            if not 1 <= v <= 5:
                raise ValueError(f"{dim} must be an integer 1..5, got {v}")
        return scores


class EvalConfig(_Section):
    judge: Literal["llm", "offline"] = "llm"  # offline = the keyword/regex classifier, for CI
    limit: int = 0               # 0 = every held-out attack and benign prompt
    benign: str = ""             # "" = picochat/safety/benign_lookalikes.json
    questions: str = ""          # "" = questions/questions.jsonl (split "test")
    system_prompt: str = ""      # path; "" = send no system prompt to the target
    name: str = ""               # results go to eval/<name>/; "" = <model>-<hash of endpoint+model+prompt>
    enabled: bool = False        # whether `safety run` runs the eval stage


class SafetyConfig(_Section):
    out_dir: Path = Field(default_factory=lambda: home() / "safety" / "run", strict=False)
    cache_dir: Path | None = Field(None, strict=False)  # default <out_dir>/cache
    preflight: bool = True
    judge_retries: int = Field(1, ge=0)  # re-samples of a judge reply that fails to parse
    roles: dict[str, RoleConfig] = Field(default_factory=dict)
    questions: QuestionsConfig = Field(default_factory=QuestionsConfig)
    optimize: OptimizeConfig = Field(default_factory=OptimizeConfig)
    respond: RespondConfig = Field(default_factory=RespondConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)  # where relative paths in the file resolve

    @field_validator("out_dir", "cache_dir", mode="before")
    @classmethod
    def _non_empty(cls, v):
        if v == "":
            raise ValueError("must be a non-empty path")
        return v

    @property
    def cache(self) -> Path:
        return self.cache_dir or (self.out_dir / "cache")

    def resolve(self, p: str | Path) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else self._base_dir / q

    def role(self, name: str) -> RoleConfig:
        if name not in self.roles:
            raise PicochatError(f"this stage needs the {name!r} role; add a [roles.{name}] section to the config")
        return self.roles[name]


_SECTIONS = {"roles": RoleConfig, "questions": QuestionsConfig, "optimize": OptimizeConfig,
             "respond": RespondConfig, "filter": FilterConfig, "eval": EvalConfig}


def _parse(model: type[BaseModel], data, where: str = ""):
    """model.model_validate(data); its first error becomes a one-line PicochatError naming the key."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
    key = ".".join(([where] if where else []) + [str(p) for p in err["loc"]])
    if err["type"] == "extra_forbidden":  # the value is not shown: it may be a pasted API key
        schema = model if len(err["loc"]) == 1 else _SECTIONS[err["loc"][0]]
        allowed = ", ".join(k for k in schema.model_fields if k != "name")
        pasted_key = "key" in str(err["loc"][-1]).lower()
        hint = "; API keys belong in environment variables (set api_key_env)" if pasted_key else ""
        raise PicochatError(f"unknown key {key} (allowed: {allowed}){hint}") from None
    if err["type"] == "value_error":  # our validators' messages show only what is safe to show
        msg = str(err["ctx"]["error"])
        raise PicochatError(f"{key}: {msg}" if key else msg) from None
    raise PicochatError(f"{key}: {err['msg']}, got {err['input']!r}") from None


def validate(cfg: SafetyConfig) -> None:
    """Check the config again after CLI overrides; PicochatError on the first problem."""
    _parse(SafetyConfig, cfg.model_dump())


def from_dict(data: dict, base_dir: Path | None = None) -> SafetyConfig:
    """Build and validate a SafetyConfig from parsed TOML/JSON. [roles.default] is inherited by every named role."""
    if not isinstance(data, dict):
        raise PicochatError("the config must be a table/object at the top level")
    roles = data.get("roles", {})
    if isinstance(roles, dict):
        for name in roles:
            if name not in ROLE_NAMES and name != "default":
                raise PicochatError(f"unknown role {name!r} (roles: {', '.join(ROLE_NAMES)}, plus 'default')")
        default = _parse(RoleConfig, roles.get("default", {}), "roles.default").model_dump(exclude_unset=True)
        roles = {name: {**default, **spec, "name": name} if isinstance(spec, dict) else spec
                 for name, spec in roles.items() if name != "default"}
    cfg = _parse(SafetyConfig, {**data, "roles": roles})
    cfg._base_dir = Path(base_dir) if base_dir else Path.cwd()
    cfg.out_dir = cfg.resolve(cfg.out_dir)
    if cfg.cache_dir is not None:
        cfg.cache_dir = cfg.resolve(cfg.cache_dir)
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


def sent_names(r: RoleConfig) -> dict[str, str]:
    """{the name a standard parameter is sent under: the parameter}, as the role's `params` rename or drop them."""
    return {(k if v is True else v): k for k in STD_PARAMS if (v := r.params.get(k, True)) is not False}


def request_params(r: RoleConfig, temperature: float, max_tokens: int, seed: int | None) -> dict:
    """The JSON body fields besides model and messages, as the role's `params` and `extra` say."""
    std = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
    return {name: std[k] for name, k in sent_names(r).items() if std[k] is not None} | r.extra
