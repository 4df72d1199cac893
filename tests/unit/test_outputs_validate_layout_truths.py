"""Outputs, input checks, figure layout, the figure helper and notebook fragments, checked against outside truths:
the file system read back, the validators' own docstrings, hand geometry, matplotlib's artists read back, and HTML
parsed with html.parser."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mechscope.core import validate as V  # noqa: E402
from mechscope.core.errors import MechscopeError, RunError  # noqa: E402
from mechscope.core.outputs import atomic_output, check_target, write_json  # noqa: E402
from mechscope.core.render import fragment as F  # noqa: E402
from mechscope.core.render import layout as CL  # noqa: E402
from mechscope.core.render import parallel as P  # noqa: E402
from tests.unit.test_outputs import leftovers  # noqa: E402
from tests.unit.test_render_truths import Doc  # noqa: E402

# ---- outputs.py: the file system read back ---------------------------------------------------------------------


def test_force_over_a_dangling_link_puts_the_commands_folder_in_its_place(tmp_path):
    """os.readlink/os.path.isdir read back: a broken link named like a folder the command writes is moved aside and
    the folder takes its name (rename(2) cannot put a folder over a link); the user's other file is untouched."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_bytes(b"user\x00bytes")
    os.symlink(tmp_path / "nowhere", out / "grids")
    with atomic_output(out, force=True) as tmp:
        (tmp / "grids").mkdir()
        (tmp / "grids" / "a.png").write_bytes(b"png")
    assert not os.path.islink(out / "grids") and (out / "grids" / "a.png").read_bytes() == b"png"
    assert (out / "mine.txt").read_bytes() == b"user\x00bytes" and leftovers(tmp_path) == []


def test_a_target_under_a_broken_link_is_refused_naming_the_link(tmp_path):
    """The documented refusal: a dangling link on the way to the target is one RunError naming it, and nothing is
    made (the link's own target still absent)."""
    os.symlink(tmp_path / "gone", tmp_path / "link")
    with pytest.raises(RunError, match=r"link is a broken link"):
        check_target(tmp_path / "link" / "out")
    assert not (tmp_path / "gone").exists()


def test_the_warning_names_five_fields_and_counts_the_rest(tmp_path, caplog):
    """By hand: six NaN fields a..f are named five at a time, then "and 1 more"; exactly five are all named with no
    "more"."""
    six = {k: float("nan") for k in "abcdef"}
    with caplog.at_level(logging.WARNING, logger="mechscope.core.outputs"):
        write_json(tmp_path / "six.json", six)
        write_json(tmp_path / "five.json", dict(list(six.items())[:5]))
    six_line, five_line = [r.getMessage() for r in caplog.records]
    assert six_line.endswith("a (NaN), b (NaN), c (NaN), d (NaN), e (NaN) and 1 more")
    assert five_line.endswith("a (NaN), b (NaN), c (NaN), d (NaN), e (NaN)")


def test_compact_json_has_no_whitespace_and_every_file_ends_in_one_newline(tmp_path):
    """POSIX: a text file's last line ends in a newline; RFC 8259: whitespace between tokens is optional, so the
    compact form is the bytes below (é written as UTF-8, as the standard allows)."""
    write_json(tmp_path / "c.json", {"a": 1, "b": [1.5, "é"]}, compact=True)
    assert (tmp_path / "c.json").read_bytes() == '{"a":1,"b":[1.5,"é"]}\n'.encode()
    write_json(tmp_path / "i.json", {"a": [1, 2]})
    text = (tmp_path / "i.json").read_text(encoding="utf-8")
    assert text.endswith("]\n}\n") and text.count("\n") == 6 and json.loads(text) == {"a": [1, 2]}


@dataclasses.dataclass
class _Result:
    score: float
    cache: list = dataclasses.field(default_factory=list, metadata={"json": False})


def test_a_field_marked_not_for_json_is_left_out_of_the_file(tmp_path):
    """The file read back with json: a dataclass field whose metadata says json=False is not written."""
    write_json(tmp_path / "r.json", {"r": _Result(0.25, [1, 2])})
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8")) == {"r": {"score": 0.25}}


# ---- validate.py: each limit at and just past it, as the docstrings state it ----------------------------------


