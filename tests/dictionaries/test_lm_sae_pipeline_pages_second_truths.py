"""The language wing's dictionary pipelines and pages, a further pass: the contexts a dashboard cuts around a row,
which latents are shown and why, the dashboards' and evaluation's written JSON and pages, what training saves,
where a resumed harvest restarts, and the pages' sentences for a transcoder and a model without a BOS. Each
against a truth computed outside the code: a plain loop over the documented row layout (row r of a read is
position r mod (context - skip) + skip of context r div (context - skip)), hand counts on planted dictionaries,
the JSON read back with json, the pages parsed with html.parser (``Page``) and figures' artists read back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mechscope.core.dictionaries import DictionaryConfig, SparseDictionary, save_saelens
from mechscope.core.errors import MechscopeError
from mechscope.lm.methods import sae as S
from mechscope.lm.pipelines import sae as LS
from mechscope.lm.report import sae as R
from tests.dictionaries.test_lm_sae_second_truths import no_bos_text_model, zero_relu
from tests.unit.test_cnn_pages_truths import Page
from tests.unit.test_lm_report_truths import captured
from tests.unit.test_lm_sae_scrub_pages_truths import Spans, dashboards
from tests.unit.test_sae_lm import CHARS, text_model, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one torch thread

HOOK = "blocks.0.hook_resid_post"
TEXT = "the quick brown fox jumps over the lazy dog. " * 3


# ---- the context a dashboard cuts around one row ------------------------------------------------------------------


def hand_example(acts, row: int, toks: torch.Tensor, skip: int):
    """A plain loop over the documented layout: the row's (context, position), 12 tokens before and 4 after (inside
    the context), each position's activation looked up by its own row, 0 at the BOS."""
    per = toks.shape[1] - skip
    seq, pos = row // per, row % per + skip
    window = [p for p in range(toks.shape[1]) if pos - 12 <= p <= pos + 4]
    values = [acts[seq * per + p - skip] if p >= skip else 0.0 for p in window]
    return seq, pos, [int(toks[seq, p]) for p in window], values, window.index(pos)


@pytest.mark.parametrize("skip", [0, 1])
@pytest.mark.parametrize("row", [0, 16, 20, 37, 39])
def test_an_examples_context_is_its_rows_window_with_each_positions_own_activation(row, skip):
    """Truth: ``hand_example`` (a loop, not the code's slicing) on 2 contexts of 21 tokens whose activations are
    all distinct (row r carries 100 + r), rows at the start, the middle (12 before reachable), the end."""
    toks = torch.arange(42).reshape(2, 21)
    acts = np.arange(2 * (21 - skip), dtype=float) + 100.0
    ex = LS._example(torch.tensor(acts), row, toks, skip, str)
    seq, pos, ids, values, focus = hand_example(acts, row, toks, skip)
    assert (ex.value, ex.sequence, ex.position, ex.focus) == (100.0 + row, seq, pos, focus)
    assert ex.tokens == tuple(str(i) for i in ids)
    assert ex.acts == pytest.approx(values)


# ---- which latents are shown, and why ---------------------------------------------------------------------------


def ranking(ranked) -> S.InductionLatents:
    z = (0.0,) * len(ranked)
    return S.InductionLatents(n=2, sequences=1, seed=0, ranked=tuple(ranked), rate_first=z, rate_second=z,
                              mean_first=z, mean_second=z, tokens=(), activations=())  # fmt: skip


def test_a_latent_asked_for_stays_asked_when_it_is_also_induction_ranked():
    """Truth: the command's contract: latents asked for are shown as asked; latent 3 asked and ranked first is
    'asked', the next ranked (5) fills the induction place."""
    chosen = LS._choose((3,), ranking((3, 5)), np.full(8, 0.1), 2, 0, 0)
    assert chosen == [(3, "asked"), (5, "induction")]


