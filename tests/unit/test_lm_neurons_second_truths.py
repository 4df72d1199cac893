"""`lm neurons`, second pass, against outside truths: activations captured by plain torch forward hooks (GELU written
out in numpy, SoLU's LayerNorm module's own output), top-k by numpy argsort, firing counts and windows cut by hand
from hand-built token grids, percentiles from the ``statistics`` module, and hand-made results whose summary figures
are written out."""

from __future__ import annotations

import math
import statistics
from dataclasses import replace

import numpy as np
import pytest
import torch

from mechscope.core.errors import MechscopeError
from mechscope.lm.methods.neurons import (
    Concentration,
    LayerNeurons,
    NeuronsResult,
    check_k,
    check_neuron_model,
    max_entropy_bits,
    random_baseline,
    read_neurons,
    top_activations,
)
from mechscope.lm.pipelines.neurons import NeuronSettings, TextModel, _entry, analyse, check_neurons_asked, text_sample
from tests.unit.test_folding import random_model
from tests.unit.test_neurons import P, constructed_model
from tests.unit.test_sentences_neurons import BASELINE, SAMPLE

TRIGGER, BEFORE = 5, 3  # constructed_model's neuron 0 is positive on token 5 only


def gelu_new(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def captured(model, tokens: torch.Tensor, module_of) -> dict[int, np.ndarray]:
    """Per layer, the output of ``module_of(block)`` on a plain forward, read with torch's own forward hooks."""
    got, handles = {}, []
    for i, block in enumerate(model.blocks):
        handles.append(module_of(block).register_forward_hook(lambda _m, _i, o, i=i: got.__setitem__(i, o.detach())))
    with torch.no_grad():
        model(tokens)
    for h in handles:
        h.remove()
    return {i: v.double().numpy() for i, v in got.items()}


def test_top_activations_are_numpy_argsort_of_hand_computed_gelu():
    """Truth: hook_post of a gelu_new MLP = gelu_new(up(x)), the pre-activation read by a torch forward hook on the
    Linear and GELU's tanh formula in numpy; after the BOS column, each neuron's k largest by numpy argsort, their
    (sequence, position) by divmod, ``max`` the largest, ``mean`` and ``density`` over the counted positions."""
    model = random_model(seed=1).eval()
    tokens = torch.randint(0, 50, (11, 16), generator=torch.Generator().manual_seed(7))
    pre = captured(model, tokens, lambda b: b.mlp.up)
    top = top_activations(model, tokens, [2, 0], k=9, batch=4, skip_first=1)
    assert top.hooks == ("blocks.2.mlp.hook_post", "blocks.0.mlp.hook_post")
    for j, layer in enumerate([2, 0]):
        act = gelu_new(pre[layer])[:, 1:]  # [11, 15, 48]
        flat = act.reshape(-1, act.shape[-1])
        for m in (0, 17, 47):
            order = np.argsort(-flat[:, m], kind="stable")[:9]
            seq, pos = np.divmod(order, 15)
            assert top.values[j, m].tolist() == pytest.approx(flat[order, m].tolist(), abs=1e-5)
            assert top.seq[j, m].tolist() == seq.tolist() and top.pos[j, m].tolist() == (pos + 1).tolist()
            assert float(top.max[j, m]) == pytest.approx(flat[:, m].max(), abs=1e-5)
        assert top.mean[j].tolist() == pytest.approx(flat.mean(0).tolist(), abs=1e-5)
        assert top.density[j].tolist() == pytest.approx((flat > 0).mean(0).tolist(), abs=1e-6)


def test_relu_zeros_are_neither_positive_nor_firing():
    """Truth: a ReLU neuron is exactly 0 wherever its pre-activation (torch hook on the Linear) is negative; the
    density counts only positive positions and a neuron's firing contexts are min(k, its positive positions)."""
    model = constructed_model("relu")
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 12, (30, P), generator=g)
    pre = captured(model, tokens, lambda b: b.mlp.up)[0]
    positive = (pre > 0).reshape(-1, 6).sum(0)
    assert (positive < 200).any() and (positive > 0).all()  # some neuron has fewer positive positions than k
    r = read_neurons(model, tokens, name="relu", k=200, min_count=1, n_contexts=0)
    lay = r.layers[0]
    assert [f.n for f in lay.figures] == np.minimum(positive, 200).tolist()
    assert list(lay.density) == pytest.approx((positive / tokens.numel()).tolist())
    assert list(lay.max) == pytest.approx(np.maximum(pre.reshape(-1, 6).max(0), 0).tolist(), abs=1e-5)


