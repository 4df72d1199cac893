"""The notebook API of the three wings against outside truths: the command line's own settings for the same options
(its --help defaults, and what each command hands its pipeline), the documented names at the package roots, and the
renderers' pages parsed with html.parser from hand-made results whose fields all differ, so a swapped field shows."""

from __future__ import annotations

import inspect
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import mechscope
from mechscope.cli import main
from mechscope.core.errors import MechscopeError
from tests.e2e.test_cli_options_truths import Called, record
from tests.unit.test_cnn_pages_truths import Page
from tests.unit.test_heads import hand_built
from tests.unit.test_render_truths import Doc

DOCS = Path(__file__).resolve().parents[2] / "docs"


class Stop(MechscopeError):
    """Raised by a stand-in pipeline once it has seen its arguments."""


def cli_defaults(command) -> dict:
    """The typer options' defaults of a command function (its --help defaults)."""
    return {k: p.default.default for k, p in inspect.signature(command).parameters.items()}


def api_defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()}


def run_cli(*args):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    assert e.value.code == 2  # the stand-in's Stop, as the CLI's one-line error


# ---- names ---------------------------------------------------------------------------------------------------------


def _doc_rows() -> list[tuple[list[str], list[str]]]:
    rows = []
    for line in (DOCS / "api" / "mechscope.md").read_text().splitlines():
        cells = line.split("|")
        if len(cells) >= 4 and cells[1].strip().startswith("`mechscope."):
            rows.append((re.findall(r"`([^`]+)`", cells[1]), re.findall(r"`([^`]+)`", cells[2])))
    return rows


def _resolve(dotted: str):
    import importlib

    module, _, attr = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError:
        return importlib.import_module(dotted)


def test_root_names_are_what_the_api_page_says_they_are():
    """Truth: the table of docs/api/mechscope.md ("name | is"): each root name is that very object."""
    checked = 0
    for names, targets in _doc_rows():
        if not targets:
            continue
        if len(names) == len(targets):  # `a`, `b` | `x.a`, `.b`: relative names are the first one's siblings
            base = targets[0].rpartition(".")[0]
            full = [t if not t.startswith(".") else base + t for t in targets]
        elif len(targets) == 1 or len(names) == 1:  # several names of one module, or one name then its prose
            full = [f"{targets[0]}.{n.rpartition('.')[2]}" for n in names] if len(names) > 1 else targets[:1]
        for name, target in zip(names, full, strict=True):
            assert getattr(mechscope, name.removeprefix("mechscope.")) is _resolve(target), (name, target)
            checked += 1
    assert checked >= 12


def test_lm_and_clip_names_are_their_documented_objects():
    """Truth: docs/notebooks.md ("HeadAblationResult (also importable by its old name mechscope.lm.AblationResult)")
    and each wing's own __all__: every listed name is there, the lazy classes the methods' own classes."""
    from mechscope.lm.methods.ablation import HeadAblationResult
    from mechscope.lm.methods.scores import HeadScores
    from mechscope.lm.toy import ToyTraining

    assert "mechscope.lm.AblationResult" in (DOCS / "notebooks.md").read_text()
    assert mechscope.lm.AblationResult is HeadAblationResult is mechscope.lm.HeadAblationResult
    assert mechscope.lm.HeadScores is HeadScores and mechscope.lm.ToyTraining is ToyTraining
    for wing in (mechscope.lm, mechscope.clip, mechscope):
        for name in wing.__all__:
            assert getattr(wing, name) is not None, (wing.__name__, name)
    assert mechscope.attention is mechscope.lm.attention


# ---- defaults and settings: the command line's -----------------------------------------------------------------------


