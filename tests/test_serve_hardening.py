"""What a hostile outside test of `picochat serve` found (issue 21), each pinned down: seeds out of
torch's range, requests larger than the server's whole capacity, a non-streaming client that hangs
up while tokens flow, a body that never arrives, HEAD and OPTIONS, special-token strings in
replies, calculator calls reported apart from the content, and the CLI's port, key and banner."""
import json
import select
import socket
import time

import httpx
import openai
import pytest

from picochat.serve.cli import _listen, resolve_api_key
from serve_helpers import model, tok  # noqa: F401  (shared module fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")
from serve_helpers import ScriptedModel, serve, wait_until

MSGS = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def server(model, tok):
    with serve(model, tok, max_batch=2, max_queue=1, body_timeout_s=0.5) as s:
        yield s


def _sse(h: httpx.Client, url: str, body: dict) -> tuple[int, list[str]]:
    with h.stream("POST", url, json=body) as r:
        return r.status_code, [line for line in r.iter_lines() if line]


# ---------------------------------------------------------------- 1. seeds


def test_seed_outside_int64_is_a_400_streamed_or_not(server):
    url = server.url + "/v1/chat/completions"
    with httpx.Client(timeout=60) as h:
        for seed, n in ((2 ** 64, 1), (2 ** 64 - 1, 2), (2 ** 63, 1), (-(2 ** 63) - 1, 1), (10 ** 30, 1)):
            for stream in (False, True):
                status, lines = _sse(h, url, {"messages": MSGS, "max_tokens": 2, "seed": seed, "n": n,
                                              "stream": stream})
                assert status == 400, (seed, n, stream, lines)
                assert json.loads(lines[0])["error"]["param"] == "seed"
        # the edges of the range work, with every derived seed (seed + i per choice)
        for seed in (2 ** 63 - 1, -(2 ** 63)):
            r = h.post(url, json={"messages": MSGS, "max_tokens": 3, "seed": seed, "n": 2, "temperature": 1})
            assert r.status_code == 200 and len(r.json()["choices"]) == 2
            status, lines = _sse(h, url, {"messages": MSGS, "max_tokens": 3, "seed": seed, "stream": True})
            assert status == 200 and lines[-1] == "data: [DONE]"


# ---------------------------------------------------------------- 2. more than the whole capacity


def test_a_request_larger_than_the_capacity_is_a_400_naming_it(server):
    """max_batch 2 + max_queue 1 = 3 generations at most: 4 in one request can never be served."""
    with httpx.Client(timeout=60) as h:
        too_big = [("/v1/chat/completions", {"messages": MSGS, "n": 4}, "n"),
                   ("/v1/completions", {"prompt": ["a", "b"], "n": 2}, "n"),
                   ("/v1/completions", {"prompt": ["a", "b", "c", "d"]}, "prompt"),
                   ("/v1/batch/completions", {"requests": [{"messages": MSGS}] * 4}, "requests")]
        for path, body, param in too_big:
            r = h.post(server.url + path, json=body | {"max_tokens": 2})
            assert r.status_code == 400, (path, r.text)
            err = r.json()["error"]
            assert err["code"] == "too_many_generations" and err["param"] == param
            assert "at most 3" in err["message"] and "retry" not in err["message"].lower()
        # exactly the capacity is fine
        r = h.post(server.url + "/v1/completions", json={"prompt": ["a", "b", "c"], "max_tokens": 2})
        assert r.status_code == 200 and len(r.json()["choices"]) == 3


# ---------------------------------------------------------------- 3. non-streaming client hangs up


def test_non_streaming_client_that_hangs_up_is_cancelled_while_tokens_flow(tok):
    """Tokens flow every 20 ms, so nothing is ever idle: the slot must still be freed within a
    step or so of the hang-up, not after the 300 tokens asked for."""
    word = tok.encode(" fox")
    slow = ScriptedModel(tok, word * 400, delay=0.02)
    with serve(slow, tok) as s:
        health = lambda: httpx.get(s.url + "/health").json()  # noqa: E731
        raw = ('{"messages": [{"role": "user", "content": "go"}], "max_tokens": 300}').encode()
        conn = socket.create_connection(("127.0.0.1", s.port))
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw)
        assert wait_until(lambda: health()["stats"]["decode_steps"] >= 10, timeout=30)
        conn.close()
        hung_up, steps_then = time.monotonic(), health()["stats"]["decode_steps"]
        assert wait_until(lambda: health()["active_slots"] == 0, timeout=30)
        freed_after = time.monotonic() - hung_up
        h = health()
    assert h["stats"]["cancelled"] == 1 and h["stats"]["finished"] == 0   # cancelled, not run to the end
    # a step or two after the hang-up (slack for a loaded machine), not the ~290 steps left
    assert h["stats"]["decode_steps"] - steps_then <= 15, (steps_then, h["stats"])
    assert h["in_flight"] == 0 and freed_after < 3.0


# ---------------------------------------------------------------- 4. a body that never arrives