@pytest.mark.parametrize("seed", range(6))
def test_the_random_draw_adds_that_many_latents_besides_those_already_chosen(seed):
    """Truth: n_random alive latents not otherwise chosen: 1 asked + 1 induction + 3 random = 5 distinct latents,
    never a dead one (latents 6 and 7 never fire), whatever the seed."""
    dens = np.array([0.2, 0.1, 0.3, 0.05, 0.4, 0.01, 0.0, 0.0])
    chosen = dict(LS._choose((0,), ranking((1,)), dens, 1, 3, seed))
    assert len(chosen) == 5 and sum(w == "random" for w in chosen.values()) == 3
    assert not {6, 7} & set(chosen)


def test_the_random_draw_follows_its_seed():
    """Truth: a seeded draw: the same seed draws the same latents twice; 8 seeds drawing 2 of 12 alive latents do
    not all draw the same pair."""
    dens = np.full(12, 0.5)
    draws = [tuple(LS._choose((), ranking(()), dens, 0, 2, s)) for s in range(8)]
    assert draws[3] == tuple(LS._choose((), ranking(()), dens, 0, 2, 3))
    assert len(set(draws)) > 1


# ---- summary sentences ---------------------------------------------------------------------------------------------


def test_a_transcoders_summary_names_both_hooks_and_writes_thousands_with_commas():
    """Truth: the sentence written by hand for a batchtopk transcoder of 16,384 latents read on 12,345 positions,
    1 of 8 latents dead (12.5%), latent 7 ranked first (90% / 10%) above latent 3."""
    ind = S.InductionLatents(n=2, sequences=1, seed=0, ranked=(7, 3), rate_first=(0.1, 0.0), rate_second=(0.9, 0.1),
                             mean_first=(0.0, 0.0), mean_second=(0.0, 0.0), tokens=(), activations=())  # fmt: skip
    r = dashboards(architecture="batchtopk", hook="blocks.0.mlp.hook_in", target="blocks.0.hook_mlp_out", model="tm",
                   d_sae=16384, tokens=12345, text="t.txt", dead_fraction=0.125, induction=ind)  # fmt: skip
    assert LS.summary_lines(r) == [
        "batchtopk transcoder of 16,384 latents on blocks.0.mlp.hook_in -> blocks.0.hook_mlp_out of tm",
        "read on 12,345 positions of t.txt: 12.5% of the latents never fire",
        "induction-like latents (fire on the repeat of random tokens, not on the first copy): 1 with a firing rate at "
        "least 0.2 higher on the repeat; the top one, 7, fires on 90% of repeated tokens and 10% of first-copy tokens",
    ]


# ---- the dashboards as written ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shown(tmp_path_factory):
    """A relu dictionary of 5 latents on blocks.0.hook_resid_post: latent 0 fires everywhere (bias 1), latents 1-4
    never (bias -1, no weights), so 4 of 5 are dead; 3 contexts of BOS + 9 characters read."""
    tmp = tmp_path_factory.mktemp("show")
    sae = zero_relu(16, 5)
    with torch.no_grad():
        sae.b_enc[0], sae.b_enc[1:] = 1.0, -1.0
    sae_dir = save_saelens(sae.eval(), tmp / "sae", hook_name=HOOK, model_name="tiny-7")
    text = tmp / "t.txt"
    text.write_text(TEXT)
    out, r = LS.sae_show("tiny", sae_dir, tmp / "dash", text, LS.ReadSettings(context=10, contexts=3),
                         model=text_model(tiny_model()), latents=(2,), n_random=3, n_induction=0,
                         progress=False)  # fmt: skip
    return out, r


def test_the_dashboards_json_counts_the_dead_latents_and_the_positions(shown):
    """Truth: hand counts: 4 of 5 latents never fire (0.8); 3 x 9 = 27 positions after the BOS; dashboards.json
    read back with json says the same, 3 contexts of 10 tokens each."""
    out, r = shown
    d = json.loads((out / "dashboards.json").read_text())
    assert (d["dead_fraction"], d["tokens"], d["contexts"], d["context"]) == (0.8, 27, 3, 10)
    assert r.dead_fraction == 0.8 and "80.0% of the latents never fire" in r.summary[1]
    assert {b["latent"]: b["why"] for b in d["latents"]} == {2: "asked", 0: "random"}


