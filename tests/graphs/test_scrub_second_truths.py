"""Causal scrubbing, second pass, against outside truths: hand-built models where a hypothesis is exactly true
(recovered 100%, scrubbed metric exactly the clean one) or exactly false (the scrubbed metric computed by hand),
Chan et al. 2022's treeified resampling with per-position features, donors drawn by a plain loop with the same seed,
the sample sd of two values by its formula, the hypothesis layout the module docstring documents, and the language
wing's hypothesis files (documented defaults: scrub's own signature; what the file says is what is run)."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

from mechscope.core.errors import MechscopeError
from mechscope.core.scrub import _Feature, parse_hypothesis, scrub
from tests.graphs.test_scrub_validate_truths import _relay
from tests.graphs.toys import two_paths

A_PATH, B_PATH = ["embed", "blocks.0.h0<q>", "logits"], ["embed", "blocks.0.h1<q>", "logits"]


# ---- per-position features (the language wing's token features) -------------------------------------------------


def _positional_relay(n: int = 120, p: int = 3):
    """The relay y = a (tests/graphs/test_scrub_validate_truths._relay) applied at every position: inputs [n, p, 2]
    with a a seeded fair bit per (row, position), b = 0; metric MSE(y, a) over rows and positions."""
    model, _, _ = _relay()
    a = torch.randint(0, 2, (n, p), generator=torch.Generator().manual_seed(11)).to(torch.float64)
    x = torch.stack([a, torch.zeros_like(a)], -1)
    return model, x, a, lambda out: ((out[..., 0] - a) ** 2).mean()


def _every_edge(model, feature):
    return {"claims": [{"name": "all", "edges": [list(e) for e in model.graph.edges], "feature": feature}]}


@pytest.mark.parametrize("sampling", ["edge", "sender"])
def test_a_true_positional_claim_recovers_everything_exactly(sampling):
    """Truth by hand: y at (row, position) is a there. Every edge claimed with the feature "a at this position": each
    node at each position reads a donor row that has the same a *at that same position*, so y = a everywhere and
    the scrubbed MSE is exactly 0 = clean; recovered exactly 1. A donor agreeing at another position, the wrong
    row, or the right row read at another position, would give y = a' ≠ a on about half the cells."""
    model, x, a, mse = _positional_relay()
    res = scrub(model, x, metric=mse, hypothesis=_every_edge(model, "a"), features={"a": a}, samples=3, seed=2,
                sampling=sampling)  # fmt: skip
    assert res.metric_clean == 0.0 and res.metric_scrubbed == 0.0
    assert res.recovered == 1.0
    assert res.metric_random == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("sampling", ["edge", "sender"])
def test_a_false_positional_claim_loses_what_numpy_predicts(sampling):
    """Truth by numpy: claimed "depends only on the position", each cell's donor is a uniform row at that position,
    so y = a' and E[MSE] = mean over cells of (rows at that position whose a differs) / n."""
    model, x, a, mse = _positional_relay()
    an = a.numpy()
    ones = an.mean(0)  # share of rows with a = 1 at each position
    want = float(np.mean(np.where(an == 1, 1 - ones, ones)))
    pos = torch.arange(3).expand(len(a), 3)
    res = scrub(model, x, metric=mse, hypothesis=_every_edge(model, "pos"), features={"pos": pos}, samples=10, seed=4,
                sampling=sampling, breakdown=False)  # fmt: skip
    assert res.metric_scrubbed == pytest.approx(want, abs=0.02)
    assert abs(res.recovered) < 0.1


def test_donors_are_a_uniform_member_of_the_group_drawn_by_a_plain_loop():
    """Truth: a plain loop with the same seed. For each row in order: u ~ U[0, 1) (one float64 draw each, in row
    order), the donor is the floor(u·k)-th of the k rows sharing its value, in row order. And positional: a donor per
    (row, position) among the rows with the same value at that same position."""
    labels = np.array([5, 2, 5, 7, 2, 5, 7, 5])
    rows = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 3, 0])
    got = _Feature("f", labels, 8).sample(rows, torch.Generator().manual_seed(9))
    u = torch.rand(len(rows), generator=torch.Generator().manual_seed(9), dtype=torch.float64).tolist()
    want = []
    for r, ui in zip(rows.tolist(), u, strict=True):
        group = [j for j in range(8) if labels[j] == labels[r]]
        want.append(group[int(math.floor(ui * len(group)))])
    assert got.tolist() == want
    grid = np.array([[0, 1, 1], [1, 1, 0], [0, 0, 1], [1, 0, 0]])  # value 1 sits at different positions per row
    feat = _Feature("g", grid, 4)
    for seed in range(5):
        donors = feat.sample(torch.arange(4), torch.Generator().manual_seed(seed)).numpy()
        assert donors.shape == (4, 3)
        assert all(grid[donors[i, j], j] == grid[i, j] for i in range(4) for j in range(3))


# ---- several features, the breakdown, the sd -----------------------------------------------------------------------