def test_seed_threads_and_count_take_their_lower_limits_and_refuse_one_below():
    """Docstrings: a seed in [0, 2**63 − 1]; threads from 1 to 4 per core (os.cpu_count); a count in [low, high]."""
    V.check_seed(0)
    V.check_threads(1)
    V.check_count(1, "--steps")
    V.check_count(5, "--k", low=5, high=5)
    cap = 4 * os.cpu_count()
    assert V.max_threads() == cap
    V.check_threads(cap)
    for call, msg in [(lambda: V.check_seed(-1), "--seed must be an integer from 0"),
                      (lambda: V.check_threads(0), "--threads must be an integer from 1"),
                      (lambda: V.check_threads(cap + 1), f"from 1 to {cap} "),
                      (lambda: V.check_count(0, "--steps"), "--steps must be at least 1, got 0"),
                      (lambda: V.check_count(4, "--k", low=5), "--k must be at least 5, got 4"),
                      (lambda: V.check_count(True, "--steps"), "--steps must be an integer, got True"),
                      (lambda: V.check_lr(0.0, "--peak-lr"), r"--peak-lr must be in \(0, 10\]")]:  # fmt: skip
        with pytest.raises(MechscopeError, match=msg) as e:
            call()
        assert "\n" not in str(e.value)


def test_one_sided_integer_ranges_say_which_side():
    """Docstring of check_int: within [low, high]; the message says the open side: "from 2 upwards" / "up to 9"."""
    assert V.check_int(2, "--n", low=2) == 2 and V.check_int(9, "--n", high=9) == 9
    with pytest.raises(MechscopeError, match=r"--n must be an integer from 2 upwards, got 1$"):
        V.check_int(1, "--n", low=2)
    with pytest.raises(MechscopeError, match=r"--n must be an integer up to 9, got 10$"):
        V.check_int(10, "--n", high=9)
    with pytest.raises(MechscopeError, match=r"--n must be an integer from 1,000 to 2,000, got 2,001$"):
        V.check_int(2001, "--n", low=1000, high=2000)


@dataclasses.dataclass
class _Settings:
    steps: int = 3
    lr: float = 0.5
    limit: int | None = None
    cache: int = dataclasses.field(default=0, init=False)


def test_check_types_refuses_a_boolean_for_a_float_and_lets_an_optional_be_none():
    """Docstring: an int field holds an int (not a bool), a float field a number (not a bool); None where the type
    allows it; the message names the field's flag."""
    V.check_types(_Settings())
    V.check_types(_Settings(lr=2))
    with pytest.raises(MechscopeError, match=r"^--lr must be a number, got true$"):
        V.check_types(_Settings(lr=True), {"lr": "--lr"})
    with pytest.raises(MechscopeError, match=r"^steps must be an integer, got 2.5$"):
        V.check_types(_Settings(steps=2.5))


@dataclasses.dataclass
class _OldStyle:
    limit: Optional[int] = None  # noqa: UP045 (the older spelling)


def test_check_types_lets_an_optional_written_the_old_way_be_none():
    """Docstring: None is allowed where the type allows it; Optional[int] allows it as int | None does (it stripped
    'Optional[' and then refused None); a float there is still refused."""
    V.check_types(_OldStyle())
    with pytest.raises(MechscopeError, match="limit must be an integer"):
        V.check_types(_OldStyle(limit=2.5))


def test_unknown_settings_are_named_and_a_field_not_given_to_init_is_unknown():
    """Docstring: the known settings are the dataclass's init fields; `cache` (init=False) cannot be given."""
    V.known_settings(_Settings, {"steps": 1, "limit": 2}, "toy")
    with pytest.raises(MechscopeError, match=r"^unknown toy setting 'cache'; the settings are steps, lr, limit$"):
        V.known_settings(_Settings, {"cache": 1}, "toy")


def test_field_null_takes_the_default_and_one_sided_ranges_read_as_written():
    """Docstring of field: ``default`` when absent (a JSON null, not nullable, reads as absent); the expected text
    for lo only is "≥ lo", for hi only "≤ hi", thousands with commas."""
    assert V.field({"n": None}, "n", "int", "c.json", default=7) == 7
    assert V.field({"n": None}, "n", "int", "c.json", default=7, nullable=True) is None
    with pytest.raises(MechscopeError, match=r"^c\.json: field 'n' is 0; expected an integer ≥ 1$"):
        V.field({"n": 0}, "n", "int", "c.json", lo=1)
    with pytest.raises(MechscopeError, match=r"^c\.json: field 'p' is 1.5; expected a finite number ≤ 1$"):
        V.field({"p": 1.5}, "p", "number", "c.json", hi=1)
    with pytest.raises(MechscopeError, match=r"expected an integer from 1 to 4,096$"):
        V.field({"n": 5000}, "n", "int", "c.json", lo=1, hi=4096)


