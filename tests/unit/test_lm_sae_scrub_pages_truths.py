"""The language wing's dictionary pages (``lm sae``: report/sae.py and its templates) and the causal-scrubbing page of
either wing (core/render/templates/scrub.html.j2) against hand-made results: the pages are parsed with html.parser
(``Page`` of tests/unit/test_cnn_pages_truths.py), each cell is compared with the field formatted by hand (×100
where a % is shown), and each figure's artists are read back. Numbers are distinct wherever two fields could be
swapped unnoticed."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import numpy as np
import pytest

from mechscope.cnn.methods.scrubbing import CNNScrub
from mechscope.cnn.report import discovery as CD
from mechscope.core.render import discovery as RD
from mechscope.core.scrub import Claim, ClaimScrub, Hypothesis, ScrubResult
from mechscope.lm.methods import sae as LS
from mechscope.lm.methods.neurons import SoluComparison
from mechscope.lm.methods.scrubbing import LMScrub
from mechscope.lm.report import discovery as LD
from mechscope.lm.report import neurons as N
from mechscope.lm.report import sae as S
from tests.unit.test_cnn_pages_truths import Page
from tests.unit.test_lm_report_truths import captured
from tests.unit.test_sentences_neurons import neurons

# ---- context_html ------------------------------------------------------------------------------------------------


class Spans(HTMLParser):
    """The spans of one context: (class, title, text) each."""

    def __init__(self, html: str):
        super().__init__()
        self.spans, self._cur = [], None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        if tag == "span":
            a = dict(attrs)
            self._cur = [a.get("class"), a.get("title"), ""]
            self.spans.append(self._cur)

    def handle_endtag(self, tag):
        if tag == "span":
            self._cur = None

    def handle_data(self, data):
        if self._cur is not None:
            self._cur[2] += data


def level(a: float, peak: float) -> int:
    """The page's 10 steps, written as floor(x + 1/2) capped at 10 (no tie at .5 among the values used here)."""
    return min(10, int(np.floor(10 * a / peak + 0.5))) if peak > 0 else 0


TOKENS = ("a<", "&b", "c", "\n", "d", "e")
ACTS = (0.0, 0.62, 1.4, 2.0, 3.0, 0.04)


def test_a_context_shades_each_token_by_its_activation_over_the_peak_and_outlines_the_focus():
    """Truth: levels by hand over peak 2 (0, 3, 7, 10, 10 capped from 15, 0); the focus (position 5, unshaded) is the
    one outlined; each shaded token's title is its own activation; the value heads the context."""
    html = S.context_html(TOKENS, ACTS, 5, 2.0, value=1.25)
    spans = Spans(html).spans
    assert [t for _, _, t in spans] == ["a<", "&b", "c", "↵", "d", "e"]
    want = [None if level(a, 2.0) == 0 and j != 5 else f"a{level(a, 2.0)}" + (" top" if j == 5 else "")
            for j, a in enumerate(ACTS)]  # fmt: skip
    assert [c for c, _, _ in spans] == want == [None, "a3", "a7", "a10", "a10", "a0 top"]
    assert [ti for _, ti, _ in spans] == [None, "0.62", "1.4", "2", "3", "0.04"]
    assert html.startswith('<div class="ctx"><b>1.25</b> <span>')


def test_a_contexts_tokens_are_html_escaped_and_wrap_only_when_asked():
    """Truth: HTML's escapes of < and & (the raw characters would open a tag / an entity); wrap=True adds pre-wrap."""
    html = str(S.context_html(TOKENS, ACTS, 1, 2.0))
    assert "<span>a&lt;</span>" in html and ">&amp;b</span>" in html and "<b>" not in html
    assert "pre-wrap" not in html and 'style="white-space: pre-wrap"' in S.context_html(TOKENS, ACTS, 1, 2.0, wrap=True)
    assert [c for c, _, _ in Spans(S.context_html(TOKENS, ACTS, -1, 0.0)).spans] == [None] * 6  # peak 0: unshaded


# ---- dashboards ----------------------------------------------------------------------------------------------------


def ex(value: float, acts=(0.0, 0.9, 1.8), focus: int = 2) -> LS.TextExample:
    return LS.TextExample(value=value, sequence=0, position=focus, tokens=("x", "y", "z"), acts=acts, focus=focus)


