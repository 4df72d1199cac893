"""The attribution-graph pages against truths outside them: the hand-built graph of
tests/graphs/test_attribution_graph_truths.py (every edge written out there, with its sign) rendered by the lm and cnn
pages, then read back: headless Chromium reports where the viewer drew each node and edge (checked against the
documented layout: rows are layers, inputs at the bottom and logits at the top, columns are positions in order, a
cell's nodes ordered by influence around its centre), html.parser reads the page's text, tables and title, and the
json module reads the record the viewer embeds. Labels a user wrote carry < & " and read back as themselves."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from html.parser import HTMLParser

import pytest

from mechscope.cnn.report.attribution_graph import page as cnn_page
from mechscope.core.render import graph_sections as gs
from mechscope.lm.report.attribution_graph import page as lm_page
from tests.graphs.test_attribution_graph_truths import EDGES, F0, F1, F2, IDS, IN0, IN1, L0, E, graph
from tests.unit.test_attribution_graph_viewer import REPORT_OUT, run_in_chromium
from tests.unit.test_cnn_pages_truths import Page

TOKENS = {IN0: '<i>a&"', IN1: "</script>b"}  # what a user typed: the prompt's two tokens
MID = "m&<id>"  # the token the features and the error sit on
MODEL = '<m> & "M"'
WEIGHTS = {(IDS[s], IDS[t]): w for (t, s), w in EDGES.items() if F2 not in (s, t)}  # (source id, target id): w

PROBE = """<script>
window.addEventListener("load", () => {
  const out = {};
  try {
    const svg = document.getElementById("agv-svg"), num = (el, a) => Number(el.getAttribute(a));
    out.nodes = Object.fromEntries([...svg.querySelectorAll("g.agv-node")].map(g => [g.dataset.id,
      g.getAttribute("transform").match(/translate\\(([-0-9.e]+),([-0-9.e]+)\\)/).slice(1).map(Number)]));
    out.edges = [...svg.querySelectorAll("path.agv-edge")].map(p => ({d: p.getAttribute("d"),
      stroke: p.getAttribute("stroke"), width: num(p, "stroke-width"), title: p.querySelector("title").textContent}));
    out.rows = [...svg.querySelectorAll("g.agv-rowlabels text")].map(t => [t.textContent, num(t, "y")]);
    out.cols = [...svg.querySelectorAll("text[text-anchor=middle]")].map(t => [t.textContent, num(t, "x")]);
    out.logit_labels = [...svg.querySelectorAll("text.agv-logit-label")].map(t => t.textContent);
    out.titles = Object.fromEntries([...svg.querySelectorAll("g.agv-node")]
      .map(g => [g.dataset.id, g.querySelector("title").textContent]));
    const card = (id) => {
      window.mechscopeGraph.select(id);
      const side = document.getElementById("agv-side");
      return {name: side.querySelector("b").textContent, head: side.querySelector(".muted").textContent,
        tables: [...side.querySelectorAll("table")].map(t => [...t.querySelectorAll("tr")]
          .map(r => [...r.children].map(c => c.textContent)))};
    };
    out.cards = {feature: card(FEATURE), input: card(INPUT)};
  } catch (e) { out.error = String(e && e.stack || e); }
"""
PROBE += REPORT_OUT


def labelled(kind: str = "lm"):
    """The hand-built graph with the user's tokens as its inputs' labels, each feature's and error's token, distinct
    whole and pruned scores and both thresholds in its settings."""
    g = graph(kind=kind)
    nodes = []
    for n in g.nodes:
        n = dict(n)
        if n["kind"] == "input":
            n["label"] = TOKENS[IN0 if n["id"] == IDS[IN0] else IN1]
        elif n["kind"] in ("feature", "error"):
            n["ctx_label"] = MID
        nodes.append(n)
    scores = {"replacement": 0.625, "replacement_pruned": 0.5, "completeness": 0.875, "completeness_pruned": 0.75}
    settings = {"node_threshold": 0.8, "edge_threshold": 0.98}
    return replace(g, nodes=tuple(nodes), model=MODEL, input_labels=(TOKENS[IN0], TOKENS[IN1]), scores=scores,
                   settings=settings)  # fmt: skip


@pytest.fixture(scope="module")
def drawn(tmp_path_factory) -> dict:
    probe = PROBE.replace("FEATURE", json.dumps(IDS[F1])).replace("INPUT", json.dumps(IDS[IN0]))
    out = run_in_chromium(lm_page(labelled()).replace("</body>", probe + "\n</body>"), tmp_path_factory.mktemp("v"))
    assert "error" not in out, out["error"]
    return out


def node_of(g, node_id: str) -> dict:
    return next(n for n in g.nodes if n["id"] == node_id)


def row_name(n: dict) -> str:
    return "inputs" if n["kind"] == "input" else "logits" if n["kind"] == "logit" else ("0", "1")[n["layer"]]


def js_fmt(x: float) -> str:
    """The viewer's fmt: 2 decimals from 1 up, else 3 significant figures (JavaScript's toPrecision(3))."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.2f}" if abs(x) >= 1 else f"{x:#.3g}"


def test_rows_are_layers_inputs_at_the_bottom_logits_at_the_top(drawn):
    """Documented rule: one row per layer, inputs at the bottom, logits at the top (SVG y grows downwards), rows evenly
    spaced; every node sits on the row its row label names (the label 4 px under the line's centre)."""
    rows = dict(drawn["rows"])
    assert list(rows) == ["inputs", "0", "1", "logits"]
    ys = [rows[r] for r in ("inputs", "0", "1", "logits")]
    gaps = {round(a - b, 6) for a, b in zip(ys, ys[1:], strict=False)}
    assert len(gaps) == 1 and gaps.pop() > 0
    g = labelled()
    for n in g.nodes:
        assert drawn["nodes"][n["id"]][1] == pytest.approx(rows[row_name(n)] - 4), n["id"]


def cell_centres(drawn, g) -> dict:
    """The mean x of the nodes at each position (ctx): a cell's nodes are spread around its column's centre."""
    xs: dict = {}
    for n in g.nodes:
        xs.setdefault((row_name(n), n["ctx"]), []).append(drawn["nodes"][n["id"]][0])
    return {key: sum(v) / len(v) for key, v in xs.items()}


def test_columns_are_positions_in_order_evenly_spaced_and_labelled_by_their_token(drawn):
    """Documented rule: columns are positions left to right, evenly spaced; every cell is centred on its column's
    label; an lm column is labelled by its input token (or the token its features sit on), as the user wrote it."""
    g = labelled()
    ctxs = sorted({n["ctx"] for n in g.nodes})
    assert [t for t, _ in drawn["cols"]] == [TOKENS[IN0][:14], MID, TOKENS[IN1][:14]]
    col_x = [x for _, x in drawn["cols"]]
    steps = {round(b - a, 6) for a, b in zip(col_x, col_x[1:], strict=False)}
    assert len(steps) == 1 and steps.pop() > 0
    for (_, ctx), centre in cell_centres(drawn, g).items():
        assert centre == pytest.approx(col_x[ctxs.index(ctx)])


def test_a_cells_nodes_go_left_to_right_by_influence_evenly_spaced(drawn):
    """Documented rule: in a cell, the most influential (lowest cumulative share) on the left. Layer 0 at the
    features' position holds f0 (share ~0.30) and the error node (share 1.0): f0 left of the error."""
    g = labelled()
    f0, err = node_of(g, IDS[F0]), node_of(g, IDS[E])
    assert f0["influence"] < err["influence"] and (f0["layer"], f0["ctx"]) == (err["layer"], err["ctx"])
    assert drawn["nodes"][IDS[F0]][0] < drawn["nodes"][IDS[E]][0]
    logits = sorted(drawn["nodes"][n["id"]][0] for n in g.nodes if n["kind"] == "logit")
    f1 = drawn["nodes"][IDS[F1]][0]
    assert f1 == pytest.approx(sum(logits) / 2)  # a lone node sits on the centre of the two beside it


def ends(d: str) -> tuple[tuple[float, float], tuple[float, float]]:
    nums = [float(v) for v in re.findall(r"-?[0-9.]+(?:e-?[0-9]+)?", d)]
    return (nums[0], nums[1]), (nums[-2], nums[-1])


def test_each_edge_runs_from_its_source_to_its_target_in_the_colour_of_its_sign(drawn):
    """Outside truth: the hand-written EDGES. Each is drawn once, from its source's centre to its target's, blue
    (#2166ac) when positive and red (#b2182b) when negative, 0.4 + 3.6 |w| / max |w| wide, its title naming it."""
    assert len(drawn["edges"]) == len(WEIGHTS)
    seen = set()
    for e in drawn["edges"]:
        found = re.fullmatch(r"(\S+) → (\S+): weight (\S+)", e["title"])
        pair = found.group(1), found.group(2)
        w = WEIGHTS[pair]
        seen.add(pair)
        assert found.group(3) == js_fmt(w)
        assert ends(e["d"]) == (tuple(drawn["nodes"][pair[0]]), tuple(drawn["nodes"][pair[1]]))
        assert e["stroke"] == ("#2166ac" if w > 0 else "#b2182b"), pair
        assert e["width"] == pytest.approx(0.4 + 3.6 * abs(w) / 4.0, abs=1e-6)
    assert seen == set(WEIGHTS)


def test_a_nodes_card_lists_its_strongest_inputs_and_outputs_by_magnitude(drawn):
    """Outside truth: EDGES into f1 are f0 +3, in0 -1, e +0.25 (largest |w| first: -1 before +0.25) and out of f1 the
    logit x +4; the card names f1's own layer ("1") and numbers as the node record has them."""
    card = drawn["cards"]["feature"]
    assert "· feature · layer 1 · position " + MID in card["head"]
    numbers, inputs, outputs = card["tables"]
    assert inputs == [[IDS[F0], "3.00"], [TOKENS[IN0], "-1.00"], [IDS[E], "0.250"]]
    assert outputs == [["x", "4.00"]] and node_of(labelled(), IDS[L0])["label"] == "x"
    f1 = node_of(labelled(), IDS[F1])
    assert numbers == [["activation", js_fmt(f1["activation"])], ["influence", js_fmt(f1["influence_raw"])],
                       ["cumulative influence share (lower: more influential)", js_fmt(f1["influence"])]]  # fmt: skip


def test_a_users_token_reads_back_as_itself_in_the_card_and_the_hover_title(drawn):
    """The token '<i>a&"' is text wherever the viewer shows it: the card's name, the node's title; the input's card
    says it is on the inputs row; an input's hover names its own influence, then its cumulative share."""
    card = drawn["cards"]["input"]
    assert card["name"] == TOKENS[IN0] and "· input · layer inputs" in card["head"]
    n = node_of(labelled(), IDS[IN0])
    want = (f"{TOKENS[IN0]} [{IDS[IN0]}] influence {js_fmt(n['influence_raw'])}, cumulative influence share "
            f"{js_fmt(n['influence'])} (lower: more influential)")  # fmt: skip
    assert drawn["titles"][IDS[IN0]] == want


def test_each_logit_carries_its_token_as_a_json_string(drawn):
    """The logits' labels, in node order, are their tokens written as JSON strings ("x", "y")."""
    g = labelled()
    assert drawn["logit_labels"] == [json.dumps(n["label"]) for n in g.nodes if n["kind"] == "logit"]


class Text(HTMLParser):
    """The page as a browser's parser reads it: the title, the h1, the prompt's token spans, every text run outside
    scripts and the scripts' bodies."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.title = self.h1 = ""
        self.tokens, self.text, self.scripts = [], [], []
        self._in = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        if tag in ("meta", "input", "img", "br"):
            return
        if tag == "span" and "border:1px solid #ddd" in (dict(attrs).get("style") or ""):
            self.tokens.append("")
            tag = "token"
        self._in.append(tag)

    def handle_endtag(self, tag):
        names = ("span", "token") if tag == "span" else (tag,)
        while self._in and self._in.pop() not in names:
            pass

    def handle_data(self, data):
        where = self._in[-1] if self._in else ""
        if where == "script":
            self.scripts.append(data)
            return
        self.text.append(data)
        if where == "title":
            self.title += data
        elif where == "h1":
            self.h1 += data
        elif where == "token":
            self.tokens[-1] += data

    def joined(self) -> str:
        return "".join(self.text)


def test_the_lm_page_reads_back_the_prompt_the_model_and_its_record():
    """html.parser: the title and heading name the model as written, the prompt's tokens read back as the user's
    strings (count included), the axes' caption is the lm's, and json reads the embedded record back to to_dict()."""
    g = labelled()
    page = lm_page(g)
    doc = Text(page)
    assert doc.title == doc.h1 == f"Attribution graph: {MODEL}"
    assert doc.tokens == [TOKENS[IN0], TOKENS[IN1]]
    assert f"{MODEL} on 2 tokens:" in doc.joined()
    assert "columns: token positions" in doc.joined() and "receptive-field" not in doc.joined()
    (script,) = doc.scripts
    data = json.loads(re.search(r"const DATA = (.*);\nconst CT", script).group(1))
    assert data == json.loads(json.dumps(g.to_dict()))


def test_the_summary_reads_the_records_scores_counts_and_thresholds():
    """html.parser over the summary: the scores table puts each record score under its own column (whole 0.625 and
    0.875, pruned 0.5 and 0.75); the hand-built counts (1 error node, kept; 2 inputs; 7 nodes, 11 edges) and both
    thresholds read as the record has them."""
    page = lm_page(labelled())
    rows = Page(page).table("score", "whole graph")
    assert rows == [{"score": "replacement score", "whole graph": "0.625", "pruned graph": "0.5"},
                    {"score": "completeness score", "whole graph": "0.875", "pruned graph": "0.75"}]  # fmt: skip
    text = Text(page).joined()
    assert "1 error node (1 kept by the pruning), 2 inputs; pruned to 7 nodes and 11 edges" in text
    assert "(node threshold 0.8, edge threshold 0.98)" in text
    assert "Attributed logits: 'x' (p=0.700), 'y' (p=0.300)." in text


def test_the_cnn_page_names_its_title_and_each_stages_grid_rows_by_columns():
    """A CNN graph's page: its title (with < & ") reads back as text, each stage's grid reads rows×columns from
    settings.grids (a 12-row, 6-column grid is 12×6, not 6×12), and the axes' caption is the CNN's."""
    title = '<i>image</i> 0 & "7"'
    g = replace(labelled("cnn"), title=title, settings={"grids": [[12, 6], [4, 2]]}, dictionaries={"kind": "sae"})
    doc = Text(cnn_page(g))
    assert doc.title == doc.h1 == f"Attribution graph: {title}"
    text = doc.joined()
    assert f"{MODEL}, {title}. Dictionaries: sae" in text
    assert "(conv{i}.hook_out, which the SAE reads): 0 12×6, 1 4×2." in text
    assert "receptive-field centre, in pixels of the input image (px)" in text and "token positions" not in text


ALIVE = """<script>
window.addEventListener("load", () => {
  const pre = document.createElement("pre");
  pre.id = "viewer-check";
  pre.textContent = JSON.stringify({api: typeof window.mechscopeGraph,
    nodes: document.querySelectorAll("#agv-svg g.agv-node").length});
  document.body.appendChild(pre);
});
</script>"""


def test_a_token_that_opens_an_html_comment_and_a_script_leaves_the_viewer_working(tmp_path):
    """HTML spec (script data double-escaped state): inside a script, '<!--' then '<script' makes the next '</script>'
    end only that state, not the script. A prompt token '<!--<script>' (HTML source under study) must still give a
    page whose viewer draws every node (the probe sits in the head, so it runs whatever happens to the body)."""
    g = labelled()
    nodes = tuple(dict(n, label="<!--<script>") if n["id"] == IDS[IN0] else n for n in g.nodes)
    page = lm_page(replace(g, nodes=nodes)).replace("</head>", ALIVE + "</head>")
    out = run_in_chromium(page, tmp_path)
    assert out == {"api": "object", "nodes": len(g.nodes)}


def test_edge_paths_split_each_edge_into_direct_plus_heads_and_name_each_source():
    """The documented identity edge = direct + the heads' parts, read back from the page's own cells (a hand-made
    EdgePaths record: f0 -> f1 3.0 = 1.0 + 1.5 + 0.5); a head with no part is not listed; an input is named by its
    token and its own position (b at position 1, though its column is at 2.4)."""
    p = {"target": IDS[F1], "label": "", "max_abs_residual": 1e-6,
         "heads": [{"head": "0.1", "total": 2.0, "abs": 2.0}, {"head": "0.0", "total": 0.0, "abs": 0.0}],
         "rows": [{"source": IDS[F0], "edge": 3.0, "direct": 1.0, "via": {"0.1": 1.5, "1.0": 0.5}},
                  {"source": IDS[IN1], "edge": -0.75, "direct": 0.0, "via": {"0.1": -0.75}}]}  # fmt: skip
    page = Page(gs.sections_html({"nodes": list(labelled().nodes), "settings": {}, "paths": [p]}))
    assert [r["head"] for r in page.table("head", "total")] == ["0.1"]
    rows = page.table("input", "edge")
    for r in rows:
        parts = [float(x.split()[1]) for x in r["via heads"].split("; ")]
        assert float(r["edge"]) == pytest.approx(float(r["direct"]) + sum(parts))
    assert rows[1]["input"] == f"{TOKENS[IN1]!r} at position 1 ({IDS[IN1]})"


def test_a_qk_section_keeps_query_and_key_apart():
    """A hand-made QK record whose query side and key side name different writers: the heading says query 3 -> key
    1, and each of the six tables holds its own side's parts, in the documented order."""

    def side(name):
        return [{"label": name, "score": 0.5}]

    q = {"layer": 1, "head": 2, "query_pos": 3, "key_pos": 1, "pattern": 0.25, "score": 1.5, "max_abs_residual": 0.0,
         "query_writers": side("qw"), "key_writers": side("kw"), "query_sources": side("qs"),
         "key_sources": side("ks"), "writer_pairs": [{"query": "qw", "key": "kw", "score": 0.5}],
         "pairs": [{"query": "qs", "key": "ks", "score": 0.5}]}  # fmt: skip
    html = gs.sections_html({"nodes": [], "settings": {}, "qk": [q]})
    assert "QK attribution: head 1.2, query 3 → key 1" in Text(html).joined()
    firsts = [t[1][:2] for t in Page(html).tables[:6]]
    assert firsts == [["qw", "0.5"], ["kw", "0.5"], ["qw", "kw"], ["qs", "0.5"], ["ks", "0.5"], ["qs", "ks"]]


def test_an_error_share_of_one_half_gets_the_warning_and_the_timings_are_listed():
    """Boundary: an error whose mean norm is half the output's (0.5) already gets the warning that much reaches the
    graph through error nodes; each timing of the record is a "seconds: ..." row."""
    q = [{"layer": 0, "explained_variance": 0.75, "l0": 4.0, "error_share": 0.5, "dead": 0}]
    d = {"nodes": [], "settings": {}, "dictionaries": {"quality": q}, "seconds": {"attribution": 1.25}}
    text = Text(gs.sections_html(d)).joined()
    assert "the error's mean norm is 50.0% of the output's" in text and "Much of what that layer writes" in text
    assert "seconds: attribution1.25" in text


def test_a_circuit_figure_is_sized_by_its_columns_across_and_its_rows_down():
    """By hand from layout's documented rule: 4 layers of one node each span 3 x 1.6 + 2.4 = 7.2 units across and
    2.4 down, at 0.7 inch a unit plus margins: 5.64 x 2.68 inches (wider than tall, like the drawing)."""
    from mechscope.core.render.layout import circuit_figsize

    assert circuit_figsize([0, 1, 2, 3], int) == pytest.approx((7.2 * 0.7 + 0.6, 2.4 * 0.7 + 1.0))
