"""The CNN's local replacement model and attribution graph (cnn/methods/replacement.py, attribution_graph.py), second
round, against outside truths: receptive fields by the standard (jump, rf, start) recurrence; pixel and feature edges
by the product of the linear maps written in numpy (a conv's weights, the read-out's rows, the clean max-pool
winners); node placement, error norms and the graph's pixels, labels and probability by numpy; each feature's top
image patches by a plain sort of the activations read with plain hooks; the quality row by numpy formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mechscope.cnn.methods.attribution_graph import (
    CnnGraphSettings,
    _grid,
    _quality,
    _rf_size,
    cnn_attribution_graph,
    feature_examples,
    node_info,
)
from mechscope.cnn.methods.replacement import CnnReplacement, StageDictionaries, receptive_centres
from mechscope.cnn.models.cnn import CNN, CNNConfig
from tests.graphs.test_cnn_replacement_truths import by_hand, hooked, rows
from tests.unit.test_attribution_graph_cnn import image, random_dicts, tiny_cnn
from tests.unit.test_graph_quality_rows import dictionary_forward, hand_dictionary, np_

# ---- receptive fields by the standard recurrence ------------------------------------------------------------------


def recurrence(cfg: CNNConfig, stage: int, kind: str) -> tuple[float, float, int, int]:
    """(start, jump, rf, n) of ``stage``'s dictionary grid by the textbook recurrence over (kernel, stride, padding)
    layers: n' = ⌊(n + 2p − k) / s⌋ + 1, j' = j·s, r' = r + (k − 1)·j, start' = start + ((k − 1)/2 − p)·j. A
    transcoder's grid is the conv map (its own pool not applied), an SAE's the pooled one."""
    ops = []
    for i in range(stage + 1):
        ops.append((cfg.kernel_size, 1, cfg.padding))
        if cfg.pool > 1 and (i < stage or kind == "sae"):
            ops.append((cfg.pool, cfg.pool, 0))
    n, j, r, start = cfg.image_size, 1.0, 1, 0.0
    for k, s, p in ops:
        n = (n + 2 * p - k) // s + 1
        r += (k - 1) * j
        start += ((k - 1) / 2 - p) * j
        j *= s
    return start, j, int(r), n


@pytest.mark.parametrize("kind", ["sae", "transcoder", "channels"])
def test_centres_sizes_and_grids_follow_the_standard_recurrence(kind):
    """Truth: the recurrence above for 23×23 images, 5×5 convs with padding 1 and 2×2 pools over three stages (odd
    maps 21 and 8 → 10 and 4: floor, not ceiling)."""
    model = CNN(CNNConfig(image_size=23, channels=(2, 3, 2), kernel_size=5, padding=1, pool=2))
    got = receptive_centres(model, kind)
    for st in range(3):
        start, jump, rf, n = recurrence(model.config, st, "sae" if kind == "sae" else "transcoder")
        assert got[st] == (pytest.approx(start), pytest.approx(jump), n)
        assert _rf_size(model, st, kind) == rf
        assert _grid(model, st, kind) == (n, n)


# ---- edges by the product of the linear maps -------------------------------------------------------------------


def rgb_cnn(seed: int = 0) -> CNN:
    """Three input channels with distinct normalisations, 10×10 → conv 8 → pool 4 → conv 2 → pool 1."""
    torch.manual_seed(seed)
    cfg = CNNConfig(in_channels=3, image_size=10, channels=(3, 4), kernel_size=3, n_classes=5,
                    mean=(0.2, 0.5, 0.4), std=(0.3, 0.25, 0.5))  # fmt: skip
    model = CNN(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 7)) * 0.1)
    return model.eval()


def rgb_image(seed: int = 2) -> torch.Tensor:
    return torch.rand(3, 10, 10, generator=torch.Generator().manual_seed(seed))


def test_a_pixel_edge_to_a_first_stage_channel_is_the_conv_weights_times_each_channel_of_the_pixel():
    """Truth (numpy): the first conv's pre-activation is linear in the normalised image, so pixel (py, px)'s edge to
    channel ch at (y, x) is Σ_c W[ch, c, py − y, px − x] · x_norm[c, py, px]: summed over the three input channels,
    zero outside the 3×3 window."""
    model, x = rgb_cnn(), rgb_image()
    rep = CnnReplacement(model, StageDictionaries.channels(model), x)
    xn = (x.numpy() - np.array([0.2, 0.5, 0.4])[:, None, None]) / np.array([0.3, 0.25, 0.5])[:, None, None]
    W = model.conv1.conv.weight.detach().numpy()
    picks = [s for s in range(rep.layer_start[1]) if int(rep.feature_pos[s]) % 8 != int(rep.feature_pos[s]) // 8]
    assert len(picks) > 3
    for s in picks[:6]:
        ch, (y, x0) = int(rep.feature_index[s]), divmod(int(rep.feature_pos[s]), 8)
        want = np.zeros((10, 10))
        for c in range(3):
            for dy in range(3):
                for dx in range(3):
                    want[y + dy, x0 + dx] += W[ch, c, dy, dx] * xn[c, y + dy, x0 + dx]
        got = rep.feature_rows(torch.tensor([s]))[0, -100:].reshape(10, 10).numpy()
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_last_stage_channel_edge_to_the_logit_is_its_activation_times_the_demeaned_readout_at_the_winner():
    """Truth (numpy): with the clean max-pool winners frozen, the demeaned logit c is linear in the last stage's
    post-ReLU map through the read-out: the edge from channel ch at (y, x) is activation × (fc.W[c] − mean_k fc.W[k])
    at the read-out unit of its pooled cell if (y, x) won the pool, else 0."""
    model, x = tiny_cnn("plain", seed=3), image(tiny_cnn("plain", seed=3), seed=8)
    rep = CnnReplacement(model, StageDictionaries.channels(model), x)
    with torch.no_grad():
        _, _, wins = by_hand(model, x, lambda i, p: p)
    rep.set_targets([3])
    fc = model.fc.weight.detach().numpy()
    dw = fc[3] - fc.mean(0)
    win = wins[1][0].numpy()  # [C, 1, 1]: each channel's winning flat position in the 3×3 conv map
    row = rep.logit_rows(torch.tensor([0]))[0].numpy()
    s0, s1 = rep.layer_start[1], rep.layer_start[2]
    assert s1 - s0 > 2
    for s in range(s0, s1):
        ch, pos = int(rep.feature_index[s]), int(rep.feature_pos[s])
        want = float(rep.feature_activation[s]) * dw[ch] if pos == win[ch, 0, 0] else 0.0
        assert row[s] == pytest.approx(want, abs=1e-5)
    np.testing.assert_allclose(row[:s0], 0.0, atol=1e-6)  # the first stage reaches the logit only through stage 2


# ---- node placement and the graph's fields -------------------------------------------------------------------


def test_node_info_places_nodes_at_their_receptive_field_columns_and_measures_errors_by_numpy():
    """Truth: a stage position p of a w-wide grid sits at column start + (p mod w)·jump (the recurrence above), a
    pixel at p mod W, the logit at (W − 1)/2; an error node's norm is √Σ e² over the channels (numpy)."""
    model = tiny_cnn("plain")
    rep = CnnReplacement(model, random_dicts(model, "sae"), image(model))
    rep.set_targets([2])
    info = node_info(rep, ["2"], torch.tensor([0.25]))
    cols = {}
    for st, (h, w) in enumerate(rep.grid):
        start, jump, _, n = recurrence(model.config, st, "sae")
        assert (h, w) == (n, n)
        cols[st] = [start + (p % w) * jump for p in range(h * w)]
    want_f = [cols[int(la)][int(p)] for la, p in zip(rep.feature_layer, rep.feature_pos, strict=True)]
    np.testing.assert_allclose(info.feature_ctx.numpy(), want_f, atol=1e-6)
    np.testing.assert_allclose(info.error_ctx.numpy(), cols[0] + cols[1], atol=1e-6)
    norms = np.concatenate([np.sqrt((rep.errors[i].numpy().astype(np.float64) ** 2).sum(-1)) for i in range(2)])
    np.testing.assert_allclose(info.error_norm.numpy(), norms, rtol=1e-5)
    np.testing.assert_allclose(info.input_ctx.numpy(), [p % 12 for p in range(144)])
    assert info.logit_ctx == pytest.approx(5.5)