def board(latent=11, induction=None, why="asked") -> LS.LmLatentDashboard:
    bands = tuple((ex(10.0 + i, (0.0, 0.1 * (i + 1), 0.0), 1),) for i in range(4))
    return LS.LmLatentDashboard(
        latent=latent, density=0.01234, max=1.8, mean_when_active=0.45, top=(ex(1.8), ex(1.7, (1.7, 0.0, 0.0), 0)),
        band_edges=(0.1, 0.5, 0.9, 1.6, 2.4), bands=bands, hist_counts=(700, 500, 300), hist_edges=(0.0, 1.0, 2.0, 3.0),
        promoted=(("a b", 0.5), ("\n", 0.25)), suppressed=(("q", -0.75), ("r", -0.125)),
        mixes=(("L0 N3", 0.812), ("L1 N2", -0.0256)), induction=induction, why=why,
    )  # fmt: skip


# 16 ranked latents (one past the table's 15); latent 105 at exactly the 0.2 margin (0.45 - 0.25), latent 100 above
RANKED = tuple(range(100, 116))
FIRST = (0.05, 0.15, 0.2, 0.3, 0.25) + (0.1,) * 11
SECOND = (0.85, 0.3, 0.35, 0.4, 0.45) + (0.2,) * 11


def dashboards(**kw) -> LS.LmSaeDashboards:
    ind = LS.InductionLatents(
        n=2, sequences=3, seed=7, ranked=RANKED, rate_first=FIRST, rate_second=SECOND,
        mean_first=tuple(1.0 + 0.01 * i for i in range(16)), mean_second=tuple(2.0 + 0.01 * i for i in range(16)),
        tokens=(0, 1, 2, 1, 2), activations=tuple((0.0, 0.5 * (i + 1), 0.0, 1.0, 0.0) for i in range(16)),
    )  # fmt: skip
    ind_board = board(100, {"rate_first": 0.05, "rate_second": 0.85, "mean_first": 1.0, "mean_second": 2.0,
                            "rank": 1}, "induction")  # fmt: skip
    base = dict(model="m", dictionary="d", hook="blocks.0.hook_resid_post", target=None, architecture="topk", d_in=4,
                d_sae=32, text="t", contexts=1, context=8, tokens=7, dead_fraction=0.0, logit_effect="none",
                induction=ind, induction_tokens=("<s>", "a", "b", "a", "b"), latents=(board(), ind_board),
                summary=(), seconds={}, densities=np.array([0.0, 0.1, 0.0, 0.001, 0.5, 0.0]))  # fmt: skip
    return LS.LmSaeDashboards(**(base | kw))


@pytest.fixture(scope="module")
def dash():
    mp = pytest.MonkeyPatch()
    figures = []
    mp.setattr(S, "figure_data_uri", lambda fig, *a, **k: figures.append(fig) or f"fig:{len(figures) - 1}")
    try:
        html = S.dashboards_page(dashboards())
    finally:
        mp.undo()
    p = Page(html)
    p.html, p.figures = html, figures
    return p


def test_the_induction_table_lists_the_first_15_ranked_with_each_rate_under_its_header(dash):
    """Truth: the hand-made ranking: rows 100..114 (not 115), rates to 3 places, means to 3 digits, each its own."""
    rows = dash.table("latent")
    assert [r["latent"] for r in rows] == [str(i) for i in RANKED[:15]]
    for j, r in enumerate(rows):
        assert r["firing rate, first copy"] == f"{FIRST[j]:.3f}" and r["firing rate, repeat"] == f"{SECOND[j]:.3f}"
        assert r["mean activation, first"] == f"{1.0 + 0.01 * j:.3g}"
        assert r["mean activation, repeat"] == f"{2.0 + 0.01 * j:.3g}"


def test_the_induction_criterion_is_a_difference_of_at_least_the_margin(dash):
    """Truth: repeat − first ≥ 0.2 by hand: latents 100 (+0.80) and 105 (+0.20 exactly) meet it; 101..104 do not."""
    bold = re.findall(r'<tr style="font-weight:bold"><td>(\d+)</td>', dash.html)
    assert bold == ["100", "104"] and "2 of them meet the criterion" in dash.html
    assert [i for i, a, b in zip(RANKED, FIRST, SECOND, strict=True) if b - a >= 0.2] == [100, 104]


