"""The OpenAI-compatible API, spoken to by the official `openai` SDK and raw httpx, on a real
uvicorn server (loopback, free port) over a tiny random model and a real tokenizer.

Every answer is checked against the same request generated alone by the plain Engine; every bad
request must be an OpenAI-shaped 4xx (never a 5xx), and the server must keep serving."""
import threading

import httpx
import openai
import pytest

from serve_helpers import model, tok  # noqa: F401  (shared module fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")
from serve_helpers import (CONTEXT, ScriptedModel, alone_chat, alone_text, serve,
                           wait_until)

MSGS = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def server(model, tok):
    with serve(model, tok, max_body_bytes=64 * 1024) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_chat_non_streaming_equals_engine_alone(client, model, tok):
    ref, reply = alone_chat(model, tok, MSGS, 20)
    out = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=20, temperature=0)
    assert out.object == "chat.completion" and out.model == "tiny"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref and len(ref) > 5
    assert out.choices[0].finish_reason == reply.finish_reason == "length"
    assert out.usage.prompt_tokens == len(tok.render_for_completion({"messages": MSGS}))
    assert out.usage.completion_tokens == reply.tokens == 20
    assert out.usage.total_tokens == out.usage.prompt_tokens + 20
    # max_completion_tokens is the newer name of max_tokens; a system message is folded in
    sys_msgs = [{"role": "system", "content": "Be brief."}] + MSGS
    out = client.chat.completions.create(model="tiny", messages=sys_msgs, max_completion_tokens=7, temperature=0)
    assert out.choices[0].message.content == alone_chat(model, tok, sys_msgs, 7)[0]
    assert out.usage.completion_tokens == 7


def test_chat_streaming_chunks_and_usage(client, model, tok):
    ref, reply = alone_chat(model, tok, MSGS, 20)
    chunks = list(client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 3   # really streamed
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.tokens == 20
    assert chunks[-1].usage.prompt_tokens == len(tok.render_for_completion({"messages": MSGS}))
    assert all(c.usage is None for c in chunks[:-1])
    # without stream_options there is no usage chunk
    plain = list(client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=5, temperature=0, stream=True))
    assert all(c.choices for c in plain)


def test_stop_strings_cut_the_answer(client, model, tok):
    ref, _ = alone_chat(model, tok, MSGS, 20)
    stop = ref[len(ref) // 2:len(ref) // 2 + 2]
    expected = ref[:ref.find(stop)]
    out = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=20, temperature=0, stop=[stop, "zzzz"])
    assert out.choices[0].message.content == expected
    assert out.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=20, temperature=0, stop=stop,
                                              stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_n_choices(client, model, tok):
    ref, _ = alone_chat(model, tok, MSGS, 10)
    out = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=10, temperature=0, n=2)
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.message.content for c in out.choices] == [ref, ref]
    assert out.usage.completion_tokens == 20
    # sampled: choice i uses seed + i, exactly as the engine's per-row seeds
    kw = dict(model="tiny", messages=MSGS, max_tokens=10, temperature=1.0, seed=42, n=2)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    for i, c in enumerate(a.choices):
        assert c.message.content == alone_chat(model, tok, MSGS, 10, temperature=1.0, seed=42 + i)[0]
    assert a.choices[0].message.content != a.choices[1].message.content
    # streaming with n=2: every chunk names its choice
    chunks = list(client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=10, temperature=0, n=2,
                                                 stream=True))
    for i in (0, 1):
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i) == ref


