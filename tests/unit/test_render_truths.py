"""The report rendering both wings share, checked against truths outside it: Python's html.parser reading the HTML
(ids unique, links resolve, user text stays text, no external URL), json reading the data a page embeds, PIL
decoding the PNGs it inlines, and numbers worked out by hand from the layout's and the captions' documented rules."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from html.parser import HTMLParser
from types import SimpleNamespace

import matplotlib
import numpy as np
from PIL import Image

from mechscope.core import show
from mechscope.core.render import discovery as D
from mechscope.core.render import fragment as F
from mechscope.core.render import graph_sections as gs
from mechscope.core.render import graph_viewer as gv
from mechscope.core.render import html as RH
from mechscope.core.render import layout as CL
from mechscope.core.render import parallel as P
from mechscope.core.render.viewer import AttentionViewer, Table

EVIL = '</script><script>alert("x")</script><marquee>&amp;</marquee>'


class Doc(HTMLParser):
    """What a browser's parser sees: every start tag with its attributes, the text, the scripts' bodies, and the
    chain of open elements each tag was opened in."""

    VOID = {"meta", "img", "input", "br", "hr", "link"}

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict, tuple[str, ...]]] = []
        self.text: list[str] = []
        self.scripts: list[str] = []
        self.stack: list[str] = []
        self._in_script = False
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs), tuple(self.stack)))
        if tag == "script":
            self._in_script = True
            self.scripts.append("")
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False
        if tag in self.stack:
            while self.stack.pop() != tag:
                pass

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data
        else:
            self.text.append(data)

    def all(self, tag: str) -> list[dict]:
        return [a for t, a, _ in self.tags if t == tag]

    def ids(self) -> list[str]:
        return [a["id"] for _, a, _ in self.tags if "id" in a]

    def joined(self) -> str:
        return "".join(self.text)


def no_external_urls(doc: Doc) -> None:
    for _, attrs, _ in doc.tags:
        for k in ("src", "href"):
            v = attrs.get(k)
            assert v is None or not re.match(r"(https?:)?//", v), f"{k}={v!r} reaches the network"


# ---- html.py: PNGs, JSON in scripts, settings as text, the footer -------------------------------------------


def test_array_uri_decodes_to_the_drawn_array_upscaled_by_nearest():
    """PIL decodes the data URI to exactly round(255·clip(x)) with every pixel repeated scale×scale (the documented
    nearest upscale), for a grey [H, W] and an RGB [H, W, 3] array: the sizes the page states are the image's."""
    rng = np.random.default_rng(0)
    grey = rng.uniform(-0.2, 1.2, size=(5, 7))
    rgb = rng.uniform(0, 1, size=(4, 6, 3))
    for img, scale in ((grey, 3), (rgb, 2)):
        uri = RH.array_uri(img, scale=scale)
        assert uri.startswith("data:image/png;base64,")
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))
        assert got.shape[:2] == (img.shape[0] * scale, img.shape[1] * scale)
        want = np.rint(np.minimum(np.maximum(img, 0), 1) * 255).astype(np.uint8)  # by hand, not by the code
        for y in range(got.shape[0]):
            for x in range(got.shape[1]):
                np.testing.assert_array_equal(got[y, x], want[y // scale, x // scale])


def test_tojson_safe_is_json_that_no_string_can_close_the_script_with():
    """json.loads reads the filter's output back to the input, and html.parser sees one script element whose body
    is all of it, however many "</script>" the strings hold."""
    env = RH.environment("mechscope.lm")
    data = {"label": EVIL, "n": [1, 2.5, None], "q": 'it\'s "quoted"'}
    out = str(env.filters["tojson_safe"](data))
    assert json.loads(out) == data
    doc = Doc(f"<html><body><script>const D = {out};</script><p>after</p></body></html>")
    assert len(doc.all("script")) == 1 and doc.scripts[0] == f"const D = {out};"
    assert "after" in doc.joined()


def test_settings_read_as_a_person_writes_them():
    """The documented forms, written by hand: yes/no for booleans (not 1/0), thousands separators, 4 significant
    figures, comma lists, a dash for None."""
    assert RH.shown_value(True) == "yes" and RH.shown_value(False) == "no"
    assert RH.shown_value(1234567) == "1,234,567"
    assert RH.shown_value(1 / 255) == "0.003922"
    assert RH.shown_value((0.5, True, 3000)) == "0.5, yes, 3,000"
    assert RH.shown_value(None) == "—"
    # numpy scalars (a setting read from an array) read the same as Python's
    assert RH.shown_value(np.int64(3000)) == "3,000" and RH.shown_value(np.float32(1 / 255)) == "0.003922"
    assert RH.shown_value(np.bool_(True)) == "yes"


def test_the_footer_is_inside_the_body():
    """html.parser: the footer that says what made a page is an element of its <body>, before </body>."""
    page = RH.with_footer("<!DOCTYPE html><html><head><title>t</title></head><body><p>x</p></body></html>")
    doc = Doc(page)
    (footer,) = [stack for t, _, stack in doc.tags if t == "footer"]
    assert footer[-1] == "body"
    assert page.index("<footer") < page.index("</body>")
    assert page.rstrip().endswith("</html>")


# ---- layout.py: geometry by hand ------------------------------------------------------------------------------


def _bezier(a, b, bend, t):
    """The quadratic Bézier written out coordinate by coordinate (control point: the midpoint moved bend×|ab| to
    the left of a→b, i.e. along (−dy, dx))."""
    (ax, ay), (bx, by) = a, b
    cx, cy = (ax + bx) / 2 - bend * (by - ay), (ay + by) / 2 + bend * (bx - ax)
    return ((1 - t) ** 2 * ax + 2 * (1 - t) * t * cx + t**2 * bx, (1 - t) ** 2 * ay + 2 * (1 - t) * t * cy + t**2 * by)


def test_columns_are_centred_and_curves_bend_to_the_left():
    """By hand: a column of n nodes sits at y = (i − (n−1)/2)·dy (centred on 0), columns dx apart in layer order;
    a curve from (0,0) to (2,0) bent 0.25 passes (1, 0.25) at t = ½ (left of a→b is +y)."""
    pos = CL.columns_layout(["a", "b", "c", "d"], {"a": 5, "b": 5, "c": 5, "d": 2}.__getitem__, dx=1.6, dy=1.2)
    assert pos["d"] == (0.0, 0.0)
    assert [pos[n] for n in "abc"] == [(1.6, -1.2), (1.6, 0.0), (1.6, 1.2)]
    pts = CL.bezier((0, 0), (2, 0), 0.25, np.array([0.0, 0.5, 1.0]))
    np.testing.assert_allclose(pts, [[0, 0], [1, 0.25], [2, 0]], atol=1e-12)
    assert math.isclose(_bezier((0, 0), (2, 0), 0.25, 0.5)[1], 0.25)


def test_an_edge_keeps_radius_plus_margin_from_every_other_node():
    """The documented rule checked with a hand-written curve: a node 0.5 from the straight edge is inside radius
    0.42 + margin 0.15, so the chosen bend must be the first of 0, ±0.2, … that keeps 0.57 clear."""
    pos = {"a": (0.0, 0.0), "b": (3.2, 0.0), "o": (1.6, 0.5)}
    bend = CL.route(pos, [("a", "b")], 0.42, margin=0.15)[("a", "b")]
    t = np.linspace(0, 1, 2001)
    x, y = _bezier(pos["a"], pos["b"], bend, t)
    assert np.min(np.hypot(x - 1.6, y - 0.5)) >= 0.57 - 1e-3
    for k in CL.BENDS[: CL.BENDS.index(bend)]:  # every less bent one would have passed too close
        x, y = _bezier(pos["a"], pos["b"], k, t)
        assert np.min(np.hypot(x - 1.6, y - 0.5)) < 0.57


def test_tall_columns_are_set_apart_by_the_documented_rule():
    """Columns 1.6 apart, 0.4 row heights (1.2) more per node beyond 5: a column of 10 puts the next 2.4 away."""
    nodes = [("L0", i) for i in range(10)] + [("L1", 0)]
    lay = CL.circuit_layout(nodes, [], lambda n: n[0])
    assert math.isclose(lay.pos[("L1", 0)][0] - lay.pos[("L0", 0)][0], 0.4 * 1.2 * 5)
    assert CL.circuit_extent(nodes, lambda n: n[0]) == (2, 10)
    assert CL.circuit_extent([1, 1, 1, 2], int) == (2, 3)


def test_a_trimmed_edge_starts_and_ends_on_the_nodes_circles():
    """By hand: the drawn part of an edge begins and ends where it crosses the two circles, |p − centre| ≈ radius
    (within the 400-sample resolution), and no point of it lies inside either circle."""
    a, b, r = (0.0, 0.0), (3.0, 1.0), 0.45
    pts = CL.trimmed_curve(a, b, 0.2, r)
    da, db = np.hypot(*(pts - a).T), np.hypot(*(pts - b).T)
    assert abs(da[0] - r) < 0.03 and abs(db[-1] - r) < 0.03
    assert da.min() > r - 1e-9 and db.min() > r - 1e-9


def test_nan_points_of_two_equal_curves_are_the_same_curve():
    """Two faithfulness curves with a missing (NaN) point at the same place are one curve (drawn once)."""
    assert CL.same_curve([1.0, float("nan"), 0.3], [1.0, float("nan"), 0.3])
    assert not CL.same_curve([1.0, float("nan"), 0.3], [1.0, 0.5, 0.3])


# ---- fragment.py: a notebook fragment parsed as a browser would ------------------------------------------------


PAGE = """<!DOCTYPE html><html><head><style>body { color: red; } h2, .x { margin: 0; } #tokens td { color: blue; }
</style></head><body><nav><a href="#s2">s2</a></nav><h1>T</h1><p><a href="#s2">to section 2</a></p>
<h2 id="s1">One</h2><p id="tokens">one</p><label for="box">tick</label><input id="box" type="checkbox">
<h2 id="s2">Two</h2><p id="p2">two</p>
<h2 id="s3">Three</h2><p id="p3">three PADDING</p>
<script>document.getElementById("tokens").title = "ok";</script>
<script>document.getElementById("p2").title = document.getElementById("p3").title;</script>
</body></html>""".replace("PADDING", "x" * 6000)


def test_a_fragment_has_unique_ids_resolving_links_and_scoped_styles():
    """html.parser over two fragments of one page side by side: no id twice, every href="#…" and label for=
    names an id of the same fragment, every CSS selector starts at the fragment's own root."""
    frags = [F.page_to_fragment(PAGE), F.page_to_fragment(PAGE)]
    doc = Doc("".join(frags))
    ids = doc.ids()
    assert len(ids) == len(set(ids))
    for frag in frags:
        one = Doc(frag)
        root = one.tags[0][1]["id"]
        local = set(one.ids())
        assert one.all("a") and one.all("label")
        for a in one.all("a"):
            assert a["href"][1:] in local, a
        for lab in one.all("label"):
            assert lab["for"] in local, lab
        (css,) = re.findall(r"<style>(.*?)</style>", frag, re.S)
        for sel_group in re.findall(r"([^{}]+)\{", css):
            for sel in sel_group.split(","):
                assert sel.strip().startswith(f"#{root}"), sel
    no_external_urls(doc)


def test_only_the_first_section_is_open_and_scripts_of_left_out_sections_go():
    """html.parser: the first <h2> section is shown open and each later one is one <details>; a script that reads
    an element of a section left out for size is dropped, one that reads only shown elements is kept."""
    frag = F.page_to_fragment(PAGE)
    doc = Doc(frag)
    assert len(doc.all("details")) == 2
    assert [stack[-1] for t, _, stack in doc.tags if t == "h2"] == ["div"]  # the one open h2 is not folded
    assert len(doc.scripts) == 2
    # s3 (and p3) left out by size: only the script reading s1's element is kept
    small = F.page_to_fragment(PAGE, max_chars=5000)  # s3 alone is over 6,000 characters
    sdoc = Doc(small)
    present = set(sdoc.ids())
    assert not any(i.endswith("-p3") for i in present) and any(i.endswith("-p2") for i in present)
    assert len(sdoc.scripts) == 1 and "tokens" in sdoc.scripts[0]
    for js in sdoc.scripts:
        for want in re.findall(r'getElementById\("([^"]+)"\)', js):
            assert want in present


# ---- viewer.py: the attention viewer and the table --------------------------------------------------------------


def test_the_attention_viewer_embeds_each_querys_causal_row_and_escapes_tokens():
    """json reads the pattern the script holds: row i is pattern[i, 0..i] to 4 decimals (numpy, by hand), for a
    pattern that is not symmetric; html.parser reads each token back as text, a "<script>" token included."""
    rng = np.random.default_rng(1)
    p = np.tril(rng.uniform(0.01, 1, size=(5, 5)))
    p /= p.sum(1, keepdims=True)
    tokens = ["a", EVIL, "\n", "<b>", "z"]
    html = AttentionViewer(tokens, p, 1, 2)._repr_html_()
    doc = Doc(html)
    assert len(doc.all("script")) == 1 and not doc.all("marquee")
    rows = json.loads(re.search(r"const pat = (\[.*?\]);\n", doc.scripts[0], re.S).group(1))
    assert len(rows) == 5
    for i, r in enumerate(rows):
        np.testing.assert_allclose(r, np.round(p[i, : i + 1], 4), atol=0, rtol=0)
    spans = re.findall(r'<span class="tok"[^>]*>(.*?)</span>', html, re.S)
    import html as htmlmod

    assert [htmlmod.unescape(s) for s in spans] == ["a", EVIL, "↵", "<b>", "z"]


class _Cells(HTMLParser):
    def __init__(self, html):
        super().__init__()
        self.rows, self._cell = [], None
        self.tags = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.rows[-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def test_a_table_shows_every_row_once_with_its_text_as_text():
    """html.parser: a 45-row table with max_rows 40 shows 45 data rows (40, then 5 folded), each cell's text the
    value as written by hand (floats to 3 places, NaN as a dash), and a "<b>" value stays text."""
    rows = [{"name": f"<b>{i}</b>", "x": i / 8, "ok": i % 2 == 0} for i in range(44)] + [
        {"name": "nan", "x": float("nan"), "ok": True}]  # fmt: skip
    cells = _Cells(Table(rows)._repr_html_())
    data = [r for r in cells.rows if r and r != ["name", "x", "ok"]]
    assert len(data) == 45 and "b" not in cells.tags
    assert data[0] == ["<b>0</b>", "0.000", "yes"] and data[41] == ["<b>41</b>", f"{41 / 8:.3f}", "no"]
    assert data[44] == ["nan", "—", "yes"]


# ---- show.py: the fallback page ---------------------------------------------------------------------------------


def test_the_fields_page_keeps_user_text_as_text():
    """html.parser: a title and field values with markup come back as the same text; a NaN reads as a dash."""
    from dataclasses import dataclass

    @dataclass
    class R:
        label: str
        score: float

    page = show.fields_page(R(EVIL, float("nan")))
    doc = Doc(show.page(EVIL, show.table_html(["a"], [[EVIL], [float("nan")], [0.12345]])))
    assert not doc.all("script") and not doc.all("marquee")
    assert EVIL in doc.joined() and "—" in doc.joined() and "0.123" in doc.joined()
    pdoc = Doc(page)
    assert not pdoc.all("script") and EVIL in pdoc.joined()
    assert "—" in _Cells(show.table_html(["v"], [[float("nan")]])).rows[1]


# ---- graph_viewer.py / graph_sections.py -----------------------------------------------------------------------


def _graph_record():
    nodes = [
        {"id": "e0", "kind": "input", "label": EVIL, "pos": 0, "ctx": 0, "influence": 0.5},
        {"id": "0_1_0", "kind": "feature", "label": "f", "layer": 0, "pos": 0, "ctx": 0, "influence": 0.2},
        {"id": "err0", "kind": "error", "label": "err", "layer": 0, "pos": 0, "ctx": 0, "influence": 0.3},
        {"id": "err1", "kind": "error", "label": "err", "layer": 0, "pos": 1, "ctx": 1, "influence": 0.3},
        {"id": "logit", "kind": "logit", "label": EVIL, "pos": 1, "ctx": 1, "influence": 0.0, "probability": 0.25},
    ]
    counts = {k: 3 for k in ("active_features", "feature_nodes", "rows", "backward_passes", "error_nodes",
                             "input_nodes", "nodes_pruned", "edges_pruned")}  # fmt: skip
    return {"kind": "lm", "nodes": nodes, "edges": [[0, 1, 0.5], [1, 4, -0.25]], "layer_names": ["0"],
            "scores": {"replacement": 0.75, "completeness": 0.875}, "counts": counts,
            "settings": {"node_threshold": 0.8, "edge_threshold": 0.98}}  # fmt: skip


def test_the_graph_page_embeds_its_record_as_json_and_one_script():
    """html.parser: the page has exactly one script, whose DATA and CT are what json.loads reads back to the
    inputs, however many "</script>" the labels carry; ids unique; no URL off the page."""
    d = _graph_record()
    ct = {"qParams": {"pinnedIds": []}, "metadata": {"prompt": EVIL}}
    page = gv.graph_page(d, ct, EVIL, gv.summary_html(d))
    doc = Doc(page)
    assert len(doc.all("script")) == 1 and not doc.all("marquee")
    js = doc.scripts[0]
    assert json.loads(re.search(r"const DATA = (.*);\nconst CT", js).group(1)) == d
    assert json.loads(re.search(r"const CT = (.*);\nconst svg", js).group(1)) == ct
    assert len(doc.ids()) == len(set(doc.ids()))
    no_external_urls(doc)
    assert EVIL in doc.joined()  # the title and the logit's label, as text


def test_the_summary_counts_kept_error_nodes_and_numbers_read_as_written():
    """By hand: the record keeps two error nodes (of five); 0.75 and 0.875 read as "0.75" and "0.875"; a
    number to 2 significant figures reads so; a string cell is text, not markup."""
    text = Doc(gv.summary_html(_graph_record())).joined()
    assert "3 error nodes (2 kept by the pruning)" in text
    assert "(p=0.250)" in text and "0.875" in text
    assert gv.number_text(0.123456, 2) == "0.12" and gv.number_text(float("nan")) == "—"
    cells = _Cells(gv.table_html(["a", "b"], [["<i>x</i>", 1.0 / 3]]))
    assert cells.rows[1] == ["<i>x</i>", "0.3333"] and "i" not in cells.tags


def test_dictionary_quality_reads_the_width_of_its_own_layer():
    """By hand: layer 1 of widths [100, 400] with 50 dead features is "50 of 400 (12.5%)"; the largest error share
    (layer 1's 0.6, not layer 0's 0.2) is named, and a steps' ratio 3 / 1.5 reads "2.0× as large"."""
    q = [{"layer": 0, "explained_variance": 0.9, "l0": 3.0, "error_share": 0.2, "dead": 10},
         {"layer": 1, "explained_variance": 0.5, "l0": 4.0, "error_share": 0.6, "dead": 50}]  # fmt: skip
    text = Doc(gs._quality_html(q, [100, 400])).joined()
    assert "50 of 400 (12.5%)" in text and "10 of 100 (10.0%)" in text
    assert "The largest error share is layer 1's: the error's mean norm is 60.0% of the output's" in text
    assert gs._ratio(3.0, 1.5) == "2.0× as large" and gs._pct(0.125) == "12.5%"


# ---- discovery.py: captions' numbers by hand ------------------------------------------------------------------


def test_strongest_lists_only_scoring_edges_and_says_how_many_score_zero():
    """By hand: of scores [0, 3, -5, 0, 1] the strongest by |score| that score at all are edges 2, 1, 4, and 2 of
    the 5 edges score exactly 0."""
    s = np.array([0.0, 3.0, -5.0, 0.0, 1.0])
    scores = SimpleNamespace(scores=s, order=lambda: np.argsort(-np.abs(s), kind="stable"),
                             graph=SimpleNamespace(n_edges=5))  # fmt: skip
    ids, note = D.strongest(scores, k=4)
    assert ids == [2, 1, 4]
    assert note == "2 of the 5 edges score exactly 0 and are not listed."


def test_the_curve_caption_weighs_the_points_from_ten_percent_up():
    """By hand: fractions 1%…100% put 10%…100% on log(10)/log(100) = 50% of the plot's width and on
    0.9 / 0.99 = 91% of the linear width the areas are taken over."""
    text = D._weight(SimpleNamespace(fractions=[0.01, 0.03, 0.1, 0.3, 1.0]))
    assert text == (", so the points from 10% up, 50% of the plot's width, make 91% of the width the areas are "
                    "taken over")  # fmt: skip


def test_rounding_level_counts_scores_at_the_threshold_and_the_share_is_a_percentage():
    """By hand: with a largest |score| of 1, circuit scores 1e-6 (exactly the documented threshold), 5e-7 and 0.5
    give 2 at rounding level; a faithfulness of 0.4567 reads "45.7% of the way"."""
    result = SimpleNamespace(scores=SimpleNamespace(scores=[1.0, -0.5]),
                             circuit=SimpleNamespace(scores=[D.ROUNDING, -5e-7, 0.5]))  # fmt: skip
    assert D.rounding_level(result) == 2
    share = D._share({"faithfulness": 0.4567, "metric_empty": 0.1, "metric_full": 2.0})
    assert share == "45.7% of the way from the empty circuit (0.1) to the full model (2)"


def test_the_interventions_table_shows_the_first_three_logits_of_each_as_written():
    """html.parser over the Interventions table of a record with 10 attributed logits: 3 rows (the documented
    SHOWN_LOGITS), in order, each number to 4 significant figures as written by hand from the record."""
    from tests.unit.test_attribution_graph_page_text import lm_record

    cells = _Cells(gs.sections_html(lm_record()))
    rows = [r for r in cells.rows if r and r[0] == "ablate 0_126_42"]
    assert [r[1] for r in rows] == ["y", "n", "r"]
    assert rows[0] == ["ablate 0_126_42", "y", "-0.1993", "-0.2067", "0.3541", "0.2875", "-0.3539"]


# ---- parallel.py: the helper process draws with the caller's settings ---------------------------------------------


def _linewidth(i: int) -> tuple[int, float, int]:
    import os

    return i, matplotlib.rcParams["lines.linewidth"], os.getpid()


def test_the_helper_process_draws_with_the_callers_matplotlib_settings(monkeypatch):
    """The documented promise (every figure is the one this process would have drawn): under the caller's
    rc_context(lines.linewidth=7.25) every job, the helper's included, reads 7.25, not matplotlib's default 1.5."""
    import os
    import time

    monkeypatch.setattr(P, "_use_helper", lambda n: n >= 4)
    with matplotlib.rc_context({"lines.linewidth": 7.25}):
        results, _ = P.draw_all(_linewidth, [(i,) for i in range(12)], meanwhile=lambda: time.sleep(2))
    assert [r[0] for r in results] == list(range(12))
    assert {r[2] for r in results} - {os.getpid()}, "the helper drew nothing in 2 s"
    assert [r[1] for r in results] == [7.25] * 12


def test_a_fragment_renames_ids_but_not_data_attributes():
    """html.parser: only id attributes get the fragment's prefix; a data-id (which a script reads as dataset.id)
    keeps its value as written."""
    frag = F.page_to_fragment('<html><body><h2 id="s">S</h2><span data-id="a">x</span></body></html>')
    (span,) = Doc(frag).all("span")
    assert span["data-id"] == "a"
