"""Second truths for toy training (lm.toy) and transcoder training (lm.methods.replacement_training): log-spaced
checkpoints by a plain loop, repeated spans measured on rows of distinct tokens, the 90/10 text split, a hand-written
AdamW loop with linear warmup compared parameter by parameter with the saved checkpoints, the record's summaries
recomputed from its series, load_toy picking the last checkpoint, and the cross-layer transcoder's first gradient
against a hand-written loss."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import mechscope.lm.methods.replacement_training as rt
from mechscope.core.dictionaries import DictionaryConfig
from mechscope.lm.toy import (
    Data,
    ToyConfig,
    checkpoint_steps,
    load_toy,
    make_model,
    repeat_spans,
    train_toy_and_control,
)
from tests.unit.test_attribution_graph_lm import tiny
from tests.unit.test_crosslayer import tiny3

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(steps=12, d_model=16, n_heads=2, n_ctx=16, vocab=12, batch=4, checkpoints=4, min_span=2, warmup=3, lr=3e-3)


# ---- schedule and data ---------------------------------------------------------------------------------------------


def test_checkpoint_steps_by_a_plain_loop():
    """Truth: 0, n, and round(n ** (k / (count - 1))) for k = 0..count-1 (equal steps in log10), written as a loop."""
    assert checkpoint_steps(12, 4) == [0, 1, 2, 5, 12]
    assert checkpoint_steps(1000, 4) == [0, 1, 10, 100, 1000]
    for n, count in ((2500, 30), (7, 5), (300, 6)):
        want = {0, n}
        for k in range(count):
            want.add(int(round(n ** (k / (count - 1)))))
        assert checkpoint_steps(n, count) == sorted(want)


def test_spans_take_every_length_from_min_span_to_half_the_row_and_copy_from_before():
    """Truth: rows of distinct tokens (0..32): the positions that changed are exactly the copied span, its length
    s is uniform on min_span..33 // 2 (both ends reached in 3000 rows), and its first value names a source that
    ends before the copy starts."""
    x = torch.arange(33).repeat(3000, 1)
    y = repeat_spans(x, 4, torch.Generator().manual_seed(0))
    lengths = set()
    for row in y.tolist():
        changed = [p for p in range(33) if row[p] != p]
        d, s = changed[0], len(changed)
        assert changed == list(range(d, d + s))  # one contiguous span
        assert row[d : d + s] == list(range(row[d], row[d] + s)) and d - row[d] >= s
        lengths.add(s)
    assert lengths == set(range(4, 17))
    rows = torch.tensor([True, False] * 1500)
    masked = repeat_spans(x, 4, torch.Generator().manual_seed(0), rows)
    assert torch.equal(masked[1::2], x[1::2]) and not torch.equal(masked[::2], x[::2])


def test_synthetic_batches_never_use_token_zero():
    """Truth: token 0 is the BOS the probe starts with; the synthetic tokens are 1..vocab-1, all of them drawn."""
    data = Data(ToyConfig(**SMALL))
    x = data.batch(torch.Generator().manual_seed(1), 500)
    assert x.shape == (500, 17) and set(x.unique().tolist()) == set(range(1, 12))


def _windows(ids: list[int], row: list[int]) -> bool:
    return any(ids[s : s + len(row)] == row for s in range(len(ids) - len(row) + 1))


def test_text_batches_split_ninety_ten_and_carry_no_span_at_repeat_fraction_zero():
    """Truth: a text whose first 900 characters are drawn from "abcd" and last 100 from "wxyz": sorted characters
    give ids 0-3 and 4-7; training rows only use 0-3, held-out rows only 4-7, and with repeat_fraction 0 every row
    is an unaltered window of its split (found by a plain search)."""
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(list("abcd"), 900)) + "".join(rng.choice(list("wxyz"), 100))
    data = Data(ToyConfig(**SMALL, data="text", repeat_fraction=0.0), text)
    assert data.chars == list("abcdwxyz")
    ids = ["abcdwxyz".index(c) for c in text]
    g = torch.Generator().manual_seed(2)
    train, held = data.batch(g, 20).tolist(), data.batch(g, 20, held_out=True).tolist()
    for row in train:
        assert max(row) <= 3 and _windows(ids[:900], row)
    for row in held:
        assert min(row) >= 4 and _windows(ids[900:], row)


def test_a_phase_change_of_exactly_twenty_percent_is_detected():
    """Truth: the docstring's "at least 20% of their range": induction 0..5 in equal steps of 1 (each a fifth of
    the range, 1 >= 0.1) with the ICL score falling in step is detected, at the first interval's midpoint."""
    from mechscope.lm.toy import detect_phase_change

    found = detect_phase_change([0, 10, 20, 30, 40, 50], [0, 1, 2, 3, 4, 5], [0, -1, -2, -3, -4, -5])
    assert found["share_of_range"] == 0.2 and found["detected"] and found["step"] == 5


