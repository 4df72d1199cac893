"""The language wing's cross-layer transcoder (CLT) and attribution graph, second pass, against outside truths: the
CLT formulas of Ameisen et al. 2025 § 2.1 written out in numpy, a circuit-tracer folder written by hand with
safetensors, the MLP's own neurons (exact, so no error node may carry anything), the model's own hooks and a numpy
encoder for the dashboards' top contexts, and the defaults the paper / the module docstring name."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mechscope.core.attribution_graph import Triplets, build
from mechscope.core.attribution_graph.graph import PhaseWork
from mechscope.core.attribution_graph.influence import normalised
from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import hooks
from mechscope.lm.methods.attribution_graph import GraphSettings, attribution_graph, feature_examples
from mechscope.lm.methods.crosslayer import CrossLayerTranscoder
from mechscope.lm.methods.edge_paths import edge_paths
from mechscope.lm.methods.transcoders import Transcoders
from mechscope.lm.models.transformer import HookedTransformer, TransformerConfig
from tests.graphs.test_attribution_graph_truths import graph as hand_graph
from tests.unit.test_attribution_graph_core import Planted
from tests.unit.test_attribution_graph_lm import TOKENS, random_transcoders, tiny
from tests.unit.test_crosslayer import random_clt, tiny3
from tests.unit.test_crosslayer_graph_truths import _clt
from tests.unit.test_lm_toy_replacement_truths import _relu_model

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = GraphSettings(batch_size=8, check_sources=0, node_threshold=1.0, edge_threshold=1.0)


def np_decode(clt: CrossLayerTranscoder, layer: int, feats: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    """y_l = b_dec[l] + sum_{j <= l} f_j @ W_dec[j][:, l - j] + x_l @ W_skip[l], by plain loops over features."""
    y = clt.b_dec[layer].detach().numpy().copy()
    for j in range(layer + 1):
        dec = clt.W_dec[j].detach().numpy()  # [F, L - j, D]
        for f in range(clt.d_transcoder):
            y += feats[j][f] * dec[f, layer - j]
    if clt.skip:
        y += x @ clt.W_skip[layer].detach().numpy()
    return y


def test_decode_of_one_layer_its_constant_write_encoders_and_reach_are_the_papers_sums():
    """Outside truth: the CLT reconstruction of § 2.1 in numpy (every earlier layer's features through their decoder
    into this layer, the skip as x @ W_skip); the constant part is b_dec + x @ W_skip; an encoder vector is a column of
    W_enc; layer j writes to j, j+1, ..., L-1."""
    clt = _clt("relu", skip=True, L=3, D=4, F=5)
    g = torch.Generator().manual_seed(3)
    feats = [torch.randn(5, generator=g, dtype=torch.float64) for _ in range(3)]
    x = torch.randn(4, generator=g, dtype=torch.float64)
    np_feats = [f.numpy() for f in feats]
    with torch.no_grad():
        for layer in range(3):
            got = clt.decode(layer, dict(enumerate(feats)), x).numpy()
            np.testing.assert_allclose(got, np_decode(clt, layer, np_feats, x.numpy()), rtol=1e-10, atol=1e-10)
            const, has_skip = clt.constant_write(layer, x)
            want = clt.b_dec[layer].numpy() + x.numpy() @ clt.W_skip[layer].numpy()
            np.testing.assert_allclose(const.numpy(), want, rtol=1e-10, atol=1e-10)
            assert has_skip is True
        enc = clt.encoder(1, torch.tensor([4, 0])).numpy()
        np.testing.assert_allclose(enc, clt.W_enc[1].numpy()[:, [4, 0]].T)
    assert [list(clt.reach(j)) for j in range(3)] == [[0, 1, 2], [1, 2], [2]]
    with pytest.raises(MechscopeError, match="input x"):
        clt.decode(0, dict(enumerate(feats)))


def test_a_fresh_clt_has_unit_concatenated_decoders_and_encoders_of_scale_one_over_root_d():
    """Outside truth: the documented initialisation (each feature's decoder into every layer, concatenated, a unit
    vector; the encoder Gaussian / sqrt(D)) and a JumpReLU threshold of 0.001; measured with numpy."""
    L, D, F = 3, 64, 48
    clt = CrossLayerTranscoder(L, D, F, "jumprelu", generator=torch.Generator().manual_seed(0))
    for i in range(L):
        w = clt.W_dec[i].detach().numpy().reshape(F, -1)
        np.testing.assert_allclose(np.sqrt((w**2).sum(1)), np.ones(F), rtol=1e-5)
    # layer 0's features write to 3 layers: each per-layer slice alone is not of unit norm
    per_slice = np.linalg.norm(clt.W_dec[0].detach().numpy(), axis=-1)
    assert per_slice.max() < 0.9
    assert np.std(clt.W_enc.detach().numpy()) == pytest.approx(1 / np.sqrt(D), rel=0.05)
    assert np.all(clt.threshold.detach().numpy() == np.float32(0.001))


def _ct_folder(root, L=2, D=3, F=5, threshold=True, skip=False, seed=0):
    """A CLT folder written by hand in circuit-tracer's layout (W_enc_i [F, D], no cfg.json); returns the tensors."""
    g = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    tensors = []
    for i in range(L):
        enc = {
            f"W_enc_{i}": torch.randn(F, D, generator=g),
            f"b_enc_{i}": torch.randn(F, generator=g),
            f"b_dec_{i}": torch.randn(D, generator=g),
        }
        if threshold:
            enc[f"threshold_{i}"] = torch.rand(F, generator=g)
        if skip:
            enc[f"W_skip_{i}"] = torch.randn(D, D, generator=g)
        save_file(enc, root / f"W_enc_{i}.safetensors")
        dec = {f"W_dec_{i}": torch.randn(F, L - i, D, generator=g)}
        save_file(dec, root / f"W_dec_{i}.safetensors")
        tensors.append(enc | dec)
    return tensors


