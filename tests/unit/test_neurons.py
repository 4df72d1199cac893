"""SoLU by hand, the toy's MLP switch (``--mlp none`` unchanged bit for bit), and the monosemanticity
figures on neurons built to have a known answer."""

from __future__ import annotations

import hashlib
import json
import math
import re

import numpy as np
import pytest
import torch

from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import attached_hooks, hook_points, hooks, run_with_cache
from mechscope.lm.methods.neurons import (
    check_neuron_model,
    concentration,
    context_activations,
    entropy_bits,
    random_baseline,
    read_neurons,
    sample_windows,
    top_activations,
)
from mechscope.lm.models.transformer import MLP, HookedTransformer, TransformerConfig, solu
from mechscope.lm.toy import ToyConfig, load_toy, make_model, text_loss, train_toy

TINY = dict(steps=30, d_model=32, n_heads=2, n_ctx=32, vocab=16, batch=8, checkpoints=6, min_span=4)


# -- SoLU --------------------------------------------------------------------------------------------


def test_solu_matches_the_papers_definition_by_hand():
    # SoLU(x) = x * softmax(x) (Elhage et al. 2022). softmax([1, 2, 3]) = [e, e^2, e^3] / (e + e^2 + e^3)
    # = [0.09003, 0.24473, 0.66524], so SoLU = [0.09003, 0.48946, 1.99572]
    out = solu(torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 1.0]], dtype=torch.float64))
    assert out[0].tolist() == pytest.approx([0.0900305732, 0.4894569421, 1.9957228673], abs=1e-9)
    # [-1, 0, 1] (and a 2 in the paper's sense of a wider vector below): the sign of x is kept, 0 stays 0
    assert out[1].tolist() == pytest.approx(
        [-1 * math.exp(-1) / (math.exp(-1) + 1 + math.e), 0.0, math.e / (math.exp(-1) + 1 + math.e)], abs=1e-12
    )


def test_solu_mlp_is_solu_then_its_layernorm():
    cfg = TransformerConfig(
        d_model=3, n_layers=1, n_heads=1, d_head=3, d_vocab=5, n_ctx=4, d_mlp=3, act="solu_ln", norm_eps=1e-5
    )
    mlp = MLP(cfg).double()
    with torch.no_grad():
        mlp.up.weight.copy_(torch.eye(3))
        mlp.up.bias.zero_()
        mlp.down.weight.copy_(torch.eye(3))
        mlp.down.bias.zero_()
        mlp.ln.w.copy_(torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64))
        mlp.ln.b.copy_(torch.tensor([0.1, 0.0, -0.1], dtype=torch.float64))
    seen = {}

    def keep(x, hook):
        seen[hook.name] = x.clone()

    with hooks(mlp, fwd=[("hook_mid", keep), ("hook_post", keep)]):
        out = mlp(torch.tensor([[[1.0, 2.0, 3.0]]], dtype=torch.float64))
    assert seen["hook_mid"][0, 0].tolist() == pytest.approx([0.0900305732, 0.4894569421, 1.9957228673], abs=1e-9)
    # LayerNorm by hand: mean 0.858403, centred [-0.768373, -0.368947, 1.137320], variance 0.673338,
    # normalised [-0.936380, -0.449618, 1.385998], then gain [2, 1, 0.5] and bias [0.1, 0, -0.1]
    expected = [-1.7727605644, -0.4496179536, 0.5929991179]
    assert seen["hook_post"][0, 0].tolist() == pytest.approx(expected, abs=1e-9)
    assert out[0, 0].tolist() == pytest.approx(expected, abs=1e-9)  # down = identity
    assert attached_hooks(mlp) == []