def test_solu_post_site_reads_the_layernorms_output():
    """Truth: site 'post' on a SoLU model is the output of the MLP's own LayerNorm module (a torch forward hook on
    ``mlp.ln``), not SoLU's output; its hook is hook_post."""
    model = constructed_model("solu_ln")
    tokens = torch.randint(0, 12, (8, P), generator=torch.Generator().manual_seed(5))
    ln = captured(model, tokens, lambda b: b.mlp.ln)[0].reshape(-1, 6)
    r = read_neurons(model, tokens, name="solu", k=5, site="post", n_contexts=0)
    assert r.layers[0].hook == "blocks.0.mlp.hook_post"
    assert list(r.layers[0].max) == pytest.approx(ln.max(0).tolist(), abs=1e-5)


def test_layers_are_read_once_in_order_and_k_must_be_fewer_than_the_positions():
    """Truth: the docstring's "fewer": 4 sequences of 6 positions after a BOS are 20 counted positions, so k = 19
    passes and k = 20 is refused; layers asked twice and out of order are the sorted set."""
    model = random_model(seed=0)
    assert check_neuron_model(model, [2, 0, 2]) == [0, 2]
    tokens = torch.zeros(4, 6, dtype=torch.long)
    check_k(19, tokens, skip_first=1)
    with pytest.raises(MechscopeError, match="20 positions"):
        check_k(20, tokens, skip_first=1)
    assert max_entropy_bits(100, 12) == pytest.approx(math.log2(12))
    assert max_entropy_bits(5, 12) == pytest.approx(math.log2(5))


def grid(cells: dict[tuple[int, int], int], n: int = 20) -> torch.Tensor:
    """[n, P] of token 1 (neuron 0 silent), with the given (row, column) cells set."""
    tokens = torch.ones(n, P, dtype=torch.long)
    for (r, c), t in cells.items():
        tokens[r, c] = t
    return tokens


def test_a_trigger_at_a_windows_start_has_no_previous_token():
    """Truth: token 5 at column 0 of rows 0, 1, 2 (nothing before it: -1) and after a 3 at rows 3, 4: the previous
    tokens are [-1, -1, -1, 3, 3], so the previous token is -1 with share 3/5 and the bigram (-1, 5)."""
    cells = {(0, 0): TRIGGER, (1, 0): TRIGGER, (2, 0): TRIGGER, (3, 7): BEFORE, (3, 8): TRIGGER}
    cells |= {(4, 3): BEFORE, (4, 4): TRIGGER}
    f = read_neurons(constructed_model(), grid(cells), name="c", k=50, n_contexts=0).layers[0].figures[0]
    assert f.n == 5 and f.top_token == TRIGGER and f.top_share == 1.0
    assert f.prev_token == -1 and f.prev_share == pytest.approx(0.6)
    assert f.bigram == (-1, TRIGGER) and f.bigram_share == pytest.approx(0.6)


def test_contexts_are_windows_cut_by_hand_from_the_tokens():
    """Truth: token 5 at (2, 1) and (6, P-1) only, with before = 4 and after = 3: the windows are columns 0..4 of row
    2 (cut at the start) and P-5..P-1 of row 6 (cut at the end), their tokens the grid's own, decoded; each context's
    ``act`` its own activation."""
    cells = {(2, 0): 7, (2, 1): TRIGGER, (2, 2): 8, (2, 3): 9, (2, 4): 10, (6, P - 2): 11, (6, P - 1): TRIGGER}
    tokens = grid(cells)
    r = read_neurons(constructed_model(), tokens, name="c", k=20, n_contexts=2, before=4, after=3)
    ctxs = r.layers[0].contexts[0]
    by_seq = {c["seq"]: c for c in ctxs}
    assert sorted(by_seq) == [2, 6]
    assert by_seq[2]["pos"] == 1 and by_seq[2]["start"] == 0 and len(by_seq[2]["acts"]) == 5
    assert by_seq[6]["pos"] == P - 1 and by_seq[6]["start"] == P - 5 and len(by_seq[6]["acts"]) == 5
    assert ctxs[0]["act"] > ctxs[1]["act"] > 0  # each its own activation, the largest first
    for c in ctxs:
        assert c["acts"][c["pos"] - c["start"]] == pytest.approx(c["act"], rel=1e-3)
    d = replace(r, decoder=lambda i: f"<{i}>").to_dict()
    got = {c["seq"]: c["tokens"] for c in d["layers"][0]["contexts"][0]}
    assert got[2] == ["<7>", "<5>", "<8>", "<9>", "<10>"]
    assert got[6] == ["<1>", "<1>", "<1>", "<11>", "<5>"]


