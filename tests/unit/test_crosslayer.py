"""Cross-layer transcoders in the local replacement model: the logits reproduced exactly, every edge equal to a
direct intervention with attention frozen (to 1e-5 in float32), a feature's write going through all of its decoders
(checked by an intervention written independently of the replacement model's own runs), a CLT with zero
off-diagonal decoders giving the per-layer graph, circuit-tracer's file layout, refusals, and seeded training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mechscope.core.attribution_graph import build
from mechscope.core.dictionaries import DictionaryConfig, SparseDictionary
from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import attached_hooks, hooks
from mechscope.lm.methods.attribution_graph import GraphSettings, attribution_graph, intervene
from mechscope.lm.methods.crosslayer import CrossLayerTranscoder
from mechscope.lm.methods.edge_paths import edge_paths
from mechscope.lm.methods.replacement import LocalReplacement
from mechscope.lm.methods.replacement_training import TranscoderTraining, fold_scales, train_transcoders
from mechscope.lm.methods.transcoders import Transcoders
from mechscope.lm.models.transformer import HookedTransformer
from tests.unit.test_attribution_graph_lm import TOKENS, randomise, sources, tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one torch thread


def tiny3(family: str = "gpt2", seed: int = 1) -> HookedTransformer:
    """A 3-layer tiny random model (so a layer-0 feature has two decoders beyond its own layer)."""
    return tiny(family, seed, n_layers=3)


def random_clt(model, arch="topk", skip=False, hook="mlp.hook_in", seed=4) -> CrossLayerTranscoder:
    D, L = model.cfg.d_model, model.cfg.n_layers
    g = torch.Generator().manual_seed(seed)
    clt = CrossLayerTranscoder(
        L, D, 3 * D, arch, 6 if arch == "topk" else None, skip=skip, input_hook=hook, generator=g
    )
    return randomise(clt, g, arch, skip).eval()


def dense(rep) -> tuple[torch.Tensor, torch.Tensor]:
    """(every edge [n, n] as a dense matrix, the attributed logits' ids) of the unpruned graph."""
    ids, probs = rep.salient_logits()
    rep.set_targets(ids)
    built = build(rep, probs)
    t = built.triplets
    A = torch.zeros(built.n, built.n)
    A[t.rows, t.cols] = t.values
    return A, ids


CASES = [
    ("gpt2", "topk", False, "mlp.hook_in"),
    ("llama", "jumprelu", True, "mlp.hook_in"),
    ("gemma2", "topk", False, "mlp.hook_in"),
    ("neox", "relu", False, "hook_mlp_in"),
    ("gpt2", "relu", True, "hook_mlp_in"),
]


@pytest.mark.parametrize("family,arch,skip,hook", CASES)
def test_clt_logits_exact_and_every_edge_is_a_direct_intervention(family, arch, skip, hook):
    model = tiny3(family)
    rep = LocalReplacement(model, random_clt(model, arch, skip, hook), TOKENS, batch_size=8)
    with torch.no_grad():
        own = model(TOKENS[None])[0]
    assert (rep.replacement_logits() - own).abs().max() < 1e-5
    assert set(rep.feature_layer.tolist()) == {0, 1, 2}
    A, ids = dense(rep)
    nf, src = rep.n_features, rep.n_features + rep.n_errors + rep.n_inputs
    logits0, pre0 = rep.run("direct")
    dem0 = rep.demeaned(logits0, ids, rep.logit_pos)
    assert (pre0 - rep.feature_activation).abs().max() < 1e-5
    for s in sources(rep, None if (family, arch) == ("gpt2", "topk") else 60):
        logits1, pre1 = rep.run("direct", scale_source=(s, 2.0))
        assert torch.allclose(pre1 - pre0, A[:nf, s], atol=1e-5, rtol=0), (family, s)
        assert torch.allclose(rep.demeaned(logits1, ids, rep.logit_pos) - dem0, A[src:, s], atol=1e-5, rtol=0)
    assert attached_hooks(model) == []


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_feature_writes_through_every_later_decoder(family):
    """Written apart from LocalReplacement's runs: the frozen model with every MLP output set to its value on the
    prompt, plus ``a · W_dec[j -> l'][i]`` at the feature's position in every layer l' >= j (read from the decoders
    in circuit-tracer's layout); the change of the logits and of every feature's pre-activation (encoded by hand
    from the captured MLP inputs) equals the feature's column of the graph. Dropping the off-diagonal decoders
    gives different numbers, so the check sees them. The "model" intervention (the original network, nothing frozen,
    the decoder change added to the MLP outputs) is checked the same way."""
    model = tiny3(family)
    clt = random_clt(model)
    rep = LocalReplacement(model, clt, TOKENS, batch_size=8)
    A, ids = dense(rep)
    nf, src = rep.n_features, rep.n_features + rep.n_errors + rep.n_inputs
    L = clt.n_layers

    def measure(add: dict[int, torch.Tensor]):
        seen = {}

        def out(i):
            return lambda x, hook: rep.mlp_out[i][None] + add.get(i, 0)

        def grab(i):
            def fn(x, hook):
                seen[i] = x[0]

            return fn

        fwd = [(f"blocks.{i}.hook_mlp_out", out(i)) for i in range(L)]
        fwd += [(f"blocks.{i}.mlp.hook_in", grab(i)) for i in range(L)]
        with torch.no_grad(), rep.frozen(), hooks(model, fwd=fwd):
            logits = rep.logits_of(rep.final(model.run_blocks(rep.embedding[None]), True))[0]
        pre = torch.cat(
            [
                (seen[i] @ clt.W_enc[i] + clt.b_enc[i])[rep.feature_pos[s:e], rep.feature_index[s:e]]
                for i, (s, e) in enumerate(zip(rep.layer_start[:-1], rep.layer_start[1:], strict=True))
            ]
        )
        return pre, rep.demeaned(logits, ids, rep.logit_pos)

    def in_the_model(add: dict[int, torch.Tensor]) -> torch.Tensor:
        fwd = [(f"blocks.{i}.hook_mlp_out", lambda x, hook, i=i: x + add.get(i, 0)) for i in range(L)]
        with torch.no_grad(), hooks(model, fwd=fwd):
            return rep.logits_of(rep.final(model.run_blocks(rep.embedding[None]), False))[0]

    pre0, dem0 = measure({})
    assert torch.allclose(pre0, rep.feature_activation, atol=1e-5)
    layer0 = (rep.feature_layer == 0).nonzero().squeeze(1)
    checked = 0
    for s in layer0[:8].tolist():
        p, i, a = int(rep.feature_pos[s]), int(rep.feature_index[s]), float(rep.feature_activation[s])
        add = {}
        for dst in range(L):
            add[dst] = torch.zeros(rep.P, clt.d_model)
            add[dst][p] = a * clt.W_dec[0][i, dst]  # W_dec[j] [F, L - j, D]: feature i of layer 0 into layer dst
        pre1, dem1 = measure(add)
        assert torch.allclose(pre1 - pre0, A[:nf, s], atol=1e-5, rtol=0)
        assert torch.allclose(dem1 - dem0, A[src:, s], atol=1e-5, rtol=0)
        assert torch.allclose(rep.run("model", features={s: 2 * a})[0], in_the_model(add), atol=1e-5, rtol=0)
        own = {0: add[0]}  # its own layer's decoder only: the logits move otherwise
        _, dem_own = measure(own)
        checked += int((dem_own - dem0 - A[src:, s]).abs().max() > 1e-4)
    assert checked >= 6  # the off-diagonal decoders carry a measurable part of nearly every feature's effect


def test_clt_with_zero_off_diagonal_decoders_gives_the_per_layer_graph():
    model = tiny3("llama")
    clt = random_clt(model, "jumprelu", skip=True)
    with torch.no_grad():
        for j in range(clt.n_layers):
            clt.W_dec[j][:, 1:] = 0
    per_layer = []
    for j in range(clt.n_layers):
        cfg = DictionaryConfig(d_in=16, d_sae=48, architecture="jumprelu", transcoder=True, d_out=16, skip=True)
        d = SparseDictionary(cfg)
        with torch.no_grad():
            d.W_enc.copy_(clt.W_enc[j])
            d.b_enc.copy_(clt.b_enc[j])
            d.W_dec.copy_(clt.W_dec[j][:, 0])
            d.b_dec.copy_(clt.b_dec[j])
            d.threshold.copy_(clt.threshold[j])
            d.W_skip.copy_(clt.W_skip[j].T)  # the CLT adds x @ W_skip[j]; a SparseDictionary x @ W_skip.T
        per_layer.append(d)
    settings = GraphSettings(batch_size=8, check_sources=0)
    g1, rep1 = attribution_graph(model, Transcoders.of(per_layer), TOKENS, settings=settings)
    g2, rep2 = attribution_graph(model, clt, TOKENS, settings=settings)
    assert g2.dictionaries["crosslayer"] and g2.dictionaries["widths"] == g1.dictionaries["widths"]
    assert [n["id"] for n in g1.nodes] == [n["id"] for n in g2.nodes]
    assert len(g1.edges) == len(g2.edges)
    for (a1, b1, w1), (a2, b2, w2) in zip(g1.edges, g2.edges, strict=True):
        assert (a1, b1) == (a2, b2) and w1 == pytest.approx(w2, abs=1e-5)
    for k, v in g1.scores.items():
        assert g2.scores[k] == pytest.approx(v, abs=1e-6)
    assert torch.allclose(rep1.errors, rep2.errors, atol=1e-6)


def test_interventions_on_a_clt_feature_match_the_graph_for_small_steps():
    model = tiny3("gpt2", seed=3)
    graph, rep = attribution_graph(
        model, random_clt(model, "relu"), TOKENS, settings=GraphSettings(batch_size=8, check_sources=20)
    )
    assert graph.exactness["logits_max_abs_diff"] < 1e-5 and graph.exactness["edges_max_abs_error"] < 1e-5
    feat = next(f for f in graph.features() if f["layer"] == 0)
    iv = intervene(graph, rep, [feat["id"]], scale=0.999)  # frozen, features downstream re-encoded
    for row in iv.logits:
        assert row["frozen"] == pytest.approx(row["predicted_full"], abs=1e-5)
    ep = edge_paths(
        rep, 0
    )  # a logit's edges split by the head that carried them: a source elsewhere has no direct part
    assert ep.max_abs_residual < 1e-5 and edge_paths(rep, feat["id"]).max_abs_residual < 1e-5


def test_save_load_round_trip_in_circuit_tracers_layout(tmp_path):
    model = tiny3("gpt2")
    clt = random_clt(model, "jumprelu", skip=True)
    clt.save(tmp_path / "clt", model_name="tiny")
    # the files as circuit-tracer's load_clt reads them: W_enc_i [F, D], b_enc_i, b_dec_i, threshold_i,
    # W_dec_i [F, L - i, D]
    enc1, dec1 = (
        load_file(tmp_path / "clt" / "W_enc_1.safetensors"),
        load_file(tmp_path / "clt" / "W_dec_1.safetensors"),
    )
    assert torch.equal(enc1["W_enc_1"], clt.W_enc[1].T) and torch.equal(enc1["threshold_1"], clt.threshold[1])
    assert torch.equal(enc1["b_dec_1"], clt.b_dec[1]) and dec1["W_dec_1"].shape == (48, 2, 16)
    assert torch.equal(dec1["W_dec_1"][:, 1], clt.decoder(1, 2))
    back = CrossLayerTranscoder.load(tmp_path / "clt")
    assert (back.architecture, back.skip, back.input_hook) == ("jumprelu", True, "mlp.hook_in")
    for (k, v), (k2, v2) in zip(clt.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    r1 = LocalReplacement(model, clt, TOKENS)
    r2 = LocalReplacement(model, back, TOKENS)
    assert torch.equal(r1.errors, r2.errors) and torch.equal(r1.feature_activation, r2.feature_activation)
    # a folder as circuit-tracer writes it (no cfg.json, no skip): ReLU/JumpReLU read from the threshold's presence,
    # reading hook_resid_mid (mechscope's hook_mlp_in), circuit-tracer's default
    (tmp_path / "clt" / "cfg.json").unlink()
    for i in range(3):
        p = tmp_path / "clt" / f"W_enc_{i}.safetensors"
        save_file({k: v for k, v in load_file(p).items() if not k.startswith("W_skip")}, p)
    ct = CrossLayerTranscoder.load(tmp_path / "clt")
    assert (ct.architecture, ct.skip, ct.input_hook) == ("jumprelu", False, "hook_mlp_in")


def test_clts_that_do_not_fit_are_refused(tmp_path):
    model = tiny3("gpt2")
    with pytest.raises(MechscopeError, match="over 2 layers for a model with 3 MLP layers"):
        LocalReplacement(model, CrossLayerTranscoder(2, 16, 8, "relu"), TOKENS)
    with pytest.raises(MechscopeError, match="d_model is 16"):
        LocalReplacement(model, CrossLayerTranscoder(3, 8, 8, "relu"), TOKENS)
    clt = random_clt(model)
    clt.save(tmp_path / "c")
    p = tmp_path / "c" / "W_dec_1.safetensors"
    save_file({"W_dec_1": torch.zeros(48, 3, 16)}, p)
    with pytest.raises(MechscopeError, match=r"W_dec_1 is shape \[48, 3, 16\], expected \[48, 2, 16\]"):
        CrossLayerTranscoder.load(tmp_path / "c")
    clt.save(tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "cfg.json").read_text())
    (tmp_path / "d" / "cfg.json").write_text(json.dumps(cfg | {"feature_input_hook": "blocks.{layer}.hook_resid_pre"}))
    with pytest.raises(MechscopeError, match="feature_input_hook"):
        CrossLayerTranscoder.load(tmp_path / "d")
    with pytest.raises(MechscopeError, match="no per-layer dictionaries"):
        clt.layers  # noqa: B018  (the QK writer view reads per-layer dictionaries: refused in one line)


def test_training_a_clt_is_seeded_and_fits():
    model = tiny3("gpt2")
    ids = torch.randint(0, 32, (6000,), generator=torch.Generator().manual_seed(0)).tolist()
    base = dict(tokens=2048, eval_tokens=512, context=16, d_sae=32, k=4, batch=64, lr=3e-3, crosslayer=True)
    r1 = train_transcoders(model, ids, TranscoderTraining(epochs=4, **base))
    r2 = train_transcoders(model, ids, TranscoderTraining(epochs=4, **base))
    short = train_transcoders(model, ids, TranscoderTraining(epochs=1, **base))
    c1, c2 = r1.transcoders, r2.transcoders
    assert isinstance(c1, CrossLayerTranscoder) and r1.settings["crosslayer"]
    for v1, v2 in zip(c1.state_dict().values(), c2.state_dict().values(), strict=True):
        assert torch.equal(v1, v2)
    # held-out explained variance of every layer's MLP output (the CLT folded to raw units): well above its value
    # after one epoch; measured 0.57, 0.67, 0.64 (one epoch: 0.13, 0.09, -0.03)
    for a, b in zip(r1.layers, short.layers, strict=True):
        assert a["explained_variance"] > 0.45 and a["explained_variance"] > b["explained_variance"] + 0.3
        assert a["l0"] == pytest.approx(4.0, abs=0.1)
    with pytest.raises(MechscopeError, match="spans every MLP layer"):
        TranscoderTraining(layers=(0,), crosslayer=True).validate()


def test_folding_the_training_scales_keeps_every_output():
    """Training works on scaled activations (x' = s_in x per layer, y' = s_out y): the folded CLT on raw inputs
    gives the unfolded one's outputs divided by each output layer's scale, and the same features."""
    model = tiny3("gpt2")
    clt = random_clt(model, "relu", skip=True)
    x = torch.randn(20, 3, 16, generator=torch.Generator().manual_seed(5))
    s_in, s_out = torch.tensor([0.5, 2.0, 3.0]), torch.tensor([4.0, 0.25, 1.5])
    with torch.no_grad():
        want, f_want = clt(x * s_in[None, :, None])
        folded, f = fold_scales(clt, s_in, s_out)(x)
    assert torch.allclose(f, f_want, atol=1e-5)
    assert torch.allclose(folded, want / s_out[None, :, None], atol=1e-5)


@pytest.mark.parametrize("family,skip", [("gpt2", False), ("llama", True)])
def test_qk_attribution_with_a_clt_adds_up_through_every_decoder(family, skip):
    """The writers into layer 2 sum to the residual stream the plain model has there (captured with a hook, not
    through the replacement) only if each layer-0 feature's write goes through both of its decoders, into MLP 0
    and MLP 1: that off-diagonal term is large here, so a view that kept only the diagonal decoder would fail."""
    from mechscope.lm.methods import attribution_graph_qk as QK

    model = tiny3(family)
    rep = LocalReplacement(model, random_clt(model, "topk", skip), TOKENS, batch_size=8)
    got = {}
    with torch.no_grad(), hooks(model, fwd=[("blocks.2.hook_resid_pre", lambda x, hook: got.setdefault("r", x))]):
        model(TOKENS[None])
    labels = [str(t) for t in TOKENS.tolist()]
    for pos in (7, 3):
        w, labs = QK.writers(rep, 2, pos, labels)
        assert (w.sum(0) - got["r"][0, pos]).abs().max() < 1e-4
        assert any(lab.startswith("L0 #") for lab in labs) and any(lab.startswith("L1 #") for lab in labs)
        f0 = rep.acts[0][pos]
        off_diagonal = f0 @ rep.transcoders.decoder(0, 1)
        assert off_diagonal.abs().max() > 1e-2
    q = QK.qk_attribution(rep, 2, 1, 7)
    assert q.bias["writer_sum_error"] < 1e-4 and q.max_abs_residual < 1e-4 * max(1.0, abs(q.score))
    for args, said in (((0, 1.5), r"a QK head is two integers \(layer, head\), got \(0, 1.5\)"),  # "head 0.1.5"
                       ((True, 0), "a QK head is two integers"), ((2, 1, 6.5), "the QK query position must be an int")):
        with pytest.raises(MechscopeError, match=said):
            QK.qk_attribution(rep, *args)
    assert QK.qk_attribution(rep, np.int64(2), 1, torch.tensor(7)).score == pytest.approx(q.score)  # as before
