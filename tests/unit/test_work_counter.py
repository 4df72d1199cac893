"""WorkCounter: the passes every pipeline records in its JSON's ``work``, against counts known by construction."""

from __future__ import annotations

import logging

import pytest
import torch

from mechscope.cnn.models.cnn import CNN, CNNConfig
from mechscope.cnn.models.spec import walk
from mechscope.lm.models.transformer import HookedTransformer, TransformerConfig, work_counter

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_lm(n_layers: int = 4) -> HookedTransformer:
    torch.manual_seed(0)
    cfg = TransformerConfig(d_model=16, n_layers=n_layers, n_heads=2, d_head=8, d_vocab=32, n_ctx=16, d_mlp=32)
    return HookedTransformer(cfg).eval()


def test_transformer_passes_count_the_layers_each_run_covers():
    model = tiny_lm(4)
    tokens = torch.randint(0, 32, (3, 10))
    counter = work_counter(model)
    with counter.counting():
        resid = model.embed(tokens)
        model(tokens)  # one full pass over 3 x 10 tokens
        model.run_blocks(resid, 2)  # half a pass: blocks 2 and 3 of 4
        model.run_blocks(resid[:1], 0, 1)  # one block of one sequence of three: a twelfth of a pass
        loss = model(tokens).sum()  # a second full pass, and one backward through every block
        loss.backward()
    work = counter.summary(30)
    assert work["unit"] == "tokens" and work["rows_per_pass"] == 30
    assert work["forward_passes"] == pytest.approx(2 + 0.5 + 1 / 12, abs=1e-3)
    assert work["backward_passes"] == 1.0
    assert work["forward_tokens"] == (4 * 30 + 4 * 30 + 2 * 30 + 10) // 4
    assert work["layer_calls"] == {"forward": 4 + 2 + 1 + 4, "backward": 4}
    with torch.no_grad():  # the hooks are gone once the counting ends
        model(tokens)
    assert counter.summary(30)["forward_passes"] == work["forward_passes"]


def test_cnn_passes_are_images_through_the_stages():
    spec = walk(CNN(CNNConfig(channels=(4, 8, 8), kernel_size=3, padding=1)).eval())
    x = torch.rand(20, *spec.input_shape)
    counter = spec.work_counter()
    with counter.counting(), torch.no_grad():
        spec.model(x)  # 20 images through 3 stages
        spec.model(x[:5])
    work = counter.summary(20)
    assert work["unit"] == "images" and work["forward_images"] == 25
    assert work["forward_passes"] == 1.25 and work["backward_passes"] == 0.0


def test_report_logs_the_one_line_that_minus_v_shows(caplog):
    model = tiny_lm(2)
    counter = work_counter(model)
    with counter.counting(), torch.no_grad():
        model(torch.zeros(2, 5, dtype=torch.long))
    with caplog.at_level(logging.INFO, logger="mechscope.core.torch_utils"):
        work = counter.report("lm something", 5)
    assert work == counter.summary(5) and work["forward_passes"] == 2.0
    assert caplog.messages == ["lm something: 2.0 forward and 0.0 backward passes of 5 tokens"]


def test_counting_keeps_in_place_activations_working_and_the_gradients_unchanged():
    """A user's network with ReLU(inplace=True) after a counted convolution: a module's full backward hook made
    the gradient fail ("Output 0 of BackwardHookFunction is a view and is being modified inplace")."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(inplace=True), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 8, 3), torch.nn.ReLU(inplace=True), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(8 * 5 * 5, 10),
    ).eval()  # fmt: skip
    spec = walk(net, (1, 28, 28))
    x = torch.rand(6, 1, 28, 28)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    counter = spec.work_counter()
    with counter.counting():
        spec.model(a).logsumexp(1).sum().backward()
    net(b).logsumexp(1).sum().backward()
    assert torch.equal(a.grad, b.grad)
    work = counter.summary(6)
    assert (work["forward_passes"], work["backward_passes"]) == (1.0, 1.0)
    kept = spec.model(a.detach().requires_grad_(True)).sum()  # made after the counting: not counted
    kept.backward()
    assert counter.summary(6) == work


def test_combine_work_adds_models_of_different_depths_in_rows_through_each_whole_model():
    from mechscope.core.torch_utils import combine_work

    deep, shallow = tiny_lm(4), tiny_lm(1)
    tokens = torch.zeros(2, 5, dtype=torch.long)
    parts = {}
    for name, model, runs in (("deep", deep, 3), ("shallow", shallow, 1)):
        counter = work_counter(model)
        with counter.counting(), torch.no_grad():
            for _ in range(runs):
                model(tokens)
        parts[name] = counter.summary(10)
    work = combine_work(parts, "both", 10)
    assert work["forward_tokens"] == 40 and work["forward_passes"] == 4.0
    assert work["parts"] == {"deep": {"forward_passes": 3.0, "backward_passes": 0.0},
                             "shallow": {"forward_passes": 1.0, "backward_passes": 0.0}}  # fmt: skip
    assert work["layer_calls"] == {"forward": 3 * 4 + 1, "backward": 0}


def test_add_counts_what_no_hook_sees():
    from mechscope.core.torch_utils import WorkCounter

    counter = WorkCounter([], "rows")
    counter.add(64, 2, backward=True)
    counter.add(32)
    assert counter.summary(32) == {"unit": "rows", "rows_per_pass": 32, "forward_passes": 3.0, "backward_passes": 2.0,
                                   "forward_rows": 96, "backward_rows": 64,
                                   "layer_calls": {"forward": 3, "backward": 2}}  # fmt: skip
