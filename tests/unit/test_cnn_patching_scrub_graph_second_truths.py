"""Second-pass truths for the CNN's patching study, activations, scrubbing and solu-compare stage statistics.

Every number is checked against something computed another way: a hand forward of a hand-built CNN with one
channel copied by hand, numpy statistics, a plain loop over a confusion matrix, quartile bins by a plain loop, a seeded
``randperm`` redone by hand.
"""

from __future__ import annotations

import statistics
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from mechscope.cnn.methods.activations import ExplainData, collect
from mechscope.cnn.methods.graph import CNNEdges
from mechscope.cnn.methods.patching import default_pair, patching_study
from mechscope.cnn.methods.scrubbing import feature_values, parse_hypothesis_file, scrub_hypothesis
from mechscope.cnn.models.cnn import CNN, CNNConfig
from mechscope.cnn.models.spec import walk
from mechscope.cnn.pipelines.solu_cnn import _stage_stats
from mechscope.core.graphs import edge_patching
from tests.unit.test_discovery_cnn import stroke_cnn, strokes

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = ("vert", "horiz")


def stroke_forward(model, x, stage=None, channel=None, donor=None):
    """The stroke CNN written out by hand (padding 1, no pooling, mean 0, std 1): relu(conv1), relu(conv2), fc,
    with channel ``channel`` of ``stage`` (1 or 2) taken from ``donor``'s activations at that stage."""
    with torch.no_grad():
        a1 = torch.relu(nn.functional.conv2d(x, model.conv1.conv.weight, model.conv1.conv.bias, padding=1))
        if stage == 1:
            a1 = a1.clone()
            a1[:, channel] = donor[:, channel]
        a2 = torch.relu(nn.functional.conv2d(a1, model.conv2.conv.weight, model.conv2.conv.bias, padding=1))
        if stage == 2:
            a2 = a2.clone()
            a2[:, channel] = donor[:, channel]
        return a1, a2, model.fc(a2.flatten(1))


@pytest.fixture(scope="module")
def patch_world():
    """16 strokes, all classified right; the first vertical stroke is labelled horizontal (so it is misclassified
    and may not be a clean image), and vertical/horizontal are patched as pair (0, 1)."""
    model = stroke_cnn()
    x, y = strokes(16, seed=3)
    y = y.clone()
    first_vertical = int((y == 0).nonzero()[0])
    y[first_vertical] = 1
    spec = walk(model)
    data = ExplainData(x, y, x[:8], x[:0], y[:0], NAMES)
    acts = collect(model, spec, data)
    return model, x, y, first_vertical, patching_study(model, spec, data, acts, (0, 1), n_pairs=5)


def test_pairs_are_the_first_correctly_classified_images_of_each_class(patch_world):
    """Truth: a plain loop over the labels and the hand forward's predictions; the images shown are the first pair."""
    model, x, y, first_vertical, r = patch_world
    pred = stroke_forward(model, x)[2].argmax(1)
    clean = [i for i in range(len(y)) if y[i] == 0 and pred[i] == 0][:5]
    corrupted = [i for i in range(len(y)) if y[i] == 1 and pred[i] == 1][:5]
    assert first_vertical not in clean and len(clean) == 5
    assert r.pairs == 5
    assert list(r.clean_test_indices) == clean and list(r.corrupted_test_indices) == corrupted
    assert torch.equal(r.clean_image, x[clean[0]]) and torch.equal(r.corrupted_image, x[corrupted[0]])


def test_logit_difference_means_are_hand_forward_means(patch_world):
    """Truth: LD = logit 0 - logit 1 from the hand forward, averaged over the clean and the corrupted images."""
    model, x, _, _, r = patch_world
    lo = stroke_forward(model, x)[2].double()
    ld = (lo[:, 0] - lo[:, 1]).numpy()
    assert r.logit_difference_clean_mean == pytest.approx(ld[list(r.clean_test_indices)].mean(), abs=1e-5)
    assert r.logit_difference_corrupted_mean == pytest.approx(ld[list(r.corrupted_test_indices)].mean(), abs=1e-5)
    assert r.logit_difference_clean_mean > 0 > r.logit_difference_corrupted_mean
    assert "LD = logit vert − logit horiz" in r.metric


