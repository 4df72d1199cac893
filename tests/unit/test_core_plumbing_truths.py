"""The shared core's plumbing against outside truths: hooks, interventions and statistics on a hand-built model whose
activations are known in closed form (numpy), results read back with the json module, scipy's rank statistics, the
fallback page parsed with html.parser, and the command lines' numbers read back with a regular expression."""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from mechscope.core import intervene as ivn
from mechscope.core import show
from mechscope.core.cli_options import ThreadsOneOpt, _threads, graph_check_lines, strongest_inputs
from mechscope.core.errors import HookError, MechscopeError, RunError
from mechscope.core.hooks import (
    HookPoint,
    attached_hooks,
    describe_names,
    firing_hooks,
    hooks,
    module_hooks,
    run_with_cache,
)
from mechscope.core.paths import model_out, other_wing, resolve_data_dir
from mechscope.core.results import Result, figure_data
from mechscope.core.stats import rankdata, sample_sd, spearman
from tests.unit.test_cnn_pages_truths import Page

W1 = np.array([[1.0, 2.0], [-1.0, 1.0], [3.0, -2.0]])
B1 = np.array([0.5, 0.0, -1.0])
W2 = np.array([[1.0, -1.0, 2.0], [0.5, 1.0, 0.0]])
B2 = np.array([0.1, -0.2])
X = np.array([[1.0, 0.5], [-0.5, 2.0], [2.0, 1.0], [0.3, -1.0]])  # every hidden unit is live on some input