def test_solu_hook_names_and_parameters_as_transformerlens():
    cfg = TransformerConfig(d_model=8, n_layers=2, n_heads=2, d_head=4, d_vocab=11, n_ctx=6, d_mlp=16, act="solu_ln")
    model = HookedTransformer(cfg)
    names = list(hook_points(model))
    i = names.index("blocks.1.mlp.hook_pre")
    assert names[i : i + 3] == ["blocks.1.mlp.hook_pre", "blocks.1.mlp.hook_pre_linear", "blocks.1.mlp.hook_mid"]
    assert "blocks.1.mlp.ln.hook_normalized" in names and "blocks.1.mlp.hook_post" in names
    state = model.state_dict()
    assert state["blocks.0.mlp.ln.w"].tolist() == [1.0] * 16 and state["blocks.0.mlp.ln.b"].tolist() == [0.0] * 16
    gelu = HookedTransformer(TransformerConfig(**{**cfg.to_dict(), "act": "gelu"}))
    assert "blocks.0.mlp.hook_mid" not in hook_points(gelu) and gelu.blocks[0].mlp.ln is None
    with pytest.raises(MechscopeError, match="SoLU MLP .* is not gated"):
        HookedTransformer(TransformerConfig(**{**cfg.to_dict(), "gated_mlp": True}))


# -- the toy's MLP switch ----------------------------------------------------------------------------


