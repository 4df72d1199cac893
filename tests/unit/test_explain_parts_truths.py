"""``cnn explain``'s analyses (and universality's) against outside truths: hand arithmetic, plain forwards with a hand
edit, numpy's corrcoef, hook reads written differently and the linear read-out's closed form, on tiny random CNNs."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from mechscope.cnn.methods import universality as U
from mechscope.cnn.methods.ablation_study import ablation_study
from mechscope.cnn.methods.activations import ExplainData, collect
from mechscope.cnn.methods.channel_selectivity import channel_selectivity
from mechscope.cnn.methods.circuits import find_circuit
from mechscope.cnn.methods.patching import patching_study
from mechscope.cnn.methods.selectivity import region, selectivity
from mechscope.cnn.models.cnn import CNN, CNNConfig
from mechscope.cnn.models.spec import walk
from mechscope.core.hooks import run_with_cache

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = ("a", "b", "c")


def _tiny(seed: int = 0, kernel: int = 3) -> CNN:
    """Two stages (3 and 4 channels) on 16x16 images, three classes: 7x7 then 2x2 maps with kernel 3."""
    torch.manual_seed(seed)
    return CNN(CNNConfig(channels=(3, 4), image_size=16, kernel_size=kernel, n_classes=3)).eval()


def hand_forward(model: CNN, x: torch.Tensor, edit1=None, edit2=None) -> dict[str, torch.Tensor]:
    """The forward written out by hand (no hooks): each stage's post-activation map and output, and the logits,
    with optional edits of the stage outputs."""
    out = {}
    with torch.no_grad():
        h = model.normalize(x)
        for name, block, edit in (("conv1", model.conv1, edit1), ("conv2", model.conv2, edit2)):
            out[f"{name}.post"] = post = torch.relu(block.conv(h))
            h = torch.nn.functional.max_pool2d(post, 2)
            if edit is not None:
                h = edit(h.clone())
            out[name] = h
        out["logits"] = model.fc(h.flatten(1))
    return out


@pytest.fixture(scope="module")
def world():
    """A tiny CNN whose read-out bias centres its logits (all three classes get predicted), 90 random images, and
    two labellings: the model's own predictions (patching needs right answers) and unbalanced labels 54/27/9."""
    model = _tiny(0)
    x = torch.rand(90, 1, 16, 16, generator=torch.Generator().manual_seed(100))
    with torch.no_grad():
        model.fc.bias -= model(x).mean(0)
        pred = model(x).argmax(1)
    y = torch.tensor([0] * 54 + [1] * 27 + [2] * 9)[torch.randperm(90, generator=torch.Generator().manual_seed(5))]
    spec = walk(model)
    out = {}
    for key, labels in (("pred", pred), ("unbalanced", y)):
        data = ExplainData(x, labels, x[:40], x[:0], labels[:0], NAMES)
        out[key] = (data, collect(model, spec, data))
    return model, spec, x, out


# ---- universality ----------------------------------------------------------------------------------------------


def test_maps_of_different_sizes_are_compared_on_spatial_means_as_numpy_correlates_them():
    """Truth: numpy's corrcoef of each channel's spatial mean read as ``hook_out.mean(dim=(2, 3))``; and NetFeatures'
    means are those same means (kernel 3 gives 7x7 and 2x2 maps, kernel 5 6x6 and 1x1)."""
    a, b = _tiny(1, kernel=3), _tiny(2, kernel=5)
    x = torch.rand(40, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    specs = {"a": walk(a), "b": walk(b)}
    feats, moments = U.collect_pairs(specs, [("a", "b")], x, batch_size=15)  # three batches
    hooks = ["conv1.hook_out", "conv2.hook_out"]
    ca, cb = run_with_cache(a, x, names=hooks)[1], run_with_cache(b, x, names=hooks)[1]
    for hook, stage, (m, how) in zip(hooks, ["conv1", "conv2"], moments[("a", "b")], strict=True):
        assert ca[hook].shape[2:] != cb[hook].shape[2:]
        ma, mb = ca[hook].mean(dim=(2, 3)).double().numpy(), cb[hook].mean(dim=(2, 3)).double().numpy()
        assert np.allclose(feats["a"].means[stage].numpy(), ma, atol=1e-6)
        assert np.allclose(feats["b"].means[stage].numpy(), mb, atol=1e-6)
        assert how == "image (spatial mean)" and m.n == 40
        la, lb = np.flatnonzero(ma.std(0) > 1e-6), np.flatnonzero(mb.std(0) > 1e-6)
        assert len(la) >= 2 and len(lb) >= 2
        ref = np.corrcoef(ma[:, la].T, mb[:, lb].T)[: len(la), len(la) :]
        assert np.allclose(m.correlation().numpy()[np.ix_(la, lb)], ref, atol=1e-6)
        assert U.match_units(m, stage, how).observations == "image (spatial mean)"


def test_best_matches_leave_out_network_bs_dead_channel():
    """Truth: by hand, 4 live channels of A and 2 live of B give 6 best matches, each the largest numpy corrcoef with
    the other network's live channels; B's constant channel 2 is not one of them."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 4, generator=g, dtype=torch.float64)
    b = torch.randn(500, 3, generator=g, dtype=torch.float64)
    b[:, 0] = a.sum(1) + 0.5 * b[:, 0]  # every A channel correlates positively with B's channel 0
    b[:, 2] = 0.0  # dead
    m = U.match_units(U.Moments.of(a, b), "s", "image × position")
    assert m.dead_b == (2,) and m.dead_a == ()
    r = np.corrcoef(a.numpy().T, b[:, :2].numpy().T)[:4, 4:]  # [4, 2], live channels only
    want = np.concatenate([r.max(1), r.max(0)])
    got = m.best_matches()
    assert len(got) == 6
    assert np.allclose(got, want, atol=1e-6)


def test_a_dead_channel_is_no_ones_partner():
    """Truth: numpy's corrcoef over the live channels. A's channel 0 anticorrelates with B's only live channel (r ≈
    −0.995): its best match is that, not the 0 of B's dead channel 1; and the one-to-one pairing (scipy's
    linear_sum_assignment on the live block, here 2 × 1) pairs B's live channel with the A channel that gives the
    larger correlation, never with a dead one."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 2, generator=g, dtype=torch.float64)
    b = torch.zeros(500, 2, dtype=torch.float64)
    b[:, 0] = -a[:, 0] + 0.1 * torch.randn(500, generator=g, dtype=torch.float64)  # b[:, 1] dead
    m = U.match_units(U.Moments.of(a, b), "s", "image × position")
    r = np.corrcoef(a.numpy().T, b[:, 0].numpy())[:2, 2]  # A's channels against B's live one
    assert m.dead_b == (1,) and r[0] < -0.99
    assert np.allclose(m.best_a.numpy(), r, atol=1e-6) and m.best_a_partner.tolist() == [0, 0]
    assert [(p.a, p.b) for p in m.matched] == [(int(np.argmax(r)), 0)]
    assert m.matched[0].correlation == pytest.approx(r.max(), abs=1e-6)


