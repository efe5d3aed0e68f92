"""The web chat UI in a real headless Chromium (Debian's `chromium`, driven by playwright with
`executable_path`; scripts/install.sh installs it when it can): a message goes through the UI,
the reply streams in, a changed temperature rides on the next request, history is multi-turn,
an assistant reply containing <script> is shown as text, and the narrow layout does not overlap;
"New chat" while a reply streams drops that reply, Enter that confirms an IME composition does not
send, an empty reply says why, Stop keeps the partial reply, each reply shows its tokens/s, and at
360 px "New chat" is on screen, settings fold away and the input shows its whole placeholder.

To make the model say `<script>` deterministically, the server runs on ScriptedModel: a stand-in
for the GPT (not for the scheduler, the server or the page, which are all the real ones) that
writes the tokens it is fed into the KV cache and always predicts the next token of a fixed
reply. A small delay per forward makes the streaming observable."""
import json
import os
import re
import shutil

import httpx
import pytest

from serve_helpers import ScriptedModel, serve, tiny_tokenizer, wait_until

REPLY = 'Hi! <script>window.pwned = 1</script> <b>not bold</b> & "quotes"'
LONG = "step " * 120   # ~5 s at 40 ms a token: time to act while it streams


def _browser_or_skip():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if exe and sync_playwright:
        return exe, sync_playwright
    why = ("no `chromium` on PATH (scripts/install.sh installs Debian's when run as root with apt)" if not exe
           else "the `playwright` package is missing (pip install -e '.[dev]')")
    if os.environ.get("CI"):
        pytest.fail(f"web UI test cannot run on CI: {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def browser():
    exe, sync_playwright = _browser_or_skip()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def server():
    tok = tiny_tokenizer()
    with serve(ScriptedModel(tok, REPLY), tok) as s:
        yield s


def test_chat_ui_streams_uses_controls_and_renders_text(browser, server):
    page = browser.new_page()
    bodies = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions") else None)
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('status').textContent.includes('tiny')")

    page.fill("#input", "hello there")
    page.press("#input", "Enter")
    # streamed: part of the reply is on screen while the reply is still streaming
    page.wait_for_function("""() => { const m = document.querySelector('.msg.assistant');
        return m && m.dataset.state === 'streaming' && m.textContent.length > 0; }""", timeout=15000)
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=15000)
    first = page.locator(".msg.assistant").nth(0)
    assert first.text_content() == REPLY                      # shown as text, character for character
    assert page.locator("#log script, #log b").count() == 0   # nothing was parsed as HTML
    assert page.evaluate("window.pwned") is None
    assert bodies[0]["stream"] is True and bodies[0]["temperature"] == 0.6
    assert bodies[0]["messages"] == [{"role": "user", "content": "hello there"}]

    # controls take effect on the next message; history goes along
    page.fill("#temperature", "1.3")
    page.fill("#top_k", "7")
    page.fill("#max_tokens", "100")
    page.fill("#input", "and again")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.msg.assistant[data-state=done]').length === 2", timeout=15000)
    assert bodies[1]["temperature"] == 1.3 and bodies[1]["top_k"] == 7 and bodies[1]["max_tokens"] == 100
    assert bodies[1]["messages"] == [{"role": "user", "content": "hello there"},
                                     {"role": "assistant", "content": REPLY},
                                     {"role": "user", "content": "and again"}]
    assert page.locator(".msg.assistant").nth(1).text_content() == REPLY
    assert page.evaluate("window.pwned") is None
    page.close()


