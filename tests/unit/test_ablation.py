"""Ablation and patching: known answers on a randomly initialised CNN, computed without hooks."""

from __future__ import annotations

import pytest
import torch

from mechscope.cnn.models.cnn import CNN
from mechscope.core import intervene as A
from mechscope.core.errors import HookError, MechscopeError
from mechscope.core.hooks import attached_hooks


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return CNN().eval()


@pytest.fixture()
def x():
    g = torch.Generator().manual_seed(1)
    return torch.rand(24, 1, 28, 28, generator=g)


def manual(model, x, edit1=None, edit2=None):
    """The CNN's forward written out by hand, with optional edits of conv1/conv2 outputs (no hooks)."""
    with torch.no_grad():
        a1 = model.conv1(model.normalize(x))
        if edit1 is not None:
            a1 = edit1(a1.clone())
        a2 = model.conv2(a1)
        if edit2 is not None:
            a2 = edit2(a2.clone())
        return model.fc(a2.flatten(1))


def test_empty_mask_changes_nothing_bit_for_bit(model, x):
    for layer, shape in (("conv1.hook_out", (16, 12, 12)), ("conv2.hook_out", (32, 4, 4)), ("hook_logits", (10,))):
        empty = torch.zeros(1, *shape, dtype=torch.bool)
        out = A.intervene(model, x, layer, empty, 123.0)
        with torch.no_grad():
            assert torch.equal(out[0], model(x))
    assert attached_hooks(model) == []


def test_zero_and_mean_ablation_match_a_hand_written_forward(model, x):
    mean = torch.rand(16, 12, 12)
    masks = A.channel_masks((16, 12, 12), [3, 7])
    zero = A.ablate(model, x, "conv1.hook_out", masks, "zero")
    meaned = A.ablate(model, x, "conv1.hook_out", masks, "mean", mean)

    def set_zero(a, c=3):
        a[:, c] = 0
        return a

    def set_mean(a, c=7):
        a[:, c] = mean[c]
        return a

    torch.testing.assert_close(zero[0], manual(model, x, edit1=set_zero))
    torch.testing.assert_close(meaned[1], manual(model, x, edit1=set_mean))
    assert not torch.allclose(zero[0], manual(model, x))


def test_many_masks_share_a_forward_and_agree_with_one_at_a_time(model, x):
    masks = A.unit_masks((32, 4, 4))[::37]
    together = A.intervene(model, x[:4], "conv2.hook_out", masks, 0.5, batch_size=64)  # 16 masks per forward
    alone = torch.cat([A.intervene(model, x[:4], "conv2.hook_out", m[None], 0.5, batch_size=4) for m in masks])
    torch.testing.assert_close(together, alone)


def test_patching_everything_reproduces_the_clean_run(model, x):
    clean, corrupted = x[:8], x[8:16]
    every = torch.ones(1, 16, 12, 12, dtype=torch.bool)
    out = A.patch(model, corrupted, clean, "conv1.hook_out", every)
    with torch.no_grad():
        torch.testing.assert_close(out[0], model(clean), rtol=0, atol=1e-6)
    one = A.unit_masks((16, 12, 12))[5:6]

    def take_clean(a):
        with torch.no_grad():
            ref = model.conv1(model.normalize(clean))
        a[:, 0, 0, 5] = ref[:, 0, 0, 5]
        return a

    torch.testing.assert_close(
        A.patch(model, corrupted, clean, "conv1.hook_out", one)[0], manual(model, corrupted, take_clean)
    )


