"""Hundreds of malformed and hostile requests against one live server (a key required, a small
body limit): a hand list (bad JSON, wrong types, huge, negative and NaN numbers, unknown roles,
empty messages, giant strings, wrong content types, bad paths and methods, unicode junk, bad
auth, broken HTTP on a raw socket) and hypothesis-generated mutations of valid requests. Not one
answer may be a 5xx, every error from the app is OpenAI-shaped, every stream ends with [DONE],
and the server still answers a normal request afterwards."""
import json
import math
import socket

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve_helpers import model, tok  # noqa: F401  (shared module fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")
from serve_helpers import serve

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MSGS = [{"role": "user", "content": "hi"}]
BASE = {"/v1/chat/completions": {"messages": MSGS, "max_tokens": 3},
        "/v1/completions": {"prompt": "The fox", "max_tokens": 3},
        "/v1/batch/completions": {"requests": [{"messages": MSGS}], "max_tokens": 3}}
sent = {"n": 0}


@pytest.fixture(scope="module")
def server(model, tok):
    with serve(model, tok, api_key=KEY, max_body_bytes=32 * 1024, max_batch=4, max_queue=8, default_max_tokens=4,
               body_timeout_s=1.0) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as h:
        yield h


def check(r: httpx.Response) -> None:
    sent["n"] += 1
    where = (r.request.method, str(r.request.url), r.status_code, r.text[:300])
    assert r.status_code < 500, where
    if r.status_code >= 400 and r.request.method != "HEAD":
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}, where
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text, where


def post(h: httpx.Client, path: str, body=None, *, content=None, headers=AUTH) -> httpx.Response:
    if content is None:
        content = json.dumps(body).encode()   # allow_nan: NaN / Infinity literals go out as such
    r = h.post(path, content=content, headers={"content-type": "application/json"} | headers)
    check(r)
    return r


HUGE = [10 ** 40, -(10 ** 40), 2 ** 63, 2 ** 64, -(2 ** 63) - 1, 1e308, -1e308, math.nan, math.inf, -math.inf,
        -1, 0, 0.5, True, "1", None, [], {}, "\u202e\u0000\ud7ff\U0010ffff"]
FIELDS = ["max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "n", "stop", "stream",
          "stream_options", "model"]
JUNK_TEXT = ["", "\x00" * 50, "\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "replace"), "\u202e" * 1000,
             "🦊" * 3000, "<|assistant_end|><|bos|>", "a" * 30000, "\r\n\r\nHTTP/1.1 200 OK\r\n"]


def hand_bodies():
    """(path, body) pairs: each a hostile variant of a valid request."""
    for path, base in BASE.items():
        for field in FIELDS:
            for v in HUGE:
                yield path, base | {field: v}
    chat = "/v1/chat/completions"
    for messages in ([], None, "hi", [None], [[]], [{}], [{"role": "user"}], [{"content": "x"}],
                     [{"role": "tool", "content": "x"}], [{"role": "USER", "content": "x"}],
                     [{"role": "user", "content": [{"type": "text"}]}], [{"role": "user", "content": [{"text": "x"}]}],
                     [{"role": "user", "content": {"type": "text", "text": "x"}}],
                     [{"role": "user", "content": "x", "name": 5}], [{"role": "assistant", "content": "x"}] * 3,
                     [{"role": "user", "content": t} for t in JUNK_TEXT[:4]],
                     *([{"role": "user", "content": t}] for t in JUNK_TEXT)):
        yield chat, {"messages": messages, "max_tokens": 2}
    for prompt in ([], [[]], [1, 2], [None], {"a": 1}, *JUNK_TEXT, [""] * 50, ["x"] * 13):
        yield "/v1/completions", {"prompt": prompt, "max_tokens": 2}
    for requests in ([], None, [{}], [{"messages": []}], [{"messages": MSGS, "n": 2}], [{"messages": MSGS}] * 300,
                     [{"messages": MSGS, "seed": 2 ** 64}], [{"messages": MSGS, "max_tokens": -1}]):
        yield "/v1/batch/completions", {"requests": requests}


def test_hand_list_of_hostile_requests(server, http):
    for path, body in hand_bodies():
        post(http, path, body)
    chat = "/v1/chat/completions"
    for content in (b"", b"{", b"null", b"[]", b'"str"', b"42", b"\xff\xfe\x00", b'{"messages": [}', b"{" * 5000,
                    b"[" * 20000 + b"]" * 20000, b'{"messages": ' + b"[" * 3000 + b"]" * 3000 + b"}",
                    json.dumps({"messages": MSGS, "max_tokens": 2}).encode("utf-16"), b"x" * 40000):
        post(http, chat, content=content)
    good = json.dumps(BASE[chat]).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "", "\u00e9/x"):
        check(http.post(chat, content=good, headers=AUTH | {"content-type": ctype.encode()}))
    for auth in ({}, {"Authorization": "Bearer"}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                 {"Authorization": "Basic Zm9vOmJhcg=="}, {"Authorization": "Bearer " + "k" * 10000},
                 {"Authorization": "Bearer fuzz-key\u00e9".encode()}):
        assert post(http, chat, BASE[chat], headers=auth).status_code == 401
    for method in ("GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE"):
        for path in ("/", "/health", "/v1/models", "/v1/models/x/../../etc/passwd", "/v1/chat/completions",
                     "/%2e%2e/%2e%2e", "/v1/" + "a" * 5000, "/v1/models/\u00e9\u202e", "/index.html?x=<script>"):
            check(http.request(method, path, headers=AUTH))
    check(http.post("/v1/chat/completions?stream=true&x=" + "%00" * 50, content=good, headers=AUTH))
    assert sent["n"] >= 700, sent


def raw(server, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as c:
        try:
            c.sendall(data)
            c.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := c.recv(65536):
                out += chunk
        except ConnectionResetError:
            return b""
        return out


def test_broken_http_on_a_raw_socket(server):
    cases = [b"GARBAGE\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"GET /\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00",
             b"GET / HTTP/1.1\r\nHost: x\r\nNoColonHeader\r\n\r\n",
             b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
             b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
             b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
             b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\nabc\r\n0\r\n\r\n",
             b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 999\r\n\r\n{\"prompt\": \"x\"}"]
    for data in cases:
        out = raw(server, data)
        status = int(out.split(b" ")[1]) if out.startswith(b"HTTP/1.1 ") else 0
        assert status < 500, (data[:80], out[:200])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-(2 ** 80), max_value=2 ** 80)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "developer", "tool", "x"]),
                                 "content": st.text(max_size=60) | json_values})


@settings(max_examples=150, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(sorted(BASE)), changes=st.dictionaries(st.sampled_from(FIELDS + ["messages", "prompt",
                                                                                          "requests"]),
                                                                   json_values, max_size=3),
       messages=st.lists(message, max_size=4), as_text=st.booleans())
def test_generated_mutations_of_valid_requests(server, http, path, changes, messages, as_text):
    body = BASE[path] | changes
    if as_text and "messages" in body and "messages" not in changes:
        body["messages"] = messages
    post(http, path, body)


def test_still_serving_afterwards(server, http):
    r = post(http, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["in_flight"] == 0
    assert sent["n"] >= 200
