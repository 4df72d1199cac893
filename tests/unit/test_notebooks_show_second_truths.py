"""The notebook renderers and their registry (core.show) and kept_sum, second pass, against outside truths: hand-made
results whose fields all differ, read back from the page with html.parser (tests.unit.test_cnn_pages_truths.Page) and
from the figures' own artists; the registry's documented contract (a notebook view, a whole saved page, subclasses
without a renderer of their own); and kept_sum's per-class shares against a plain numpy loop."""

from __future__ import annotations

import base64
import io
import re
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

import mechscope
from mechscope.core import show
from tests.unit.test_cnn_pages_truths import Page
from tests.unit.test_heads import hand_built


def _folded(html: str) -> list[str]:
    return re.findall(r"<summary>(.*?)</summary>", html)


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", html))


# ---- the registry ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shapes:
    model: str
    eight: dict = field(default_factory=lambda: {f"k{i}": i for i in range(8)})
    nine: dict = field(default_factory=lambda: {f"k{i}": i for i in range(9)})
    twelve: list = field(default_factory=lambda: list(range(12)))
    thirteen: list = field(default_factory=lambda: list(range(13)))
    value: float = 0.123456
    array: np.ndarray = field(default_factory=lambda: np.zeros((2, 3, 5)))


def test_fields_page_writes_each_field_in_its_short_form_at_the_cut_offs():
    """Truth: the fields by hand: a dict of 8 is listed and one of 9 counted, a list of 12 listed and one of 13
    counted, a float to 4 significant figures (0.1235), an array by its numpy shape [2, 3, 5]; the model named in the
    text beside the HTML."""
    cells = {row["field"]: row["value"] for row in Page(show.to_html(_Shapes("tiny<1>"))).table("field")}
    assert cells["eight"] == ", ".join(f"k{i}: {i}" for i in range(8)) and cells["nine"] == "dict of 9"
    assert cells["twelve"] == "[" + ", ".join(map(str, range(12))) + "]" and cells["thirteen"] == "13 items"
    assert (cells["value"], cells["array"], cells["model"]) == ("0.1235", "array [2, 3, 5]", "tiny<1>")
    assert show.summary_text(_Shapes("tiny")).startswith("<mechscope _Shapes of tiny:")


@dataclass(frozen=True)
class _Sections:
    model: str


def _sections_page(r: _Sections, full: bool = True):
    sections = ["Summary", "Kept", "Folded"] + (["Only saved"] if full else [])
    body = "".join(f"<h2>{s}</h2><p>{s.lower()} of {r.model}</p>" for s in sections)
    return show.page(f"Sections of <{r.model}>", body), ([] if full else ["the saved-only section"])


@pytest.fixture
def sections_renderer():
    show.renders(_Sections, keep_open=("Kept",))(_sections_page)
    yield
    del show._REGISTRY[_Sections]


def test_the_notebook_view_is_partial_and_the_saved_page_whole(sections_renderer, tmp_path):
    """Truth: core.show's contract: _repr_html_ / to_html ask the renderer for the notebook view (full=False, the
    omitted sections named), save_html for every section; keep_open sections stay unfolded, later others fold; the
    title escaped as text."""
    r = _Sections("m")
    html = show.to_html(r)
    assert "Only saved" not in html and "the saved-only section" in html
    assert _folded(html) == ["Folded"] and "Kept" in re.findall(r"<h2[^>]*>(.*?)</h2>", html)
    saved = show.save_html(r, tmp_path / "p.html").read_text()
    assert "<h2>Only saved</h2>" in saved and "<title>Sections of &lt;m&gt;</title>" in saved


def test_a_subclass_without_its_own_renderer_shows_its_parents_page():
    """Truth: core.show's documented lookup ("cls and its subclasses without their own"): a subclass of
    HeadAblationResult shows the same table as the parent with the same fields, not a fields page."""
    from mechscope.lm.methods.ablation import HeadAblationResult

    @dataclass(frozen=True)
    class Mine(HeadAblationResult):
        pass

    args = (((1, 0),), "mean", 1.5, 2.75, (1.0, 1.5))
    want = Page(HeadAblationResult(*args)._repr_html_()).table("heads")
    got = Page(show.to_html(Mine(*args))).table("heads")
    assert got == want and got[0]["ablated loss (nats)"] == "2.750"


# ---- lm ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scores():
    return mechscope.lm.head_scores(hand_built(), n=6, batch=3, seed=5)


