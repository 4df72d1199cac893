"""Circuit discovery on the transformer: split q/k/v inputs, the adapter's graph and its exactness, grouped-query
attention, the buffered residual mixing, the induction task, features and causal scrubbing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mechscope.core.errors import MechscopeError
from mechscope.core.graphs import acdc, capture, eap, eap_ig, edge_patching, faithfulness_curve, receiver_gradients
from mechscope.core.hooks import hooks
from mechscope.core.scrub import scrub
from mechscope.lm.methods.discovery import LMDiscovery, compare_edges, discover, heads_edges
from mechscope.lm.methods.graph import TransformerEdges, pad_sequences
from mechscope.lm.methods.scrubbing import parse_hypothesis_file, scrub_hypothesis
from mechscope.lm.methods.tasks import feature_values, induction_task, make_task
from mechscope.lm.models.transformer import HookedTransformer, TransformerConfig


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Single-threaded: these models are tiny, and on a machine shared with other jobs two threads spinning for
    cores another process holds make these tests 5x slower (98 s against 21 s measured at load 4)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CONFIGS = {
    "gpt2": {},
    "llama-gqa": {
        "norm": "rmsnorm",
        "positional": "rotary",
        "n_kv_heads": 2,
        "gated_mlp": True,
        "act": "silu",
        "attn_bias": False,
    },  # fmt: skip
    "parallel": {"parallel_attn_mlp": True},
    "qk-norm": {"qk_norm": True, "norm": "rmsnorm", "positional": "rotary"},
    "attn-only": {"attn_only": True, "d_mlp": None},
}


def tiny(name: str = "gpt2", layers: int = 2, dtype=torch.float64, **extra) -> HookedTransformer:
    kw = {"d_model": 16, "n_layers": layers, "n_heads": 4, "d_head": 4, "d_vocab": 23, "n_ctx": 24, "d_mlp": 32}
    kw |= CONFIGS[name] | extra
    model = HookedTransformer(TransformerConfig(**kw))
    model.init_weights(torch.Generator().manual_seed(1), std=0.3)
    return model.to(dtype).eval()


def tokens(b=4, p=9, seed=0, vocab=23):
    return torch.randint(0, vocab, (b, p), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_split_inputs_change_no_number(name):
    model, t = tiny(name), tokens()
    plain = model(t)
    split = [(f"blocks.{L}.attn.hook_{k}_input", lambda x, h: None) for L in range(2) for k in "qkv"]
    with hooks(model, fwd=split):
        hooked = model(t)
    torch.testing.assert_close(hooked, plain, rtol=0, atol=1e-12)
    assert TransformerEdges(model).forward(t)[0].sub(plain).abs().max() < 1e-12
    shapes = {}

    def keep(x, hook):
        shapes[hook.name] = tuple(x.shape)

    with hooks(model, fwd=[(n, keep) for n, _ in split]):
        model(t)
    g = model.cfg.kv_heads
    assert shapes["blocks.0.attn.hook_q_input"] == (4, 9, 4, 16)
    assert shapes["blocks.0.attn.hook_k_input"] == (4, 9, g, 16)


def test_editing_one_heads_query_input_leaves_the_others_alone():
    model, t = tiny("gpt2"), tokens()
    seen = {}

    def bump(x, hook):
        x = x.clone()
        x[:, :, 2] += torch.linspace(-1, 1, x.shape[-1], dtype=x.dtype)  # not a constant: LayerNorm removes those
        return x

    def keep(x, hook):
        seen[hook.name] = x

    with hooks(model, fwd=[("blocks.1.attn.hook_q_input", bump), ("blocks.1.attn.hook_q", keep)]):
        model(t)
    q_edit = seen["blocks.1.attn.hook_q"]
    # the same per-head path, unedited (without a hook on hook_q_input the queries come from one product for every
    # head, whose sums differ from the per-head path's in the last bits on some CPUs: AMD EPYC, 6 December 2026)
    with hooks(model, fwd=[("blocks.1.attn.hook_q_input", lambda x, hook: x), ("blocks.1.attn.hook_q", keep)]):
        model(t)
    changed = (q_edit - seen["blocks.1.attn.hook_q"]).abs().amax((0, 1, 3))
    assert changed[2] > 1e-3 and torch.all(changed[[0, 1, 3]] == 0)


def test_graph_names_and_grouped_query_readers():
    edges = TransformerEdges(tiny("llama-gqa"))
    g = edges.graph
    assert "pos_embed" not in [n.name for n in g.nodes]  # rotary: no position sender
    h1 = g.node("blocks.1.attn.h1")
    assert h1.slots == ("q",) and h1.reads == ("blocks.1.attn.h0<k>", "blocks.1.attn.h0<v>")
    assert g.node("blocks.1.attn.h2").slots == ("q", "k", "v")
    k0 = g._index["receiver"][("blocks.1.attn.h0", "k")]
    assert g.readers_of(k0) == (g.node_id("blocks.1.attn.h1"),)
    # senders: embed, 8 heads, 2 MLPs; receivers: 8 q + 4 k + 4 v + 2 MLP + unembed
    assert (g.n_senders, g.n_receivers) == (11, 19)
    par = TransformerEdges(tiny("parallel")).graph
    assert not any(e[0].startswith("blocks.0.attn") and e[1] == "blocks.0.mlp" for e in par.edges)


def test_eap_is_exact_on_the_direct_edges_of_a_normless_model():
    model, t = tiny("gpt2", layers=1, norm="none", final_norm=False), tokens(b=2, p=6)
    edges = TransformerEdges(model)
    metric = lambda out: out[:, -3:, 5].mean()  # noqa: E731  (linear in the logits' input)
    est = eap(edges, t, tokens(b=2, p=6, seed=1), metric=metric)
    exact = edge_patching(edges, t, tokens(b=2, p=6, seed=1), metric=metric)
    direct = [i for i, e in enumerate(edges.graph.edges) if e[1] == "unembed"]
    np.testing.assert_allclose(est.scores[direct], exact.scores[direct], rtol=1e-9, atol=1e-12)
    assert np.corrcoef(est.scores, exact.scores)[0, 1] > 0.5


def test_eap_is_the_textbook_formula_with_grouped_query_attention():
    model, t, c = tiny("llama-gqa"), tokens(), tokens(seed=3)
    edges = TransformerEdges(model)
    metric = lambda out: torch.log_softmax(out[:, -1], -1)[:, 4].mean()  # noqa: E731
    _, clean_s = capture(edges, t)
    _, corr_s = capture(edges, c)
    _, grads = receiver_gradients(edges, t, metric)
    g = edges.graph
    pairs = zip(g.edge_sender, g.edge_receiver, strict=True)
    by_hand = [float(((corr_s[s] - clean_s[s]) * grads[r]).sum()) for s, r in pairs]
    np.testing.assert_allclose(eap(edges, t, c, metric=metric).scores, by_hand, rtol=1e-9, atol=1e-12)
    ig = eap_ig(edges, t, c, metric=metric, steps=3)
    assert ig.forward_passes == 5 and np.isfinite(ig.scores).all()


@pytest.mark.parametrize("ablation", ["patch", pytest.param("mean", marks=pytest.mark.slow)])
def test_buffered_residual_mixing_equals_the_generic_edge_mix(ablation):
    model, t, c = tiny("llama-gqa", layers=2), tokens(b=2, p=6), tokens(b=2, p=6, seed=2)
    fast = TransformerEdges(model)
    slow = TransformerEdges(model)
    slow.residual_stream = False  # the core then calls edge_mix (residual_edge_mix) at every receiver
    metric = lambda out: out[:, -1, 3].mean()  # noqa: E731
    a = edge_patching(fast, t, c, metric=metric, ablation=ablation)
    b = edge_patching(slow, t, c, metric=metric, ablation=ablation)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-9, atol=1e-12)
    fa = faithfulness_curve(fast, a, t, c, metric=metric, ablation=ablation, n_random=1)
    fb = faithfulness_curve(slow, a, t, c, metric=metric, ablation=ablation, n_random=1)
    np.testing.assert_allclose(fa.metric_values, fb.metric_values, rtol=1e-9, atol=1e-12)


def test_acdc_keeps_a_shared_key_input_when_only_a_reader_needs_it():
    # heads 0 and 1 of layer 1 share key/value head 0: zero head 0's output so that only head 1 uses the shared k/v
    model = tiny("llama-gqa", layers=2)
    with torch.no_grad():
        model.blocks[1].attn.W_O[0].zero_()
    t, c = tokens(b=2, p=6), tokens(b=2, p=6, seed=5)
    edges = TransformerEdges(model)
    metric = lambda out: out[:, -1, 3].mean()  # noqa: E731
    res = acdc(edges, t, c, metric=metric, threshold=1e-9)
    kept = {edges.graph.edges[e] for e in res.kept}
    assert ("embed", "blocks.1.attn.h0", "k") in kept  # read by head 1 only
    assert not any(e[0] == "blocks.1.attn.h0" for e in kept)  # head 0 writes nothing
    assert res.settings["metric_circuit"] == pytest.approx(res.metric_clean, abs=1e-9)


def test_padded_batches_compute_each_sequence_alone():
    model = tiny("gpt2", causal=False)
    seqs = [[1, 5, 7], [1, 2, 3, 4, 9, 9], [1, 8]]
    batch = pad_sequences(seqs, pad=0)
    out, _ = TransformerEdges(model).forward(batch)
    for i, s in enumerate(seqs):
        alone = model(torch.tensor([s]))[0]
        # the masked path's softmax runs in float32 (as transformers' eager attention): equal to that precision
        torch.testing.assert_close(out[i, : len(s)], alone, rtol=0, atol=1e-6)


def test_induction_task_metrics_and_features():
    model = tiny("gpt2", layers=2, n_ctx=32)
    task = induction_task(model, n=6, batch=4, seed=0, token_range=(3, 23))
    ids = task.clean
    assert ids.shape == (4, 13) and torch.equal(ids[:, 1:7], ids[:, 7:])
    assert torch.equal(task.corrupted, ids.roll(-1, 0))
    with torch.no_grad():
        out = model(ids)
    q = torch.arange(7, 12)
    ce = torch.nn.functional.cross_entropy(out[:, q].reshape(-1, 23).double(), ids[:, q + 1].reshape(-1))
    assert float(task.metric(out.detach())) == pytest.approx(float(ce), rel=1e-9)
    assert torch.equal(feature_values("token[i-n]", task)[:, 7:], ids[:, 1:7])
    assert torch.equal(feature_values("prev_token", task)[:, 1:], ids[:, :-1])
    assert torch.equal(feature_values("token[i-n+1]", task)[:, 7:12], ids[:, 2:7])
    assert feature_values("sequence", task).shape == (4,)
    with pytest.raises(MechscopeError, match="unknown feature"):
        feature_values("colour", task)
    for far in ("token[i-13]", "token[i-18446744073709551616]", "token[i-n+100]"):  # -1 everywhere: a constant
        with pytest.raises(MechscopeError, match="is beyond the 13 positions"):
            feature_values(far, task)
    assert torch.equal(feature_values("token[i-12]", task)[:, 12], ids[:, 0])
    with pytest.raises(MechscopeError, match="named by a string"):
        feature_values(5, task)
    with pytest.raises(MechscopeError, match="unknown metric"):
        induction_task(model, "accuracy")


def test_discover_round_trips_and_compares_hand_edges(tmp_path):
    model = tiny("gpt2", layers=2, n_ctx=32)
    task = induction_task(model, n=6, batch=4, seed=0, token_range=(3, 23))
    hand = [("blocks.0.attn.h1", "blocks.1.attn.h2", "k")]
    res = discover(model, task, "eap", size=10, n_random=1, hand_edges=hand, name="tiny")
    assert len(res.circuit) == 10 and res.faithfulness is not None and res.comparison["edges"][0]["rank"] >= 1
    (tmp_path / "discovery.json").write_text(json.dumps(res.to_dict()))
    back = LMDiscovery.load(tmp_path)
    np.testing.assert_array_equal(back.scores.scores, res.scores.scores)
    assert back.circuit.edges == res.circuit.edges and back.faithfulness.cpr == pytest.approx(res.faithfulness.cpr)
    c = compare_edges(res.scores, hand, 10)
    assert 0 <= c["auroc"] <= 1 and c["slots"] == ["k"]
    assert compare_edges(res.scores, ["blocks.0.attn.h1->blocks.1.attn.h2<k>"], 10) == c  # the string form too
    # a record edited by hand: loads refused in one line naming the file (each loaded, then its report raised)
    for i, (edit, match) in enumerate([
        (lambda d: d.update(scores=None), "EdgeScores is null"),
        (lambda d: d["circuit"].update(edges=[["a", "b", "c"]]), "a circuit of 1 edges with 10 scores"),
        (lambda d: d["circuit"].update(edges=[["a"]] * 10), "1 items where 3 are expected"),
        (lambda d: d["circuit"].update(nodes=None), "null where a tuple of values is expected"),
    ]):  # fmt: skip
        d = res.to_dict()
        edit(d)
        path = tmp_path / f"bad{i}.json"
        path.write_text(json.dumps(d))
        with pytest.raises(MechscopeError, match=match) as e:
            LMDiscovery.load(path)
        assert str(e.value).startswith(f"{path}:") and "\n" not in str(e.value)


def test_the_drawn_circuit_alone_is_measured_as_the_curve_measures_it():
    """The circuit the report draws, alone (every other edge patched), is one more forward pass: at a size the curve
    also measures (top k by |score|), the two agree; the full model and empty circuit are the curve's."""
    model = tiny("gpt2", layers=2, n_ctx=32)
    task = induction_task(model, n=6, batch=4, seed=0, token_range=(3, 23))
    first = discover(model, task, "eap", size=1, n_random=0)
    k = first.faithfulness.edge_counts[6]
    res = discover(model, task, "eap", size=k, n_random=0)
    drawn, curve = res.circuit_faithfulness, res.faithfulness
    assert drawn["edges"] == k and drawn["forward_passes"] == 2  # the corrupted run and the circuit
    assert drawn["faithfulness"] == pytest.approx(curve.faithfulness_absolute[6], abs=1e-12)
    assert (drawn["metric_full"], drawn["metric_empty"]) == (curve.metric_full, curve.metric_empty)
    assert discover(model, task, "eap", size=k, curve=False).circuit_faithfulness is None


