"""Safety LLM client layer: config validation, preflight errors, retries, cache and costs (fake server)."""
import asyncio
import json

import pytest

pytest.importorskip("openai")

from fake_openai import KEY_ENV, FakeOpenAI, write_config  # noqa: E402

from picochat.common import PicochatError  # noqa: E402
from picochat.safety import config as C  # noqa: E402
from picochat.safety.client import LLM, LLMCallError  # noqa: E402
from picochat.safety.stage import run_stage  # noqa: E402


@pytest.fixture
def fake(monkeypatch):
    with FakeOpenAI(slow_s=1.2) as f:
        monkeypatch.setenv(KEY_ENV, f.api_key)
        yield f


def _cfg(fake, tmp_path, **kw):
    return C.load(write_config(fake, tmp_path, **kw))


def _chat(cfg, role, messages, **kw):
    async def go():
        llm = LLM(cfg, [role])
        try:
            return await llm.chat(role, messages, **kw), llm
        finally:
            await llm.aclose()
    return asyncio.run(go())


MSG = [{"role": "system", "content": "persistent user"}, {"role": "user", "content": "[USER]\nhello"}]


def test_toml_config_and_role_defaults(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text('out_dir = "runs/x"\n[roles.default]\nbase_url = "http://127.0.0.1:9/v1"\napi_key_env = "K"\n'
                 'temperature = 0.2\n[roles.red]\nmodel = "m"\ntemperature = 1.0\n[roles.judge]\nmodel = "j"\n'
                 '[questions]\nper_seed = 3\n[filter.min_scores]\nsafety_integrity = 5\n')
    cfg = C.load(p)
    assert cfg.out_dir == tmp_path / "runs" / "x"  # relative to the config file
    assert cfg.roles["red"].temperature == 1.0 and cfg.roles["judge"].temperature == 0.2
    assert cfg.roles["judge"].api_key_env == "K" and cfg.questions.per_seed == 3
    assert cfg.filter.min_scores == {"safety_integrity": 5}


@pytest.mark.parametrize("data,msg", [
    ({"roles": {"attacker": {"model": "m"}}}, "unknown role 'attacker'"),
    ({"roles": {"red": {"model": "m", "temprature": 1}}}, "unknown key roles.red.temprature"),
    ({"roles": {"default": {"temprature": 1}}}, "unknown key roles.default.temprature"),
    ({"roles": {"red": {"model": "m", "timeout_s": 0}}}, "roles.red.timeout_s: Input should be greater than 0"),
    ({"roles": {"red": {"model": "m", "api_key": "sk-abc"}}}, "environment variables"),
    ({"api_key": "sk-abc"}, "environment variables"),
    ({"roles": {"red": {"model": "m", "api_key_env": "sk-live-123456"}}}, "NAME of an environment variable"),
    ({"roles": {"red": {"model": "m", "base_url": "localhost:8000"}}}, "http(s) URL"),
    ({"roles": {"red": {"model": "m", "concurrency": "4"}}}, "roles.red.concurrency: Input should be a valid integer"),
    ({"questions": {"test_fraction": 1.5}}, "test_fraction"),
    ({"filter": {"min_scores": {"safety": 4}}}, "unknown dimension"),
])
def test_bad_config_is_one_clear_error(data, msg):
    with pytest.raises(PicochatError, match=msg.replace("(", r"\(").replace(")", r"\)")) as e:
        C.from_dict(data)
    assert "sk-live-123456" not in str(e.value) and "sk-abc" not in str(e.value)


def test_missing_key_env_fails_before_any_call(fake, tmp_path, monkeypatch):
    cfg = _cfg(fake, tmp_path)
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(PicochatError, match=f"environment variable {KEY_ENV} is not set"):
        run_stage(cfg, "t", ["red"], lambda llm: asyncio.sleep(0))
    assert sum(fake.calls.values()) == 0


def test_preflight_errors(fake, tmp_path, monkeypatch):
    # unreachable URL (nothing listens on port 9)
    cfg = _cfg(fake, tmp_path, roles={"red": {"base_url": "http://127.0.0.1:9/v1"}})
    with pytest.raises(PicochatError, match="cannot reach http://127.0.0.1:9/v1"):
        run_stage(cfg, "t", ["red"], lambda llm: asyncio.sleep(0))
    # wrong key: named by its env var, value never shown
    monkeypatch.setenv(KEY_ENV, "sk-wrong-value")
    with pytest.raises(PicochatError, match=f"rejected the API key from \\${KEY_ENV}") as e:
        run_stage(_cfg(fake, tmp_path), "t", ["red"], lambda llm: asyncio.sleep(0))
    assert "sk-wrong-value" not in str(e.value)
    monkeypatch.setenv(KEY_ENV, fake.api_key)
    with pytest.raises(PicochatError, match="model 'gpt-nope' is not served"):
        run_stage(_cfg(fake, tmp_path, roles={"red": {"model": "gpt-nope"}}), "t", ["red"], lambda llm: asyncio.sleep(0))
    # a server without /models: a one-token request is the check instead
    fake.models_status = 404
    run_stage(_cfg(fake, tmp_path), "t", ["red"], lambda llm: asyncio.sleep(0))
    assert fake.calls["red"] == 1


def test_retries_every_transient_fault_then_succeeds(fake, tmp_path):
    cfg = _cfg(fake, tmp_path, roles={"red": {"max_retries": 8, "timeout_s": 0.8}})  # "slow" sleeps 1.2 s
    fake.fail_next("red", "429", "500", "malformed", "truncated", "empty", "drop", "slow")
    reply, llm = _chat(cfg, "red", MSG)
    assert reply.text.startswith("Come on") and not reply.cached
    st = llm.stats["red"]
    assert dict(st.retries) == {"429": 1, "500": 1, "bad_response": 2, "empty": 1, "connection": 1, "timeout": 1}
    assert st.requests == 8 and st.completed == 1 and not st.failures


def test_exhausted_retries_raise_and_are_counted(fake, tmp_path):
    cfg = _cfg(fake, tmp_path, roles={"red": {"max_retries": 2}})
    fake.fail_next("red", "500", "500", "500")
    with pytest.raises(LLMCallError) as e:
        _chat(cfg, "red", MSG)
    assert e.value.kind == "500"
    # a 4xx other than 429 is not retried
    with pytest.raises(LLMCallError) as e:
        _chat(_cfg(fake, tmp_path, roles={"red": {"model": "fake-unknown"}}), "red", MSG)
    assert e.value.kind == "http_404"


def test_key_echoed_in_an_error_body_is_redacted(fake, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-wrong-but-secret-999")
    with pytest.raises(LLMCallError) as e:
        _chat(_cfg(fake, tmp_path), "red", MSG)  # no preflight here: the 401 arrives mid-run
    assert e.value.kind == "http_401" and "Incorrect API key" in str(e.value)
    assert "secret-999" not in str(e.value) and "sk-wrong" not in str(e.value)


def test_cache_on_disk_role_independent_and_sample_keyed(fake, tmp_path):
    cfg = _cfg(fake, tmp_path)
    r1, _ = _chat(cfg, "red", MSG)
    r2, llm = _chat(cfg, "red", MSG)  # a new client: the cache is on disk
    assert fake.calls["red"] == 1 and r2.cached and r2.text == r1.text and llm.stats["red"].cache_hits == 1
    _chat(cfg, "red", MSG, sample=1)  # another sample index is another request
    assert fake.calls["red"] == 2
    # a second role on the same endpoint+model shares the entry (the key has no role in it)
    cfg2 = _cfg(fake, tmp_path, roles={"optimizer": {"model": "fake-red"}})
    r3, _ = _chat(cfg2, "optimizer", MSG)
    assert r3.cached and fake.calls["red"] == 2
    blobs = "".join(p.read_text() for p in cfg.cache.rglob("*.json"))
    assert fake.api_key not in blobs and fake.base_url not in blobs


def test_costs_per_role(fake, tmp_path):
    cfg = _cfg(fake, tmp_path)

    async def body(llm):
        await llm.chat("red", MSG)
        await llm.chat("blue", [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}])
    run_stage(cfg, "demo", ["red", "blue"], body)
    costs = json.loads((cfg.out_dir / "costs.json").read_text())
    red = costs["stages"]["demo"]["roles"]["red"]
    assert red["requests"] == 1 and red["input_tokens"] > 0
    assert red["cost_usd"] == pytest.approx(red["input_tokens"] / 1e6 * 1.0 + red["output_tokens"] / 1e6 * 2.0)
    assert costs["total"]["cost_usd"] > 0


def test_docs_config_example_loads(tmp_path):
    from pathlib import Path
    doc = (Path(__file__).resolve().parents[1] / "docs" / "safety.md").read_text()
    toml = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "safety.toml").write_text(toml)
    cfg = C.load(tmp_path / "safety.toml")
    assert set(cfg.roles) == {"red", "blue", "judge", "optimizer", "target"}
    assert cfg.roles["target"].api_key_env == "" and cfg.roles["judge"].price_in_per_1m == 2.5
    assert cfg.out_dir == tmp_path / "safety_run"


