"""QK attribution (Kamath et al. 2025) and what ``lm graph`` writes of it, second pass, against outside truths: the
model's own hooks (hook_attn_scores, hook_pattern, hook_q/hook_k), the frozen LayerNorm written out by hand for each
writer on both sides, a plain ``sorted`` for the top-n lists, the node-id format of the graph for the source labels,
a hand-built induction model whose key side is carried by its previous-token head, and graph.html read back with
html.parser (the ``Page`` of the CNN page tests)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import run_with_cache
from mechscope.lm.methods.attribution_graph_qk import qk_attribution
from mechscope.lm.methods.replacement import LocalReplacement
from tests.unit.test_attribution_graph_lm import TOKENS, random_transcoders, tiny
from tests.unit.test_cnn_pages_truths import Page
from tests.unit.test_graph_pages_truths import Text
from tests.unit.test_heads import hand_built

pytestmark = pytest.mark.usefixtures("one_thread")

LABELS = [f"w{i}{'<' if i % 2 else '&'}" for i in range(len(TOKENS))]  # distinct, and each needs an HTML escape
FIELDS = ("query_sources", "key_sources", "pairs", "query_writers", "key_writers", "writer_pairs")


@pytest.fixture(scope="module")
def tiny_rep():
    model = tiny("gpt2")
    return model, LocalReplacement(model, random_transcoders(model), TOKENS, batch_size=8)


@pytest.fixture(scope="module")
def full(tiny_rep):
    return qk_attribution(tiny_rep[1], 1, 1, 7, n=100_000, labels=LABELS)


def _cache(model, names):
    with torch.no_grad():
        return run_with_cache(model, TOKENS[None], names=names)[1]


def _keyed(rows):
    return [(json.dumps({k: v for k, v in r.items() if k != "score"}), r["score"]) for r in rows]


def test_top_n_lists_are_a_plain_sort_of_every_part_by_magnitude(tiny_rep, full):
    """Truth: Python's ``sorted`` by -|score| over every part (n large), cut at n=3, for each side's list and for
    each pairs list: the pairs are the largest over every query part x key part, not only over the top parts."""
    small = qk_attribution(tiny_rep[1], 1, 1, 7, n=3, labels=LABELS)
    for field in FIELDS:
        everything = sorted(getattr(full, field), key=lambda r: -abs(r["score"]))
        assert len(everything) > 3, field
        want, got = _keyed(everything[:3]), _keyed(getattr(small, field))
        assert [w for w, _ in got] == [w for w, _ in want], field
        assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-6), field


def _moved(c, model, layer, head, pos, w_name):
    """Each hand-known writer at ``pos`` through the frozen LayerNorm of ``layer`` and the head's W_Q or W_K, in
    float64: W^T (gamma * (v - mean v) / sigma), sigma of the prompt's residual there."""
    resid = c[f"blocks.{layer}.hook_resid_pre"][0, pos].double()
    sigma = (resid.var(unbiased=False) + model.cfg.norm_eps).sqrt()
    gamma = model.blocks[layer].ln1.w.detach().double()
    w = getattr(model.blocks[layer].attn, w_name)[head].detach().double()
    vecs = {f"token embedding @{pos} {LABELS[pos]!r}": c["hook_embed"][0, pos], f"position embedding @{pos}": c[
        "hook_pos_embed"][0, pos]}  # fmt: skip
    vecs |= {f"head 0.{h}": c["blocks.0.attn.hook_result"][0, pos, h] for h in range(model.cfg.n_heads)}
    return {k: ((v.double() - v.double().mean()) / sigma * gamma) @ w for k, v in vecs.items()}


def test_writer_pairs_are_the_frozen_layernorm_products_of_the_two_sides(tiny_rep, full):
    """Truth, by hand from the hooks: a writer pair's score is (1/sqrt(d_head)) * moved_q . moved_k, each side's
    writer moved through the frozen LayerNorm and W_Q (W_K); query label first, key label second. The pairs are
    checked in both orders, so a pair read with its labels swapped disagrees."""
    model, _ = tiny_rep
    names = ["hook_embed", "hook_pos_embed", "blocks.0.attn.hook_result", "blocks.1.hook_resid_pre"]
    c = _cache(model, names)
    mq = _moved(c, model, 1, 1, full.query_pos, "W_Q")
    mk = _moved(c, model, 1, 1, full.key_pos, "W_K")
    scale = model.cfg.d_head**-0.5
    checked = 0
    for p in full.writer_pairs:
        if p["query"] in mq and p["key"] in mk:
            want = float(scale * mq[p["query"]] @ mk[p["key"]])
            assert p["score"] == pytest.approx(want, abs=1e-4), (p["query"], p["key"])
            checked += 1
    assert checked == 16 and full.query_pos != full.key_pos  # token, position, head 0.0, head 0.1 on each side


