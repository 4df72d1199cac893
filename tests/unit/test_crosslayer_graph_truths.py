"""Outside truths for the cross-layer transcoder's arithmetic, the transformer graph's padding helpers and names,
and the CNN channel graph / overview: each test states the formula or hand count it checks against."""

from __future__ import annotations

import torch

from mechscope.lm.methods.crosslayer import CrossLayerTranscoder
from mechscope.lm.methods.graph import pad_sequences, short_name


def _clt(arch: str = "relu", skip: bool = True, L: int = 3, D: int = 4, F: int = 5) -> CrossLayerTranscoder:
    g = torch.Generator().manual_seed(0)
    clt = CrossLayerTranscoder(L, D, F, arch, 2 if arch == "topk" else None, skip=skip, generator=g)
    with torch.no_grad():
        for p in clt.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return clt.double().eval()


def test_decode_all_is_the_written_out_crosslayer_sum_with_a_skip_path():
    """Outside truth: the CLT formula written out by hand, y_l = b_dec[l] + sum_{j<=l} f_j @ W_dec[j][:, l-j]
    + x_l @ W_skip[l] (Ameisen et al. 2025 § 2.1; the skip as ``x @ W_skip``, a D x D matrix applied on the right)."""
    clt = _clt()
    g = torch.Generator().manual_seed(1)
    N, L = 2, clt.n_layers
    feats = torch.randn(N, L, clt.d_transcoder, generator=g, dtype=torch.float64)
    xs = torch.randn(N, L, clt.d_model, generator=g, dtype=torch.float64)
    with torch.no_grad():
        got = clt.decode_all(feats, xs)
        for n in range(N):
            for layer in range(L):
                want = clt.b_dec[layer].clone()
                for j in range(layer + 1):
                    for f in range(clt.d_transcoder):
                        want += feats[n, j, f] * clt.W_dec[j][f, layer - j]
                for a in range(clt.d_model):
                    want += xs[n, layer, a] * clt.W_skip[layer][a]  # row a of W_skip: what input dim a writes
                torch.testing.assert_close(got[n, layer], want)


def test_jumprelu_is_z_times_step_above_a_positive_threshold():
    """Outside truth: JumpReLU (Rajamanoharan et al. 2024) z * H(z - theta) with a strict step: a value exactly at
    the threshold is 0. And mechscope's own rule, not circuit-tracer's (whose thresholds are positive and unclamped):
    a threshold set below 0 acts as 0, so no activation is negative."""
    clt = _clt("jumprelu", skip=False, L=1, F=4)
    with torch.no_grad():
        clt.threshold.copy_(torch.tensor([[0.5, 0.5, -1.0, -1.0]], dtype=torch.float64))
    pre = torch.tensor([[0.5, 0.75, -0.5, 0.25]], dtype=torch.float64)
    with torch.no_grad():
        out = clt.activate(0, pre)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.75, 0.0, 0.25]], dtype=torch.float64))


def test_padded_tokens_valid_mask_is_the_hand_written_one():
    """Outside truth: a hand-written padding of three sequences (lengths 3, 1, 2; pad id 7) and its mask."""
    t = pad_sequences([[1, 2, 3], [4], [5, 6]], pad=7)
    assert t.ids.tolist() == [[1, 2, 3], [4, 7, 7], [5, 6, 7]]
    assert t.lengths.tolist() == [3, 1, 2]
    assert t.valid().tolist() == [[True, True, True], [True, False, False], [True, True, False]]
    assert t[1:].valid().tolist() == [[True, False, False], [True, True, False]]


def test_short_names_are_the_papers_layer_dot_head():
    """Outside truth: the IOI / EAP papers' names, head H of layer L as "L.H" (e.g. "9.6"), an MLP as "MLP L"."""
    assert short_name("blocks.9.attn.h6") == "9.6"
    assert short_name("blocks.0.attn.h11") == "0.11"
    assert short_name("blocks.3.mlp") == "MLP 3"
    assert short_name("embed") == "embed"
    assert short_name("unembed") == "unembed"


def _bn_cnn():
    from mechscope.cnn.models.cnn import CNN, CNNConfig

    torch.manual_seed(0)
    cfg = CNNConfig(image_size=8, channels=(3, 2), kernel_size=3, pool=1, n_classes=2, batchnorm=True, mean=0.0,
                    std=0.25)  # fmt: skip
    model = CNN(cfg).eval()
    with torch.no_grad():
        for bn in (model.conv1.norm, model.conv2.norm):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.05, 0.2)
            bn.weight.uniform_(0.5, 1.5)
            bn.eps = 0.3  # large, so a scale that drops it is visibly wrong
    return model


