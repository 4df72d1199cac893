"""The language wing's sparse dictionaries, second pass: harvest records, what training saves, the dashboards'
densities and examples, the induction record, neuron comparisons and logit effects, each against a truth
computed outside the code (hand counts on planted models and texts, numpy, SAELens' definitions: a dead latent
never fires in the window read; loss = mean next-token cross-entropy over every prediction)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mechscope.core.dictionaries import DictionaryConfig, SparseDictionary, save_saelens
from mechscope.lm.methods import sae as S
from mechscope.lm.pipelines import sae as LS
from mechscope.lm.pipelines.neurons import TextModel
from tests.unit.test_sae_lm import CHARS, text_model, tiny_model, tokens
from tests.unit.test_sae_outside_truths import log_softmax

LOOKUP = {c: i + 1 for i, c in enumerate(CHARS)}
Q = LOOKUP["q"]


def zero_relu(d_in: int, d_sae: int) -> SparseDictionary:
    sae = SparseDictionary(DictionaryConfig(d_in=d_in, d_sae=d_sae, architecture="relu"))
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
    return sae


def no_bos_text_model(model) -> TextModel:
    """The tiny model read without a BOS (as a train-toy is): its contexts are text only."""
    tm = text_model(model)
    return TextModel(tm.model, tm.encode, tm.decode, "tiny", None)


# ---- harvest records and what training saves -----------------------------------------------------------


def harvest(tmp_path, tm, bos: bool):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 4)  # 180 characters
    settings = LS.HarvestSettings(hooks=("blocks.1.hook_resid_post",),
                                  transcoders=(("blocks.0.hook_resid_pre", "blocks.0.mlp.hook_post"),), context=9,
                                  contexts=4, shard_rows=64, batch=3, bos=bos)  # fmt: skip
    return LS.sae_harvest("tiny", tmp_path / "h", text, settings, model=tm, progress=False)


def test_harvest_of_a_model_read_without_bos_keeps_every_position(tmp_path):
    """Truth: 4 contexts of 9 characters and no BOS (the model has none): 36 positions run, 36 rows per store,
    nothing skipped; a transcoder pair's d_out is its target's width (d_mlp = 32), the store holds both (16 + 32)."""
    _, h = harvest(tmp_path, no_bos_text_model(tiny_model()), bos=True)
    assert (h.skip_first, h.bos, h.contexts, h.context, h.tokens, h.rows) == (0, None, 4, 9, 36, 36)
    sae_store, tc_store = h.stores
    assert (sae_store["d_in"], sae_store["d_out"], sae_store["width"]) == (16, 16, 16)
    assert (tc_store["d_in"], tc_store["d_out"], tc_store["width"]) == (16, 32, 48)
    assert tc_store["rows"] == 36


def test_harvest_asked_without_bos_records_none_and_runs_every_position(tmp_path):
    """Truth: the model has a BOS, but --no-bos reads 4 contexts of 9 text characters: 36 positions, 36 rows, and
    the record says no BOS was prepended."""
    _, h = harvest(tmp_path, text_model(tiny_model()), bos=False)
    assert (h.skip_first, h.bos, h.tokens, h.rows) == (0, None, 36, 36)


def test_harvest_with_bos_counts_the_bos_in_tokens_not_in_rows(tmp_path):
    """Truth: 4 contexts of BOS + 8 characters: 36 positions run (the documented ``tokens``, BOS included), 32 rows."""
    _, h = harvest(tmp_path, text_model(tiny_model()), bos=True)
    assert (h.skip_first, h.bos, h.tokens, h.rows) == (1, 0, 36, 32)


def test_training_saves_the_harvests_layer_context_and_bos_in_saelens_cfg(tmp_path):
    """Truth: SAELens' cfg.json fields for a store of blocks.1.hook_resid_post harvested in 9-token contexts with no
    BOS: hook_layer 1, context_size 9, prepend_bos false."""
    out, _ = harvest(tmp_path, no_bos_text_model(tiny_model()), bos=True)
    sae_dir, _ = LS.sae_train(out / "blocks.1.hook_resid_post", tmp_path / "sae", d_sae=24, k=2, batch_size=16,
                              steps=2, progress=False)  # fmt: skip
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    assert (cfg["hook_name"], cfg["hook_layer"], cfg["context_size"], cfg["prepend_bos"]) == (
        "blocks.1.hook_resid_post", 1, 9, False)  # fmt: skip


def test_expansion_defaults_to_eight_latents_per_input_dimension():
    """Truth: the CLI's documented default, --expansion 8: d_in 16 gives 128 latents; 3 gives 48."""
    assert LS.dictionary_config(16).d_sae == 128
    assert LS.dictionary_config(16, expansion=3).d_sae == 48


