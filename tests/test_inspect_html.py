"""`rlkd inspect --html` checked in a real headless Chromium (Debian's `chromium` package, which `make test` installs),
driven through the Chrome DevTools protocol with a small websocket client: no browser download, no Playwright.

The page must render without console errors or network requests, a real (synthesised mouse) click on a token must
show that token's cached top-k with the right probabilities and the tail as its own bar, and a screenshot is taken
(kept in ``$RLKD_SCREENSHOT_DIR`` when set, for a human to look at).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner


CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
    "--no-first-run", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
    "--disable-extensions", "--hide-scrollbars", "--mute-audio", "--window-size=1400,1000",
]


def chromium_binary() -> str:
    """Debian's chromium: the real binary behind the /usr/bin/chromium wrapper script (whose /etc/chromium.d
    snippets add extension flags we do not want), else whatever `chromium` is on PATH."""
    for cand in (os.environ.get("RLKD_CHROMIUM"), "/usr/lib/chromium/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    if os.environ.get("RLKD_SKIP_BROWSER") == "1":
        pytest.skip("RLKD_SKIP_BROWSER=1 and no chromium installed")
    pytest.fail("Debian's chromium is not installed: run `make chromium` (or `apt-get install chromium`); "
                "set RLKD_SKIP_BROWSER=1 to skip the browser tests explicitly")


class CDP:
    """A minimal Chrome DevTools protocol client over one page's websocket (synchronous)."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self._conn = connect(ws_url, max_size=None, open_timeout=10)
        self.ws = self._conn.__enter__()  # websockets wants connect() used as a context manager
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, timeout: float = 15.0) -> dict:
        self.next_id += 1
        mid = self.next_id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"CDP {method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_event(self, method: str, timeout: float = 15.0) -> dict:
        for i, ev in enumerate(self.events):
            if ev.get("method") == method:
                return self.events.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if msg.get("method") == method:
                return msg
            self.events.append(msg)

    def eval(self, expression: str):
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                             "awaitPromise": True})
        if "exceptionDetails" in res:
            raise RuntimeError(f"page JS failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    def drain(self, seconds: float = 0.2) -> None:
        """Collect events that arrive within ``seconds`` (console messages are asynchronous)."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                self.events.append(json.loads(self.ws.recv(timeout=left)))
            except TimeoutError:
                return

    def close(self):
        self._conn.__exit__(None, None, None)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless Chromium with a fresh profile, and a CDP client on its page."""
    binary = chromium_binary()
    tmp = tmp_path_factory.mktemp("chromium")
    profile = tmp / "profile"
    log = open(tmp / "chromium.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
                             "about:blank"], stdout=log, stderr=subprocess.STDOUT)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start (exit {proc.poll()}): "
                                   f"{(tmp / 'chromium.log').read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        port = int(port_file.read_text().splitlines()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            targets = json.load(r)
        page = next(t for t in targets if t.get("type") == "page")
        cdp = CDP(page["webSocketDebuggerUrl"])
        for domain in ("Runtime", "Log", "Page", "Network"):
            cdp.send(f"{domain}.enable")
        yield cdp
        cdp.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def page_errors(events: list[dict]) -> list[str]:
    """Uncaught exceptions, console.error/assert calls, and browser log entries of level error."""
    out = []
    for ev in events:
        m, p = ev.get("method"), ev.get("params", {})
        if m == "Runtime.exceptionThrown":
            out.append(f"exception: {p['exceptionDetails'].get('text')} {p['exceptionDetails'].get('exception', {})}")
        elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append(f"console.{p['type']}: {[a.get('value', a.get('description')) for a in p.get('args', [])]}")
        elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
            out.append(f"log {p['entry']['level']}: {p['entry'].get('text')} {p['entry'].get('url', '')}")
    return out


def requested_urls(events: list[dict]) -> list[str]:
    return [ev["params"]["request"]["url"] for ev in events if ev.get("method") == "Network.requestWillBeSent"]


def hits(row) -> list[int]:
    """Positions whose actual next token is in the cached top-k, response positions first."""
    found = [t for t in range(row.num_positions) if row.target_rank[t] <= row.topk_count[t]]
    return sorted(found, key=lambda t: not row.loss_mask[t])


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_teacher_dir, tiny_student_dir):
    """An HTML report of a small cache scored by the tiny teacher on corpus text, with a student's agreement.

    The heatmap shows two rows, one where the (random) teacher ranks some real next token inside its
    top-k, so the click test can check that the chart marks it. Returns (path, heatmap row indices, all rows).
    """
    from rlkd.cache import CacheReader
    from rlkd.cli import main
    from tests.cache_from_model import write_cache_from_model

    tmp = tmp_path_factory.mktemp("report")
    cache = write_cache_from_model(tiny_teacher_dir, tmp / "cache", n_rows=8, k=16, codec="q8", seed=5)
    rows = list(CacheReader(cache, shuffle=False).iter_rows())
    with_hit = [i for i, r in enumerate(rows) if hits(r)]
    assert with_hit, "the tiny teacher never ranks a real next token in its top-16: change the seed"
    shown = sorted({with_hit[0], 0 if with_hit[0] != 0 else 1})  # the heatmap lists rows in file order
    out = tmp / "report.html"
    res = CliRunner().invoke(main, ["inspect", str(cache), "--html", str(out), "--rows", ",".join(map(str, shown)),
                                    "--student", str(tiny_student_dir)])
    assert res.exit_code == 0, res.output
    return out, shown, with_hit[0], rows, tiny_student_dir


