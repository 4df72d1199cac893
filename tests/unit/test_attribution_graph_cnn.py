"""Attribution graphs of the CNN: exactness on tiny random CNNs (the replacement model's logits equal the CNN's; every
edge equals a direct intervention with the ReLU and max-pool masks frozen, to 1e-5 in float32), for SAEs on each
stage's output, channel transcoders across each ReLU and the CNN's own channels (exact: every error node zero), with
and without batch norm, a hidden layer and padding; interventions against the graph's predictions; bad input."""

from __future__ import annotations

import json

import pytest
import torch

from mechscope.cnn.methods.attribution_graph import (
    CnnAttributionGraph,
    CnnGraphSettings,
    cnn_attribution_graph,
    intervene,
)
from mechscope.cnn.methods.replacement import CnnReplacement, StageDictionaries
from mechscope.cnn.models.cnn import CNN, CNNConfig
from mechscope.core.attribution_graph import build, load_graph
from mechscope.core.dictionaries import DictionaryConfig, SparseDictionary
from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import attached_hooks

SHAPES = {
    "plain": dict(channels=(4, 6), image_size=12, kernel_size=3),
    "bn-hidden-pad": dict(channels=(3, 5), image_size=10, kernel_size=3, padding=1, batchnorm=True, hidden=7),
}


