"""The attribution-graph viewer in headless Chromium: the page draws every node and kept edge by layer and position,
hovering a node lights exactly its edges, each edge names its weight, clicking a feature opens its card with its
dashboard, pinned nodes group into a labelled supernode, and the annotated JSON the page downloads loads back (as
mechscope's graph and as circuit-tracer's qParams). Offline: the page refers to nothing on the network."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from dataclasses import replace

import pytest

from mechscope.core.attribution_graph import load_graph
from mechscope.lm.methods.attribution_graph import GraphSettings, LmAttributionGraph, attribution_graph
from tests.unit.test_attribution_graph_lm import TOKENS, random_transcoders, tiny

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

REPORT_OUT = """  const pre = document.createElement("pre");
  pre.id = "viewer-check";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""  # a probe's end: its ``out`` written where run_in_chromium reads it


PROBE = """<script>
window.addEventListener("load", () => {
  const out = {};
  try {
    const G = window.mechscopeGraph, svg = document.getElementById("agv-svg");
    out.node_els = svg.querySelectorAll("g.agv-node").length;
    out.edge_els = svg.querySelectorAll("path.agv-edge").length;
    out.rows = [...svg.querySelectorAll("text")].map(t => t.textContent);
    // hover the feature node: its edges light up, no other edge does
    const g = svg.querySelector(`g.agv-node[data-id="${FEAT}"]`);
    g.dispatchEvent(new MouseEvent("mouseenter"));
    out.lit = [...svg.querySelectorAll("path.agv-edge.lit")].map(p => Number(p.dataset.k)).sort((a, b) => a - b);
    out.hovering = svg.classList.contains("hovering");
    out.edge_titles = [...svg.querySelectorAll("path.agv-edge > title")].map(t => t.textContent);
    out.node_titles = Object.fromEntries([...svg.querySelectorAll("g.agv-node")]
      .map(n => [n.dataset.id, n.querySelector("title").textContent]));
    out.logit_labels = [...svg.querySelectorAll("text.agv-logit-label")].map(t => t.textContent);
    // the row labels follow the frame when it scrolls (a graph opens scrolled to its logits)
    const box = svg.parentElement;
    box.style.maxWidth = "120px"; box.scrollLeft = 40; box.dispatchEvent(new Event("scroll"));
    out.scroll = box.scrollLeft;
    out.row_labels = svg.querySelector("g.agv-rowlabels").getAttribute("transform");
    g.dispatchEvent(new MouseEvent("mouseleave"));
    // click it: its card, with its dashboard
    g.dispatchEvent(new MouseEvent("click"));
    out.card = document.getElementById("agv-side").textContent;
    // pin through the card's button, pin another, tick both, label, group through the page's controls
    document.getElementById("agv-pinbtn").click();
    G.pin(OTHER);
    document.querySelectorAll("#agv-pins input.agv-check").forEach(c => { c.checked = true; });
    document.getElementById("agv-label").value = "my supernode";
    document.getElementById("agv-group").click();
    out.state = JSON.parse(document.getElementById("agv-state").textContent);
    out.annotated = G.annotated();
    out.ct = G.circuitTracer().qParams;
    out.rings = svg.querySelectorAll("circle.agv-ring").length;
    // a saved JSON's annotations load back; a foreign one is refused
    G.load({nodes: [], pinned: [], supernodes: []});
    out.after_clear = G.state();
    G.load(out.annotated);
    out.after_load = G.state();
    try { G.load({nodes: [], pinned: ["nope"], supernodes: []}); out.refused = false; }
    catch (e) { out.refused = e.message; }
  } catch (e) { out.error = String(e && e.stack || e); }
"""
PROBE += REPORT_OUT