def test_layer_0_source_pair_is_the_two_embeddings_moved_by_hand(tiny_rep):
    """Truth: in layer 0 the only non-bias parts are the embedding nodes at the two positions (token plus position
    embedding); their pair is scale * moved_q . moved_k, written out from the hooks, ids E_token_pos each side."""
    model, rep = tiny_rep
    q = qk_attribution(rep, 0, 1, 6, 3, n=100_000, labels=LABELS)
    c = _cache(model, ["hook_embed", "hook_pos_embed", "blocks.0.hook_resid_pre"])
    ln, attn = model.blocks[0].ln1, model.blocks[0].attn

    def moved(pos, w):
        resid = c["blocks.0.hook_resid_pre"][0, pos].double()
        v = (c["hook_embed"][0, pos] + c["hook_pos_embed"][0, pos]).double()
        s = (resid.var(unbiased=False) + model.cfg.norm_eps).sqrt()
        return ((v - v.mean()) / s * ln.w.detach().double()) @ w[1].detach().double()

    want = float(model.cfg.d_head**-0.5 * moved(6, attn.W_Q) @ moved(3, attn.W_K))
    pair = {(p["query_id"], p["key_id"]): p["score"] for p in q.pairs}
    assert pair[(f"E_{int(TOKENS[6])}_6", f"E_{int(TOKENS[3])}_3")] == pytest.approx(want, abs=1e-4)
    assert (q.pairs[0]["query_id"], q.pairs[0]["key_id"]) == (f"E_{int(TOKENS[6])}_6", f"E_{int(TOKENS[3])}_3")
    assert pair.get((f"E_{int(TOKENS[3])}_3", f"E_{int(TOKENS[6])}_6"), 0.0) == 0.0  # the other way round: nothing
    assert len(q.pairs) == 1  # every other pair is exactly zero in layer 0, and zeros are left out


def _label_of(node_id: str) -> str:
    """The label a node id names, from the graph's id format alone (feature L_F_P, error L_-1_P, input E_T_P)."""
    a, b, p = node_id.split("_")
    p = int(p)
    if a == "E":
        assert int(b) == int(TOKENS[p])
        return f"embedding @{p} {LABELS[p]!r}"
    if b == "-1":
        return f"error L{a} @{p} {LABELS[p]!r}"
    return f"L{a} #{b} @{p} {LABELS[p]!r}"


def test_source_labels_name_what_their_ids_say(full):
    """Truth: the node-id format (core.attribution_graph.node_id) and the labels given: each source's label and each
    pair's two labels are those their ids name, with the token text at the id's position."""
    kinds = set()
    for row in full.query_sources + full.key_sources:
        assert row["label"] == _label_of(row["id"]), row
        kinds.add("E" if row["id"].startswith("E") else "err" if "_-1_" in row["id"] else "feat")
    assert kinds == {"E", "err", "feat"}
    for p in full.pairs:
        assert (p["query"], p["key"]) == (_label_of(p["query_id"]), _label_of(p["key_id"])), p
    assert any(p["query_id"].endswith("_7") and not p["key_id"].endswith("_7") for p in full.pairs)


def test_top_keys_are_the_pattern_of_the_hook_and_the_labels_given(tiny_rep, full):
    """Truth: hook_pattern of head 1.1 at query 7: the five largest, largest first, each with its own probability and
    the label given for its position; the head's pattern at the chosen key is that key's."""
    pattern = _cache(tiny_rep[0], ["blocks.1.attn.hook_pattern"])["blocks.1.attn.hook_pattern"][0, 1, 7].numpy()
    order = sorted(range(len(pattern)), key=lambda i: -pattern[i])[:5]
    assert [k["pos"] for k in full.top_keys] == order
    assert [k["pattern"] for k in full.top_keys] == pytest.approx([float(pattern[i]) for i in order], abs=1e-6)
    assert [k["label"] for k in full.top_keys] == [LABELS[i] for i in order]
    assert full.pattern == pytest.approx(float(pattern[full.key_pos]), abs=1e-6)