def test_the_induction_contexts_are_the_first_three_ranked_each_shaded_by_its_own_peak(dash):
    """Truth: latent i's activations (0, 0.5(i+1), 0, 1, 0) over their own max; BOS shown at position 0."""
    ctxs = re.findall(r"latent (\d+) on the first sequence.*?</p>(<div.*?</div>)", dash.html)
    assert [i for i, _ in ctxs] == ["100", "101", "102"]
    for j, (_, div) in enumerate(ctxs):
        acts = (0.0, 0.5 * (j + 1), 0.0, 1.0, 0.0)
        spans = Spans(div).spans
        assert [t for _, _, t in spans] == ["⟨BOS⟩", "a", "b", "a", "b"] and "pre-wrap" in div
        assert [c for c, _, _ in spans] == [f"a{level(a, max(acts))}" if a else None for a in acts]


def test_a_boards_heading_states_its_fields_and_induction_rates_as_percent(dash):
    """Truth: board 100's hand-made fields; rates 0.85 and 0.05 shown as 85% and 5%."""
    line = re.search(r"Latent 100 .*?<p class=\"muted\">(.*?)</p>", dash.html, re.S).group(1)
    assert line == ("density 0.0123 · max 1.8 · mean when active 0.45 · induction rank 1: fires on 85% of repeated "
                    "tokens, 5% of first-copy tokens")  # fmt: skip
    assert 'Latent 11 <span class="muted">(asked)</span>' in dash.html


def test_a_boards_bands_run_highest_first_each_with_its_own_edges_and_examples(dash):
    """Truth: band i spans (edges[i], edges[i+1]] and holds the example of value 10 + i; the page opens the top one."""
    part = dash.html.split("Latent 11 ")[1].split("Latent 100 ")[0]
    got = re.findall(r"<details( open)?><summary>activations in \((.*?), (.*?)\]</summary><div class=\"ctx\"><b>(.*?)"
                     r"</b>", part)  # fmt: skip
    assert got == [(" open", "1.6", "2.4", "13"), ("", "0.9", "1.6", "12"), ("", "0.5", "0.9", "11"),
                   ("", "0.1", "0.5", "10")]  # fmt: skip


def test_a_boards_top_contexts_are_shaded_over_its_max(dash):
    """Truth: board 11's top example acts (0, 0.9, 1.8) over max 1.8: levels 0, 5, 10, the focus (2) outlined."""
    part = dash.html.split("Latent 11 ")[1].split("<details")[0]
    top = re.search(r"<b>Top contexts</b></p>(<div.*?</div>)", part).group(1)
    assert [c for c, _, _ in Spans(top).spans] == [None, "a5", "a10 top"]


def test_a_boards_logit_and_mix_tables_pair_each_token_with_its_own_value(dash):
    """Truth: promoted ("a b" +0.5, newline +0.25) beside suppressed (q −0.75, r −0.125); mixes with 3 places
    (−0.0256 → −0.026)."""
    (pairs,) = [t for t in dash.tables if t[0][0] == "promoted"][:1]
    assert pairs[1:] == [["a␣b", "+0.5", "q", "-0.75"], ["↵", "+0.25", "r", "-0.125"]]
    (mixes,) = [t for t in dash.tables if t[0][0] == "mixes"][:1]
    assert mixes[1:] == [["L0 N3", "+0.812"], ["L1 N2", "-0.026"]]


def test_the_dashboards_figures_plot_the_densities_and_each_boards_histogram(dash):
    """Truth: 6 densities of which 3 are 0, the other 3 histogrammed on log10 from −3 (0.001) to log10 0.5; board
    11's counts (700, 500, 300) sum to 1,500 over edges 0..3."""
    by_title = {f.axes[0].get_title(): f.axes[0] for f in dash.figures}
    (dens,) = [ax for t, ax in by_title.items() if t.endswith(": 3 of 6 dead")]
    assert sum(p.get_height() for p in dens.patches) == 3
    assert dens.patches[0].get_x() == pytest.approx(-3.0)
    assert dens.patches[-1].get_x() + dens.patches[-1].get_width() == pytest.approx(np.log10(0.5))
    ax = by_title["latent 11: 1,500 activations"]
    assert [(p.get_x(), p.get_height()) for p in ax.patches] == [(0.0, 700), (1.0, 500), (2.0, 300)]


