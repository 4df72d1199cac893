"""Circuit discovery on a CNN's channel graph: hand-built networks with planted circuits (a vertical-stroke and a
horizontal-stroke detector, each read out by one class) recovered by discovery, the edges' exactness, causal
scrubbing against what the construction predicts, refusals in one line."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from mechscope.cnn.methods.discovery import CNNDiscovery, compare_channels, discover, image_task, make_metric
from mechscope.cnn.methods.graph import CNNEdges
from mechscope.cnn.methods.scrubbing import feature_values, parse_hypothesis_file, scrub_hypothesis
from mechscope.cnn.models.cnn import CNN, CNNConfig
from mechscope.cnn.models.spec import walk
from mechscope.core.errors import MechscopeError
from mechscope.core.graphs import acdc, eap, eap_ig, edge_patching, score_circuit
from mechscope.core.scrub import scrub
from mechscope.core.torch_utils import evaluating


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Single-threaded: these models are tiny, and on a machine shared with other jobs two threads spinning for
    cores another process holds make these tests 5x slower (98 s against 21 s measured at load 4)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


STROKES = {  # the planted circuit: each stroke detector read out by its class
    ("input", "conv1.c0", "in"),
    ("input", "conv1.c1", "in"),
    ("conv1.c0", "conv2.c0", "in"),
    ("conv1.c1", "conv2.c1", "in"),
    ("conv2.c0", "logits", "in"),
    ("conv2.c1", "logits", "in"),
}
VERTICAL = {("input", "conv1.c0", "in"), ("conv1.c0", "conv2.c0", "in"), ("conv2.c0", "logits", "in")}


def stroke_cnn(**extra) -> CNN:
    """8×8 images; conv1.c0 detects vertical strokes, conv1.c1 horizontal ones, conv1.c2 is dead; conv2.c0 reads
    conv1.c0 and conv2.c1 reads conv1.c1; class 0 reads conv2.c0, class 1 reads conv2.c1."""
    cfg = CNNConfig(image_size=8, channels=(3, 2), kernel_size=3, padding=1, pool=1, n_classes=2, mean=0.0, std=1.0,
                    **extra)  # fmt: skip
    model = CNN(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        w1 = model.conv1.conv.weight
        w1[0, 0] = torch.tensor([[-1.0, 2.0, -1.0]] * 3)
        w1[1, 0] = w1[0, 0].T
        model.conv1.conv.bias[:2] = -0.5
        w2 = model.conv2.conv.weight
        w2[0, 0, 1, 1] = 1.0
        w2[1, 1, 1, 1] = 1.0
        model.fc.weight[0, :64] = 1.0 / 16
        model.fc.weight[1, 64:] = 1.0 / 16
    return model


def strokes(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Half vertical strokes (class 0), half horizontal (class 1), of seeded position, length and ink."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, 8, 8)
    y = torch.arange(n) % 2
    for i in range(n):
        at, start = (int(v) for v in torch.randint(1, 7, (2,), generator=g))
        length = int(torch.randint(3, 8 - start + 1, (1,), generator=g)) if start < 6 else 2
        ink = 0.6 + 0.4 * float(torch.rand(1, generator=g))
        if y[i] == 0:
            x[i, 0, start : start + length, at] = ink
        else:
            x[i, 0, at, start : start + length] = ink
    return x, y


def test_the_adapter_gives_the_models_logits_and_the_graph_follows_the_convolution():
    model = stroke_cnn()
    x, y = strokes()
    edges = CNNEdges(walk(model))
    torch.testing.assert_close(edges.forward(x)[0], model(x), rtol=0, atol=0)
    assert (edges.graph.n_edges, edges.graph.n_senders) == (3 + 6 + 2, 6)
    assert float((model(x).argmax(1) == y).double().mean()) == 1.0  # the planted detectors classify every image


@pytest.mark.parametrize("method", ["acdc", "eap", "eap-ig"])
def test_discovery_recovers_the_planted_stroke_circuit(method):
    model = stroke_cnn()
    x, y = strokes()
    task = image_task(x, y, metric="logit_diff", n=64, seed=0)
    res = discover(walk(model), task, method, threshold=1e-9 if method == "acdc" else None, size=6, curve=False)
    if method == "acdc":
        assert set(res.circuit.edges) == STROKES and len(res.scores.kept) == 6
    s = score_circuit(res.scores, STROKES)
    assert s.edge_auroc == 1.0 and s.node_recall_at_size == 1.0 and s.edge_recall == 1.0


def test_a_kl_to_the_clean_run_finds_the_planted_circuit_too():
    model = stroke_cnn()
    x, y = strokes()
    with evaluating(model):
        task = image_task(x, y, metric="kl", n=64, seed=0, model=model)
        res = discover(walk(model), task, "acdc", threshold=1e-9, curve=False)
    assert res.scores.metric_clean == pytest.approx(0.0, abs=1e-12) and res.scores.metric_corrupted > 0.1
    assert set(res.circuit.edges) == STROKES and task.better == "lower"
    with pytest.raises(MechscopeError, match="needs the model"):
        image_task(x, y, metric="kl")
    with pytest.raises(MechscopeError, match="gradient is 0 at the clean run"):
        discover(walk(model), task, "eap", curve=False)


def test_other_class_corruption_pairs_every_image_with_another_class():
    x, y = strokes()
    mixed = image_task(x, y, metric="logit_diff", n=64, seed=0)
    other = image_task(x, y, metric="logit_diff", n=64, seed=0, corrupt="other-class")
    assert torch.equal(other.clean, mixed.clean) and other.settings["corrupt"] == "other-class"
    donor_class = [int(y[(x == c).flatten(1).all(1)][0]) for c in other.corrupted]  # each donor found among x
    assert all(d != int(lab) for d, lab in zip(donor_class, other.labels, strict=True))
    assert "another class" in other.description and mixed.settings["corrupt"] == "resample"
    assert torch.equal(other.corrupted, image_task(x, y, metric="logit_diff", n=64, seed=0,
                                                   corrupt="other-class").corrupted)  # seeded  # fmt: skip


def test_one_class_has_its_own_circuit():
    model = stroke_cnn()
    x, y = strokes()
    task = image_task(x, y, target=0, metric="logit", n=32, seed=0)  # corrupted: horizontal strokes
    res = discover(walk(model), task, "acdc", threshold=1e-9, n_random=2)
    assert set(res.circuit.edges) == VERTICAL
    c = compare_channels(res.scores, walk(model), [0])
    assert c["discovered_top"] == [0] and c["auroc"] == 1.0 and res.faithfulness.faithfulness[-1] == 1.0
    back = CNNDiscovery.from_dict(json.loads(json.dumps(res.to_dict())))
    assert back.circuit.edges == res.circuit.edges and back.scores.kept == res.scores.kept


def test_edges_carry_the_convolution_through_a_batchnorm_exactly():
    torch.manual_seed(0)
    model = CNN(CNNConfig(image_size=10, channels=(3, 4), kernel_size=3, pool=2, n_classes=3, batchnorm=True))
    model = model.eval()
    with torch.no_grad():
        for bn in (model.conv1.norm, model.conv2.norm):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
    x = torch.rand(6, 1, 10, 10)
    metric = lambda out: torch.log_softmax(out, -1)[:, 1].mean()  # noqa: E731
    edges = CNNEdges(walk(model))
    exact = edge_patching(edges, x, metric=metric, ablation="zero")
    with torch.no_grad():
        base = float(metric(model(x)))
    for i, j in [(0, 1), (2, 3)]:  # zeroing edge conv1.ci -> conv2.cj is zeroing the kernel W2[j, i]
        saved = model.conv2.conv.weight[j, i].clone()
        with torch.no_grad():
            model.conv2.conv.weight[j, i] = 0
            want = float(metric(model(x))) - base
            model.conv2.conv.weight[j, i] = saved
        assert exact.scores[edges.graph.edge_id(f"conv1.c{i}", f"conv2.c{j}", "in")] == pytest.approx(want, abs=1e-6)
    lin = lambda out: out[:, 2].mean()  # noqa: E731  (the read-out is linear: EAP is exact on its edges)
    c = torch.rand(6, 1, 10, 10)
    est, ex = eap(edges, x, c, metric=lin), edge_patching(edges, x, c, metric=lin)
    direct = [e for e, (_, n, _) in enumerate(edges.graph.edges) if n == "logits"]
    np.testing.assert_allclose(est.scores[direct], ex.scores[direct], rtol=1e-4, atol=1e-6)
    assert eap_ig(edges, x, c, metric=metric, steps=2).scores.shape == (edges.graph.n_edges,)


def test_scrubbing_recovers_what_the_construction_predicts():
    model = stroke_cnn()
    x, y = strokes(64)
    edges = CNNEdges(walk(model))
    accuracy = make_metric("accuracy", y, None)
    whole = scrub(edges, x, metric=accuracy, hypothesis={"claims": [{"name": "all", "edges": ["*"]}]}, samples=2)
    assert whole.recovered == pytest.approx(1.0)
    # "only the vertical path matters": class 1's logit then comes from a random image
    hyp = {"claims": [{"name": "vertical", "edges": [f"{a}->{b}" for a, b, _ in sorted(VERTICAL)]}]}
    res = scrub(edges, x, metric=accuracy, hypothesis=hyp, samples=40, seed=1, sampling="sender", breakdown=False)
    with torch.no_grad():
        logits = model(x)
    l0, l1 = logits[:, 0], logits[:, 1]
    right = lambda a, b: ((a[:, None] >= b[None, :]) == (y[:, None] == 0)).double()  # noqa: E731  (argmax: ties to 0)
    scrubbed = float(right(l0, l1).mean())  # l0 from the image itself, l1 from any image
    both = float(((l0[:, None, None] >= l1[None, None, :]) == (y[None, :, None] == 0)).double().mean())
    assert res.metric_scrubbed == pytest.approx(scrubbed, abs=0.03)
    assert res.metric_random == pytest.approx(both, abs=0.03)
    assert res.recovered == pytest.approx((scrubbed - both) / (1.0 - both), abs=0.08)
    # the class is all the read-out needs: resampling the path from images of the same class changes nothing
    cls = {"claims": [{"name": "class", "edges": ["*"], "feature": "class"}]}
    same = scrub(edges, x, metric=accuracy, hypothesis=cls, features={"class": y}, samples=3, sampling="sender")
    assert same.recovered == pytest.approx(1.0)


def test_features_and_hypothesis_files():
    x, y = strokes(16)
    assert torch.equal(feature_values("class", x, y, y), y)
    assert set(feature_values("central_column", x, y, y).tolist()) <= {0, 1, 2, 3}
    with pytest.raises(MechscopeError, match="unknown feature"):
        feature_values("colour", x, y, y)
    good = {"run": "r", "claims": [{"name": "a", "edges": ["input->conv1.*"], "feature": "class"}], "target": 0}
    assert parse_hypothesis_file(good).target == 0
    for bad, match in [({**good, "model": "x"}, "unknown key"), ({**good, "metric": "f1"}, "unknown metric"),
                       ({**good, "claims": [{"name": "a", "edges": ["*"], "feature": "mood"}]}, "unknown feature"),
                       ({**good, "target": -1}, "target"),
                       ({**good, "data": {"n": 1}}, "data.n must be an integer from 2 upwards"),
                       ({**good, "data": {"seed": 2**64}}, "data.seed must be an integer from 0 to 2"),
                       ({**good, "seed": -1}, "seed must be an integer from 0"),
                       ({**good, "samples": 10**6}, "samples must be an integer from 1 to 100,000"),
                       ({**good, "metric": ["accuracy"]}, "unknown metric"),  # unhashable: a TypeError traceback
                       ({**good, "claims": [{"name": "a", "edges": ["*"], "feature": ["class"]}]}, "unknown feature"),
                       ({**good, "claims": [{"name": "a", "edges": ["*"], "feature": {"a": 1}}]}, "unknown feature"),
                       ({**good, "metric": "detect", "target": None}, "'detect' needs a target class \\('target'\\)"),
                       ]:  # fmt: skip
        with pytest.raises(MechscopeError, match=match) as e:
            parse_hypothesis_file(bad)
        assert "\n" not in str(e.value)
    spec = parse_hypothesis_file({"run": "r", "claims": [{"name": "a", "edges": ["conv9.c0->logits"]}]})
    with pytest.raises(MechscopeError, match="unknown component"):
        scrub_hypothesis(walk(stroke_cnn()), x, y, spec)
    spec = parse_hypothesis_file({"run": "r", "claims": [{"name": "a", "path": ["logits", "conv2.c0"]}]})
    with pytest.raises(MechscopeError, match="no edge"):
        scrub_hypothesis(walk(stroke_cnn()), x, y, spec)
    good_spec = parse_hypothesis_file({"run": "r", "claims": [{"name": "a", "edges": ["*"]}]})
    for call, match in [  # each ran, or failed inside torch, before the inputs were checked
        (lambda: scrub_hypothesis(walk(stroke_cnn()), x, y[: len(y) // 2], good_spec), "one label per image"),
        (lambda: scrub_hypothesis(walk(stroke_cnn()), (x * 255).to(torch.uint8), y, good_spec), "floating-point"),
        (lambda: scrub_hypothesis(stroke_cnn(), x, y, good_spec), "takes the model's spec"),
        (lambda: scrub_hypothesis(walk(stroke_cnn()), x, y, {"claims": []}), "expected a HypothesisSpec"),
        (lambda: image_task(x, y - 1), "labels must be class indices 0 or more, got -1"),
        (lambda: walk("model", (1, 8, 8)), "walk takes a torch nn.Module, got str"),
        (lambda: walk(stroke_cnn(), (1, 8.0, 8)), "must be positive integers"),
    ]:
        with pytest.raises(MechscopeError, match=match) as e:
            call()
        assert "\n" not in str(e.value)


@pytest.mark.parametrize(("extra", "match"), [({"hidden": 8}, "linear read-out"), ({"activation": "solu"}, "mixes")])
def test_models_whose_channels_are_not_nodes_are_refused_in_one_line(extra, match):
    with pytest.raises(MechscopeError, match=match) as e:
        CNNEdges(walk(CNN(CNNConfig(image_size=10, channels=(2, 2), kernel_size=3, pool=1, **extra))))
    assert "\n" not in str(e.value)


def test_bad_settings_are_one_line():
    model = stroke_cnn()
    x, y = strokes(16)
    for call, match in [
        (lambda: image_task(x, y, metric="f1"), "unknown metric"),
        (lambda: image_task(x, y, target=5, n_classes=2), "class 5"),
        (lambda: image_task(x, y, metric="detect"), "target"),
        (lambda: image_task(x, y, seed=2**64), "seed must be an integer from 0 to 2"),  # torch's overflow
        (lambda: image_task(x, y, seed=1.5), "seed must be an integer"),
        (lambda: image_task(x, y, target="1"), "class '1' outside"),
        (lambda: image_task(x, y, target=True), "class True outside"),
        (lambda: image_task(x, y, metric=["logit"]), "unknown metric"),
        (lambda: image_task(x, y[:10]), "one label per image"),
        (lambda: image_task(x, y, n_classes=1), "does not cover the labels"),
        (lambda: discover(walk(model), image_task(x, y, metric="accuracy"), "eap", curve=False), "differentiable"),
        (lambda: discover(walk(model), image_task(x, y), "acdc", threshold=float("nan"), curve=False), "threshold"),
        (lambda: discover(walk(model), image_task(x, y), "gradcam", curve=False), "unknown method"),
    ]:
        with pytest.raises(MechscopeError, match=match) as e:
            call()
        assert "\n" not in str(e.value)


def test_eap_on_the_strokes_is_first_order_in_the_linear_part():
    model = stroke_cnn()
    x, y = strokes()
    edges = CNNEdges(walk(model))
    metric = make_metric("logit", y, None)
    c = x.roll(1, 0)
    np.testing.assert_allclose(
        eap(edges, x, c, metric=metric).scores[-2:], edge_patching(edges, x, c, metric=metric).scores[-2:], atol=1e-6
    )
    assert acdc(edges, x, c, metric=metric, threshold=1e-9).forward_passes <= 2 + edges.graph.n_edges


def test_the_circuit_layout_untangles_a_column_and_keeps_edges_off_other_nodes():
    from mechscope.core.render.layout import circuit_layout, clearance

    nodes = ["input", *(f"conv1.c{i}" for i in range(12)), *(f"conv2.c{i}" for i in range(12)), "logits"]
    layer = {"input": 0, "logits": 3} | {n: int(n[4]) for n in nodes if n.startswith("conv")}
    edges = [("input", f"conv1.c{i}") for i in range(12)] + [(f"conv1.c{i}", f"conv2.c{11 - i}") for i in range(12)]
    edges += [(f"conv2.c{i}", "logits") for i in range(12)]
    lay = circuit_layout(nodes, edges, layer.__getitem__)
    xs = {layer[n]: set() for n in nodes}
    for n in nodes:
        xs[layer[n]].add(lay.pos[n][0])
    assert all(len(v) == 1 for v in xs.values()) and sorted(xs, key=lambda k: min(xs[k])) == [0, 1, 2, 3]
    for i in range(12):  # the reversed wiring drawn as parallel lines: each pair at one height
        assert lay.pos[f"conv1.c{i}"][1] == pytest.approx(lay.pos[f"conv2.c{11 - i}"][1])
    for a, b in edges:
        others = [p for n, p in lay.pos.items() if n not in (a, b)]
        assert clearance(lay.pos[a], lay.pos[b], lay.bends[(a, b)], others) > lay.radius


def test_the_summary_warns_where_the_scores_call_for_it():
    """EAP whose largest score is a sliver of the clean-to-corrupted change (a saturated metric), and circuit edges
    whose scores are float rounding: each gets a measured caveat; ordinary scores get none."""
    from types import SimpleNamespace as NS

    from mechscope.core.render.discovery import _caveats

    class Circuit(list):
        @property
        def scores(self):
            return [s for _, s in self]

    def result(method, scores, clean, corrupted, kept):
        return NS(method=method, scores=NS(scores=np.asarray(scores), metric_clean=clean, metric_corrupted=corrupted),
                  circuit=Circuit((i, scores[i]) for i in kept))  # fmt: skip

    saturated = _caveats(result("eap", [9e-4, -2e-4, 1e-5], -0.0003, -16.03, [0, 1]))
    assert len(saturated) == 1 and saturated[0].startswith("EAP's largest |score| is 0.0009, 0.01% of the change")
    assert _caveats(result("eap-ig", [9e-4, -2e-4, 1e-5], -0.0003, -16.03, [0, 1])) == []
    ties = _caveats(result("acdc", [1.25, -0.8, 4e-12, 0.0], 0.67, -0.58, [0, 1, 2, 3]))
    assert ties == ["2 of the circuit's 4 edges score at rounding level (|score| at most 1e-06 of the largest): which "
                    "of those enter the circuit is arbitrary."]  # fmt: skip
    assert _caveats(result("eap", [0.5, -0.2, 0.1], 0.9, -0.1, [0, 1])) == []
    # EAP-IG scored tracr's reverse chain 1e-5 to 1e-13 where edge patching measures -0.48 on each edge: from a
    # gradient a rounding-level score is not called an effect-free tie, and the measuring methods are named
    (grad,) = _caveats(result("eap-ig", [1.25, -0.8, 4e-12, 0.0], 0.67, -0.58, [0, 1, 2, 3]))
    assert grad.startswith("2 of the circuit's 4 edges score at rounding level") and "not a measurement" in grad
    assert grad.endswith("--method edge-patching or acdc ablate each edge and measure it.")


def test_scrub_rows_print_rounding_sds_as_zero():
    from mechscope.core.render.discovery import _pm

    assert _pm(0.9655, 1.24e-16) == "0.9655 ± 0" and _pm(0.2894, 0.018) == "0.2894 ± 0.018"


def test_every_metric_of_either_wing_says_what_it_measures_and_in_what_unit():
    from mechscope.cnn.methods.discovery import METRICS
    from mechscope.core.render.discovery import METRIC_WORDS, metric_words
    from mechscope.lm.methods.tasks import CATEGORICAL_METRICS, INDUCTION_METRICS, NUMERICAL_METRICS

    every = set(METRICS) | set(INDUCTION_METRICS) | set(CATEGORICAL_METRICS) | set(NUMERICAL_METRICS)
    assert every == set(METRIC_WORDS)
    assert metric_words("loss", "lower") == "loss (cross-entropy of the right label, in nats; lower is better)"
    assert metric_words("custom", None) == "custom (direction unknown)"


def test_a_notebook_users_slips_are_one_line():
    """What a Python user gets wrong gives a MechscopeError, not a circuit of NaN scores or an error from deep inside
    (each was one: a circuit; torch's dtype RuntimeError; 2-D labels kept; TypeError; AttributeError twice)."""
    spec = walk(stroke_cnn(), (1, 8, 8))
    x, y = strokes(32)
    for images, labels, said in (
        (torch.full_like(x, float("nan")), y, "image_task: 2048 pixel(s) not finite (nan in image 0)"),
        ((x * 255).to(torch.uint8), y, "images must be a floating-point tensor [N, C, H, W] in the model's own"),
        (x.tolist(), y, "images must be a floating-point tensor [N, C, H, W] in the model's own input range, got list"),
        (x, y[:, None], "image_task: labels shaped [32, 1]; expected one integer label per image"),
    ):
        with pytest.raises(MechscopeError, match=re.escape(said)):
            image_task(images, labels, target=1, n=4)
    task = image_task(x, y, target=1, n=4)
    with pytest.raises(MechscopeError, match=r"discover takes the model's spec, walk\(model, image_shape\), not a CNN"):
        discover(spec.model, task, "eap")
    with pytest.raises(MechscopeError, match="discover takes an image_task"):
        discover(spec, (x, y), "eap")
    double = discover(spec, image_task(x.double(), y, target=1, n=4), "eap", curve=False, n_random=0)  # float32 now
    assert double.circuit == discover(spec, task, "eap", curve=False, n_random=0).circuit