# ---- a hand-written training loop ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    rec = train_toy_and_control(ToyConfig(**SMALL), out=out, progress=False)
    (out / "training.json").write_text(json.dumps(rec.to_dict()))
    return out, rec.series


def _hand_training(cfg: ToyConfig) -> tuple[dict[int, dict], list[float]]:
    """Plain AdamW (betas 0.9, 0.999, eps 1e-8, weight decay 0.01, decoupled) with lr * min(1, t / warmup) at step
    t = 1, 2, ...; returns the parameters after each step (0: the initial ones) and each step's loss."""
    data = Data(cfg)
    model = make_model(cfg, data.vocab).train()
    g = torch.Generator().manual_seed(cfg.seed)
    params = dict(model.named_parameters())
    m = {k: torch.zeros_like(p) for k, p in params.items()}
    v = {k: torch.zeros_like(p) for k, p in params.items()}
    states, losses = {0: {k: p.detach().clone() for k, p in params.items()}}, []
    for t in range(1, cfg.n_steps + 1):
        x = data.batch(g, cfg.batch)
        loss = F.cross_entropy(model(x[:, :-1]).transpose(1, 2), x[:, 1:])
        model.zero_grad()
        loss.backward()
        lr = cfg.lr * min(1.0, t / cfg.warmup)
        with torch.no_grad():
            for k, p in params.items():
                p.mul_(1 - lr * 0.01)
                m[k] = 0.9 * m[k] + 0.1 * p.grad
                v[k] = 0.999 * v[k] + 0.001 * p.grad**2
                p.sub_(lr * (m[k] / (1 - 0.9**t)) / ((v[k] / (1 - 0.999**t)).sqrt() + 1e-8))
        losses.append(loss.item())
        states[t] = {k: p.detach().clone() for k, p in params.items()}
    return states, losses


def test_checkpoints_match_a_hand_written_adamw_loop_with_warmup(run):
    """Truth: :func:`_hand_training` (AdamW's update written out, the warmup by its formula): every checkpoint's
    tensors equal the hand loop's parameters after that step."""
    out, _ = run
    states, _ = _hand_training(ToyConfig(**SMALL))
    for step in (0, 1, 2, 5, 12):
        saved = load_file(str(out / "checkpoints" / f"step_{step:06d}.safetensors"))
        for k, p in states[step].items():
            assert torch.allclose(saved[k], p, atol=2e-5), (step, k)


def test_train_loss_is_the_mean_since_the_last_checkpoint_and_held_out_loss_by_numpy(run):
    """Truth: the hand loop's per-step losses averaged over each checkpoint interval (steps 3-5, 6-12), and the
    held-out loss as a numpy log-softmax cross entropy of the hand loop's model on 128 held-out rows drawn with seed
    + 10,000."""
    _, series = run
    cfg = ToyConfig(**SMALL)
    states, losses = _hand_training(cfg)
    rows = {r["step"]: r for r in series["series"]}
    assert rows[0]["train_loss"] is None
    for step, since in ((1, 0), (2, 1), (5, 2), (12, 5)):
        assert rows[step]["train_loss"] == pytest.approx(np.mean(losses[since:step]), rel=1e-5)
    held = Data(cfg).batch(torch.Generator().manual_seed(cfg.seed + 10_000), 128, held_out=True)
    model = make_model(cfg, cfg.vocab).eval()
    for step in (0, 12):
        model.load_state_dict(states[step])
        with torch.no_grad():
            z = model(held[:, :-1]).double().numpy()
        logp = z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
        nll = -np.take_along_axis(logp, held[:, 1:].numpy()[..., None], -1)[..., 0]
        assert rows[step]["held_out_loss"] == pytest.approx(nll.mean(), rel=1e-4)