def test_text_completions(client, model, tok):
    ref, reply = alone_text(model, tok, "The quick brown", 12)
    out = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=12, temperature=0)
    assert out.object == "text_completion" and out.choices[0].text == ref
    assert out.usage.completion_tokens == reply.tokens
    assert out.usage.prompt_tokens == len(tok.encode("The quick brown")) + 1
    chunks = list(client.completions.create(model="tiny", prompt="The quick brown", max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == ref


def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_errors_map_to_sdk_exceptions(client, server, model, tok):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=MSGS)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MSGS, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=CONTEXT)
    assert f"maximum context length is {CONTEXT} tokens" in e.value.message
    assert e.value.body["code"] == "context_length_exceeded"
    long = [{"role": "user", "content": "fox " * 200}]
    with pytest.raises(openai.BadRequestError, match=f"maximum context length is {CONTEXT}"):
        client.chat.completions.create(model="tiny", messages=long)
    with pytest.raises(openai.BadRequestError, match="roles must alternate"):
        client.chat.completions.create(model="tiny", messages=[{"role": "assistant", "content": "hi"}])
    # an API key is enforced as Bearer on every /v1 route, not on the UI or /health
    with serve(model, tok, api_key="sekrit") as keyed:
        bad = openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2)
        assert httpx.post(keyed.url + "/v1/completions", json={"prompt": "x"}).status_code == 401
        good = openai.OpenAI(base_url=keyed.url + "/v1", api_key="sekrit", max_retries=0)
        assert good.chat.completions.create(model="tiny", messages=MSGS, max_tokens=3).usage.completion_tokens == 3
        assert httpx.get(keyed.url + "/health").status_code == 200
        assert httpx.get(keyed.url + "/").status_code == 200


def test_calculator_tool_calls_run_through_the_scheduler(tok):
    """A tool call ends one scheduled generation; the calculator's output is fed back and a second
    generation continues from it (inference/chat.py's stream_chat, unchanged, over the scheduler)."""
    sp = tok.encode_special
    fed_back = [sp("<|output_start|>")] + tok.encode("144") + [sp("<|output_end|>")]
    script = ([sp("<|python_start|>")] + tok.encode("12*12") + [sp("<|python_end|>")]
              + [0] * len(fed_back)           # positions of the fed-back output: never predicted
              + tok.encode(" It is 144."))
    with serve(ScriptedModel(tok, script, delay=0), tok) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "12*12?"}],
                                             max_tokens=40)
        stats = httpx.get(s.url + "/health").json()["stats"]
    # the call the model made is reported apart from the text (docs/serving.md, "Tool calls")
    assert out.choices[0].message.content == " It is 144."
    assert out.choices[0].message.model_extra["tool_runs"] == [
        {"index": 0, "type": "calculator", "input": "12*12", "output": "144"}]
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == len(script) - len(fed_back) + 1   # + <|assistant_end|>
    assert stats["joined"] == 2 and stats["finished"] == 2