def test_summary_sentence_names_each_sides_top_source_and_writer(full):
    """Truth: the record's own fields, read back from the sentence the CLI prints; the four labels are distinct."""
    firsts = [getattr(full, f)[0]["label"] for f in ("query_sources", "query_writers", "key_sources", "key_writers")]
    assert len(set(firsts)) == 4
    m = re.fullmatch(r"head 1\.1, query (\d+) -> key (\d+) \(p=(\S+), score (\S+)\): query side (.+) \(written by "
                     r"(.+)\), key side (.+) \(written by (.+)\)", full.summary())  # fmt: skip
    assert m, full.summary()
    assert (int(m[1]), int(m[2])) == (full.query_pos, full.key_pos)
    assert (m[3], m[4]) == (f"{full.pattern:.2f}", f"{full.score:.2f}")
    assert [m[5], m[6], m[7], m[8]] == firsts


def test_default_query_is_the_last_position_and_its_score_the_hooks(tiny_rep):
    """Truth: hook_attn_scores at (query P-1, key) and q.k/sqrt(d_head) from hook_q/hook_k, in numpy."""
    model, rep = tiny_rep
    q = qk_attribution(rep, 1, 1, n=2)
    names = ["blocks.1.attn.hook_attn_scores", "blocks.1.attn.hook_q", "blocks.1.attn.hook_k"]
    c = _cache(model, names)
    assert q.query_pos == len(TOKENS) - 1
    assert q.score == pytest.approx(float(c[names[0]][0, 1, q.query_pos, q.key_pos]), abs=1e-4)
    qv, kv = c[names[1]][0, q.query_pos, 1].double().numpy(), c[names[2]][0, q.key_pos, 1].double().numpy()
    assert q.score == pytest.approx(float(np.dot(qv, kv)) / np.sqrt(model.cfg.d_head), abs=1e-4)


def test_a_query_may_attend_to_itself_but_not_ahead(tiny_rep):
    """Boundary of causal attention: key = query is seen (its score is the hook's diagonal), key = query + 1 is not;
    from query 1 the default key leaves position 0 out, so it is 1."""
    model, rep = tiny_rep
    scores = _cache(model, ["blocks.1.attn.hook_attn_scores"])["blocks.1.attn.hook_attn_scores"][0, 1]
    assert qk_attribution(rep, 1, 1, 5, 5, n=2).score == pytest.approx(float(scores[5, 5]), abs=1e-4)
    with pytest.raises(MechscopeError, match="key position 6 is not seen from query position 5"):
        qk_attribution(rep, 1, 1, 5, 6, n=2)
    pattern = _cache(model, ["blocks.1.attn.hook_pattern"])["blocks.1.attn.hook_pattern"][0, 0, 1]
    assert pattern[0] > pattern[1]  # head 1.0 at query 1 prefers position 0, yet the default key is 1
    assert qk_attribution(rep, 1, 0, 1, n=2).key_pos == 1


# ---- lm graph on the hand-built induction model: what graph.json and graph.html hold


class Words:
    """A tokenizer of the hand-built model's ids: token i reads "<t{i}>", a tag unless the page escapes it."""

    def decode(self, ids):
        return "".join(f"<t{i}>" for i in ids)


@pytest.fixture(scope="module")
def induction_run(tmp_path_factory):
    from mechscope.lm.pipelines.attribution_graph import graph_model

    model = hand_built()
    seq = torch.randint(1, 100, (10,), generator=torch.Generator().manual_seed(0))
    tokens = torch.cat([torch.zeros(1, dtype=torch.long), seq, seq[:5]])  # BOS A..J A..E: query 15 reads seq[4]
    out, _ = graph_model(model, tokens=tokens.tolist(), tokenizer=Words(), qk=[(1, 0)], auto_intervention=False,
                         dashboards=0, out=tmp_path_factory.mktemp("g") / "g", name="induction")  # fmt: skip
    data = json.loads((out / "graph.json").read_text())
    return model, tokens, data, (out / "graph.html").read_text()