def test_lm_defaults_are_the_lm_heads_and_train_toy_options():
    """Truth: `lm heads --help` and `lm train-toy --help` (the typer options' defaults)."""
    from mechscope.lm.cli.heads import heads
    from mechscope.lm.cli.toy import train_toy_cmd
    from mechscope.lm.toy import ToyConfig

    cli = cli_defaults(heads)
    for fn in (mechscope.lm.find_induction_heads, mechscope.lm.head_scores, mechscope.lm.repeated_tokens):
        api = api_defaults(fn)
        assert {k: api[k] for k in ("n", "batch", "seed")} == {k: cli[k] for k in ("n", "batch", "seed")}, fn
    assert api_defaults(mechscope.lm.find_induction_heads)["ablation"] is (not cli["no_ablation"])
    toy, cfg = cli_defaults(train_toy_cmd), ToyConfig()
    assert all(getattr(cfg, k) == toy[k] for k in ("layers", "data", "steps", "seed", "mlp", "d_mlp"))


def test_cnn_defaults_are_the_cnn_commands_options():
    """Truth: `cnn attribute|visualize|explain --help`; explain's --pairs is the API's n_pairs."""
    from mechscope.cnn.cli import commands as C

    attr, vis, exp = cli_defaults(C.attribute), cli_defaults(C.visualize), cli_defaults(C.explain)
    a = api_defaults(mechscope.cnn.attribute)
    assert (a["n"], a["n_faithfulness"], a["target"], a["layer"]) == (attr["n"], attr["n_faithfulness"],
                                                                      attr["target"], attr["layer"])  # fmt: skip
    v = api_defaults(mechscope.cnn.visualize)
    assert (v["steps"], v["param"], v["seed"]) == (vis["steps"], vis["param"], vis["seed"])
    e = api_defaults(mechscope.cnn.explain)
    assert (e["n_pairs"], e["tolerance"], e["test_limit"], e["circuit_layer"]) == (
        exp["pairs"], exp["tolerance"], exp["test_limit"], exp["circuit_layer"])  # fmt: skip


@pytest.mark.parametrize(
    ("settings_cls", "command", "renamed"),
    [
        ("mechscope.clip.training.SmallSettings", "train", {}),
        ("mechscope.clip.pipelines.neurons.NeuronSettings", "neurons", {"param": "featvis_param"}),
        ("mechscope.clip.pipelines.attack.AttackSettings", "attack", {}),
    ],
)
def test_clip_settings_defaults_are_the_clip_commands_options(settings_cls, command, renamed):
    """Truth: `clip train|neurons|attack --help`: each option the settings class has keeps the CLI's default (the
    API takes the settings as keywords; lists given as text on the CLI are None there too)."""
    import mechscope.clip.cli as clip_cli

    cls = _resolve(settings_cls)
    cli = cli_defaults(getattr(clip_cli, command))
    fields = {f: getattr(cls(), f) for f in cls.__dataclass_fields__}
    shared = {renamed.get(k, k): v for k, v in cli.items() if renamed.get(k, k) in fields}
    shared.pop("layers", None)  # --layer here, a tuple or None there
    assert len(shared) >= 4
    for k, v in shared.items():
        assert fields[k] == v or (fields[k] in (None, ()) and v is None), (command, k, fields[k], v)


def test_find_induction_heads_hands_the_pipeline_the_clis_protocol(monkeypatch):
    """Truth: `lm heads --n 7 --batch 3 --seed 5 --no-ablation` builds the protocol the call with n=7, batch=3,
    seed=5, ablation=False builds (both captured where they reach the analysis)."""
    import mechscope.lm.methods.heads as H
    import mechscope.lm.pipelines.heads as P

    seen = []

    def capture(*args, **kwargs):
        seen.append(args[2] if len(args) > 2 else kwargs["protocol"])
        raise Stop("stop")

    monkeypatch.setattr(P, "induction_heads", capture)
    run_cli("lm", "heads", "--model", "smollm2", "--n", 7, "--batch", 3, "--seed", 5, "--no-ablation")
    monkeypatch.setattr(H, "find_induction_heads", lambda model, protocol, *a, **k: capture(0, 0, protocol))
    with pytest.raises(Stop):
        mechscope.lm.find_induction_heads(hand_built(), n=7, batch=3, seed=5, ablation=False)
    assert len(seen) == 2 and seen[0] == seen[1] and seen[1].per_head_ablation is False and seen[1].n == 7