BAD_BODIES = [
    (b"{not json", "application/json"),
    (b"[1, 2, 3]", "application/json"),
    (b"\xff\xfe garbage", "application/json"),
    (b'{"messages": "hi"}', "application/json"),
    (b"plain text", "text/plain"),
]
BAD_JSON = [
    {},
    {"messages": []},
    {"messages": [{"role": "wizard", "content": "hi"}]},
    {"messages": [{"role": "user"}]},
    {"messages": [{"role": "user", "content": None}]},
    {"messages": [{"role": "user", "content": 5}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
    {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
    {"messages": [{"role": "system", "content": "only a system message"}]},
    {"messages": MSGS, "temperature": "hot"},
    {"messages": MSGS, "temperature": -1},
    {"messages": MSGS, "top_p": 0},
    {"messages": MSGS, "top_p": 1.5},
    {"messages": MSGS, "top_k": -3},
    {"messages": MSGS, "max_tokens": 0},
    {"messages": MSGS, "max_tokens": "ten"},
    {"messages": MSGS, "max_tokens": 10 ** 12},
    {"messages": MSGS, "n": 0},
    {"messages": MSGS, "n": 1000},
    {"messages": MSGS, "stop": ["a", "b", "c", "d", "e"]},
    {"messages": MSGS, "stop": [""]},
    {"messages": MSGS, "stop": 7},
    {"messages": MSGS, "stream": "yes"},
    {"messages": MSGS, "seed": "abc"},
    {"messages": MSGS, "stream_options": {"include_usage": "sure"}},
]


def test_malformed_bodies_are_4xx_never_5xx(server):
    url = server.url + "/v1/chat/completions"
    with httpx.Client(timeout=30) as h:
        for body, ctype in BAD_BODIES:
            r = h.post(url, content=body, headers={"content-type": ctype})
            assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        for body in BAD_JSON:
            r = h.post(url, json=body)
            assert r.status_code == 400, (body, r.status_code, r.text)
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and err["message"]
        for path, body in (("/v1/completions", {"prompt": []}), ("/v1/completions", {"prompt": 5}),
                           ("/v1/batch/completions", {"requests": []}),
                           ("/v1/batch/completions", {"requests": [{"messages": []}]})):
            r = h.post(server.url + path, json=body)
            assert r.status_code == 400, (path, body, r.text)
        r = h.post(url, content=b'{"messages": [' + b'{"role": "user", "content": "x"},' * 5000 + b"]}",
                   headers={"content-type": "application/json"})
        assert r.status_code == 413 and "limit" in r.json()["error"]["message"]

        def chunked():  # no Content-Length: the limit still holds
            for _ in range(100):
                yield b" " * 1024
        r = h.post(url, content=chunked(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert h.post(server.url + "/v1/nothing-here", json={}).status_code == 404
        assert h.get(url).status_code == 405
        unknown_fields = h.post(url, json={"messages": MSGS, "max_tokens": 2, "user": "u", "logit_bias": {},
                                           "presence_penalty": 0.5})
        assert unknown_fields.status_code == 200
        # the server kept serving through all of it
        assert h.get(server.url + "/health").json()["status"] == "ok"
        ok = h.post(url, json={"messages": MSGS, "max_tokens": 3})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("path,field,asked", [
    ("/v1/chat/completions", "logprobs", True), ("/v1/chat/completions", "top_logprobs", 2),
    ("/v1/chat/completions", "response_format", {"type": "json_object"}), ("/v1/completions", "logprobs", 0),
    ("/v1/completions", "echo", True), ("/v1/completions", "suffix", "end"), ("/v1/completions", "best_of", 3),
])
def test_fields_that_change_a_replys_meaning_are_refused_not_ignored(server, path, field, asked):
    body = {"messages": MSGS} if "chat" in path else {"prompt": "The quick"}
    r = httpx.post(server.url + path, json=body | {field: asked, "max_tokens": 2}, timeout=30)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == field, r.text
    assert f"{field} is not supported" in err["message"]
    # their "off" values are what many clients send by default: accepted
    off = {"logprobs": False if "chat" in path else None, "top_logprobs": 0, "response_format": {"type": "text"},
           "echo": False, "suffix": "", "best_of": 1}
    ok = httpx.post(server.url + path, json=body | {field: off[field], "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200 and ok.json()["choices"][0]["logprobs"] is None, ok.text


@pytest.mark.parametrize("path,body,param,says", [
    # a union field (str | list) names the field and the member that got furthest, not pydantic's member tag
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content.1.type", "Input should be 'text'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]},
     "messages.0.content", "a valid string or a valid list"),
    ("/v1/chat/completions", {"messages": MSGS, "stop": 5}, "stop", "a valid string or a valid list"),
    ("/v1/chat/completions", {"messages": MSGS, "stop": ["a", 3]}, "stop.1", "a valid string"),
    ("/v1/completions", {"prompt": [1, 2, 3]}, "prompt.0", "a valid string"),
    ("/v1/chat/completions", {"messages": MSGS, "temperature": "hot"}, "temperature", "a valid number"),
])
def test_invalid_field_errors_name_the_field_as_the_client_wrote_it(server, path, body, param, says):
    r = httpx.post(server.url + path, json=body, timeout=30)
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "invalid_value", r.text
    assert err["param"] == param and err["message"].startswith(f"Invalid value for '{param}': ")
    assert says in err["message"], err["message"]


def test_batch_endpoint_answers_each_request(server, model, tok):
    q2 = [{"role": "user", "content": "Tell me about the fox."}]
    body = {"requests": [{"messages": MSGS}, {"messages": q2, "max_tokens": 4}, {"messages": q2, "stop": ["zz"]}],
            "temperature": 0, "max_tokens": 9}
    r = httpx.post(server.url + "/v1/batch/completions", json=body, timeout=60)
    assert r.status_code == 200
    out = r.json()
    assert out["object"] == "batch.completion" and len(out["responses"]) == 3
    texts = [x["choices"][0]["message"]["content"] for x in out["responses"]]
    assert texts == [alone_chat(model, tok, MSGS, 9)[0], alone_chat(model, tok, q2, 4)[0],
                     alone_chat(model, tok, q2, 9)[0]]
    assert out["usage"]["completion_tokens"] == sum(x["usage"]["completion_tokens"] for x in out["responses"])
    bad = httpx.post(server.url + "/v1/batch/completions",
                     json={"requests": [{"messages": MSGS}, {"messages": MSGS, "max_tokens": CONTEXT}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "requests.1.messages"


class GatedModel:
    """The real model, except that every forward waits for `gate`: holds requests in flight."""

    def __init__(self, model):
        self._model, self.gate = model, threading.Event()

    def __getattr__(self, name):
        return getattr(self._model, name)

    def hidden(self, *a, **kw):
        self.gate.wait(30)
        return self._model.hidden(*a, **kw)


def test_full_queue_gets_503_with_retry_after(model, tok):
    gated = GatedModel(model)
    with serve(gated, tok, max_batch=1, max_queue=1) as s:
        results = []

        def ask():
            r = httpx.post(s.url + "/v1/chat/completions", json={"messages": MSGS, "max_tokens": 4}, timeout=60)
            results.append(r.status_code)
        threads = [threading.Thread(target=ask) for _ in range(2)]
        for t in threads:
            t.start()
        assert wait_until(lambda: httpx.get(s.url + "/health").json()["in_flight"] == 2)
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": MSGS, "max_tokens": 4})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2, n=2)
        gated.gate.set()
        for t in threads:
            t.join(60)
        assert results == [200, 200]
        assert httpx.get(s.url + "/health").json()["in_flight"] == 0


def test_cli_serves_a_checkpoint_with_an_env_api_key(tmp_path, model, tok, monkeypatch, capsys):
    """`picochat serve` end to end: checkpoint + tokenizer from $PICOCHAT_HOME, key from the env,
    loopback by default; and one clear error line for a tag that does not exist."""
    import os
    import subprocess
    import sys

    from picochat.checkpoint import save_checkpoint
    from picochat.cli import main
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    save_checkpoint("sft/tiny", 1, model, model.config, {"stage": "sft"})
    tok.save(tmp_path / "tokenizer")
    assert main(["serve", "--model", "sft/nope"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("picochat: error: no checkpoint with tag 'sft/nope'") and len(err.strip().splitlines()) == 1
    env = dict(os.environ, PICOCHAT_API_KEY="k3y", OMP_NUM_THREADS="1")
    # --port 0: the system picks a free port, and the banner names the real one
    proc = subprocess.Popen([sys.executable, "-m", "picochat.cli", "serve", "--model", "sft/tiny", "--port", "0",
                             "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        banner = [proc.stdout.readline() for _ in range(2)]
        assert banner[0].startswith("picochat serve: sft/tiny on cpu; chat UI http://127.0.0.1:"), banner
        port = int(banner[0].split("http://127.0.0.1:")[1].split("/")[0])
        assert port > 0 and "(Bearer key required)" in banner[0]
        assert banner[1].startswith(f"limits: max batch 16 decoded together, queue 64 more (then 503), "
                                    f"context {CONTEXT} tokens per request"), banner
        url = f"http://127.0.0.1:{port}"

        def up():
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None
        assert wait_until(up, timeout=90) and proc.poll() is None
        client = openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0)
        out = client.chat.completions.create(model="sft/tiny", messages=MSGS, max_tokens=8, temperature=0)
        assert out.choices[0].message.content == alone_chat(model, tok, MSGS, 8)[0]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    finally:
        proc.terminate()
        proc.wait(15)
    assert "chat UI http://127.0.0.1:" in banner[0]
    assert "Traceback" not in proc.stdout.read()
