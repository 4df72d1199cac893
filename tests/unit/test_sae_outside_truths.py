"""Sparse dictionaries on real (tiny) models against truths computed outside the code under test: reconstruction
metrics and spliced-in KL / loss recovered from activations captured by plain torch forward hooks and an SAE
written out in numpy, a planted induction-like latent, residual directions and neuron comparisons measured on the
model itself, the CNN's random control and its comparison counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechscope.cnn.methods import sae as CSm
from mechscope.cnn.models.spec import walk
from mechscope.cnn.pipelines import sae as CS
from mechscope.core.dictionaries import DictionaryConfig, SparseDictionary, save_saelens
from mechscope.lm.methods import sae as S
from tests.unit.test_sae_cnn import dataset, images, tiny_cnn
from tests.unit.test_sae_lm import tiny_model, tokens

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- outside helpers: numpy SAE, plain torch hooks ------------------------------------------------------


def random_relu_sae(d: int, d_sae: int, seed: int, noise: float = 0.05, bias: float = 0.2) -> SparseDictionary:
    """A ReLU SAE near, but far from exactly, the identity: relu([x, -x]) decoded by [I; -I] as in the identity
    SAE of the other tests, every weight perturbed, ``d_sae - 2d`` extra random latents, a negative encoder bias
    and a nonzero decoder bias."""
    g = torch.Generator().manual_seed(seed)
    sae = SparseDictionary(DictionaryConfig(d_in=d, d_sae=d_sae, architecture="relu"))
    eye = torch.eye(d)
    enc, dec = torch.zeros(d, d_sae), torch.zeros(d_sae, d)
    enc[:, : 2 * d], dec[: 2 * d] = torch.cat([eye, -eye], 1), torch.cat([eye, -eye], 0)
    with torch.no_grad():
        sae.W_enc.copy_(enc + noise * torch.randn(d, d_sae, generator=g))
        sae.b_enc.copy_(-0.5 * bias * torch.rand(d_sae, generator=g))
        sae.W_dec.copy_(dec + noise * torch.randn(d_sae, d, generator=g))
        sae.b_dec.copy_(torch.randn(d, generator=g) * bias)
    return sae.eval()


def np_sae(sae: SparseDictionary):
    """The SAE's formula, written out in float64 numpy: f = relu((x - b_dec) W_enc + b_enc), x_hat = f W_dec + b_dec."""
    we, be, wd, bd = (p.detach().double().numpy() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))

    def run(x: np.ndarray):
        f = np.maximum((x - bd) @ we + be, 0.0)
        return f @ wd + bd, f

    return run


def module(model, name: str) -> torch.nn.Module:
    return model.get_submodule(name)


def after_bos(values: np.ndarray | None = None):
    """A ``replace`` for :func:`forward_with`: the output at positions 1.. set to ``values`` (reshaped to them) or
    to zero, the BOS position kept."""

    def replace(out):
        new = out.clone()
        new[:, 1:] = 0 if values is None else torch.from_numpy(values.reshape(out[:, 1:].shape)).to(out.dtype)
        return new

    return replace


def forward_with(model, inputs, name: str | None = None, replace=None, record: list | None = None):
    """Run ``model`` with a plain torch forward hook on the module ``name``: ``record`` gets its output,
    ``replace(out) -> new`` substitutes it. Returns the logits (float64 numpy)."""
    handle = None
    if name is not None:

        def hook(mod, args, out):
            if record is not None:
                record.append(out.detach().clone())
            return None if replace is None else replace(out)

        handle = module(model, name).register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(inputs).double().numpy()
    finally:
        if handle is not None:
            handle.remove()


def log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def kl_rows(clean: np.ndarray, other: np.ndarray) -> np.ndarray:
    """KL(P_clean || P_other) per position, float64."""
    lp, lq = log_softmax(clean), log_softmax(other)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def hand_metrics(x: np.ndarray, x_hat: np.ndarray, f: np.ndarray) -> dict:
    err = ((x - x_hat) ** 2).sum()
    cos = [a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in zip(x, x_hat, strict=True)]
    return {"mse": err / x.size, "explained_variance": 1 - err / ((x - x.mean(0)) ** 2).sum(),
            "cosine_similarity": float(np.mean(cos)), "l0": float((f > 0).sum(1).mean())}  # fmt: skip


def assert_metrics(metrics, expected: dict) -> None:
    for key, value in expected.items():
        assert getattr(metrics, key) == pytest.approx(value, rel=1e-4, abs=1e-7), key


