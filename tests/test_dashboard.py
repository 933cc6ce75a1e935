"""`GET /dashboard` of `llmrpc-head serve` over three real servers, rendered in headless Chromium
(Debian's package): after the page's script ran, its DOM shows every server, the strip colours
each of the model's layers by the server the plan gave it, and the figures are the head's; the
screenshot is a real PNG of the page with the servers' colours in it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.namespaces import stop

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PREFIX = "llmrpc-head serve listening on "
WINDOW = (1200, 800)
COLORS = [(0x3C, 0x7D, 0xD9), (0xE8, 0x83, 0x3A), (0x3A, 0xA7, 0x6D)]  # the page's first three server colours
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")


@pytest.fixture()
def head(tiny_models: dict[str, str]) -> Iterator[str]:
    """The API's root URL, over three local servers, after two completions."""
    cmd = [sys.executable, "-m", "llmrpc.cli", "serve", "--model", tiny_models["Q8_0"], "--port", "0", "--local", "3",
           "--threads", "1", "--parallel", "2", "--ctx-size", "128"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(PREFIX), line
        root = line[len(PREFIX) :].split()[0].removesuffix("/v1")
        for prompt in ("Hello", "Once upon a time"):
            body = json.dumps({"prompt": prompt, "max_tokens": 12, "temperature": 0}).encode()
            request = urllib.request.Request(root + "/v1/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as r:
                assert r.status == 200
        yield root
    finally:
        stop(proc)


def chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp / 'profile'}",
           f"--window-size={WINDOW[0]},{WINDOW[1]}", "--virtual-time-budget=5000", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


class _Elements(HTMLParser):
    """Every element's attributes and its text, by tag."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str]]] = []
        self.text: dict[str, str] = {}
        self._open: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.found.append((tag, a))
        self._open = a.get("id")

    def handle_data(self, data: str) -> None:
        if self._open:
            self.text[self._open] = self.text.get(self._open, "") + data


def test_the_dashboard_shows_every_server(head: str, tmp_path: Path) -> None:
    with urllib.request.urlopen(head + "/dashboard.json", timeout=30) as r:
        state = json.loads(r.read())
    addresses = [s["address"] for s in state["servers"]]
    assert len(addresses) == 3 and state["n_layer"] == 4 and state["generated_tokens"] == 24

    dom = chromium(tmp_path, "--dump-dom", head + "/dashboard")
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = _Elements()
    page.feed(dom.stdout)
    rows = [a["data-address"] for tag, a in page.found if tag == "tr" and "data-address" in a]
    assert rows == addresses  # every server, in the plan's order
    strip = {int(a["data-layer"]): a["data-server"] for tag, a in page.found if "data-layer" in a}
    planned = {layer: s["address"] for s in state["servers"] for layer in range(*s["planned"])}
    assert strip == planned and sorted(strip) == [0, 1, 2, 3]
    assert page.text["generated"] == "24" and page.text["replays"] == "0" and page.text["errors"] == "0"
    assert "tiny-Q8_0 (llama, 4 layers)" in page.text["model"]
    for s in state["servers"]:
        assert s["address"] in dom.stdout and f"[{s['layers'][0]}, {s['layers'][1]})" in dom.stdout

    shot = tmp_path / "dashboard.png"
    done = chromium(tmp_path, f"--screenshot={shot}", head + "/dashboard")
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    _check_screenshot(shot)


def _check_screenshot(path: Path) -> None:
    """A PNG of the window's size, not blank, showing each server's colour (swatches and strip)."""
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.size == WINDOW
        pixels = image.convert("RGB")
        colours = pixels.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, figures, bars: not a blank page
    counts = {c: n for n, c in colours}
    for colour in COLORS:
        assert counts.get(colour, 0) > 1000, f"no strip of colour {colour}"


def test_the_page_is_self_contained() -> None:
    """No external assets: every script and style is inline, nothing is fetched but the JSON."""
    html = (Path(__file__).parent.parent / "llmrpc" / "dashboard.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:)?//""", html)
    assert re.findall(r"fetch\(([^,)]+)", html) == ['"dashboard.json"']
