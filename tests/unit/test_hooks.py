"""Hook points: names, caching only what is asked, editing, gradients, and nothing left behind."""

from __future__ import annotations

import pytest
import torch

from mechscope.cnn.models.cnn import CNN
from mechscope.core.errors import HookError, MechscopeError
from mechscope.core.hooks import attached_hooks, describe_names, hook_points, hooks, run_with_cache

NAMES = [
    "hook_input",
    "conv1.hook_pre",
    "conv1.hook_post",
    "conv1.hook_out",
    "conv2.hook_pre",
    "conv2.hook_post",
    "conv2.hook_out",
    "hook_logits",
]


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return CNN().eval()


@pytest.fixture()
def x():
    return torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def test_hook_point_names(model):
    assert list(hook_points(model)) == NAMES


def test_cache_stores_only_what_was_asked(model, x):
    logits, cache = run_with_cache(model, x, names=["conv2.hook_out", "conv1.hook_post"])
    assert set(cache) == {"conv2.hook_out", "conv1.hook_post"}
    assert cache["conv1.hook_post"].shape == (3, 16, 24, 24)
    assert cache["conv2.hook_out"].shape == (3, 32, 4, 4)
    torch.testing.assert_close(logits, model(x), rtol=0, atol=0)
    assert not cache["conv2.hook_out"].requires_grad
    assert attached_hooks(model) == []


def test_cache_all_and_predicate(model, x):
    _, everything = run_with_cache(model, x)
    assert list(everything) == NAMES
    _, pre = run_with_cache(model, x, names=lambda n: n.endswith("hook_pre"))
    assert set(pre) == {"conv1.hook_pre", "conv2.hook_pre"}
    torch.testing.assert_close(everything["conv1.hook_post"], pre["conv1.hook_pre"].relu())


def test_cache_with_grad(model, x):
    logits, cache = run_with_cache(model, x, names="conv2.hook_out", grad=True)
    (g,) = torch.autograd.grad(logits[:, 3].sum(), cache["conv2.hook_out"])
    assert g.shape == (3, 32, 4, 4) and g.abs().sum() > 0


def test_unknown_name_lists_valid_names(model, x):
    with pytest.raises(HookError) as err:
        run_with_cache(model, x, names=["conv3.hook_out"])
    message = str(err.value)
    assert "'conv3.hook_out'" in message and all(n in message for n in NAMES)
    noop = lambda a, h: None  # noqa: E731
    with pytest.raises(HookError):
        with hooks(model, fwd=[("conv1.hook_out", noop), ("nope", noop)]):
            pass
    assert attached_hooks(model) == []


def test_forward_hook_edits_activation(model, x):
    _, cache = run_with_cache(model, x, names="conv2.hook_out")
    channel = int(cache["conv2.hook_out"].mean((0, 2, 3)).argmax())  # a live channel

    def zero_channel(act, hook):
        act = act.clone()
        act[:, channel] = 0
        return act

    with hooks(model, fwd=[("conv2.hook_out", zero_channel)]):
        edited = model(x)
    # by hand: zero channel 5 of conv2's output, then the read-out
    with torch.no_grad():
        h = model.conv2(model.conv1(model.normalize(x)))
        h[:, channel] = 0
        expected = model.fc(h.flatten(1))
    torch.testing.assert_close(edited, expected)
    assert not torch.allclose(edited, model(x))
    assert attached_hooks(model) == []


def test_backward_hook_sees_gradient(model, x):
    seen = {}

    def grab(grad, hook):
        seen[hook.name] = grad.clone()

    xg = x.clone().requires_grad_(True)
    with hooks(model, bwd=[("hook_input", grab)]):
        model(xg)[:, 2].sum().backward()
    torch.testing.assert_close(seen["hook_input"], xg.grad)


def test_backward_hook_replaces_gradient(model, x):
    xg = x.clone().requires_grad_(True)
    with hooks(model, bwd=[("conv1.hook_out", lambda g, h: torch.zeros_like(g))]):
        model(xg)[:, 2].sum().backward()
    assert xg.grad.abs().sum() == 0


def test_backward_hook_inactive_after_exit(model, x):
    calls = []
    xg = x.clone().requires_grad_(True)
    with hooks(model, bwd=[("conv1.hook_out", lambda g, h: calls.append(1))]):
        out = model(xg)
    out.sum().backward()  # graph built inside, backward after: the hook must not act
    assert calls == []


def test_hooks_removed_when_block_raises(model, x):
    with pytest.raises(RuntimeError, match="boom"):
        with hooks(model, fwd=[("conv1.hook_pre", lambda a, h: None)], bwd=[("conv2.hook_pre", lambda g, h: None)]):
            assert attached_hooks(model)
            raise RuntimeError("boom")
    assert attached_hooks(model) == []


def test_hooks_removed_when_hook_raises(model, x):
    def bad(act, hook):
        raise ValueError("bad hook")

    with pytest.raises(ValueError, match="bad hook"), hooks(model, fwd=[("conv1.hook_out", bad)]):
        model(x)
    assert attached_hooks(model) == []


def _raises(act, hook):
    raise ValueError("fails inside the forward")


def test_run_with_cache_cleans_up_when_forward_fails(model):
    with pytest.raises(MechscopeError, match="expected input shaped"):  # 3 channels: the forward refuses them
        run_with_cache(model, torch.rand(2, 3, 28, 28), names=["conv1.hook_out"])
    with pytest.raises(ValueError, match="fails inside"):  # a hook that raises, after the cache's hooks ran
        with hooks(model, fwd=[("conv2.hook_out", _raises)]):
            run_with_cache(model, torch.rand(2, 1, 28, 28), names=["conv1.hook_out"])
    assert attached_hooks(model) == []


def test_describe_names_collapses_layers():
    names = [f"blocks.{i}.attn.hook_q" for i in range(12)] + ["hook_embed", "blocks.0.hook_resid_pre"]
    assert describe_names(names) == "blocks.{0..11}.attn.hook_q, hook_embed, blocks.0.hook_resid_pre"


def test_hooks_and_names_of_the_wrong_shape_are_one_line(model, x):
    """Truth: the signatures' documented forms. Names without functions were "too many values to unpack", an int for
    names "'int' object is not iterable"; nothing is attached either way."""
    for fwd, said in ((["conv1.hook_out"], "each hook is a .name, function. pair"),
                      ([("conv1.hook_out", None)], "each hook is a .name, function. pair"),
                      ([(3, lambda a, hp: a)], "each hook is a .name, function. pair")):  # fmt: skip
        with pytest.raises(HookError, match=said):
            with hooks(model, fwd=fwd):
                pass
    for names, said in ((5, "names: a hook point's name, a list of them"), ([5], "named by a string, got 5")):
        with pytest.raises(HookError, match=said):
            run_with_cache(model, x, names=names)
    assert attached_hooks(model) == []


def test_integer_pixels_are_refused_not_read_as_unit_pixels(model, x):
    """Truth: the CNN's input contract, float pixels in [0, 1]. uint8 images (0..255) ran, normalised as if in
    [0, 1] (logits near -135); the same images as floats in [0, 1] run."""
    from mechscope.core.errors import MechscopeError

    with pytest.raises(MechscopeError, match="expected a floating-point input in .0, 1., got dtype torch.uint8"):
        run_with_cache(model, (x * 255).to(torch.uint8))
    assert run_with_cache(model, x)[0].shape[0] == x.shape[0]