def test_final_and_circuit_summaries_recomputed_from_the_series(run):
    """Truth: plain loops over the series: the last row's best layer-1 induction head and best layer-0
    previous-token head, the K-composition entry [induction head][previous-token head] at each checkpoint, its jump
    over the phase-change window (later minus earlier) and its range."""
    _, s = run
    last = s["series"][-1]
    ind, prev = last["induction"], last["previous_token"]
    h_ind = max(range(2), key=lambda h: ind[1][h])
    h_prev = max(range(2), key=lambda h: prev[0][h])
    assert s["final"]["max_induction_last_layer"] == max(ind[1])
    assert s["final"]["max_previous_token_layer0"] == max(prev[0])
    assert s["circuit"]["induction_head"] == [1, h_ind] and s["circuit"]["previous_token_head"] == [0, h_prev]
    comp = [row["k_composition"][h_ind][h_prev] for row in s["series"]]
    assert s["circuit"]["k_composition_series"] == comp
    a, b = s["phase_change"]["window"]
    by_step = {row["step"]: c for row, c in zip(s["series"], comp, strict=True)}
    assert s["circuit"]["k_composition_jump_at_phase_change"] == pytest.approx(by_step[b] - by_step[a])
    assert s["circuit"]["k_composition_range"] == pytest.approx(max(comp) - min(comp))
    assert s["config"]["steps"] == 12 and s["control"]["config"]["layers"] == 1


def test_circuit_heads_come_from_planted_scores(monkeypatch):
    """Truth: planted measurements (layer 1's best induction head 1; layer 0's best previous-token head 0 while
    layer 1's is 1; K-composition [L1 head][L0 head] = 10 * (2 * i + j) + call): the circuit is [1, 1] and [0, 0]
    reading entry [1][0] = 20 + call at every checkpoint."""
    import mechscope.lm.toy as toy

    calls = []

    def planted(model, held_out, probe):
        calls.append(len(calls))
        t = calls[-1]
        kc = [[10 * (2 * i + j) + t for j in range(2)] for i in range(2)]
        ind, prev = [[0.1, 0.2], [0.3, 0.9]], [[0.8, 0.1], [0.0, 0.95]]
        return {"held_out_loss": 1.0, "icl_score": -t, "induction": ind, "previous_token": prev, "k_composition": kc}

    monkeypatch.setattr(toy, "measure", planted)
    r = toy.train_toy(ToyConfig(**{**SMALL, "steps": 5, "checkpoints": 3}), progress=False)
    assert r["circuit"]["induction_head"] == [1, 1] and r["circuit"]["previous_token_head"] == [0, 0]
    assert r["circuit"]["k_composition_series"] == [20 + t for t in calls] and len(calls) == 4


def test_load_toy_reads_the_last_checkpoint_of_the_run_and_of_its_control(run):
    """Truth: the checkpoint files themselves (safetensors): the run's and the control's step 12, and a named file."""
    out, _ = run
    for where, layers in ((out, 2), (out / "control", 1)):
        model, chars, name = load_toy(where)
        assert model.cfg.n_layers == layers and chars is None and name == f"{where.name}/step_000012"
        saved = load_file(str(where / "checkpoints" / "step_000012.safetensors"))
        assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    model, _, name = load_toy(out / "checkpoints" / "step_000005.safetensors")
    saved = load_file(str(out / "checkpoints" / "step_000005.safetensors"))
    assert name == f"{out.name}/step_000005"
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_k_composition_is_laid_out_by_layer_1_head_then_layer_0_head(run):
    """Truth: Elhage et al.'s K-composition ||W_OV^h0 W_K^h1 W_Q^h1ᵀ||_F / (||W_OV^h0||_F ||W_Q^h1 W_K^h1ᵀ||_F) in
    numpy on the final model's folded weights, entry [layer-1 head][layer-0 head]."""
    from mechscope.lm.models.folding import analysis_weights

    out, s = run
    w = analysis_weights(load_toy(out)[0])
    W = {k: getattr(w, k).double().numpy() for k in ("W_Q", "W_K", "W_V", "W_O")}
    got = s["series"][-1]["k_composition"]
    for h1 in range(2):
        qk = W["W_Q"][1, h1] @ W["W_K"][1, h1].T
        for h0 in range(2):
            ov = W["W_V"][0, h0] @ W["W_O"][0, h0]
            want = np.linalg.norm(ov @ qk.T) / (np.linalg.norm(ov) * np.linalg.norm(qk))
            assert got[h1][h0] == pytest.approx(want, abs=2e-5)


