"""The dictionary-quality rows that attribution graphs carry (``quality``: error share and dead latents per layer or
stage), against numbers recomputed with numpy from activations harvested here and the dictionaries' weights.

The documented definitions (``replacement_training``, ``cnn.methods.attribution_graph``): on the held-out rows,
``error_share = mean_n ||y_n − ŷ_n|| / mean_n ||y_n||`` (the share of the output's norm left to the error node) and
``dead`` = the number of latents that fire (> 0) on none of them. Each dictionary's forward pass is written out here
from its weights (``z = x W_enc + b_enc``, ReLU or TopK, ``ŷ = f W_dec + b_dec``; a CLT sums every earlier layer's
decoder into a layer's output), never through the code under test.

The trained cases use TopK with k = 1 and more latents than held-out rows, so at least (latents − rows) latents are
dead whatever training did; the hand-built cases zero chosen latents' encoders (bias −1) so they never fire while
every other latent fires on every row, so the dead count is known by construction.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechscope.core.dictionaries import DictionaryConfig, SparseDictionary
from mechscope.core.hooks import run_with_cache
from tests.unit.test_attribution_graph_cnn import tiny_cnn
from tests.unit.test_attribution_graph_lm import tiny
from tests.unit.test_crosslayer import random_clt, tiny3

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one torch thread


def np_(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def activate(z: np.ndarray, arch: str, k: int | None) -> np.ndarray:
    if arch == "relu":
        return np.maximum(z, 0)
    assert arch == "topk"
    f = np.zeros_like(z)
    top = np.argsort(-z, axis=1, kind="stable")[:, :k]
    rows = np.arange(len(z))[:, None]
    f[rows, top] = np.maximum(z[rows, top], 0)
    return f


def dictionary_forward(d: SparseDictionary, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ŷ, f) of a SparseDictionary in raw units, from its weights."""
    c = d.cfg
    s_in, s_out = (float(d.in_scale), float(d.out_scale)) if c.normalize_activations != "none" else (1.0, 1.0)
    xn = x * s_in
    if c.apply_b_dec_to_input:
        xn = xn - np_(d.b_dec)
    f = activate(xn @ np_(d.W_enc) + np_(d.b_enc), c.architecture, c.k)
    y = f @ np_(d.W_dec) + np_(d.b_dec)
    if c.skip:
        y = y + xn @ np_(d.W_skip).T
    return y / s_out, f