def test_the_dashboards_page_states_the_read_and_the_model_named_in_cfg_json(shown):
    """Truth: the page parsed with html.parser: 27 positions, 3 contexts of 10 tokens, cfg.json's model_name."""
    out, _ = shown
    html = (out / "report.html").read_text()
    assert "read on 27 positions (3 contexts of 10 tokens from the end of" in html
    assert "its cfg.json names the model it was trained on: tiny-7" in html
    assert "→" not in html.split("</h1>")[0]  # an SAE: one hook in the heading


def test_a_dashboards_logit_effect_promotes_and_suppresses_the_planted_tokens(tmp_path):
    """Truth: a planted unembedding: residual dimension 3 raises 'q' by 5 and lowers 'z' by 5 (other weights sd
    0.3); latent 0 (firing everywhere) writes along dimension 3, so 'q' heads its promoted and 'z' its suppressed."""
    model = tiny_model(4, tie_embeddings=False)
    q, z = CHARS.index("q") + 1, CHARS.index("z") + 1
    with torch.no_grad():
        model.W_U_untied[3] = 0.0
        model.W_U_untied[3, q], model.W_U_untied[3, z] = 5.0, -5.0
    sae = zero_relu(16, 2)
    with torch.no_grad():
        sae.b_enc[0], sae.b_enc[1], sae.W_dec[0, 3] = 1.0, -1.0, 1.0
    sae_dir = save_saelens(sae.eval(), tmp_path / "sae", hook_name=HOOK)
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    _, r = LS.sae_show("tiny", sae_dir, tmp_path / "dash", text, LS.ReadSettings(context=10, contexts=2),
                       model=text_model(model), latents=(0,), n_random=0, n_induction=0, progress=False)  # fmt: skip
    (board,) = r.latents
    assert (board.promoted[0][0], board.suppressed[0][0]) == ("q", "z")
    assert board.promoted[0][1] > 4 and board.suppressed[0][1] < -4


def test_dashboards_read_256_contexts_by_default(tmp_path):
    """Truth: the CLI's documented default for lm sae show, --contexts 256 (of 32 tokens: the model's context)."""
    sae_dir = save_saelens(zero_relu(16, 2).eval(), tmp_path / "sae", hook_name=HOOK)
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 70)  # 9,450 characters: more than 256 x 31
    _, r = LS.sae_show("tiny", sae_dir, tmp_path / "dash", text, model=text_model(tiny_model()), n_random=0,
                       n_induction=0, progress=False)  # fmt: skip
    assert (r.contexts, r.context, r.tokens) == (256, 32, 256 * 31)