def test_resamples_send_their_own_seed_and_are_not_greedy(fake, tmp_path):
    cfg = _cfg(fake, tmp_path, roles={"judge": {"temperature": 0.0}})
    _chat(cfg, "red", MSG)
    _chat(cfg, "red", MSG, sample=1)
    _chat(cfg, "red", MSG)  # cached: nothing sent
    seeds = [b["seed"] for b in fake.bodies["red"]]
    assert len(seeds) == 2 and seeds[0] != seeds[1] and all(isinstance(s, int) for s in seeds)
    # a temperature-0 role re-samples at resample_temperature: greedy decoding would repeat the failed reply
    _chat(cfg, "judge", MSG)
    _chat(cfg, "judge", MSG, sample=1)
    assert [b["temperature"] for b in fake.bodies["judge"]] == [0.0, 0.7]
    cfg = _cfg(fake, tmp_path, roles={"blue": {"send_seed": False}})
    _chat(cfg, "blue", MSG)
    assert "seed" not in fake.bodies["blue"][-1]


def test_reasoning_model_parameters_named_by_the_preflight_and_configurable(fake, tmp_path):
    async def work(llm):
        return (await llm.chat("judge", MSG)).text
    fake.reject_params["judge"] = {"max_tokens", "temperature"}  # what OpenAI's o-series / GPT-5 models do
    with pytest.raises(PicochatError) as e:
        run_stage(_cfg(fake, tmp_path), "t", ["judge"], work)
    msg = str(e.value)
    assert "\n" not in msg and "role judge" in msg and "parameter 'max_tokens'" in msg
    assert 'params = { max_tokens = "max_completion_tokens" }' in msg
    cfg = _cfg(fake, tmp_path, roles={"judge": {"params": {"max_tokens": "max_completion_tokens"}}})
    with pytest.raises(PicochatError, match=r"parameter 'temperature'.*params = \{ temperature = false \}"):
        run_stage(cfg, "t", ["judge"], work)
    assert fake.calls["judge"] == 0  # only the preflight's probes reached it
    cfg = _cfg(fake, tmp_path, roles={"judge": {"params": {"max_tokens": "max_completion_tokens", "temperature": False},
                                                "extra": {"reasoning_effort": "low"}}})
    assert run_stage(cfg, "t", ["judge"], work)
    body = fake.bodies["judge"][-1]
    assert body["max_completion_tokens"] == cfg.roles["judge"].max_tokens and body["reasoning_effort"] == "low"
    assert "max_tokens" not in body and "temperature" not in body and "seed" in body
    # the accepted probe is remembered: a second run sends no new probe for the same request shape
    probes = fake.probes["judge"]
    run_stage(cfg, "t", ["judge"], work)
    assert fake.probes["judge"] == probes