def test_graph_json_qk_of_the_induction_head_is_carried_by_the_previous_token_head(induction_run):
    """Known answer of the hand-built model: head 1.0's query at the last position (the default) reads its token,
    its key at the default key (largest of hook_pattern past position 0: 6, the token after the earlier seq[4])
    reads what head 0.0 wrote there. So the whole score (hook_attn_scores) is the token embedding's part on the
    query side, head 0.0's on the key side, and their pair's; the model has no biases."""
    model, tokens, data, _ = induction_run
    (q,) = data["qk"]
    names = ["blocks.1.attn.hook_attn_scores", "blocks.1.attn.hook_pattern"]
    with torch.no_grad():
        c = run_with_cache(model, tokens[None], names=names)[1]
    assert (q["query_pos"], q["key_pos"]) == (15, 6) == (15, int(c[names[1]][0, 0, 15, 1:].argmax()) + 1)
    score = float(c[names[0]][0, 0, 15, 6])
    assert q["score"] == pytest.approx(score, rel=1e-4) and score > 1
    tok = f"<t{int(tokens[15])}>"
    assert q["query_writers"][0] == {"label": f"token embedding @15 {tok!r}", "score": pytest.approx(score, rel=1e-4)}
    assert q["key_writers"][0] == {"label": "head 0.0", "score": pytest.approx(score, rel=1e-4)}
    assert all(abs(w["score"]) < 1e-4 * score for w in q["query_writers"][1:] + q["key_writers"][1:])
    assert (q["writer_pairs"][0]["query"], q["writer_pairs"][0]["key"]) == (f"token embedding @15 {tok!r}", "head 0.0")
    assert q["writer_pairs"][0]["score"] == pytest.approx(score, rel=1e-4)


def _qk_tables(page: Page) -> list[list[list[str]]]:
    side = [t for t in page.tables if t and t[0] == ["part", "score"]]
    pairs = [t for t in page.tables if t and t[0] == ["query", "key", "score"]]
    return side[:2] + pairs[:1] + side[2:4] + pairs[1:2]


def test_graph_html_qk_section_holds_the_json_numbers(induction_run):
    """Truth: graph.json, read back from graph.html with html.parser: the heading's head and positions, the
    sentence's attention and score to 3 decimals, and each of the six tables' rows (labels unescaped, scores to 4
    significant digits) in the JSON's order; the hand-built model has one part on each side that is not exactly
    zero, and only it is listed."""
    _, _, data, html = induction_run
    (q,) = data["qk"]
    text = Text(html).joined()
    assert f"QK attribution: head 1.0, query {q['query_pos']} → key {q['key_pos']}" in text
    assert f"Attention {q['pattern']:.3f}, score {q['score']:.3f} (scaled q·k)" in text
    fields = ("query_writers", "key_writers", "writer_pairs", "query_sources", "key_sources", "pairs")
    assert [len(q[f]) for f in fields] == [1] * 6  # one part per side moves the score; exact zeros are left out
    tables = _qk_tables(Page(html))
    for table, field in zip(tables, fields, strict=True):
        rows = _rows(q[field])
        assert table[1:] == rows, field


def _rows(items: list[dict]) -> list[list[str]]:
    """The cells a table of parts shows: labels as given, scores with 4 significant digits."""
    return [[*(r[k] for k in ("label", "query", "key") if k in r), f"{r['score']:.4g}"] for r in items]


def test_top_pairs_are_the_largest_of_the_whole_pair_matrix_block_by_block():
    """Truth (numpy): every pair's scale * a_i . b_j sorted by magnitude, zeros left out; blocks of 7 rows (so the
    top pairs come from different blocks) give the pairs one block of all rows gives."""
    from mechscope.lm.methods.attribution_graph_qk import _top_pairs

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randn(9, 4, generator=g, dtype=torch.float64)
    a[5], b[2] = 0.0, 0.0  # rows of zero pairs, left out
    m = 0.5 * (a.numpy() @ b.numpy().T)
    order = sorted(((i, j) for i in range(30) for j in range(9) if m[i, j] != 0), key=lambda p: -abs(m[p]))
    for n in (1, 5, 40, 10_000):
        got = _top_pairs(a, b, 0.5, n, rows=7)
        assert [(i, j) for i, j, _ in got] == order[:n], n
        assert [v for *_, v in got] == pytest.approx([m[p] for p in order[:n]], rel=1e-12)
        assert got == _top_pairs(a, b, 0.5, n, rows=1024)