def test_evaluation_reads_the_last_contexts_of_the_text(tmp_path):
    """Truth: the text cut by hand: 2 contexts of BOS + 7 characters from the end of 'abc...z' * 2 (its last 14)."""
    text = tmp_path / "t.txt"
    text.write_text("abcdefghijklmnopqrstuvwxyz" * 2)
    toks, _ = LS._contexts(text_model(tiny_model()), text, 8, True, 2, tail=True)
    tail = [LOOKUP[c] for c in ("abcdefghijklmnopqrstuvwxyz" * 2)[-14:]]
    assert toks.tolist() == [[0, *tail[:7]], [0, *tail[7:]]]


# ---- the spliced-in loss without a BOS -----------------------------------------------------------------------


def test_loss_without_bos_is_the_mean_over_every_next_token_prediction():
    """Truth: numpy log-softmax of the clean logits, the mean of -log p(next token) over the 3 x 9 predictions of 3
    contexts of 10 tokens (skip_first 0: no BOS, every position spliced)."""
    model, toks = tiny_model(2, bos_token_id=None), tokens(3, 10, 4)
    with torch.no_grad():
        logits = model(toks).double().numpy()
    lp = log_softmax(logits[:, :-1])
    by_hand = -np.mean([lp[b, p, toks[b, p + 1]] for b in range(3) for p in range(9)])
    sae = zero_relu(16, 4)
    effect, _ = S.splice_effect(model, toks, sae.eval(), "blocks.0.hook_resid_post", None, skip_first=0, batch=2)
    assert effect.loss_clean == pytest.approx(by_hand, rel=1e-9)
    assert effect.tokens == 30


# ---- the induction record -----------------------------------------------------------------------------------


def planted_induction_model(n: int):
    """Dimension 3 of the residual entering block 0 is 1 on the second copy's positions; dimension 4 is 1 on even
    token ids."""
    model = tiny_model(6)
    with torch.no_grad():
        model.W_E[:, 3] = 0.0
        model.W_E[:, 4] = (torch.arange(model.cfg.d_vocab) % 2 == 0).float()
        model.W_pos[:, 3:5] = 0.0
        model.W_pos[n + 1 : 2 * n + 1, 3] = 1.0
    return model


def test_induction_activations_are_those_of_the_first_sequence():
    """Truth: latent 0 fires 0.5 on the second copy's even tokens: on the first sequence (whose tokens the record
    gives) it reads 0.5 exactly where p > n and the token is even, counted here position by position."""
    n = 6
    sae = zero_relu(16, 2)
    with torch.no_grad():
        sae.W_enc[3, 0], sae.W_enc[4, 0], sae.b_enc[0] = 1.0, 1.0, -1.5
        sae.b_enc[1] = -1.0
    r = S.induction_latents(planted_induction_model(n), sae.eval(), "blocks.0.hook_resid_pre", n=n, sequences=6,
                            seed=3)  # fmt: skip
    hand = [0.5 if p > n and t % 2 == 0 else 0.0 for p, t in enumerate(r.tokens)]
    assert r.ranked == (0,)
    assert r.activations[0] == pytest.approx(hand, abs=1e-6)