def test_decoded_previous_token_and_its_round_trip():
    """Truth: token 5 always after a 3 (hand-built): the JSON's text of the previous token is the decoder's "<3>",
    not the top token's, and neurons.json read back decodes each id (top, previous, bigram) to what was written."""
    cells = {(r, 5): TRIGGER for r in range(12)} | {(r, 4): BEFORE for r in range(12)}
    r = read_neurons(constructed_model(), grid(cells), name="c", k=30, n_contexts=0)
    d = replace(r, decoder=lambda i: f"<{i}>").to_dict()
    text = d["layers"][0]["figures"][0]["text"]
    assert text == {"top_token": "<5>", "prev_token": "<3>", "bigram": ["<3>", "<5>"]}
    back = NeuronsResult.from_dict(d)
    assert back.decoder(BEFORE) == "<3>" and back.decoder(TRIGGER) == "<5>"
    # a previous token (2) outside the bigram (4, 6): read back from its own text
    odd = hand_result((Concentration(20, 1.0, 1, 0.5, 2, 0.3, (4, 6), 0.2),))
    table = NeuronsResult.from_dict(replace(odd, decoder=lambda i: f"<{i}>").to_dict()).decoder
    assert [table(i) for i in (1, 2, 4, 6)] == ["<1>", "<2>", "<4>", "<6>"]


def test_bos_sample_is_counted_without_it():
    """Truth: after a BOS column of 0s the 49 tokens are 1..49, all distinct, so a k = 40 baseline draw holds 40
    distinct tokens: log2(40) bits in every draw (with the BOS, repeated 0s); the sample has 7 x 7 counted tokens."""
    tokens = torch.cat([torch.zeros(7, 1, dtype=torch.long), torch.arange(1, 50).view(7, 7)], 1)
    r = read_neurons(random_model(seed=0), tokens, name="r", k=40, skip_first=1, n_contexts=0)
    assert r.sample["tokens"] == 49 and r.sample["skip_first"] == 1
    assert r.baseline["entropy_p05"] == pytest.approx(math.log2(40), abs=1e-12)


def test_baseline_percentiles_are_the_statistics_modules():
    """Truth: the draws remade with numpy's Generator under the same seed, entropies in a plain loop in nats / ln 2,
    the 5th and 95th percentiles from ``statistics.quantiles`` (inclusive, as numpy's linear)."""
    tokens = torch.randint(0, 9, (10, 12), generator=torch.Generator().manual_seed(2))
    flat = tokens.reshape(-1).numpy()
    rng = np.random.default_rng(11)
    ent, share = [], []
    for _ in range(50):
        pick = flat[rng.choice(len(flat), size=30, replace=False)].tolist()
        counts = [pick.count(t) for t in set(pick)]
        ent.append(-sum(c / 30 * math.log(c / 30) for c in counts) / math.log(2))
        share.append(max(counts) / 30)
    b = random_baseline(tokens, 30, seed=11, draws=50)
    q_ent = statistics.quantiles(ent, n=20, method="inclusive")  # cut points 5%, 10%, ..., 95%
    q_share = statistics.quantiles(share, n=20, method="inclusive")
    assert b["entropy_p05"] == pytest.approx(q_ent[0]) and b["entropy_p95"] == pytest.approx(q_ent[-1])
    assert b["top_share_p95"] == pytest.approx(q_share[-1]) and b["top_share_mean"] == pytest.approx(np.mean(share))
    assert b["top_share_p95"] != pytest.approx(b["top_share_mean"])


def fig(n, e, share, prev=0.1):
    return Concentration(n, e, 1, share, 2, prev, (2, 1), 0.1)


def hand_result(*layers_figs) -> NeuronsResult:
    lays = tuple(
        LayerNeurons(i, f"blocks.{i}.mlp.hook_post", figs, (1.0,) * len(figs), (0.1,) * len(figs), ((),) * len(figs))
        for i, figs in enumerate(layers_figs)
    )
    return NeuronsResult("hand-made", 20, 10, SAMPLE, BASELINE, lays, tokens=torch.tensor([[1, 2, 1, 3]]))


def test_summary_figures_written_out():
    """Truth, by hand: counted entropies 0, 1, 2, 6 (median 1.5, mean 2.25, quartiles 0.75 and 3 by linear
    interpolation); top shares 0.5, 0.9, 0.3, 0.1: 2/4 at least 0.5 (0.5 counts), 1/4 at least 0.9 (0.9 counts);
    a pattern share, max(top, previous), at least 0.5 for 3/4 (the third's previous share 0.7); one neuron with 9 < 10
    firing contexts per layer, 2 rarely active in all."""
    r = hand_result(
        (fig(10, 0.0, 0.5), fig(20, 1.0, 0.9), fig(9, 0.0, 1.0)),
        (fig(20, 2.0, 0.3, prev=0.7), fig(20, 6.0, 0.1), fig(9, 0.0, 1.0)),
    )
    s = r.summary()["all"]
    assert s["neurons"] == 4 and s["rarely_active"] == 2 and r.summary()["layer 1"]["rarely_active"] == 1
    assert s["entropy_median"] == 1.5 and s["entropy_mean"] == 2.25 and s["entropy_quartiles"] == [0.75, 3.0]
    assert s["share_one_token_ge_0.5"] == 0.5 and s["share_one_token_ge_0.9"] == 0.25
    assert s["share_pattern_ge_0.5"] == 0.75
    assert r.figure(1, 0).pattern == "previous token" and r.figure(1, 0).pattern_share == 0.7
    assert fig(20, 1.0, 0.4, prev=0.4).pattern == "token"  # a tie is the current token's