def test_report_is_self_contained(report):
    out = report[0]
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>")
    for needle in ("http://", "https://", "src=", "@import", "url("):
        # Only the SVG namespace URI may appear (it is an identifier, never fetched).
        hits = [h for h in page.split(needle)[1:] if not h.startswith("www.w3.org/2000/svg")]
        assert not hits, f"report references an external resource via {needle!r}"
    assert 'id="student-metrics"' in page and "cr@2" in page and "mor@10" in page


def test_report_in_headless_chromium(browser, report, tmp_path):
    out, shown, hit_row, rows, student_dir = report
    cdp = browser
    cdp.events.clear()
    cdp.send("Page.navigate", {"url": out.resolve().as_uri()})
    cdp.wait_event("Page.loadEventFired", timeout=20)
    assert cdp.eval("document.body.dataset.ready") == "1"
    cdp.drain(0.3)
    assert page_errors(cdp.events) == []
    urls = requested_urls(cdp.events)
    assert urls and all(u.startswith(("file:", "data:")) for u in urls), urls

    # The heatmap holds the chosen rows: one clickable span per scored position.
    n_tokens = cdp.eval("document.querySelectorAll('.tok[data-pos]').length")
    assert n_tokens == sum(rows[i].num_positions for i in shown)
    assert cdp.eval("document.querySelectorAll('svg.chart').length") == 6

    # Click (a real mouse event at the span's centre) a position whose actual next token is inside the cached
    # top-k, so the chart must mark it.
    hr, ci = shown.index(hit_row), hit_row
    row = rows[ci]
    t = hits(row)[0]
    rect = cdp.eval(f"""(() => {{ const el = document.querySelector('.tok[data-row="{hr}"][data-pos="{t}"]');
        el.scrollIntoView({{block: 'center'}}); const r = el.getBoundingClientRect();
        return {{x: r.left + r.width / 2, y: r.top + r.height / 2, w: r.width}}; }})()""")
    assert rect["w"] > 0
    for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
        cdp.send("Input.dispatchMouseEvent", {"type": kind, "x": rect["x"], "y": rect["y"], "button": "left",
                                              "clickCount": 1})
    shown = cdp.eval("""(() => ({
        title: document.querySelector('#detail h2').textContent,
        bars: [...document.querySelectorAll('#topk-chart .bar')].map(g => ({
            cls: g.getAttribute('class'), id: g.dataset.id, prob: +g.dataset.prob, sprob: +g.dataset.studentProb,
            text: +g.querySelector('text.prob').textContent, label: g.querySelector('text.label').textContent})),
        selected: document.querySelector('.tok.sel') && document.querySelector('.tok.sel').dataset.pos}))()""")
    assert shown["title"] == f"row {ci}, position {t}"
    assert shown["selected"] == str(t)

    counts = np.asarray(row.topk_count)
    start, n = int(counts[:t].sum()), int(counts[t])
    ids = np.asarray(row.topk_ids[start:start + n])
    probs = np.exp(np.asarray(row.topk_logprobs[start:start + n], dtype=np.float64))
    bars, tail = shown["bars"][:-1], shown["bars"][-1]
    assert [int(b["id"]) for b in bars] == ids.tolist()
    np.testing.assert_allclose([b["prob"] for b in bars], probs, rtol=1e-5)
    np.testing.assert_allclose([b["text"] for b in bars], probs, atol=5.01e-5)  # shown with 4 decimals
    nxt = int(row.input_ids[t + 1])
    assert [("next" in b["cls"].split()) for b in bars] == (ids == nxt).tolist() and (ids == nxt).any()
    assert "tail" in tail["cls"].split()
    np.testing.assert_allclose(tail["prob"], np.exp(np.float64(row.tail_logmass[t])), rtol=1e-5, atol=1e-12)

    # The student's bars: its probabilities of the same tokens and of the rest, from a plain transformers forward.
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(student_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        q = torch.softmax(model(torch.tensor(row.input_ids[None], dtype=torch.long)).logits[0, t].double(), -1)
    q = q.numpy()  # (V,)
    np.testing.assert_allclose([b["sprob"] for b in bars], q[ids], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(tail["sprob"], 1 - q[ids].sum(), rtol=1e-4, atol=1e-7)

    # The colour toggle repaints the tokens.
    bg = "getComputedStyle(document.querySelector('.tok[data-pos]')).backgroundColor"
    before = [cdp.eval(bg)]
    cdp.eval("document.querySelector('input[value=\"peaks\"]').click()")
    assert cdp.eval("document.getElementById('scale-hi').textContent").isdigit()
    cdp.eval("document.querySelector('input[value=\"kd\"]').click()")  # the student's KL, present with --student
    assert cdp.eval("document.getElementById('scale-hi').textContent").endswith("nats")
    cdp.eval("document.querySelector('input[value=\"hlo\"]').click()")
    assert cdp.eval(bg) == before[0]

    shot = cdp.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})
    png = base64.b64decode(shot["data"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    (tmp_path / "report.png").write_bytes(png)
    keep = os.environ.get("RLKD_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        (Path(keep) / "inspect_report.png").write_bytes(png)
        full = cdp.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        (Path(keep) / "inspect_report_full.png").write_bytes(base64.b64decode(full["data"]))
    cdp.drain(0.2)
    assert page_errors(cdp.events) == []


def test_the_error_check_can_fail(browser):
    """The console-error check above is only meaningful if it sees errors: a page that logs one and throws."""
    cdp = browser
    cdp.events.clear()
    cdp.send("Page.navigate", {"url": "data:text/html,<p>x</p><script>console.error('boom'); nosuchfn();</script>"})
    cdp.wait_event("Page.loadEventFired", timeout=20)
    cdp.drain(0.3)
    errors = page_errors(cdp.events)
    assert any("boom" in e for e in errors) and any("nosuchfn" in e for e in errors), errors


HTML_LIKE = ["<!--", "<script>", "</script>", "<b>", "&amp;"]
"""Tokens that, written raw into the page's embedded JSON, switch the HTML parser into its escaped-script states:
after ``<!--`` and ``<script>`` the real ``</script>`` no longer ends the data element, so the page never becomes
ready. (Ids are assigned in this order, so no ``-->`` comes after them to undo it.)"""


def test_report_survives_html_like_tokens_in_chromium(browser, tmp_path, tiny_tokenizer_dir):
    """#13 item 10: a tokenizer with `<!--` and `<script>` tokens; the report loads and shows them as text."""
    from transformers import AutoTokenizer

    from rlkd.cache import CacheWriter, tokenizer_identity
    from rlkd.cli import main
    from tests.cache_helpers import full_logprobs, row_from_logprobs

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    tok.add_tokens(HTML_LIKE)
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(str(tok_dir))
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    special = tok.convert_tokens_to_ids(HTML_LIKE)
    assert [tok.decode([i]) for i in special] == HTML_LIKE
    ids = np.array(special + tok(" plain words", add_special_tokens=False)["input_ids"] + special[::-1], np.int32)
    rng = np.random.default_rng(1)
    lp = full_logprobs(rng, len(ids) - 1, len(tok))
    lp[:, special] += 30.0  # the teacher's top-k holds the HTML-like tokens too
    lp -= np.logaddexp.reduce(lp, axis=1, keepdims=True)
    row = row_from_logprobs(lp, ids, 0, 8)
    meta = {"teacher": {"name_or_path": str(tok_dir), "vocab_size": len(tok)}, "tokenizer": tokenizer_identity(tok),
            "dataset": {"name": "</script><script>alert(1)</script>"}, "config": {},
            "logprobs_mode": "raw_logprobs", "temperature": 1.0, "engine": "numpy"}
    with CacheWriter(tmp_path / "c", meta, k=8, codec="fp32") as w:
        w.write(row)
    out = tmp_path / "report.html"
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "c"), "--html", str(out), "--rows", "0"])
    assert res.exit_code == 0, res.output
    page = out.read_text()
    data = page.split('<script type="application/json" id="rlkd-data">')[1].split("</script>")[0]
    assert not any(c in data for c in "<>&")  # all written as \u003c, \u003e, \u0026
    assert json.loads(data)["vocab"][str(special[0])] == "<!--"  # the same strings to a JSON parser

    cdp = browser
    cdp.events.clear()
    cdp.send("Page.navigate", {"url": out.resolve().as_uri()})
    cdp.wait_event("Page.loadEventFired", timeout=20)
    assert cdp.eval("document.body.dataset.ready") == "1"
    cdp.drain(0.3)
    assert page_errors(cdp.events) == []
    assert cdp.eval("document.querySelectorAll('.tok[data-pos]').length") == row.num_positions
    shown = cdp.eval("document.getElementById('heatmap').textContent")
    for t in HTML_LIKE:
        assert t in shown, t
    assert cdp.eval("document.querySelectorAll('#heatmap script, #heatmap b').length") == 0  # text, not markup