def test_a_circuit_tracer_folder_written_by_hand_reads_as_circuit_tracer_means_it(tmp_path):
    """Outside truth: circuit-tracer's load_clt conventions (JumpReLU iff threshold_i is there, else ReLU; the input
    hook_resid_mid, i.e. before ln2; W_enc_i stored [F, D]); a skip path iff W_skip_i is there; the features of an
    input by numpy, z * (z > theta) with z = W_enc_i x + b_enc_i."""
    t = _ct_folder(tmp_path / "jr", skip=True)
    clt = CrossLayerTranscoder.load(tmp_path / "jr")
    assert (clt.architecture, clt.input_hook, clt.skip) == ("jumprelu", "hook_mlp_in", True)
    assert (clt.n_layers, clt.d_model, clt.d_transcoder) == (2, 3, 5)
    x = np.array([0.3, -1.2, 0.7], dtype=np.float32)
    for i in range(2):
        z = t[i][f"W_enc_{i}"].numpy() @ x + t[i][f"b_enc_{i}"].numpy()
        want = z * (z > t[i][f"threshold_{i}"].numpy())
        with torch.no_grad():
            got = clt.encode(i, torch.tensor(x)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(clt.decoder(0, 1).detach().numpy(), t[0]["W_dec_0"][:, 1].numpy())
    _ct_folder(tmp_path / "relu", threshold=False)
    plain = CrossLayerTranscoder.load(tmp_path / "relu")
    assert (plain.architecture, plain.input_hook, plain.skip) == ("relu", "hook_mlp_in", False)


@pytest.mark.parametrize(
    "cfg,hook",
    [({"feature_input_hook": "blocks.{layer}.ln2.hook_normalized"}, "mlp.hook_in"),
     ({"feature_input_hook": "blocks.0.hook_resid_mid"}, "hook_mlp_in")],
)  # fmt: skip
def test_a_cfg_naming_the_input_hook_by_another_tools_name_maps_to_the_same_place(tmp_path, cfg, hook):
    """Outside truth: ln2.hook_normalized is the MLP's input after ln2 (mechscope's mlp.hook_in); hook_resid_mid is
    the residual stream before ln2 (hook_mlp_in)."""
    _ct_folder(tmp_path, threshold=False)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert CrossLayerTranscoder.load(tmp_path).input_hook == hook


def test_a_cfg_with_k_zero_is_refused(tmp_path):
    """Outside truth: a TopK CLT keeps k >= 1 features; the cfg's k must be a positive integer."""
    _ct_folder(tmp_path, threshold=False)
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "topk", "k": 0}))
    with pytest.raises(MechscopeError, match="expected k to be a positive integer"):
        CrossLayerTranscoder.load(tmp_path)