def test_a_json_object_file_reads_past_a_bom_and_names_what_else_it_holds(tmp_path):
    """RFC 8259 §8.1 lets a reader ignore a byte-order mark; JSON's own type names: array as Python's "list"
    (the message's word), true as a boolean; strict JSON: a key given twice is refused."""
    p = tmp_path / "c.json"
    p.write_bytes(b'\xef\xbb\xbf{"a": 1}')
    assert V.read_json_object(p) == {"a": 1}
    for text, kind in [("[1, 2]", "list"), ("true", "boolean"), ('"x"', "string"), ("null", "null")]:
        p.write_text(text)
        with pytest.raises(MechscopeError, match=rf"holds a JSON {kind}; expected an object"):
            V.read_json_object(p)
    with pytest.raises(ValueError, match="'a' appears twice"):
        V.strict_loads('{"a": 1, "a": 2}')


def test_text_lists_as_their_docstrings_say(tmp_path):
    """Docstrings: int_list takes commas or spaces alone; name_list names the empty item by its 1-based place; a
    string given to as_items is one item; a text file holding a NUL byte is refused; a long path is shortened to
    60 + "..." + 10 characters."""
    assert V.int_list("1 2 3", "--ids") == [1, 2, 3] and V.int_list("4,5", "--ids") == [4, 5]
    with pytest.raises(MechscopeError, match=r"^--acts: item 2 of 3 is empty"):
        V.name_list("a,,b", "--acts")
    assert V.as_items("saliency", "methods") == ("saliency",) and V.as_items([1, 2], "c") == (1, 2)
    (tmp_path / "t.txt").write_bytes(b"ab\x00c")
    with pytest.raises(MechscopeError, match="holds NUL bytes"):
        V.read_text_file(tmp_path / "t.txt")
    long = str(tmp_path / ("e" * 300))  # one component over NAME_MAX (255 bytes)
    with pytest.raises(MechscopeError) as e:
        V.usable_path(long, "--out")
    assert f"'{long[:60]}...{long[-10:]}'" in str(e.value) and "file name too long" in str(e.value)


# ---- parallel.py ------------------------------------------------------------------------------------------------


def _square(i: int) -> int:
    return i * i


def test_figure_process_zero_draws_everything_here_in_order(monkeypatch):
    """Module docstring: with MECHSCOPE_FIGURE_PROCESS=0 this process draws everything itself (no helper started,
    even with two cores), and the results are [fn(*job) for job in jobs] in order, with meanwhile's value."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(P._Helper, "start", classmethod(lambda cls, fn, jobs: pytest.fail("a helper started")))
    monkeypatch.setenv("MECHSCOPE_FIGURE_PROCESS", "0")
    assert P.draw_all(_square, [(i,) for i in range(9)], meanwhile=lambda: "m") == ([i * i for i in range(9)], "m")


def _who(i: int, parent: int, marker: str) -> tuple[int, int]:
    if os.getpid() != parent:
        Path(marker).touch()
    return i, os.getpid()


def test_the_helper_takes_the_first_figure(monkeypatch, tmp_path):
    """Module docstring: the helper takes figures one at a time from the front of the list, so once it has drawn
    anything (a file it touches, waited for by meanwhile) job 0 is the helper's, and every result is in order."""
    marker = tmp_path / "helper-drew"

    def wait_for_helper():
        for _ in range(1200):  # an event, not a timing: give up after a minute
            if marker.exists():
                return
            time.sleep(0.05)
        pytest.fail("the helper drew nothing")

    monkeypatch.setattr(P, "_use_helper", lambda n: True)
    jobs = [(i, os.getpid(), str(marker)) for i in range(6)]
    results, _ = P.draw_all(_who, jobs, meanwhile=wait_for_helper)
    assert [i for i, _ in results] == list(range(6)) and results[0][1] != os.getpid()


def _fails_here(i: int, parent: int) -> int:
    if os.getpid() == parent and i == 7:
        raise ValueError(f"job {i} cannot be drawn")
    return i


