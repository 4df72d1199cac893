"""Sparse dictionaries on a transformer, known answers on tiny random models: an identity dictionary spliced in
changes nothing, CE loss recovered against a hand computation, a planted feature found by the dashboards, the
rows of every hook kind, the direct logit effect, and one-line errors."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mechscope.core.dictionaries import DictionaryConfig, SparseDictionary, save_saelens
from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import attached_hooks, hooks
from mechscope.lm.methods import sae as S
from mechscope.lm.models.transformer import HookedTransformer, TransformerConfig
from mechscope.lm.pipelines import sae as LS
from mechscope.lm.pipelines.neurons import TextModel

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one torch thread


CHARS = "abcdefghijklmnopqrstuvwxyz .,"


def tiny_model(seed: int = 0, **kw) -> HookedTransformer:
    cfg = TransformerConfig(**{"d_model": 16, "n_layers": 2, "n_heads": 2, "d_head": 8, "d_vocab": len(CHARS) + 1,
                               "n_ctx": 32, "d_mlp": 32, "bos_token_id": 0} | kw)  # fmt: skip
    model = HookedTransformer(cfg)
    model.init_weights(torch.Generator().manual_seed(seed), std=0.3)
    return model.eval()


def text_model(model) -> TextModel:
    lookup = {c: i + 1 for i, c in enumerate(CHARS)}
    return TextModel(model, lambda t: [lookup[c] for c in t if c in lookup], lambda i: "^" if i == 0 else CHARS[i - 1],
                     "tiny", 0)  # fmt: skip


def identity_sae(d: int) -> SparseDictionary:
    """relu([x, -x]) decoded by [I; -I]: x exactly (one of each pair is zero)."""
    sae = SparseDictionary(DictionaryConfig(d_in=d, d_sae=2 * d, l1_coefficient=0.0))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def tokens(n: int = 6, p: int = 16, seed: int = 0) -> torch.Tensor:
    t = torch.randint(1, len(CHARS) + 1, (n, p), generator=torch.Generator().manual_seed(seed))
    t[:, 0] = 0
    return t


@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.1.hook_mlp_out"])
def test_identity_sae_spliced_in_reproduces_the_loss_exactly(hook):
    model = tiny_model()
    width = S.hook_widths(model, [hook])[hook]
    effect, metrics = S.splice_effect(model, tokens(), identity_sae(width), hook, None, skip_first=1)
    assert effect.loss_spliced == effect.loss_clean  # bit for bit
    assert effect.kl_spliced == 0.0
    assert effect.ce_loss_recovered == 1.0
    assert metrics.explained_variance == 1.0 and metrics.mse == 0.0
    assert attached_hooks(model) == []


def test_ce_loss_recovered_by_hand():
    model, toks = tiny_model(1), tokens(4, 12, 1)
    hook = "blocks.0.hook_resid_post"
    sae = SparseDictionary(DictionaryConfig(d_in=16, d_sae=24, architecture="topk", k=3),
                           generator=torch.Generator().manual_seed(0)).eval()  # fmt: skip

    def loss(fn=None):
        with hooks(model, fwd=[(hook, fn)] if fn else []), torch.no_grad():
            logits = model(toks)
        logp = torch.log_softmax(logits[:, :-1].double(), -1)
        return float(-logp.gather(-1, toks[:, 1:, None]).mean())

    def splice(x, h):
        y = x.clone()
        y[:, 1:] = sae(x[:, 1:].reshape(-1, 16))[0].reshape(x[:, 1:].shape)
        return y

    def zero(x, h):
        y = x.clone()
        y[:, 1:] = 0
        return y

    clean, spliced, zeroed = loss(), loss(splice), loss(zero)
    effect, _ = S.splice_effect(model, toks, sae, hook, None, skip_first=1, batch=3)
    assert effect.loss_clean == pytest.approx(clean, rel=1e-9)
    assert effect.loss_spliced == pytest.approx(spliced, rel=1e-6)
    assert effect.loss_zero_ablated == pytest.approx(zeroed, rel=1e-9)
    assert effect.ce_loss_recovered == pytest.approx((zeroed - spliced) / (zeroed - clean), rel=1e-5)
    assert 0 < effect.kl_spliced < effect.kl_zero_ablated


def test_transcoder_of_zeros_is_the_mlp_ablated():
    model, toks = tiny_model(2), tokens(3, 10, 2)
    tc = SparseDictionary(DictionaryConfig(d_in=16, d_sae=8, transcoder=True, d_out=16))
    with torch.no_grad():
        for p in tc.parameters():
            p.zero_()
    effect, _ = S.splice_effect(model, toks, tc.eval(), "blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out", skip_first=1)
    assert effect.loss_spliced == pytest.approx(effect.loss_zero_ablated, abs=1e-12)
    assert effect.ce_loss_recovered == pytest.approx(0.0, abs=1e-9)


def test_rows_and_contexts():
    model = tiny_model()
    widths = S.hook_widths(model, ["blocks.1.attn.hook_z", "blocks.0.hook_resid_pre", "blocks.1.mlp.hook_in"])
    assert widths == {"blocks.1.attn.hook_z": 16, "blocks.0.hook_resid_pre": 16, "blocks.1.mlp.hook_in": 16}
    toks = tokens(2, 8)
    cache = S.capture(model, toks, ["blocks.1.attn.hook_z"])
    z = cache["blocks.1.attn.hook_z"]  # [B, P, H, Dh]
    rows = S.rows(z, 1)
    assert rows.shape == (2 * 7, 16)
    assert torch.equal(rows[7 + 2], z[1, 3].reshape(-1))  # sequence 1, position 3 (row 1*7 + (3-1))
    ctx = S.contexts(list(range(1, 21)), 8, bos=0)
    assert ctx.shape == (2, 8) and ctx[:, 0].tolist() == [0, 0] and ctx[1, 1:].tolist() == list(range(8, 15))
    assert S.contexts(list(range(1, 21)), 8, bos=None).shape == (2, 8)
    with pytest.raises(MechscopeError, match="fewer than one context"):
        S.contexts([1, 2], 8, bos=0)


def test_unknown_and_silent_hooks_are_one_line():
    model = tiny_model()
    with pytest.raises(MechscopeError, match="unknown hook point 'blocks.9.hook_resid_post'") as e:
        S.hook_widths(model, ["blocks.9.hook_resid_post"])
    assert "\n" not in str(e.value)
    with pytest.raises(MechscopeError, match="does not fire"):
        S.hook_widths(model, ["blocks.0.attn.hook_rot_q"])  # learned positions: rotary never runs
    with pytest.raises(MechscopeError, match="d_in=12; blocks.0.hook_resid_post of this model has width 16"):
        S.check_dictionary(model, SparseDictionary(DictionaryConfig(d_in=12, d_sae=8)), "blocks.0.hook_resid_post",
                           None)


def test_planted_feature_is_the_top_latent_and_its_dashboard_shows_it(tmp_path):
    """Token 'q' gets a large component along a direction no other token has; the dictionary's latent 5 reads that
    direction: it is the latent most active on the 'q' positions, and its dashboard's top contexts are 'q's."""
    model = tiny_model(3)
    q = CHARS.index("q") + 1
    u = torch.zeros(16)
    u[3] = 1.0
    with torch.no_grad():
        model.W_E[:, 3] = 0.0
        model.W_E[q, 3] = 8.0
    sae = SparseDictionary(DictionaryConfig(d_in=16, d_sae=12, architecture="topk", k=2),
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
    with torch.no_grad():
        sae.W_enc[:, 5] = u * 2
        sae.b_enc[5] = -4.0  # fires only well above the other tokens
        sae.W_dec[5] = u
    sae_dir = save_saelens(sae.eval(), tmp_path / "sae", hook_name="blocks.0.hook_resid_pre")
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog, quietly. " * 30)
    tm = text_model(model)
    _, r = LS.sae_show("tiny", sae_dir, tmp_path / "dash", text, LS.ReadSettings(context=24, contexts=20), model=tm,
                       latents=(5,), n_random=2, n_induction=1, progress=False)  # fmt: skip
    assert r.trained_on == ""  # save_saelens was given no model_name: nothing said
    board = next(b for b in r.latents if b.latent == 5)
    assert board.why == "asked" and board.top
    assert all(e.tokens[e.focus] == "q" for e in board.top)
    assert board.density == pytest.approx(sum(ch == "q" for ch in text.read_text()[-20 * 23:]) / r.tokens, rel=0.3)
    toks = LS._contexts(tm, text, 24, True, 20, tail=True)[0]
    acts = S.latent_activations(model, toks, sae, "blocks.0.hook_resid_pre", skip_first=1)
    q_rows = (toks[:, 1:].reshape(-1) == q).nonzero().flatten().numpy()
    mean_on_q = torch.tensor([float(acts.dense(i)[q_rows].mean()) for i in range(12)])
    assert int(mean_on_q.argmax()) == 5
    html = (tmp_path / "dash" / "report.html").read_text()
    assert "Latent 5" in html and 'class="a10 top"' in html


def test_direct_logit_effect_promotes_the_unembedding_column():
    model = tiny_model(4, tie_embeddings=False)
    w = S.unembedding(model)  # [D, V], centred over the vocabulary
    assert torch.allclose(w.sum(1), torch.zeros(16), atol=1e-5)
    t = 7
    effects = S.logit_effects(w[:, t][None].clone(), w, [0], k=3)
    assert effects[0].promoted[0] == t
    assert effects[0].suppressed_values[0] < 0 < effects[0].promoted_values[0]


def harvest_inputs(tmp: Path):
    """A tiny transformer, a text file in ``tmp`` and harvest settings: an SAE's hook and a transcoder pair on the
    last block."""
    text = tmp / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    settings = LS.HarvestSettings(hooks=("blocks.1.hook_resid_post",),
                                  transcoders=(("blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out"),), context=24,
                                  shard_rows=256, batch=8)  # fmt: skip
    return text_model(tiny_model(5)), text, settings


def test_harvest_train_evaluate_round_trip(tmp_path):
    """The Python API end to end on a tiny model: two stores in one pass, an SAE and a transcoder, evaluation."""
    from mechscope.lm.methods.sae import LmSaeEvaluation, LmSaeHarvest, LmSaeTraining
    from tests.records import assert_round_trip

    tm, text, settings = harvest_inputs(tmp_path)
    out, h = LS.sae_harvest("tiny", tmp_path / "h", text, settings, model=tm, progress=False)
    assert h.rows == h.contexts * 23 and [s["width"] for s in h.stores] == [16, 32]
    assert_round_trip(out / "harvest.json", LmSaeHarvest)
    _, t = LS.sae_train(out / "blocks.1.hook_resid_post", tmp_path / "sae", d_sae=32, k=4, batch_size=128,
                        epochs=2, progress=False)  # fmt: skip
    assert t.steps > 0 and t.final["l0"] == pytest.approx(4.0)
    assert_round_trip(tmp_path / "sae" / "training.json", LmSaeTraining)
    _, tc = LS.sae_train(out / "blocks.1.mlp.hook_in__to__blocks.1.hook_mlp_out", tmp_path / "tc", d_sae=32, k=4,
                         batch_size=128, progress=False)  # fmt: skip
    assert tc.target == "blocks.1.hook_mlp_out"
    for d in ("sae", "tc"):
        _, e = LS.sae_evaluate("tiny", tmp_path / d, None, text, LS.ReadSettings(context=24, contexts=8), model=tm,
                               progress=False)  # fmt: skip
        assert e.metrics["l0"] <= 4.0 and e.effect.tokens == 8 * 24
        assert_round_trip(tmp_path / d / "evaluation" / "evaluation.json", LmSaeEvaluation)
        assert "CE loss recovered" in e._repr_html_()
        # the model the dictionary's cfg.json names (the harvest's --model) is recorded and said in the report
        assert e.trained_on == "tiny" and "names the model it was trained on: tiny" in e._repr_html_()


def hand_board(latent: int, why: str, induction: dict | None) -> S.LmLatentDashboard:
    return S.LmLatentDashboard(latent=latent, density=0.01, max=1.0, mean_when_active=0.5, top=(), band_edges=(),
                               bands=(), hist_counts=(), hist_edges=(), promoted=(), suppressed=(), mixes=(),
                               induction=induction, why=why)  # fmt: skip


def test_dashboard_headings_call_induction_only_what_meets_the_pages_criterion():
    """Latent 29 tops the induction ranking at +0.081 (0.159 -> 0.240, the audit's toy): under the 0.2 the summary
    counts by, so its heading names its rank and difference; latent 4 (+0.4) is induction. The induction sequences'
    BOS is shown as BOS; a toy, read without one, shows its first character."""
    from mechscope.lm.report import sae as R

    rates = ((0.159, 0.240), (0.1, 0.5))
    ind = S.InductionLatents(n=2, sequences=1, seed=0, ranked=(29, 4), rate_first=(0.159, 0.1),
                             rate_second=(0.240, 0.5), mean_first=(0.1, 0.1), mean_second=(0.2, 0.2),
                             tokens=(0, 1, 2, 1, 2), activations=((0.0, 1.0, 0.0, 1.0, 0.0),) * 2)  # fmt: skip
    boards = tuple(hand_board(i, "induction", {"rate_first": a, "rate_second": b, "mean_first": 0.1,
                                               "mean_second": 0.2, "rank": j + 1})
                   for j, (i, (a, b)) in enumerate(zip(ind.ranked, rates, strict=True)))  # fmt: skip
    r = S.LmSaeDashboards(model="m", dictionary="d", hook="blocks.0.hook_resid_post", target=None,
                          architecture="topk", d_in=4, d_sae=32, text="t", contexts=1, context=8, tokens=7,
                          dead_fraction=0.0, logit_effect="none", induction=ind, induction_tokens=("\n", "a", "b", "a",
                          "b"), latents=(*boards, hand_board(7, "random", None)), summary=(), seconds={})  # fmt: skip
    html = R.dashboards_page(r)
    assert 'Latent 29 <span class="muted">(top of the induction ranking: +0.081 on the repeat, under the 0.2 ' in html
    assert 'Latent 4 <span class="muted">(induction)</span>' in html
    assert 'Latent 7 <span class="muted">(random)</span>' in html
    assert html.count("(induction)") == 1
    assert "<span>⟨BOS⟩</span>" in html and "↵" not in html
    assert "The table lists the 2 highest in that ranking: 1 of them meet the criterion (in bold)." in html
    assert '<tr style="font-weight:bold"><td>4</td>' in html and "<tr><td>29</td>" in html
    # a toy is read without a BOS (it was trained without one): position 0 is its first character, and says so
    toy = R.dashboards_page(replace(r, induction_bos=False))
    assert "<span>⟨BOS⟩</span>" not in toy and "On a start token (↵: this model has no BOS) + 2 random tokens" in toy
    summary = " ".join(LS.summary_lines(r))
    assert f"1 with a firing rate at least {R.INDUCTION_MARGIN:g} higher on the repeat" in summary  # one criterion