@pytest.mark.parametrize("role,msg", [
    ({"params": {"top_k": False}}, "unknown parameter"),
    ({"params": {"max_tokens": "max completion"}}, "must be false"),
    ({"extra": {"messages": []}}, "already sent"),
    ({"extra": {"temperature": 1}}, "already sent"),
    ({"extra": {"api_key": "x"}}, "credentials do not belong"),
    ({"extra": {"user": "sk-abcdef123456"}}, "credentials do not belong"),
])
def test_bad_params_config(role, msg):
    with pytest.raises(PicochatError, match=msg):
        C.from_dict({"roles": {"judge": {"model": "m", **role}}})
    C.from_dict({"roles": {"judge": {"model": "m", "params": {"temperature": False}, "extra": {"temperature": 1}}}})


def test_a_reply_the_caller_rejects_is_not_cached(fake, tmp_path):
    cfg = _cfg(fake, tmp_path)
    r1, _ = _chat(cfg, "red", MSG, accept=lambda text: False)  # e.g. a judge reply that does not parse
    assert not r1.cached and not list(cfg.cache.rglob("*.json"))
    _chat(cfg, "red", MSG)  # asked again (nothing cached), and now stored
    r3, _ = _chat(cfg, "red", MSG, accept=lambda text: False)  # a stored reply the caller rejects is asked again too
    assert fake.calls["red"] == 3 and not r3.cached


def test_every_toml_example_in_the_docs_loads(tmp_path):
    from pathlib import Path
    doc = (Path(__file__).resolve().parents[1] / "docs" / "safety.md").read_text()
    blocks = [b.split("```", 1)[0] for b in doc.split("```toml\n")[1:]]
    assert len(blocks) >= 5
    for i, toml in enumerate(blocks):
        (tmp_path / f"b{i}.toml").write_text(toml)
        cfg = C.load(tmp_path / f"b{i}.toml")
        assert cfg.roles, toml
    reasoning = next(C.load(tmp_path / f"b{i}.toml") for i, b in enumerate(blocks) if "o4-mini" in b).roles["judge"]
    assert reasoning.params == {"max_tokens": "max_completion_tokens", "temperature": False}
