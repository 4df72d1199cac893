"""The vision wing's circuits, ablation tables, discovery metrics, group flows and faithfulness checks against
outside truths: hand-written forwards of a tiny CNN (``hand_forward``), autograd written out by hand, numpy/scipy/
sklearn formulas, PyTorch's own default initialisation, and hand-built search problems and models with known
answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score
from torch import nn

from mechscope.cnn.methods import faithfulness as FA
from mechscope.cnn.methods.ablation_study import ablation_study
from mechscope.cnn.methods.activations import ExplainData, collect
from mechscope.cnn.methods.circuit_study import circuit_study
from mechscope.cnn.methods.circuits import find_circuit
from mechscope.cnn.methods.discovery import channel_scores, compare_channels, make_metric
from mechscope.cnn.methods.graph import CNNEdges
from mechscope.cnn.models.spec import walk
from mechscope.core import intervene as A
from mechscope.core.graphs import EdgeScores
from tests.unit.test_explain_parts_truths import _tiny, hand_forward

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = ("a", "b", "c")


@pytest.fixture(scope="module")
def world():
    """A tiny CNN (3 and 4 channels, 3 classes) with its read-out bias centred, 90 test images labelled by the model
    with a few labels flipped (so the full model is not perfect), 40 of them as the mean's reference set and 30 new
    held-out images of another distribution labelled by the model."""
    model = _tiny(0)
    g = torch.Generator().manual_seed(100)
    x = torch.rand(90, 1, 16, 16, generator=g)
    x_held = 2 * torch.rand(30, 1, 16, 16, generator=g) ** 2  # of another brightness than x
    with torch.no_grad():
        model.fc.bias -= model(x).mean(0)
        y = model(x).argmax(1)
        y_held = model(x_held).argmax(1)
    y[:9] = (y[:9] + 1) % 3
    spec = walk(model)
    data = ExplainData(x, y, x[:40], x_held, y_held, NAMES)
    return model, spec, data, collect(model, spec, data)


def _rates(pred: torch.Tensor, y: torch.Tensor, d: int) -> tuple[float, float]:
    """(accuracy on class d, share of other classes' images called d), by hand."""
    return float((pred[y == d] == d).double().mean()), float((pred[y != d] == d).double().mean())


def _keep_only(chans, ref):
    def edit(a):
        out = ref.expand_as(a).clone()
        out[:, chans] = a[:, chans]
        return out

    return edit


def _set_to(chans, rep):
    def edit(a):
        a[:, chans] = rep[:, chans] if rep.dim() == a.dim() else rep[chans]
        return a

    return edit


# ---- circuits.find_circuit on hand-built problems ------------------------------------------------------------


def test_greedy_ties_go_to_the_stronger_ranked_channel():
    """Truth (by hand): channels 1 and 3 each meet the criterion alone, a tie in the greedy step; the ranking puts 3
    first, so the documented tie-break (by the attribution ranking) adds 3, not 1."""

    def margin(keep):
        return 0.0 if {1, 3} & set(keep) else -1.0

    c = find_circuit(margin, 4, ranking=[3, 0, 1, 2], target=0)
    assert c.greedy_order == [3] and c.channels == [3]


def test_of_two_sets_of_one_size_the_wider_margin_is_kept():
    """Truth (by hand): the attribution prefix reaches {0, 1} (margin 0), the greedy run {2, 3} (margin 0.5); both
    are 1-minimal, no single channel suffices, so the set kept is the one that meets the criterion by more."""

    def margin(keep):
        s = set(keep)
        if {2, 3} <= s:
            return 0.5
        if {0, 1} <= s:
            return 0.0
        return -1.0 + 0.1 * len(s & {2, 3})

    c = find_circuit(margin, 4, ranking=[0, 1, 2, 3], target=0)
    assert c.prefix_size == 2 and c.greedy_size == 2
    assert sorted(c.channels) == [2, 3] and c.margin == 0.5


# ---- circuit_study ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def study(world):
    model, spec, data, acts = world
    return circuit_study(model, spec, data, acts, [0, 1, 2], tolerance=0.01)


def test_last_stage_circuits_recomputed_with_a_hand_forward(world, study):
    """Truth: ``hand_forward`` with conv2's output edited by hand (only the circuit kept at the reference mean, the
    circuit at the mean, the circuit from the seeded donor image), labels read by hand; the criterion's two halves by
    hand; the attribution as the read-out's closed form mean_i Σ_hw (a − mean)·W[d] over the class's images; the
    read-out weight per channel as W[d] summed over the channel's positions; the same-class donor share by hand."""
    model, _, data, acts = world
    x, y = data.x, data.y
    ref = hand_forward(model, data.x_ref)["conv2"].double().mean(0).float()
    hand = hand_forward(model, x)
    a = hand["conv2"]
    full = hand["logits"].argmax(1)
    donors = A.resample_donors(y, seed=study.resample_seed, other_class=False)
    assert study.resample_same_class_share == pytest.approx(float((y[donors] == y).double().mean()), abs=1e-12)
    w = model.fc.weight.detach().view(3, 4, 2, 2)
    tol = study.tolerance
    fp_binds = False
    for c in study.circuits:
        d, chans = c.target, list(c.channels)
        rows = y == d
        attribution = ((a[rows] - ref) * w[d]).flatten(2).sum(2).double().mean(0)
        torch.testing.assert_close(c.attribution.double(), attribution, atol=1e-5, rtol=1e-5)
        assert c.readout_weight_to_class == pytest.approx([float(w[d, ch].sum()) for ch in chans], abs=1e-6)
        only = hand_forward(model, x, edit2=_keep_only(chans, ref))["logits"].argmax(1)
        without = hand_forward(model, x, edit2=_set_to(chans, ref))["logits"].argmax(1)
        resampled = hand_forward(model, x, edit2=_set_to(chans, a[donors]))["logits"].argmax(1)
        acc, fp = _rates(only, y, d)
        full_acc, full_fp = _rates(full, y, d)
        assert c.full_accuracy == pytest.approx(full_acc, abs=1e-12)
        assert c.sufficiency == pytest.approx(acc, abs=1e-12)
        assert c.other_classes_called_circuit == pytest.approx(fp, abs=1e-12)
        assert c.necessity == pytest.approx(_rates(without, y, d)[0], abs=1e-12)
        assert c.necessity_resample == pytest.approx(_rates(resampled, y, d)[0], abs=1e-12)
        assert acc >= full_acc - tol and fp <= full_fp + tol  # the criterion, both halves
        assert c.meets_criterion
        # a channel set meeting the accuracy half alone but calling other classes d: the second half binds
        for k in range(1, 5):
            for s in torch.combinations(torch.arange(4), k).tolist():
                p = hand_forward(model, x, edit2=_keep_only(s, ref))["logits"].argmax(1)
                sa, sf = _rates(p, y, d)
                fp_binds |= len(s) < len(chans) and sa >= full_acc - tol and sf > full_fp + tol
    assert fp_binds  # the case tells "accuracy only" apart from the full criterion


def test_held_out_numbers_use_the_reference_mean_on_new_images(world):
    """Truth: the held-out images through ``hand_forward``, conv2's non-circuit channels set to the mean over the
    reference images (not over the held-out ones), labels the model's own on those images. A loose tolerance (0.2)
    gives circuits of one or two channels, on which the mean matters."""
    model, spec, data, acts = world
    study = circuit_study(model, spec, data, acts, [0, 1, 2], tolerance=0.2)
    ref = hand_forward(model, data.x_ref)["conv2"].double().mean(0).float()
    full = hand_forward(model, data.x_held)["logits"].argmax(1)
    differs = False
    for c in study.circuits:
        d, chans = c.target, list(c.channels)
        pred = hand_forward(model, data.x_held, edit2=_keep_only(chans, ref))["logits"].argmax(1)
        acc, fp = _rates(pred, data.y_held, d)
        assert c.held_out_full_accuracy == pytest.approx(_rates(full, data.y_held, d)[0], abs=1e-12)
        assert c.held_out_sufficiency == pytest.approx(acc, abs=1e-12)
        assert c.held_out_other_classes_called_circuit == pytest.approx(fp, abs=1e-12)
        own = hand_forward(model, data.x_held)["conv2"].mean(0)
        other = hand_forward(model, data.x_held, edit2=_keep_only(chans, own))["logits"].argmax(1)
        differs |= _rates(other, data.y_held, d) != (acc, fp)
    assert differs  # the held-out images' own mean would give other numbers


def test_necessity_sets_the_circuit_to_the_reference_mean(world):
    """Truth: ``hand_forward`` with the circuit's conv2 channels set to the reference mean (the rest intact), the
    class's accuracy by hand, on circuits of one or two channels (tolerance 0.2) where setting them to 0 instead
    gives other numbers."""
    model, spec, data, acts = world
    study = circuit_study(model, spec, data, acts, [0, 1, 2], tolerance=0.2)
    ref = hand_forward(model, data.x_ref)["conv2"].double().mean(0).float()
    differs = False
    for c in study.circuits:
        d, chans = c.target, list(c.channels)
        without = hand_forward(model, data.x, edit2=_set_to(chans, ref))["logits"].argmax(1)
        assert c.necessity == pytest.approx(_rates(without, data.y, d)[0], abs=1e-12)
        zeroed = hand_forward(model, data.x, edit2=_set_to(chans, torch.zeros_like(ref)))["logits"].argmax(1)
        differs |= _rates(zeroed, data.y, d)[0] != _rates(without, data.y, d)[0]
    assert differs


def test_feeders_are_activation_times_gradient_written_out(world, study):
    """Truth: autograd by hand on conv1's pooled output a1: Σ_hw a1 · ∂(Σ_hw relu(conv2(a1))[circuit])/∂a1, averaged
    over the class's images; each top feeder's share is |contribution| over the sum of |contributions|."""
    model, _, data, _ = world
    a1 = hand_forward(model, data.x)["conv1"]
    mixed = False
    for c in study.circuits:
        rows = a1[data.y == c.target].clone().requires_grad_(True)
        total = torch.relu(model.conv2.conv(rows))[:, list(c.channels)].sum()
        (grad,) = torch.autograd.grad(total, rows)
        fed = (grad * rows).detach().flatten(2).sum(2).mean(0)  # [3]
        torch.testing.assert_close(c.feeders_all.float(), fed, atol=1e-5, rtol=1e-4)
        order = fed.abs().argsort(descending=True).tolist()
        assert [f.channel for f in c.feeders] == order[:3]
        for f in c.feeders:
            assert f.share == pytest.approx(float(fed[f.channel].abs() / fed.abs().sum()), abs=1e-5)
        mixed |= bool((fed > 0).any() and (fed < 0).any())
    assert mixed  # a signed sum would give other shares


def test_an_inner_stage_searches_by_running_the_rest_of_the_network(world):
    """Truth: for conv1 (not closed form), each channel's attribution is the class's mean logit with only that conv1
    channel kept (the others at the reference mean) minus with none kept, from ``hand_forward``; the sufficiency too."""
    model, _, data, acts = world
    r = circuit_study(model, walk(model), data, acts, [0, 1], stage="conv1", tolerance=0.01)
    assert not r.closed_form
    ref = hand_forward(model, data.x_ref)["conv1"].double().mean(0).float()
    for c in r.circuits:
        rows = data.y == c.target
        x = data.x[rows]
        none = hand_forward(model, x, edit1=_keep_only([], ref))["logits"][:, c.target]
        want = torch.stack(
            [
                (hand_forward(model, x, edit1=_keep_only([ch], ref))["logits"][:, c.target] - none).mean()
                for ch in range(3)
            ]
        )
        torch.testing.assert_close(c.attribution.float(), want, atol=1e-5, rtol=1e-5)
        only = hand_forward(model, data.x, edit1=_keep_only(list(c.channels), ref))["logits"].argmax(1)
        assert c.sufficiency == pytest.approx(_rates(only, data.y, c.target)[0], abs=1e-12)


# ---- ablation_study --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ablated(world):
    model, spec, data, acts = world
    return ablation_study(model, spec, data, acts)


def test_whole_stages_and_mean_rows_by_hand(world, ablated):
    """Truth: ``hand_forward`` with a whole stage set to 0 or to the reference mean: each class's accuracy, the share
    of images called each class and the class most called; one channel mean-ablated: the change in test accuracy."""
    model, _, data, _ = world
    x, y = data.x, data.y
    base = (hand_forward(model, x)["logits"].argmax(1) == y).double().mean()
    for stage, key in (("conv1", "edit1"), ("conv2", "edit2")):
        ref = hand_forward(model, data.x_ref)[stage].double().mean(0).float()
        for kind, rep in (("zero", torch.zeros_like(ref)), ("mean", ref)):
            pred = hand_forward(model, x, **{key: lambda a, rep=rep: rep.expand_as(a).clone()})["logits"].argmax(1)
            w = ablated.whole_stage(stage, kind)
            want = torch.stack([(pred[y == k] == k).double().mean() for k in range(3)])
            torch.testing.assert_close(w.per_class.double(), want, atol=1e-12, rtol=0)
            share = torch.bincount(pred, minlength=3).double() / len(y)
            torch.testing.assert_close(w.predicted_share.double(), share, atol=1e-12, rtol=0)
            assert w.reads_as == int(share.argmax())
            assert w.test_accuracy == pytest.approx(float((pred == y).double().mean()), abs=1e-12)
        for ch in range(ref.shape[0]):
            pred = hand_forward(model, x, **{key: _set_to([ch], ref)})["logits"].argmax(1)
            want = float((pred == y).double().mean() - base)
            assert float(ablated.stage(stage).mean_overall[ch]) == pytest.approx(want, abs=1e-12)


def test_readout_mean_rows_and_unit_names_by_hand(world, ablated):
    """Truth: conv2's output with one unit (flat index c·H·W + y·W + x, worked out by divmod) set to its reference
    mean, run through fc by hand; the unit's name gives that channel, row and column."""
    model, _, data, _ = world
    y = data.y
    a = hand_forward(model, data.x)["conv2"].flatten(1)
    mean = hand_forward(model, data.x_ref)["conv2"].double().mean(0).float().flatten()

    def per_class(logits):
        pred = logits.argmax(1)
        return torch.stack([(pred[y == k] == k).double().mean() for k in range(3)])

    with torch.no_grad():
        base = per_class(model.fc(a))
        for u in range(a.shape[1]):
            m = a.clone()
            m[:, u] = mean[u]
            torch.testing.assert_close(ablated.readout.mean[u], per_class(model.fc(m)) - base, atol=1e-12, rtol=0)
            c, rest = divmod(u, 4)
            assert ablated.readout.units[u] == f"c{c} y{rest // 2} x{rest % 2}"


# ---- discovery: metrics and the comparison with hand-found channels --------------------------------------------


def _logits_and_labels():
    g = torch.Generator().manual_seed(7)
    return torch.randn(12, 4, generator=g) * 2, torch.arange(12) % 4


def test_logit_diff_detect_and_kl_by_numpy():
    """Truth: numpy/scipy written out: logit_diff = l[y] − mean of the other K−1 logits over the target's images;
    detect = mean over every image of (argmax == D) == (label == D); kl = mean of scipy's entropy(clean, out)."""
    out, y = _logits_and_labels()
    lo = out.numpy().astype(float)
    rows = y.numpy() == 2
    want = np.mean([lo[i, 2] - (lo[i].sum() - lo[i, 2]) / 3 for i in np.flatnonzero(rows)])
    assert float(make_metric("logit_diff", y, 2)(out)) == pytest.approx(want, abs=1e-9)
    pred = lo.argmax(1)
    assert float(make_metric("detect", y, 2)(out)) == pytest.approx(np.mean((pred == 2) == (y.numpy() == 2)))
    clean = out.roll(1, dims=1) + 0.3
    p, q = torch.softmax(clean.double(), 1).numpy(), torch.softmax(out.double(), 1).numpy()
    want = np.mean([stats.entropy(p[i], q[i]) for i in range(len(p))])
    assert float(make_metric("kl", y, None, clean)(out)) == pytest.approx(want, abs=1e-9)


def test_the_images_a_metric_averages_over():
    """Truth (by hand, as the docstring defines them): with a target, detect and kl average over every image (the
    count scrubbing reports as metric_images), the other metrics over the target's images only."""
    from mechscope.cnn.methods.discovery import metric_rows

    _, y = _logits_and_labels()
    for name in ("detect", "kl"):
        assert metric_rows(name, y, 2).tolist() == [True] * 12
    assert metric_rows("logit", y, 2).tolist() == [int(v) == 2 for v in y]


@pytest.fixture(scope="module")
def hand_scores():
    """Seeded edge scores on the tiny CNN's channel graph, with signed read-out edges set by hand."""
    spec = walk(_tiny(0))
    g = CNNEdges(spec).graph
    s = np.random.default_rng(3).normal(size=g.n_edges)
    for j, v in enumerate((-5.0, 1.0, 2.0, -0.5)):
        s[g.edge_id(f"conv2.c{j}", "logits", "in")] = v
    return spec, EdgeScores("hand", g, s)


def test_channel_scores_are_the_largest_edge_touching_each_channel(hand_scores):
    """Truth: a loop over the graph's edges by name: a channel's score is the largest |score| of an edge it sends
    or receives."""
    spec, sc = hand_scores
    got = channel_scores(sc, spec)
    for st in spec.stages:
        for j in range(st.out_channels):
            name = f"{st.name}.c{j}"
            want = max(abs(v) for (s, n, _), v in zip(sc.graph.edges, sc.scores, strict=True) if name in (s, n))
            assert got[st.name][j] == pytest.approx(want)


@pytest.mark.parametrize(
    "hand, top, recall, jaccard, ranks",
    [([0, 2], [0, 2], 1.0, 1.0, {0: 1, 2: 2}), ([0, 1], [0, 2], 0.5, 1 / 3, {0: 1, 1: 3})],
)
def test_compare_channels_by_hand_and_sklearn(hand_scores, hand, top, recall, jaccard, ranks):
    """Truth: the read-out edges' |scores| (−5, 1, 2, −0.5) ranked by hand; recall and Jaccard of the top set by hand;
    AUROC from sklearn's roc_auc_score; ranks 1-based."""
    spec, sc = hand_scores
    r = compare_channels(sc, spec, hand)
    assert r["discovered_top"] == top and r["ranking"] == [0, 2, 1, 3]
    assert r["recall_at_size"] == pytest.approx(recall) and r["jaccard"] == pytest.approx(jaccard)
    assert r["hand_ranks"] == ranks
    labels = np.isin(np.arange(4), hand)
    assert r["auroc"] == pytest.approx(roc_auc_score(labels, [5.0, 1.0, 2.0, 0.5]))


# ---- faithfulness ----------------------------------------------------------------------------------------------


class _Sum(nn.Module):
    """logit 0 = 0.1 · Σ pixels, logit 1 = 0: the class-0 probability is sigmoid(0.1 · Σ pixels)."""

    def forward(self, x):
        s = 0.1 * x.flatten(1).sum(1)
        return torch.stack([s, torch.zeros_like(s)], 1)


def test_deletion_and_insertion_steps_round_the_pixel_count():
    """Truth: 10 non-background pixels of distinct values, 4 steps: step k removes (reveals) the np.round(10·k/4) =
    0, 2, 5, 8, 10 (half to even) top-scored pixels, ranked by numpy; the probability is sigmoid(0.1·Σ pixels left)."""
    x = torch.zeros(1, 1, 4, 4)
    where = torch.tensor([0, 2, 3, 5, 7, 8, 10, 12, 13, 15])
    x.view(-1)[where] = torch.arange(1.0, 11.0)
    scores = torch.rand(1, 16, generator=torch.Generator().manual_seed(2))
    curves = FA.deletion_insertion(_Sum().eval(), x, 0, scores, steps=4)
    vals, sc = x.view(-1).numpy().astype(float), scores[0].numpy().astype(float)
    top = where.numpy()[np.argsort(-sc[where.numpy()], kind="stable")]
    for k, j in enumerate(np.round(np.linspace(0, 1, 5) * 10).astype(int)):
        removed = vals[top[:j]].sum()
        want_del = 1 / (1 + math.exp(-0.1 * (vals.sum() - removed)))
        want_ins = 1 / (1 + math.exp(-0.1 * removed))
        assert float(curves.deletion[0, k]) == pytest.approx(want_del, abs=1e-6)
        assert float(curves.insertion[0, k]) == pytest.approx(want_ins, abs=1e-6)


def test_spearman_within_a_mask_is_scipys_on_the_masked_entries():
    """Truth: scipy.stats.spearmanr on each row's masked entries only."""
    g = torch.Generator().manual_seed(4)
    a, b = torch.rand(3, 20, generator=g), torch.rand(3, 20, generator=g)
    mask = torch.rand(3, 20, generator=g) > 0.4
    b[~mask] = a[~mask]  # agreement off the mask must not count
    got = FA.spearman_within(a, b, mask)
    for i in range(3):
        m = mask[i].numpy()
        want = stats.spearmanr(a[i].numpy()[m], b[i].numpy()[m]).statistic
        assert float(got[i]) == pytest.approx(want, abs=1e-6)


def test_randomised_layers_take_pytorchs_default_bound():
    """Truth: PyTorch's default initialisation of Linear and Conv2d draws from U(−1/√fan_in, 1/√fan_in), fan_in from
    torch.nn.init; the redrawn weights fill that range (max |w| near the bound, never past it)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(200, 4))
    _, randomised = list(FA.randomise_cascading(model, ["2", "0"], seed=1))[-1]
    for i in ("0", "2"):
        w = dict(randomised.named_modules())[i].weight
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(w)
        bound = 1 / math.sqrt(fan_in)
        top = float(w.detach().abs().max())
        assert 0.9 * bound < top <= bound


def test_the_sanity_check_reads_absolute_rho_and_the_report_compares_with_random():
    """Truth (Adebayo et al.): a map strongly anti-correlated with the trained model's (ρ = −0.9) did not change
    "independently" of the weights and fails; beats_random_order means a smaller deletion area and a larger insertion
    area than the random order, by hand."""
    good = FA.MethodFaithfulness("good", 0.1, 0.8, {"fc": 0.1}, {"fc": 0.1})
    anti = FA.MethodFaithfulness("anti", 0.1, 0.8, {"fc": -0.9}, {"fc": -0.9})
    worse = FA.MethodFaithfulness("worse", 0.5, 0.3, {"fc": 0.0}, {"fc": 0.0})
    r = FA.FaithfulnessReport([good, anti, worse], 0.3, 0.5, ["fc"], 4, 28, curves_over=FA.CURVES_OVER)
    assert r.passes(good) and not r.passes(anti) and r.passes(worse)
    d = r.to_dict()["methods"]
    assert d["good"]["beats_random_order"] and not d["worse"]["beats_random_order"]


def test_the_default_cascade_runs_from_the_top_layer_down():
    """Truth: the tiny CNN's parameterised children are conv1, conv2, fc; Adebayo's cascade starts at the top:
    fc, conv2, conv1."""
    model = _tiny(0)
    r = FA.evaluate_faithfulness(model, torch.rand(2, 1, 16, 16), 0, {}, steps=2)
    assert r.layers == ["fc", "conv2", "conv1"]


def test_a_target_without_other_classes_is_refused_in_one_line():
    """Truth: the project's convention (one-line MechscopeError for bad input): five images all of class 0 leave no
    image to corrupt class 0's with."""
    from mechscope.cnn.methods.discovery import image_task
    from mechscope.core.errors import MechscopeError

    with pytest.raises(MechscopeError, match="^every test image is of class 0: no image of another class"):
        image_task(torch.rand(5, 1, 8, 8), torch.zeros(5, dtype=torch.long), target=0, n_classes=2)