# ---- the evaluation as written ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """The same 1-alive-of-4 dictionary (latent 0 bias 1) evaluated on a model read without a BOS, 3 contexts of
    8 characters."""
    tmp = tmp_path_factory.mktemp("eval")
    sae = zero_relu(16, 4)
    with torch.no_grad():
        sae.b_enc[0], sae.b_enc[1:] = 1.0, -1.0
    sae_dir = save_saelens(sae.eval(), tmp / "sae", hook_name=HOOK)
    text = tmp / "t.txt"
    text.write_text(TEXT)
    mp = pytest.MonkeyPatch()
    figures = captured(mp, R)
    try:
        out, e = LS.sae_evaluate("tiny", sae_dir, tmp / "ev", text, LS.ReadSettings(context=8, contexts=3),
                                 model=no_bos_text_model(tiny_model()), progress=False)  # fmt: skip
    finally:
        mp.undo()
    return out, e, figures


def test_an_evaluation_without_bos_splices_every_position_and_says_nothing_of_a_bos(evaluated):
    """Truth: no BOS: every one of the 3 x 8 = 24 positions is a dictionary row (skip_first 0), read back from
    evaluation.json with json; the page does not claim a BOS position is left alone."""
    out, _, _ = evaluated
    d = json.loads((out / "evaluation.json").read_text())
    assert (d["skip_first"], d["contexts"], d["context"], d["metrics"]["tokens"]) == (0, 3, 8, 24)
    assert "BOS position" not in (out / "report.html").read_text()


def test_an_evaluations_dead_share_and_density_figure_count_three_of_four(evaluated):
    """Truth: 3 of the 4 latents never fire: the table's dead cell 75.0%, the density figure titled 3 of 4 dead with
    one latent histogrammed (density 1: log10 = 0)."""
    out, _, figures = evaluated
    (row,) = Page((out / "report.html").read_text()).table("positions")
    assert (row["positions"], row["dead"]) == ("24", "75.0%")
    (ax,) = figures[0].axes
    assert ax.get_title().endswith(": 3 of 4 dead")
    assert sum(p.get_height() for p in ax.patches) == 1


def test_a_bos_models_evaluation_page_says_the_bos_is_left_alone(tmp_path):
    """Truth: the model reads BOS + 7 characters: skip_first 1, 3 x 7 = 21 rows, and the page says so."""
    sae_dir = save_saelens(zero_relu(16, 4).eval(), tmp_path / "sae", hook_name=HOOK)
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out, e = LS.sae_evaluate("tiny", sae_dir, tmp_path / "ev", text, LS.ReadSettings(context=8, contexts=3),
                             model=text_model(tiny_model()), progress=False)  # fmt: skip
    assert (e.skip_first, e.metrics["tokens"]) == (1, 21)
    assert "the BOS position is left as it is" in (out / "report.html").read_text()


# ---- loading a dictionary ----------------------------------------------------------------------------------------


def test_a_target_given_overrides_the_one_a_transcoders_cfg_json_names(tmp_path):
    """Truth: load_dictionary's contract: ``target`` overrides cfg.json's hook_name_out; without it, cfg.json's."""
    tc = SparseDictionary(DictionaryConfig(d_in=16, d_sae=8, transcoder=True, d_out=16)).eval()
    d = save_saelens(tc, tmp_path / "tc", hook_name="blocks.0.mlp.hook_in", hook_name_out="blocks.0.hook_mlp_out")
    assert LS.load_dictionary(d, target="blocks.1.hook_mlp_out")[2] == "blocks.1.hook_mlp_out"
    assert LS.load_dictionary(d)[2] == "blocks.0.hook_mlp_out"


def test_trained_on_is_a_named_string_or_nothing():
    """Truth: the docstring: "" when cfg.json names no model, or not as a string."""
    assert (LS.trained_on({"model_name": "gpt2"}), LS.trained_on({"model_name": 3}), LS.trained_on({})) == (
        "gpt2", "", "")  # fmt: skip


def test_refusals_name_the_option_at_fault(tmp_path):
    """Truth: the documented refusals, one line each: a hook harvested twice (as a hook and a transcoder input),
    0 contexts to read, a cfg.json without hook_name, a transcoder's without hook_name_out."""
    twice = LS.HarvestSettings(hooks=(HOOK, HOOK))
    with pytest.raises(MechscopeError, match="a hook is asked for twice"):
        twice.specs()
    with pytest.raises(MechscopeError, match="--contexts must be a positive integer, got 0"):
        LS.ReadSettings(contexts=0).validate()
    d = save_saelens(zero_relu(16, 2).eval(), tmp_path / "sae", hook_name="")
    with pytest.raises(MechscopeError, match="names no hook_name; pass --hook"):
        LS.load_dictionary(d)
    tc = SparseDictionary(DictionaryConfig(d_in=16, d_sae=8, transcoder=True, d_out=16)).eval()
    d = save_saelens(tc, tmp_path / "tc", hook_name="blocks.0.mlp.hook_in")
    with pytest.raises(MechscopeError, match="names no hook_name_out; pass --target"):
        LS.load_dictionary(d)


# ---- a resumed harvest, and what training saves ------------------------------------------------------------------


def test_a_resumed_harvest_restarts_at_the_last_whole_context_every_store_holds(tmp_path, monkeypatch):
    """Truth: stores holding 70 and 50 rows of 8-row contexts: the least (50) rounded down to whole contexts, 48."""
    held = {"a": 70, "b": 50}
    monkeypatch.setattr(LS, "claim_stage", lambda stage, record: None)
    monkeypatch.setattr(LS, "stored_rows", lambda path: held[path.name])
    specs = [S.HarvestSpec("a"), S.HarvestSpec("b")]
    assert LS._prepare_stage(tmp_path, {}, specs, 8) == 48