@pytest.mark.parametrize("stage", [1, 2])
def test_channel_shares_are_a_hand_copied_channel_through_a_hand_forward(patch_world, stage):
    """Truth: the corrupted image run by hand with one channel of stage ``stage`` copied from the clean image; its
    share (LD_patched - LD_corr) / (LD_clean - LD_corr), mean and sample std (numpy, ddof=1) over the pairs."""
    model, x, _, _, r = patch_world
    xc, xk = x[list(r.clean_test_indices)], x[list(r.corrupted_test_indices)]

    def ld(lo):
        return (lo[:, 0] - lo[:, 1]).double().numpy()

    a_clean = stroke_forward(model, xc)[stage - 1]
    ld_clean, ld_corr = ld(stroke_forward(model, xc)[2]), ld(stroke_forward(model, xk)[2])
    st = r.stage(f"conv{stage}")
    n_ch = a_clean.shape[1]
    shares = np.array(
        [(ld(stroke_forward(model, xk, stage, c, a_clean)[2]) - ld_corr) / (ld_clean - ld_corr) for c in range(n_ch)]
    )  # [C, pairs]
    np.testing.assert_allclose(st.channel_mean.double().numpy(), shares.mean(1), atol=1e-5)
    np.testing.assert_allclose(st.channel_std.double().numpy(), shares.std(1, ddof=1), atol=1e-5)
    assert shares.std(1, ddof=1).max() > 0.01  # the pairs differ: a std of zeros would not pass