def _state_hash(path_or_state) -> str:
    from safetensors.torch import load_file

    sd = path_or_state if isinstance(path_or_state, dict) else load_file(str(path_or_state))
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture()
def one_thread():
    """One torch thread (this test's reference was measured so; on a shared 2-core machine it is also
    about 15 times faster for a model this small)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


INITIAL_647675C = "7254cb7b832568f70ed7ee20f052d19868826f0cd8c7bc2b0e9324fdcac481e3"  # its 25 tensors, sha256


def test_mlp_none_is_todays_toy_bit_for_bit(tmp_path, one_thread):
    # The attention-only toy is the model it was before --mlp existed (647675c): the same architecture and config,
    # the same initial weights (their hash computed by 647675c's own make_model on TINY, 6 December 2026: the
    # initialisation draws from a seeded CPU generator, the same bits on any CPU for one torch), and a
    # deterministic training run (not pinned: training's float rounding differs between CPUs).
    from mechscope.lm.models.transformer import TransformerConfig

    r = train_toy(ToyConfig(**TINY), out=tmp_path / "a", progress=False)
    assert r["model"]["attn_only"] and r["model"]["name"] == "attn-only-2L" and r["model"]["d_mlp"] is None
    before = TransformerConfig(d_model=32, n_layers=2, n_heads=2, d_head=16, d_vocab=16, n_ctx=32,
                               positional="learned", norm="layernorm", tie_embeddings=False, bos_token_id=0,
                               family="toy", name="attn-only-2L", attn_only=True)  # the pre-MLP make_model's
    assert make_model(ToyConfig(**TINY), 16).cfg == before
    assert _state_hash(dict(make_model(ToyConfig(**TINY), 16).state_dict())) == INITIAL_647675C
    again = train_toy(ToyConfig(**TINY), out=tmp_path / "b", progress=False)
    assert again["series"][-1]["held_out_loss"].hex() == r["series"][-1]["held_out_loss"].hex()
    ckpt = "checkpoints/step_000030.safetensors"
    assert _state_hash(tmp_path / "a" / ckpt) == _state_hash(tmp_path / "b" / ckpt)
    assert r["series"][-1]["held_out_loss"] < r["series"][0]["held_out_loss"]  # and it learns


def test_toy_with_mlps_trains_and_loads(tmp_path, one_thread):
    text = "to be, or not to be: that is the question. " * 200
    for mlp, act in (("gelu", "gelu"), ("solu", "solu_ln")):
        out = tmp_path / mlp
        quick = {**TINY, "layers": 1, "steps": 10, "warmup": 1, "checkpoints": 2}
        r = train_toy(ToyConfig(**quick, data="text", mlp=mlp), text=text, out=out, progress=False)
        assert r["model"]["act"] == act and r["model"]["d_mlp"] == 4 * 32 and not r["model"]["attn_only"]
        assert r["config"]["mlp"] == mlp and r["series"][-1]["held_out_loss"] < r["series"][0]["held_out_loss"]
        (out / "training.json").write_text(__import__("json").dumps(r))
        model, chars, _ = load_toy(out)
        assert model.blocks[0].mlp is not None and (model.blocks[0].mlp.ln is not None) == (mlp == "solu")
        assert chars == sorted(set(text))
    assert make_model(ToyConfig(**TINY, mlp="gelu", d_mlp=24), 16).cfg.d_mlp == 24
    # training.json's model fields edited by hand: one line naming the file, not a traceback from inside torch
    out = tmp_path / "solu"  # r is the last run's record
    for field, value, said in (("n_heads", "4", "'n_heads' is '4'; expected int"),
                               ("n_ctx", -5, "'n_ctx' is -5; expected at least 1"),
                               ("norm_eps", "x", "'norm_eps' is 'x'; expected float"),
                               ("d_model", None, "'d_model' is None; expected int"),
                               ("n_heads", 4.0, "'n_heads' is 4.0; expected int")):  # fmt: skip
        edited = json.loads(json.dumps(r))
        edited["model"][field] = value
        (out / "training.json").write_text(json.dumps(edited))
        said = re.escape(f"{out / 'training.json'}: transformer config field {said}")
        with pytest.raises(MechscopeError, match=said):
            load_toy(out)
    # a record of a newer layout (written by a newer mechscope) is refused; one of this layout or none loads
    for schema in ("mechscope.toy/1", None):
        (out / "training.json").write_text(json.dumps({**r, "schema": schema}))
        assert load_toy(out)[0].cfg.d_model == 32
    (out / "training.json").write_text(json.dumps({**r, "schema": "mechscope.toy/2"}))
    with pytest.raises(MechscopeError, match="mechscope.toy/2 record, newer than this mechscope reads"):
        load_toy(out)


@pytest.mark.parametrize(
    "kw, fragment",
    [
        ({"mlp": "relu"}, "--mlp must be one of none, gelu, solu, got 'relu'"),
        ({"d_mlp": 64}, "--d-mlp 64 needs MLPs: pass --mlp gelu or --mlp solu"),
        ({"mlp": "solu", "d_mlp": 0}, "--d-mlp must be at least 1, got 0"),
    ],
)
def test_contradictory_mlp_settings(kw, fragment):
    with pytest.raises(MechscopeError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        ToyConfig(**TINY, **kw).validate()


def test_text_loss_is_the_mean_over_every_window():
    torch.manual_seed(0)
    model = HookedTransformer(TransformerConfig(d_model=8, n_layers=1, n_heads=2, d_head=4, d_vocab=7, n_ctx=5,
                                                attn_only=True))  # fmt: skip
    ids = torch.randint(0, 7, (23,))
    got = text_loss(model, ids, batch=2)
    x, y = ids[:20].view(4, 5), ids[1:21].view(4, 5)  # 4 windows of 5 inputs and their next tokens
    with torch.no_grad():
        logits = model(x)
    by_hand = -torch.log_softmax(logits, -1).gather(-1, y[..., None]).mean()
    assert got["tokens"] == 20 and got["loss"] == pytest.approx(float(by_hand), rel=1e-6)


# -- monosemanticity: known answers -------------------------------------------------------------------


def test_entropy_and_concentration_by_hand():
    assert entropy_bits([100]) == 0.0
    assert entropy_bits([50, 50]) == pytest.approx(1.0)
    assert entropy_bits([1, 1, 1, 1]) == pytest.approx(2.0)
    assert entropy_bits([2, 1, 1]) == pytest.approx(1.5)  # -(1/2 log 1/2 + 2 · 1/4 log 1/4)
    c = concentration(np.array([3, 3, 3, 5]), np.array([1, 1, 2, -1]))
    assert c.n == 4 and c.top_token == 3 and c.top_share == 0.75 and c.prev_token == 1 and c.prev_share == 0.5
    assert c.bigram == (1, 3) and c.bigram_share == 0.5 and c.entropy == pytest.approx(0.8112781245)
    assert c.pattern == "token" and c.pattern_share == 0.75


def test_sample_windows_seeded_and_disjoint():
    ids = torch.arange(1000)
    w = sample_windows(ids, 10, 32, seed=3)
    assert w.shape == (10, 32) and len(set(w.reshape(-1).tolist())) == 320  # no position twice
    assert (w[:, 0] % 32 == 0).all() and (w[1:, 0] > w[:-1, 0]).all()  # whole chunks, in text order
    assert torch.equal(w, sample_windows(ids, 10, 32, seed=3)) and not torch.equal(w, sample_windows(ids, 10, 32, 4))
    assert sample_windows(ids, 100, 32, 0).shape == (31, 32)  # only 31 whole windows
    assert sample_windows(torch.arange(10), 5, 32, 0).shape == (1, 10)
    with pytest.raises(MechscopeError, match="too short"):
        sample_windows(torch.tensor([4]), 5, 32, 0)


V, P = 12, 16  # vocabulary, context of the constructed model


def constructed_model(act: str = "gelu") -> HookedTransformer:
    """One block, attention switched off; the residual stream is one-hot(token) ++ one-hot(position).
    Neuron 0 reads token 5's direction: it fires on token 5 and nowhere else. Neuron 1 reads position
    9's direction: it fires at position 9 whatever the token, so its tokens are the text's, at random.
    The others read random directions."""
    d = V + P
    cfg = TransformerConfig(d_model=d, n_layers=1, n_heads=1, d_head=4, d_vocab=V, n_ctx=P, d_mlp=6, act=act,
                            tie_embeddings=False, name="constructed")  # fmt: skip
    model = HookedTransformer(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.W_E.zero_()
        model.W_E[:, :V] = torch.eye(V)
        model.W_pos.zero_()
        model.W_pos[:, V:] = torch.eye(P)
        model.blocks[0].attn.o.weight.zero_()  # no attention output
        up = model.blocks[0].mlp.up
        up.weight.copy_(torch.randn(6, d, generator=g))
        up.weight[0].zero_()
        up.weight[0, 5] = 10.0  # ln2 output at token 5's dim: positive only there
        up.weight[1].zero_()
        up.weight[1, V + 9] = 10.0
        up.bias.zero_()
    return model.eval()


def zipf_text(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, V + 1)
    return torch.multinomial(p / p.sum(), n, replacement=True, generator=g)


@pytest.mark.parametrize("act", ["gelu", "solu_ln"])
def test_one_token_neuron_is_fully_monosemantic_and_a_random_one_is_not(act):
    model = constructed_model(act)
    tokens = sample_windows(zipf_text(300 * P, seed=1), 300, P, seed=0)
    r = read_neurons(model, tokens, name="constructed", k=100)
    lay = r.layers[0]
    assert lay.hook == ("blocks.0.mlp.hook_mid" if act == "solu_ln" else "blocks.0.mlp.hook_post")
    one = lay.figures[0]
    assert int((tokens == 5).sum()) >= 100  # enough token-5 positions for the whole top 100
    assert one.n == 100 and one.entropy == 0.0 and one.top_share == 1.0 and one.top_token == 5
    assert r.ranking()[0] == (0, 0)  # the most monosemantic
    pos = lay.figures[1]  # fires at position 9: its tokens are the text's own
    b = r.baseline
    assert b["entropy_p05"] - 0.3 <= pos.entropy <= b["entropy_p95"] + 0.3
    assert pos.top_share < 0.35 and pos.prev_share < 0.35
    top = top_activations(model, tokens, [0], k=100)
    assert (top.pos[0, 1] == 9).all() and (tokens[top.seq[0, 0], top.pos[0, 0]] == 5).all()
    assert r.summary()["all"]["neurons"] + r.summary()["all"]["rarely_active"] == 6


def test_random_activations_score_like_the_baseline():
    # a neuron whose activations are noise: its top contexts are positions at random
    tokens = sample_windows(zipf_text(200 * P, seed=2), 200, P, seed=0)
    rng = np.random.default_rng(0)
    ent, share = [], []
    for _ in range(20):
        act = rng.normal(size=tokens.shape)
        top = np.argsort(act.reshape(-1))[::-1][:100]
        cur = tokens.reshape(-1).numpy()[top]
        c = concentration(cur, cur)
        ent.append(c.entropy)
        share.append(c.top_share)
    b = random_baseline(tokens, 100, seed=0)
    assert abs(np.mean(ent) - b["entropy_mean"]) < 0.1 and b["entropy_mean"] > 2.5
    assert max(share) < 0.5 and abs(np.mean(share) - b["top_share_mean"]) < 0.05


def test_contexts_are_the_neurons_own_activations():
    model = constructed_model("solu_ln")
    tokens = sample_windows(zipf_text(40 * P, seed=3), 40, P, seed=0)
    top = top_activations(model, tokens, [0], k=7, batch=6)
    windows = context_activations(model, tokens, top, 3, before=4, after=2, batch=5)[0]  # [M, 3, 7]
    _, cache = run_with_cache(model, tokens, names=["blocks.0.mlp.hook_mid"])
    act = cache["blocks.0.mlp.hook_mid"]
    for m in range(6):
        for c in range(3):
            s, p = int(top.seq[0, m, c]), int(top.pos[0, m, c])
            assert float(windows[m, c, 4]) == pytest.approx(float(top.values[0, m, c]))
            for j, off in enumerate(range(-4, 3)):
                if 0 <= p + off < P:
                    assert float(windows[m, c, j]) == pytest.approx(float(act[s, p + off, m]), abs=1e-6)
                else:
                    assert math.isnan(float(windows[m, c, j]))
    # the k largest activations over every position, as a direct sort finds them
    flat = act[..., 2].reshape(-1)
    assert top.values[0, 2].tolist() == pytest.approx(flat.sort(descending=True).values[:7].tolist())


def test_neuron_model_checks():
    attn_only = HookedTransformer(TransformerConfig(d_model=8, n_layers=2, n_heads=2, d_head=4, d_vocab=7, n_ctx=5,
                                                    attn_only=True, name="attn"))  # fmt: skip
    with pytest.raises(MechscopeError, match="attn has no MLP layers"):
        check_neuron_model(attn_only, None)
    gelu = constructed_model("gelu")
    with pytest.raises(MechscopeError, match=r"layer 3 out of range: the MLP layers are 0\.\.0"):
        check_neuron_model(gelu, [3])
    with pytest.raises(MechscopeError, match="--site mid is the SoLU MLP's"):
        check_neuron_model(gelu, None, "mid")
    with pytest.raises(MechscopeError, match="the text sample is empty"):
        read_neurons(gelu, torch.zeros(0, 4, dtype=torch.long), name="x")


def test_shifted_selectivity_index_by_hand():
    from mechscope.cnn.methods.channel_selectivity import shifted_index

    means = torch.tensor([[0.0, 0.0, 1.0], [1.0, 1.0, 1.0], [2.0, 3.0, 4.0], [-1.0, -1.0, 0.5]])
    # one class only: 1; all alike: 0; [0, 1, 2] after the shift: (2 - 0.5) / (2 + 0.5) = 0.6;
    # [0, 0, 1.5] after the shift: 1
    assert shifted_index(means).tolist() == pytest.approx([1.0, 0.0, 0.6, 1.0])


def test_a_transformer_config_takes_numpy_numbers_and_listed_token_ids():
    """What loaded before the type checks still loads: NumPy scalars from the Python API (as Python numbers), a
    config.json's list of eos ids (Llama 3 lists two: the first is kept); a number past a float's range is one line."""
    from mechscope.lm.models.transformer import TransformerConfig

    base = dict(d_model=8, n_layers=1, n_heads=2, d_head=4, d_vocab=10, n_ctx=8, d_mlp=16)
    c = TransformerConfig(**base | {"d_model": np.int64(8), "norm_eps": np.float32(1e-5), "attn_bias": np.bool_(True),
                                    "eos_token_id": [3, 4], "bos_token_id": [0]})  # fmt: skip
    c.validate()
    assert (type(c.d_model), type(c.norm_eps), type(c.attn_bias)) == (int, float, bool)
    assert (c.eos_token_id, c.bos_token_id) == (3, 0)
    with pytest.raises(MechscopeError, match="'norm_eps' is 1000"):
        TransformerConfig(**base | {"norm_eps": 10**400}).validate()