def test_cnn_calls_hand_the_pipelines_the_clis_settings(monkeypatch, tmp_path):
    """Truth: `cnn attribute|visualize|explain --run R ...` hand their pipelines (attribute_run, visualize_run,
    explain_run, their arguments bound by name) the same settings as mechscope.attribute/visualize/explain with the
    same values hand theirs (attribute_model, visualize_model, explain_model)."""
    keep = {"attribute": ("methods", "n", "n_faithfulness", "ig_steps", "target", "layer", "force"),
            "visualize": ("layers", "units", "steps", "param", "seed", "n_diverse", "force"),
            "explain": ("settings", "force")}  # fmt: skip
    seen = {(name, side): record(monkeypatch, f"mechscope.cnn.pipelines.{name}:{name}_{side}")
            for name in keep for side in ("run", "model")}  # fmt: skip
    run = tmp_path
    for argv in (("cnn", "attribute", "--run", run, "--method", "saliency", "--n", 3, "--n-faithfulness", 5,
                  "--target", "label", "--layer", "conv1", "--force"),
                 ("cnn", "visualize", "--run", run, "--layer", "conv1", "--units", "0,2", "--steps", 9, "--param",
                  "pixel", "--seed", 4, "--force"),
                 ("cnn", "explain", "--run", run, "--class", "1", "--patch", "1,0", "--pairs", 3, "--tolerance", 0.05,
                  "--test-limit", 120, "--circuit-layer", "conv1", "--force")):  # fmt: skip
        with pytest.raises(Called):
            main([str(a) for a in argv])
    model, train, test = _tiny_cnn_data()
    with pytest.raises(Called):
        mechscope.attribute(model, train, test, out=tmp_path / "a", methods=["saliency"], n=3, n_faithfulness=5,
                            target="label", layer="conv1", force=True)  # fmt: skip
    with pytest.raises(Called):
        mechscope.visualize(model, train, test, out=tmp_path / "v", layers=["conv1"], units=[0, 2], steps=9,
                            param="pixel", seed=4, force=True)  # fmt: skip
    with pytest.raises(Called):
        mechscope.explain(model, train, test, out=tmp_path / "e", classes=["1"], patch=("1", "0"), n_pairs=3,
                          tolerance=0.05, test_limit=120, circuit_layer="conv1", force=True)  # fmt: skip
    for name, names in keep.items():
        cli, api = ({k: _plain(seen[name, side][k]) for k in names} for side in ("run", "model"))
        assert cli == api, (name, cli, api)


def _plain(v):
    return tuple(v) if isinstance(v, list) else v


def _tiny_cnn_data():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 8, 8, generator=g)
    y = torch.arange(8) % 2
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 2))
    return model, (x, y), (x, y)


# ---- lm calls: one model, the same numbers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scores():
    model = hand_built()
    return model, mechscope.lm.head_scores(model, n=6, batch=3, seed=5)


def test_head_scores_runs_on_the_tokens_repeated_tokens_makes_with_the_same_settings(scores):
    """Truth: mechscope.lm.repeated_tokens with the same n, batch and seed (the documented way to make them)."""
    model, s = scores
    assert torch.equal(s.tokens, mechscope.lm.repeated_tokens(model, n=6, batch=3, seed=5)) and s.n == 6


def test_head_scores_table_takes_n_and_ranks_by_induction(scores):
    """Truth: the result's own ranking and scores (ranked("induction")), and the n asked for."""
    _, s = scores
    for n in (1, 3):
        rows = s.table(n)
        assert [r["head"] for r in rows] == [f"{a}.{b}" for a, b in s.ranked("induction")[:n]]
        assert rows[0]["previous_token"] == pytest.approx(float(s.scores["previous_token"][s.ranked()[0]]))