def test_ranking_ties_and_the_solu_compare_lists():
    """Truth, by hand: neurons 0.0 and 0.1 tie at 1 bit: the higher top share (0.1: 0.8) first; 0.2 has exactly
    min_count = 10 firing contexts and counts; the least monosemantic list is that order reversed; each layer's
    hook its own."""
    r = hand_result((fig(20, 1.0, 0.4), fig(20, 1.0, 0.8), fig(10, 0.5, 0.6)), (fig(20, 3.0, 0.2),))
    assert r.ranking() == [(0, 2), (0, 1), (0, 0), (1, 0)]
    e = _entry({"label": "x"}, r)
    assert e["least_monosemantic"] == ["1.0", "0.0", "0.1", "0.2"]
    assert e["hooks"] == ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]


def text_model(bos: int | None) -> TextModel:
    model = random_model(seed=0)  # n_ctx 16, vocabulary 50
    return TextModel(model, lambda s: [ord(ch) % 50 for ch in s], str, "r", bos)


TEXT = "".join(chr(48 + int(x)) for x in np.random.default_rng(0).integers(0, 50, 400))  # seeded, aperiodic


def test_text_sample_windows_hold_the_bos_within_the_length_asked():
    """Truth: with a BOS (7) each window is 7 then a run of the text's ids cut by hand, 8 tokens in all as asked;
    without one, 8 ids of the text."""
    ids = [ord(ch) % 50 for ch in TEXT]
    for bos, run in ((7, 7), (None, 8)):
        w = text_sample(text_model(bos), TEXT, NeuronSettings(length=8, sequences=5, seed=1))
        assert w.shape == (5, 8)
        for row in w.tolist():
            body = row[1:] if bos is not None else row
            assert bos is None or row[0] == bos
            starts = [i for i in range(len(ids) - run + 1) if ids[i : i + run] == body]
            assert any(i % run == 0 for i in starts)  # a whole window of the text


def test_neurons_asked_must_exist_and_the_bos_is_skipped():
    """Truth: random_model has 48 neurons (0..47) per MLP layer; a layer not read is refused; with a BOS the
    analysis skips the first column (the sample's counted tokens are N x (P - 1), no context at position 0)."""
    model = random_model(seed=0)
    check_neurons_asked(model, NeuronSettings(layers=(1,), neurons=((1, 47),)))
    with pytest.raises(MechscopeError, match="out of range"):
        check_neurons_asked(model, NeuronSettings(layers=(1,), neurons=((1, 48),)))
    with pytest.raises(MechscopeError, match="not among the MLP layers read"):
        check_neurons_asked(model, NeuronSettings(layers=(0,), neurons=((2, 0),)))
    tm = text_model(7)
    tokens = text_sample(tm, TEXT, NeuronSettings(length=8, sequences=6))
    r = analyse(tm, tokens, NeuronSettings(layers=(0,), k=20, contexts=3), "hand")
    assert r.sample["skip_first"] == 1 and r.sample["tokens"] == 6 * 7
    assert all(c["pos"] >= 1 for ctxs in r.layers[0].contexts for c in ctxs)


def test_the_largest_settings_pass():
    """Truth: the limits are "at most": --k 100,000 passes, 100,001 is refused."""
    NeuronSettings(k=100_000).validate()
    with pytest.raises(MechscopeError, match="at most 100,000"):
        NeuronSettings(k=100_001).validate()


def test_a_length_that_leaves_one_text_token_after_the_bos_is_named_so():
    """Outside truth: a window of 2 with the model's BOS first holds 1 token of the text, and a neuron's context needs
    2; the message names what --length 2 leaves (it read "windows of at least 2 tokens, got 5 of 1"), and 3 works."""
    with pytest.raises(MechscopeError, match=r"windows of 2 tokens leave 1 of the text after the model's BOS"):
        text_sample(text_model(7), TEXT, NeuronSettings(length=2, sequences=5, seed=1))
    assert text_sample(text_model(7), TEXT, NeuronSettings(length=3, sequences=5, seed=1)).shape == (5, 3)
    assert text_sample(text_model(None), TEXT, NeuronSettings(length=2, sequences=5, seed=1)).shape == (5, 2)