def test_an_error_drawing_here_surfaces_and_stops_the_helper(monkeypatch):
    """The documented result is the list comprehension's, so the error of the job this process draws first (the
    last) surfaces as itself; the helper started for the call is a process of that call and must be gone (polled
    at once, no waiting) when draw_all has returned or raised."""
    made = []
    start = P._Helper.start.__func__
    monkeypatch.setattr(P, "_use_helper", lambda n: True)
    monkeypatch.setattr(P._Helper, "start", classmethod(lambda cls, fn, jobs: made.append(start(cls, fn, jobs))
                                                        or made[-1]))  # fmt: skip
    try:
        with pytest.raises(ValueError, match="^job 7 cannot be drawn$"):
            P.draw_all(_fails_here, [(i, os.getpid()) for i in range(8)])
        assert made and made[0].proc.poll() is not None
    finally:
        for h in made:
            if h.proc.poll() is None:
                h.close()


# ---- layout.py: geometry by hand and the artists read back --------------------------------------------------------


def _clearance(a, b, bend, others):
    """Distance from a hand-written quadratic Bézier (control: midpoint + bend·(−dy, dx)) to the nearest other."""
    t = np.linspace(0, 1, 200)
    cx, cy = (a[0] + b[0]) / 2 - bend * (b[1] - a[1]), (a[1] + b[1]) / 2 + bend * (b[0] - a[0])
    x = (1 - t) ** 2 * a[0] + 2 * (1 - t) * t * cx + t**2 * b[0]
    y = (1 - t) ** 2 * a[1] + 2 * (1 - t) * t * cy + t**2 * b[1]
    return min(float(np.min(np.hypot(x - ox, y - oy))) for ox, oy in others)


def test_an_edge_no_bend_can_clear_takes_the_clearest_bend():
    """Documented fallback ("else the clearest"), by a plain loop: nodes crowd a short edge on both sides so no bend
    keeps 0.57 away; the chosen bend is the argmax of the hand-computed clearance."""
    pos = {"a": (0.0, 0.0), "b": (1.0, 0.0), "u": (0.5, 0.25), "v": (0.5, -0.3), "w": (0.5, 0.9), "z": (0.5, -1.0)}
    others = [pos[n] for n in "uvwz"]
    by_hand = {k: _clearance(pos["a"], pos["b"], k, others) for k in CL.BENDS}
    assert max(by_hand.values()) < 0.57  # nothing clears
    assert CL.route(pos, [("a", "b")], 0.42)[("a", "b")] == max(by_hand, key=by_hand.get)


def _crossings(lay, edges):
    """Pairs of straight edges between the two columns whose ends swap order (a plain double loop)."""
    ys = [(lay.pos[a][1], lay.pos[b][1]) for a, b in edges]
    return sum((p[0] - q[0]) * (p[1] - q[1]) < 0 for i, p in enumerate(ys) for q in ys[i + 1 :])


def test_barycentric_ordering_untangles_a_crossed_pair_of_columns():
    """Hand-built: edges a0→b2, a1→b1, a2→b0 cross pairwise (3 crossings) in the given order; ordering the second
    column by its neighbours' heights removes every crossing."""
    nodes = ["a0", "a1", "a2", "b0", "b1", "b2"]
    edges = [("a0", "b2"), ("a1", "b1"), ("a2", "b0")]
    assert _crossings(CL.Layout(CL.columns_layout(nodes, lambda n: n[0]), {}, 0.42, []), edges) == 3
    assert _crossings(CL.circuit_layout(nodes, edges, lambda n: n[0]), edges) == 0


def test_a_drawn_circuit_reads_back_as_its_edges_nodes_and_column_labels():
    """matplotlib's artists read back: each arrow's width is 0.6 + 5·width (documented: grows with width) and its
    colour the edge's; each disc sits at its node with node_colour's colour; ticks name the columns in layer order;
    an edge's label is drawn."""
    from matplotlib.colors import to_hex
    from matplotlib.patches import Circle, FancyArrowPatch

    nodes = [(0, "x"), (2, "y"), (2, "z")]
    edges = [{"a": (0, "x"), "b": (2, "y"), "width": 0.2, "colour": "#ff0000", "label": "e1"},
             {"a": (0, "x"), "b": (2, "z"), "width": 0.9, "colour": "#0000ff"}]  # fmt: skip
    fig, ax = plt.subplots()
    CL.draw_circuit(ax, nodes, edges, lambda n: n[0], label_of=lambda n: n[1],
                    node_colour={(0, "x"): "#00ff00", (2, "y"): "#112233", (2, "z"): "#445566"}.get,
                    column_labels={0: "embed", 2: "L2"})  # fmt: skip
    arrows = [p for p in ax.patches if isinstance(p, FancyArrowPatch)]
    assert [a.get_linewidth() for a in arrows] == pytest.approx([1.6, 5.1])
    assert [to_hex(a.get_edgecolor()) for a in arrows] == ["#ff0000", "#0000ff"]
    discs = {n[1]: (c.center, to_hex(c.get_facecolor())) for n, c in zip(nodes, ax.patches[2:], strict=True)}
    assert [isinstance(c, Circle) for c in ax.patches[2:]] == [True] * 3
    assert discs["x"] == ((0.0, 0.0), "#00ff00") and discs["y"][1] == "#112233" and discs["z"][1] == "#445566"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["embed", "L2"]
    assert "e1" in [t.get_text() for t in ax.texts]
    plt.close(fig)