def test_an_attention_only_model_has_no_mlp_layer_for_a_clt():
    """Outside truth: an attention-only transformer has no MLP, so a CLT over its 2 layers does not fit."""
    cfg = TransformerConfig(d_model=16, n_layers=2, n_heads=2, d_head=8, d_vocab=32, n_ctx=16, attn_only=True)
    with pytest.raises(MechscopeError, match="for a model with 0 MLP layers"):
        CrossLayerTranscoder(2, 16, 8, "relu").check(HookedTransformer(cfg))


def test_graph_settings_default_to_the_papers_thresholds_and_logit_budget():
    """Outside truth: Ameisen et al. 2025 / circuit-tracer's defaults as the module docstring names them: logits up
    to 95 % of the probability, at most 10; node and edge thresholds 0.8 and 0.98."""
    s = GraphSettings()
    assert (s.max_n_logits, s.desired_logit_prob, s.node_threshold, s.edge_threshold) == (10, 0.95, 0.8, 0.98)


@pytest.fixture(scope="module")
def clt_graph():
    model = tiny3("gpt2")
    clt = random_clt(model, "jumprelu", skip=False)
    labels = [f"t{t}" for t in TOKENS.tolist()]

    class Tok:
        def decode(self, ids):
            return " ".join(f"t{i}" for i in ids)

    g, rep = attribution_graph(model, clt, TOKENS, tokenizer=Tok(), targets=[9, 5], settings=QUICK)
    return g, rep, clt, labels


def test_clt_graph_nodes_are_labelled_by_layer_feature_and_their_token(clt_graph):
    """Outside truth: a feature node's id is circuit-tracer's layer_feature_pos; its label names the layer and the
    feature (distinct numbers here); its ctx_label is the prompt's token text at its position."""
    g, _, _, labels = clt_graph
    feats = [n for n in g.nodes if n["kind"] == "feature"]
    assert len(feats) > 5 and any(n["layer"] != n["feature"] for n in feats)
    for n in feats:
        layer, feature, pos = (int(v) for v in n["id"].split("_"))
        assert (n["layer"], n["feature"], n["pos"]) == (layer, feature, pos)
        assert n["label"] == f"L{layer} #{feature}" and n["ctx_label"] == labels[pos]
    for n in g.nodes:
        if n["kind"] == "error":
            assert n["label"] == f"error L{n['layer']}" and n["ctx_label"] == labels[n["pos"]]


def test_clt_graph_names_its_dictionary(clt_graph):
    """Outside truth: the CLT built here (JumpReLU, no skip path, 3 layers of 48 features, reading mlp.hook_in)."""
    g, _, clt, _ = clt_graph
    d = g.dictionaries
    assert d["architectures"] == ["jumprelu"] and d["widths"] == [48, 48, 48]
    assert (d["skip"], d["crosslayer"], d["input_hook"]) == (False, True, "mlp.hook_in")
    assert d["widths"] == [clt.d_transcoder] * clt.n_layers