def _raw(port: int, head: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes, return everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as c:
        c.sendall(head)
        out = b""
        while chunk := c.recv(65536):
            out += chunk
        return out


def test_a_body_shorter_than_its_content_length_gets_408_not_a_hang(server):
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{\"messages\"")
    t0 = time.monotonic()
    out = _raw(server.port, head)   # the server answers and closes: recv returns b""
    assert out.startswith(b"HTTP/1.1 408"), out
    assert b'"code": "request_timeout"' in out.replace(b'":"', b'": "') and time.monotonic() - t0 < 5
    # dripping bytes does not extend the deadline: the whole body has body_timeout_s (0.5 s). Drip a byte every
    # 0.11 s: a deadline per read would never fire (every gap is under 0.5 s) and the server would still be reading
    # after 20 drips (2.2 s; the body, 40 bytes announced, is never complete); the body deadline answers within a
    # few drips. We stop dripping once the answer is there (writing past the server's close could turn it into a
    # TCP reset, which can also drop the 408 in flight: then the close is the answer)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as c:
        c.sendall(head.replace(b"100", b"40"))
        drips, out = 0, b""
        try:
            while drips < 20 and not select.select([c], [], [], 0.11)[0]:
                c.sendall(b" ")
                drips += 1
            out = c.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            out = None
    assert drips < 20, "still reading the body after 20 drips: dripping extended the deadline"
    assert out is None or out.startswith(b"HTTP/1.1 408"), out
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


# ---------------------------------------------------------------- 5. HEAD and OPTIONS


def test_head_and_options(server, model, tok):
    with httpx.Client(timeout=30) as h:
        for path in ("/", "/health", "/v1/models", "/v1/models/tiny"):
            get, head = h.get(server.url + path), h.head(server.url + path)
            assert head.status_code == 200 and head.content == b"", path
            assert head.headers["content-type"] == get.headers["content-type"]
        r = h.options(server.url + "/v1/chat/completions")
        assert r.status_code == 204 and r.headers["allow"] == "OPTIONS, POST"
        assert not any(k.startswith("access-control") for k in r.headers)   # no CORS by default
        assert h.options(server.url + "/").headers["allow"] == "GET, HEAD, OPTIONS"
        assert h.options(server.url + "/nowhere").status_code == 404
        wrong = h.get(server.url + "/v1/chat/completions")
        assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
        assert set(wrong.json()["error"]) == {"message", "type", "param", "code"}
    with serve(model, tok, api_key="k") as keyed:   # OPTIONS only lists methods: no key needed
        assert httpx.options(keyed.url + "/v1/models").status_code == 204
        assert httpx.head(keyed.url + "/v1/models").status_code == 401


# ---------------------------------------------------------------- 6. special tokens, tool calls


def test_no_special_token_strings_in_text_or_chat_completions(tok):
    sp = tok.encode_special
    junk = [sp("<|python_end|>"), sp("<|user_start|>"), sp("<|output_start|>")]
    script = tok.encode("Hello") + junk + tok.encode(" world")
    prompt = "Say:"
    marker = tok.encode(prompt)[-1]
    assert marker not in script
    with serve(ScriptedModel(tok, script, delay=0, marker=marker), tok) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=30)
        assert out.choices[0].text == "Hello world" and out.choices[0].finish_reason == "stop"
        assert out.usage.completion_tokens == len(script) + 1      # specials are counted, not shown
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=30, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == "Hello world"
    chat_script = [t for t in script if t != sp("<|python_end|>")]   # in chat, it ends the reply
    with serve(ScriptedModel(tok, chat_script, delay=0), tok) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        out = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=30)
        assert out.choices[0].message.content == "Hello world"
        chunks = list(client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=30, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello world"


def test_calculator_calls_are_tool_runs_not_content_streamed_or_not(tok):
    sp = tok.encode_special
    fed_back = [sp("<|output_start|>")] + tok.encode("144") + [sp("<|output_end|>")]
    script = ([sp("<|python_start|>")] + tok.encode("12*12") + [sp("<|python_end|>")] + [0] * len(fed_back)
              + tok.encode(" It is 144."))
    runs = [{"index": 0, "type": "calculator", "input": "12*12", "output": "144"}]
    with serve(ScriptedModel(tok, script, delay=0), tok) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        out = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=40)
        assert out.choices[0].message.content == " It is 144."
        assert out.choices[0].message.model_extra["tool_runs"] == runs
        assert out.choices[0].message.tool_calls is None      # nothing for the client to run
        chunks = list(client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=40, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == " It is 144."
        streamed = [t for c in chunks for t in (c.choices[0].delta.model_extra or {}).get("tool_runs", [])]
        assert streamed == runs
        # a reply without a (finished) tool call has no tool_runs field at all
        cut = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=3)
        assert cut.choices[0].finish_reason == "length" and "tool_runs" not in cut.choices[0].message.model_extra


# ---------------------------------------------------------------- 7. CLI: key sources


class _Args:
    def __init__(self, api_key=None, api_key_file=None):
        self.api_key, self.api_key_file = api_key, api_key_file


def test_api_key_from_file_env_or_flag_with_a_warning(tmp_path, capsys):
    from picochat.common import PicochatError
    f = tmp_path / "key"
    f.write_text("s3cret\nignored\n")
    assert resolve_api_key(_Args(api_key_file=str(f)), {"PICOCHAT_API_KEY": "env"}) == "s3cret"
    assert resolve_api_key(_Args(), {"PICOCHAT_API_KEY": "env"}) == "env"
    assert resolve_api_key(_Args(), {}) is None
    assert capsys.readouterr().err == ""
    assert resolve_api_key(_Args(api_key="k"), {}) == "k"
    assert "visible to other users" in capsys.readouterr().err
    (tmp_path / "empty").write_text("\n")
    for bad in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(PicochatError, match="api-key-file"):
            resolve_api_key(_Args(api_key_file=str(bad)), {})


def test_cli_socket_gets_tcp_nodelay_connections():
    """uvicorn serves the socket the CLI bound; asyncio sets TCP_NODELAY only on IPPROTO_TCP sockets,
    without it every small response waited ~40 ms for a delayed ACK."""
    sock = _listen("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP and sock.getsockname()[1] > 0
    finally:
        sock.close()