def test_heads_edges_name_the_key_input_of_the_group():
    class PP:
        def __init__(self, source, layer, kv, ok):
            self.source, self.layer, self.kv_head, self.confirmed = source, layer, kv, ok

    class Heads:
        kv_groups = 3
        path_patches = (PP((16, 0), 17, 1, (True, False, True)), PP((11, 1), 17, 1, (False,) * 3))

    assert heads_edges(Heads()) == [("blocks.16.attn.h0", "blocks.17.attn.h3", "k")]


def test_scrubbing_the_whole_transformer_recovers_everything_and_a_positional_feature_is_exact():
    model = tiny("gpt2", layers=2, n_ctx=32)
    task = induction_task(model, n=4, batch=6, seed=0, token_range=(3, 9))
    edges = TransformerEdges(model)
    every = {"claims": [{"name": "all", "edges": ["*"]}]}
    res = scrub(edges, task.clean, metric=task.metric, hypothesis=every, samples=2)
    assert res.recovered == pytest.approx(1.0, abs=1e-9)
    # the embeddings' output at a position depends only on the token there (and the position): true by
    # construction, so resampling it position-wise from rows that agree changes nothing
    hyp = {"claims": [{"name": "rest", "edges": ["blocks.*"]},
                      {"name": "embedding", "edges": ["embed->*", "pos_embed->*"], "feature": "token"}]}  # fmt: skip
    shared = scrub(edges, task.clean, metric=task.metric, hypothesis=hyp, features={"token": task.clean},
                   samples=2, sampling="sender")  # fmt: skip
    assert shared.recovered == pytest.approx(1.0, abs=1e-9) and shared.sampling == "sender"
    # a false claim: the embeddings depend only on the position -> the behaviour is lost
    false = {"claims": [hyp["claims"][0], {**hyp["claims"][1], "feature": "position"}]}
    pos = torch.arange(task.clean.shape[1]).expand_as(task.clean)
    lost = scrub(edges, task.clean, metric=task.metric, hypothesis=false, features={"position": pos}, samples=2,
                 sampling="sender", breakdown=False)  # fmt: skip
    assert abs(lost.recovered - 1.0) > 0.05  # (a random model: any value but the whole)