def test_narrow_layout_does_not_overlap(browser, server):
    page = browser.new_page(viewport={"width": 360, "height": 740})
    page.goto(server.url + "/")
    # folded settings: "New chat" is on screen, the chat gets the height, the placeholder fits
    assert page.locator("#settings").is_hidden()
    for sel in ("#clear", "#toggle-settings", "#send", "#input"):
        b = page.locator(sel).bounding_box()
        assert b and b["x"] >= 0 and b["y"] >= 0 and b["x"] + b["width"] <= 360 and b["y"] + b["height"] <= 740, (sel, b)
    assert page.evaluate(ON_TOP, "#clear"), "'New chat' is covered or clipped"
    assert page.locator("#log").bounding_box()["height"] > 0.6 * 740
    assert page.evaluate(PLACEHOLDER_FITS), "the input box clips its placeholder"
    page.click("#toggle-settings")
    assert page.locator("#settings").is_visible()
    assert page.locator("#toggle-settings").get_attribute("aria-expanded") == "true"
    assert page.locator("#settings").bounding_box()["height"] <= 0.45 * 740 + 1
    page.fill("#input", "The quick brown fox jumps over the lazy dog. " * 4 + "z" * 60)  # long words must wrap, not widen the page
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=15000)
    boxes = {sel: page.locator(sel).bounding_box() for sel in ("header", "#log", "#settings", "#form")}
    for sel, b in boxes.items():
        assert b["x"] >= 0 and b["x"] + b["width"] <= 361, (sel, b)       # nothing sticks out sideways
    order = [boxes[s] for s in ("header", "#log", "#settings", "#form")]
    for upper, lower in zip(order, order[1:]):
        assert upper["y"] + upper["height"] <= lower["y"] + 1, (upper, lower)   # stacked, not overlapping
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    clear = page.locator("#clear").bounding_box()
    assert clear["y"] + clear["height"] <= 740 and clear["x"] + clear["width"] <= 360
    assert page.evaluate(ON_TOP, "#clear")
    page.close()


# what a click at the element's centre would hit is the element itself (not clipped, not covered)
ON_TOP = """(sel) => { const el = document.querySelector(sel), r = el.getBoundingClientRect();
    return document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2) === el; }"""


# the placeholder, laid out in a copy of the input's box: as tall as the box's content area?
PLACEHOLDER_FITS = """() => {
    const ta = document.getElementById('input'), cs = getComputedStyle(ta);
    const probe = document.createElement('div');
    for (const k of ['font', 'lineHeight', 'letterSpacing', 'paddingLeft', 'paddingRight', 'boxSizing'])
        probe.style[k] = cs[k];
    Object.assign(probe.style, {position: 'absolute', visibility: 'hidden', whiteSpace: 'pre-wrap',
                                overflowWrap: 'break-word', width: ta.clientWidth + 'px'});
    probe.textContent = ta.placeholder;
    document.body.appendChild(probe);
    const need = probe.getBoundingClientRect().height;
    probe.remove();
    const have = ta.clientHeight - parseFloat(cs.paddingTop) - parseFloat(cs.paddingBottom);
    return need <= have + 0.5;
}"""


@pytest.fixture(scope="module")
def slow_server():
    tok = tiny_tokenizer()
    with serve(ScriptedModel(tok, LONG, delay=0.04), tok) as s:
        yield s


def _chat_requests(page) -> list[dict]:
    bodies = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions") else None)
    return bodies


def _wait_streaming_text(page, min_chars: int = 10):
    page.wait_for_function(f"""() => {{ const m = [...document.querySelectorAll('.msg.assistant')].pop();
        return m && m.dataset.state === 'streaming' && m.textContent.length >= {min_chars}; }}""", timeout=15000)


def test_new_chat_while_a_reply_streams_drops_that_reply(browser, slow_server):
    page = browser.new_page()
    bodies = _chat_requests(page)
    page.goto(slow_server.url + "/")
    page.fill("#input", "first")
    page.press("#input", "Enter")
    _wait_streaming_text(page)
    page.click("#clear")
    assert page.locator("#log > *").count() == 0
    # the stream was aborted: the server cancelled its generation
    assert wait_until(lambda: httpx.get(slow_server.url + "/health").json()["stats"]["cancelled"] >= 1, timeout=10)
    page.wait_for_timeout(300)
    assert page.locator("#log > *").count() == 0          # nothing of the old reply landed
    assert page.locator("#send").is_visible()
    page.fill("#input", "second")
    page.press("#input", "Enter")
    _wait_streaming_text(page)
    assert bodies[-1]["messages"] == [{"role": "user", "content": "second"}]
    page.click("#stop")
    page.wait_for_selector(".msg.assistant[data-state=stopped]", timeout=15000)
    assert page.locator(".msg.error").count() == 0
    page.close()