def test_edge_paths_of_a_layer_one_feature_add_up_over_its_four_heads(clt_graph):
    """Outside truth: the docstring's identity edge = direct + sum over heads (a layer-1 feature of a 2-head model reads
    4 heads, all listed), each edge the graph's own stored edge; a source at another position has no direct part; the
    heads are listed by the size of their total, largest first."""
    g, rep, _, _ = clt_graph
    f = g.full
    feat = next(n for n in g.nodes if n["kind"] == "feature" and n["layer"] == 1 and n["pos"] == 7)
    ns, sel = len(f["features"]), f["features"].tolist()
    row = sel.index(feat["source"])  # the target's index among the graph's nodes
    src = lambda k: sel[k] if k < ns else k - ns + rep.n_features  # noqa: E731  (graph index -> source index)
    stored = {src(int(c)): float(v) for r, c, v in zip(f["rows"], f["cols"], f["values"], strict=True) if r == row}
    ep = edge_paths(rep, feat["id"], n=8)
    assert len(ep.heads) == 4 and {h["head"] for h in ep.heads} == {"0.0", "0.1", "1.0", "1.1"}
    totals = [abs(h["total"]) for h in ep.heads]
    assert totals == sorted(totals, reverse=True)
    assert len(ep.rows) == 8 and max(len(r["via"]) for r in ep.rows) > 2
    for r in ep.rows:
        assert r["edge"] == pytest.approx(r["direct"] + sum(r["via"].values()), abs=1e-5)
        assert r["edge"] == pytest.approx(stored[rep.source_of(r["source"])], abs=1e-5)
    assert ep.max_abs_residual < 1e-5


def test_edge_paths_with_a_skip_clt_leave_no_direct_part_to_another_position():
    """Outside truth: causal attention is the only way between positions, so a source at another position reaches
    the target only through the heads (the edge_paths docstring: exact, edge = direct + sum over heads). A later
    layer's skip path carries a head's output too; reading each head through the target's readout alone left 0.8
    of "direct" effect at other positions here."""
    model = tiny3("gpt2")
    _, rep = attribution_graph(model, random_clt(model, "relu", skip=True), TOKENS, targets=[9, 5], settings=QUICK)
    assert edge_paths(rep, 0).max_abs_residual < 1e-5


@pytest.mark.parametrize("family", ["gpt2", "neox", "gemma2"])
@pytest.mark.parametrize("skip", [False, True])
def test_edge_paths_leave_no_direct_part_to_another_position_in_each_block_layout(family, skip):
    """Outside truth as above, for a logit and for a layer-1 feature, in the three block layouts: sequential (GPT-2),
    parallel attention and MLP (GPT-NeoX: the MLP reads the block's input) and post-attention norms (Gemma 2: a
    head's output passes a frozen norm before the residual), with per-layer transcoders with and without a skip
    path. Before the readouts were taken per layer, Gemma 2 left 0.25 to 0.6 at other positions even without one."""
    model = tiny(family, n_layers=3)
    _, rep = attribution_graph(model, random_transcoders(model, "topk", skip=skip), TOKENS, settings=QUICK)
    feature = rep.source_id(int((rep.feature_layer == 1).nonzero()[-1]))
    assert edge_paths(rep, 0).max_abs_residual < 1e-5
    assert edge_paths(rep, feature).max_abs_residual < 1e-5


def test_a_logit_position_past_the_prompt_is_refused():
    """Outside truth: a prompt of 8 tokens has positions 0..7."""
    model = tiny3("gpt2")
    with pytest.raises(MechscopeError, match="outside the prompt's 0..7"):
        attribution_graph(model, random_clt(model, "relu"), TOKENS, targets=[3], logit_pos=8, settings=QUICK)


def test_targets_of_no_probability_share_the_weight_equally():
    """Outside truth: the logit weights are a distribution (they sum to 1: influence is a weighted average); two
    targets whose float32 softmax underflows to 0 (logits spread over 1500 by a scaled unembedding) get 1/2 each."""
    model = tiny("llama")
    with torch.no_grad():
        model.W_U_untied.mul_(300)
        z = model(TOKENS[None])[0, -1].double().numpy()
    ids = np.argsort(z)[:2].tolist()
    assert np.float32(np.exp(z[ids] - z.max()).max()) == 0.0
    g, _ = attribution_graph(model, random_transcoders(model), TOKENS, targets=ids, settings=QUICK)
    assert g.settings["target_probabilities"] == [0.5, 0.5]
    assert [n["probability"] for n in g.nodes if n["kind"] == "logit"] == [0.5, 0.5]