def test_sender_sampling_is_one_forward_per_output_and_the_buffered_mix_gathers_exactly():
    model = tiny("llama-gqa", layers=3)  # 16 senders: the unembedding's mix goes through the buffer's product
    task = induction_task(model, n=4, batch=6, seed=0, token_range=(3, 9))
    fast, slow = TransformerEdges(model), TransformerEdges(model)
    slow.residual_stream = False  # the generic edge_mix path: gathers the sender's rows without the buffer
    hyp = {"claims": [{"name": "heads", "edges": ["blocks.2.attn.*->*"]},
                      {"name": "keys", "edges": ["*->blocks.2.attn.*<k>"], "feature": "prev_token"},
                      {"name": "rest", "rest": True, "feature": "token"}]}  # fmt: skip
    feats = {"prev_token": feature_values("prev_token", task), "token": feature_values("token", task)}
    kw = {"metric": task.metric, "hypothesis": hyp, "features": feats, "samples": 2, "seed": 3, "sampling": "sender"}
    a, b = scrub(fast, task.clean, **kw), scrub(slow, task.clean, **kw)
    assert a.metric_scrubbed == pytest.approx(b.metric_scrubbed, rel=1e-9, abs=1e-12)
    assert [c.metric for c in a.claims] == pytest.approx([c.metric for c in b.claims], rel=1e-9, abs=1e-12)
    # the capture, then one forward per scrubbed output: resampled, scrubbed, the 2 claims with a feature alone
    # ("heads" alone and the unclaimed edges alone, with "rest" claiming them all, are the clean model: not run)
    assert a.forward_passes == 1 + 2 * (1 + 1 + 2)
    assert [c.measured for c in a.claims] == [False, True, True] and not a.unclaimed.measured
    assert np.isfinite(a.recovered) and a.metric_scrubbed != pytest.approx(a.metric_clean)