# ---- lm: reconstruction, KL and loss recovered ----------------------------------------------------------


@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"])
def test_lm_splice_effect_against_numpy_sae_and_hand_kl(hook):
    model, toks = tiny_model(1), tokens(5, 12, 1)
    seen: list[torch.Tensor] = []
    clean = forward_with(model, toks, hook, record=seen)
    act = seen[0].double().numpy()  # [B, P, ...]
    x = act[:, 1:].reshape(-1, 16)  # positions after the BOS, flattened over heads for hook_z
    sae = random_relu_sae(16, 40, seed=3)
    x_hat, f = np_sae(sae)(x)
    assert 0 < (f > 0).mean() < 1 and np.abs(x - x_hat).max() > 0.1  # sparse, and far from the identity
    spliced, zeroed = forward_with(model, toks, hook, after_bos(x_hat)), forward_with(model, toks, hook, after_bos())
    effect, metrics = S.splice_effect(model, toks, sae, hook, None, skip_first=1, batch=2)

    assert_metrics(metrics, hand_metrics(x, x_hat, f))
    assert metrics.tokens == 5 * 11
    # KL(P_clean || P_spliced), averaged over every position of every context (B * P)
    kls, klz = kl_rows(clean, spliced).mean(), kl_rows(clean, zeroed).mean()
    assert kls > 1e-4 and klz > kls
    assert effect.kl_spliced == pytest.approx(kls, rel=1e-4)
    assert effect.kl_zero_ablated == pytest.approx(klz, rel=1e-4)
    assert effect.kl_recovered == pytest.approx((klz - kls) / klz, rel=1e-4)

    nxt = toks[:, 1:].numpy()

    def ce(logits):
        lp = log_softmax(logits[:, :-1])
        return float(-np.take_along_axis(lp, nxt[..., None], -1).mean())

    lc, ls, lz = ce(clean), ce(spliced), ce(zeroed)
    assert effect.loss_clean == pytest.approx(lc, rel=1e-9)
    assert effect.loss_spliced == pytest.approx(ls, rel=1e-5)
    assert effect.loss_zero_ablated == pytest.approx(lz, rel=1e-9)
    assert effect.ce_loss_recovered == pytest.approx((lz - ls) / (lz - lc), rel=1e-3)


# ---- cnn: reconstruction, KL and accuracy recovered -----------------------------------------------------


def test_cnn_splice_effect_against_numpy_sae_and_hand_kl():
    model, x_img = tiny_cnn(1), images(40, 3)
    y = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(1))
    hook = "conv2.hook_out"
    seen: list[torch.Tensor] = []
    clean = forward_with(model, x_img, hook, record=seen)
    act = seen[0].double().numpy()  # [B, C, H, W]
    b, c, h, w = act.shape
    rows = np.moveaxis(act, 1, -1).reshape(-1, c)  # one row per image position
    sae = random_relu_sae(c, 16, seed=4, bias=0.02)
    x_hat, f = np_sae(sae)(rows)
    assert 0 < (f > 0).mean() < 1 and np.abs(rows - x_hat).max() > 0.1

    def splice(out):
        back = np.moveaxis(x_hat.reshape(b, h, w, c), -1, 1)
        return torch.from_numpy(np.ascontiguousarray(back)).to(out.dtype)

    spliced = forward_with(model, x_img, hook, splice)
    zeroed = forward_with(model, x_img, hook, lambda out: torch.zeros_like(out))
    effect, metrics = CSm.splice_effect(walk(model), x_img, y, sae, hook, batch=16)

    assert_metrics(metrics, hand_metrics(rows, x_hat, f))
    kls, klz = kl_rows(clean, spliced).mean(), kl_rows(clean, zeroed).mean()  # per image, averaged
    assert kls > 1e-4 and klz > kls
    assert effect.kl_spliced == pytest.approx(kls, rel=1e-4)
    assert effect.kl_ablated == pytest.approx(klz, rel=1e-4)
    assert effect.kl_recovered == pytest.approx((klz - kls) / klz, rel=1e-4)
    yy = y.numpy()
    acc = {k: float((v.argmax(1) == yy).mean()) for k, v in (("c", clean), ("s", spliced), ("z", zeroed))}
    assert (effect.acc_clean, effect.acc_spliced, effect.acc_ablated) == (acc["c"], acc["s"], acc["z"])


# ---- lm: a planted induction-like latent -------------------------------------------------------------------