def test_enter_during_ime_composition_does_not_send(browser, server):
    page = browser.new_page()
    bodies = _chat_requests(page)
    page.goto(server.url + "/")
    page.fill("#input", "にほんご")
    for init in ("{key: 'Enter', isComposing: true}", "{key: 'Enter'}"):   # the second: Safari's keyCode 229
        page.evaluate(f"""() => {{ const e = new KeyboardEvent('keydown', Object.assign({init},
                {{bubbles: true, cancelable: true}}));
            if (!e.isComposing) Object.defineProperty(e, 'keyCode', {{value: 229}});
            document.getElementById('input').dispatchEvent(e); }}""")
    page.wait_for_timeout(300)
    assert bodies == [] and page.locator(".msg").count() == 0 and page.input_value("#input") == "にほんご"
    page.press("#input", "Enter")     # a plain Enter still sends
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=15000)
    assert bodies[0]["messages"] == [{"role": "user", "content": "にほんご"}]
    page.close()


def test_stop_keeps_the_partial_reply_and_each_reply_shows_tokens_per_second(browser, server, slow_server):
    page = browser.new_page()
    bodies = _chat_requests(page)
    page.goto(server.url + "/")
    page.fill("#input", "hi")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=15000)
    meta = page.locator(".msg.assistant + .meta").text_content()
    n, rate = re.fullmatch(r"(\d+) tokens · ([\d.]+) tokens/s", meta).groups()
    assert int(n) == len(tiny_tokenizer().encode(REPLY)) + 1 and float(rate) > 0   # usage: + <|assistant_end|>

    page.goto(slow_server.url + "/")
    page.fill("#input", "go on")
    page.press("#input", "Enter")
    _wait_streaming_text(page, 20)
    assert page.locator("#stop").is_visible() and page.locator("#send").is_hidden()
    page.click("#stop")
    page.wait_for_selector(".msg.assistant[data-state=stopped]", timeout=15000)
    partial = page.locator(".msg.assistant").text_content()
    assert 20 <= len(partial) < len(LONG) and LONG.startswith(partial)
    assert re.fullmatch(r"stopped · ≈\d+ tokens · [\d.]+ tokens/s", page.locator(".msg.assistant + .meta").text_content())
    assert page.locator("#send").is_visible()
    page.fill("#input", "and?")
    page.press("#input", "Enter")
    _wait_streaming_text(page, 1)
    assert bodies[-1]["messages"][:2] == [{"role": "user", "content": "go on"}, {"role": "assistant", "content": partial}]
    page.click("#stop")
    page.close()


def test_empty_replies_say_why_and_calculator_calls_show(browser):
    tok = tiny_tokenizer()
    sp = tok.encode_special
    fed_back = [sp("<|output_start|>")] + tok.encode("144") + [sp("<|output_end|>")]
    cases = [([], "1", "empty reply"),
             ([sp("<|python_start|>")] + tok.encode("1+2+3+4+5+6+7+8"), "3", "max tokens"),
             ([sp("<|python_start|>")] + tok.encode("12*12") + [sp("<|python_end|>")] + [0] * len(fed_back)
              + tok.encode(" It is 144."), "40", None)]
    for script, max_tokens, why in cases:
        with serve(ScriptedModel(tok, script, delay=0), tok) as s:
            page = browser.new_page()
            page.goto(s.url + "/")
            page.fill("#max_tokens", max_tokens)
            page.fill("#input", "12*12?")
            page.press("#input", "Enter")
            page.wait_for_selector(".msg.assistant[data-state=done]", timeout=15000)
            out = page.locator(".msg.assistant")
            if why:
                assert why in out.locator(".note").text_content()
            else:
                assert out.locator(".tool").text_content() == "[calculator: 12*12 = 144]"
                assert out.text_content() == "[calculator: 12*12 = 144] It is 144."
            page.close()