def test_head_scores_page_states_each_loss_and_keeps_its_ranking_open(scores):
    """Truth: the fragment parsed with html.parser: the summary sentence states the first and the second copy's loss
    in that order, and "Heads ranked by induction score" (its renderer's keep_open) is not folded into a <details>."""
    _, s = scores
    html = s._repr_html_()
    text = re.sub(r"<[^>]+>", "", html)
    m = re.search(r"from ([\d.]+) nats on the first copy to ([\d.]+) on the second", text)
    assert m and (m.group(1), m.group(2)) == (f"{s.loss_first_half:.2f}", f"{s.loss_second_half:.2f}")
    assert s.loss_first_half != pytest.approx(s.loss_second_half, abs=0.01)
    folded = re.findall(r"<summary>(.*?)</summary>", html)
    assert "Heads ranked by induction score" in text and "Heads ranked by induction score" not in folded
    assert "Loss per position" in folded  # a later section without keep_open: folded


# ---- renderers of hand-made results ----------------------------------------------------------------------------------


def _h1(html: str) -> str:
    return re.search(r"<h1>(.*?)</h1>", html, re.S).group(1)


def test_head_ablation_page_puts_each_loss_under_its_header(tmp_path):
    """Truth: the result's fields by hand, the ± the sample sd (statistics.stdev) of the per-sequence increases."""
    from mechscope.lm.methods.ablation import HeadAblationResult

    r = HeadAblationResult(((1, 0), (0, 1)), "zero", 1.25, 3.5, (2.0, 2.5, 2.25, 2.25))
    (row,) = Page(r._repr_html_()).table("heads")
    sd = statistics.stdev(r.per_sequence)
    assert row == {
        "heads": "1.0, 0.1",
        "ablation": "zero",
        "clean loss (nats)": "1.250",
        "ablated loss (nats)": "3.500",
        "increase, nats (mean ± sd over sequences)": f"+2.250 ± {sd:.3f}",
    }
    assert _h1(r.save_html(tmp_path / "a.html").read_text()) == "Zero-ablation of 1.0, 0.1"


def _pairs(mode: str, k: int) -> list[dict]:
    return [{"source": f"0.{i}", "target": f"1.{i + k}", "score": 0.5 - 0.1 * i + 0.01 * k,
             "above_baseline": 0.4 - 0.1 * i + 0.01 * k} for i in range(2)]  # fmt: skip


def test_composition_page_shows_each_modes_own_pairs_and_the_baseline():
    """Truth: hand-made pairs, different per mode; the baseline's mean, sd and draws as written in the sentence."""
    from mechscope.lm.methods.composition import Baseline, CompositionResult

    top = {m: _pairs(m, k) for k, m in enumerate("QKV")}
    r = CompositionResult(Baseline(0.0123, 0.0045, 17, 0), True, 2, top, None)
    html = r._repr_html_()
    p = Page(html)
    for k, mode in enumerate("QKV"):
        rows = p.table(f"{mode}: source → target")
        assert [x[f"{mode}: source → target"] for x in rows] == [f"0.{i} → 1.{i + k}" for i in range(2)]
        assert [x["score"] for x in rows] == [f"{q['score']:.3f}" for q in top[mode]]
        assert [x["above baseline"] for x in rows] == [f"{q['above_baseline']:.3f}" for q in top[mode]]
    assert "score 0.0123 ± 0.0045 (17 seeded draws)" in html and "Every pair" not in html


def _parts(prefix: str, n: int) -> tuple[dict, ...]:
    return tuple({"id": f"{prefix}{i}", "label": f"{prefix}<{i}>", "score": 1.0 + i / 8} for i in range(n))