@pytest.fixture(scope="module")
def harvested(tmp_path_factory):
    """A harvest of a transcoder pair across blocks (blocks.0.hook_resid_post -> blocks.1.hook_mlp_out)."""
    tmp = tmp_path_factory.mktemp("harvest")
    text = tmp / "t.txt"
    text.write_text(TEXT)
    settings = LS.HarvestSettings(transcoders=((HOOK, "blocks.1.hook_mlp_out"),), context=9, contexts=4,
                                  shard_rows=64, batch=4)  # fmt: skip
    out, _ = LS.sae_harvest("tiny", tmp / "h", text, settings, model=text_model(tiny_model()), progress=False)
    return out


def test_a_transcoder_across_blocks_saves_each_hooks_own_layer(harvested, tmp_path):
    """Truth: the layers in the hook names: blocks.0... is layer 0, blocks.1.hook_mlp_out layer 1 (SAELens' cfg)."""
    out, _ = LS.sae_train(harvested, tmp_path / "tc", d_sae=24, k=2, batch_size=16, steps=2, progress=False)
    cfg = json.loads((out / "cfg.json").read_text())
    assert (cfg["hook_name"], cfg["hook_layer"]) == (HOOK, 0)
    assert (cfg["hook_name_out"], cfg["hook_layer_out"]) == ("blocks.1.hook_mlp_out", 1)


def test_batchtopk_training_keeps_its_k_and_normalises_by_default(harvested, tmp_path):
    """Truth: the options asked: batchtopk with k 3 keeps k 3; the default normalisation is SAELens'
    expected_average_only_in, and --no-normalize is none."""
    _, t = LS.sae_train(harvested, tmp_path / "a", architecture="batchtopk", d_sae=24, k=3, batch_size=16, steps=2,
                        progress=False)  # fmt: skip
    assert (t.config["k"], t.config["normalize_activations"]) == (3, "expected_average_only_in")
    _, t = LS.sae_train(harvested, tmp_path / "b", architecture="relu", d_sae=24, normalize=False, batch_size=16,
                        steps=2, progress=False)  # fmt: skip
    assert (t.config["k"], t.config["normalize_activations"]) == (None, "none")


# ---- pages: a transcoder, a model without a BOS, the training curves ------------------------------------------------


def test_a_model_without_bos_shows_its_start_token_not_a_bos(monkeypatch):
    """Truth: the induction sequences start with the model's first token ("<s>", not a BOS): the sentence and the
    contexts' first span say so; a transcoder's heading names both hooks."""
    captured(monkeypatch, R)
    r = dashboards(induction_bos=False, target="blocks.0.hook_mlp_out")
    html = R.dashboards_page(r)
    assert "On a start token (&lt;s&gt;: this model has no BOS) + 2 random tokens" in html
    div = html.split("on the first sequence (the second half repeats the first):</p>")[1]
    assert Spans(div.split("</div>")[0]).spans[0][2] == "<s>"
    assert "on blocks.0.hook_resid_post → blocks.0.hook_mlp_out</h1>" in html


def test_the_training_curves_plot_l0_and_explained_variance_each_under_its_title(monkeypatch):
    """Truth: the hand-made history: L0 40 -> 20 and explained variance 0.1 -> 0.7, at steps 1 and 5."""
    figs = captured(monkeypatch, R)
    hist = ({"step": 1, "loss": 9.0, "l0": 40.0, "explained_variance": 0.1},
            {"step": 5, "loss": 3.0, "l0": 20.0, "explained_variance": 0.7})  # fmt: skip
    R.training_curve_uri(hist)
    got = {ax.get_title(): (list(ax.get_lines()[0].get_xdata()), list(ax.get_lines()[0].get_ydata()))
           for ax in figs[0].axes}  # fmt: skip
    assert got == {"loss": ([1, 5], [9.0, 3.0]), "L0": ([1, 5], [40.0, 20.0]),
                   "explained variance": ([1, 5], [0.1, 0.7])}  # fmt: skip