def test_planted_second_copy_latent_tops_the_induction_ranking_with_hand_rates():
    """Dimension 3 of the residual entering block 0 carries 1 exactly on the second copy's positions (a planted
    position embedding); dimension 4 carries 1 on even token ids (a planted token embedding). Latents: 0 fires on
    the second copy on even tokens, 1 on the whole second copy, 2 on even tokens of both copies, 3 on the first copy
    (and the BOS). The ranking must be 1 then 0, with the rates counted here; 2 and 3 are not ranked."""
    n, seqs = 7, 5
    model = tiny_model(6)
    with torch.no_grad():
        model.W_E[:, 3] = 0.0
        model.W_E[:, 4] = (torch.arange(model.cfg.d_vocab) % 2 == 0).float()
        model.W_pos[:, 4] = 0.0
        model.W_pos[:, 3] = 0.0
        model.W_pos[n + 1 : 2 * n + 1, 3] = 1.0
    sae = SparseDictionary(DictionaryConfig(d_in=16, d_sae=6, architecture="relu"))
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
        sae.W_enc[3, 0], sae.W_enc[4, 0], sae.b_enc[0] = 1.0, 1.0, -1.5  # second copy AND even token: 0.5
        sae.W_enc[3, 1], sae.b_enc[1] = 1.0, -0.5  # second copy: 0.5
        sae.W_enc[4, 2], sae.b_enc[2] = 1.0, -0.5  # even token: 0.5
        sae.W_enc[3, 3], sae.b_enc[3] = -1.0, 0.5  # first copy: 0.5
        sae.b_enc[4] = -1.0  # latents 4, 5 never fire
        sae.b_enc[5] = -1.0
    fed: list[torch.Tensor] = []
    handle = model.register_forward_pre_hook(lambda mod, args: fed.append(args[0].clone()))
    try:
        r = S.induction_latents(model, sae.eval(), "blocks.0.hook_resid_pre", n=n, sequences=seqs, seed=2)
    finally:
        handle.remove()
    toks = fed[-1]
    assert toks.shape == (seqs, 2 * n + 1) and torch.equal(toks[:, 1 : n + 1], toks[:, n + 1 :])
    even_second = float((toks[:, n + 1 :] % 2 == 0).double().mean())  # hand count
    assert 0 < even_second < 1
    assert r.ranked == (1, 0)
    assert r.rate_first == (0.0, 0.0)
    assert r.rate_second == pytest.approx((1.0, even_second), abs=1e-12)
    assert r.mean_first == (0.0, 0.0)
    assert r.mean_second == pytest.approx((0.5, 0.5 * even_second), abs=1e-6)
    assert r.tokens == tuple(int(t) for t in toks[0])
    assert r.activations[0] == pytest.approx([0.0] * (n + 1) + [0.5] * n, abs=1e-6)


# ---- lm: residual directions measured on the model ------------------------------------------------------


def added_at(model, toks, name: str, delta: torch.Tensor, read: str) -> torch.Tensor:
    """How much the output of ``read`` changes (position 1 of sequence 0) when ``delta`` is added to the output
    of ``name`` at every position: the direction ``delta`` writes there, measured by running the model."""
    base, moved = [], []
    forward_with(model, toks, read, record=base)

    def add(out):
        return out + delta.view(*out.shape[2:]).to(out.dtype)

    h = module(model, name).register_forward_hook(lambda m, a, out: add(out))
    try:
        forward_with(model, toks, read, record=moved)
    finally:
        h.remove()
    return (moved[0] - base[0])[0, 1].double()