def test_a_heading_calls_induction_only_at_the_margin_or_above():
    """Truth: a gap of exactly 0.2 (0.45 − 0.25) meets the ≥ 0.2 criterion; 0.15 at rank 2 does not, and says so."""
    at = board(5, {"rate_first": 0.25, "rate_second": 0.45, "rank": 3}, "induction")
    under = board(6, {"rate_first": 0.3, "rate_second": 0.45, "rank": 2}, "induction")
    top = board(7, {"rate_first": 0.5, "rate_second": 0.3, "rank": 1}, "induction")
    assert S.why_shown(at) == "induction"
    assert S.why_shown(under) == "rank 2 in the induction ranking: +0.150 on the repeat, under the 0.2 criterion"
    assert S.why_shown(top) == "top of the induction ranking: -0.200 on the repeat, under the 0.2 criterion"


# ---- evaluation and training ---------------------------------------------------------------------------------------

METRICS = {"tokens": 12345, "l0": 31.256, "explained_variance": 0.8123, "mse": 0.004567, "cosine_similarity": 0.9345,
           "l2_ratio": 0.8765, "dead_fraction": 0.0625, "dense_fraction": 0.0125, "dense_threshold": 0.1}  # fmt: skip
EFFECT = LS.SpliceEffect(tokens=192, loss_clean=2.5, loss_spliced=2.75, loss_zero_ablated=4.125,
                         ce_loss_recovered=0.8182, kl_spliced=0.3125, kl_zero_ablated=1.6875,
                         kl_recovered=0.8148)  # fmt: skip


def test_the_evaluation_tables_put_each_metric_and_loss_under_its_header(monkeypatch):
    """Truth: the hand-made metrics (dead 6.25% and dense 1.25% ×100 to one place) and splice losses."""
    figs = captured(monkeypatch, S)
    r = LS.LmSaeEvaluation(model="m", dictionary="d", hook="h", target=None, architecture="topk", d_in=4, d_sae=32,
                           text="t", contexts=2, context=8, skip_first=1, effect=EFFECT, metrics=METRICS, seconds=1.0,
                           latent_frequency=np.array([0.0, 0.2, 0.0, 0.0, 0.3]))  # fmt: skip
    html = S.evaluation_page(r)
    p = Page(html)
    assert p.table("positions") == [{"positions": "12,345", "L0": "31.26", "explained variance": "0.8123",
                                     "MSE": "0.004567", "cosine": "0.9345", "l2 ratio": "0.8765", "dead": "6.2%",
                                     "dense (> 10%)": "1.2%"}]  # fmt: skip
    assert p.table("") == [
        {"": "clean", "next-token loss (nats)": "2.5000", "KL to clean (nats)": "0"},
        {"": "dictionary spliced in", "next-token loss (nats)": "2.7500", "KL to clean (nats)": "0.3125"},
        {"": "activation zeroed", "next-token loss (nats)": "4.1250", "KL to clean (nats)": "1.6875"},
    ]
    ce = "(L_zero − L_spliced) / (L_zero − L_clean) = <b>0.818</b>; KL recovered 1 − KL_spliced / KL_zero = 0.815."
    assert ce in html
    assert figs[0].axes[0].get_title().endswith(": 3 of 5 dead")


def test_the_training_page_states_the_last_logged_metrics_and_each_setting(monkeypatch):
    """Truth: the hand-made final metrics (dead 0.0375 as 3.8%), the config's rows, the curve's loss series."""
    figs = captured(monkeypatch, S)
    hist = ({"step": 1, "loss": 9.0, "l0": 40.0, "explained_variance": 0.1},
            {"step": 5, "loss": 3.0, "l0": 20.0, "explained_variance": 0.7})  # fmt: skip
    r = LS.LmSaeTraining(model="m", hook="h", target=None, store="s", architecture="topk", d_in=4, d_sae=32, d_out=4,
                         config={"k": 4}, train_config={"lr": 0.0003}, batch_size=128, epochs=1, steps=5, rows=640,
                         seconds=2.0, rows_per_second=320.0, world_size=1, resumed_from_step=0,
                         final={"loss": 1.2345, "l0": 3.875, "explained_variance": 0.7654, "dead_fraction": 0.0375},
                         history=hist)  # fmt: skip
    html = S.training_page(r)
    assert "Last logged: loss 1.234, L0 3.88, explained variance 0.7654, dead 3.8%." in html
    assert [row for t in Page(html).tables for row in t] == [["k", "4"], ["lr", "0.0003"]]
    (line,) = figs[0].axes[0].get_lines()
    assert list(line.get_ydata()) == [9.0, 3.0] and figs[0].axes[0].get_title() == "loss"


