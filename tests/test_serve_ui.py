"""The web chat UI in a real headless Chromium (Debian's `chromium`, driven by playwright with
`executable_path`; scripts/install.sh installs it when it can): a message goes through the UI,
the reply streams in, a changed temperature rides on the next request, history is multi-turn,
an assistant reply containing <script> is shown as text, and the narrow layout does not overlap.

To make the model say `<script>` deterministically, the server runs on ScriptedModel: a stand-in
for the GPT (not for the scheduler, the server or the page, which are all the real ones) that
writes the tokens it is fed into the KV cache and always predicts the next token of a fixed
reply. A small delay per forward makes the streaming observable."""
import json
import os
import shutil

import pytest

from serve_helpers import ScriptedModel, serve, tiny_tokenizer

REPLY = 'Hi! <script>window.pwned = 1</script> <b>not bold</b> & "quotes"'


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
    page.close()