def test_qk_page_shows_each_side_in_its_own_table_escaped():
    """Truth: hand-made parts, one prefix per list, labels with < and > that must read as text; the tables in the
    documented order: query writers, key writers, writer pairs, then query sources, key sources, source pairs."""
    from mechscope.lm.methods.attribution_graph_qk import QKAttribution

    qw, kw, qs, ks = _parts("qw", 2), _parts("kw", 3), _parts("qs", 1), _parts("ks", 2)
    wp = ({"query": "qw<0>", "key": "kw<1>", "score": 0.25},)
    sp = ({"query": "qs<0>", "key": "ks<1>", "score": -0.5}, {"query": "qs<0>", "key": "ks<0>", "score": 0.125})
    r = QKAttribution(2, 3, 7, 4, 1.5, 0.75, qs, ks, sp, qw, kw, wp, {}, 1e-6)
    p = Page(r._repr_html_())
    got = [[row[0] for row in t[1:]] for t in p.tables]
    assert got == [[x["label"] for x in qw], [x["label"] for x in kw], ["qw<0>"],
                   [x["label"] for x in qs], [x["label"] for x in ks], ["qs<0>", "qs<0>"]]  # fmt: skip
    assert [row[1:] for row in p.tables[5][1:]] == [["ks<1>", "-0.500"], ["ks<0>", "0.125"]]
    assert [t[0][0] for t in p.tables] == ["query writer", "key writer", "query", "query source", "key source", "query"]
    assert _h1(r._repr_html_()) == "QK attribution of head 2.3"


def test_sentences_keep_token_text_and_names_as_text():
    """Truth: html.parser's text of the page: the QK summary names the query source's label as written (_src_label
    puts a token's repr in it, e.g. embedding @0 '<s>' for a Llama BOS; it became a <s> tag), and the harvest pages
    their model, text, dataset and split names as given."""
    from mechscope.cnn.methods.sae import CnnSaeHarvest
    from mechscope.lm.methods.attribution_graph_qk import QKAttribution
    from mechscope.lm.methods.sae import LmSaeHarvest

    src = ({"id": "e0", "label": "embedding @0 '<s>'", "score": 1.0},)
    r = QKAttribution(0, 0, 1, 0, 1.0, 0.5, src, src, (), src, src, (), {}, 0.0)
    assert "query side embedding @0 '<s>'" in Doc(r._repr_html_()).joined()
    lm = LmSaeHarvest("m<b>", "<i>t", 32, 1, 0, 1500, 48000, 1234, (), 12.5, 3840.0, 2, 0, {})
    assert "m<b> on <i>t: 1,500 contexts" in Doc(lm._repr_html_()).joined()
    cnn = CnnSaeHarvest("r", "<u>d", "<s>", "h", (1,), 6, 15, 16, 4, "s", 3.0, 2.0, 5.0, 1, 0, {})
    assert "<u>d <s>: 6 images" in Doc(cnn._repr_html_()).joined()


def test_edge_paths_page_lists_each_source_and_the_first_twelve_heads():
    """Truth: hand-made rows and 14 heads: every row, the heads table cut at 12 (the renderer's documented cap), each
    via part written signed to 3 places."""
    from mechscope.lm.methods.edge_paths import EdgePaths

    rows = ({"source": "a", "edge": 0.5, "direct": 0.25, "via": {"1.0": 0.125, "0.1": 0.125}},
            {"source": "b", "edge": -0.75, "direct": -1.0, "via": {"1.1": 0.25}})  # fmt: skip
    heads = tuple({"head": f"{i // 4}.{i % 4}", "total": 1.0 - i / 16, "abs": 2.0 - i / 16} for i in range(14))
    p = Page(EdgePaths("logit 7", rows, heads, 1e-6, label="b")._repr_html_())
    assert p.table("source") == [
        {"source": "a", "edge": "0.500", "direct": "0.250", "via heads": "1.0: +0.125, 0.1: +0.125"},
        {"source": "b", "edge": "-0.750", "direct": "-1.000", "via heads": "1.1: +0.250"},
    ]
    got = p.table("head")
    assert [x["head"] for x in got] == [h["head"] for h in heads[:12]]
    assert [x["sum of |parts|"] for x in got] == [f"{h['abs']:.3f}" for h in heads[:12]]


