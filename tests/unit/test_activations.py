"""The CNN's shared activations: one hook's activations and the logits, a batch at a time."""

from __future__ import annotations

import torch

from mechscope.cnn.methods.activations import logits_and_activations
from mechscope.cnn.models.cnn import CNN, CNNConfig
from mechscope.core.hooks import run_with_cache


def test_logits_and_activations_in_batches_are_one_whole_run():
    """The held-out images of the circuit check run a batch at a time (memory): the same logits and activations,
    bit for bit, as one run over all of them, and no forward pass sees more than a batch."""
    torch.manual_seed(0)
    model = CNN(CNNConfig(channels=(4, 6), n_classes=3)).eval()
    x = torch.rand(50, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    whole_logits, cache = run_with_cache(model, x, names=["conv2.hook_out"])
    seen = []
    handle = model.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    try:
        logits, acts = logits_and_activations(model, x, "conv2.hook_out", 16)
    finally:
        handle.remove()
    assert seen == [16, 16, 16, 2]
    assert torch.equal(logits, whole_logits) and torch.equal(acts, cache["conv2.hook_out"])