class Tiny(nn.Module):
    """x [B, 2] -> linear (W1, B1) -> hook_mid -> ReLU -> hook_act -> linear (W2, B2) -> hook_out. The hook points are
    defined out of forward order, and ``hook_unused`` never fires."""

    def __init__(self) -> None:
        super().__init__()
        self.hook_unused, self.hook_out, self.hook_mid, self.hook_act = (HookPoint() for _ in range(4))
        self.lin1, self.relu, self.lin2 = nn.Linear(2, 3).double(), nn.ReLU(), nn.Linear(3, 2).double()
        with torch.no_grad():
            for lin, w, b in ((self.lin1, W1, B1), (self.lin2, W2, B2)):
                lin.weight.copy_(torch.from_numpy(w))
                lin.bias.copy_(torch.from_numpy(b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hook_out(self.lin2(self.hook_act(self.relu(self.hook_mid(self.lin1(x))))))


def by_hand(x=X, edit=None):
    """The forward in numpy: ``edit`` changes the hidden activations (after the ReLU) before the read-out."""
    mid = x @ W1.T + B1
    act = np.maximum(mid, 0)
    if edit is not None:
        act = edit(act.copy())
    return mid, act, act @ W2.T + B2


def no_hooks_left(model: nn.Module) -> bool:
    """Torch's own hook dictionaries, read module by module (not through attached_hooks)."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return all(not getattr(m, k, {}) for m in model.modules() for k in kinds)


@pytest.fixture()
def tiny():
    return Tiny().eval()


def xt(x=X):
    return torch.from_numpy(x)


# ---- hooks --------------------------------------------------------------------------------------------------------


def test_cache_holds_the_hand_computed_activations_under_their_names(tiny):
    """Truth: numpy's W1·x + b1, its ReLU and W2·a + b2."""
    out, cache = run_with_cache(tiny, xt(), names=["hook_act", "hook_mid"])
    mid, act, logits = by_hand()
    assert set(cache) == {"hook_act", "hook_mid"}
    np.testing.assert_allclose(cache["hook_mid"].numpy(), mid, rtol=1e-12)
    np.testing.assert_allclose(cache["hook_act"].numpy(), act, rtol=1e-12)
    np.testing.assert_allclose(out.numpy(), logits, rtol=1e-12)
    assert no_hooks_left(tiny)


def test_a_predicate_skips_a_silent_hook_but_a_named_one_is_refused(tiny):
    """Truth: the model's forward calls three of its four hook points; torch's named_modules order is the definition
    order (hook_out before hook_mid and hook_act), which is how the firing ones are listed."""
    _, cache = run_with_cache(tiny, xt(), names=lambda n: True)
    assert sorted(cache) == ["hook_act", "hook_mid", "hook_out"]
    assert firing_hooks(tiny, xt()) == ["hook_out", "hook_mid", "hook_act"]
    with pytest.raises(HookError, match=r"'hook_unused' does not fire.*hooks that fire: hook_out, hook_mid, hook_act"):
        run_with_cache(tiny, xt(), names=["hook_mid", "hook_unused"])
    assert no_hooks_left(tiny)


def test_describe_names_spans_the_smallest_to_the_largest_layer():
    """Truth: written by hand; layers listed out of order still read {1..3}, one layer reads as itself."""
    names = ["b.3.q", "b.1.q", "b.2.q", "b.7.k", "emb"]
    assert describe_names(names) == "b.{1..3}.q, b.7.k, emb"


def test_every_hook_is_gone_after_an_error_in_the_block(tiny):
    """Truth: torch's own _forward_hooks / _backward_hooks dictionaries, empty again after the exception."""
    with (
        pytest.raises(KeyError),
        hooks(tiny, fwd=[("hook_mid", lambda a, h: None)], bwd=[("hook_act", lambda g, h: g)]),
    ):
        assert not no_hooks_left(tiny)
        raise KeyError("inside")
    assert no_hooks_left(tiny)
    seen = []
    with pytest.raises(ValueError), module_hooks(tiny, (nn.ReLU,), forward=lambda m, a, o: None,
                                                 backward=lambda m, gi, go: seen.append(1)) as found:  # fmt: skip
        assert found == [tiny.relu] and tiny.relu._forward_hooks and tiny.relu._backward_hooks
        tiny(xt().requires_grad_(True)).sum().backward()
        raise ValueError("inside")
    assert seen == [1] and no_hooks_left(tiny)


def test_attached_hooks_sees_a_forward_pre_hook(tiny):
    """Truth: torch's register_forward_pre_hook puts a hook on lin2; its handle's remove() takes it off."""
    handle = tiny.lin2.register_forward_pre_hook(lambda m, a: None)
    assert attached_hooks(tiny) == ["lin2"]
    handle.remove()
    assert attached_hooks(tiny) == []


# ---- interventions ------------------------------------------------------------------------------------------------


def _set(units, value):
    def edit(a):
        a[:, units] = value
        return a

    return edit


def test_zero_mean_group_ablation_and_patching_equal_the_hand_model(tiny):
    """Truth: the numpy forward with the hidden units set by hand (zero, the numpy mean, both units of a group, or
    the clean input's values)."""
    mean = by_hand()[1].mean(0)
    means = ivn.layer_means(tiny, xt(), ["hook_act"], batch_size=3)  # 4 inputs: a batch of 3 and one of 1
    np.testing.assert_allclose(means["hook_act"].numpy(), mean, rtol=1e-6)
    one = ivn.channel_masks((3,), [1])
    zero = ivn.ablate(tiny, xt(), "hook_act", one, "zero")[0].numpy()
    np.testing.assert_allclose(zero, by_hand(edit=_set([1], 0.0))[2], rtol=1e-12)
    meaned = ivn.ablate(tiny, xt(), "hook_act", one, "mean", torch.from_numpy(mean))[0].numpy()
    np.testing.assert_allclose(meaned, by_hand(edit=_set([1], mean[1]))[2], rtol=1e-12)
    group = ivn.group_mask((3,), [0, 2])
    assert group.tolist() == [[True, False, True]]
    both = ivn.intervene(tiny, xt(), "hook_act", group, 0.0)[0].numpy()
    np.testing.assert_allclose(both, by_hand(edit=_set([0, 2], 0.0))[2], rtol=1e-12)
    clean = X[::-1].copy()
    patched = ivn.patch(tiny, xt(), xt(clean), "hook_act", ivn.channel_masks((3,), [0]))[0].numpy()
    np.testing.assert_allclose(patched, by_hand(edit=_set([0], by_hand(clean)[1][:, [0]]))[2], rtol=1e-12)
    assert no_hooks_left(tiny)


def test_class_accuracy_of_a_class_with_no_inputs_is_the_same_on_both_paths():
    """Truth: a plain loop for the classes present; readout_intervene's fast path (unit_ablation_accuracy) and the
    reference ClassAccuracy are documented as "the same numbers", so the absent class 2 must read the same on both."""
    g = torch.Generator().manual_seed(0)
    acts, w = torch.rand(30, 4, generator=g), torch.randn(3, 4, generator=g)
    labels = torch.tensor([0, 1] * 15)
    masks = ivn.unit_masks((4,))
    fast = ivn.readout_intervene(w, None, acts, masks, 0.0, ivn.class_accuracy(labels, 3))
    dense = torch.cat(
        [ivn.class_accuracy(labels, 3)(ivn.readout_intervene(w, None, acts, m[None], 0.0)) for m in masks]
    )
    assert torch.equal(fast, dense)
    for u in range(4):
        a = acts.clone()
        a[:, u] = 0
        pred = (a @ w.T).argmax(1).tolist()
        for c in (0, 1):
            hits = [p == c for p, y in zip(pred, labels.tolist(), strict=True) if y == c]
            assert fast[u, c].item() == pytest.approx(sum(hits) / len(hits))


# ---- results ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    a: float
    pair: tuple[int, int]
    big: np.ndarray | None = figure_data()


@dataclass(frozen=True)
class Inner(Result):
    x: float


@dataclass(frozen=True)
class Rec(Result):
    SCHEMA = "mechscope.plumbing/2"
    FILE = "plumbing.json"
    score: float
    count: int
    t64: torch.Tensor
    flags: torch.Tensor
    arr: np.ndarray
    maybe: np.ndarray | None
    spans: tuple[float, ...]
    by_layer: dict[int, float]
    by_pos: dict[tuple[int, int], str]
    inners: list[Inner]
    part: Part
    where: Path
    fig: np.ndarray | None = figure_data()

    def json_extras(self) -> dict:
        return {"n_inners": len(self.inners)}


TINY = 0.1 + 2.0**-40  # not a float32


def make_rec() -> Rec:
    return Rec(
        float("nan"), np.int64(7), torch.tensor([TINY, float("nan")], dtype=torch.float64), torch.tensor([True, False]),
        np.array([[1.0, np.nan], [3.0, 4.0]]), np.array([2, 5]), (0.25, float("nan")), {3: 0.5, 11: 1.5},
        {(1, 2): "a"}, [Inner(1.5), Inner(-2.0)], Part(float("nan"), (4, 9), big=np.ones(3)), Path("runs/x"),
        fig=np.zeros(5),
    )  # fmt: skip


def test_the_json_is_the_fields_as_plain_values():
    """Truth: the JSON text read back with the json module (strict: NaN is not JSON), compared with the fields."""
    d = json.loads(json.dumps(make_rec().to_dict(), allow_nan=False))
    assert d == {
        "schema": "mechscope.plumbing/2", "score": None, "count": 7, "t64": [TINY, None], "flags": [True, False],
        "arr": [[1.0, None], [3.0, 4.0]], "maybe": [2, 5], "spans": [0.25, None], "by_layer": {"3": 0.5, "11": 1.5},
        "by_pos": {"1.2": "a"}, "inners": [{"x": 1.5}, {"x": -2.0}], "part": {"a": None, "pair": [4, 9]},
        "where": "runs/x", "n_inners": 2,
    }  # fmt: skip
    assert '"count": 7,' in json.dumps(make_rec().to_dict())  # an integer, not 7.0


def test_the_json_rebuilds_the_typed_fields(tmp_path):
    """Truth: the values written by hand in the JSON, typed as the fields declare (keys "1.2" and "5,6" are tuples)."""
    d = json.loads(json.dumps(make_rec().to_dict(), allow_nan=False)) | {"by_pos": {"1.2": "a", "5,6": "b"}}
    (tmp_path / "plumbing.json").write_text(json.dumps(d | {"schema": "mechscope.plumbing/1"}))
    r = Rec.load(tmp_path)  # the directory's FILE; an older version of the same kind
    assert math.isnan(r.score) and r.count == 7
    assert r.t64.dtype == torch.float64 and r.t64[0].item() == TINY and math.isnan(r.t64[1].item())
    assert r.flags.dtype == torch.bool and r.flags.tolist() == [True, False]
    assert isinstance(r.arr, np.ndarray) and r.arr.dtype == np.float64 and np.isnan(r.arr[0, 1]) and r.arr[1, 1] == 4
    assert isinstance(r.maybe, np.ndarray) and r.maybe.dtype == np.float64 and r.maybe.tolist() == [2.0, 5.0]
    assert r.spans[0] == 0.25 and math.isnan(r.spans[1]) and isinstance(r.spans, tuple)
    assert r.by_layer == {3: 0.5, 11: 1.5} and r.by_pos == {(1, 2): "a", (5, 6): "b"}
    assert r.inners == [Inner(1.5), Inner(-2.0)]
    assert isinstance(r.part, Part) and math.isnan(r.part.a) and r.part.pair == (4, 9) and r.part.big is None
    assert r.fig is None
    (tmp_path / "other.json").write_text(json.dumps(d | {"schema": "mechscope.other/2"}))
    with pytest.raises(RunError, match="expected a mechscope.plumbing/2 record"):
        Rec.load(tmp_path / "other.json")


def test_a_record_newer_than_its_class_is_refused(tmp_path):
    """Truth: versions written by hand. plumbing/2 reads /1 and /2; a /3 (or /10: compared as numbers, not text)
    record comes from a newer mechscope whose fields this one may misread, so it is refused in one line."""
    d = json.loads(json.dumps(make_rec().to_dict(), allow_nan=False))
    for version in ("1", "2"):
        assert Rec.from_dict(d | {"schema": f"mechscope.plumbing/{version}"}).count == 7
    for version in ("3", "10"):
        with pytest.raises(RunError, match=f"a mechscope.plumbing/{version} record, newer than this mechscope reads"):
            Rec.from_dict(d | {"schema": f"mechscope.plumbing/{version}"})


@dataclass(frozen=True)
class OwnReader(Result):
    """A result that rebuilds itself (as HeadsResult, NeuronsResult... do): from_dict reads its fields by hand."""

    SCHEMA = "mechscope.own/2"
    count: int

    @classmethod
    def from_dict(cls, d):
        return cls(d["count"])


def test_a_result_with_its_own_reader_loads_only_records_of_its_layout(tmp_path):
    """Truth: files written by hand. A class whose from_dict reads fields itself skipped the base checks: a list was
    'not readable (TypeError: list indices must be integers...)', another layout or a newer version was read by this
    one's rules. load() checks the record first, naming the file; /1, /2 and no schema load."""
    path = tmp_path / "own.json"
    for record in ({"schema": "mechscope.own/1", "count": 4}, {"schema": "mechscope.own/2", "count": 4}, {"count": 4}):
        path.write_text(json.dumps(record))
        assert OwnReader.load(path).count == 4
    for text, said in (("[1, 2]", "expected an OwnReader record (a JSON object), got list"),
                       ('{"schema": "mechscope.own/3", "count": 4}', "a mechscope.own/3 record, newer than this"),
                       ('{"schema": "mechscope.toy/1", "count": 4}', "expected a mechscope.own/2 record, got "
                        "mechscope.toy/1")):  # fmt: skip
        path.write_text(text)
        with pytest.raises(RunError, match=re.escape(f"{path}: {said}")):
            OwnReader.load(path)


@dataclass(frozen=True)
class _Three(Result):
    first: int
    second: str
    third: float = 0.5


def test_a_record_without_its_fields_names_them(tmp_path):
    """Truth: the class's own fields. A record missing some was "not a complete ... record: _Three.__init__() missing
    1 required positional argument: 'second'", one with none of them "... missing 2 required positional arguments";
    a field with a default may be absent."""
    path = tmp_path / "three.json"
    for record, said in (({"first": 1}, "not a complete _Three record: second missing"),
                         ({"other": 1}, "not a _Three record: it holds none of its fields")):  # fmt: skip
        path.write_text(json.dumps(record))
        with pytest.raises(RunError, match=f"^{re.escape(f'{path}: {said}')}$"):
            _Three.load(path)
    path.write_text(json.dumps({"first": 1, "second": "b"}))
    assert _Three.load(path) == _Three(1, "b", 0.5)
    from mechscope.cnn.methods.tuning import UnitTuning

    with pytest.raises(RunError, match="^expected a UnitTuning record"):  # "an UnitTuning" read wrong
        UnitTuning.from_dict("x")


def test_settings_of_another_type_and_graph_inputs_given_in_python_are_one_line():
    """Truth: the documented argument types. settings={...} was "'dict' object has no attribute 'validate'", tokens
    [[1, 2], [3, 4]] "Boolean value of Tensor ... ambiguous", "1,2,3" a TypeError from torch, a target True
    int('True'), logit_pos=2.5 position 2 without a word."""
    from mechscope.core.validate import settings_or
    from mechscope.lm.methods.attribution_graph import GraphSettings, attribution_graph
    from mechscope.lm.pipelines.attribution_graph import prompt_tokens, resolve_targets
    from tests.unit.test_heads import hand_built

    assert settings_or(None, GraphSettings) == GraphSettings() and settings_or(None, _Three, first=1, second="b").first
    with pytest.raises(MechscopeError, match="^settings must be a GraphSettings .or None for the defaults., got dict"):
        settings_or({"batch_size": 4}, GraphSettings)
    model = hand_built()
    for tokens in (torch.tensor([[1, 2], [3, 4]]), "1,2,3", [1, 2.5]):
        with pytest.raises(MechscopeError, match="^tokens must be one prompt's|^token ids are integers, got 2.5"):
            prompt_tokens(model, None, None, tokens)
    assert prompt_tokens(model, None, None, torch.tensor([3, 4]), bos=False).tolist() == [3, 4]
    for target in (True, 5.0):
        with pytest.raises(MechscopeError, match="^a target is a token id or a one-token text, got "):
            resolve_targets(model, None, [target])
    with pytest.raises(MechscopeError, match=r"^logit_pos \(--logit-pos\) must be an integer, got 2.5"):
        attribution_graph(model, None, [1, 2, 3], logit_pos=2.5)
    # and what worked before, from a review: numpy and 0-d tensor ids, a batch of one prompt, one nesting too many
    assert resolve_targets(model, None, [np.int64(5), torch.tensor(6)]) == [5, 6]
    assert prompt_tokens(model, None, None, torch.tensor([[3, 4]]), bos=False).tolist() == [3, 4]
    with pytest.raises(MechscopeError, match="^token ids are integers, got a list: one prompt's ids, not a batch$"):
        prompt_tokens(model, None, None, [[1, 2, 3]])
    from mechscope.lm.pipelines.attribution_graph import check_qk

    check_qk(model, [(1, 1), (0, 1, 5, 2), [np.int64(1), 0, torch.tensor(3)]], 6)  # before the graph is computed
    for spec, said in (((0, 1.5), "a QK head's layer, head and positions must be an integer, got 1.5"),
                       ((0,), r"a QK head is \(layer, head\[, query_pos\[, key_pos\]\]\), got \(0,\)"),
                       ((2, 0), "head 2.0 outside the model's 2 layers x 2 heads"),
                       ((0, 0, 6), "QK position 6 outside the prompt's 0..5")):  # fmt: skip
        with pytest.raises(MechscopeError, match=said):
            check_qk(model, [spec], 6)
    from mechscope.core.validate import check_int

    assert check_int(torch.tensor(5), "n") == 5 and check_int(np.array(7), "n") == 7
    with pytest.raises(MechscopeError, match="n must be an integer, got 2.5"):
        check_int(torch.tensor(2.5), "n")
    import mechscope.clip.pipelines.neurons as clip_neurons
    import mechscope.lm.pipelines.neurons as lm_neurons

    with pytest.raises(MechscopeError, match="must be a mechscope.clip.pipelines.neurons.NeuronSettings .* got "
                                             "mechscope.lm.pipelines.neurons.NeuronSettings"):  # "got NeuronSettings"
        settings_or(lm_neurons.NeuronSettings(), clip_neurons.NeuronSettings)


# ---- statistics ---------------------------------------------------------------------------------------------------


def test_rank_statistics_of_many_rows_at_once_are_scipys_row_by_row():
    """Truth: scipy.stats.rankdata and spearmanr on each row alone; rows of different spread so that a norm taken
    over the whole batch, or the ranks of the first row used for every row, would show."""
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, 4, (3, 2, 9), generator=g).double() * torch.tensor([1.0, 10.0])[:, None]  # ties
    b = torch.randn(3, 18, generator=g, dtype=torch.float64)
    ranks = rankdata(a)
    rho = spearman(a, b)
    for i in range(3):
        for j in range(2):
            np.testing.assert_allclose(ranks[i, j].numpy(), stats.rankdata(a[i, j].numpy()))
        assert rho[i].item() == pytest.approx(
            stats.spearmanr(a[i].flatten().numpy(), b[i].numpy()).statistic, abs=1e-12
        )


def test_spearman_of_rows_with_fewer_than_two_values_is_nan():
    """Truth: scipy.stats.spearmanr of one pair is NaN (no ranks to correlate); an empty row has none either."""
    stats = pytest.importorskip("scipy.stats")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isnan(stats.spearmanr([1.0], [2.0]).statistic)
    for n in (0, 1):
        rho = spearman(torch.ones(3, n), torch.ones(3, n))
        assert rho.shape == (3,) and rho.isnan().all()


def test_sample_sd_of_two_values_is_their_gap_over_root_two():
    """Truth: the formula: for two values the ddof-1 standard deviation is |a − b| / √2."""
    assert float(sample_sd([1.0, 4.0])) == pytest.approx(3 / math.sqrt(2))
    np.testing.assert_allclose(
        sample_sd(np.array([[0.0, 2.0], [5.0, 1.0]]), axis=0), [5 / math.sqrt(2), 1 / math.sqrt(2)]
    )


# ---- the fallback page and the renderer registry ------------------------------------------------------------------


@dataclass(frozen=True)
class Shown(Result):
    model: str
    eight: dict
    nine: dict
    twelve: list
    thirteen: list
    ratio: float
    grid: np.ndarray


def test_the_fields_page_shows_each_value_in_short():
    """Truth: the page parsed with html.parser; each cell written by hand (a dict of 8 and a list of 12 written out,
    one more is counted, a float to 4 significant digits, an array by its shape)."""
    eight = {f"k{i}": i for i in range(8)}
    r = Shown("gpt2", eight, eight | {"k8": 8}, list(range(12)), list(range(13)), 0.123456, np.zeros((2, 3)))
    cells = {row["field"]: row["value"] for row in Page(show.fields_page(r)).table("field")}
    assert cells == {
        "model": "gpt2", "eight": ", ".join(f"k{i}: {i}" for i in range(8)), "nine": "dict of 9",
        "twelve": "[" + ", ".join(map(str, range(12))) + "]", "thirteen": "13 items", "ratio": "0.1235",
        "grid": "array [2, 3]",
    }  # fmt: skip
    assert show.summary_text(r).startswith("<mechscope Shown of gpt2: ")


@dataclass(frozen=True)
class ShownAgain(Shown):
    pass


def test_a_subclass_takes_its_parents_renderer_and_sections_kept_open(monkeypatch):
    """Truth: the fragment's own markup: a section named in keep_open is not folded into a <summary>, the others
    after the first are; the page is the one registered for the parent class."""
    body = "".join(f"<h2>{t}</h2><p>{t} text</p>" for t in ("Alpha", "Beta", "Gamma"))
    monkeypatch.setattr(show, "_REGISTRY", dict(show._REGISTRY))  # the registration is undone after the test
    show.renders(Shown, keep_open=("Gamma",))(lambda r, full: show.page("P", body))
    r = ShownAgain("m", {}, {}, [], [], 1.0, np.zeros(1))
    frag = show.to_html(r)
    assert "Gamma text" in frag and "<summary>Beta</summary>" in frag and "<summary>Gamma</summary>" not in frag


# ---- paths and command-line options -------------------------------------------------------------------------------


def test_the_data_root_prefers_the_argument_then_a_non_empty_variable(monkeypatch, tmp_path):
    """Truth: the documented order data_dir > $MECHSCOPE_DATA > ~/.cache/mechscope/data, an empty variable unset."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MECHSCOPE_DATA", "/env/data")
    assert resolve_data_dir("/arg/data") == Path("/arg/data") and resolve_data_dir() == Path("/env/data")
    monkeypatch.setenv("MECHSCOPE_DATA", "")
    assert resolve_data_dir() == tmp_path / ".cache" / "mechscope" / "data"


def test_a_run_of_unsafe_characters_becomes_one_underscore(monkeypatch, tmp_path):
    """Truth: written by hand: "org / name  v2" (no such folder) keeps its safe characters, each run of others is _."""
    monkeypatch.chdir(tmp_path)
    assert model_out("heads", "org / name  v2") == Path("runs/heads/org_name_v2")


def test_another_wing_is_named_only_for_a_folder_this_wing_does_not_take(tmp_path):
    """Truth: a train-toy run (training.json and checkpoints/) is taken by the lm commands, so lm says nothing and
    the cnn commands point to lm."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "training.json").write_text("{}")
    assert other_wing(tmp_path, "lm") == ""
    assert other_wing(tmp_path, "cnn") == " (it is a train-toy run: the lm commands take it with --model)"


def test_graph_check_lines_put_each_number_after_its_own_words():
    """Truth: every number read back with a regular expression, each distinct, against the field it names."""
    scores = {"replacement": 0.111, "replacement_pruned": 0.222, "completeness": 0.333, "completeness_pruned": 0.444}
    exact = {"logits_max_abs_diff": 1.5e-6, "edges_max_abs_error": 2.5e-4, "edges_sources_checked": 17}
    lines = graph_check_lines(SimpleNamespace(scores=scores, exactness=exact))
    m = re.fullmatch(r"replacement score (\S+) \(pruned (\S+)\), completeness (\S+) \(pruned (\S+)\)", lines[0])
    assert [float(v) for v in m.groups()] == [0.111, 0.222, 0.333, 0.444]
    m = re.fullmatch(r"exactness: logits max \|diff\| (\S+), edges max \|error\| (\S+) over (\d+) sources", lines[1])
    assert (float(m[1]), float(m[2]), int(m[3])) == (1.5e-6, 2.5e-4, 17)
    lines = graph_check_lines(SimpleNamespace(scores=scores, exactness={"logits_max_abs_diff": 3e-7}))
    assert lines[1] == "exactness: logits max |diff| 3.00e-07"


def test_a_graph_whose_logits_no_source_reaches_says_its_scores_are_undefined():
    """Truth: circuit-tracer's replacement score is a share of the logits' influence, 0/0 where no input or error
    node reaches them (a graph limited to the logits' rows: NaN in memory, null once read back from graph.json); the
    line says so rather than print "nan", and an empty list of inputs is said in words."""
    for missing in (float("nan"), None):
        scores = {
            "replacement": missing,
            "replacement_pruned": missing,
            "completeness": 1.0,
            "completeness_pruned": 1.0,
        }
        line = graph_check_lines(SimpleNamespace(scores=scores, exactness={"logits_max_abs_diff": 0.0}))[0]
        assert line.startswith("replacement score undefined (pruned undefined), completeness 1.000 (pruned 1.000) (")
        assert "nan" not in line and "too few features with rows" in line
    assert strongest_inputs([], str) == "none in the pruned graph"
    assert strongest_inputs([({"id": "a"}, 0.5), ({"id": "b"}, -0.25)], lambda n: n["id"]) == "a +0.500, b -0.250"


def test_the_threads_options_check_and_default_as_their_help_says():
    """Truth: the option's own help text ("default 1"), and check_threads' range from 1."""
    assert "default 1" in ThreadsOneOpt.help and ThreadsOneOpt.default == 1
    assert _threads(None) is None and _threads(1) == 1
    with pytest.raises(MechscopeError, match="--threads must be an integer from 1"):
        _threads(0)


def test_a_tuple_keyed_dict_survives_its_own_json():
    """Truth: to_dict then from_dict gives the same keys back (the generic path; HeadAblation writes "1.2" itself)."""
    r = Rec.from_dict(json.loads(json.dumps(make_rec().to_dict(), allow_nan=False)))
    assert r.by_pos == {(1, 2): "a"}