def test_lm_harvest_and_transcoder_pages_state_their_own_fields():
    """Truth: the hand-made results' fields, each number distinct, formatted as the sentence writes them."""
    from mechscope.lm.methods.replacement_training import TrainedTranscoders
    from mechscope.lm.methods.sae import LmSaeHarvest

    stores = ({"name": "resid1", "rows": 1234, "width": 64, "shards": 3},)
    h = LmSaeHarvest("tiny", "zipf", 32, 1, 0, 1500, 48000, 1234, stores, 12.5, 3840.0, 2, 0, {})
    html = h._repr_html_()
    assert "tiny on zipf: 1,500 contexts of 32 tokens (48,000 tokens) in 12.5 s, 3,840 tokens/s, 2 process" in html
    assert Page(html).table("store") == [{"store": "resid1", "rows": "1234", "width": "64", "shards": "3"}]
    assert "Activation harvest of tiny" in html
    layers = ({"layer": 0, "explained_variance": 0.875, "l0": 12.0, "error_share": 0.125, "dead": 3, "seconds": 2.5},)
    t = TrainedTranscoders("tiny", {}, "zipf", 9, layers, 2.5)
    cells = Page(t._repr_html_()).table("layer")
    assert cells == [{"layer": "0", "explained_variance": "0.875", "l0": "12.000", "error_share": "0.125",
                      "dead": "3", "seconds": "2.500"}]  # fmt: skip


def test_cnn_harvest_and_dictionaries_pages_state_their_own_fields():
    """Truth: the hand-made results' fields, each number distinct, under their own headers."""
    from mechscope.cnn.methods.attribution_graph import TrainedDictionaries
    from mechscope.cnn.methods.sae import CnnSaeHarvest

    h = CnnSaeHarvest("runs/r1", "mnist", "train", "conv2.hook_post", (16, 5, 5), 600, 15000, 16, 4, "s", 3.0, 200.0,
                      5000.0, 1, 0, {})  # fmt: skip
    html = h._repr_html_()
    assert Page(html).table("hook") == [{"hook": "conv2.hook_post", "activation": "[16, 5, 5]", "images": "600",
                                         "rows": "15000", "width": "16", "shards": "4"}]  # fmt: skip
    assert "mnist train: 600 images in 3.0 s (200 images/s, 1 process(es))" in html
    assert "Activation harvest of runs/r1" in html
    st = ({"stage": "conv1", "explained_variance": 0.75, "l0": 4.0, "error_share": 0.25, "dead": 1, "d_sae": 32,
           "rows": 900, "seconds": 1.5},)  # fmt: skip
    cells = Page(TrainedDictionaries({}, st, 1.5)._repr_html_()).table("stage")
    assert cells == [{"stage": "conv1", "explained_variance": "0.750", "l0": "4.000", "error_share": "0.250",
                      "dead": "1", "d_sae": "32", "rows": "900", "seconds": "1.500"}]  # fmt: skip


@dataclass(frozen=True)
class _Plain:
    model: str
    value: float


def test_a_result_of_no_wing_shows_its_fields_escaped():
    """Truth: the fields page parsed: a type outside mechscope's wings has no renderer and shows its fields, a model
    name with markup as text."""
    from mechscope.core import show

    r = _Plain("<b>m</b>", 0.5)
    assert show.renderer_for(r) is None
    html = show.to_html(r)
    cells = {row["field"]: row["value"] for row in Page(html).table("field")}
    assert cells == {"model": "<b>m</b>", "value": "0.5"} and "<b>m</b>" not in html


