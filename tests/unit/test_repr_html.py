"""Every result shows itself in a notebook: ``_repr_html_`` is one self-contained HTML fragment (no network, every
image inlined and decodable, ids unique per render, scripts scoped), under the size cap; the small calls
(``mechscope.attention``, ``mechscope.lm.*``, ``heads.table()``, ``heads.show()``) give the model's own numbers;
bad input is the CLI's one-line MechscopeError raised from the call itself."""

from __future__ import annotations

import base64
import io
import re
import traceback
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import mechscope
from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import run_with_cache
from mechscope.core.render.fragment import MAX_CHARS, page_to_fragment
from mechscope.core.render.viewer import AttentionViewer, Table
from tests.shapes import splits
from tests.unit.test_heads import PROTOCOL, V, hand_built


class Parsed(HTMLParser):
    """Tags, attributes and script bodies of a fragment."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.scripts: list[str] = []
        self._in_script = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts.append(data)


def check_fragment(html: str, images: bool = True) -> set[str]:
    """One self-contained fragment; returns its ids."""
    from PIL import Image

    assert len(html) <= MAX_CHARS
    assert html.startswith('<div class="mechscope') and html.rstrip().endswith("</div>")
    p = Parsed(html)
    names = {t for t, _ in p.tags}
    assert not names & {"html", "head", "body", "link", "iframe", "meta"}  # a fragment, not a page
    root = p.tags[0][1]["id"]
    ids = [a["id"] for _, a in p.tags if "id" in a]
    assert len(ids) == len(set(ids)) and all(i == root or i.startswith(root + "-") for i in ids)
    for tag, a in p.tags:
        for k in ("src", "href", "action", "data"):
            v = a.get(k)
            if v is None:
                continue
            assert not v.startswith(("http:", "https:", "//", "file:")), (tag, k, v[:60])
            if k == "src":
                assert tag == "img" and v.startswith("data:image/png;base64,"), (tag, v[:60])
            if k == "href":
                assert v.startswith("#" + root + "-"), v
    assert not re.search(r"https?://|cdn\.|require\(|import\s", " ".join(p.scripts))
    text = re.sub(r"(data:image/png;base64,)[A-Za-z0-9+/=]+", r"\1", html)  # all but the inlined images' bytes
    assert not re.search(r"https?://|url\(|@import|<link|src=\"(?!data:)", text)  # nothing to fetch from anywhere
    for js in p.scripts:  # every script in its own function scope: no globals shared between renders
        assert js.strip().startswith("(function") and js.strip().endswith("})();")
    srcs = [a["src"] for t, a in p.tags if t == "img"]
    if images:
        assert srcs
    for uri in srcs:
        with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as img:
            img.load()
    return set(ids)


def check_twice(obj, images: bool = True) -> str:
    """Two renders of ``obj``: each a valid fragment, no id shared."""
    a, b = obj._repr_html_(), obj._repr_html_()
    ids_a, ids_b = check_fragment(a, images), check_fragment(b, images)
    assert ids_a and not ids_a & ids_b
    return a


# ---- the language half, on hand-built models ---------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return hand_built()


@pytest.fixture(scope="module")
def tokens(model):
    return mechscope.lm.repeated_tokens(model, n=20, batch=4, seed=0, token_range=(1, V))


@pytest.fixture(scope="module")
def heads(model):
    return mechscope.lm.find_induction_heads(model, protocol=PROTOCOL)


def test_attention_viewer_is_the_models_pattern(model, tokens):
    v = mechscope.attention(model, tokens[2], 1, 0)
    assert isinstance(v, AttentionViewer)
    _, cache = run_with_cache(model, tokens[2:3], names=["blocks.1.attn.hook_pattern"])
    want = cache["blocks.1.attn.hook_pattern"][0, 0].numpy()
    np.testing.assert_allclose(v.pattern, want, atol=1e-6)
    html = check_twice(v, images=False)
    # the numbers in the page are that head's weights (rounded to 4 places), row i holding keys 0..i
    rows = __import__("json").loads(re.search(r"const pat = (\[.*?\]\]);", html, re.S).group(1))
    assert len(rows) == tokens.shape[1]
    for i, row in enumerate(rows):
        np.testing.assert_allclose(row, want[i, : i + 1], atol=6e-5)
    assert "1.0" in repr(v)


def test_attention_accepts_text_lists_and_batches(model, tokens):
    a = mechscope.attention(model, tokens, 0, 0, index=1)
    b = mechscope.attention(model, tokens[1].tolist(), 0, 0)
    np.testing.assert_array_equal(a.pattern, b.pattern)
    assert a.tokens == [str(int(t)) for t in tokens[1]]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, t: mechscope.attention(m, t[0], 2, 0), "head 2.0 out of range: layers 0..1, heads 0..1"),
        (lambda m, t: mechscope.attention(m, t[0], 0, 5), "head 0.5 out of range: layers 0..1, heads 0..1"),
        (lambda m, t: mechscope.attention(m, t[0], 0.5, 0), "layer must be an integer, got 0.5"),
        (lambda m, t: mechscope.attention(m, [1, 2, V], 0, 0), f"token id {V} outside the vocabulary 0..{V - 1}"),
        (lambda m, t: mechscope.attention(m, t[None], 0, 0), "expected tokens shaped [batch, position], got [1, 4"),
        (lambda m, t: mechscope.attention(m, t.float(), 0, 0), "expected integer token ids"),
        (lambda m, t: mechscope.attention(m, "some text", 0, 0), "text needs a tokenizer"),
        (lambda m, t: mechscope.attention(m, t, 0, 0, index=4), "index 4 out of range: 4 sequences"),
        (lambda m, t: mechscope.lm.head_scores(m, t[:, :10]), "expected repeated tokens [batch, 1 + 2n]"),
        (lambda m, t: mechscope.lm.ablate_heads(m, t, [(1, 9)]), "head 1.9 out of range"),
        (lambda m, t: mechscope.lm.ablate_heads(m, t, [(1, 0)], kind="half"), "kind must be mean, zero or resample"),
        (lambda m, t: mechscope.lm.ablate_heads(m, t[:1], [(1, 0)]), "batch must be at least 2"),
        (lambda m, t: mechscope.lm.ablate_heads(m, t, (1, 0)), "heads must be a list of (layer, head) pairs: for one "
                                                               "head give [(1, 0)]"),  # was a TypeError from *h
        (lambda m, t: mechscope.lm.ablate_heads(m, t, ["1.0"]), "each head must be a (layer, head) pair, e.g. (17, 3), "
                                                                "got '1.0'"),
        (lambda m, t: mechscope.lm.head_scores(m, t).ranked("nosuch"), "unknown score 'nosuch': one of induction"),
        (lambda m, t: mechscope.lm.ablate_heads(m, t, np.array([1, 0])), "heads must be a list of (layer, head) "
                                                                        "pairs: for one head give [(1, 0)]"),
        (lambda m, t: mechscope.lm.ablate_heads(m, t, [(1, 0), (1, 0)]), "head 1.0 given more than once"),
        (lambda m, t: mechscope.lm.repeated_tokens(m, n=40), "n = 40 needs 81 positions (a BOS and two copies of 40 "
                                                              "tokens); the model's context is 64"),
        (lambda m, t: mechscope.lm.find_induction_heads(m, n=40), "--n (n) 40 needs 81 positions"),
        (lambda m, t: mechscope.lm.find_induction_heads(m, show=[(3, 0)], protocol=PROTOCOL), "head 3.0 out of range"),
        (lambda m, t: mechscope.lm.circuits(m, heads=[(0, 7)]), "head 0.7 out of range"),
        (lambda m, t: mechscope.lm.circuits(m, heads=(0, 1)), "heads must be a list of (layer, head) pairs: for one "
                                                              "head give [(0, 1)]"),  # was a TypeError from *h
        (lambda m, t: mechscope.lm.circuits(m, heads=["0.1"]), "each head must be a (layer, head) pair"),
        (lambda m, t: mechscope.lm.repeated_tokens(m, 3, token_range=(0.5, 9.5)), "a token range is two integers"),
        (lambda m, t: mechscope.lm.repeated_tokens(m, 3, token_range=5), "a token range is two integers [LOW, HIGH)"),
        (lambda m, t: mechscope.attention(m, [], 0, 0), "expected at least one token, got none (shape [0])"),
        (lambda m, t: mechscope.lm.circuits(m, prompt=t[:0]), "expected at least one token, got none (shape [0, 41])"),
        (lambda m, t: mechscope.lm.load_model(123), "model must be a path (a string or a pathlib.Path), got int"),
        (lambda m, t: mechscope.lm.find_induction_heads(m, protocol="x"), "protocol must be a HeadProtocol, got str"),
        (lambda m, t: mechscope.lm.ablate_heads(m, t[:, :11], [(1, 0)]), "expected repeated tokens (BOS, n tokens, "
                                                                         "the same n again): the two halves of 4 of "
                                                                         "the 4 sequences differ"),  # ran before
        (lambda m, t: mechscope.lm.circuits(_nan(m)), "1 weight tensor holds NaN or infinite values (W_E)"),  # crashed
        (lambda m, t: mechscope.lm.head_scores(_nan(m), t), "the model's loss on the repeated tokens is not finite"),
        (lambda m, t: mechscope.lm.train_toy(steps=0), "--steps must be at least 1, got 0"),
    ],
)
def test_bad_input_is_one_line_from_the_call(model, tokens, call, message):
    with pytest.raises(MechscopeError) as e:
        call(model, tokens)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    # the traceback ends at the public call: no frame inside mechscope's internals beyond the raise
    files = [f.filename for f in traceback.extract_tb(e.value.__traceback__)]
    package = Path(mechscope.__file__).resolve().parent  # the package, not any folder named mechscope (a checkout)
    inside = [f for f in files if Path(f).resolve().is_relative_to(package)]
    assert inside == [f for f in inside if f.endswith("errors.py")] and len(inside) == 1, files


def _nan(model):
    """A copy of ``model`` with one embedding column NaN (lm.circuits' eigendecomposition took the process down)."""
    import copy

    model = copy.deepcopy(model)
    with torch.no_grad():
        model.W_E[:, 0] = float("nan")
    return model


def test_what_the_model_cannot_do_is_said_before_the_numbers(model, tokens):
    """Truths: the model's config and the table's own rows. A BOS id outside the vocabulary (transformers' GPT-2
    config keeps 50256 whatever its size) was put into the tokens and blamed on them by the next call; a tracr model
    (outputs of its own classes) was 'IndexError: Target 4 is out of bounds'; table(-1) dropped the last head."""
    import copy
    import dataclasses

    from tests.unit.test_tracr import tracr_root

    odd = copy.deepcopy(model)
    odd.cfg = dataclasses.replace(model.cfg, bos_token_id=V + 7)
    with pytest.raises(MechscopeError, match=f"BOS token id {V + 7} .bos_token_id in its config. is outside its "):
        mechscope.lm.repeated_tokens(odd, 3)
    tracr, _ = mechscope.lm.load_model(tracr_root() / "reverse")
    for call in (lambda: mechscope.lm.head_scores(tracr, n=2, batch=2),
                 lambda: mechscope.lm.ablate_heads(tracr, [[1, 2, 3, 2, 3]] * 2, [(0, 0)])):  # fmt: skip
        with pytest.raises(MechscopeError, match="its outputs are classes of their own, not next tokens"):
            call()
    s = mechscope.lm.head_scores(model, tokens)
    assert len(s.table(3).rows) == 3 and len(s.table(None).rows) == 4 and len(s.table(torch.tensor(2)).rows) == 2
    wide = mechscope.lm.repeated_tokens(model, 3, 2, token_range=(np.int64(5), np.int64(9)))  # numpy ints, as before
    assert int(wide[:, 1:].min()) >= 5 and int(wide[:, 1:].max()) < 9
    for n in (-1, 0, 2.5):
        with pytest.raises(MechscopeError, match=r"^n \(the rows shown; None: every head\) must be an integer"):
            s.table(n)


def test_a_views_bad_head_is_one_line_from_the_view(model, tokens):
    s = mechscope.lm.head_scores(model, tokens)
    with pytest.raises(MechscopeError, match=r"head 5\.0 out of range") as e:
        s.show(5, 0)
    files = [f.filename for f in traceback.extract_tb(e.value.__traceback__)]
    package = Path(mechscope.__file__).resolve().parent
    inside = [Path(f).name for f in files if Path(f).resolve().is_relative_to(package)]
    assert inside == ["scores.py", "errors.py"], files  # show, then the wrapper: not show's machinery (8 frames)


def test_ablate_heads_takes_any_list_of_pairs(model, tokens):
    want = mechscope.lm.ablate_heads(model, tokens, [(1, 0), (0, 1)]).ablated_loss
    for heads in (zip([1, 0], [0, 1], strict=True), np.array([[1, 0], [0, 1]]), [[1, 0], [0, 1]], ((1, 0), (0, 1))):
        assert mechscope.lm.ablate_heads(model, tokens, heads).ablated_loss == want  # a zip read once, numpy rows


def test_attention_viewer_saves_a_page(model, tokens, tmp_path):
    page = mechscope.attention(model, tokens[2], 1, 0).save_html(tmp_path / "head.html").read_text()
    assert page.startswith("<!doctype html>") and "const pat = " in page and "<title>head 1.0</title>" in page


def test_a_page_path_that_cannot_be_a_file_is_one_line(model, tokens, tmp_path):
    """Truth: the file system. A folder given as the page (IsADirectoryError naming a temporary file), a file where a
    folder above it should be (FileExistsError), no path (TypeError): one line each, nothing written; a folder that
    does not exist yet is made."""
    (tmp_path / "a.txt").write_text("mine")
    scores, viewer = mechscope.lm.head_scores(model, tokens), mechscope.attention(model, tokens[2], 1, 0)
    for obj in (scores, viewer):
        for path, said in ((tmp_path, f"{tmp_path} is a folder: give the page a file name"),
                           (tmp_path / "a.txt" / "p.html", f"{tmp_path / 'a.txt'} is a file, not a folder"),
                           (None, "expected a file path for the page (e.g. 'report.html'), got NoneType")):  # fmt: skip
            with pytest.raises(MechscopeError) as e:
                obj.save_html(path)
            assert str(e.value).startswith(said) and "\n" not in str(e.value)
        assert obj.save_html(tmp_path / "new" / "p.html").is_file()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.txt", "new", "p.html"]


def test_head_scores_table_show_and_render(model, tokens):
    s = mechscope.lm.head_scores(model, tokens)
    assert s.ranked("induction")[0] == (1, 0) and s.ranked("previous_token")[0] == (0, 0)
    t = s.table()
    assert isinstance(t, Table) and len(t) == 4 and t[0]["head"] == "1.0"
    assert t[0]["induction"] == pytest.approx(s.scores["induction"][1, 0])
    check_fragment(t._repr_html_(), images=False)
    assert "1.0" in repr(t)
    v = s.show(0, 1)  # not kept: computed from the model (held weakly)
    _, cache = run_with_cache(model, tokens[:1], names=["blocks.0.attn.hook_pattern"])
    np.testing.assert_allclose(v.pattern, cache["blocks.0.attn.hook_pattern"][0, 1].numpy(), atol=1e-6)
    html = check_twice(s)
    assert "<table>" in html and html.count("<img") >= 4
    assert s.loss_second_half < 0.5 * s.loss_first_half  # the hand-built induction circuit works


def test_ablate_heads_matches_the_hooked_loss(model, tokens):
    r = mechscope.lm.ablate_heads(model, tokens, [(1, 0)], kind="zero")

    def zero(z, hp):
        z = z.clone()
        z[:, :, 0] = 0
        return z

    n = tokens.shape[1] // 2
    with torch.no_grad():
        clean = model(tokens)
        with mechscope.hooks(model, fwd=[("blocks.1.attn.hook_z", zero)]):
            ablated = model(tokens)

    def second(logits):
        lg = logits[:, n + 1 : 2 * n].transpose(1, 2)
        return torch.nn.functional.cross_entropy(lg, tokens[:, n + 2 : 2 * n + 1]).item()

    assert r.clean_loss == pytest.approx(second(clean), abs=1e-4)
    assert r.ablated_loss == pytest.approx(second(ablated), abs=1e-4)
    assert r.loss_increase > 1.0
    check_fragment(r._repr_html_(), images=False)


def test_heads_result_renders_table_show(model, heads):
    from IPython.core.formatters import PlainTextFormatter

    assert len(repr(heads)) > 5_000 and len(PlainTextFormatter()(heads)) < 200  # the text beside the HTML: short
    html = check_twice(heads)
    for section in ("Summary", "Heads ranked by induction score", "The circuit", "Attention patterns"):
        assert section in html
    assert "<table>" in html and html.count("<img") >= 5
    # the report's hover viewer is there, with its script pointed at this render's own elements
    root = re.match(r'<div class="mechscope" id="([^"]+)"', html).group(1)
    assert f'getElementById("{root}-tokens")' in html and f'id="{root}-tokens"' in html
    t = heads.table(3)
    assert [r["head"] for r in t] == ["1.0", "0.1", "1.1"] and t[0]["label"] == "induction"
    assert len(heads.table(None)) == 4
    for layer, h in ((1, 0), (0, 1)):  # 1.0 kept by the analysis; 0.1 computed from the model
        v = heads.show(layer, h)
        _, cache = run_with_cache(model, torch.tensor([heads.examples["repeated"]["tokens"]]),
                                  names=[f"blocks.{layer}.attn.hook_pattern"])  # fmt: skip
        want = cache[f"blocks.{layer}.attn.hook_pattern"][0, h].numpy()
        np.testing.assert_allclose(v.pattern, want, atol=6e-5)  # the analysis keeps patterns to 4 places


def test_composition_circuits_toy_render(model, heads):
    html = check_twice(heads.composition)
    assert "K: source → target" in html and html.count("<img") == 3
    c = mechscope.lm.circuits(model, heads=[(1, 0)])
    html = check_twice(c)
    assert "Composition between heads" in html


def test_toy_training_renders(tmp_path):
    toy = mechscope.lm.train_toy(steps=6, checkpoints=2, batch=4, d_model=16, n_heads=2, n_ctx=32, vocab=16)
    html = check_twice(toy)
    assert "Watching for induction heads" in html and "ToyTraining(2 layers" in repr(toy)
    page = toy.save_html(tmp_path / "training.html").read_text()
    assert page.startswith("<!DOCTYPE html>")


# ---- the fragment machinery -------------------------------------------------------------------


def test_large_pages_fold_and_stay_under_the_cap():
    big = "data:image/png;base64," + base64.b64encode(b"x" * 150_000).decode()
    sections = "".join(f'<h2 id="s{i}">Section {i}</h2><p>text {i}</p><img src="{big}" alt="a">' for i in range(30))
    page = f"<html><head><style>body {{ color: red; }} #s1 {{ color: blue; }}</style></head><body><h1>Big</h1>" \
           f"<h2>Summary</h2><p>short</p>{sections}<script>document.getElementById('s1').title = 'x';</script>" \
           "</body></html>"  # fmt: skip
    html = page_to_fragment(page, max_chars=1_000_000)
    assert len(html) <= 1_000_000 and len(page) > 4_000_000
    assert html.count("<details") == html.count("<img")  # every section after the summary folded
    assert "Not shown here" in html and "Section 29" in html and "save_html" in html
    root = re.match(r'<div class="mechscope" id="([^"]+)"', html).group(1)
    assert f"#{root} {{ color: red; }}" in html and f"#{root} #{root}-s1 {{ color: blue; }}" in html
    assert f'getElementById("{root}-s1")' in html  # the section the script reads is shown, so the script is kept
    small = page_to_fragment(page, max_chars=200_000)  # room for the summary and one section: s1 is left out
    assert len(small) <= 200_000 and "<script>" not in small  # so is the script that reads it


# ---- the CNN half -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cnn():
    s = splits(n_train=400, n_test=120, seed=3)
    x_train = torch.tensor(s["x_train"]).float().div(255).unsqueeze(1)
    y_train = torch.tensor(s["y_train"]).long()
    x_test = torch.tensor(s["x_test"]).float().div(255).unsqueeze(1)
    y_test = torch.tensor(s["y_test"]).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 7 * 7, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(120):
        idx = torch.randint(0, len(x_train), (32,), generator=g)
        loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), (x_train, y_train), (x_test, y_test)