def _bos_model(**kw) -> HookedTransformer:
    model = _relu_model(**kw)
    model.cfg = replace(model.cfg, bos_token_id=int(TOKENS[0]))
    return model


def test_the_mlps_own_neurons_keep_position_zero_and_leave_every_error_node_empty():
    """Outside truth: the MLP's own neurons reconstruct it exactly (ReLU MLP), so even after a BOS token the graph
    keeps their features at position 0 and every error node is zero (so none has an edge to be shown)."""
    model = _bos_model()
    g, rep = attribution_graph(model, Transcoders.from_mlp_neurons(model), TOKENS, targets=[4], settings=QUICK)
    assert g.settings["skip_first"] is False
    assert any(n["kind"] == "feature" and n["pos"] == 0 for n in g.nodes)
    assert tuple(rep.errors.shape[:2]) == (2, len(TOKENS)) and float(rep.errors.abs().max()) < 1e-5
    assert not any(n["kind"] == "error" for n in g.nodes)  # an empty error node has no edge: pruned


def test_bos_skip_is_for_trained_dictionaries_on_prompts_longer_than_the_bos():
    """Outside truth: the rule in attribution_graph's comment (trained transcoders skip position 0 after BOS); a
    prompt that is BOS alone has nothing after it to skip to."""
    model = tiny3("gpt2")
    model.cfg = replace(model.cfg, bos_token_id=int(TOKENS[0]))
    clt = random_clt(model, "relu")
    g, _ = attribution_graph(model, clt, TOKENS, targets=[4], settings=QUICK)
    assert g.settings["skip_first"] is True
    assert not any(n["kind"] == "feature" and n["pos"] == 0 for n in g.nodes)
    g1, _ = attribution_graph(model, clt, TOKENS[:1], targets=[4], settings=QUICK)
    assert g1.settings["skip_first"] is False


def _np_acts(model, clt, contexts, layer, feature) -> np.ndarray:
    """The feature's activation [B, T] by numpy: relu(x W_enc[:, f] + b_enc[f]) of the model's own hooked input."""
    seen = {}
    with torch.no_grad(), hooks(model, fwd=[(f"blocks.{layer}.mlp.hook_in", lambda x, hook: seen.setdefault("x", x))]):
        model(contexts)
    x = seen["x"].double().numpy()
    w, b = clt.W_enc[layer, :, feature].detach().double().numpy(), float(clt.b_enc[layer, feature].detach())
    return np.maximum(x @ w + b, 0.0)


@pytest.mark.parametrize("before", [3, 20])  # a window cut by `before`, and one reaching back to position 1
def test_dashboard_examples_are_the_top_contexts_by_a_numpy_encoder(before):
    """Outside truth: each feature's activation on every context by numpy from the model's own hooked MLP input;
    position 0 (BOS) left out; the n contexts with the largest peak, in order, each a window of up to ``before``
    tokens before the peak (never position 0) and ``after`` after, with the activations in that window."""
    model = tiny3("gpt2")
    clt = random_clt(model, "relu")
    ctx = torch.randint(0, 32, (20, 12), generator=torch.Generator().manual_seed(7))
    want_feats = [(0, 3), (2, 11)]
    out = feature_examples(model, clt, ctx, want_feats, decode=lambda t: f"<{t}>", n=3, before=before, after=2)
    assert set(out) == {"0_3", "2_11"}
    for layer, f in want_feats:
        acts = _np_acts(model, clt, ctx, layer, f)
        acts[:, 0] = 0
        peaks = acts.max(1)
        rows = [r for r in np.argsort(-peaks, kind="stable")[:3] if peaks[r] > 0]
        exs = out[f"{layer}_{f}"]["examples"]
        assert len(exs) == len(rows) > 0
        for ex, r in zip(exs, rows, strict=True):
            p = int(acts[r].argmax())
            lo, hi = max(1, p - before), min(12, p + 3)
            assert ex["max"] == pytest.approx(peaks[r], rel=1e-4)
            assert ex["peak"] == p - lo and ex["tokens"][ex["peak"]] == f"<{int(ctx[r, p])}>"
            assert ex["tokens"] == [f"<{int(t)}>" for t in ctx[r, lo:hi]]
            np.testing.assert_allclose(ex["acts"], acts[r, lo:hi], rtol=1e-4, atol=1e-6)