def test_readout_closed_form_matches_hooked_forwards(model, x):
    with torch.no_grad():
        a2 = model.conv2(model.conv1(model.normalize(x))).flatten(1)  # [B, 512]
        logits = model.fc(a2)
    w, b = model.fc.weight.detach(), model.fc.bias.detach()
    ref = torch.rand(512)
    g = torch.Generator().manual_seed(2)
    dense = torch.rand(5, 512, generator=g) < 0.3
    masks = torch.cat([A.unit_masks((512,))[:40], dense, torch.zeros(1, 512, dtype=torch.bool)])
    closed = A.readout_intervene(w, b, a2, masks, ref, logits=logits)
    hooked = A.intervene(model, x, "conv2.hook_out", masks.view(-1, 32, 4, 4), ref.view(32, 4, 4))
    torch.testing.assert_close(closed, hooked, rtol=1e-5, atol=1e-5)
    assert torch.equal(closed[-1], logits)  # the empty mask: untouched, bit for bit
    per_input = torch.rand(len(x), 512)  # a replacement per input (patching)
    torch.testing.assert_close(
        A.readout_intervene(w, b, a2, dense, per_input),
        A.intervene(model, x, "conv2.hook_out", dense.view(-1, 32, 4, 4), per_input.view(-1, 32, 4, 4)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_channel_contributions_add_up_to_keeping_a_set(model, x):
    with torch.no_grad():
        a2 = model.conv2(model.conv1(model.normalize(x)))  # [B, 32, 4, 4]
    ref = torch.rand(32, 4, 4)
    base, contrib = A.readout_channel_contributions(
        model.fc.weight.detach(), a2.flatten(2), ref.flatten(1), model.fc.bias.detach()
    )
    keep = [1, 4, 30]
    others = torch.ones(1, 32, 4, 4, dtype=torch.bool)
    others[0, keep] = False
    hooked = A.ablate(model, x, "conv2.hook_out", others, "mean", ref)[0]
    torch.testing.assert_close(base + contrib[:, keep].sum(1), hooked, rtol=1e-5, atol=1e-5)


def test_layer_means_and_class_accuracy():
    torch.manual_seed(0)
    model = CNN().eval()
    x = torch.rand(50, 1, 28, 28)
    means = A.layer_means(model, x, ["conv2.hook_out"], batch_size=7)
    with torch.no_grad():
        ref = model.conv2(model.conv1(model.normalize(x))).mean(0)
    torch.testing.assert_close(means["conv2.hook_out"], ref, rtol=1e-5, atol=1e-6)
    labels = torch.tensor([0, 0, 1, 2])
    logits = torch.tensor([[5.0, 0, 0], [0, 5, 0], [0, 5, 0], [0, 5, 0]])  # right, wrong, right, wrong
    per = A.class_accuracy(labels, 3)(logits[None])
    assert per.tolist() == [[0.5, 1.0, 0.0]]


def test_mean_ablating_a_whole_trained_layer_drops_towards_chance(quick_run, mnist):
    from mechscope.cnn.data.mnist import MNIST
    from mechscope.cnn.runs import load_run

    model = load_run(quick_run).model
    x, y = MNIST.to_float(mnist.test_images[:2000]), mnist.test_labels[:2000]
    reduce = A.class_accuracy(y)
    means = A.layer_means(model, MNIST.to_float(mnist.train_images[:2000]), ["conv1.hook_out", "conv2.hook_out"])
    for layer, shape in (("conv1.hook_out", (16, 12, 12)), ("conv2.hook_out", (32, 4, 4))):
        full = A.intervene(model, x, layer, torch.zeros(1, *shape, dtype=torch.bool), 0.0, reduce)[0].mean()
        every = A.ablate(model, x, layer, torch.ones(1, *shape, dtype=torch.bool), "mean", means[layer], reduce)
        assert full > 0.85
        assert every[0].mean() < 0.2  # a constant input to the rest of the network: one class for everything


def test_hooks_are_removed_when_a_function_raises(model, x):
    masks = A.channel_masks((16, 12, 12), [0])

    def broken(out):
        raise RuntimeError("reduce failed")

    with pytest.raises(RuntimeError):
        A.intervene(model, x, "conv1.hook_out", masks, 0.0, broken)
    assert attached_hooks(model) == []
    with pytest.raises(MechscopeError, match="masks for conv1.hook_out must be boolean"):
        A.intervene(model, x, "conv1.hook_out", masks.float(), 0.0)
    with pytest.raises(HookError, match="unknown hook point"):
        A.intervene(model, x, "conv9.hook_out", masks, 0.0)
    with pytest.raises(MechscopeError, match="replacement has 3 rows for 24 inputs"):
        A.intervene(model, x, "conv1.hook_out", masks, torch.zeros(3, 16, 12, 12))
    with pytest.raises(MechscopeError, match="channel 16 out of range"):
        A.channel_masks((16, 12, 12), [16])
    with pytest.raises(MechscopeError, match="unknown ablation kind"):
        A.ablate(model, x, "conv1.hook_out", masks, "resample")
    with pytest.raises(MechscopeError, match="needs the layer's mean"):
        A.ablate(model, x, "conv1.hook_out", masks, "mean")
    assert attached_hooks(model) == []


def test_resample_donors_are_seeded_and_of_another_class():
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1, 2] * 30)
    donors = A.resample_donors(labels, seed=3)
    assert torch.equal(donors, A.resample_donors(labels, seed=3))
    assert not torch.equal(donors, A.resample_donors(labels, seed=4))
    assert (labels[donors] != labels).all()
    assert len(set(donors.tolist())) > 100  # spread over the pool, not one donor for all
    anyone = A.resample_donors(labels, seed=3, other_class=False)
    assert (anyone != torch.arange(len(labels))).all() and anyone.max() < len(labels)
    with pytest.raises(MechscopeError, match="no donor of another class"):
        A.resample_donors(torch.zeros(5, dtype=torch.long))
    with pytest.raises(MechscopeError, match="at least two inputs"):
        A.resample_donors(torch.zeros(1, dtype=torch.long), other_class=False)


def test_derangement_moves_every_index_is_seeded_and_refuses_one_item():
    from mechscope.core.intervene import derangement

    for n in (2, 3, 10, 57):
        p = derangement(n, torch.Generator().manual_seed(n))
        assert sorted(p.tolist()) == list(range(n)) and not (p == torch.arange(n)).any()
        assert torch.equal(p, derangement(n, torch.Generator().manual_seed(n)))
    assert derangement(2, torch.Generator().manual_seed(0)).tolist() == [1, 0]
    with pytest.raises(MechscopeError, match="at least two items, got 1"):
        derangement(1, torch.Generator())