def test_head_scores_page_names_the_highest_induction_head(scores):
    """Truth: numpy's argmax over the induction scores (a different path from ranked()), the sequence count the
    tokens' first axis (3), and the ranking table with every head (4 < the page's 10)."""
    ind = np.asarray(scores.scores["induction"])
    layer, head = np.unravel_index(int(np.argmax(ind)), ind.shape)
    assert (layer, head) != tuple(scores.ranked("previous_token")[0])  # the two scores disagree: a swap shows
    text = _text(scores._repr_html_())
    assert f"highest induction score is {ind[layer, head]:.2f} (head {layer}.{head})" in text
    assert "On 3 sequences of BOS + 6 random tokens" in text
    rows = Page(scores._repr_html_()).table("head")
    assert len(rows) == ind.size and rows[0]["head"] == f"{layer}.{head}"


def test_composition_page_lists_the_ten_strongest_pairs_per_mode():
    """Truth: twelve hand-made pairs per mode (scores not kept): the page's "Strongest pairs" tables list the first
    ten of each, in the given order."""
    from mechscope.lm.methods.composition import Baseline, CompositionResult

    top = {m: [{"source": f"0.{i}", "target": f"1.{i}", "score": 1 - i / 16 - k / 64, "above_baseline": 0.5 - i / 16}
               for i in range(12)] for k, m in enumerate("QKV")}  # fmt: skip
    p = Page(CompositionResult(Baseline(0.01, 0.002, 9, 0), True, 12, top, None)._repr_html_())
    for k, mode in enumerate("QKV"):
        rows = p.table(f"{mode}: source → target")
        assert [r["score"] for r in rows] == [f"{1 - i / 16 - k / 64:.3f}" for i in range(10)]


# ---- cnn attribution -----------------------------------------------------------------------------------------------


CURVES = {"saliency": ([0.9, 0.3, 0.1], [0.1, 0.6, 0.8]), "gradcam": ([0.8, 0.5, 0.2], [0.2, 0.4, 0.7]),
          "random": ([0.7, 0.45, 0.15], [0.15, 0.35, 0.65])}  # fmt: skip


def _attribution(out=None, completeness=None):
    from mechscope.cnn.methods.attributed import AttributionResult
    from mechscope.cnn.methods.faithfulness import FaithfulnessReport, MethodFaithfulness

    def method(name, d, i, rho, fg):
        return MethodFaithfulness(name, d, i, {"conv2": rho}, {"conv2": fg}, *CURVES[name])

    sal, grad = method("saliency", 0.25, 0.75, 0.125, 0.0625), method("gradcam", 0.5, 0.625, 0.875, 0.75)
    rep = FaithfulnessReport([grad, sal], 0.4375, 0.5625, ["conv2"], 12, 3, [0.0, 0.5, 1.0], *CURVES["random"])
    return AttributionResult("pred", "conv2", ("a", "b"), (0,), (0,), (0,), rep, completeness, {}, out=out)


def _captured(r):
    mp, figs = pytest.MonkeyPatch(), []
    mp.setattr("mechscope.cnn.notebook.figure_data_uri", lambda fig, *a, **k: figs.append(fig) or f"fig:{len(figs)}")
    try:
        html = r._repr_html_()
    finally:
        mp.undo()
    return html, figs


def test_attribution_curves_plot_each_methods_own_deletion_and_insertion():
    """Truth: the hand-made curves, distinct per method and per direction: the left axes ("deletion") holds every
    method's deletion curve and the random order's, the right ("insertion") the insertion curves, by line label."""
    html, figs = _captured(_attribution())
    assert len(figs) == 1 and "faithfulness curves" in html
    left, right = figs[0].axes[:2]
    assert "deletion" in left.get_title() and "insertion" in right.get_title()
    for ax, side in ((left, 0), (right, 1)):
        got = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
        assert got == {name: curves[side] for name, curves in CURVES.items()}
        assert all(list(line.get_xdata()) == [0.0, 0.5, 1.0] for line in ax.get_lines())
    assert "Deletion and insertion curves" not in _folded(html)  # the renderer's keep_open


def test_attribution_completeness_sentence_states_the_gap_and_its_share():
    """Truth: by hand, 0.0015 is 1.50e-03 and 0.0125 of the logit change is 1.25%, after 7 steps."""
    from mechscope.cnn.methods.attributed import Completeness

    html = _attribution(completeness=Completeness(7, 0.0015, 0.0125))._repr_html_()
    assert "Integrated gradients (7 steps): completeness gap at most 1.50e-03 (1.25% of the logit change)" in html


def _png(path, w: int, h: int) -> None:
    from PIL import Image

    Image.new("RGB", (w, h), (w * 10, h * 10, 0)).save(path)


def test_attribution_grids_come_best_first_each_its_own_file(tmp_path):
    """Truth: the report's ranking by hand (saliency passes the check at ρ 0.0625 < 0.5, gradcam fails at 0.75, so
    saliency first although the report lists gradcam first), each grid the PNG written for it (sizes 3×2, 5×4)."""
    from PIL import Image

    _png(tmp_path / "saliency.png", 3, 2)
    _png(tmp_path / "gradcam.png", 5, 4)
    html = _attribution(out=str(tmp_path)).save_html(tmp_path / "a.html").read_text()
    assert re.findall(r"<h3>(.*?)</h3>", html) == ["saliency", "gradcam"]
    p = Page(html)
    for name, size in (("saliency", (3, 2)), ("gradcam", (5, 4))):
        with Image.open(io.BytesIO(base64.b64decode(p.imgs[f"{name} attribution grid"].split(",", 1)[1]))) as im:
            assert im.size == size