def _zeroed(model, x, param, index, metric):
    saved = param[index].clone()
    with torch.no_grad():
        param[index] = 0
        out = float(metric(model(x)))
        param[index] = saved
    return out


def test_cnn_edges_out_of_a_normalised_input_and_through_a_wide_eps_batchnorm_are_kernel_ablations():
    """Outside truth: the model itself with a kernel zeroed. With mean 0, zeroing edge input -> conv1.cj is
    zeroing the filter W1[j] (the convolution sees x / std), and zeroing conv1.ci -> conv2.cj is zeroing W2[j, i]
    (eval BatchNorm y = w (z - mu) / sqrt(var + eps) + b, its eps included)."""
    from mechscope.cnn.methods.graph import CNNEdges
    from mechscope.cnn.models.spec import walk
    from mechscope.core.graphs import edge_patching

    model = _bn_cnn()
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    metric = lambda out: out[:, 1].mean()  # noqa: E731
    edges = CNNEdges(walk(model))
    exact = edge_patching(edges, x, metric=metric, ablation="zero")
    with torch.no_grad():
        base = float(metric(model(x)))
    for j in range(3):
        want = _zeroed(model, x, model.conv1.conv.weight, j, metric) - base
        got = float(exact.scores[edges.graph.edge_id("input", f"conv1.c{j}", "in")])
        assert abs(got - want) < 1e-5, (j, got, want)
    for i, j in [(0, 1), (2, 0)]:
        want = _zeroed(model, x, model.conv2.conv.weight, (j, i), metric) - base
        got = float(exact.scores[edges.graph.edge_id(f"conv1.c{i}", f"conv2.c{j}", "in")])
        assert abs(got - want) < 1e-5, (i, j, got, want)


def test_overview_confusion_matrix_and_accuracies_are_hand_counted():
    """Outside truth: a hand count over six labelled predictions, confusion[true][predicted] (sklearn's
    convention), accuracy = diagonal / total, per-class accuracy = diagonal / row sum."""
    from types import SimpleNamespace

    from mechscope.cnn.methods.overview import overview

    y = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 2])
    logits = torch.nn.functional.one_hot(pred, 3).float()
    ov = overview(None, None, SimpleNamespace(y=y, n_classes=3), SimpleNamespace(pred=pred, logits=logits))
    assert ov.n_test == 6
    assert ov.confusion_matrix == ((1, 2, 0), (0, 1, 1), (0, 0, 1))
    assert ov.test_accuracy == 0.5
    assert [round(a, 6) for a in ov.per_class_accuracy] == [round(1 / 3, 6), 0.5, 1.0]


def test_weights_view_summaries_are_the_l2_norm_and_sum_of_each_kernel():
    """Outside truth: per (target, source) channel pair, the Euclidean norm and the plain sum of the 3x3 kernel,
    computed by hand loops; each class's read-out template is its fc row laid out as [C, H, W] and its per-channel
    sum the sum of that channel's block of the row."""
    from mechscope.cnn.methods.overview import weights_view
    from mechscope.cnn.models.cnn import CNN, CNNConfig
    from mechscope.cnn.models.spec import walk

    torch.manual_seed(3)
    model = CNN(CNNConfig(image_size=10, channels=(2, 3), kernel_size=3, pool=2, n_classes=2)).eval()
    w = weights_view(model, walk(model))
    k2 = model.conv2.conv.weight.detach()
    (conn,) = w.connections
    assert (conn.source, conn.target) == ("conv1", "conv2")
    for j in range(3):
        for i in range(2):
            vals = [float(v) for v in k2[j, i].flatten()]
            assert abs(float(conn.kernel_norm[j, i]) - sum(v * v for v in vals) ** 0.5) < 1e-5
            assert abs(float(conn.kernel_sum[j, i]) - sum(vals)) < 1e-5
    fc = model.fc.weight.detach()
    block = fc.shape[1] // 3
    for k in range(2):
        for c in range(3):
            want = float(fc[k, c * block : (c + 1) * block].sum())
            assert abs(float(w.readout_class_channel_sum[k, c]) - want) < 1e-5
    torch.testing.assert_close(w.first_filters, model.conv1.conv.weight.detach())