def test_two_true_claims_each_with_its_own_feature_recover_everything():
    """Truth by hand (two_paths: y = u·a + v·b, A reads a, B reads b): "A depends only on a" and "B only on b" are
    both true, so every scrubbed output equals the clean one (MSE exactly 0, recovered exactly 1, each claim alone
    too). Using b for A (or a for B) would leave MSE u²/2 or v²/2."""
    model, ab, mse, b = two_paths(1.0, 2.0)
    hyp = {"claims": [{"name": "A reads a", "path": A_PATH, "feature": "a"},
                      {"name": "B reads b", "path": B_PATH, "feature": "b"}]}  # fmt: skip
    res = scrub(model, ab, metric=mse, hypothesis=hyp, features={"b": b, "a": ab[:, 0]}, samples=4, seed=6)
    assert res.metric_scrubbed == 0.0 and res.recovered == 1.0
    assert [(c.name, c.metric, c.recovered) for c in res.claims] == [("A reads a", 0.0, 1.0), ("B reads b", 0.0, 1.0)]


def test_a_claim_alone_resamples_only_its_own_edges_the_rest_clean():
    """Truth by hand (two_paths, u = 1, v = 2, rows every (a, b) x 100): the claim "B depends only on a" is false.
    Alone (everything else clean) only B's value comes from a row with the same a: its b is a fair coin, so the MSE
    is v²·P(b' ≠ b) = 2 and recovered 1 - 2 / ((u² + v²)/2) = 0.2. The claim "A depends only on a", true, recovers 1."""
    model, ab, mse, _ = two_paths(1.0, 2.0)
    hyp = {"claims": [{"name": "A reads a", "path": A_PATH, "feature": "a"},
                      {"name": "B reads a", "path": B_PATH, "feature": "a"}]}  # fmt: skip
    res = scrub(model, ab, metric=mse, hypothesis=hyp, features={"a": ab[:, 0]}, samples=20, seed=8)
    a_alone, b_alone = res.claims
    assert a_alone.metric == 0.0 and a_alone.recovered == 1.0
    assert b_alone.metric == pytest.approx(2.0, abs=0.15)
    assert b_alone.recovered == pytest.approx(0.2, abs=0.05)
    assert res.metric_random == pytest.approx(2.5, abs=0.15)


def test_two_samples_give_the_sample_sd_of_two_values():
    """Truth: the sample sd (n - 1) of two values v1, v2 is |v1 - v2| / √2, for every measured part."""
    model, ab, mse, b = two_paths(1.0, 2.0)
    seen = []
    metric = lambda out: seen.append(float(mse(out))) or seen[-1]  # noqa: E731
    hyp = {"claims": [{"name": "A carries b", "path": A_PATH, "feature": "b"}]}
    res = scrub(model, ab, metric=metric, hypothesis=hyp, features={"b": b}, samples=2, seed=1)
    pairs = [seen[1 + 2 * i : 3 + 2 * i] for i in range(4)]  # random, scrubbed, the claim, the unclaimed edges
    sds = [abs(x - y) / math.sqrt(2) for x, y in pairs]
    assert all(s > 0 for s in sds[:3])
    got = [res.metric_random_sd, res.metric_scrubbed_sd, res.claims[0].metric_sd, res.unclaimed.metric_sd]
    assert got == pytest.approx(sds, rel=1e-12)


# ---- the hypothesis layout ----------------------------------------------------------------------------------------


def test_the_rest_claim_takes_every_unnamed_edge_with_its_feature():
    """Truth by hand: two_paths' dense graph has 10 edges (embed -> 3 heads x q, k; embed and the 3 heads ->
    logits); A's path names 2 of them, so "rest" is the other 8, each with the rest's own feature."""
    g = two_paths()[0].graph
    hyp = parse_hypothesis({"claims": [{"name": "A", "path": A_PATH}, {"name": "rest", "rest": True, "feature": "t"}]},
                           g)  # fmt: skip
    a, rest = hyp.claims
    assert len(g.edges) == 10 and set(a.edges) == {("embed", "blocks.0.h0", "q"), ("blocks.0.h0", "logits", "in")}
    assert rest.feature == "t" and len(rest.edges) == 8 and set(rest.edges) == set(g.edges) - set(a.edges)


@pytest.mark.parametrize(
    ("claims", "match"),
    [
        ([{"name": "r1", "rest": True}, {"name": "r2", "rest": True}], "only one claim may be the 'rest'"),
        ([{"name": "all", "edges": ["*"]}, {"name": "r", "rest": True}], "no rest is left"),
    ],
)
def test_the_rest_is_one_claim_and_must_leave_something(claims, match):
    """Truth: the module docstring ("one claim may be ... rest: every edge the other claims do not name")."""
    with pytest.raises(MechscopeError, match=match) as e:
        parse_hypothesis({"claims": claims}, two_paths()[0].graph)
    assert "\n" not in str(e.value)


