"""Universality measures with known answers: a network against itself and against a channel-permuted copy,
CKA's invariances and an independent HSIC implementation, circuit overlap against a hand count."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mechscope.cnn.methods import universality as U
from mechscope.cnn.models.cnn import CNN, CNNConfig
from mechscope.cnn.models.spec import walk


def _net(seed: int = 0, channels=(6, 8)) -> CNN:
    torch.manual_seed(seed)
    return CNN(CNNConfig(channels=channels)).eval()


def _images(n: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _match(a: CNN, b: CNN, x: torch.Tensor) -> list[U.UnitMatching]:
    specs = {"a": walk(a), "b": walk(b)}
    _, moments = U.collect_pairs(specs, [("a", "b")], x, batch_size=20)  # several batches: moments add up
    return [U.match_units(m, st, how) for (m, how), st in zip(moments[("a", "b")], specs["a"].stage_names, strict=True)]


def permuted_copy(net: CNN, perms: list[torch.Tensor]) -> CNN:
    """A copy whose stage i's channel j is the original's channel perms[i][j]: conv out-channels, the next conv's
    in-channels and the read-out's inputs permuted consistently (the same function)."""
    new = copy.deepcopy(net)
    with torch.no_grad():
        for i, (block, p) in enumerate(zip(new.stages, perms, strict=True)):
            block.conv.weight.copy_(block.conv.weight[p])
            block.conv.bias.copy_(block.conv.bias[p])
            nxt = new.stages[i + 1].conv if i + 1 < len(perms) else None
            if nxt is not None:
                nxt.weight.copy_(nxt.weight[:, p])
        c, s = net.config.channels[-1], net.config.final_size
        w = new.fc.weight.view(net.config.n_classes, c, s, s)
        new.fc.weight.copy_(w[:, perms[-1]].reshape(net.config.n_classes, -1))
    return new


def test_network_against_itself_correlation_and_cka_one():
    net = _net()
    for m in _match(net, net, _images()):
        live = np.setdiff1d(np.arange(len(m.best_a)), m.dead_a)
        assert len(live) >= len(m.best_a) - 1
        assert np.allclose(m.best_a.numpy()[live], 1.0, atol=1e-5)
        assert m.cka == pytest.approx(1.0, abs=1e-6)
        assert all(p.a == p.b for p in m.matched if p.a in live)
        assert m.observations == "image × position"


def test_hungarian_recovers_a_channel_permutation():
    net = _net(3)
    g = torch.Generator().manual_seed(7)
    perms = [torch.randperm(c, generator=g) for c in net.config.channels]
    twin = permuted_copy(net, perms)
    x = _images()
    assert torch.allclose(net(x), twin(x), atol=1e-5)  # the same function
    for m, p in zip(_match(net, twin, x), perms, strict=True):
        mapping = m.mapping()
        dead = set(m.dead_a)
        assert len(dead) <= 1  # the check below is not empty
        for j, i in enumerate(p.tolist()):  # twin's channel j is net's channel i
            if i not in dead:
                assert mapping[i] == j
        assert m.cka == pytest.approx(1.0, abs=1e-6)


def test_correlation_is_pearson_and_dead_units_are_zero():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(500, 4, generator=g), torch.randn(500, 3, generator=g)
    b[:, 0] = 2 * a[:, 1] + 0.5 * torch.randn(500, generator=g)
    b[:, 2] = 1.0  # dead
    r = U.Moments.of(a, b).correlation().numpy()
    ref = np.corrcoef(a.numpy().T, b.numpy()[:, :2].T)[:4, 4:]
    assert np.allclose(r[:, :2], ref, atol=1e-10)
    assert (r[:, 2] == 0).all()
    assert U.Moments.of(a, b).dead() == ((), (2,))


def _cka_hsic(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. 2019 written differently: HSIC of linear kernels with the centring matrix H."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T

    def hsic(p, q):
        return np.trace(p @ h @ q @ h)

    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def test_cka_invariances_and_independent_implementation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 6, generator=g, dtype=torch.float64)
    y = x[:, :4] @ torch.randn(4, 5, generator=g, dtype=torch.float64) + 0.7 * torch.randn(
        120, 5, generator=g, dtype=torch.float64
    )
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    base = U.linear_cka(x, y)
    assert 0.1 < base < 0.99
    assert U.linear_cka(x @ q, y) == pytest.approx(base, abs=1e-10)  # orthogonal transform
    assert U.linear_cka(3.7 * x, 0.2 * y) == pytest.approx(base, abs=1e-10)  # isotropic scaling
    assert U.linear_cka(x + 5.0, y - 2.0) == pytest.approx(base, abs=1e-10)  # centred inside
    assert U.linear_cka(x, 2.0 * x @ q) == pytest.approx(1.0, abs=1e-10)
    assert base == pytest.approx(_cka_hsic(x.numpy(), y.numpy()), abs=1e-10)
    halves = U.Moments.of(x[:50], y[:50]) + U.Moments.of(x[50:], y[50:])
    assert halves.cka() == pytest.approx(base, abs=1e-10)
    m = U.cka_matrix([x, y, x @ q])
    assert m.shape == (3, 3) and m[0, 2] == pytest.approx(1.0) and m[0, 1] == pytest.approx(base)