def tiny_cnn(shape: str = "plain", seed: int = 0) -> CNN:
    torch.manual_seed(seed)
    model = CNN(CNNConfig(n_classes=5, **SHAPES[shape]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for m in model.modules():  # batch norm with non-trivial running statistics (eval mode uses them)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return model.eval()


def random_dicts(model: CNN, kind: str, seed: int = 1) -> StageDictionaries:
    if kind == "channels":
        return StageDictionaries.channels(model)
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in model.config.channels:
        cfg = DictionaryConfig(d_in=c, d_sae=3 * c, architecture="topk", k=3, transcoder=kind == "transcoder", d_out=c)
        d = SparseDictionary(cfg, generator=g)
        with torch.no_grad():
            d.b_enc.normal_(0, 0.1, generator=g)
            d.b_dec.normal_(0, 0.1, generator=g)
        out.append(d)
    return StageDictionaries.of(kind, out)


def image(model: CNN, seed: int = 3) -> torch.Tensor:
    s = model.config.image_size
    return torch.rand(1, s, s, generator=torch.Generator().manual_seed(seed))


def sources(rep, n_features: int | None) -> list[int]:
    """Source indices to check by intervention: every one, or every error source and ``n_features`` features and
    pixels drawn with a seed."""
    nf, total = rep.n_features, rep.n_features + rep.n_errors + rep.n_inputs
    if n_features is None or nf <= n_features:
        return list(range(total))
    g = torch.Generator().manual_seed(0)
    feats = torch.randperm(nf, generator=g)[:n_features].sort().values.tolist()
    pixels = (nf + rep.n_errors + torch.randperm(rep.n_inputs, generator=g)[:n_features]).sort().values.tolist()
    return feats + list(range(nf, nf + rep.n_errors)) + pixels


# in `make test`: SAEs on the plain CNN (every source), transcoders with batch norm, padding and a hidden layer, the
# plain CNN's channels; the other three cases are slow-marked (each is a forward pass per checked source)
FAST = {("plain", "sae"), ("bn-hidden-pad", "transcoder"), ("plain", "channels")}
CASES = [
    pytest.param(shape, kind, marks=[] if (shape, kind) in FAST else [pytest.mark.slow])
    for shape in SHAPES
    for kind in ("sae", "transcoder", "channels")
]


@pytest.mark.parametrize("shape,kind", CASES)
def test_logits_exact_and_every_edge_is_a_direct_intervention(shape, kind):
    model = tiny_cnn(shape)
    rep = CnnReplacement(model, random_dicts(model, kind), image(model), batch_size=16)
    with torch.no_grad():
        own = model(image(model)[None])[0]
    assert (rep.replacement_logits() - own).abs().max() < 1e-5
    if kind == "channels":  # the CNN's own channels are an exact transcoder: nothing is left to the error nodes
        assert max(float(e.abs().max()) for e in rep.errors.values()) < 1e-6
    rep.set_targets([int(own.argmax()), 0])
    built = build(rep, torch.tensor([0.5, 0.5]))
    t = built.triplets
    A = torch.zeros(built.n, built.n)
    A[t.rows, t.cols] = t.values
    nf, src = rep.n_features, rep.n_features + rep.n_errors + rep.n_inputs
    logits0, pre0 = rep.run("direct")
    dem0 = rep.demeaned(logits0, rep.logit_targets)
    assert (pre0 - rep.feature_activation).abs().max() < 1e-5
    # every source (features, error vectors, pixels) for the plain CNN's SAEs; elsewhere every error source and 40
    # features and 40 pixels drawn with a seed (the cost is one forward pass per source)
    for s in sources(rep, None if (shape, kind) == ("plain", "sae") else 40):
        logits1, pre1 = rep.run("direct", scale_source=(s, 2.0))
        dem1 = rep.demeaned(logits1, rep.logit_targets)
        assert torch.allclose(pre1 - pre0, A[:nf, s], atol=1e-5, rtol=0), (kind, s)
        assert torch.allclose(dem1 - dem0, A[src:, s], atol=1e-5, rtol=0), (kind, s)
    assert attached_hooks(model) == []


def test_graph_checks_itself_prunes_and_round_trips(tmp_path):
    model = tiny_cnn("bn-hidden-pad")
    graph, rep = cnn_attribution_graph(
        model, random_dicts(model, "sae"), image(model), settings=CnnGraphSettings(batch_size=16, check_sources=30)
    )
    e = graph.exactness
    assert e["logits_max_abs_diff"] < 1e-5 and e["edges_max_abs_error"] < 1e-5 and e["edges_sources_checked"] == 30
    assert all(0 <= v <= 1 + 1e-6 for v in graph.scores.values())
    assert graph.counts["feature_nodes"] <= graph.counts["active_features"]
    p = tmp_path / "graph.json"
    p.write_text(json.dumps(graph.to_dict()))
    back = load_graph(p, CnnAttributionGraph)
    assert back.nodes == graph.nodes and back.edges == graph.edges
    ct = graph.to_circuit_tracer("g")
    assert {"metadata", "nodes", "links", "qParams"} <= set(ct)
    assert "<svg" in graph._repr_html_() or "agv-svg" in graph._repr_html_()


def test_the_model_step_is_the_network_with_the_decoder_change_added_by_a_plain_hook():
    """A feature's ablation, the "model" step: the CNN itself (every ReLU and max pool live, no error held) with
    −activation × the feature's decoder row added at its position of the stage's hook_post (where a channel
    transcoder writes), by a plain torch hook; the demeaned logits against the report's row, for every feature."""
    model = tiny_cnn("plain", seed=4)
    dicts = random_dicts(model, "transcoder")
    x = image(model)
    graph, rep = cnn_attribution_graph(model, dicts, x, settings=CnnGraphSettings(batch_size=16, check_sources=0))
    shapes = {}
    handles = [model.get_submodule(f"conv{i}.hook_post").register_forward_hook(
        lambda m, a, out, i=i: shapes.__setitem__(f"conv{i}", out.shape)) for i in (1, 2)]  # fmt: skip
    with torch.no_grad():
        model(x[None])
    for h in handles:
        h.remove()
    for feat in graph.features():
        iv = intervene(graph, rep, [feat["id"]])
        stage = f"conv{feat['layer'] + 1}"
        y, x0 = divmod(feat["pos"], shapes[stage][-1])  # positions are y * width + x in the stage's own map
        change = -feat["activation"] * dicts.layers[feat["layer"]].W_dec[feat["feature"]].detach()

        def logits(add: bool, stage=stage, y=y, x0=x0, change=change):
            def edit(mod, args, out):
                if not add:
                    return None
                out = out.clone()
                out[0, :, y, x0] += change
                return out

            handle = model.get_submodule(f"{stage}.hook_post").register_forward_hook(edit)
            try:
                with torch.no_grad():
                    out = model(x[None])[0]
            finally:
                handle.remove()
            return out[rep.logit_targets] - out.mean()

        moved = (logits(True) - logits(False)).tolist()
        assert [row["model"] for row in iv.logits] == pytest.approx(moved, abs=1e-5)


def test_interventions_match_the_graph_for_small_steps():
    model = tiny_cnn("plain", seed=4)
    graph, rep = cnn_attribution_graph(
        model,
        random_dicts(model, "transcoder"),
        image(model),
        settings=CnnGraphSettings(batch_size=16, check_sources=0),
    )
    feat = graph.features()[0]
    iv = intervene(graph, rep, [feat["id"]], scale=0.999)  # a small step: no mask or feature changes
    for row in iv.logits:
        assert row["frozen"] == pytest.approx(row["predicted_full"], abs=1e-5)
    iv = intervene(graph, rep, [feat["id"]])
    assert iv.changes[feat["id"]][1] == 0.0 and "ablate" in iv.summary()
    with pytest.raises(MechscopeError, match="only feature nodes"):
        intervene(graph, rep, [next(n["id"] for n in graph.nodes if n["kind"] == "input")])
    with pytest.raises(MechscopeError, match="give a value or a scale"):  # the wings share one check
        intervene(graph, rep, [feat["id"]], value=None, scale=None)


def test_bad_input_is_one_line():
    model = tiny_cnn("plain")
    dicts = random_dicts(model, "sae")
    with pytest.raises(MechscopeError, match="2 stages"):
        StageDictionaries("sae", dicts.layers[:1]).check(model)
    wrong = SparseDictionary(DictionaryConfig(d_in=5, d_sae=9))
    with pytest.raises(MechscopeError, match="the stage has 4"):
        CnnReplacement(model, StageDictionaries("sae", (wrong, dicts.layers[1])), image(model))
    with pytest.raises(MechscopeError, match="class 7 outside"):
        cnn_attribution_graph(model, dicts, image(model), target=7, settings=CnnGraphSettings(check_sources=0))


def test_too_few_training_positions_for_one_batch_is_one_line_not_a_hang():
    """With fewer positions than one batch the shuffled batches never yielded one and training waited forever."""
    from mechscope.cnn.methods.attribution_graph import CnnDictionaryTraining, train_dictionaries

    model = tiny_cnn()
    images = torch.rand(3, *model.input_shape)
    s = CnnDictionaryTraining(images=3, rows=1000, steps=2, batch=512)
    with pytest.raises(MechscopeError, match=r"conv1 gives [\d,]+ training positions from 3 images, fewer than one"):
        train_dictionaries(model, images, images, s)
    small = train_dictionaries(model, images, images, CnnDictionaryTraining(images=3, rows=1000, steps=2, batch=3))
    assert len(small.stages) == 2