def test_an_rgb_graph_records_the_grey_pixels_the_channel_summed_pixel_values_and_the_softmax_probability():
    """Truth (numpy): image_pixels is the channel mean of the image (to 3 decimals); a pixel node's value is the sum
    over channels of (x − mean_c)/std_c; the target probability the softmax of the CNN's logits; input labels
    "(row,col)" of a 10-wide image."""
    model, x = rgb_cnn(seed=1), rgb_image(seed=5)
    s = CnnGraphSettings(batch_size=8, check_sources=0, node_threshold=1.0, edge_threshold=1.0)
    g, _ = cnn_attribution_graph(model, StageDictionaries.channels(model), x, target=4, settings=s)
    xs = x.numpy().astype(np.float64)
    np.testing.assert_allclose(np.asarray(g.settings["image_pixels"]), xs.mean(0), atol=6e-4)
    xn = (xs - np.array([0.2, 0.5, 0.4])[:, None, None]) / np.array([0.3, 0.25, 0.5])[:, None, None]
    pixels = [n for n in g.nodes if n["kind"] == "input"]
    assert len(pixels) > 3
    for n in pixels:
        assert n["value"] == pytest.approx(xn[:, n["pos"] // 10, n["pos"] % 10].sum(), abs=1e-4)
    with torch.no_grad():
        z = model(x[None])[0].double().numpy()
    p = math.exp(z[4] - z.max()) / np.exp(z - z.max()).sum()
    assert g.settings["target_probabilities"] == [pytest.approx(p, rel=1e-6)] and f"p={p:.3f}" in g.title
    assert (g.input_labels[1], g.input_labels[23]) == ("(0,1)", "(2,3)")


# ---- top image patches by a plain sort --------------------------------------------------------------------------


def acts_by_hand(model: CNN, dicts: StageDictionaries, x: torch.Tensor, stage: int) -> np.ndarray:
    """[B, h*w, d_sae] activations: the channels' own post-ReLU map, or the SAE's latents on hook_out (its forward)."""
    name = f"conv{stage + 1}.hook_post" if dicts.kind == "channels" else f"conv{stage + 1}.hook_out"
    t = hooked(model, x, [name])[name]
    if dicts.kind == "channels":
        return t.permute(0, 2, 3, 1).reshape(len(x), -1, t.shape[1]).numpy()
    with torch.no_grad():
        f = torch.stack([dicts.layers[stage](rows(t[b : b + 1]))[1] for b in range(len(x))])
    return f.numpy()


@pytest.mark.parametrize(
    "kind,feats,lengths",
    [("channels", [(0, 1), (1, 2), (1, 5)], [5, 5, 5]), ("sae", [(0, 2), (0, 6), (1, 6)], [5, 2, 5])],
)
def test_top_patches_are_a_plain_sort_of_each_images_strongest_activation(kind, feats, lengths):
    """Truth: activations read with plain hooks over 510 images (past the 500-image batch); per image the strongest
    position, images sorted by it (numpy, descending), the crop centred on the recurrence's receptive-field centre
    with its rf size, grey levels round(255 · mean over channels); SAE latent 6 of stage 0 fires on 2 images only."""
    model = tiny_cnn("plain", seed=1)
    dicts = random_dicts(model, kind)
    x = torch.rand(510, 1, 12, 12, generator=torch.Generator().manual_seed(9))
    top = int(acts_by_hand(model, dicts, x, feats[0][0])[:, :, feats[0][1]].max(1).argmax())
    x[[top, 507]] = x[[507, top]]  # the first feature's best image sits in the second batch of 500
    got = feature_examples(model, dicts, x, feats, n=5)
    assert got["_".join(map(str, feats[0]))][0]["image"] == 507
    for (st, f), length in zip(feats, lengths, strict=True):
        a = acts_by_hand(model, dicts, x, st)[:, :, f]
        best, where = a.max(1), a.argmax(1)
        order = [i for i in np.argsort(-best, kind="stable")[:5] if best[i] > 0]
        ex = got[f"{st}_{f}"]
        assert [e["image"] for e in ex] == order and len(order) == length
        start, jump, rf, n = recurrence(model.config, st, "sae" if kind == "sae" else "transcoder")
        for e in ex:
            y, x0 = divmod(int(where[e["image"]]), n)
            box = [round(start + y * jump - (rf - 1) / 2), round(start + x0 * jump - (rf - 1) / 2), rf]
            assert e["pos"] == [y, x0] and e["box"] == box
            assert e["activation"] == pytest.approx(float(best[e["image"]]), rel=1e-5)
            grey = x[e["image"]].numpy().mean(0)
            crop = grey[max(0, box[0]) : box[0] + rf, max(0, box[1]) : box[1] + rf]
            assert e["pixels"] == np.round(crop * 255).astype(int).tolist()


def test_a_channel_that_never_fires_has_no_examples():
    """Truth: a first-stage channel with zero weights and bias −1 is 0 after its ReLU on every image, so no image
    shows it (an activation of 0 is not an example); a live channel still lists min(n, images) of them."""
    model = tiny_cnn("plain", seed=2)
    with torch.no_grad():
        model.conv1.conv.weight[0].zero_()
        model.conv1.conv.bias[0] = -1.0
    x = torch.rand(4, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    got = feature_examples(model, StageDictionaries.channels(model), x, [(0, 0), (0, 2)], n=6)
    post = hooked(model, x, ["conv1.hook_post"])["conv1.hook_post"]
    assert float(post[:, 0].abs().max()) == 0.0 and float(post[:, 2].amax((1, 2)).min()) > 0
    assert got["0_0"] == [] and len(got["0_2"]) == 4


# ---- the quality row by numpy -----------------------------------------------------------------------------------


def test_quality_row_explained_variance_and_l0_by_numpy():
    """Truth (numpy): explained variance 1 − Σ(y − ŷ)² / Σ(y − ȳ_col)² with per-column means (targets with column
    offsets 0, 2, .., 8 so a global mean would differ), L0 the mean count of strictly positive latents (five latents
    are exactly 0 on every row)."""
    d = hand_dictionary([1, 4, 5, 11, 19], seed=3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 6, generator=g) * 0.5
    y = torch.randn(40, 5, generator=g) + 2.0 * torch.arange(5.0)
    y_hat, f = dictionary_forward(d, np_(x))
    yn = np_(y).astype(np.float64)
    ev = 1 - ((yn - y_hat) ** 2).sum() / ((yn - yn.mean(0)) ** 2).sum()
    q = _quality(d, x, y)
    assert q["explained_variance"] == pytest.approx(ev, rel=1e-5)
    assert q["l0"] == pytest.approx(float((f > 0).sum(1).mean())) and q["l0"] == pytest.approx(15.0)