def test_hypothesis_files_are_checked_in_one_line():
    good = {"model": "m", "claims": [{"name": "a", "edges": ["embed->unembed"], "feature": "prev_token"}]}
    assert parse_hypothesis_file(good).model == "m"
    for bad, match in [
        ({**good, "colour": 1}, "unknown key"),
        ({**good, "claims": []}, "non-empty"),
        ({"claims": good["claims"]}, "'model'"),
        ({**good, "claims": [{"name": "a", "edges": ["embed->unembed"], "feature": "mood"}]}, "unknown feature"),
        ({**good, "samples": 0}, "samples"),
        ({**good, "data": {"n": 1}}, "data.n"),
        ({**good, "data": {"seed": 2**64}}, "data.seed must be an integer from 0 to 2"),  # torch overflowed
        ({**good, "seed": 2**64}, "seed must be an integer from 0 to 2"),
        ({**good, "samples": 10**6}, "samples must be an integer from 1 to 100,000"),
        ({**good, "sampling": "row"}, "sampling"),
        ([], "JSON object"),
    ]:
        with pytest.raises(MechscopeError, match=match) as e:
            parse_hypothesis_file(bad)
        assert "\n" not in str(e.value)
    model = tiny("gpt2", layers=2, n_ctx=32)
    claims = [{"name": "x", "path": ["embed", "blocks.7.attn.h0", "unembed"]}]
    spec = parse_hypothesis_file({"model": "m", "data": {"n": 5, "batch": 4}, "task": "induction", "claims": claims})
    with pytest.raises(MechscopeError, match="unknown component"):
        scrub_hypothesis(model, spec)
    spec = parse_hypothesis_file({"model": "m", "data": {"n": 5, "batch": 4}, "task": "induction",
                                  "claims": [{"name": "x", "path": ["unembed", "blocks.0.attn.h0"]}]})  # fmt: skip
    with pytest.raises(MechscopeError, match="no edge"):
        scrub_hypothesis(model, spec)