def test_hungarian_on_a_known_matrix():
    corr = torch.tensor([[0.9, 0.8, 0.0], [0.85, 0.1, 0.0]])  # greedy would give row 1 nothing good
    assert U.hungarian(corr) == [(0, 1), (1, 0)]


def test_circuit_reuse_against_a_hand_count():
    from math import comb

    found = U.circuit_reuse({0: 2, 1: 0, 2: 1}, {0: (0, 1), 1: (2,), 5: (1,)}, {0: (2, 3), 1: (3,)}, n_b=4)
    assert [r.target for r in found] == [0, 1]  # class 5 has no circuit in B
    r = found[0]
    assert r.mapped == (2, 0) and r.overlap == 1 and r.expected == pytest.approx(1.0)
    assert r.p_value == pytest.approx(1 - comb(2, 0) * comb(2, 2) / comb(4, 2))
    assert found[1].overlap == 0 and found[1].p_value == pytest.approx(1.0)


def test_circuit_channels_meet_explains_criterion_and_are_one_minimal():
    from mechscope.core.hooks import run_with_cache
    from mechscope.core.intervene import readout_channel_contributions

    net = _net(5)
    spec = walk(net)
    x = _images(200)
    with torch.no_grad():
        logits, cache = run_with_cache(net, x, names=[spec.last.hook_out])
    y = logits.argmax(1)  # the network's own labels: every class it uses has images
    acts = cache[spec.last.hook_out]
    ref = acts.mean(0)
    classes = sorted(set(y.tolist()))
    found = U.circuit_channels(spec, acts, ref, y, classes, tolerance=0.01)
    fc = spec.readout.fc
    base, contrib = readout_channel_contributions(fc.weight.detach(), acts.flatten(2), ref.flatten(1), fc.bias.detach())

    def margin(keep, d):
        pred = (base + contrib[:, list(keep)].sum(1)).argmax(1)
        acc, fp = float((pred[y == d] == d).double().mean()), float((pred[y != d] == d).double().mean())
        return min(acc - 0.99, 0.01 - fp)  # the full model: accuracy 1, nobody else called d

    for d, chosen in found.items():
        assert margin(chosen, d) >= 0
        assert all(margin([c for c in chosen if c != drop], d) < 0 for drop in chosen) or len(chosen) == 1


def test_featvis_images_reused_only_from_the_same_weights_and_whole_stages(tmp_path):
    from mechscope.cnn.methods import blocks_vis as V
    from mechscope.cnn.pipelines.universality import featvis_images
    from mechscope.cnn.runs import weights_hash

    net = _net(2)
    spec = walk(net)
    fv = tmp_path / "featvis"
    fv.mkdir()
    imgs = torch.rand(6, 1, 28, 28)
    V.save_channel_images(fv / V.CHANNEL_IMAGES, weights_hash(net), {"conv1.hook_post": imgs})  # conv1 only
    found = featvis_images(fv, spec, weights_hash(net))
    assert set(found) == {("conv1", u) for u in range(6)} and torch.equal(found[("conv1", 5)], imgs[5])  # conv2: here
    assert featvis_images(fv, spec, weights_hash(_net(3))) == {}  # other weights: rendered instead
    assert featvis_images(tmp_path / "none", spec, weights_hash(net)) == {} and featvis_images(fv, spec, "") == {}


def test_explain_circuits_reused_only_from_the_same_weights_and_images(tmp_path):
    from mechscope.cnn.pipelines.universality import _explain_circuits
    from tests.records import explain_record

    out, r = explain_record(tmp_path / "explain")
    path = out / "mechanisms.json"
    means, n = r.selectivity_of("conv2").class_means, r.data["test_images"]
    found = {c.target: tuple(c.channels) for c in r.circuits.circuits}
    assert found and _explain_circuits(path, "conv2", means, n) == found
    assert _explain_circuits(path, "conv2", means, n + 1) is None  # other test images
    assert _explain_circuits(path, "conv2", means + 0.1, n) is None  # other weights
    path.write_text("{")
    assert _explain_circuits(path, "conv2", means, n) is None