def run_in_chromium(page: str, tmp_path) -> dict:
    browser = next((b for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no headless Chromium on PATH (Debian: apt install chromium)")
    path = tmp_path / "graph.html"
    path.write_text(page, encoding="utf-8")
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--proxy-server=127.0.0.1:9",
        "--virtual-time-budget=20000",
        "--dump-dom",
        path.as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    found = re.search(r'<pre id="viewer-check">(.*?)</pre>', done.stdout, re.S)
    assert found, f"the page's script did not finish (exit {done.returncode}): {done.stderr[-800:]}"
    return json.loads(html.unescape(found.group(1)))


def test_viewer_in_headless_chromium(tmp_path):
    from mechscope.lm.report.attribution_graph import page

    model = tiny("gpt2")
    graph, _ = attribution_graph(
        model, random_transcoders(model), TOKENS, settings=GraphSettings(batch_size=8, check_sources=0)
    )
    feat = max(graph.features(), key=lambda n: len(graph.inputs_of(n["id"])))
    other = next(n["id"] for n in graph.nodes if n["kind"] == "logit")
    key = f"{feat['layer']}_{feat['feature']}"
    dash = {key: {"examples": [{"tokens": ["a", "b<c"], "acts": [0.5, 2.0], "max": 2.0}], "note": "made up here"}}
    graph = replace(graph, dashboards=dash)
    text = page(graph)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # offline: nothing to fetch
    probe = text.replace(
        "</body>", PROBE.replace("FEAT", json.dumps(feat["id"])).replace("OTHER", json.dumps(other)) + "\n</body>"
    )
    out = run_in_chromium(probe, tmp_path)
    assert "error" not in out, out.get("error")
    assert out["node_els"] == len(graph.nodes) and out["edge_els"] == len(graph.edges)
    assert {"inputs", "0", "1", "logits"} <= set(out["rows"])  # rows by layer
    i = next(k for k, n in enumerate(graph.nodes) if n["id"] == feat["id"])
    mine = sorted(k for k, (a, b, _) in enumerate(graph.edges) if i in (a, b))
    assert out["hovering"] and out["lit"] == mine and mine
    a, b, w = graph.edges[mine[0]]
    assert f"{graph.nodes[a]['id']} → {graph.nodes[b]['id']}: weight" in out["edge_titles"][mine[0]]
    assert feat["label"] in out["card"] and "Strongest inputs" in out["card"] and "made up here" in out["card"]
    # the node's own influence, and the cumulative share (lower: more influential) labelled as such
    assert "cumulative influence share" in out["card"] and "(lower: more influential)" in out["card"]
    title = out["node_titles"][feat["id"]]
    own = re.search(r"\] influence ([-0-9.e]+), cumulative influence share ([-0-9.e]+) \(lower", title)
    assert own, title
    assert float(own.group(1)) == pytest.approx(feat["influence_raw"], rel=1e-2)
    assert float(own.group(2)) == pytest.approx(feat["influence"], rel=1e-2, abs=1e-3)
    logits = [n for n in graph.nodes if n["kind"] == "logit"]
    assert len(out["logit_labels"]) == len(logits) and "probability" in out["node_titles"][logits[0]["id"]]
    assert all(lab.startswith('"') for lab in out["logit_labels"])
    assert out["scroll"] > 0 and out["row_labels"] == f"translate({out['scroll']},0)"
    assert "b<c" in out["card"]  # the dashboard's tokens, escaped into text
    sn = {"label": "my supernode", "members": sorted([feat["id"], other])}
    assert sorted(out["state"]["pinned"]) == sn["members"]
    assert [{"label": s["label"], "members": sorted(s["members"])} for s in out["state"]["supernodes"]] == [sn]
    assert out["rings"] == 2
    assert out["ct"]["supernodes"][0][0] == "my supernode" and sorted(out["ct"]["pinnedIds"]) == sn["members"]
    assert out["after_clear"]["pinned"] == [] and out["after_load"]["supernodes"] == out["state"]["supernodes"]
    assert "does not have" in out["refused"]
    # the JSON the page downloads is a graph mechscope loads back, with the annotations
    saved = tmp_path / "annotated.json"
    saved.write_text(json.dumps(out["annotated"]))
    back = load_graph(saved, LmAttributionGraph)
    assert back.edges == graph.edges and sorted(back.pinned) == sn["members"]
    assert [s["label"] for s in back.supernodes] == ["my supernode"]


def test_the_page_says_where_the_linear_graph_and_the_model_part():
    """A record with only the graph's prediction and the model's change (a CNN's gates opening: 10x) gets a line
    with the ratio; a sign flip too; agreement within 2x none; the pair gets the general diagnosis once."""
    from mechscope.core.render.graph_sections import _gap_reason, _prediction_gaps

    def check(pred, model):
        return {"description": "ablate 1_9_1", "logits": [{"label": "7", "predicted_full": pred, "model": model}]}

    checks = [check(-1.541, -0.1524), check(0.5, -0.1), check(-1.0, -0.8), check(float("nan"), 1)]
    lines, steps = _prediction_gaps(checks)
    assert lines == [
        "ablate 1_9_1, logit '7': the graph (all edges) -1.541 vs the model -0.1524 (10.1× as large).",
        "ablate 1_9_1, logit '7': the graph (all edges) +0.5 vs the model -0.1 (the opposite sign).",
    ]
    assert steps == [("predicted_full", "model")]
    assert "the parts the graph holds fixed change under this intervention" in _gap_reason(steps[0], "cnn", {})


def test_a_cnn_graph_says_which_grid_its_positions_are_in_and_skips_empty_entries():
    """With the channels (or a transcoder) positions are in each stage's grid before pooling (conv2 8x8, where
    explain's shapes give 4x4): the page says so; a dictionaries entry with nothing in it (no paths: built here) is
    not a row."""
    from mechscope.cnn.report.attribution_graph import _grids
    from mechscope.core.render.graph_sections import sections_html

    grids = [[24, 24], [8, 8]]
    d = {"settings": {"grids": grids}, "layer_names": ["conv1", "conv2"], "dictionaries": {"kind": "channels"}}
    assert _grids(d).endswith("before its ReLU and max-pool (conv{i}.hook_pre, where the stage's own channels are "
                              "read): conv1 24×24, conv2 8×8.")  # fmt: skip
    html = sections_html({"nodes": [], "settings": {}, "dictionaries": {"kind": "channels", "paths": []}})
    assert "channels" in html and "paths" not in html
