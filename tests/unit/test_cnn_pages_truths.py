"""The microscope page (``cnn explain``: report/microscope.py, microscope.html.j2, cnn_figures.py) checked against the
hand-made result it draws: the page is parsed with html.parser, each table cell is compared with the result's own
field formatted by hand (×100 where a % or points are shown) under its own header, and each figure's artists are read
back and compared with the values it should plot.

The result is the one of tests/unit/test_sentences_explain.py, completed with weights, top images, patching maps and
distinct numbers wherever two fields could be swapped unnoticed (zero- vs mean-ablation, sufficiency vs necessity...).
"""

from __future__ import annotations

from dataclasses import replace
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from mechscope.cnn.methods.ablation_study import StageAblation
from mechscope.cnn.methods.circuit_study import GrowthPoint
from mechscope.cnn.methods.group_attribution import GroupFlow
from mechscope.cnn.methods.overview import Connection, Weights
from mechscope.cnn.methods.patching import StagePatching, TopUnit
from mechscope.cnn.methods.unit_examples import StageExamples
from mechscope.cnn.report import blocks as B
from mechscope.cnn.report import cnn_figures as F
from mechscope.cnn.report import microscope as M
from mechscope.core.render.html import render_string
from tests.unit import test_sentences_blocks as blocks_fixture
from tests.unit import test_sentences_explain as explain_fixture

NAMES = explain_fixture.NAMES
K = len(NAMES)
SIZES = {"conv1": 4, "conv2": 5}


