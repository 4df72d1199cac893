"""Causal scrubbing and input validation against outside truths: a hand-built two-layer model whose scrubbed loss is
computed by hand (Chan et al. 2022: a claimed edge carries its sender's *treeified* value, not its clean one), the
dense residual graph's edges counted by hand, CNN features recomputed with numpy, and the documented rules of the
hypothesis files and of :mod:`mechscope.core.validate` (one-line errors, ranges as their docstrings state them)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mechscope.core.errors import MechscopeError
from mechscope.core.scrub import parse_hypothesis, scrub
from tests.graphs.toys import ResidualToy, _head, planted_residual

# ---- core/scrub.py --------------------------------------------------------------------------------------------


def _relay():
    """embed (a, b) -> A = blocks.0.h0 (reads a, writes dim 2) -> G = blocks.1.h0 (reads dim 2, writes dim 3) ->
    logits (reads dim 3): y = a, linear. Rows: every (a, b) in {0, 1}² repeated 100 times; metric: MSE against a."""
    d = 4
    W_E = torch.zeros(2, d, dtype=torch.float64)
    W_E[0, 0] = W_E[1, 1] = 1.0
    heads = [[_head(d, q=[(0, 1.0)], o=[(2, 1.0)])], [_head(d, q=[(2, 1.0)], o=[(3, 1.0)])]]
    W_U = torch.zeros(d, 1, dtype=torch.float64)
    W_U[3, 0] = 1.0
    ab = torch.tensor([[a, b] for a in (0, 1) for b in (0, 1)], dtype=torch.float64).repeat(100, 1)
    return ResidualToy(W_E, heads, W_U), ab, lambda out: ((out[:, 0] - ab[:, 0]) ** 2).mean()


@pytest.mark.parametrize("sampling", ["edge", "sender"])
def test_a_claimed_edge_carries_its_senders_treeified_value_not_its_clean_one(sampling):
    """Truth by hand (Chan et al. 2022's treeification). Claim every edge into G and into the logits as they are,
    leave A's inputs unclaimed: A then reads a random row's a', G relays it, y = a'. MSE against a is
    P(a' != a) = 1/2 (± 0.025 per resampling of 400 rows), as fully resampled: recovered ≈ 0. Taking G's clean
    value because its own inputs are all claimed (ignoring that its sender A is resampled) would give MSE 0."""
    model, ab, mse = _relay()
    claimed = ["embed->blocks.1.h0", "blocks.0.h0->blocks.1.h0", "embed->logits", "blocks.0.h0->logits",
               "blocks.1.h0->logits"]  # fmt: skip
    res = scrub(model, ab, metric=mse, hypothesis={"claims": [{"name": "relay", "edges": claimed}]}, samples=10,
                seed=3, sampling=sampling)  # fmt: skip
    assert res.metric_clean == 0.0
    assert res.metric_random == pytest.approx(0.5, abs=0.05)
    assert res.metric_scrubbed == pytest.approx(0.5, abs=0.05)
    assert res.recovered == pytest.approx(0.0, abs=0.15)


def test_a_glob_without_a_slot_matches_every_slot():
    """Truth by hand: the dense residual graph of planted_residual (embed, then 3 layers of 2 components with slots q
    and k) has, into blocks.1.h0, one edge per earlier sender (embed, blocks.0.h0, blocks.0.h1) and slot: 6 edges.
    The module docstring: a name without a slot matches every slot."""
    g = planted_residual().graph
    hyp = parse_hypothesis({"claims": [{"name": "into", "edges": ["*->blocks.1.h0"]}]}, g)
    want = {(s, "blocks.1.h0", slot) for s in ("embed", "blocks.0.h0", "blocks.0.h1") for slot in ("q", "k")}
    assert set(hyp.claims[0].edges) == want and len(hyp.claims[0].edges) == 6


# ---- hypothesis files (documented rules) ---------------------------------------------------------------------


def test_hypothesis_files_run_the_breakdown_unless_told_not_to():
    """Truth: the documented default (hypothesis_file_sampling: "breakdown (true by default)"), for both wings."""
    from mechscope.cnn.methods.scrubbing import parse_hypothesis_file as cnn_file
    from mechscope.lm.methods.scrubbing import parse_hypothesis_file as lm_file

    claims = [{"name": "a", "edges": ["*"]}]
    assert cnn_file({"run": "r", "claims": claims}).breakdown is True
    assert lm_file({"model": "m", "claims": claims}).breakdown is True
    assert cnn_file({"run": "r", "claims": claims, "breakdown": False}).breakdown is False


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"token_range": [1, 5, 9]}, r"data\.token_range must be \[low, high\)"),
        ({"token_range": [1]}, r"data\.token_range"),
        ({"distinct": "yes"}, r"data\.distinct must be true or false"),
        ({"distinct": 1}, r"data\.distinct must be true or false"),
    ],
)
def test_lm_hypothesis_data_settings_are_checked(data, match):
    """Truth: the file's documented layout (token_range is a pair [low, high), distinct a JSON boolean); each refusal
    is one line."""
    from mechscope.lm.methods.scrubbing import parse_hypothesis_file

    good = {"model": "m", "claims": [{"name": "a", "edges": ["embed->unembed"]}]}
    with pytest.raises(MechscopeError, match=match) as e:
        parse_hypothesis_file({**good, "data": data})
    assert "\n" not in str(e.value)


def test_cnn_features_are_quartiles_of_the_central_column_and_of_the_ink():
    """Truth: numpy on planted images. Eight 7×7 images with distinct ink c_i in the central column (column 3) and
    r_i in the central row (outside column 3): 'central_column' is the quartile of c (np.quantile, then
    np.searchsorted: q[k-1] < v <= q[k] is quartile k), 'ink' the quartile of c + r, 'prediction' the predictions
    given, not the labels."""
    from mechscope.cnn.methods.scrubbing import feature_values

    c = np.array([3.0, 1.0, 4.0, 1.5, 5.0, 9.0, 2.0, 6.0])
    r = np.array([8.0, 0.5, 7.0, 6.5, 0.25, 0.1, 5.5, 0.2])
    x = torch.zeros(8, 1, 7, 7, dtype=torch.float64)
    x[:, 0, 0, 3] = torch.as_tensor(c)
    x[:, 0, 3, 0] = torch.as_tensor(r)
    quart = lambda v: np.searchsorted(np.quantile(v, [0.25, 0.5, 0.75]), v, side="left")  # noqa: E731
    y, pred = torch.zeros(8, dtype=torch.long), torch.arange(8) % 3
    assert feature_values("central_column", x, y, pred).tolist() == quart(c).tolist()
    assert sorted(set(quart(c).tolist())) == [0, 1, 2, 3]
    assert feature_values("ink", x, y, pred).tolist() == quart(c + r).tolist()
    assert torch.equal(feature_values("prediction", x, y, pred), pred)


def test_cnn_scrub_refuses_more_images_than_given_and_a_class_past_the_last():
    """Truth: the documented refusals (data.n beyond the test images; a target outside 0..n_classes - 1), one line
    each, on the hand-built stroke CNN (2 classes) and 16 stroke images."""
    from mechscope.cnn.methods.scrubbing import parse_hypothesis_file, scrub_hypothesis
    from mechscope.cnn.models.spec import walk
    from tests.unit.test_discovery_cnn import stroke_cnn, strokes

    x, y = strokes(16)
    claims = [{"name": "a", "edges": ["*"]}]
    for extra, match in [({"data": {"n": 20}}, r"data\.n is 20: there are 16 test images"),
                         ({"data": {"n": 8}, "target": 2}, r"target class 2 outside 0\.\.1")]:  # fmt: skip
        spec = parse_hypothesis_file({"run": "r", "claims": claims, "samples": 1, **extra})
        with pytest.raises(MechscopeError, match=match) as e:
            scrub_hypothesis(walk(stroke_cnn()), x, y, spec)
        assert "\n" not in str(e.value)


# ---- core/validate.py (documented rules) ----------------------------------------------------------------------


def test_field_ranges_are_inclusive_and_lists_are_checked_item_by_item():
    """Truth: field's docstring ("within lo..hi"), so the bounds themselves are accepted; a list of integers or of
    numbers is checked item by item against both bounds; an empty list is not a number; choices are enforced."""
    from mechscope.core.validate import field

    assert field({"x": 1}, "x", "int", "c.json", lo=1, hi=3) == 1
    assert field({"x": 3}, "x", "int", "c.json", lo=1, hi=3) == 3
    assert field({"x": [1, 3]}, "x", "ints", "c.json", lo=1, hi=3) == [1, 3]
    for kind, value, kw in [("int", 4, {"lo": 1, "hi": 3}), ("int", 0, {"lo": 1}), ("ints", [1, 99], {"hi": 10}),
                            ("ints", [0, 2], {"lo": 1}), ("numbers", [], {}), ("numbers", [1.0, 99.0], {"hi": 10}),
                            ("str", "gelu", {"choices": ("relu", "tanh")})]:  # fmt: skip
        with pytest.raises(MechscopeError, match=r"c\.json: field 'x' is .*; expected") as e:
            field({"x": value}, "x", kind, "c.json", **kw)
        assert "\n" not in str(e.value)


def test_numbers_are_finite_and_json_is_the_standards():
    """Truth: IEEE 754 (NaN and infinity are not finite numbers) and RFC 8259 (NaN and Infinity are not JSON,
    though Python's json module reads them)."""
    from mechscope.core.validate import field, strict_loads

    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(MechscopeError, match="expected a finite number"):
            field({"x": bad}, "x", "number", "c.json")
        with pytest.raises(MechscopeError, match="expected a finite number or a list"):
            field({"x": [1.0, bad]}, "x", "numbers", "c.json")
    for text in ('{"a": NaN}', "[Infinity]", "-Infinity"):
        with pytest.raises(ValueError):
            strict_loads(text)
    assert strict_loads('{"a": 1.5e3}') == {"a": 1500.0}


def test_integer_and_seed_checks_hold_their_documented_bounds():
    """Truth: the docstrings. check_int: an int (not a float, not a bool) within [low, high], bounds included;
    check_seed: [0, 2**63 - 1]; check_lr: (0, 10]; check_count: [low, high], 10**7 by default."""
    from mechscope.core.validate import check_count, check_int, check_lr, check_seed

    assert check_int(100, "n", 1, 100) == 100 and check_int(np.int64(1), "n", 1, 100) == 1
    for bad in (101, 0, 2.0, 2.5, True):
        with pytest.raises(MechscopeError, match="n must be an integer"):
            check_int(bad, "n", 1, 100)
    check_seed(2**63 - 1)
    torch.Generator().manual_seed(2**63 - 1)  # what the bound is for: torch takes it
    with pytest.raises(MechscopeError, match="2\\*\\*63 - 1"):
        check_seed(2**63)
    check_lr(10.0)
    for bad in (0, 0.0, 10.5, math.nan):
        with pytest.raises(MechscopeError, match="--lr must be in"):
            check_lr(bad)
    check_count(10**7, "steps")
    with pytest.raises(MechscopeError, match="steps must be at most 10,000,000"):
        check_count(10**7 + 1, "steps")


def test_scrub_refuses_a_fractional_sample_count(tmp_path):
    """Truth: scrub's documented argument (samples: an integer count of resamplings); 2.5 was read as 2."""
    from tests.graphs.toys import two_paths

    model, ab, mse, _ = two_paths()
    with pytest.raises(MechscopeError, match="samples must be an integer, got 2.5"):
        scrub(model, ab, metric=mse, hypothesis={"claims": []}, samples=2.5)


def test_text_lists_refuse_empty_items_and_indices_take_exactly_n():
    """Truth: the docstrings: name_list refuses an empty item ("a,,b", a trailing comma) rather than dropping it;
    indices takes exactly ``n`` digit groups ("5.1.2" is not a layer.head pair)."""
    from mechscope.core.validate import indices, name_list

    assert name_list(" relu, gelu ", "acts") == ("relu", "gelu")
    for text in ("a,,b", "a,b,"):
        with pytest.raises(MechscopeError, match="acts: item"):
            name_list(text, "acts")
    assert indices("5.1") == (5, 1)
    for text in ("5.1.2", "5", "-0.3"):
        with pytest.raises(ValueError):
            indices(text)


def test_a_feature_draws_uniformly_within_its_group_including_the_last_member():
    """Truth by hand: rows in pairs (a = 0, 1; the feature is the pair's index), every edge claimed with that
    feature, so each node reads a uniform member of its row's pair: y = a' with a' a fair coin, independent of a.
    Metric MSE(y, a) + mean(y): clean 0 + 1/2, fully resampled 1/2 + 1/2, scrubbed also 1/2 + 1/2 = 1 (a draw that
    never picked a group's last member would give y = 0 always: 1/2 + 0)."""
    model, _, _ = _relay()
    a = torch.tensor([0.0, 1.0] * 200, dtype=torch.float64)
    x = torch.stack([a, torch.zeros_like(a)], 1)
    metric = lambda out: ((out[:, 0] - a) ** 2).mean() + out[:, 0].mean()  # noqa: E731
    hyp = {"claims": [{"name": "pairs", "edges": [list(e) for e in model.graph.edges], "feature": "pair"}]}
    res = scrub(model, x, metric=metric, hypothesis=hyp, features={"pair": torch.arange(400) // 2}, samples=10,
                seed=5, breakdown=False)  # fmt: skip
    assert res.metric_clean == pytest.approx(0.5, abs=1e-12)
    assert res.metric_scrubbed == pytest.approx(1.0, abs=0.06)


def test_max_forwards_is_the_exact_number_of_treeified_passes():
    """Truth by hand: planted_residual with every edge claimed on the row feature treeifies into one pass per node
    instance: logits 1, each layer-2 head 1, each layer-1 head 1 + 2·2 = 5, each layer-0 head 1 + 2·2·5 + 2·2 = 25:
    1 + 2 + 10 + 50 = 63 passes for the scrubbed output. max_forwards = 63 suffices; 62 is refused."""
    model, clean = planted_residual("tanh"), torch.randn(16, 4, generator=torch.Generator().manual_seed(0),
                                                          dtype=torch.float64)  # fmt: skip
    metric = lambda out: out[:, 0].mean()  # noqa: E731
    hyp = {"claims": [{"name": "all", "edges": [list(e) for e in model.graph.edges], "feature": "row"}]}
    kw = {"metric": metric, "hypothesis": hyp, "features": {"row": torch.arange(16)}, "samples": 1, "breakdown": False}
    res = scrub(model, clean, max_forwards=63, **kw)
    assert res.forward_passes == 1 + 1 + 63
    with pytest.raises(MechscopeError, match="more than 62 forward passes"):
        scrub(model, clean, max_forwards=62, **kw)