def test_overlapping_edge_specs_name_each_edge_once():
    """Truth: a claim names a set of edges; a glob over all of embed's edges and one of them listed again name 7."""
    g = two_paths()[0].graph
    hyp = parse_hypothesis({"claims": [{"name": "e", "edges": ["embed->blocks.0.h0<q>", "embed->*"]}]}, g)
    assert len(hyp.claims[0].edges) == 7 and len(set(hyp.claims[0].edges)) == 7


# ---- the language wing's hypothesis files ------------------------------------------------------------------------


def test_lm_hypothesis_file_defaults_are_scrubs_own():
    """Truth: scrub's signature (samples, seed, sampling) and the documented defaults (breakdown true, the name is the
    file's stem)."""
    from mechscope.lm.methods.scrubbing import parse_hypothesis_file

    spec = parse_hypothesis_file({"model": "m", "claims": [{"name": "a", "edges": ["*"]}]}, "some/dir/my_hyp.json")
    defaults = {k: p.default for k, p in inspect.signature(scrub).parameters.items()}
    assert (spec.samples, spec.seed, spec.sampling, spec.breakdown) == (
        defaults["samples"], defaults["seed"], defaults["sampling"], defaults["breakdown"])  # fmt: skip
    assert spec.name == "my_hyp"


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"breakdown": "no"}, "breakdown must be true or false"),
        ({"data": {"batch": 1}}, "data.batch must be an integer from 2"),
        ({"data": {"limit": 1}}, "data.limit must be an integer from 2"),
    ],
)
def test_lm_hypothesis_file_refusals(extra, match):
    """Truth: the documented file rules (breakdown is a JSON boolean; a batch needs 2 rows to resample from)."""
    from mechscope.lm.methods.scrubbing import parse_hypothesis_file

    with pytest.raises(MechscopeError, match=match) as e:
        parse_hypothesis_file({"model": "m", "claims": [{"name": "a", "edges": ["*"]}], **extra})
    assert "\n" not in str(e.value)


def test_lm_scrub_runs_what_the_file_says():
    """Truth: the file's settings (samples 3, seed 7, sampling sender, no breakdown) are what runs: the same numbers as
    core scrub called with them on the task's clean batch, recorded as given, and the feature described as
    tasks.FEATURES describes it."""
    from mechscope.lm.methods.graph import TransformerEdges
    from mechscope.lm.methods.scrubbing import parse_hypothesis_file, scrub_hypothesis
    from mechscope.lm.methods.tasks import FEATURES, feature_values, make_task
    from tests.unit.test_discovery_lm import tiny

    model = tiny("gpt2", layers=1, n_ctx=32)
    claims = [{"name": "heads", "edges": ["blocks.0.attn.*->*"]},
              {"name": "embed", "edges": ["embed->*"], "feature": "token"}]  # fmt: skip
    data = {"n": 4, "batch": 6, "seed": 0, "token_range": [3, 9]}
    spec = parse_hypothesis_file({"model": "m", "task": "induction", "data": data, "claims": claims, "samples": 3,
                                  "seed": 7, "sampling": "sender", "breakdown": False})  # fmt: skip
    r = scrub_hypothesis(model, spec)
    assert (r.scrub.samples, r.scrub.seed, r.scrub.sampling, r.scrub.claims, r.scrub.unclaimed) == (
        3, 7, "sender", (), None)  # fmt: skip
    assert (r.settings["samples"], r.settings["seed"], r.settings["sampling"]) == (3, 7, "sender")
    assert r.features == {"token": FEATURES["token"]}
    task = make_task(model, "induction", None, n=4, batch=6, seed=0, token_range=(3, 9))
    want = scrub(TransformerEdges(model), task.clean, metric=task.metric, hypothesis={"claims": claims},
                 features={"token": feature_values("token", task)}, samples=3, seed=7, sampling="sender",
                 breakdown=False)  # fmt: skip
    assert r.scrub.metric_scrubbed == pytest.approx(want.metric_scrubbed, rel=1e-12)
    assert r.scrub.metric_random == pytest.approx(want.metric_random, rel=1e-12)


def test_a_parsed_hypothesis_scrubs_as_its_dict_features_included():
    """Truth: scrub's docstring (hypothesis: "a Hypothesis or its dict"): the same seed gives the same numbers either
    way. By hand (two_paths, u = 1, v = 2): B kept as it is and "A carries b", false, leave MSE u²/2 against
    (u² + v²)/2 fully resampled: recovered v²/(u² + v²) = 0.8, not the 1.0 of A claimed as it is."""
    model, ab, mse, b = two_paths(1.0, 2.0)
    data = {"claims": [{"name": "A carries b", "path": A_PATH, "feature": "b"}, {"name": "B", "path": B_PATH}]}
    kw = {"metric": mse, "features": {"b": b}, "samples": 5, "seed": 3, "breakdown": False}
    parsed = parse_hypothesis(data, model.graph)
    assert parsed.claims[0].feature == "b"
    by_dict, by_obj = scrub(model, ab, hypothesis=data, **kw), scrub(model, ab, hypothesis=parsed, **kw)
    assert by_obj.hypothesis == parsed and by_obj.recovered == by_dict.recovered
    assert by_obj.recovered == pytest.approx(0.8, abs=0.05)