# ---- cnn discovery ---------------------------------------------------------------------------------------------------


def test_cnn_discovery_keeps_its_circuit_open():
    """Truth: the discovery page's sections parsed (a planted-stroke CNN of tests.unit.test_discovery_cnn): "The
    circuit", a later section the renderer names in keep_open, is shown, not folded into a <details>, while a section
    it does not name ("Strongest edges") is."""
    from mechscope.cnn.methods.discovery import discover, image_task
    from tests.unit.test_discovery_cnn import stroke_cnn, strokes, walk

    x, y = strokes()
    res = discover(walk(stroke_cnn()), image_task(x, y, metric="logit_diff", n=64, seed=0), "eap", size=6, curve=False)
    html = res._repr_html_()
    assert re.findall(r"<h2[^>]*>(.*?)</h2>", html)[:2] == ["Summary", "The circuit"]
    assert "The circuit" not in _folded(html) and "Strongest edges" in _folded(html)


# ---- kept_sum --------------------------------------------------------------------------------------------------------


def _loop_accuracy(logits, diff, w, labels, k):
    """Per-unit, per-class accuracy by a plain loop over inputs in float64 (an absent class: 0 correct of none)."""
    logits, diff, w, labels = (np.asarray(t, dtype=np.float64) for t in (logits, diff, w, labels))
    out = np.zeros((w.shape[1], k))
    for u in range(w.shape[1]):
        right, count = np.zeros(k), np.zeros(k)
        for n in range(len(labels)):
            y = int(labels[n])
            count[y] += 1
            right[y] += int(np.argmax(logits[n] + diff[n, u] * w[:, u])) == y
        out[u] = right / np.maximum(count, 1)
    return out


def test_unit_ablation_accuracy_counts_a_flip_at_twice_the_units_reach():
    """Truth: a hand-made read-out: input 0 (label 0) has logits [1, 0], gap 1; unit 0 moves class 0 by −0.6 and
    class 1 by +0.6 (reach 0.6 < gap < 2·reach), which flips it to class 1. Unit 1 moves both by +0.3 (no flip).
    Class 2 has no inputs: accuracy 0, as the reference's clamped count gives. A plain loop gives the same shares."""
    from mechscope.core.kept_sum import unit_ablation_accuracy

    logits = torch.tensor([[1.0, 0.0, -5.0], [0.0, 2.0, -5.0], [3.0, 0.0, -5.0]])
    labels = torch.tensor([0, 1, 0])
    w = torch.tensor([[-0.6, 0.3], [0.6, 0.3], [0.0, 0.0]])
    diff = torch.ones(3, 2)
    got = unit_ablation_accuracy(logits, diff, w, torch.arange(2), labels, 3)
    assert got.tolist() == [[0.5, 1.0, 0.0], [1.0, 1.0, 0.0]]
    np.testing.assert_array_equal(got.numpy(), _loop_accuracy(logits, diff, w, labels, 3))


def test_unit_ablation_accuracy_equals_a_plain_loop_on_random_read_outs():
    """Truth: the plain float64 loop above, on seeded random read-outs with two of six classes absent (only labels
    0..3 occur); float32 and float64 argmaxes agree away from near-ties, which random normals do not produce here."""
    from mechscope.core.kept_sum import unit_ablation_accuracy

    g = torch.Generator().manual_seed(21)
    logits = torch.randn(60, 6, generator=g)
    labels = torch.randint(0, 4, (60,), generator=g)
    w, diff = torch.randn(6, 5, generator=g), torch.randn(60, 5, generator=g)
    got = unit_ablation_accuracy(logits, diff, w, torch.arange(5), labels, 6).numpy()
    np.testing.assert_array_equal(got, _loop_accuracy(logits, diff, w, labels, 6))
    assert (got[:, 4:] == 0).all()


def test_rates_of_a_class_beyond_the_counts_are_the_boolean_means():
    """Truth: Rates' docstring, (pred[labels == d] == d).mean() (NaN: no input has d) and the same over labels != d
    (every input), for a class d = 3 outside n_classes = 3."""
    from mechscope.core.kept_sum import Rates

    labels, pred = torch.tensor([0, 1, 2, 1, 0]), torch.tensor([3, 1, 3, 0, 0])
    acc, called = Rates(labels, 3)(pred, 3)
    assert acc != acc and called == pytest.approx(2 / 5)