def test_load_toy_takes_the_highest_step_past_a_million(run, tmp_path):
    """Truth: MAX_STEPS allows 10,000,000 steps; step 1,000,000 (7 digits, written step_1000000) comes after step
    999,999, so a run with both must load step 1,000,000 (here a copy of step 12's file; step 999,999 is step 5's)."""
    import shutil

    out, _ = run
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(out / "training.json", tmp_path / "training.json")
    shutil.copy(out / "checkpoints" / "step_000005.safetensors", tmp_path / "checkpoints" / "step_999999.safetensors")
    shutil.copy(out / "checkpoints" / "step_000012.safetensors", tmp_path / "checkpoints" / "step_1000000.safetensors")
    assert load_toy(tmp_path)[2] == f"{tmp_path.name}/step_1000000"


# ---- per-layer transcoders -----------------------------------------------------------------------------------------


def test_per_layer_training_counts_and_settings_by_hand():
    """Truth: counting. Context 64 is clamped to the model's 16 (no BOS: 16 positions a context); 256 + 100
    positions need ceil(356 / 16) = 23 contexts = 368 positions; held out min(100, 368 // 5) = 73, leaving 295 rows,
    i.e. 7 full batches of 40 in one epoch; d_sae None is expansion 2 x d_model 16 = 32; TopK k = 3 gives L0 = 3;
    layer 0, not asked for, is an empty transcoder."""
    model = tiny("gpt2")
    assert model.cfg.bos_token_id is None
    ids = torch.randint(0, 32, (500,), generator=torch.Generator().manual_seed(0)).tolist()
    s = rt.TranscoderTraining(
        tokens=256, eval_tokens=100, context=64, expansion=2, k=3, epochs=1, batch=40, layers=(1,)
    )
    r = rt.train_transcoders(model, ids, s)
    assert r.contexts == 23 and r.settings["d_sae"] == 32 and r.settings["context"] == 64
    assert [row["layer"] for row in r.layers] == [1] and r.layers[0]["steps"] == 7
    assert r.layers[0]["l0"] == pytest.approx(3.0)
    assert r.transcoders.empty_layers == [0] and r.transcoders.layers[1].cfg.d_sae == 32


def test_per_layer_rows_and_transcoders_follow_layer_order_whatever_order_is_asked():
    """Truth: layers (1, 0) name the same set as (0, 1): rows and transcoders in model order 0, 1, each transcoder
    the one whose row reports its layer (explained variance recomputed on the model's own layer)."""
    model = tiny("gpt2")
    ids = torch.randint(0, 32, (500,), generator=torch.Generator().manual_seed(0)).tolist()
    s = rt.TranscoderTraining(tokens=256, eval_tokens=64, context=16, d_sae=32, k=3, epochs=1, batch=64, layers=(1, 0))
    r = rt.train_transcoders(model, ids, s)
    assert [row["layer"] for row in r.layers] == [0, 1] and r.transcoders.empty_layers == []
    xs, ys = rt._harvest(model, rt._contexts(ids, 16, None, 4), [0, 1], 0)
    for i in range(2):
        q = rt._quality(r.transcoders.layers[i], xs[i].float(), ys[i].float())
        assert q["explained_variance"] == pytest.approx(r.layers[i]["explained_variance"], abs=1e-4)


def test_batches_drop_the_last_partial_batch():
    """Truth: counting: 11 rows in batches of 5 are 2 full batches an epoch (the eleventh row waits)."""
    x = torch.arange(11.0)[:, None]
    got = list(rt._batches(x, x, 5, 3, torch.Generator().manual_seed(0)))
    assert len(got) == 6 and all(len(b[0]) == 5 for b in got)


# ---- the cross-layer transcoder's training step --------------------------------------------------------------------


