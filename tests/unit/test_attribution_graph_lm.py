"""Attribution graphs of transformers: exactness on tiny random models of several families (the replacement model's
logits equal the model's; every edge equals a direct intervention with attention frozen, to 1e-5 in float32, as
circuit-tracer's tests assert), exact QK and head-path decompositions, interventions against predictions, and known
answers: a hand-built induction model and tracr's compiled programs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mechscope.core.attribution_graph import build
from mechscope.core.dictionaries import DictionaryConfig, SparseDictionary
from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import attached_hooks
from mechscope.lm.methods.attribution_graph import (
    GraphSettings,
    LmAttributionGraph,
    attribution_graph,
    intervene,
)
from mechscope.lm.methods.attribution_graph_qk import qk_attribution
from mechscope.lm.methods.edge_paths import edge_paths
from mechscope.lm.methods.replacement import LocalReplacement
from mechscope.lm.methods.transcoders import Transcoders
from mechscope.lm.models.transformer import HookedTransformer, TransformerConfig

FAMILIES = {
    "gpt2": {},
    "llama": dict(
        norm="rmsnorm",
        positional="rotary",
        gated_mlp=True,
        act="silu",
        n_kv_heads=1,
        attn_bias=False,
        mlp_bias=False,
        tie_embeddings=False,
    ),
    "neox": dict(parallel_attn_mlp=True, positional="rotary", rotary_dim=4),
    "gemma2": dict(
        norm="rmsnorm",
        positional="rotary",
        post_attn_mlp_norm=True,
        norm_weight_plus_one=True,
        final_logit_softcap=30.0,
        attn_logit_softcap=50.0,
        gated_mlp=True,
        act="gelu_pytorch_tanh",
    ),
    "qwen3": dict(norm="rmsnorm", positional="rotary", qk_norm=True, n_kv_heads=1, attn_bias=False),
}


def tiny(family: str = "gpt2", seed: int = 1, n_layers: int = 2) -> HookedTransformer:
    cfg = TransformerConfig(
        d_model=16, n_layers=n_layers, n_heads=2, d_head=8, d_vocab=32, n_ctx=16, d_mlp=32, **FAMILIES[family]
    )
    m = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            base = 0.0 if (name.endswith(".w") and cfg.norm_weight_plus_one) else (1.0 if name.endswith(".w") else 0.0)
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + base)
    return m.eval()


def random_transcoders(model, arch: str = "topk", skip: bool = False, seed: int = 2) -> Transcoders:
    g = torch.Generator().manual_seed(seed)
    out = []
    D = model.cfg.d_model
    for _ in range(model.cfg.n_layers):
        cfg = DictionaryConfig(
            d_in=D, d_sae=3 * D, architecture=arch, k=6 if arch == "topk" else None, transcoder=True, d_out=D, skip=skip
        )
        out.append(randomise(SparseDictionary(cfg, generator=g), g, arch, skip))
    return Transcoders.of(out)


def randomise(d, g: torch.Generator, arch: str, skip: bool):
    """Random biases (and skip weights) for a fresh (cross-layer) transcoder, a small threshold for JumpReLU."""
    with torch.no_grad():
        d.b_enc.normal_(0, 0.1, generator=g)
        d.b_dec.normal_(0, 0.1, generator=g)
        if skip:
            d.W_skip.normal_(0, 0.1, generator=g)
        if arch == "jumprelu":
            d.threshold.fill_(0.05)
    return d


TOKENS = torch.tensor([1, 5, 7, 3, 9, 5, 7, 2])


def sources(rep, n_features: int | None) -> list[int]:
    """Source indices to check by intervention: every one, or every error and input source and ``n_features``
    features drawn with a seed."""
    nf, total = rep.n_features, rep.n_features + rep.n_errors + rep.n_inputs
    if n_features is None or nf <= n_features:
        return list(range(total))
    feats = torch.randperm(nf, generator=torch.Generator().manual_seed(0))[:n_features].sort().values.tolist()
    return feats + list(range(nf, total))


# TopK on every family and JumpReLU with a skip connection on GPT-2 and Gemma 2 in `make test`; the other JumpReLU
# cases are slow-marked (each is a forward pass per checked source)
SLOW_JUMPRELU = ("llama", "neox", "qwen3")
CASES = [
    pytest.param(family, arch, skip, marks=[pytest.mark.slow] if skip and family in SLOW_JUMPRELU else [])
    for arch, skip in (("topk", False), ("jumprelu", True))
    for family in FAMILIES
]


@pytest.mark.parametrize("family,arch,skip", CASES)
def test_logits_exact_and_every_edge_is_a_direct_intervention(family, arch, skip):
    model = tiny(family)
    rep = LocalReplacement(model, random_transcoders(model, arch, skip), TOKENS, batch_size=8)
    with torch.no_grad():
        own = model(TOKENS[None])[0]
    assert (rep.replacement_logits() - own).abs().max() < 1e-5
    ids, probs = rep.salient_logits()
    rep.set_targets(ids)
    built = build(rep, probs)
    t = built.triplets
    A = torch.zeros(built.n, built.n)
    A[t.rows, t.cols] = t.values
    nf, src = rep.n_features, rep.n_features + rep.n_errors + rep.n_inputs
    logits0, pre0 = rep.run("direct")
    dem0 = rep.demeaned(logits0, ids, rep.logit_pos)
    assert (pre0 - rep.feature_activation).abs().max() < 1e-5  # an active feature's activation is its pre-activation
    # every source (features, errors, token embeddings) for GPT-2 with TopK; elsewhere every error and token source
    # and 40 features drawn with a seed (the cost is one forward pass per source)
    for s in sources(rep, None if (family, arch) == ("gpt2", "topk") else 40):
        logits1, pre1 = rep.run("direct", scale_source=(s, 2.0))
        dem1 = rep.demeaned(logits1, ids, rep.logit_pos)
        assert torch.allclose(pre1 - pre0, A[:nf, s], atol=1e-5, rtol=0), (family, s)
        assert torch.allclose(dem1 - dem0, A[src:, s], atol=1e-5, rtol=0), (family, s)
    assert attached_hooks(model) == []


def test_graph_result_checks_itself_and_round_trips(tmp_path):
    model = tiny("llama")
    graph, rep = attribution_graph(
        model, random_transcoders(model), TOKENS, settings=GraphSettings(batch_size=8, check_sources=40)
    )
    e = graph.exactness
    assert e["logits_max_abs_diff"] < 1e-5 and e["edges_max_abs_error"] < 1e-5 and e["edges_sources_checked"] == 40
    s = graph.scores
    assert all(0 <= s[k] <= 1 for k in s)
    p = tmp_path / "graph.json"
    p.write_text(__import__("json").dumps(graph.to_dict()))
    back = LmAttributionGraph.load(p)
    assert back.nodes == graph.nodes and back.edges == graph.edges and back.full is None
    assert graph.to_dict()["schema"] == "mechscope.lm_graph/1"


def test_partial_graph_with_bounded_rows_keeps_exact_edges():
    model = tiny("gpt2")
    tcs = random_transcoders(model)
    full, _ = attribution_graph(model, tcs, TOKENS, settings=GraphSettings(batch_size=8, check_sources=0))
    part, _ = attribution_graph(
        model,
        tcs,
        TOKENS,
        settings=GraphSettings(batch_size=8, check_sources=0, max_feature_nodes=20, edges_per_row=10),
    )
    assert part.counts["feature_nodes"] == 20 < full.counts["feature_nodes"]
    assert part.counts["backward_passes"] < full.counts["backward_passes"]
    w_full = {(full.nodes[a]["id"], full.nodes[b]["id"]): w for a, b, w in full.edges}
    f = full.full
    dense = {}
    for r, c, v in zip(f["rows"].tolist(), f["cols"].tolist(), f["values"].tolist(), strict=True):
        dense[(r, c)] = v
    # every edge the partial graph keeps has the weight the full computation gives
    for a, b, w in part.edges:
        key = (part.nodes[a]["id"], part.nodes[b]["id"])
        if key in w_full:
            assert w == pytest.approx(w_full[key], abs=1e-5)


def test_qk_attribution_adds_up_exactly():
    for family in ("gpt2", "llama", "qwen3"):
        model = tiny(family)
        rep = LocalReplacement(model, random_transcoders(model), TOKENS, batch_size=8)
        q = qk_attribution(rep, 1, 1, 7)
        assert q.max_abs_residual < 1e-4 * max(1.0, abs(q.score))
        assert q.bias["writer_sum_error"] < 1e-4
        # the score is the scaled dot product of the prompt's query and key
        assert q.pattern == pytest.approx(float(rep.patterns[1][0, 1, 7, q.key_pos]))


def test_edge_paths_split_each_edge_by_the_head_that_carried_it():
    model = tiny("gpt2")
    graph, rep = attribution_graph(model, random_transcoders(model), TOKENS, settings=GraphSettings(batch_size=8))
    ep = edge_paths(rep, 0)
    assert ep.max_abs_residual < 1e-5  # a source at another position has no direct part
    for row in ep.rows:
        assert row["edge"] == pytest.approx(row["direct"] + sum(row["via"].values()), abs=1e-4) or len(row["via"]) == 5
    feat = graph.features()[0]["id"]
    assert edge_paths(rep, feat).max_abs_residual < 1e-5


def test_interventions_match_the_graph_for_small_steps():
    model = tiny("gpt2", seed=3)
    tcs = random_transcoders(model, "relu")
    graph, rep = attribution_graph(model, tcs, TOKENS, settings=GraphSettings(batch_size=8, check_sources=0))
    feat = graph.features()[0]
    iv = intervene(graph, rep, [feat["id"]], scale=0.999)  # a small step: no feature switches on or off
    for row in iv.logits:
        assert row["frozen"] == pytest.approx(row["predicted_full"], abs=1e-5)
    iv = intervene(graph, rep, [feat["id"]])
    assert iv.changes[feat["id"]][1] == 0.0 and "ablate" in iv.summary()
    with pytest.raises(MechscopeError, match="only feature nodes"):
        intervene(graph, rep, [f"0_-1_{TOKENS.numel() - 1}"])
    with pytest.raises(MechscopeError, match="not active"):
        intervene(graph, rep, ["0_95_3"])


def _pruned_by_hand(graph, node_id: str, delta: float) -> dict[int, float]:
    """The pruned graph's prediction for one feature changed by ``delta``, by a dense linear solve (propagate
    iterates): every active feature passes on Σ edge / activation × its source's change; the changed feature is
    fixed; errors and inputs do not move. Returns logit index -> change."""
    nodes = graph.nodes
    m = len(nodes)
    w = np.zeros((m, m))
    for s, t, v in graph.edges:
        if nodes[s]["kind"] == "feature" and nodes[s]["activation"] != 0:
            w[t, s] += v / nodes[s]["activation"]
    fixed = next(i for i, nd in enumerate(nodes) if nd["id"] == node_id)
    free = [i for i in range(m) if i != fixed]
    change = np.zeros(m)
    change[fixed] = delta
    change[free] = np.linalg.solve(np.eye(len(free)) - w[np.ix_(free, free)], w[free, fixed] * delta)
    return {nd["logit"]: change[i] for i, nd in enumerate(nodes) if nd["kind"] == "logit"}


def test_an_ablation_against_the_graph_the_pruned_graph_and_the_model_itself():
    """A feature's ablation (not a small step): the frozen replacement model moves each logit as the whole graph
    predicts (for the first feature, downstream of which nothing switches); the pruned graph's prediction is a dense
    solve over its own edges (some features' pruned edges change it); the model step is the model itself run with
    the decoder change added to that layer's MLP output by a hook (review36: a 2% error in the prediction, the
    pruned graph's prediction replaced by the full one and the model step measured on the recomputed run passed)."""
    model = tiny("gpt2", seed=3)
    tcs = random_transcoders(model, "relu")
    graph, rep = attribution_graph(model, tcs, TOKENS, settings=GraphSettings(batch_size=8, check_sources=0))
    pruned_differs = 0
    for k, feat in enumerate(graph.features()):
        iv = intervene(graph, rep, [feat["id"]])
        full = [row["predicted_full"] for row in iv.logits]
        assert max(map(abs, full)) > 1e-2
        if k == 0:  # the most influential feature: nothing downstream of it switches (others' ablations do switch)
            for row in iv.logits:
                assert row["frozen"] == pytest.approx(row["predicted_full"], rel=1e-4, abs=1e-6)
        hand = _pruned_by_hand(graph, feat["id"], -feat["activation"])
        assert [row["predicted_pruned"] for row in iv.logits] == pytest.approx([hand.get(j, 0.0) for j in
                                                                                range(len(full))], abs=1e-5)
        pruned_differs += any(abs(row["predicted_pruned"] - row["predicted_full"]) > 1e-3 for row in iv.logits)
        layer, pos, a = feat["layer"], feat["pos"], feat["activation"]
        add = torch.zeros(len(TOKENS), model.cfg.d_model)
        add[pos] = -a * tcs.layers[layer].W_dec[feat["feature"]].detach()

        def logits(extra, layer=layer):  # a plain torch hook on the MLP output's hook point
            handle = model.get_submodule(f"blocks.{layer}.hook_mlp_out").register_forward_hook(
                lambda mod, args, out: out + extra)  # fmt: skip
            try:
                with torch.no_grad():
                    out = model(TOKENS[None])[0]
            finally:
                handle.remove()
            return rep.demeaned(out, rep.logit_targets, rep.logit_pos)

        moved = logits(add) - logits(torch.zeros_like(add))
        assert [row["model"] for row in iv.logits] == pytest.approx(moved.tolist(), abs=1e-5)
    assert pruned_differs >= 1


def test_transcoders_that_do_not_fit_are_refused(tmp_path):
    model = tiny("gpt2")
    tcs = random_transcoders(model)
    with pytest.raises(MechscopeError, match="2 MLP layers"):
        LocalReplacement(model, Transcoders(tcs.layers[:1]), TOKENS)
    wrong = SparseDictionary(DictionaryConfig(d_in=8, d_sae=24, transcoder=True, d_out=8))
    with pytest.raises(MechscopeError, match="d_model 16"):
        LocalReplacement(model, Transcoders((wrong, tcs.layers[1])), TOKENS)
    tcs.save(tmp_path / "tc", model_name="tiny")
    back = Transcoders.load(tmp_path / "tc")
    assert torch.equal(back.layers[1].W_dec, tcs.layers[1].W_dec)
    with pytest.raises(MechscopeError, match="longer than the context"):
        LocalReplacement(model, tcs, torch.arange(20) % 30)


def test_transcoders_for_a_subset_of_layers_leave_the_rest_to_error_nodes(tmp_path):
    model = tiny("llama")
    tcs = random_transcoders(model)
    part = Transcoders.padded(model, {1: tcs.layers[1]})
    assert part.empty_layers == [0] and part.widths == [1, 48]
    graph, rep = attribution_graph(model, part, TOKENS, settings=GraphSettings(batch_size=8, check_sources=20))
    assert graph.exactness["logits_max_abs_diff"] < 1e-5 and graph.exactness["edges_max_abs_error"] < 1e-5
    assert set(rep.feature_layer.tolist()) == {1}
    assert torch.equal(rep.errors[0], rep.mlp_out[0])  # layer 0's whole MLP output is its error node
    part.save(tmp_path / "tc")
    assert Transcoders.load(tmp_path / "tc").empty_layers == [0]
    with pytest.raises(MechscopeError, match="outside the model's MLP layers"):
        Transcoders.padded(model, {2: tcs.layers[1]})


# ---- known answers -------------------------------------------------------------------------------------------


def test_hand_built_induction_model_names_its_heads():
    """The hand-built 2-layer attention-only model of test_heads (head 0.0 previous token, head 1.0 induction):
    on a repeated sequence the logit of the next token comes from that token's embedding in the first copy, carried
    by head 1.0, and head 1.0's attention to it is explained by the current token on the query side and head 0.0's
    write (the previous token) on the key side."""
    from tests.unit.test_heads import hand_built

    model = hand_built()
    seq = torch.randint(1, 100, (10,), generator=torch.Generator().manual_seed(0))
    tokens = torch.cat([torch.zeros(1, dtype=torch.long), seq, seq[:5]])  # BOS A.. then A..E again: next is seq[5]
    graph, rep = attribution_graph(
        model, Transcoders(()), tokens, targets=[int(seq[5])], settings=GraphSettings(batch_size=8)
    )
    logit = next(n for n in graph.nodes if n["kind"] == "logit")
    (top, w), *_ = graph.inputs_of(logit["id"])
    assert top["kind"] == "input" and top["pos"] == 6 and top["feature"] == int(seq[5])  # seq[5] sits at position 6
    ep = edge_paths(rep, 0)
    assert ep.heads[0]["head"] == "1.0" and ep.rows[0]["source"] == f"E_{int(seq[5])}_6"
    assert list(ep.rows[0]["via"])[0] == "1.0"
    q = qk_attribution(rep, 1, 0, 15)
    assert q.key_pos == 6 and q.pattern > 0.9
    assert q.key_writers[0]["label"] == "head 0.0" and q.query_writers[0]["label"].startswith("token embedding @15")
    assert q.key_sources[0]["id"] == f"E_{int(seq[4])}_5"  # the previous token, moved by head 0.0
    assert q.query_sources[0]["id"] == f"E_{int(seq[4])}_15"


TRACR = Path(__import__("os").environ.get("MECHSCOPE_DATA", "../shared/data")) / "tracr"


def _tracr(name: str):
    from mechscope.lm.models.loading import load_model

    if not (TRACR / name / "config.json").is_file():
        pytest.skip(f"tracr's {name} not found under {TRACR}")
    return load_model(str(TRACR / name))[0]


def test_tracr_hist_graph_follows_the_compiled_circuit():
    """hist: output[i] = how many times tokens[i] occurs. The compiled circuit is head 0.0 (selector width over
    BOS) then MLP 0, then the unembedding. With the MLP's neurons as exact transcoders every error node is zero, the
    replacement score is 1, and the logit of the right count is read from MLP-0 neurons at that position only."""
    model = _tracr("hist")
    tokens = torch.tensor([0, 2, 3, 2, 2, 4])  # BOS a b a a c
    for pos, count in ((1, 3), (2, 1), (5, 1)):
        graph, rep = attribution_graph(
            model,
            Transcoders.from_mlp_neurons(model),
            tokens,
            logit_pos=pos,
            targets=[count],
            settings=GraphSettings(batch_size=8, check_sources=20),
        )
        assert graph.exactness["logits_max_abs_diff"] < 1e-4 and graph.exactness["edges_max_abs_error"] < 1e-4
        assert float(rep.errors.abs().max()) == 0.0
        assert graph.scores["replacement"] == pytest.approx(1.0)
        feats = [n for n in graph.nodes if n["kind"] == "feature"]
        assert feats and all(n["layer"] == 0 and n["pos"] == pos for n in feats)
        logit = next(n for n in graph.nodes if n["kind"] == "logit")
        assert all(s["kind"] == "feature" for s, _ in graph.inputs_of(logit["id"]))  # MLP 0 writes the answer
        assert int(rep.logits[pos].argmax()) == count


def test_tracr_reverse_attention_is_explained_by_the_compiled_query_and_key():
    """reverse: output[i] = tokens[n-1-i]. Head 3.0 moves the token (its value reads tokens), so the logit's input
    is the token embedding at the mirrored position carried by head 3.0; its attention there is explained by MLP 2's
    opp_idx-1 neurons on the query side and the position embedding (indices) on the key side."""
    model = _tracr("reverse")
    tokens = torch.tensor([0, 2, 3, 4, 3])  # BOS a b c b: reversed b c b a
    n, i = 4, 1  # output position i+1 holds tokens[n-1-i] = tokens at position n-i
    pos = i + 1
    graph, rep = attribution_graph(
        model,
        Transcoders.from_mlp_neurons(model),
        tokens,
        logit_pos=pos,
        settings=GraphSettings(batch_size=8, check_sources=10),
    )
    assert graph.exactness["edges_max_abs_error"] < 1e-3
    ep = edge_paths(rep, 0)
    assert ep.rows[0]["source"] == f"E_{int(tokens[n - i])}_{n - i}" and list(ep.rows[0]["via"])[0] == "3.0"
    q = qk_attribution(rep, 3, 0, pos)
    assert q.key_pos == n - i and q.pattern > 0.9
    assert q.query_writers[0]["label"].startswith("L2 #")  # MLP 2 neurons: opp_idx - 1
    assert q.key_writers[0]["label"] == f"position embedding @{n - i}"


@pytest.mark.slow
def test_trained_toy_model_graph_names_the_heads_lm_heads_finds(tmp_path):
    """The 2-layer attention-only toy trained here (lm train-toy, 1,000 steps: past the phase change at steps
    495-649 of docs/lm/toy-training.md): the graph of a repeated token and the QK attribution of the induction head
    name the previous-token head and the induction head of lm heads."""
    from mechscope.lm.methods.heads import HeadProtocol, find_induction_heads
    from mechscope.lm.pipelines.toy import train_toy_run
    from mechscope.lm.toy import ToyConfig, load_toy

    # as `lm train-toy` does: the pipeline writes the checkpoints and training.json that load_toy reads
    train_toy_run(ToyConfig(layers=2, steps=1000, checkpoints=3), out=tmp_path / "toy", control=False, progress=False)
    model, _, _ = load_toy(tmp_path / "toy")
    r = find_induction_heads(model, HeadProtocol(n=20, batch=8, per_head_ablation=False, token_range=(1, 64)))
    ind = r.ranked("induction", "induction")[0]
    prev = r.ranked("previous_token", "previous_token")[0]
    seq = torch.randint(1, 64, (20,), generator=torch.Generator().manual_seed(1))
    tokens = torch.cat([torch.zeros(1, dtype=torch.long), seq, seq[:10]])
    graph, rep = attribution_graph(model, Transcoders(()), tokens, targets=[int(seq[10])])
    ep = edge_paths(rep, 0)
    assert ep.heads[0]["head"] == f"{ind['layer']}.{ind['head']}"
    q = qk_attribution(rep, ind["layer"], ind["head"], len(tokens) - 1)
    assert q.key_pos == 11
    assert q.key_writers[0]["label"] == f"head {prev['layer']}.{prev['head']}"
    assert math.isfinite(graph.scores["completeness"])
    # lm heads reads the run itself; its top induction head is one the toy's own training measure (another probe)
    # scores within 10% of its best in the last layer
    import json

    from mechscope.lm.pipelines.heads import induction_heads

    protocol = HeadProtocol(n=20, batch=8, per_head_ablation=False, token_range=(1, 64))
    _, found = induction_heads(str(tmp_path / "toy"), tmp_path / "heads", protocol)
    own = json.loads((tmp_path / "toy" / "training.json").read_text())["series"][-1]["induction"][1]
    top = found.ranked("induction", "induction")[0]
    assert (top["layer"], top["head"]) == (ind["layer"], ind["head"]) and top["layer"] == 1
    assert own[top["head"]] >= 0.9 * max(own) > 0.5