def test_the_next_row_goes_to_the_feature_the_rows_so_far_make_most_influential():
    """Outside truth by hand (§ 3.5: re-estimate the influence as rows arrive): the logit reads f0 (1.0) and f1 (0.6),
    so f0 (5/8 of it) gets the first row; f0's row reads only f2, which then holds 5/8 against f1's 3/8, so f2, not
    f1, gets the second row (one row per update here)."""
    A = torch.zeros(5, 5)  # f0 f1 f2 | in | logit
    A[4, 0], A[4, 1], A[0, 2], A[2, 3], A[1, 3] = 1.0, 0.6, 2.0, 1.0, 1.0
    built = build(Planted(A, 3, 0, 1, 1, batch=1), torch.tensor([1.0]), max_feature_nodes=2, update_interval=1)
    assert built.order.tolist() == [0, 2] and built.visited.tolist() == [True, False, True]


def test_a_row_of_near_zero_weights_normalises_to_zero():
    """Outside truth: the documented floor, a row whose L1 norm is below min_norm (1e-10) gives zeros; a row above it
    is |A| / its L1 norm (numpy)."""
    t = Triplets(torch.tensor([0, 0, 1, 1]), torch.tensor([2, 3, 2, 3]), torch.tensor([1e-12, -3e-12, 1.0, -3.0]), 4)
    np.testing.assert_allclose(normalised(t).numpy(), [0.0, 0.0, 0.25, 0.75])


def test_circuit_tracer_metadata_and_logit_captions_follow_its_format():
    """Outside truth: circuit-tracer's frontend (graph_models.Node.logit_node: clerp f'Output "{token}"
    (p={token_prob:.3f})'; Metadata.node_threshold): the hand-built graph's 0.7 and 0.3, a threshold of 0.6."""
    g = replace(hand_graph(), settings={"node_threshold": 0.6})
    ct = g.to_circuit_tracer("s")
    clerps = {n["node_id"]: n["clerp"] for n in ct["nodes"] if n["feature_type"] == "logit"}
    assert clerps == {"3_20_1": 'Output "x" (p=0.700)', "3_21_1": 'Output "y" (p=0.300)'}
    assert ct["metadata"]["node_threshold"] == 0.6


class _Counter:
    """A stand-in WorkCounter: rows counted by hand (2 layers, 4 rows per pass: 8 rows a pass)."""

    layers = ("a", "b")
    forward_rows = backward_rows = 0

    def report(self, what, rows_per_pass):
        return {"what": what}


def test_phase_work_divides_each_phases_rows_by_the_rows_of_one_pass():
    """Outside truth by hand: 16 forward and 40 backward rows over 2 layers x 4 rows are 2 and 5 passes; a phase
    entered twice adds up (8 + 8 forward rows)."""
    c = _Counter()
    work = PhaseWork(c)
    for fwd, bwd in ((8, 40), (8, 0)):
        with work.phase("graph"):
            c.forward_rows += fwd
            c.backward_rows += bwd
    out = work.report("x", 4, {"rows": 3, "backward_passes": 2}, 8, "nothing")
    assert out["phases"] == {"graph": {"forward_passes": 2.0, "backward_passes": 5.0}}
    assert out["graph"] == {"rows": 3, "backward_passes": 2, "copies": 8}