def test_induction_ranking_keeps_at_most_fifty():
    """Truth: the record's documented cap: 60 latents all firing on the whole second copy only (score 1 each) rank
    as the first 50 by index (ties kept in order)."""
    n = 5
    sae = zero_relu(16, 60)
    with torch.no_grad():
        sae.W_enc[3, :] = 1.0
        sae.b_enc[:] = -0.5
    r = S.induction_latents(planted_induction_model(n), sae.eval(), "blocks.0.hook_resid_pre", n=n, sequences=2)
    assert r.ranked == tuple(range(50))
    assert r.rate_second == (1.0,) * 50 and r.rate_first == (0.0,) * 50


# ---- neuron comparison and logit effects ---------------------------------------------------------------------


def planted_rows(d_in: int, rows: dict[int, torch.Tensor], d_sae: int = 4) -> SparseDictionary:
    sae = zero_relu(d_in, d_sae)
    with torch.no_grad():
        for i, row in rows.items():
            sae.W_dec[i] = row
    return sae


def test_coordinates_of_an_mlp_post_latent_are_ranked_by_size_with_their_signed_share():
    """Truth: a decoder row 3 on neuron 0, -4 on neuron 1 (norm 5): by size neuron 1 (-0.8), then neuron 0 (0.6)."""
    row = torch.zeros(32)
    row[0], row[1] = 3.0, -4.0
    out = S.neuron_comparison(tiny_model(), planted_rows(32, {2: row}), "blocks.0.mlp.hook_post", None, [2], k=2)
    assert [name for name, _ in out[2]] == ["neuron 1", "neuron 0"]
    assert [v for _, v in out[2]] == pytest.approx([-0.8, 0.6], abs=1e-6)


def test_the_residual_before_block_0_is_written_by_no_mlp():
    """Truth: blocks.0.hook_resid_pre holds the embeddings only, so no MLP neuron is named; the largest coordinates
    are (3 on dim 5, -4 on dim 9: dim 9 first, -0.8)."""
    row = torch.zeros(16)
    row[5], row[9] = 3.0, -4.0
    out = S.neuron_comparison(tiny_model(), planted_rows(16, {1: row}), "blocks.0.hook_resid_pre", None, [1], k=2)
    assert out[1] == [("dim 9", pytest.approx(-0.8, abs=1e-6)), ("dim 5", pytest.approx(0.6, abs=1e-6))]


@pytest.mark.parametrize("layer", [0, 1])
def test_a_resid_post_latent_along_an_mlp_output_names_that_blocks_neuron(layer):
    """Truth: the decoder row is neuron 7's output column (W_out) of block ``layer``: the MLP writing into
    blocks.L.hook_resid_post is block L's, and the cosine with its own column is 1."""
    model = tiny_model(9)
    col = model.blocks[layer].mlp.down.weight.detach()[:, 7].clone()
    out = S.neuron_comparison(model, planted_rows(16, {0: col}), f"blocks.{layer}.hook_resid_post", None, [0], k=1)
    assert out[0] == [(f"neuron {layer}.7", pytest.approx(1.0, abs=1e-5))]


def test_logit_effects_default_to_the_ten_most_promoted_and_suppressed_tokens():
    """Truth: numpy argsort of the direction times the unembedding: the 10 largest and the 10 smallest, in order."""
    g = torch.Generator().manual_seed(5)
    unembed, direction = torch.randn(16, 40, generator=g), torch.randn(1, 16, generator=g)
    e = (direction.double().numpy() @ unembed.double().numpy())[0]
    eff = S.logit_effects(direction, unembed, [0])[0]
    assert list(eff.promoted) == list(np.argsort(-e)[:10])
    assert list(eff.suppressed) == list(np.argsort(e)[:10])
    assert eff.suppressed_values == pytest.approx(np.sort(e)[:10], abs=1e-5)


# ---- the dashboards on a planted model and text ---------------------------------------------------------------


