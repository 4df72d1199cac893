"""The explain report's per-channel examples (top images, where, their receptive field, input × gradient), each
recomputed without mechscope's hooks: a forward hook on the activation module, autograd on one image at a time, and
the receptive field as the pixels that can move the unit."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mechscope.cnn.methods.unit_examples import unit_examples
from mechscope.cnn.models.cnn import CNN
from mechscope.cnn.models.spec import walk

K = 3


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = CNN().eval()
    g = torch.Generator().manual_seed(1)
    data = SimpleNamespace(x=torch.rand(40, 1, 28, 28, generator=g), y=torch.randint(0, 10, (40,), generator=g))
    spec = walk(model)
    return model, spec, data, unit_examples(model, spec, data, k=K)


def _act(model, stage: str, x: torch.Tensor) -> torch.Tensor:
    """The stage's activation (after its nonlinearity), read by a plain forward hook on the module."""
    seen = []
    handle = model.get_submodule(f"{stage}.act").register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        model(x)
    finally:
        handle.remove()
    return seen[0]


def test_top_images_positions_labels_and_pictures(setup):
    model, spec, data, examples = setup
    for s, ex in zip(spec.stages, examples, strict=True):
        with torch.no_grad():
            a = _act(model, s.name, data.x)  # [N, C, H, W]
        peak = a.flatten(2).amax(2)  # [N, C]
        assert torch.equal(peak.T.gather(1, ex.top), peak.T.topk(K, dim=1).values)  # the k largest, best first
        for c in range(a.shape[1]):
            for r in range(K):
                i, (y, x) = int(ex.top[c, r]), ex.positions[c, r].tolist()
                assert a[i, c, y, x] == peak[i, c]  # the position is where the unit peaks on that image
        assert torch.equal(ex.top_labels, data.y[ex.top]) and torch.equal(ex.images, data.x[ex.top])


@pytest.mark.parametrize("stage", [0, 1])
def test_box_is_the_set_of_pixels_that_move_the_unit(setup, stage):
    """Noise outside the box leaves the unit's value at the position as it was; noise inside it moves it."""
    model, spec, data, examples = setup
    s, ex = spec.stages[stage], examples[stage]
    g = torch.Generator().manual_seed(2)
    for c in (0, ex.top.shape[0] - 1):
        i, (y, x) = int(ex.top[c, 0]), ex.positions[c, 0].tolist()
        y0, y1, x0, x1 = ex.boxes[c, 0].tolist()
        inside = torch.zeros(28, 28, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        img = data.x[i : i + 1]
        noise = torch.rand(img.shape, generator=g) * 3
        with torch.no_grad():
            base = _act(model, s.name, img)[0, c, y, x]
            outside = _act(model, s.name, torch.where(inside, img, noise))[0, c, y, x]
            within = _act(model, s.name, torch.where(inside, noise, img))[0, c, y, x]
        assert outside == pytest.approx(float(base), abs=1e-5)
        assert abs(float(within - base)) > 1e-3


def test_input_x_gradient_by_autograd_one_image_at_a_time(setup):
    model, spec, data, examples = setup
    for s, ex in zip(spec.stages, examples, strict=True):
        for c, r in ((0, 0), (ex.top.shape[0] - 1, K - 1)):
            i, (y, x) = int(ex.top[c, r]), ex.positions[c, r].tolist()
            img = data.x[i : i + 1].clone().requires_grad_(True)
            _act(model, s.name, img)[0, c, y, x].backward()
            want = (img.detach() * img.grad)[0].sum(0)
            torch.testing.assert_close(ex.input_x_gradient[c, r], want, rtol=1e-5, atol=1e-6)
            assert want.abs().sum() > 0