# ---- selectivity -----------------------------------------------------------------------------------------------


def test_region_reads_rows_as_vertical_and_columns_as_horizontal():
    """Truth: a single hot pixel in row 0, column 8 of a 9x9 map is in the upper right; row 8, column 0 lower left."""
    m = np.zeros((9, 9))
    m[0, 8] = 1.0
    assert region(m) == "upper right"
    m = np.zeros((9, 9))
    m[8, 0] = 1.0
    assert region(m) == "lower left"


def test_negative_class_means_are_shifted_before_the_index(world):
    """Truth: class means [-1, 0, 2] shift to [0, 1, 3]: (3 - (0 + 1)/2) / (3 + (0 + 1)/2) = 2.5/3.5, by hand."""
    model, spec, _, out = world
    data, acts = out["unbalanced"]
    a = acts.out["conv1"].clone()
    a[:, 0] = torch.tensor([-1.0, 0.0, 2.0])[data.y].view(-1, 1, 1)
    st = selectivity(model, spec, data, replace(acts, out={**acts.out, "conv1": a}))[0]
    assert st.stage == "conv1" and st.shifted
    assert st.class_means[0].tolist() == pytest.approx([-1.0, 0.0, 2.0], abs=1e-6)
    assert float(st.index[0]) == pytest.approx(2.5 / 3.5, abs=1e-6)


def test_a_dead_channel_is_silent_with_index_zero(world):
    """Truth: conv1 channel 0 with bias -100 is 0 after its ReLU on every image (checked by a hand forward), so its
    class means do not differ: silent, index 0."""
    model, _, x, out = world
    dead = copy.deepcopy(model)
    with torch.no_grad():
        dead.conv1.conv.bias[0] = -100.0
    assert (hand_forward(dead, x)["conv1"][:, 0] == 0).all()
    spec = walk(dead)
    data = out["unbalanced"][0]
    st = channel_selectivity(dead, spec, data, collect(dead, spec, data))[0]
    assert st.stage == "conv1" and 0 in st.silent
    assert float(st.index[0]) == 0.0 and float(st.explain_index[0]) == 0.0


def test_collected_maps_are_class_means_of_the_post_activation():
    """Truth: a hand forward's ReLU output averaged over the images of each class (unbalanced classes)."""
    model = _tiny(0)
    x = torch.rand(60, 1, 16, 16, generator=torch.Generator().manual_seed(7))
    y = torch.tensor([0] * 40 + [1] * 15 + [2] * 5)
    acts = collect(model, walk(model), ExplainData(x, y, x[:10], x[:0], y[:0], NAMES), batch_size=25)
    hand = hand_forward(model, x)
    for stage in ("conv1", "conv2"):
        for k in range(3):
            want = hand[f"{stage}.post"][y == k].double().mean(0).float()
            torch.testing.assert_close(acts.maps[stage][k], want, atol=1e-6, rtol=1e-5)


# ---- circuits --------------------------------------------------------------------------------------------------


