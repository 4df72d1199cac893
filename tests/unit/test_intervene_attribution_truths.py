"""Interventions and attributions against outside truths: hand-written forwards with a hand edit, Captum on the same
model, closed forms of linear maps, and hand means. Each test fails if the behaviour it names is broken."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mechscope.cnn.methods import attribution as A
from mechscope.cnn.methods import layer_attribution as L
from mechscope.cnn.methods.group_attribution import GroupFlow, average_flows, group_scores
from mechscope.cnn.models.cnn import CNN, CNNConfig
from mechscope.core import intervene as ivn
from mechscope.core.hooks import attached_hooks, run_with_cache
from tests.unit.test_explain_parts_truths import hand_forward

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one torch thread


@pytest.fixture()
def tiny():
    """A random 16x16 CNN: conv1 [4, 7, 7], conv2 [6, 2, 2], 3 classes."""
    torch.manual_seed(0)
    return CNN(CNNConfig(channels=(4, 6), image_size=16, kernel_size=3, n_classes=3)).eval()


@pytest.fixture()
def x():
    return torch.rand(24, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def test_per_input_patch_in_chunks_uses_each_chunks_own_donors(tiny, x):
    """Outside truth: a hand forward with channel c of conv1's output replaced by the donor's; inputs split into chunks
    of 5 (24 inputs) must give the same as one batch, each input patched from its own donor."""
    donors = torch.rand(24, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    donor = hand_forward(tiny, donors)["conv1"]

    def patched(c):
        def edit(a1):
            a1[:, c] = donor[:, c]
            return a1

        return hand_forward(tiny, x, edit1=edit)["logits"]

    expected, plain = [patched(1), patched(3)], hand_forward(tiny, x)["logits"]
    masks = ivn.channel_masks((4, 7, 7), [1, 3])
    chunked = ivn.intervene(tiny, x, "conv1.hook_out", masks, donor, batch_size=5)
    whole = ivn.intervene(tiny, x, "conv1.hook_out", masks, donor, batch_size=2048)
    for i in range(2):
        torch.testing.assert_close(chunked[i], expected[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(whole[i], expected[i], rtol=1e-5, atol=1e-5)
    assert (expected[1] - plain).abs()[5:].max() > 1e-3  # the patch matters past the first chunk
    assert attached_hooks(tiny) == []


def test_resample_donors_from_the_data_never_pick_the_input_itself():
    """Outside truth: uniform over the other inputs. With two inputs the only choice is the other one; with three,
    each input's two others are drawn about half the time each and the input itself never."""
    for seed in range(50):
        assert ivn.resample_donors(torch.zeros(2, dtype=torch.long), seed=seed, other_class=False).tolist() == [1, 0]
    draws = torch.stack([ivn.resample_donors(torch.tensor([0, 1, 0]), seed=s, other_class=False) for s in range(400)])
    assert draws.min() >= 0 and draws.max() <= 2
    for i in range(3):
        col = draws[:, i]
        assert (col != i).all()
        for j in {0, 1, 2} - {i}:
            assert 0.4 < (col == j).double().mean().item() < 0.6


def test_run_with_cache_grad_true_inside_no_grad_builds_no_graph(tiny, x):
    """Outside truth: torch's own rule that nothing under ``torch.no_grad()`` requires grad (a plain forward there
    does not); ``grad=True`` keeps the graph only where autograd is on."""
    with torch.no_grad():
        plain = tiny(x)
        out, cache = run_with_cache(tiny, x, names=["conv1.hook_out", "conv2.hook_pre"], grad=True)
    assert not plain.requires_grad and not out.requires_grad
    assert not cache["conv1.hook_out"].requires_grad and not cache["conv2.hook_pre"].requires_grad
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    assert torch.is_grad_enabled()  # the mode is restored
    out, cache = run_with_cache(tiny, x, names=["conv1.hook_out"], grad=True)  # and outside no_grad it is kept
    assert out.requires_grad and cache["conv1.hook_out"].requires_grad


def test_layer_ig_with_a_non_zero_baseline_matches_captum(tiny, x):
    """Outside truth: Captum's LayerIntegratedGradients on the same layer, baseline and integration settings."""
    captum = pytest.importorskip("captum.attr")
    xs = x[:6]
    with torch.no_grad():
        t = tiny(xs).argmax(1)
    for base in (torch.full_like(xs, 0.1), torch.rand(xs.shape, generator=torch.Generator().manual_seed(5))):
        for layer in ("conv1.hook_out", "conv2.hook_post"):
            ours = L.layer_integrated_gradients(tiny, xs, t, layer, baseline=base, n_steps=16).per_position
            module = dict(tiny.named_modules())[layer]
            theirs = captum.LayerIntegratedGradients(tiny, module).attribute(
                xs, baselines=base, target=t, n_steps=16, method="gausslegendre"
            )
            scale = theirs.abs().max().item()
            assert scale > 0
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * scale)


