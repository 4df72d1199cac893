"""Notebook fragments in a real browser: two attention viewers and a heads result on one page (as in one notebook).

Headless Chromium draws every image, and a script in the page moves the mouse over a token in each viewer
(dispatches the events a pointer would) and reads the weights each viewer then shows: each viewer changes
only itself, and shows that head's attention as ``run_with_cache`` computes it."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

import mechscope
from mechscope.core.hooks import run_with_cache
from tests.e2e.reports import BROWSERS
from tests.unit.test_heads import PROTOCOL, V, hand_built

PROBE = """<script>
window.addEventListener("load", () => {
  const hover = (span, kind) => span.dispatchEvent(new MouseEvent(kind, { bubbles: kind === "mouseover" }));
  const weights = (root) => [...root.querySelectorAll("span.tok")].map((s) => s.dataset.w ?? null);
  const viewers = [...document.querySelectorAll("div.ms-attn")];
  const out = { images: document.images.length, broken: [...document.images]
    .filter((i) => !(i.complete && i.naturalWidth > 0)).map((i) => i.alt), steps: [] };
  const [a, b] = viewers, qa = QA, qb = QB;
  out.ids = [a.id, b.id];
  out.before = [weights(a), weights(b)];
  hover(a.querySelector(`span.tok[data-i="${qa}"]`), "mouseover");
  out.steps.push({ a: weights(a), b: weights(b), readout: a.querySelector(".ms-readout").textContent });
  hover(b.querySelector(`span.tok[data-i="${qb}"]`), "mouseover");
  out.steps.push({ a: weights(a), b: weights(b), readout: b.querySelector(".ms-readout").textContent });
  // the heads result's own viewer (the report's), hovered the way a pointer enters a token
  const heads = document.querySelector("div.mechscope:not(.ms-attn) [id$='-tokens']");
  const spans = [...heads.querySelectorAll("span")];
  hover(spans[QH], "mouseenter");
  out.heads = { id: heads.id, titles: spans.map((s) => s.title), head: heads.parentElement.parentElement
    .querySelector("select").value };
  const pre = document.createElement("pre");
  pre.id = "hover-check";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def run_page(page: str, tmp_path) -> dict:
    browser = next((b for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no headless Chromium on PATH (Debian: apt install chromium)")
    path = tmp_path / "notebook.html"
    path.write_text(page, encoding="utf-8")
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           f"--user-data-dir={tmp_path / 'profile'}", "--proxy-server=127.0.0.1:9", "--virtual-time-budget=20000",
           "--dump-dom", path.as_uri()]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    found = re.search(r'<pre id="hover-check">(.*?)</pre>', done.stdout, re.S)
    assert found, f"the page's script did not finish (exit {done.returncode}): {done.stderr[-800:]}"
    return json.loads(html.unescape(found.group(1)))


def pattern(model, tokens, layer, head) -> np.ndarray:
    _, cache = run_with_cache(model, tokens[None], names=[f"blocks.{layer}.attn.hook_pattern"])
    return cache[f"blocks.{layer}.attn.hook_pattern"][0, head].numpy()


def test_two_viewers_and_a_report_on_one_page(tmp_path):
    model = hand_built()
    tokens = mechscope.lm.repeated_tokens(model, n=20, batch=4, seed=1, token_range=(1, V))
    heads = mechscope.lm.find_induction_heads(model, protocol=PROTOCOL)
    scores = mechscope.lm.head_scores(model, tokens)
    va = mechscope.attention(model, tokens[0], 1, 0)  # the induction head
    vb = mechscope.attention(model, tokens[1], 0, 0)  # the previous-token head, on another sequence
    qa, qb, qh = 30, 25, 33
    cells = [va._repr_html_(), vb._repr_html_(), heads._repr_html_(), scores._repr_html_()]
    probe = PROBE.replace("QA", str(qa)).replace("QB", str(qb)).replace("QH", str(qh))
    page = "<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>" + "".join(
        f'<div class="cell">{c}</div>' for c in cells
    ) + probe + "</body></html>"  # fmt: skip
    out = run_page(page, tmp_path)

    assert out["images"] >= 10 and out["broken"] == []  # every figure of both results drawn, nothing fetched
    assert out["ids"][0] != out["ids"][1]
    assert all(w is None for w in out["before"][0] + out["before"][1])  # nothing shown before a hover
    want_a = pattern(model, tokens[0], 1, 0)[qa]
    want_b = pattern(model, tokens[1], 0, 0)[qb]
    first, second = out["steps"]
    # hovering viewer A changes A only, and A shows head 1.0's attention from position qa
    np.testing.assert_allclose([float(w) for w in first["a"]], want_a, atol=1e-4)
    assert all(w is None for w in first["b"])
    assert int(np.argmax(want_a)) == qa - 20 + 1  # the induction stripe: the token after the first copy's
    assert f"position {qa} attends most to {int(np.argmax(want_a))}" in first["readout"]
    # then hovering viewer B changes B only (A keeps its weights), and B shows head 0.0's attention
    assert second["a"] == first["a"]
    np.testing.assert_allclose([float(w) for w in second["b"]], want_b, atol=1e-4)
    assert int(np.argmax(want_b)) == qb - 1  # the previous-token head
    # the heads report's viewer, in the same page: the weights of the head its menu shows, on its tokens
    layer, h = map(int, out["heads"]["head"].split("."))
    seq = torch.tensor(heads.examples["repeated"]["tokens"])
    want_h = pattern(model, seq, layer, h)[qh]
    shown = [float(t.rsplit(": ", 1)[1]) for t in out["heads"]["titles"]]
    np.testing.assert_allclose(shown, np.where(np.arange(len(want_h)) <= qh, want_h, 0), atol=1.5e-3)
    assert out["heads"]["id"].startswith(re.search(r'id="(ms[^"]+)"', cells[2]).group(1))
