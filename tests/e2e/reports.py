"""Checks shared by the report tests: the page is self-contained, and a real browser draws every image."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def check_report(path: Path) -> int:
    """The HTML parses, refers to nothing on the network, every image is inlined and decodes; returns the count."""
    from PIL import Image

    refs, img_srcs = [], []

    class Collect(HTMLParser):
        def handle_starttag(self, tag, attrs):
            refs.extend(v for k, v in attrs if k in ("src", "href") and v)
            if tag == "img":
                img_srcs.extend(v for k, v in attrs if k == "src")

    text = path.read_text(encoding="utf-8")
    Collect().feed(text)
    assert not [r for r in refs if r.startswith(("http:", "https:", "//"))]
    assert_made_by(text)
    assert img_srcs and all(s.startswith("data:image/png;base64,") for s in img_srcs)  # nothing to fetch
    for uri in img_srcs:
        with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as img:
            img.load()
    return len(img_srcs)


def assert_made_by(text: str) -> None:
    """The page ends with the footer that says what made it, as its JSON record's ``versions`` entry does."""
    from mechscope.core.outputs import versions

    footer = re.search(r'<footer class="made-by"[^>]*>Made by (.*?)\.</footer>\s*</body>', text, re.S)
    assert footer, "no made-by footer before </body>"
    assert html.unescape(footer.group(1)) == " · ".join(f"{k} {v}" for k, v in versions().items())


PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const bad = imgs.filter((i) => !(i.complete && i.naturalWidth > 0)).map((i) => i.alt || i.src.slice(0, 40));
  const out = document.createElement("pre");
  out.id = "render-check";
  out.textContent = JSON.stringify({ images: imgs.length, broken: bad });
  document.body.appendChild(out);
});
</script>"""


def render_in_chromium(path: Path, tmp_path: Path) -> dict:
    """Open a copy of the page in headless Chromium (no network) and report {"images": n, "broken": [alt, ...]}.

    Skips where no Chromium is installed (Debian: `apt install chromium`).
    """
    browser = next((b for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no headless Chromium on PATH (Debian: apt install chromium)")
    page = path.read_text(encoding="utf-8")
    assert "</body>" in page
    probe = tmp_path / f"probe-{path.name}"
    probe.write_text(page.replace("</body>", PROBE + "\n</body>"), encoding="utf-8")
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--proxy-server=127.0.0.1:9",  # any network fetch would fail and show as a broken image
        "--virtual-time-budget=20000",
        "--dump-dom",
        probe.as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    found = re.search(r'<pre id="render-check">(.*?)</pre>', done.stdout, re.S)
    assert found, f"Chromium did not finish the page (exit {done.returncode}): {done.stderr[-500:]}"
    return json.loads(html.unescape(found.group(1)))