def test_pruning_drops_the_weakest_ranked_channel_first():
    """Truth: by hand, {0, 2} and {1, 2} both meet the criterion; from the prefix [0, 1, 2] dropping the last-ranked
    channel that can go (1, since 2 cannot) leaves [0, 2]; the greedy run also reaches {0, 2}."""

    def margin(keep):
        s = set(keep)
        return 0.0 if {0, 2} <= s or {1, 2} <= s else -1.0

    c = find_circuit(margin, 3, ranking=[0, 1, 2], target=0)
    assert c.prefix_size == 3 and c.meets_criterion
    assert sorted(c.channels) == [0, 2]
    assert c.method == "attribution prefix, pruned"


# ---- patching --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def patched(world):
    model, spec, x, out = world
    data, acts = out["pred"]
    return patching_study(model, spec, data, acts, (0, 1))


def test_last_stage_shares_are_the_readouts_closed_form_and_add_up_to_one(world, patched):
    """Truth: with a linear read-out after conv2, patching unit u moves LD by (a_clean - a_corr)[u] · (W[0, u] -
    W[1, u]); its share is that over the gap LD_clean - LD_corr (from a hand forward); all shares sum to 1."""
    model, _, x, _ = world
    r = patched
    assert r.pairs >= 4
    hand = hand_forward(model, x)
    a, lo = hand["conv2"].flatten(1).double(), hand["logits"].double()
    ci, ki = list(r.clean_test_indices), list(r.corrupted_test_indices)
    dw = (model.fc.weight[0] - model.fc.weight[1]).detach().double()
    ld = lo[:, 0] - lo[:, 1]
    gap = ld[ci] - ld[ki]
    share = ((a[ci] - a[ki]) * dw / gap[:, None]).mean(0)  # [U]
    got = r.stage("conv2").position_mean.flatten().double()
    torch.testing.assert_close(got, share, atol=1e-4, rtol=1e-4)
    assert float(got.sum()) == pytest.approx(1.0, abs=1e-4)


def test_top_units_are_the_largest_magnitudes_at_their_own_positions(patched):
    """Truth: sorting position_mean by |value| by hand gives the five top units, each of which reads back its share
    at [channel, y, x]; the case holds a negative unit among them and top units off the diagonal (y != x)."""
    negative, off_diagonal = False, False
    for st in patched.stages:
        pm = st.position_mean
        c, h, w = pm.shape
        want = sorted(np.ndindex(c, h, w), key=lambda i: -abs(float(pm[i])))[:5]
        got = [(u.channel, u.y, u.x) for u in st.top_units]
        assert set(got) == set(want)
        for u in st.top_units:
            assert float(pm[u.channel, u.y, u.x]) == u.recovered
        negative |= any(u.recovered < 0 for u in st.top_units)
        off_diagonal |= any(u.y != u.x for u in st.top_units)
    assert negative and off_diagonal  # the checks above can tell the mutants apart


# ---- ablation --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ablated(world):
    model, spec, _, out = world
    data, acts = out["unbalanced"]
    return ablation_study(model, spec, data, acts)


def test_overall_change_weights_classes_by_their_image_counts(world, ablated):
    """Truth: a hand forward with conv1's channel zeroed, test accuracy (pred == y).mean() minus the unablated one,
    on labels 54/27/9 (a plain mean over classes would differ)."""
    model, _, x, out = world
    y = out["unbalanced"][0].y
    base = (hand_forward(model, x)["logits"].argmax(1) == y).double().mean()
    per_class_mean = []
    for c in range(3):

        def zero(a, c=c):
            a[:, c] = 0.0
            return a

        pred = hand_forward(model, x, edit1=zero)["logits"].argmax(1)
        want = float((pred == y).double().mean() - base)
        assert float(ablated.stage("conv1").zero_overall[c]) == pytest.approx(want, abs=1e-9)
        per_class_mean.append(float(torch.stack([(pred[y == k] == k).double().mean() for k in range(3)]).mean()))
    assert any(abs(p - float(base)) > 1e-3 for p in per_class_mean)  # the unweighted mean is another number


def test_readout_zero_rows_zero_one_unit_through_the_fc_by_hand(world, ablated):
    """Truth: conv2's output with one unit set to 0 by hand, run through fc by hand: each class's accuracy change is
    ``readout.zero[u]``; mean-ablation gives other numbers for some unit."""
    model, _, x, out = world
    data, acts = out["unbalanced"]
    y = data.y
    hand = hand_forward(model, x)
    a = hand["conv2"].flatten(1)

    def per_class(logits):
        pred = logits.argmax(1)
        return torch.stack([(pred[y == k] == k).double().mean() for k in range(3)])

    base = per_class(hand["logits"])
    mean = acts.means["conv2"].flatten()
    differs = False
    for u in range(a.shape[1]):
        z, m = a.clone(), a.clone()
        z[:, u], m[:, u] = 0.0, mean[u]
        with torch.no_grad():
            zero, by_mean = per_class(model.fc(z)) - base, per_class(model.fc(m)) - base
        torch.testing.assert_close(ablated.readout.zero[u], zero, atol=1e-9, rtol=0)
        differs |= not torch.equal(zero, by_mean)
    assert differs
