"""The playground page of keenlm serve (GET /) driven in headless Chromium by playwright, against
a live server on the tiny random model of test_serve: a chat reply streams in and matches the
server's own greedy answer, a majority vote lists its candidates and compute, errors show in the
page, and nothing is logged to the console on the way."""
import importlib.util
import os
import shutil

import pytest

from test_serve import Live, tiny  # first: test_serve skips this module without the serve extra

import httpx  # noqa: E402
from keenlm.report import BROWSERS  # noqa: E402
from keenlm.serve.app import create_app  # noqa: E402
from keenlm.serve.scheduler import Scheduler  # noqa: E402

ASK = "hello there"


def _chromium() -> str:
    """The browser's path; skip (fail on CI) when playwright or Chromium is missing."""
    why = None
    if importlib.util.find_spec("playwright") is None:
        why = "playwright is not installed (pip install playwright; Chromium comes from the system)"
    exe = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if why is None and exe is None:
        why = "no Chromium here: apt-get install chromium"
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the page tests: {why}")
        pytest.skip(why)
    return exe


@pytest.fixture(scope="module")
def browser():
    exe = _chromium()
    from playwright.sync_api import sync_playwright  # optional: only these tests need it

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def live():
    net, tok = tiny()
    sched = Scheduler(net, tok, max_batch=8, max_len=256, max_queue=32).start()
    server = Live(create_app(sched, "tiny"))
    yield server
    server.close()
    sched.stop()


class Page:
    """A fresh page on ``url`` that records console errors and uncaught exceptions."""

    def __init__(self, browser, url):
        self.page = browser.new_page()
        self.errors, self.uncaught = [], []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.uncaught.append(str(e)))
        self.page.goto(url)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.page.close()


def test_the_page_loads_clean_and_shows_the_model(browser, live):
    with Page(browser, live.url) as p:
        p.page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
        assert p.page.text_content("#status") == "ready"
        html = p.page.content()
        assert "http://" not in html and "https://" not in html  # self-contained
        assert p.errors == [] and p.uncaught == []


def test_a_chat_reply_streams_in_and_is_the_servers_greedy_answer(browser, live):
    want = httpx.post(live.url + "/v1/chat/completions", timeout=30, json={
        "model": "tiny", "messages": [{"role": "user", "content": ASK}], "max_tokens": 12,
        "temperature": 0}).json()["choices"][0]["message"]["content"]
    with Page(browser, live.url) as p:
        pg = p.page
        pg.wait_for_function("document.getElementById('model').textContent === 'tiny'")
        pg.fill("#temperature", "0")
        pg.fill("#max_tokens", "12")
        # every text the assistant message is given, as it is given: a streamed reply is
        # written several times, a reply that arrived whole once
        pg.evaluate("""() => {
            window.seen = [];
            new MutationObserver((records) => {
                for (const r of records)
                    if (r.target.classList && r.target.classList.contains('assistant'))
                        for (const n of r.addedNodes) window.seen.push(n.textContent.length);
            }).observe(document.getElementById('messages'), {childList: true, subtree: true});
        }""")
        pg.fill("#prompt", ASK)
        pg.click("#send")
        pg.wait_for_function("document.getElementById('status').textContent === 'done'")
        seen = pg.evaluate("window.seen")
        assert len({n for n in seen if n > 0}) >= 2, seen
        assert pg.locator("#messages .msg.user").all_text_contents() == [ASK]
        assert pg.locator("#messages .msg.assistant").all_text_contents() == [want]
        pg.click("#clear")
        assert pg.locator("#messages .msg").count() == 0
        assert p.errors == [] and p.uncaught == []


def test_a_majority_vote_shows_its_candidates_and_compute(browser, live):
    with Page(browser, live.url) as p:
        pg = p.page
        pg.wait_for_function("document.getElementById('model').textContent === 'tiny'")
        pg.select_option("#strategy", "majority")
        pg.fill("#n", "4")
        pg.fill("#temperature", "1")
        pg.fill("#seed", "5")
        pg.fill("#max_tokens", "12")
        pg.fill("#prompt", "12+30=")
        pg.click("#send")
        pg.wait_for_function("document.getElementById('status').textContent === 'done'")
        assert pg.locator("#candidates tbody tr").count() == 4
        texts = pg.locator("#candidates td.text").all_text_contents()
        chosen = pg.locator("#messages .msg.assistant").all_text_contents()
        assert len(chosen) == 1 and chosen[0] in texts
        compute = pg.text_content("#candidates .compute")
        generated = int(compute.split("compute: ")[1].split(" tokens")[0])
        assert 0 < generated <= 4 * 12 and "FLOP" in compute, compute
        assert p.errors == [] and p.uncaught == []


def test_errors_show_in_the_status_line(browser, live):
    # a request beyond the context: the server's 400 message, and the turn is not kept
    with Page(browser, live.url) as p:
        pg = p.page
        pg.wait_for_function("document.getElementById('model').textContent === 'tiny'")
        pg.fill("#max_tokens", "10000")
        pg.fill("#prompt", ASK)
        pg.click("#send")
        pg.wait_for_selector("#status.error")
        assert "exceed the context" in pg.text_content("#status")
        assert pg.locator("#messages .msg.assistant").count() == 0
        assert pg.input_value("#prompt") == ASK  # given back, to try again
        assert p.uncaught == [] and all("status of 400" in m for m in p.errors), p.errors
    # a server with a key: the page asks for it, then lists the model; a full queue's 429
    net, tok = tiny()
    sched = Scheduler(net, tok, max_batch=2, max_len=64, max_queue=0)  # not started: never drains
    server = Live(create_app(sched, "tiny", api_key="s3cret"))
    try:
        with Page(browser, server.url) as p:
            pg = p.page
            pg.wait_for_selector("#status.error")
            assert "API key" in pg.text_content("#status")
            pg.fill("#api_key", "s3cret")
            pg.press("#api_key", "Enter")  # a change: the page asks for the models again
            pg.wait_for_function("document.getElementById('model').textContent === 'tiny'")
            pg.fill("#max_tokens", "12")
            pg.fill("#prompt", ASK)
            pg.click("#send")
            pg.wait_for_selector("#status.error")
            assert "busy" in pg.text_content("#status")
            assert p.uncaught == []
            # only the browser's own line for each refused request, nothing thrown
            assert [m.split("status of ")[1][:3] for m in p.errors] == ["401", "429"], p.errors
    finally:
        server.close()