@pytest.fixture(scope="module")
def shown(tmp_path_factory):
    """Block 0's residual: dimension 3 is 1 on 'q' only, dimension 4 is 1 on positions 16..30 (the induction
    sequences' second copy, n = 15). Latents: 0 = 0.5 on 'q', 1 = 1 everywhere, 2 = 0.5 on positions 16..30, 3-5
    never fire. The text: 40 contexts of BOS + 31 characters, 'abab...' with one 'q' at context 5's first text
    position."""
    tmp = tmp_path_factory.mktemp("show")
    model = tiny_model(3)
    with torch.no_grad():
        model.W_E[:, 3:5] = 0.0
        model.W_pos[:, 3:5] = 0.0
        model.W_E[Q, 3] = 1.0
        model.W_pos[16:31, 4] = 1.0
    sae = zero_relu(16, 6)
    with torch.no_grad():
        sae.W_enc[3, 0], sae.b_enc[0] = 1.0, -0.5
        sae.b_enc[1] = 1.0
        sae.W_enc[4, 2], sae.b_enc[2] = 1.0, -0.5
        sae.b_enc[3:] = -1.0
    sae_dir = save_saelens(sae.eval(), tmp / "sae", hook_name="blocks.0.hook_resid_pre")
    chars = list("ab" * 620)
    chars[31 * 5] = "q"
    text = tmp / "t.txt"
    text.write_text("".join(chars))
    _, r = LS.sae_show("tiny", sae_dir, tmp / "dash", text, LS.ReadSettings(context=32, contexts=40),
                       model=text_model(model), latents=(0,), n_random=6, n_induction=1, progress=False)  # fmt: skip
    return r


def test_dead_latents_are_those_that_never_fire_in_the_window(shown):
    """Truth: hand counts over the 40 x 31 rows: 'q' once (1/1240), latent 1 everywhere, latent 2 on 15 of each 31
    positions; latents 3-5 never fire: 3 of 6 dead (a latent firing once is alive)."""
    assert shown.tokens == 1240
    assert shown.densities == pytest.approx([1 / 1240, 1.0, 15 / 31, 0.0, 0.0, 0.0], abs=1e-12)
    assert shown.dead_fraction == 0.5
    assert "1,240 positions of" in shown.summary[1] and "50.0% of the latents never fire" in shown.summary[1]


def test_random_latents_are_drawn_among_the_alive_ones(shown):
    """Truth: 0 asked, 2 the only induction-ranked latent, so of the alive latents only 1 is left to draw."""
    assert {b.latent: b.why for b in shown.latents} == {0: "asked", 2: "induction", 1: "random"}


def test_a_top_context_shows_the_first_text_position_with_its_activation(shown):
    """Truth: the single 'q' sits at context 5, position 1 (right after the BOS): its context is the BOS and the
    4 tokens after it (the page: 12 before and 4 after), the 'q' carrying 0.5, the others 0."""
    board = next(b for b in shown.latents if b.latent == 0)
    ex = board.top[0]
    assert (ex.value, ex.sequence, ex.position, ex.focus) == (0.5, 5, 1, 1)
    assert ex.tokens == ("^", "q", "a", "b", "a", "b")
    assert ex.acts == pytest.approx((0.0, 0.5, 0.0, 0.0, 0.0, 0.0), abs=1e-7)


def test_an_induction_boards_rank_and_the_summarys_rates(shown):
    """Truth: latent 2 fires on every repeated token (positions 16..30) and on no first-copy token: ranked first
    (rank 1, counted from one), the summary says 100% of repeated and 0% of first-copy tokens."""
    board = next(b for b in shown.latents if b.latent == 2)
    assert board.induction["rank"] == 1
    assert (board.induction["rate_first"], board.induction["rate_second"]) == (0.0, 1.0)
    assert (board.induction["mean_first"], board.induction["mean_second"]) == pytest.approx((0.0, 0.5), abs=1e-7)
    assert shown.summary[0] == "relu SAE of 6 latents on blocks.0.hook_resid_pre of tiny"
    assert "the top one, 2, fires on 100% of repeated tokens and 0% of first-copy tokens" in shown.summary[2]