def test_the_faithfulness_figure_plots_percentages_and_the_random_band():
    """Artists read back: x is the share of edges kept ×100 (the axis says %), the |score| curve is drawn only when
    it differs, with its own values, and the random band spans mean ± sd (numpy by hand)."""
    fr, faith, absolute = [0.01, 0.1, 1.0], [0.2, 0.7, 1.0], [0.3, 0.5, 1.0]
    mean, sd = np.array([0.05, 0.1, 0.9]), np.array([0.01, 0.02, 0.03])
    fig, ax = plt.subplots()
    CL.draw_faithfulness(ax, fr, faith, mean, sd, absolute)
    method, by_abs, rand = ax.lines[:3]
    assert list(method.get_xdata()) == pytest.approx([1, 10, 100]) and list(method.get_ydata()) == faith
    assert list(by_abs.get_ydata()) == absolute and list(rand.get_ydata()) == pytest.approx(mean)
    ys = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx((mean - sd).min()) and ys.max() == pytest.approx((mean + sd).max())
    fig2, ax2 = plt.subplots()
    CL.draw_faithfulness(ax2, fr, faith, absolute=list(faith))
    assert len([ln for ln in ax2.lines if len(ln.get_xdata()) == 3]) == 1  # one curve, plus the two guides
    plt.close(fig)
    plt.close(fig2)


# ---- fragment.py: a notebook fragment parsed as a browser would ---------------------------------------------------

PAGE = """<html><head><style>body { color: red; } #t1 td { color: blue; }</style></head><body>
<nav><a href="#s1">nav link</a></nav><h1>T</h1>
<h2 id="s1">One</h2><p id="t1" aria-labelledby="s1">one</p><a href="#gone">away</a>
<h2 id="s2">Two</h2><p id="p2">two AAAA</p>
<h2 class="x"></h2><p id="p3">three BBBB</p>
<script>document.getElementById('t1').title = "x";</script>
</body></html>""".replace("AAAA", "a" * 3000).replace("BBBB", "b" * 3000)


def test_a_fragments_links_labels_styles_and_scripts_point_at_its_own_ids():
    """html.parser: aria-labelledby and a single-quoted getElementById use the renamed id; a link to an id the page
    lacks gets the fragment's prefix (never another fragment's element); the page's nav is gone; "body" becomes the
    fragment's root itself."""
    frag = F.page_to_fragment(PAGE)
    doc = Doc(frag)
    root = doc.tags[0][1]["id"]
    p = next(a for t, a, _ in doc.tags if t == "p" and a.get("id", "").endswith("-t1"))
    assert p["aria-labelledby"] == f"{root}-s1"
    assert [a["href"] for a in doc.all("a")] == [f"#{root}-gone"] and "nav link" not in doc.joined()
    assert f'getElementById("{root}-t1")' in doc.scripts[0]
    (css,) = re.findall(r"<style>(.*?)</style>", frag, re.S)
    assert re.search(rf"(^|\}})\s*#{root} \{{ color: red; \}}", css) and f"#{root} #{root}-t1 td" in css


def test_sections_kept_open_left_out_and_named_as_documented():
    """html.parser: a keep_open title stays an open <h2>; the size budget counts every kept section (two of ~3,000
    characters do not both fit in 6,000 with the rest), the section left out is named, the untitled one by its
    1-based number, and the caller's omitted parts are named too."""
    doc = Doc(F.page_to_fragment(PAGE, keep_open=("Two",)))
    assert len(doc.all("details")) == 1 and len(doc.all("h2")) == 2
    small = F.page_to_fragment(PAGE, max_chars=6500, omitted=["attention maps"])
    sdoc = Doc(small)
    ids = sdoc.ids()
    assert any(i.endswith("-p2") for i in ids) and not any(i.endswith("-p3") for i in ids)
    (note,) = [a for a in sdoc.all("p") if a.get("class") == "ms-omitted"]
    assert "Not shown here, to keep the notebook light: attention maps, section 3." in sdoc.joined()