def test_residual_directions_of_attn_z_and_mlp_post_are_what_the_model_writes():
    model, toks = tiny_model(7), tokens(1, 4, 7)
    g = torch.Generator().manual_seed(0)
    z_sae = SparseDictionary(DictionaryConfig(d_in=16, d_sae=5), generator=g)
    with torch.no_grad():
        z_sae.W_dec.copy_(torch.randn(5, 16, generator=g))
    dirs = S.residual_directions(model, z_sae, "blocks.1.attn.hook_z")
    wo = model.blocks[1].attn.W_O.detach().double().numpy()  # [H, Dh, D]
    wd = z_sae.W_dec.detach().double().numpy()
    by_hand = np.zeros((5, 16))
    for s in range(5):
        for head in range(2):
            for k in range(8):
                by_hand[s] += wd[s, head * 8 + k] * wo[head, k]
    assert np.allclose(dirs.double().numpy(), by_hand, atol=1e-5)
    for s in (0, 3):  # and what the attention output actually moves by
        measured = added_at(model, toks, "blocks.1.attn.hook_z", z_sae.W_dec[s].detach(), "blocks.1.hook_attn_out")
        assert torch.allclose(dirs[s].double(), measured, atol=1e-4)

    post_sae = SparseDictionary(DictionaryConfig(d_in=32, d_sae=4), generator=g)
    dirs = S.residual_directions(model, post_sae, "blocks.0.mlp.hook_post")
    for s in range(4):
        measured = added_at(model, toks, "blocks.0.mlp.hook_post", post_sae.W_dec[s].detach(), "blocks.0.hook_mlp_out")
        assert torch.allclose(dirs[s].double(), measured, atol=1e-4)

    resid_sae = SparseDictionary(DictionaryConfig(d_in=16, d_sae=4), generator=g)
    for hook in ("blocks.0.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.0.hook_attn_out"):
        assert torch.equal(S.residual_directions(model, resid_sae, hook), resid_sae.W_dec.detach())
    assert S.residual_directions(model, resid_sae, "blocks.0.mlp.hook_in") is None  # not linear into the stream


# ---- lm: neuron comparison on planted decoder rows ---------------------------------------------------------