def test_only_the_asked_number_of_induction_latents_is_shown():
    """Truth: --induction 1 shows the top of the ranking (4), not the second (9); nothing random is asked."""
    ind = S.InductionLatents(n=2, sequences=1, seed=0, ranked=(4, 9), rate_first=(0.0, 0.0), rate_second=(0.9, 0.8),
                             mean_first=(0.0, 0.0), mean_second=(0.0, 0.0), tokens=(), activations=())  # fmt: skip
    assert LS._choose((), ind, np.full(12, 0.5), 1, 0, 0) == [(4, "induction")]


def test_a_model_read_without_bos_is_shown_without_skipping_and_says_so(tmp_path):
    """Truth: no BOS prepended (a toy's text): 2 contexts x 8 characters = 16 positions read, and position 0 of
    the induction sequences is not called a BOS."""
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 3)
    sae_dir = save_saelens(zero_relu(16, 4).eval(), tmp_path / "sae", hook_name="blocks.0.hook_resid_post")
    _, r = LS.sae_show("tiny", sae_dir, tmp_path / "dash", text, LS.ReadSettings(context=8, contexts=2),
                       model=no_bos_text_model(tiny_model()), n_random=0, n_induction=0, progress=False)  # fmt: skip
    assert (r.tokens, r.induction_bos) == (16, False)


def test_the_summary_counts_a_difference_of_exactly_the_margin():
    """Truth: the criterion is 'at least 0.2 higher': rates 0 -> 0.2 meet it (exactly), 0.1 -> 0.25 does not."""
    ind = S.InductionLatents(n=2, sequences=1, seed=0, ranked=(4, 9), rate_first=(0.0, 0.1), rate_second=(0.2, 0.25),
                             mean_first=(0.0, 0.0), mean_second=(0.0, 0.0), tokens=(), activations=())  # fmt: skip
    r = S.LmSaeDashboards(model="m", dictionary="d", hook="blocks.0.hook_resid_pre", target=None, architecture="relu",
                          d_in=16, d_sae=6, text="t", contexts=1, context=8, tokens=7, dead_fraction=0.25,
                          logit_effect="", induction=ind, induction_tokens=(), latents=(), summary=(),
                          seconds={})  # fmt: skip
    lines = LS.summary_lines(r)
    assert "25.0% of the latents never fire" in lines[1]
    assert "1 with a firing rate at least 0.2 higher on the repeat" in lines[2]


# ---- evaluate: the dictionary's work, and a hook given over cfg.json's -----------------------------------------


def test_evaluation_counts_two_dictionary_passes_over_the_rows_after_the_bos(tmp_path):
    """Truth: 3 contexts of BOS + 7 characters: the dictionary sees 3 x 7 = 21 rows, twice (spliced in, and for
    the reconstruction metrics): 2 passes of 21 rows."""
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 3)
    sae_dir = save_saelens(zero_relu(16, 4).eval(), tmp_path / "sae", hook_name="blocks.0.hook_resid_post")
    _, e = LS.sae_evaluate("tiny", sae_dir, tmp_path / "ev", text, LS.ReadSettings(context=8, contexts=3),
                           model=text_model(tiny_model()), progress=False)  # fmt: skip
    work = e.work["dictionary"]
    assert (work["rows_per_pass"], work["forward_passes"]) == (21, pytest.approx(2.0))


def test_a_hook_given_overrides_the_one_cfg_json_names(tmp_path):
    """Truth: load_dictionary's contract: ``hook`` overrides cfg.json's hook_name; without it, cfg.json's is used."""
    sae_dir = save_saelens(zero_relu(16, 4).eval(), tmp_path / "sae", hook_name="blocks.0.hook_resid_pre")
    assert LS.load_dictionary(sae_dir, "blocks.1.hook_resid_post")[1] == "blocks.1.hook_resid_post"
    assert LS.load_dictionary(sae_dir)[1] == "blocks.0.hook_resid_pre"