# ---- scrubbing -----------------------------------------------------------------------------------------------------


def scrub_result() -> ScrubResult:
    claims = (Claim("path", (("embed", "blocks.0.attn.h0", "v"), ("blocks.0.attn.h0", "unembed", "in")), "length"),
              Claim("bias", (("embed", "blocks.0.mlp", "in"),)))  # fmt: skip
    return ScrubResult(
        hypothesis=Hypothesis(claims=claims), metric_clean=0.9, metric_random=0.1, metric_random_sd=0.0321,
        metric_scrubbed=0.7, metric_scrubbed_sd=0.044, recovered=0.75, recovered_sd=0.055,
        claims=(ClaimScrub("path", 0.62, 0.016, 0.65), ClaimScrub("bias", 0.9, 0.0, 1.0, measured=False)),
        unclaimed=ClaimScrub("unclaimed", 0.5, 0.024, 0.5), samples=6, seed=3, forward_passes=12345, seconds=1.5,
        sampling="sender",
    )  # fmt: skip


def lm_scrub() -> LMScrub:
    return LMScrub(model="tiny", name="length", description="", task="t", task_description="count; corrupted: x",
                   metric="accuracy", better="higher", settings={}, features={"length": "its length"},
                   scrub=scrub_result(), seconds={})  # fmt: skip


def cnn_scrub(k: int | None) -> CNNScrub:
    return CNNScrub(run="runs/r", name="h", description="", metric="accuracy", better="higher", target=1,
                    settings={"n": 60, "metric_images": k}, features={}, scrub=scrub_result(), seconds={})  # fmt: skip


@pytest.fixture
def scrub_page(monkeypatch):
    figs = captured(monkeypatch, RD)
    p = Page(LD.scrub_page(lm_scrub()))
    p.figures = figs
    return p


def test_the_scrub_table_gives_each_part_its_own_metric_and_share(scrub_page):
    """Truth: the hand-made ScrubResult: metric ± sd to 4/2 digits, recovered ×100 to one place; the unmeasured
    claim is the clean model by construction."""
    assert scrub_page.table("what is scrubbed") == [
        {"what is scrubbed": "hypothesis (everything it does not claim resampled)", "metric": "0.7 ± 0.044",
         "recovered": "75.0%"},
        {"what is scrubbed": "claim 'path' alone (the rest clean)", "metric": "0.62 ± 0.016", "recovered": "65.0%"},
        {"what is scrubbed": "claim 'bias' alone (the rest clean)", "metric": "the clean model (not run)",
         "recovered": "100% by construction: a claim without a feature keeps its edges as they are"},
        {"what is scrubbed": "the unclaimed edges alone resampled", "metric": "0.5 ± 0.024", "recovered": "50.0%"},
    ]  # fmt: skip


def test_the_scrub_heading_and_sentence_state_each_metric(monkeypatch):
    """Truth: recovered 0.75 ± 0.055 shown ×100; clean 0.9, resampled 0.1 ± 0.0321, scrubbed 0.7; 6 samples, seed 3."""
    captured(monkeypatch, RD)
    html = LD.scrub_page(lm_scrub())
    assert "<h2>Behaviour recovered: 75.0% ± 5.5%</h2>" in html
    assert ("Clean model 0.9; with every edge into the output resampled from random inputs 0.1 ± 0.032; scrubbed "
            "(every activation") in html  # fmt: skip
    assert "claimed paths resampled from inputs that agree on their feature) 0.7." in html
    assert "6 seeded resamplings (seed 3, sampling per sender); 12,345 forward passes" in html
    assert '<p class="muted">tiny: count; metric accuracy' in html


def test_the_scrub_claims_table_names_each_edge_and_feature(scrub_page):
    """Truth: the hypothesis built here: sender → receiver<slot> (the lm wing), no feature: the input itself."""
    assert scrub_page.table("claim") == [
        {"claim": "path", "depends only on": "length",
         "edges": "embed → blocks.0.attn.h0<v>blocks.0.attn.h0 → unembed<in>"},
        {"claim": "bias", "depends only on": "(the input itself)", "edges": "embed → blocks.0.mlp<in>"},
    ]  # fmt: skip