def test_cnn_results_render(cnn, tmp_path):
    model, train, test = cnn
    r = mechscope.explain(model, train, test, out=tmp_path / "explain", n_pairs=4)
    html = r._repr_html_()  # once: ids unique across renders is checked on the cheaper results
    check_fragment(html)
    for section in ("Summary", "Overview", "Ablation", "Per-class circuits"):
        assert section in html
    assert "<table>" in html and html.count("<img") >= 5 and "per-channel sections" in html
    full = r.save_html(tmp_path / "report.html").read_text()
    assert len(full) > len(html) and 'id="conv1-0"' in full  # the whole report: channel sections too
    for part in (r.circuits, r.ablation, r.overview):  # sub-results: their fields
        check_fragment(part._repr_html_(), images=False)
    a = mechscope.attribute(model, train, test, out=tmp_path / "attr", methods=["saliency", "gradcam"], n=4,
                            n_faithfulness=8)  # fmt: skip
    html = a._repr_html_()
    check_fragment(html)
    assert "saliency attribution grid" in html and "faithfulness curves" in html and "<table>" in html
    f = mechscope.visualize(model, train, test, out=tmp_path / "featvis", layers=["conv1"], units=[0, 1], steps=4)
    html = f._repr_html_()
    check_fragment(html)
    assert "conv1.hook_post feature visualisations" in html or "feature visualisations" in html
    assert "<table>" in html


def test_neurons_result_renders():
    from mechscope.lm.methods.neurons import read_neurons, sample_windows
    from tests.unit.test_neurons import P, constructed_model, zipf_text

    model = constructed_model()
    tokens = sample_windows(zipf_text(60 * P, seed=1), 60, P, seed=0)
    sample = {"seed": 0, "source": "Zipf tokens"}  # what lm neurons records
    r = read_neurons(model, tokens, name="constructed", k=20, sample=sample)
    html = check_twice(r, images=True)
    assert "most monosemantic" in html and "<table>" in html