def test_neuron_comparison_head_shares_of_a_planted_z_direction():
    model = tiny_model(8)
    sae = SparseDictionary(DictionaryConfig(d_in=16, d_sae=3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.W_dec[1, 0:8] = 0.5  # head 0: squared norm 8 * 0.25 = 2
        sae.W_dec[1, 8:16] = torch.tensor([1.0, -1.0] * 4) * 1.5  # head 1: 8 * 2.25 = 18
    out = S.neuron_comparison(model, sae, "blocks.1.attn.hook_z", None, [1], k=2)
    names = [name for name, _ in out[1]]
    assert names == ["head 1.1", "head 1.0"]
    assert [v for _, v in out[1]] == pytest.approx([18 / 20, 2 / 20], abs=1e-6)


def test_neuron_comparison_finds_the_neuron_whose_output_a_latent_writes():
    model = tiny_model(9)
    mlp = model.blocks[1].mlp
    with torch.no_grad():  # each neuron's output direction, measured by the MLP's own down projection
        wout = (mlp.down(torch.eye(32)) - mlp.down(torch.zeros(1, 32))).double().numpy()  # [M, D]
    sae = SparseDictionary(DictionaryConfig(d_in=16, d_sae=4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.W_dec[2] = -3.0 * torch.from_numpy(wout[5]).float()  # latent 2 writes minus neuron 5's output
    d = sae.W_dec[2].detach().double().numpy()
    cos = wout @ d / (np.linalg.norm(wout, axis=1) * np.linalg.norm(d))
    top = np.argsort(-np.abs(cos), kind="stable")[:4]
    assert top[0] == 5 and cos[5] == pytest.approx(-1.0)
    out = S.neuron_comparison(model, sae, "blocks.1.hook_mlp_out", None, [2], k=4)
    assert [name for name, _ in out[2]] == [f"neuron 1.{j}" for j in top]
    assert [v for _, v in out[2]] == pytest.approx(cos[top].tolist(), abs=1e-5)
    # the residual before block 1 is written by block 0's MLP: the same construction on it
    mlp0 = model.blocks[0].mlp
    with torch.no_grad():
        w0 = (mlp0.down(torch.eye(32)) - mlp0.down(torch.zeros(1, 32))).double().numpy()
        sae.W_dec[0] = torch.from_numpy(2 * w0[11]).float()
    out = S.neuron_comparison(model, sae, "blocks.1.hook_resid_pre", None, [0], k=1)
    assert out[0][0][0] == "neuron 0.11" and out[0][0][1] == pytest.approx(1.0, abs=1e-5)


# ---- cnn: the random control and the comparison counts ------------------------------------------------------


def test_cnn_random_control_has_its_decoder_bias_at_the_activation_mean(tmp_path, monkeypatch):
    mean = torch.tensor([0.5, -1.0, 2.0, 0.0, 3.0, 1.5])
    control = CSm.random_control(6, 10, 3, mean, seed=1)
    assert torch.equal(control.b_dec.detach(), mean)
    assert control.cfg.architecture == "topk" and control.cfg.k == 3
    # in the pipeline: the mean of the hook's rows over every test image and position, computed here
    model = tiny_cnn(5)
    data = dataset(model, n_test=48)
    seen: list[torch.Tensor] = []
    forward_with(model, data.test_images, "conv2.hook_out", record=seen)
    rows_mean = seen[0].double().mean((0, 2, 3))  # per channel, over images and positions
    made = []
    original = CSm.random_control
    monkeypatch.setattr(CSm, "random_control", lambda *a, **k: made.append(original(*a, **k)) or made[-1])
    sae = random_relu_sae(6, 16, seed=5, bias=0.02)
    sae_dir = save_saelens(sae, tmp_path / "sae", hook_name="conv2.hook_out")
    CS.sae_show_model(model, data, sae_dir, tmp_path / "dash", n_selective=1, n_random=0, tuning=False,
                      featvis_steps=0, progress=False)  # fmt: skip
    assert len(made) == 1
    assert torch.allclose(made[0].b_dec.detach().double(), rows_mean, atol=1e-5)
    assert rows_mean.abs().max() > 0.05  # a mean far from the zero an untouched bias would leave


def hand_index(class_means: np.ndarray) -> np.ndarray:
    """Morcos et al.'s index on class means shifted to a minimum of 0 per unit (0 where all are 0)."""
    m = class_means - class_means.min(1, keepdims=True)
    top = m.max(1)
    rest = (m.sum(1) - top) / (m.shape[1] - 1)
    return np.where(top + rest > 0, (top - rest) / np.where(top + rest > 0, top + rest, 1), 0.0)


def test_cnn_comparison_counts_only_alive_latents(tmp_path):
    """Counts of selective latents among the alive ones, recomputed from the hook's activations; latent 0 is dead
    (its encoder bias keeps it below zero everywhere), the others sparse (each fires on its top 3% of the rows),
    and a dead latent planted as perfectly selective in the comparison itself is not counted."""
    model = tiny_cnn(2)
    data = dataset(model, n_test=48)
    seen: list[torch.Tensor] = []
    forward_with(model, data.test_images, "conv2.hook_out", record=seen)
    act = seen[0].double().numpy()
    n, c = act.shape[:2]
    rows = np.moveaxis(act, 1, -1).reshape(-1, c)
    g = torch.Generator().manual_seed(6)
    sae = SparseDictionary(DictionaryConfig(d_in=c, d_sae=12, architecture="relu"))
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.W_enc.copy_(torch.randn(c, 12, generator=g))
        sae.W_dec.copy_(torch.randn(12, c, generator=g))
        pre = rows @ sae.W_enc.double().numpy()
        sae.b_enc.copy_(torch.from_numpy(-np.quantile(pre, 0.97, axis=0)))
        sae.b_enc[0] = -1e3
    sae_dir = save_saelens(sae.eval(), tmp_path / "sae", hook_name="conv2.hook_out")
    _, r = CS.sae_show_model(model, data, sae_dir, tmp_path / "dash", n_selective=1, n_random=0, tuning=False,
                             featvis_steps=0, progress=False)  # fmt: skip
    _, f = np_sae(sae)(rows)
    per_image = f.reshape(n, -1, f.shape[1]).mean(1)  # [N, S] each latent's mean over the positions
    y = data.test_labels.numpy()
    assert set(y.tolist()) == {0, 1, 2}
    means = np.stack([per_image[y == k].mean(0) for k in range(3)], 1)  # [S, K]
    alive = (f > 0).any(0)
    index = hand_index(means)
    assert not alive[0] and alive[1:].all()
    selective = int((index[alive] >= 0.6).sum())
    assert 0 < selective < alive.sum()
    assert r.comparison["latents"]["units"] == int(alive.sum())
    assert r.comparison["latents"]["selective"] == selective
    assert r.latent_selectivity == pytest.approx(index.tolist(), abs=1e-4)
    ch = act.mean((2, 3))
    ch_index = hand_index(np.stack([ch[y == k].mean(0) for k in range(3)], 1))
    assert r.comparison["channels"]["selective"] == int((ch_index >= 0.6).sum())

    # the count itself: a dead latent whose index reads 1 (as a stale or planted value would) is not counted
    planted = CS._comparison(np.array([0.1, 0.7]), np.array([1.0, 0.9, 0.2, 0.65]),
                             np.array([False, True, True, True]), None, ())  # fmt: skip
    assert planted["latents"] == {"units": 3, "selective": 2, "median_index": pytest.approx(0.65)}
    assert planted["channels"]["selective"] == 1