def test_the_scrub_figure_bars_each_parts_share_and_spread(scrub_page):
    """Truth: bars top to bottom 0.75, 0.65, 1.0 (hollow: not run), 0.5; error bars the hypothesis' sd and each part's
    metric sd over |clean − random| = 0.8 (0.016 → 0.02, 0 → 0, 0.024 → 0.03)."""
    ax = scrub_page.figures[0].axes[0]
    bars = sorted(ax.patches, key=lambda b: -b.get_y())
    assert [b.get_width() for b in bars] == pytest.approx([0.75, 0.65, 1.0, 0.5])
    assert [b.get_facecolor()[3] for b in bars] == [1.0, 1.0, 0.0, 1.0]
    (errs,) = ax.collections  # the error bars' one LineCollection
    segs = sorted(errs.get_segments(), key=lambda s: -s[0][1])
    assert [s[1][0] - s[0][0] for s in segs] == pytest.approx([0.11, 0.04, 0.0, 0.06])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["hypothesis", "path", "bias", "the unclaimed edges"]


def test_the_cnn_scrub_page_says_how_many_images_the_metric_reads(monkeypatch):
    """Truth: 60 images, 17 of class 1 read by the metric; when it reads all 60 nothing more is said; edges no slot."""
    captured(monkeypatch, RD)
    html = CD.scrub_page(cnn_scrub(17))
    assert "runs/r (60 test images, class 1; the metric averages over the 17 of class 1); metric accuracy" in html
    assert "runs/r (60 test images, class 1); metric" in CD.scrub_page(cnn_scrub(60))
    assert Page(html).table("claim")[1]["edges"] == "embed → blocks.0.mlp"
    assert "<h2>Behaviour recovered: 75.0% ± 5.5%</h2>" in html


# ---- solu-compare ---------------------------------------------------------------------------------------------------


def solu_stats(i: int) -> dict:
    return {"neurons": 4 + i, "rarely_active": 1 + 2 * i, "entropy_median": 1.5 + i, "entropy_quartiles": [0.75 + i,
            2.25 + i], "top_share_median": 0.61 + i / 10, "share_one_token_ge_0.5": 0.5 + i / 10,
            "share_one_token_ge_0.9": 0.25 + i / 10, "share_pattern_ge_0.5": 0.125 + i / 10}  # fmt: skip


def test_the_solu_compare_table_puts_each_models_figures_under_their_headers(tmp_path, monkeypatch):
    """Truth: the hand-made rows (GELU i = 0, SoLU i = 1): loss to 4 places, shares ×100 to one place, the entropy
    quartiles low–high, each model's own."""
    captured(monkeypatch, N)
    models = [{"label": lab, "hooks": [f"blocks.0.mlp.{h}"], "held_out_loss": 1.23 + i, "train_seconds": 12.4 + i,
               "stats": solu_stats(i), "dir": lab.lower(), "min_count": 10}
              for i, (lab, h) in enumerate((("GELU", "hook_post"), ("SoLU", "hook_mid")))]  # fmt: skip
    settings = {"layers": 1, "d_model": 8, "n_heads": 2, "d_mlp": 4, "n_ctx": 16, "seed": 0, "steps": 100, "lr": 0.001,
                "warmup": 5, "batch": 4, "sequences": 2}  # fmt: skip
    r = SoluComparison(settings=settings, text="t", vocab=5, models=models, baseline={}, summary=["x"],
                       seconds={"total": 3.0}, neurons={"GELU": neurons([0.0, 1.0], [1.0, 0.6]),
                                                        "SoLU": neurons([0.5, 1.0], [0.9, 0.6])})  # fmt: skip
    rows = Page(N.write_compare_report(r, tmp_path / "c.html").read_text()).table("", "read at")
    want = [("GELU", "blocks.0.mlp.hook_post", "1.2300", "12 s", "4", "1", "1.50", "0.75–2.25", "0.61", "50.0%",
             "25.0%", "12.5%"),
            ("SoLU", "blocks.0.mlp.hook_mid", "2.2300", "13 s", "5", "3", "2.50", "1.75–3.25", "0.71", "60.0%",
             "35.0%", "22.5%")]  # fmt: skip
    assert [tuple(row.values())[:12] for row in rows] == want