def test_ig_delta_on_a_linear_model_is_zero_against_the_baseline():
    """Outside truth: for f(x) = W·x + b, IG from baseline x' is W[t]·(x − x') per pixel exactly, and the
    completeness gap f(x) − f(x') − Σ attributions is 0 (a gap taken against a black image would be 0.3·ΣW[t])."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).double().eval()
    xs = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.tensor([0, 3, 7, 9])
    w = model[1].weight.detach()
    attr, delta = A.IntegratedGradients(n_steps=8, baseline=0.3).attribute_with_delta(model, xs, t)
    torch.testing.assert_close(attr, w[t].view(4, 1, 28, 28) * (xs - 0.3), rtol=1e-10, atol=1e-12)
    assert delta.shape == (4,) and delta.abs().max() < 1e-9
    assert (0.3 * w[t].sum(1)).abs().min() > 1e-3  # a gap against zeros would be visible


def test_class_channel_to_channel_is_the_class_mean_of_a_hand_decomposition(tiny, x):
    """Outside truth: conv2's pre-activation is linear in conv1's output, so entry [j, i] for one image is channel i
    convolved alone with W[j, i] and summed over positions (no bias); per class, the plain mean over its images."""
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 2, 2, 0, 1] + [2] * 14)  # counts 6, 2, 16; class 3 has none
    per_class = L.class_channel_to_channel(tiny, x, labels, "conv1.hook_out", "conv2.hook_pre", n_classes=4)
    with torch.no_grad():
        a1 = hand_forward(tiny, x)["conv1"]
        w2 = tiny.conv2.conv.weight
        hand = torch.stack([F.conv2d(a1[:, i : i + 1], w2[:, i : i + 1]).sum((2, 3)) for i in range(4)], 2)  # [B, 6, 4]
    hand, lab = hand.double().numpy(), labels.numpy()
    for k, n in ((0, 6), (1, 2), (2, 16)):
        rows = [hand[b] for b in range(24) if lab[b] == k]
        assert len(rows) == n
        np.testing.assert_allclose(per_class[k].numpy(), sum(rows) / n, rtol=1e-4, atol=1e-5)
    assert per_class[3].abs().max() == 0


def test_group_scores_read_only_the_positive_part():
    """Outside truth: s = ⟨b⁺, V⟩ / ‖V‖² by hand. V = ones(2x2), b = [[1, −1], [2, −3]]: ⟨b⁺, V⟩ = 3, ‖V‖² = 4."""
    comps = torch.ones(1, 1, 2, 2)
    b = torch.tensor([[[[1.0, -1.0], [2.0, -3.0]]]])
    assert group_scores(b, comps).tolist() == [[0.75]]
    g = torch.Generator().manual_seed(0)
    bb, vv = torch.randn(3, 2, 3, 3, generator=g), torch.rand(2, 2, 3, 3, generator=g)
    bn, vn = bb.double().numpy(), vv.double().numpy()
    hand = np.array([[np.sum(np.maximum(bn[i], 0) * vn[h]) / np.sum(vn[h] ** 2) for h in range(2)] for i in range(3)])
    np.testing.assert_allclose(group_scores(bb, vv).numpy(), hand, rtol=1e-5, atol=1e-6)


def flow(target, attribution, names):
    a = np.asarray(attribution, dtype=float)
    return GroupFlow("conv2", target, names, a, a.sum(0) + 1, a.sum(0) + 2, a.sum(0) + 3, 2 * a, 1)


def test_average_flows_towards_a_class_average_over_that_class_only():
    """Outside truth: hand means. Towards logits, column c averages the images labelled c (all images where none is);
    between groups every column averages all images."""
    rows = [[[1.0, 0.0, 6.0]], [[0.0, 5.0, 0.0]], [[2.0, 3.0, 3.0]]]
    labels = [0, 1, 1]
    per_image = [[flow("conv3", r, ("g1", "g2", "g3")), flow("logits", r, ("zero", "one", "two"))] for r in rows]
    groups, logits = average_flows(per_image, labels)
    np.testing.assert_allclose(groups.attribution, [[1.0, 8 / 3, 3.0]])
    np.testing.assert_allclose(logits.attribution, [[1.0, 4.0, 3.0]])  # class 0: image 0; class 1: images 1, 2
    np.testing.assert_allclose(logits.removal, [[2.0, 8.0, 6.0]])
    np.testing.assert_allclose(logits.residual, [2.0, 5.0, 4.0])
    assert logits.n_images == 3 and logits.targets == ("zero", "one", "two")
    two = average_flows(
        [[flow("logits", [[1.0, 0.0]], ("a", "b"))], [flow("logits", [[0.0, 5.0]], ("a", "b"))]], [0, 1]
    )
    np.testing.assert_allclose(two[0].attribution, [[1.0, 5.0]])


class SharedReLU(nn.Module):
    """One nn.ReLU used after both convolutions (``separate``: the same network with one ReLU per use)."""

    def __init__(self, separate: bool = False):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.conv1, self.conv2 = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3)
            self.pool, self.relu, self.fc = nn.MaxPool2d(2), nn.ReLU(), nn.Linear(4 * 2 * 2, 3)
        self.relu2 = nn.ReLU() if separate else self.relu

    def forward(self, x):
        return self.fc(torch.flatten(self.relu2(self.conv2(self.pool(self.relu(self.conv1(x))))), 1))


def test_deeplift_on_a_relu_module_called_twice_equals_one_relu_per_use():
    """Truth: the same network with its two ReLU uses as two modules (DeepLIFT's multipliers are per use, each from
    its own input and reference). It kept one saved activation per module: the second use's overwrote the first's
    and the backward raised."""
    x = torch.rand(5, 1, 10, 10, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 1, 2, 0, 1])
    shared, separate = SharedReLU(), SharedReLU(separate=True)
    torch.testing.assert_close(A.DeepLift().attribute(shared, x, t), A.DeepLift().attribute(separate, x, t))