def _hand_loss(p: dict, x: torch.Tensor, y: torch.Tensor, l1: float) -> torch.Tensor:
    """Σ_l' mean_n ||y_l' - ŷ_l'||² + l1 Σ_l mean_n Σ_F f_lF ||W_dec[l][F]|| with plain loops (float64)."""
    L = x.shape[1]
    f = [torch.relu(x[:, i] @ p["W_enc"][i] + p["b_enc"][i]) for i in range(L)]
    loss = 0.0
    for j in range(L):
        y_hat = p["b_dec"][j] + sum(f[i] @ p[f"W_dec.{i}"][:, j - i] for i in range(j + 1))
        loss = loss + ((y_hat - y[:, j]) ** 2).sum(1).mean()
    for i in range(L):
        norms = p[f"W_dec.{i}"].pow(2).sum((1, 2)).sqrt()
        loss = loss + l1 * (f[i] * norms).sum(1).mean()
    return loss


def test_crosslayer_first_gradient_is_the_hand_loss_gradient_and_decoders_stay_unit(monkeypatch):
    """Truth: the first Adam step's parameters and gradient, captured, against autograd of :func:`_hand_loss` on the
    first batch scaled by s = sqrt(D / mean ||x||²) per layer (numpy, over the training rows), each decoder gradient
    with its part along the feature's concatenated decoder removed; after training, the folded decoders times s_out
    are unit vectors per feature."""
    seen, batches = {}, []

    class Spy(torch.optim.Adam):
        def step(self, closure=None):
            ps = self.param_groups[0]["params"]
            seen.setdefault("p", [q.detach().double().clone() for q in ps])
            seen.setdefault("g", [q.grad.double().clone() for q in ps])
            return super().step(closure)

    def spy(*args):
        for b in batches_of(*args):
            batches.append(b)
            yield b

    batches_of = rt._batches
    monkeypatch.setattr(torch.optim, "Adam", Spy)
    monkeypatch.setattr(rt, "_batches", spy)
    model = tiny3("gpt2")
    ids = torch.randint(0, 32, (2000,), generator=torch.Generator().manual_seed(0)).tolist()
    s = rt.TranscoderTraining(tokens=512, eval_tokens=64, context=16, d_sae=8, architecture="relu", epochs=1,
                              batch=128, lr=1e-3, crosslayer=True)  # fmt: skip
    clt = rt.train_transcoders(model, ids, s).transcoders
    ctx = rt._contexts(ids, 16, None, math.ceil(576 / 16))
    xs, ys = rt._harvest(model, ctx, [0, 1, 2], 0)
    scale = [[math.sqrt(16 / (t[i][64:].double().numpy() ** 2).sum(1).mean()) for i in range(3)] for t in (xs, ys)]
    s_in, s_out = (torch.tensor(v, dtype=torch.float64) for v in scale)
    names = [n for n, _ in rt.CrossLayerTranscoder(3, 16, 8, "relu").named_parameters()]
    p = {n: t.requires_grad_() for n, t in zip(names, seen["p"], strict=True)}
    x, y = (b.double() for b in batches[0])
    loss = _hand_loss(p, x * s_in[None, :, None], y * s_out[None, :, None], DictionaryConfig.l1_coefficient)
    loss.backward()
    for n, got in zip(names, seen["g"], strict=True):
        want = p[n].grad
        if n.startswith("W_dec"):
            unit = p[n].detach() / p[n].detach().pow(2).sum((1, 2), keepdim=True).sqrt()
            want = want - (want * unit).sum((1, 2), keepdim=True) * unit
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-5), n
    for i in range(3):  # the decoder bias starts at the geometric median of the scaled outputs (Weiszfeld, numpy)
        pts = ys[i][64:].double().numpy() * float(s_out[i])
        m = pts.mean(0)
        for _ in range(200):
            w = 1 / np.maximum(np.linalg.norm(pts - m, axis=1), 1e-12)
            m = (w[:, None] * pts).sum(0) / w.sum()
        assert np.allclose(seen["p"][names.index("b_dec")][i].detach().numpy(), m, atol=1e-3)
    for i in range(3):
        unfolded = clt.W_dec[i].double() * s_out[i:][None, :, None]
        assert torch.allclose(unfolded.pow(2).sum((1, 2)), torch.ones(8, dtype=torch.float64), atol=1e-4)