def clt_forward(clt, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ŷ [N, L, D], f [N, L, F]) of a cross-layer transcoder, from its weights."""
    L = clt.n_layers
    f = np.stack([activate(xs[:, i] @ np_(clt.W_enc[i]) + np_(clt.b_enc[i]), clt.architecture, clt.k)
                  for i in range(L)], 1)  # fmt: skip
    out = np.stack([np.repeat(np_(clt.b_dec[j])[None], len(xs), 0) for j in range(L)], 1)
    for j in range(L):
        for i in range(j + 1):
            out[:, j] += f[:, i] @ np_(clt.W_dec[i][:, j - i])
        if clt.skip:
            out[:, j] += xs[:, j] @ np_(clt.W_skip[j])
    return out, f


def error_share(y: np.ndarray, y_hat: np.ndarray) -> float:
    return float(np.linalg.norm(y - y_hat, axis=-1).mean() / np.linalg.norm(y, axis=-1).mean())


def dead(f: np.ndarray) -> int:
    return int(((f > 0).sum(0) == 0).sum())


# ---- language models: per-layer transcoders and a cross-layer transcoder, trained here ------------------------

SETTINGS = dict(tokens=256, eval_tokens=40, context=16, d_sae=64, k=1, epochs=1, batch=64, lr=3e-3)


def ids_and_eval_contexts(model, n_eval: int) -> tuple[list[int], torch.Tensor]:
    ids = torch.randint(0, model.cfg.d_vocab, (400,), generator=torch.Generator().manual_seed(3)).tolist()
    n = SETTINGS["context"]
    assert model.cfg.bos_token_id is None  # positions from 0 on; contexts of 16 consecutive ids
    need = -(-n_eval // n)
    return ids, torch.tensor([ids[i * n : (i + 1) * n] for i in range(need)])


def held_out_rows(model, ctx: torch.Tensor, n_eval: int) -> tuple[np.ndarray, np.ndarray]:
    """Every layer's MLP input and output at the first ``n_eval`` positions (the held-out ones), rounded through
    float16 as the harvest stores them: [n_eval, L, D] each."""
    L = model.cfg.n_layers
    names = [f"blocks.{i}.mlp.hook_in" for i in range(L)] + [f"blocks.{i}.hook_mlp_out" for i in range(L)]
    with torch.no_grad():
        _, cache = run_with_cache(model, ctx, names=names)
    D = model.cfg.d_model

    def rows(name):
        return np_(cache[name].reshape(-1, D).half().float())[:n_eval]

    xs = np.stack([rows(f"blocks.{i}.mlp.hook_in") for i in range(L)], 1)
    ys = np.stack([rows(f"blocks.{i}.hook_mlp_out") for i in range(L)], 1)
    return xs, ys


def test_per_layer_transcoder_rows_give_error_share_and_dead_latents_as_recomputed():
    from mechscope.lm.methods.replacement_training import TranscoderTraining, train_transcoders

    model = tiny("gpt2")
    n_eval = SETTINGS["eval_tokens"]
    ids, ctx = ids_and_eval_contexts(model, n_eval)
    r = train_transcoders(model, ids, TranscoderTraining(**SETTINGS))
    xs, ys = held_out_rows(model, ctx, n_eval)
    assert [row["layer"] for row in r.layers] == [0, 1]
    for i, row in enumerate(r.layers):
        y_hat, f = dictionary_forward(r.transcoders.layers[i], xs[:, i])
        want_dead = dead(f)
        assert want_dead >= 64 - n_eval  # k = 1: at most one latent per held-out row fires
        assert row["dead"] == want_dead
        assert row["error_share"] == pytest.approx(error_share(ys[:, i], y_hat), rel=1e-5)
        assert 0.05 < row["error_share"] < 2  # a real share, not 0


def test_cross_layer_transcoder_rows_give_error_share_and_dead_latents_as_recomputed():
    from mechscope.lm.methods.crosslayer import CrossLayerTranscoder
    from mechscope.lm.methods.replacement_training import TranscoderTraining, train_transcoders

    model = tiny3("gpt2")
    n_eval = SETTINGS["eval_tokens"]
    ids, ctx = ids_and_eval_contexts(model, n_eval)
    r = train_transcoders(model, ids, TranscoderTraining(crosslayer=True, **SETTINGS))
    clt = r.transcoders
    assert isinstance(clt, CrossLayerTranscoder)
    xs, ys = held_out_rows(model, ctx, n_eval)
    y_hat, f = clt_forward(clt, xs)
    assert [row["layer"] for row in r.layers] == [0, 1, 2]
    for i, row in enumerate(r.layers):
        want_dead = dead(f[:, i])
        assert want_dead >= 64 - n_eval
        assert row["dead"] == want_dead
        assert row["error_share"] == pytest.approx(error_share(ys[:, i], y_hat[:, i]), rel=1e-5)
        assert 0.05 < row["error_share"] < 2


# ---- the CNN's stage dictionaries, trained here ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["transcoder", "sae"])
def test_cnn_stage_rows_give_error_share_and_dead_latents_as_recomputed(kind):
    from mechscope.cnn.methods.attribution_graph import CnnDictionaryTraining, train_dictionaries

    model = tiny_cnn()
    g = torch.Generator().manual_seed(0)
    train_images = torch.rand(4, *model.input_shape, generator=g)
    test_images = torch.rand(2, *model.input_shape, generator=g)
    s = CnnDictionaryTraining(kind=kind, expansion=64, k=1, images=4, rows=1000, steps=3, batch=4)
    r = train_dictionaries(model, train_images, test_images, s)
    hooks = ("conv{}.hook_pre", "conv{}.hook_post") if kind == "transcoder" else ("conv{}.hook_out",) * 2
    names = sorted({h.format(i + 1) for h in hooks for i in range(len(model.config.channels))})
    with torch.no_grad():
        _, cache = run_with_cache(model, test_images, names=names)

    def rows(name):  # every position of every test image: [B·h·w, C]
        t = cache[name]
        return np_(t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]))

    assert [st["stage"] for st in r.stages] == ["conv1", "conv2"]
    for i, st in enumerate(r.stages):
        x, y = rows(hooks[0].format(i + 1)), rows(hooks[1].format(i + 1))
        y_hat, f = dictionary_forward(r.dictionaries.layers[i], x)
        want_dead = dead(f)
        assert want_dead >= f.shape[1] - len(x) > 0  # k = 1 and more latents than held-out positions
        assert st["dead"] == want_dead
        assert st["error_share"] == pytest.approx(error_share(y, y_hat), rel=1e-4)
        assert st["error_share"] > 0.01


# ---- hand-built dictionaries with latents that never fire ------------------------------------------------------


def zero_latents(W_enc: torch.Tensor, b_enc: torch.Tensor, off: list[int], g: torch.Generator) -> None:
    """Latents ``off`` never fire (encoder 0, bias −1); every other latent fires on every small input (bias 3)."""
    with torch.no_grad():
        W_enc.normal_(0, 0.2, generator=g)
        b_enc.fill_(3.0)
        W_enc[:, off] = 0.0
        b_enc[off] = -1.0


def hand_dictionary(off: list[int], seed: int = 0) -> SparseDictionary:
    g = torch.Generator().manual_seed(seed)
    d = SparseDictionary(DictionaryConfig(d_in=6, d_sae=20, architecture="relu", transcoder=True, d_out=5), generator=g)
    zero_latents(d.W_enc, d.b_enc, off, g)
    with torch.no_grad():
        d.b_dec.normal_(0, 0.1, generator=g)
    return d.eval()


@pytest.mark.parametrize("where", ["lm", "cnn"])
def test_quality_of_a_dictionary_with_latents_that_never_fire(where):
    """The helper behind each row (per-layer LM and CNN stage), on known inputs and targets: dead == the latents
    switched off, error share from numpy."""
    if where == "lm":
        from mechscope.lm.methods.replacement_training import _quality
    else:
        from mechscope.cnn.methods.attribution_graph import _quality
    off = [1, 4, 5, 11, 19]
    d = hand_dictionary(off)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 6, generator=g) * 0.5
    y = torch.randn(50, 5, generator=g) + 1.0
    y_hat, f = dictionary_forward(d, np_(x))
    assert dead(f) == len(off) and (f[:, [i for i in range(20) if i not in off]] > 0).all()
    q = _quality(d, x, y)
    assert q["dead"] == len(off)
    assert q["error_share"] == pytest.approx(error_share(np_(y), y_hat), rel=1e-5)
    # a perfect target: no error
    assert _quality(d, x, torch.from_numpy(y_hat).float())["error_share"] == pytest.approx(0.0, abs=1e-6)


def test_crosslayer_quality_with_latents_that_never_fire_per_layer():
    from mechscope.lm.methods.replacement_training import _quality_crosslayer

    model = tiny3("gpt2")
    clt = random_clt(model, "relu")  # 3 layers, 48 features each
    offs = {0: [0, 7, 30], 1: [], 2: list(range(40, 48))}
    g = torch.Generator().manual_seed(2)
    for i, off in offs.items():
        zero_latents(clt.W_enc[i], clt.b_enc[i], off, g)
    x = torch.randn(30, 3, 16, generator=g) * 0.3
    y = torch.randn(30, 3, 16, generator=g)
    y_hat, f = clt_forward(clt, np_(x))
    rows = _quality_crosslayer(clt, x, y)
    for i, row in enumerate(rows):
        assert dead(f[:, i]) == len(offs[i])
        assert row["layer"] == i and row["dead"] == len(offs[i])
        assert row["error_share"] == pytest.approx(error_share(np_(y[:, i]), y_hat[:, i]), rel=1e-5)