def test_attribution_page_puts_each_rho_under_its_own_header():
    """Truth: `cnn attribute` prints each method's ρ "whole image | foreground pixels only" from randomisation and
    randomisation_on_input (last layer each); the table must show the same two under "ρ, whole image" and "ρ, non-zero
    pixels", the rows in the report's ranking and then the random order."""
    from mechscope.cnn.methods.attributed import AttributionResult
    from mechscope.cnn.methods.faithfulness import FaithfulnessReport, MethodFaithfulness

    m1 = MethodFaithfulness("saliency", 0.25, 0.75, {"conv1": 0.5, "conv2": 0.125}, {"conv1": 0.375, "conv2": 0.0625})
    m2 = MethodFaithfulness("gradcam", 0.5, 0.625, {"conv2": 0.875}, {"conv2": 0.75})
    rep = FaithfulnessReport([m2, m1], 0.4375, 0.5625, ["conv1", "conv2"], 12, 10, random_deletion_curve=None)
    r = AttributionResult("pred", "conv2", ("a", "b"), (0,), (0,), (0,), rep, None, {"occlusion": "needs <ReLU>"})
    html = r._repr_html_()
    rows = {x["method"]: x for x in Page(html).table("method")}
    assert list(rows) == [m.method for m in rep.ranking()] + ["random order"]
    for m, whole, fg in ((m1, "0.125", "0.062"), (m2, "0.875", "0.750")):
        assert (rows[m.method]["ρ, whole image"], rows[m.method]["ρ, non-zero pixels"]) == (whole, fg)
        assert rows[m.method]["deletion AUC"] == f"{m.deletion_auc:.3f}"
    assert rows["random order"]["insertion − deletion"] == "0.125" and "needs &lt;ReLU&gt;" in html


def test_featvis_page_puts_each_units_numbers_under_their_headers():
    """Truth: hand-made units with distinct activation, test-set maximum and ratio; the summary's counts as given."""
    from mechscope.cnn.methods.visualised import FeatvisResult, FeatvisSummary, UnitVis

    units = (UnitVis("conv1.hook_post", 0, 2.5, 1.25, 2.0, True, 0.0, (), (), None),
             UnitVis("logits", 1, 3.5, 0.75, None, True, 0.0, (), (), None, 1, 0.875))  # fmt: skip
    settings = {"steps": 7, "parameterisation": "pixel", "seed": 3, "transforms": "jitter <4>"}
    r = FeatvisResult(settings, FeatvisSummary(5, 2, 1.25, 1, 1, 2), units, ("zero", "one"))
    html = r._repr_html_()
    assert Page(html).table("layer") == [
        {"layer": "conv1.hook_post", "unit": "0", "on its visualisation": "2.500", "test-set max": "1.250",
         "ratio": "2.000", "classified as (logit units)": "—"},
        {"layer": "logits", "unit": "1", "on its visualisation": "3.500", "test-set max": "0.750", "ratio": "—",
         "classified as (logit units)": "one (0.88)"},
    ]  # fmt: skip
    assert "2 of 5 units reach" in html and "(median ratio 1.25); 1 never active" in html
    assert "1 of 2 logit visualisations" in html and "7 steps, pixel parameterisation, seed 3; jitter &lt;4&gt;" in html


def test_heads_result_keeps_its_ranking_and_patterns_open_and_its_table_takes_n():
    """Truth: docs/notebooks.md (".table(n=20)") and the result's own heads (scores["induction"].size for n=None);
    the fragment parsed: the two sections the renderer names stay open, every other later section is folded."""
    from tests.unit.test_sentences_heads import make_result

    r = make_result()
    html = r._repr_html_()
    folded = re.findall(r"<summary>(.*?)</summary>", html)
    shown = re.findall(r"<h2[^>]*>(.*?)</h2>", html)
    assert shown == ["Summary", "Heads ranked by induction score", "Attention patterns"] and len(folded) >= 3
    assert len(r.table(2)) == 2 and len(r.table(None)) == r.scores["induction"].size > 2


def test_a_scrub_result_shows_its_report_not_its_fields():
    """Truth: the page `lm discover` writes for the same result (report.discovery.scrub_page): the notebook shows its
    title and sections, not the fields table of a type without a renderer."""
    from mechscope.lm.report.discovery import scrub_page
    from tests.unit.test_lm_sae_scrub_pages_truths import lm_scrub

    r = lm_scrub()
    html = r._repr_html_()
    assert _h1(html) == _h1(scrub_page(r)) == "Causal scrubbing: length" and "<h2>Fields</h2>" not in html