def _t(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _ablation(name: str, c: int, seed: int) -> StageAblation:
    zero, mean = _t(c, K, seed=seed) * 0.05, _t(c, K, seed=seed + 1) * 0.03
    return StageAblation(name, f"{name}.hook_out", f"{name}-method", zero, mean, zero.mean(1) * 0.9, mean.mean(1) * 1.1)


def make_result():
    r = explain_fixture.make_result()
    orders = {"conv1": (2, 0, 3, 1), "conv2": (4, 1, 3, 0, 2)}  # not the channels' own order: a figure must reorder
    sel = tuple(replace(s, index=torch.linspace(0.1, 0.9, SIZES[s.stage]) + (0.01 if s.stage == "conv2" else 0.0),
                        maps=_t(K, SIZES[s.stage], 3, 3, seed=11 + SIZES[s.stage]).abs(), order=orders[s.stage])
                for s in r.selectivity)  # fmt: skip
    kernels = _t(5, 4, 3, 3, seed=3)
    conn = Connection("conv1", "conv2", kernels.flatten(2).norm(dim=2), kernels.flatten(2).sum(2), kernels)
    templates = _t(K, 5, 3, 3, seed=4)
    weights = Weights(_t(4, 1, 3, 3, seed=5), (conn,), templates, templates.flatten(2).sum(2))
    examples = tuple(
        StageExamples(st, f"{st}.hook_post", torch.zeros(c, 2, dtype=torch.long),
                      (torch.arange(c * 2).view(c, 2) + c) % K, torch.zeros(c, 2, 2, dtype=torch.long),
                      torch.tensor([[[0, 2, 1, 3], [1, 4, 0, 2]]] * c), _t(c, 2, 1, 6, 6, seed=6 + c),
                      _t(c, 2, 6, 6, seed=8))
        for st, c in SIZES.items()
    )  # fmt: skip
    ablation = replace(r.ablation, stages=(_ablation("conv1", 4, 20), _ablation("conv2", 5, 30)))
    units = (TopUnit(3, 1, 2, 0.41), TopUnit(0, 2, 0, -0.137))
    patching = replace(
        r.patching, clean_image=_t(1, 6, 6, seed=9), corrupted_image=_t(1, 6, 6, seed=10),
        stages=(StagePatching("conv1", (TopUnit(2, 0, 1, 0.052),), _t(4, 6, 6, seed=13),
                              torch.tensor([0.07, 0.08, -0.09, 0.011]), torch.full((4,), 0.01)),
                StagePatching("conv2", units, _t(5, 3, 3, seed=12), torch.tensor([0.1, -0.6, 0.2, 0.3, 0.05]),
                              torch.tensor([0.01, 0.02, 0.03, 0.04, 0.05])),),
    )  # fmt: skip
    circuits = tuple(
        replace(c, full_accuracy=0.90 + 0.01 * i, sufficiency=0.80 + 0.01 * i, necessity=0.50 + 0.01 * i,
                necessity_resample=0.30 + 0.01 * i, other_classes_called_full=0.011 + 0.001 * i,
                other_classes_called_circuit=0.021 + 0.001 * i, held_out_full_accuracy=0.70 + 0.01 * i,
                held_out_sufficiency=0.60 + 0.01 * i, held_out_other_classes_called_full=0.031 + 0.001 * i,
                held_out_other_classes_called_circuit=0.041 + 0.001 * i, prefix_size=3 + i, greedy_size=2 + i,
                pruned_size=1 + i, meets_criterion=i != 1, attribution=_t(5, seed=40 + i),
                per_class_accuracy_circuit_only=torch.tensor([0.11, 0.12, 0.13]) + i / 10,
                per_class_accuracy_circuit_ablated=torch.tensor([0.21, 0.22, 0.23]) + i / 10,
                per_class_accuracy_circuit_resampled=torch.tensor([0.31, 0.32, 0.33]) + i / 10,
                growth=(GrowthPoint(1, 0.5 + 0.1 * i, 0.1), GrowthPoint(2, 0.6 + 0.1 * i, 0.05)))
        for i, c in enumerate(r.circuits.circuits)
    )  # fmt: skip
    model = {
        "architecture": [
            {"layer": "conv1", "shape": [4, 6, 6], "parameters": 40, "hook": "conv1.hook_out", "modules": ["Conv2d"]},
            {"layer": "conv2", "shape": [5, 3, 3], "parameters": 185, "hook": "conv2.hook_out", "modules": ["Conv2d"]},
            {"layer": "fc", "shape": [3], "parameters": 1234, "hook": "fc", "modules": ["Linear"]},
        ],
        "stages": [{"name": "conv1", "receptive_field_out": {"size": [3, 3], "jump": [1, 1]}},
                   {"name": "conv2", "receptive_field_out": {"size": [7, 7], "jump": [2, 2]}}],
    }  # fmt: skip
    return replace(
        r, model=model, data={"name": "toy", "kind": "hand-made", "shape": [1, 6, 6]},
        settings={"description": "x", "test_limit": None},
        weights=weights, examples=examples, ablation=ablation, selectivity=sel, patching=patching,
        circuits=replace(r.circuits, circuits=circuits),
    )  # fmt: skip


class Page(HTMLParser):
    """Tables as rows of cell texts; <details> summaries and paragraphs by the id of their <details>; img src by alt."""

    def __init__(self, html: str):
        super().__init__()
        self.tables, self.imgs, self.details, self.summaries = [], {}, {}, {}
        self._cell = self._row = None
        self._detail = None
        self._summary = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self._row = []
            self.tables[-1].append(self._row)
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.imgs[a.get("alt")] = a.get("src")
        elif tag == "details":
            self._detail = a.get("id")
            self.details[self._detail] = []
        elif tag == "summary":
            self._summary = []

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "summary":
            self.summaries[self._detail] = "".join(self._summary).strip()
            self._summary = None
        elif tag == "details":
            self._detail = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._summary is not None:
            self._summary.append(data)
        elif self._detail is not None:
            self.details[self._detail].append(data)

    def table(self, first_header: str, second: str | None = None) -> list[dict]:
        """The rows of the (only) table whose first header cells are ``first_header`` (and ``second``), each as
        {header: cell}."""
        found = [t for t in self.tables if t and t[0] and t[0][0] == first_header
                 and (second is None or t[0][1] == second)]  # fmt: skip
        assert len(found) == 1, (first_header, [t[0] for t in self.tables])
        head, *rows = found[0]
        assert all(len(row) == len(head) for row in rows), found[0]
        return [dict(zip(head, row, strict=True)) for row in rows]


@pytest.fixture(scope="module")
def page():
    """The rendered page, with every figure drawn for real and captured (its src is ``fig:N``)."""
    mp = pytest.MonkeyPatch()
    figures: list = []

    def capture(fig, dpi):
        figures.append(fig)
        return f"fig:{len(figures) - 1}"

    mp.setattr(F, "figure_data_uri", capture)
    mp.setattr(M, "draw_all", lambda fn, jobs, meanwhile: ([fn(*job) for job in jobs], meanwhile()))
    r = make_result()
    try:
        html = render_string("mechscope.cnn", "microscope.html.j2", **M.report_context(r, {}, (0.0, 1.0)))
    finally:
        mp.undo()
    p = Page(html)
    p.r, p.figures, p.html = r, figures, html
    return p


def fig_of(page, alt: str):
    src = page.imgs[alt]
    assert src.startswith("fig:"), (alt, src)
    return page.figures[int(src[4:])]


def pct(v, fmt="%.1f") -> str:
    return fmt % (100 * float(v))


def test_the_whole_stage_table_puts_each_kind_under_its_own_headers(page):
    """Truth: each stage's WholeStage of kind zero / mean: 100×test_accuracy and the class it reads as with
    100×predicted_share[reads_as]."""
    r = page.r
    rows = page.table("every channel of the stage ablated")
    assert [row["every channel of the stage ablated"] for row in rows] == ["conv1", "conv2"]
    for row in rows:
        for kind in ("zero", "mean"):
            w = r.ablation.whole_stage(row["every channel of the stage ablated"], kind)
            assert row[f"{kind}: test accuracy %"] == pct(w.test_accuracy)
            assert row[f"{kind}: images called"] == f"{NAMES[w.reads_as]} ({pct(w.predicted_share[w.reads_as])}%)"


def test_the_overview_tables_state_each_layer_and_class(page):
    """Truth: the architecture rows of the model dict, the receptive fields, and 100×per_class_accuracy per class."""
    arch = page.table("layer")
    assert arch == [{"layer": a["layer"], "output shape": "×".join(map(str, a["shape"])),
                     "parameters": f"{a['parameters']:,}", "hook": a["hook"], "modules": ", ".join(a["modules"])}
                    for a in page.r.model["architecture"]]  # fmt: skip
    rf = page.table("stage", "receptive field of one output position")
    assert [(x["receptive field of one output position"], x["step between positions"]) for x in rf[:2]] == [
        ("3×3 pixels", "1×1"), ("7×7 pixels", "2×2")]  # fmt: skip
    acc = [t for t in page.tables if t[1][0] == "accuracy %"]
    assert acc[0] == [["class", *NAMES], ["accuracy %", "97.0", "98.0", "99.0"]]
    assert "Test accuracy 98.00%." in page.html.replace("<b>", "").replace("</b>", "")


def test_the_circuit_table_puts_each_field_under_its_header(page):
    """Truth: each ClassCircuit's fields (all distinct in the fixture) ×100 in its own column, the held-out criterion
    recomputed by hand (sufficiency ≥ full − tolerance and other-called ≤ full's + tolerance)."""
    rows = page.table("class", "size")
    cs = page.r.circuits
    assert len(rows) == len(cs.circuits)
    words = "classes"
    for row, c in zip(rows, cs.circuits, strict=True):
        held = (
            c.held_out_sufficiency >= c.held_out_full_accuracy - cs.tolerance
            and c.held_out_other_classes_called_circuit <= c.held_out_other_classes_called_full + cs.tolerance
        )
        expected = {
            "class": NAMES[c.target], "size": str(c.size),
            "conv2 channels (order added)": "".join(map(str, c.channels)),
            "full %": pct(c.full_accuracy), "only the circuit %": pct(c.sufficiency),
            "circuit mean-ablated %": pct(c.necessity), "circuit resample-ablated %": pct(c.necessity_resample),
            "criterion on the test images (searched on)": "met" if c.meets_criterion else "NOT met",
            "held-out full %": pct(c.held_out_full_accuracy), "held-out circuit %": pct(c.held_out_sufficiency),
            f"held-out: other {words} called this class, circuit only / full %":
                f"{pct(c.held_out_other_classes_called_circuit, '%.2f')} / "
                f"{pct(c.held_out_other_classes_called_full, '%.2f')}",
            "criterion on held-out images": "met" if held else "NOT met",
            f"other {words} called this class, circuit only / full %":
                f"{pct(c.other_classes_called_circuit, '%.2f')} / {pct(c.other_classes_called_full, '%.2f')}",
            "prefix size": str(c.prefix_size), "greedy size": str(c.greedy_size), "pruned size": str(c.pruned_size),
        }  # fmt: skip
        feeders = [v for k, v in row.items() if k.startswith("largest conv1 inputs")]
        assert {k: v for k, v in row.items() if not k.startswith("largest conv1 inputs")} == expected
        assert feeders == [", ".join(f"{f.channel} {f.contribution:+.2f} ({100 * f.share:.0f}%)" for f in c.feeders)]


def test_each_circuit_section_states_its_own_per_class_accuracies_and_pulls(page):
    """Truth: per circuit, attribution[ch] under each channel, and 100× the three per-class accuracy tensors
    under each class; the summary line quotes sufficiency, full, necessity, resample ×100."""
    for c in page.r.circuits.circuits:
        head = ["channel (order added)", *(str(ch) for ch in c.channels)]
        tabs = [t for t in page.tables if t[0] == head]
        assert tabs[0][1] == [f"mean pull on logit {NAMES[c.target]} vs mean-ablated",
                              *(f"{float(c.attribution[ch]):+.2f}" for ch in c.channels)]  # fmt: skip
        i = page.tables.index(tabs[0])
        acc = page.tables[i + 1]
        assert acc[0] == ["class", *NAMES]
        for row, vals in zip(acc[1:], (c.per_class_accuracy_circuit_only, c.per_class_accuracy_circuit_ablated,
                                       c.per_class_accuracy_circuit_resampled), strict=True):  # fmt: skip
            assert row[1:] == [pct(v) for v in vals.tolist()], row
        s = page.summaries[f"circuit-{c.target}"]
        assert (f"only them {pct(c.sufficiency)}% (full {pct(c.full_accuracy)}%), mean-ablated {pct(c.necessity)}%, "
                f"resample-ablated {pct(c.necessity_resample)}%") in s  # fmt: skip


def test_each_channel_section_states_its_own_profile_and_ablation(page):
    """Truth: per stage and channel, class_means[c] (3 decimals), 100×zero[c] and 100×mean[c] (signed, one decimal)
    and 100×zero_overall[c] / mean_overall[c] (two decimals) under "all"; the summary names argmax of the class means,
    index[c] and 100×mean_overall[c]."""
    r = page.r
    for stage, n in SIZES.items():
        sel, ab = r.selectivity_of(stage), r.ablation.stage(stage)
        for c in range(n):
            sid = f"{stage}-{c}"
            assert sid in page.summaries
            prof = sel.class_means[c].tolist()
            summary = page.summaries[sid]
            assert summary.startswith(f"{stage} channel {c} — highest mean activation on class "
                                      f"{NAMES[int(np.argmax(prof))]} (selectivity {float(sel.index[c]):.2f}, "
                                      f"{sel.region_on_preferred_class[c]}); mean-ablation "
                                      f"{100 * float(ab.mean_overall[c]):+.2f} points"), summary  # fmt: skip
    tables = [t for t in page.tables if len(t) == 4 and t[1][0] == "mean activation"]
    expected = []
    for stage, n in SIZES.items():
        sel, ab = r.selectivity_of(stage), r.ablation.stage(stage)
        for c in range(n):
            expected.append([
                ["class", *NAMES, "all"],
                ["mean activation", *(f"{v:.3f}" for v in sel.class_means[c].tolist()), ""],
                ["zero-ablation Δ points", *(f"{100 * v:+.1f}" for v in ab.zero[c].tolist()),
                 f"{100 * float(ab.zero_overall[c]):+.2f}"],
                ["mean-ablation Δ points", *(f"{100 * v:+.1f}" for v in ab.mean[c].tolist()),
                 f"{100 * float(ab.mean_overall[c]):+.2f}"],
            ])  # fmt: skip
    assert tables == expected


def test_each_channel_names_its_own_patching_share_and_strongest_connections(page):
    """Truth: 100×channel_mean[c] of the conv2 patching; the five largest kernel norms into conv2 channel c (incoming,
    from conv1) or out of conv1 channel c (outgoing, to conv2), each with its norm and signed sum."""
    r = page.r
    conn = r.weights.connections[0]
    norm, ssum = conn.kernel_norm.numpy(), conn.kernel_sum.numpy()
    # (stage, its channels, the other stage, its channels, direction, the [conv2, conv1] index of a link c–o)
    sides = [("conv2", 5, "conv1", 4, "incoming", lambda c, o: (c, o)),
             ("conv1", 4, "conv2", 5, "outgoing", lambda c, o: (o, c))]  # fmt: skip
    for stage, n, other, n_other, direction, at in sides:
        for c in range(n):
            text = " ".join("".join(page.details[f"{stage}-{c}"]).split())
            share = 100 * float(r.patching.stage(stage).channel_mean[c])
            assert f"recovers {share:.1f}% of the logit-difference gap" in text
            top = sorted(range(n_other), key=lambda o: -norm[at(c, o)])[:5]
            links = ", ".join(f"{other} {o} ({norm[at(c, o)]:.2f}, {ssum[at(c, o)]:+.2f})" for o in top)
            assert f"Strongest {direction} connections (kernel norm, signed sum): {links}." in text, text


def test_the_patching_table_lists_each_units_position_and_share(page):
    """Truth: the StagePatching's top units: channel (y, x) — 100×recovered, one decimal."""
    rows = [t for t in page.tables if t[0][0] == "stage" and len(t[0]) == 2]
    assert rows[0][1:] == [["conv1", "2 (0, 1) — 5.2%"], ["conv2", "3 (1, 2) — 41.0%; 0 (2, 0) — -13.7%"]]


def _bars(ax) -> dict[str, list[float]]:
    return {c.get_label(): [p.get_height() for p in c.patches] for c in ax.containers}


def test_each_channel_figure_plots_its_own_channel(page):
    """Truth: the figure under the alt "STAGE channel c" is titled so and its bars are class_means[c] and
    100×zero[c] / 100×mean[c]; its weights image is the conv1 filter or the tiled incoming kernels."""
    r = page.r
    for stage, n in SIZES.items():
        sel, ab = r.selectivity_of(stage), r.ablation.stage(stage)
        for c in range(n):
            fig = fig_of(page, f"{stage} channel {c}")
            assert fig._suptitle.get_text() == f"{stage} channel {c}"
            bars = [ax for ax in fig.axes if ax.containers]
            assert np.allclose(bars[0].containers[0].datavalues, sel.class_means[c].numpy())
            got = _bars(bars[1])
            assert np.allclose(got["zero"], ab.zero[c].numpy() * 100)
            assert np.allclose(got["mean"], ab.mean[c].numpy() * 100)
            weights = fig.axes[0].images[0].get_array()
            if stage == "conv1":
                want = r.weights.first_filters[c, 0].numpy()
            else:
                want = F.tile(r.weights.connections[0].kernels[c].numpy(), 8)
            assert np.allclose(np.ma.filled(weights, np.nan), want, equal_nan=True)


def test_the_circuits_figure_bars_are_each_fields_own(page):
    """Truth: the sufficiency/necessity panel's four bar series are 100×full_accuracy, sufficiency, necessity,
    necessity_resample of each circuit; the growth lines are each circuit's growth points ×100."""
    fig = fig_of(page, "circuits")
    cs = page.r.circuits.circuits
    a, b = fig.axes[0], fig.axes[1]
    bars = list(b.containers)
    for cont, key in zip(bars, ("full_accuracy", "sufficiency", "necessity", "necessity_resample"), strict=True):
        assert np.allclose(cont.datavalues, [100 * getattr(c, key) for c in cs]), key
    for line, c in zip(a.get_lines(), cs, strict=True):
        assert line.get_label() == NAMES[c.target]
        assert np.allclose(line.get_ydata(), [100 * p.accuracy for p in c.growth])
        assert list(line.get_xdata()) == [p.size for p in c.growth]


def test_each_class_circuit_figure_plots_its_own_accuracies(page):
    """Truth: the figure under "circuit for class NAME" has bars 100× circuit-only / mean-ablated / resampled per-class
    accuracy of that circuit, and one map per channel: selectivity maps[target, ch]."""
    r = page.r
    maps = r.selectivity_of("conv2").maps.numpy()
    for c in r.circuits.circuits:
        fig = fig_of(page, f"circuit for class {NAMES[c.target]}")
        got = _bars(next(ax for ax in fig.axes if ax.containers))
        assert np.allclose(got["circuit only"], c.per_class_accuracy_circuit_only.numpy() * 100)
        assert np.allclose(got["mean-ablated"], c.per_class_accuracy_circuit_ablated.numpy() * 100)
        assert np.allclose(got["resampled"], c.per_class_accuracy_circuit_resampled.numpy() * 100)
        titled = {ax.get_title(): ax for ax in fig.axes if ax.get_title().startswith("ch ")}
        for ch in c.channels:
            assert np.allclose(titled[f"ch {ch}"].images[0].get_array(), maps[c.target, ch])


def test_the_ablation_and_selectivity_figures_plot_their_own_kind_and_stage(page):
    """Truth: the mean-ablation matrix panels are 100×mean per stage, the zero ones 100×zero; each selectivity figure
    is class_means ÷ each channel's max |mean| in the stage's order, rows labelled with index[c]."""
    r = page.r
    for kind in ("mean", "zero"):
        fig = fig_of(page, f"{kind}-ablation matrix")
        panels = [ax for ax in fig.axes if ax.images]
        for ax, st in zip(panels, r.ablation.stages, strict=True):
            assert np.allclose(ax.images[0].get_array(), st.of(kind).numpy() * 100)
            assert ax.get_title() == f"{st.stage}: {kind}-ablating one channel"
    for sel in r.selectivity:
        fig = fig_of(page, f"{sel.stage} selectivity")
        m = sel.class_means.numpy()
        norm = m / np.abs(m).max(1, keepdims=True)
        ax = fig.axes[0]
        assert np.allclose(ax.images[0].get_array(), norm[list(sel.order)])
        assert [t.get_text() for t in ax.get_yticklabels()] == [
            f"ch {c}  sel {float(sel.index[c]):.2f}" for c in sel.order]  # fmt: skip


def test_the_confusion_figure_prints_each_count_in_its_cell(page):
    """Truth: the confusion matrix of the overview, row = true class, column = predicted."""
    ax = fig_of(page, "confusion matrix").axes[0]
    conf = page.r.overview.confusion_matrix
    got = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert got == {(i, j): str(conf[i][j]) for i in range(K) for j in range(K)}
    assert ax.get_xlabel() == "predicted" and ax.get_ylabel() == "true"


def test_the_blocks_attribution_tables_put_each_target_under_its_own_header():
    """Truth: each GroupFlow's attribution[i][j], residual[j], grad_x_act[j], actual_change[j] and removal[i][j]
    (signed, three decimals) under target j's name; the logits' columns are the classes with the largest measured
    change, largest first (fox 0.9, dog 0.5, cat 0.2), each column still its own class's numbers."""
    pair = GroupFlow("conv1", "conv2", ("group 1", "group 2"), np.array([[0.5, 0.1], [0.05, 0.3]]),
                     np.array([0.01, -0.02]), np.array([0.55, 0.4]), np.array([0.75, 0.45]),
                     np.array([[0.8, 0.12], [0.002, 0.25]]))  # fmt: skip
    logits = GroupFlow("conv2", "logits", ("cat", "dog", "fox"), np.array([[0.11, -1.0, 2.0], [0.5, 1.5, -0.7]]),
                       np.array([0.1, 0.0, -0.3]), np.array([0.21, 0.31, 0.41]), np.array([0.2, 0.5, 0.9]),
                       np.array([[0.13, -0.9, 2.1], [0.4, 1.4, -0.6]]))  # fmt: skip
    settings = {"run": None, "steps": 1, "seed": 0, "groups": 2, "threshold": 0.9, "typical": None}
    r = replace(
        blocks_fixture.make_result(), flows=(pair, logits), class_names=("cat", "dog", "fox"), settings=settings
    )
    html = render_string("mechscope.cnn", "blocks.html.j2", r=r, summary=[], inputs="i", curve="c", flow="f",
                         sections=[], classes=B.shown_classes(r), exact=[B.is_exact(f) for f in r.flows])  # fmt: skip
    tables = Page(html).tables
    assert len(tables) == 4
    for (attr, removal), f, cols in zip((tables[:2], tables[2:]), r.flows, ([0, 1], [2, 1, 0]), strict=True):
        assert attr[0][1:] == [f.targets[j] for j in cols] and removal[0][1:] == attr[0][1:]
        k = len(f.attribution)
        for i in range(k):
            assert attr[1 + i] == [f"group {i + 1}", *(f"{f.attribution[i][j]:+.3f}" for j in cols)]
            assert removal[1 + i] == [f"group {i + 1}", *(f"{f.removal[i][j]:+.3f}" for j in cols)]
        for row, field in zip(attr[1 + k :], (f.residual, f.grad_x_act, f.actual_change), strict=True):
            assert row[1:] == [f"{field[j]:+.3f}" for j in cols], row