def test_refused_models_and_metrics_in_one_line():
    with pytest.raises(MechscopeError, match="post_attn_mlp_norm") as e:
        TransformerEdges(tiny("gpt2", post_attn_mlp_norm=True))
    assert "\n" not in str(e.value)
    model = tiny("gpt2", layers=2, n_ctx=32)
    task = induction_task(model, n=6, batch=4)
    from dataclasses import replace

    vector = replace(task, metric=lambda out: out[:, -1, 0])
    with pytest.raises(MechscopeError, match="scalar"):
        discover(model, vector, "eap", curve=False)
    with pytest.raises(MechscopeError, match="threshold"):
        discover(model, task, "acdc", threshold=-1.0, curve=False)
    from mechscope.lm.methods.tasks import make_task

    for call, match in [  # AttributeErrors from inside, before
        (lambda: make_task((model, None)), "the \\(model, tokenizer\\) pair mechscope.lm.load_model returns"),
        (lambda: make_task(None), "expected a HookedTransformer"),
        (lambda: discover(model, None), "expected a Task"),
        (lambda: discover("toy", task), "expected a HookedTransformer .*got str"),
    ]:
        with pytest.raises(MechscopeError, match=match):
            call()


def test_task_settings_are_checked_not_dropped():
    """make_task refused nothing: a setting the chosen task does not read was dropped, an unknown keyword swallowed,
    a 64-bit-overflowing seed, a boolean token range and a batch of 2**64 were tracebacks, and a batch of a million
    was killed for memory without a word."""
    model = tiny("gpt2", layers=2, n_ctx=64)
    for kwargs, match in [
        ({"bogus": 5}, "unknown task setting 'bogus'"),
        ({"limit": 3}, "limit: not settings of the induction task"),
        ({"seed": 2**64}, "seed must be an integer from 0 to 2"),
        ({"token_range": (True, 20)}, "a token range is two integers"),
        ({"token_range": (1, 2, 3)}, "a token range is two integers"),
        ({"batch": 2**64}, "GiB of the edge graph's activations"),
        ({"batch": 10**6, "n": 6}, "GiB of the edge graph's activations"),
        ({"distinct": "yes"}, "distinct must be true or false"),
    ]:
        with pytest.raises(MechscopeError, match=match) as e:
            make_task(model, "induction", **kwargs)
        assert "\n" not in str(e.value)
    assert make_task(model, "induction", n=6, batch=4, limit=None).settings["batch"] == 4  # None: not given