def test_top_units_on_a_non_square_map_read_back_channel_row_and_column():
    """Truth: a hand-built 1x1 conv (2 channels, 3x5 maps) and a linear read-out that weighs one unit per channel
    far above the rest; patching from blank images, (channel 1, row 2, column 0) then (channel 0, row 0, column 4)
    must top the list (on a 3x5 map a swapped row/column or a square stride points elsewhere)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 2, 1)
    fc = nn.Linear(2 * 3 * 5, 2)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.zero_()
        fc.weight.zero_()
        fc.bias.zero_()
        fc.weight[0, 1 * 15 + 2 * 5 + 0] = 10.0
        fc.weight[0, 0 * 15 + 0 * 5 + 4] = 1.0
        fc.weight[0] += 0.01  # every other unit a little
        fc.bias[1] = 1e-3  # blank images predict b; the others (logit a > 0) predict a
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), fc).eval()
    spec = walk(model, (1, 3, 5))
    x = torch.rand(6, 1, 3, 5, generator=torch.Generator().manual_seed(1)) + 0.1
    x[3:] = 0.0
    data = ExplainData(x, torch.tensor([0, 0, 0, 1, 1, 1]), x, x[:0], torch.zeros(0, dtype=torch.long), ("a", "b"))
    acts = collect(model, spec, data)
    r = patching_study(model, spec, data, acts, (0, 1), n_pairs=3)
    assert r.pairs == 3
    got = [(u.channel, u.y, u.x) for u in r.stages[0].top_units[:2]]
    assert got == [(1, 2, 0), (0, 0, 4)]


def test_default_pair_is_the_most_confused_true_predicted_pair_off_the_diagonal():
    """Truth: a plain loop over an asymmetric confusion matrix, skipping the diagonal; digits give (8, 3)."""
    conf = [[50, 1, 2, 0], [3, 40, 0, 9], [0, 4, 60, 1], [7, 0, 2, 30]]
    best, want = -1, None
    for t, row in enumerate(conf):
        for p, v in enumerate(row):
            if t != p and v > best:
                best, want = v, (t, p)
    assert want == (1, 3)
    assert default_pair(("a", "b", "c", "d"), torch.tensor(conf)) == want
    assert default_pair(tuple("0123456789"), torch.eye(10)) == (8, 3)


# ---- the channel graph -----------------------------------------------------------------------------------------


def test_patching_one_edge_feeds_the_senders_corrupted_channel_to_that_receiver_only():
    """Truth: a hand forward of a seeded random CNN (padding 1, no pooling) where receiver conv2.cj's convolution
    reads sender conv1.ci from the corrupted run and every other input from the clean run; the edge's score is the
    change of mean(logit 1 - logit 0)."""
    torch.manual_seed(11)
    cfg = CNNConfig(image_size=8, channels=(3, 2), kernel_size=3, padding=1, pool=1, n_classes=2, mean=0.0, std=1.0)
    model = CNN(cfg).eval()
    g = torch.Generator().manual_seed(12)
    x, c = torch.rand(5, 1, 8, 8, generator=g), torch.rand(5, 1, 8, 8, generator=g)
    edges = CNNEdges(walk(model))
    metric = lambda out: (out[:, 1] - out[:, 0]).mean()  # noqa: E731
    scores = edge_patching(edges, x, c, metric=metric).scores
    w2, b2 = model.conv2.conv.weight.detach(), model.conv2.conv.bias.detach()
    a1, a2, lo = stroke_forward(model, x)
    a1c = stroke_forward(model, c)[0]
    base = float(metric(lo))
    got, want = [], []
    for i, j in [(0, 1), (2, 0), (1, 1)]:
        mixed = a1.clone()
        mixed[:, i] = a1c[:, i]
        a2e = a2.clone()
        a2e[:, j] = torch.relu(nn.functional.conv2d(mixed, w2[j : j + 1], b2[j : j + 1], padding=1))[:, 0]
        want.append(float(metric(model.fc(a2e.flatten(1)).detach())) - base)
        got.append(float(scores[edges.graph.edge_id(f"conv1.c{i}", f"conv2.c{j}", "in")]))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert len({round(w, 4) for w in want}) == 3 and min(abs(w) for w in want) > 1e-4


# ---- activations -----------------------------------------------------------------------------------------------


class FakeImages:
    """The fields of an ImageDataset that ExplainData.from_dataset reads; training image i is filled with i."""

    name = "fake"
    class_names = ("a", "b")
    n_classes = 2

    def __init__(self, n_train: int, n_test: int):
        self.train_images = torch.arange(n_train, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
        self.train_labels = torch.arange(n_train) % 2
        self.test_images = torch.arange(n_test, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
        self.test_labels = torch.arange(n_test) % 2

    def to_float(self, images):
        return images.clone()

    def test_float(self, limit=None):
        return self.test_images[:limit].clone()


def test_reference_is_half_the_training_images_and_held_out_follows_it():
    """Truth: 20 training images, n_mean 50: the reference is images 0..9 (half), the held-out set 10..13."""
    ed = ExplainData.from_dataset(FakeImages(20, 8), None, n_mean=50, held_out=4)
    assert ed.x_ref[:, 0, 0, 0].tolist() == list(range(10))
    assert ed.x_held[:, 0, 0, 0].tolist() == [10, 11, 12, 13]
    assert ed.y_held.tolist() == [0, 1, 0, 1]
    assert ed.description == "the 8 fake test images"
    assert ExplainData.from_dataset(FakeImages(20, 8), 8).description == "the 8 fake test images"
    assert ExplainData.from_dataset(FakeImages(20, 8), 6).description == "the first 6 fake test images"


# ---- scrubbing -------------------------------------------------------------------------------------------------


def test_quartile_features_are_right_closed_quartile_bins_including_values_on_a_boundary():
    """Truth: the quartile bins as pandas' qcut draws them (right-closed: a value equal to a quartile joins the lower
    bin), by a plain loop over numpy's linear quartiles; ink totals 1..5 put values exactly on the quartiles 2, 3,
    4."""
    x = torch.zeros(5, 1, 3, 3)
    for i in range(5):
        x[i, 0, 0, 1] = i + 1.0  # the central column (index 1) and the total ink both equal i + 1
    y = torch.zeros(5, dtype=torch.long)
    values = np.arange(1, 6, dtype=float)
    q = np.quantile(values, [0.25, 0.5, 0.75])
    want = [sum(v > edge for edge in q) for v in values]
    assert want == [0, 0, 1, 2, 3]
    assert feature_values("ink", x, y, y).tolist() == want
    assert feature_values("central_column", x, y, y).tolist() == want


def _hyp(**extra):
    return parse_hypothesis_file({"run": "r", "claims": [{"name": "all", "edges": ["*"], "feature": "image"}], **extra})


def test_scrubbed_images_are_a_randperm_of_the_data_seed_and_a_true_hypothesis_recovers_all():
    """Truth: the images picked by torch.randperm seeded with data.seed (not the scrub's seed), redone by hand; the
    accuracy on them (labels made wrong for a third of the images) by a plain loop; resampling from the image
    itself changes nothing, so the scrubbed metric equals the clean one."""
    model = stroke_cnn()
    x, y = strokes(30, seed=2)
    y = torch.where(torch.arange(30) % 3 == 0, 1 - y, y)
    hyp = _hyp(data={"n": 12, "seed": 7}, seed=1, samples=2, metric="accuracy", target=1)
    res = scrub_hypothesis(walk(model), x, y, hyp)
    pick = torch.randperm(30, generator=torch.Generator().manual_seed(7))[:12]
    pred = stroke_forward(model, x[pick])[2].argmax(1)
    rows = [i for i in range(12) if y[pick][i] == 1]
    acc = sum(int(pred[i] == y[pick][i]) for i in rows) / len(rows)
    assert 0 < acc < 1
    assert res.scrub.metric_clean == pytest.approx(acc)
    assert res.scrub.metric_scrubbed == pytest.approx(acc)
    assert res.settings["metric_images"] == len(rows) < 12
    assert res.settings["n"] == 12 and res.better == "higher"


def test_every_test_image_may_be_scrubbed_and_the_default_is_500():
    """Truth: data.n equal to the number of images is allowed (n > len is the error); the documented default 500."""
    x, y = strokes(10, seed=4)
    res = scrub_hypothesis(walk(stroke_cnn()), x, y, _hyp(data={"n": 10}, samples=1))
    assert res.settings["n"] == 10
    assert _hyp().n == 500
    assert scrub_hypothesis(walk(stroke_cnn()), x, y, _hyp(data={"n": 4}, samples=1, metric="loss")).better == "lower"


# ---- solu-compare ----------------------------------------------------------------------------------------------


def test_stage_statistics_leave_silent_channels_out():
    """Truth: the live channels' indices by hand (channels 1 and 4 silent), median / mean by ``statistics``, the
    quartiles by linear interpolation written out, the share at 0.5 or more counting the 0.5 itself."""
    index = torch.tensor([0.9, 0.0, 0.5, 0.2, 0.0, 0.7, 0.4])
    explain = torch.tensor([0.1, 9.0, 0.3, 0.6, 9.0, 0.2, 0.8])
    s = SimpleNamespace(stage="conv1", hook="h", index=index, silent=(1, 4), explain_index=explain)
    got = _stage_stats(s)
    live = [0.9, 0.5, 0.2, 0.7, 0.4]
    srt = sorted(live)  # 0.2 0.4 0.5 0.7 0.9: positions 1 and 3 are the 25th and 75th percentiles exactly
    assert (got["channels"], got["silent"]) == (7, 2)
    assert got["median"] == pytest.approx(statistics.median(live))
    assert got["mean"] == pytest.approx(statistics.fmean(live))
    assert got["quartiles"] == pytest.approx([srt[1], srt[3]])
    assert got["share_ge_0.5"] == pytest.approx(3 / 5)
    assert got["explain_median"] == pytest.approx(statistics.median([0.1, 0.3, 0.6, 0.2, 0.8]))


def test_a_hypothesis_that_keeps_only_the_prediction_scrubs_to_the_clean_accuracy():
    """Truth: a hand-built three-class model whose logits are -s + 1, 0.5 and s - 1.0 of the total ink s (0: s < 0.5,
    1: in between, 2: s > 1.5); every edge resampled from images of the same prediction cannot change a prediction,
    so the scrubbed accuracy is exactly the clean one, which a plain loop gives (labels wrong on every 4th image)."""
    conv, fc = nn.Conv2d(1, 1, 1), nn.Linear(4, 3)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.zero_()
        fc.weight.copy_(torch.tensor([[-1.0] * 4, [0.0] * 4, [1.0] * 4]))
        fc.bias.copy_(torch.tensor([1.0, 0.5, -1.0]))
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), fc).eval()
    g = torch.Generator().manual_seed(5)
    x = torch.rand(40, 1, 2, 2, generator=g) * 0.55
    s = x.flatten(1).sum(1)
    pred = torch.where(s < 0.5, 0, torch.where(s < 1.5, 1, 2))
    assert sorted(set(pred.tolist())) == [0, 1, 2]
    y = torch.where(torch.arange(40) % 4 == 0, (pred + 1) % 3, pred)
    claims = [{"name": "p", "edges": ["*"], "feature": "prediction"}]
    hyp = parse_hypothesis_file({"run": "r", "claims": claims, "data": {"n": 40}, "samples": 4})
    res = scrub_hypothesis(walk(model, (1, 2, 2)), x, y, hyp).scrub
    want = sum(int(pred[i] == y[i]) for i in range(40)) / 40
    assert res.metric_clean == pytest.approx(want) and res.metric_scrubbed == pytest.approx(want)
    assert res.metric_random < want - 0.05  # resampling from any image does change predictions


def test_one_pair_has_no_spread_zeros_not_nan():
    """Truth: one pair has no spread; the study reports zeros (torch's sample std of one value would be NaN)."""
    model = stroke_cnn()
    x, y = strokes(8, seed=3)
    spec = walk(model)
    data = ExplainData(x, y, x[:4], x[:0], y[:0], NAMES)
    r = patching_study(model, spec, data, collect(model, spec, data), (0, 1), n_pairs=1)
    assert r.pairs == 1
    for st in r.stages:
        assert torch.equal(st.channel_std, torch.zeros_like(st.channel_std))
