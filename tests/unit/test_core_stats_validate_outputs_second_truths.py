"""Statistics, the kept-channel sum, input checks and outputs, second pass, against outside truths: scipy.stats'
rank correlation, numpy recomputations, hand-counted shares, each limit at and just past it, the file system read
back (os.listdir, bytes, modes) and files read back with the json module. Each test pins a behaviour whose mutation
no earlier test noticed."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from mechscope.core import outputs as O
from mechscope.core import validate as V
from mechscope.core.errors import MechscopeError, RunError
from mechscope.core.kept_sum import Rates, unit_ablation_accuracy
from mechscope.core.stats import sample_sd, spearman
from tests.unit.test_outputs import leftovers


def _raises(call, pattern: str) -> str:
    with pytest.raises(MechscopeError, match=pattern) as e:
        call()
    assert "\n" not in str(e.value)
    return str(e.value)


# ---- stats.py ----------------------------------------------------------------------------------------------------


def test_spearman_of_two_values_per_row_is_scipys_plus_or_minus_one():
    """Truth: scipy.stats.spearmanr of two pairs is +1 when they move together and −1 when they move apart; only a
    single pair has no correlation."""
    stats = pytest.importorskip("scipy.stats")
    a = torch.tensor([[1.0, 2.0], [1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[5.0, 9.0], [9.0, 5.0], [0.0, 4.0]], dtype=torch.float64)
    want = [stats.spearmanr(a[i].numpy(), b[i].numpy()).statistic for i in range(3)]
    assert want == pytest.approx([1.0, -1.0, -1.0], abs=1e-12)
    assert spearman(a, b).tolist() == pytest.approx(want, abs=1e-12)


def test_sample_sd_over_a_middle_axis_and_of_one_value_along_an_axis():
    """Truth: numpy's std with ddof=1 recomputed as a plain loop (√(Σ(x − mean)² / (n − 1))); one value along the
    axis asked about gives zeros of numpy's reduced shape, even where another axis has one value."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 3, 4))
    got = sample_sd(x, axis=1)
    assert got.shape == (2, 4)
    for i in range(2):
        for k in range(4):
            col = [x[i, j, k] for j in range(3)]
            mean = sum(col) / 3
            assert got[i, k] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in col) / 2))
    row = sample_sd(np.array([[1.0, 2.0, 3.0, 4.0, 5.0]]), axis=1)  # one row, five values: Σ(x − 3)² / 4 = 2.5
    assert row.tolist() == pytest.approx([math.sqrt(2.5)])
    single = sample_sd(np.arange(5.0)[:, None], axis=1)
    assert single.shape == (5,) and single.tolist() == [0.0] * 5


# ---- kept_sum.py -------------------------------------------------------------------------------------------------


def test_rates_count_the_other_classes_over_their_own_number():
    """Truth: hand counts. Labels 0,0,0,1,1,2 (three of class 0, three others); predictions 0,1,0,0,0,2: class 0 is
    right on 2 of 3 and called on 2 of the 3 others; class 3 has no inputs, so its accuracy is NaN."""
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 1, 0, 0, 0, 2])
    rates = Rates(labels, 4)
    assert rates(pred, 0) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert rates(pred, 2) == (1.0, 0.0)
    acc, false = rates(pred, 3)
    assert math.isnan(acc) and false == 0.0
    empty = Rates(torch.zeros(0, dtype=torch.long), 2)
    assert all(math.isnan(v) for v in empty(torch.zeros(0, dtype=torch.long), 0))


def _reference_accuracy(logits, diff, weight, units, labels, n_classes):
    """The docstring's reference, as a plain loop in numpy: per unit, per input, the changed logits' argmax."""
    lg, df, w, lb = logits.numpy(), diff.numpy(), weight.numpy(), labels.numpy()
    out = np.zeros((len(units), n_classes))
    for i, u in enumerate(units.tolist()):
        for c in range(n_classes):
            rows = [n for n in range(len(lb)) if lb[n] == c]
            hits = [int(np.argmax(lg[n] + df[n, u] * w[:, u]) == c) for n in rows]
            out[i, c] = sum(hits) / len(rows) if rows else 0.0
    return out


def test_unit_ablation_accuracy_sees_every_flip_a_large_change_makes():
    """Truth: the reference recomputed in numpy, on inputs whose margins are small next to a unit's reach, so that
    every input's verdict can change and a narrow recompute band would miss flips."""
    g = torch.Generator().manual_seed(11)
    n, k, d = 60, 3, 4
    logits = torch.randn(n, k, generator=g) * 0.3
    diff = torch.randn(n, d, generator=g)
    weight = torch.randn(k, d, generator=g)
    labels = torch.randint(0, k, (n,), generator=g)
    units = torch.tensor([0, 2, 3])
    got = unit_ablation_accuracy(logits, diff, weight, units, labels, k)
    want = _reference_accuracy(logits, diff, weight, units, labels, k)
    base = _reference_accuracy(logits, diff * 0, weight, units, labels, k)
    assert not np.allclose(want, base)  # the units do change verdicts
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)


# ---- validate.py: each limit at and just past it -----------------------------------------------------------------


def test_field_ranges_are_inclusive_at_both_ends_for_one_value_and_for_lists():
    """Docstring: within lo..hi, both ends allowed; one step past either end is refused, for an int, a number and
    every item of a list."""
    assert V.field({"n": 1}, "n", "int", "c.json", lo=1, hi=4) == 1
    assert V.field({"n": 4}, "n", "int", "c.json", lo=1, hi=4) == 4
    assert V.field({"p": 1.0}, "p", "number", "c.json", lo=0, hi=1) == 1.0
    assert V.field({"v": [0, 4]}, "v", "ints", "c.json", lo=0, hi=4) == [0, 4]
    assert V.field({"v": 0.5}, "v", "numbers", "c.json", lo=0.5, hi=2.5) == 0.5
    _raises(lambda: V.field({"n": 5}, "n", "int", "c.json", lo=1, hi=4), r"is 5; expected an integer from 1 to 4$")
    _raises(
        lambda: V.field({"v": [0, 5]}, "v", "ints", "c.json", hi=4), r"is \[0, 5\]; expected a list of integers ≤ 4$"
    )
    _raises(lambda: V.field({"v": [3, 0.25]}, "v", "numbers", "c.json", lo=0.5), r"expected .* ≥ 0\.5$")


def test_field_refuses_nan_an_empty_number_list_and_a_value_not_among_the_choices():
    """RFC 8259 has no NaN or infinity (a finite number is expected); "a finite number or a list of them" needs at
    least one; choices are listed as JSON values in their order."""
    for bad in (float("nan"), float("inf"), [1.0, float("-inf")], []):
        _raises(lambda bad=bad: V.field({"x": bad}, "x", "numbers", "c.json"), "expected a finite number or a list")
    _raises(lambda: V.field({"x": float("nan")}, "x", "number", "c.json"), r"is NaN; expected a finite number$")
    msg = _raises(lambda: V.field({"a": "tanh"}, "a", "str", "h.json", choices=("relu", "gelu")), "^h.json")
    assert msg == 'h.json: field \'a\' is "tanh"; expected one of "relu", "gelu"'
    assert V.field({"a": "gelu"}, "a", "str", "h.json", choices=("relu", "gelu")) == "gelu"


def test_the_expected_text_writes_fractions_as_g_and_a_long_value_in_sixty_characters():
    """Python's format spec: 0.001 is "0.001" under :g; 1/3 is "0.333333" (str: 16 digits); a value whose JSON is longer
    than 60 characters is shown as its first 57 and "...", 60 in all."""
    _raises(lambda: V.field({"e": 0.5}, "e", "number", "c", lo=0.001, hi=0.25), r"from 0\.001 to 0\.25$")
    _raises(lambda: V.field({"e": 0}, "e", "number", "c", lo=1 / 3), r"≥ 0\.333333$")  # six significant digits
    long = "x" * 100
    text = json.dumps(long)
    assert V.shown(long) == text[:57] + "..." and len(V.shown(long)) == 60
    assert V.shown("y" * 58) == json.dumps("y" * 58)  # exactly 60 characters: shown whole


def test_strict_json_refuses_nan_and_infinity_which_pythons_reader_takes():
    """RFC 8259 §6: NaN and Infinity are not JSON numbers (the json module reads them all the same)."""
    assert math.isnan(json.loads('{"a": NaN}')["a"])
    for text in ('{"a": NaN}', "[Infinity]", "-Infinity"):
        with pytest.raises(ValueError, match="is not JSON"):
            V.strict_loads(text)


def test_a_text_file_of_only_whitespace_is_empty(tmp_path):
    """Docstring: an empty file is refused; a file of spaces and newlines holds no text either."""
    p = tmp_path / "t.txt"
    p.write_text("  \n\t\n")
    _raises(lambda: V.read_text_file(p, "prompt"), r"t\.txt: the prompt file is empty$")
    p.write_text(" a ")
    assert V.read_text_file(p) == " a "


def test_seed_lr_count_and_int_take_their_upper_limits_and_refuse_one_past():
    """Docstrings: a seed up to 2**63 − 1, a learning rate in (0, 10], a count up to ``high``, an int within
    [low, high]: each top value is taken, one step past is refused."""
    V.check_seed(2**63 - 1)
    _raises(lambda: V.check_seed(2**63), "from 0 to 2")
    V.check_lr(10.0)
    V.check_lr(1e-9)
    _raises(lambda: V.check_lr(10.000001), r"--lr must be in \(0, 10\], got 10.000001$")
    _raises(lambda: V.check_lr(float("nan")), "got nan")
    _raises(lambda: V.check_lr(True), "got True$")  # as check_seed and check_count refuse a bool
    V.check_count(10**7, "--steps")
    _raises(lambda: V.check_count(10**7 + 1, "--steps"), r"^--steps must be at most 10,000,000, got 10,000,001$")
    assert V.check_int(9, "--n", low=2, high=9) == 9
    assert V.check_int(np.int64(3), "--n") == 3


def test_the_threads_cap_is_four_per_core_from_os_cpu_count(monkeypatch):
    """Docstring: four threads per core; os.cpu_count() faked to 3 cores gives 12, taken, and 13 refused."""
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert V.max_threads() == 12
    V.check_threads(12)
    _raises(lambda: V.check_threads(13), r"from 1 to 12 \(4 per core here\), got 13$")


def test_repeated_indices_and_items_as_their_docstrings_say():
    """Docstrings: repeated names each item given twice once, sorted; indices are exactly n parts of digits; a
    string given as a list is one item, a tuple its items."""
    assert V.repeated(["b", "a", "c", "b", "a", "b"]) == ["a", "b"]
    assert V.repeated([1, 2, 3]) == []
    assert V.indices("5.1") == (5, 1) and V.indices("1:2:3", 3, ":") == (1, 2, 3)
    for bad in ("5.1.2", "5", "-0.3", "a.1"):
        with pytest.raises(ValueError):
            V.indices(bad)
    assert V.as_items(None, "x") is None and V.as_items(3, "x") == (3,) and V.as_items((1, 2), "x") == (1, 2)
    _raises(lambda: V.as_items({"a": 1}, "--classes"), r"^--classes must be a list \(or one item\), got dict$")


def test_check_finite_counts_nan_and_both_infinities():
    """Truth: numpy's count of non-finite values (NaN, +inf and −inf all count): 3 here."""
    x = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 2.0])
    assert int((~np.isfinite(x.numpy())).sum()) == 3
    _raises(lambda: V.check_finite(x, "conv1"), "^conv1: 3 values are not finite")
    V.check_finite(torch.zeros(3), "ok")


# ---- outputs.py: files read back ---------------------------------------------------------------------------------


def test_numpy_scalars_paths_and_tuple_keys_are_written_as_their_json_types(tmp_path):
    """Truth: the bytes read back with the json module: numpy's int64 is a JSON integer (3, not 3.0), its bool_ is
    true, a path is its own string, a tuple key is its str(), a tuple a list."""
    O.write_json(tmp_path / "v.json", {"n": np.int64(3), "b": np.bool_(True), "f": np.float32(0.5),
                                       "p": Path("/a/b.txt"), (1, 2): ("x", 4)})  # fmt: skip
    text = (tmp_path / "v.json").read_text(encoding="utf-8")
    data = json.loads(text)
    assert data == {"n": 3, "b": True, "f": 0.5, "p": "/a/b.txt", "(1, 2)": ["x", 4]}
    assert type(data["n"]) is int and type(data["b"]) is bool and '"n": 3,' in text


def test_a_bare_non_finite_value_is_named_by_a_dot(tmp_path):
    """Docstring: the replaced fields are named by their path; the whole value has the path "." (not ""), and the
    file holds JSON null."""
    assert O.write_json(tmp_path / "x.json", float("-inf")) == {".": "-Infinity"}
    assert json.loads((tmp_path / "x.json").read_text()) is None
    assert O.finite_json([float("nan"), 2.0]) == ([None, 2.0], {"[0]": "NaN"})


def test_a_record_keeps_the_versions_it_already_holds(tmp_path):
    """Docstring: a record's versions entry is added when it has none; one it holds (a record read back and written
    again) is what made it and stays, in its place."""
    O.write_json(tmp_path / "r.json", {"schema": "s/1", "a": 1, "versions": {"mechscope": "0.0.1"}})
    data = json.loads((tmp_path / "r.json").read_text())
    assert data == {"schema": "s/1", "a": 1, "versions": {"mechscope": "0.0.1"}}
    assert list(data) == ["schema", "a", "versions"]


def test_same_weights_names_the_recorded_hash_first_and_this_models_second():
    """By hand: digests of distinct first twelve characters; the sentence names the recorded one as the output's."""
    theirs, mine = "a" * 12 + "0" * 52, "b" * 12 + "1" * 52
    assert O.same_weights({"weights_sha256": mine}, mine) == (True, "")
    ok, why = O.same_weights({"weights_sha256": theirs}, mine)
    assert not ok and why == f"it was made from other weights (sha256 {'a' * 12}, this model {'b' * 12})"
    assert O.same_weights({}, mine)[0] is False and "no weights hash" in O.same_weights([], mine)[1]


class _Linked:
    weights_sha256 = "c" * 64

    @classmethod
    def load(cls, path):
        if Path(path).read_text() != "ok":
            raise RunError(f"{path}: unreadable")
        return cls()


def test_read_linked_refuses_an_output_of_other_weights_and_reads_a_missing_one_as_nothing(tmp_path):
    """By hand: a file written here, loaded by a class that records the weights hash "c"·64; a digest of "d"·64 is
    other weights, None is any weights; a missing file is (None, ""), an unreadable one a reason."""
    p = tmp_path / "out.json"
    p.write_text("ok")
    result, why = O.read_linked(p, _Linked, "d" * 64)
    assert result is None and why.startswith("it was made from other weights (sha256 cccccccccccc")
    assert isinstance(O.read_linked(p, _Linked, "c" * 64)[0], _Linked)
    assert isinstance(O.read_linked(p, _Linked)[0], _Linked)
    assert O.read_linked(tmp_path / "none.json", _Linked, "c" * 64) == (None, "")
    p.write_text("bad")
    assert O.read_linked(p, _Linked)[1] == f"unreadable ({p}: unreadable)"


def test_force_over_a_full_folder_keeps_its_other_files_and_replaces_the_namesakes(tmp_path):
    """Truth: os.listdir and the bytes read back: with force, the command's two files replace their namesakes, the
    user's other file and folder stay as they were, and nothing temporary is left beside the target."""
    out = tmp_path / "out"
    (out / "mine").mkdir(parents=True)
    (out / "mine" / "keep.txt").write_text("user")
    (out / "notes.txt").write_text("user notes")
    (out / "a.json").write_text("old")
    with O.atomic_output(out, force=True) as tmp:
        (tmp / "a.json").write_text("new a")
        (tmp / "b.json").write_text("new b")
    assert sorted(os.listdir(out)) == ["a.json", "b.json", "mine", "notes.txt"]
    assert [(out / n).read_text() for n in ("a.json", "b.json", "notes.txt")] == ["new a", "new b", "user notes"]
    assert (out / "mine" / "keep.txt").read_text() == "user" and leftovers(tmp_path) == []


def test_write_text_atomic_gives_the_mode_a_new_file_would_have(tmp_path):
    """Truth: os.stat of a file opened the ordinary way under the same umask (mkstemp alone gives 0600)."""
    old = os.umask(0o027)
    try:
        O.write_text_atomic(tmp_path / "t.txt", "hello")
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "t.txt").st_mode) == stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode)
    assert (tmp_path / "t.txt").read_text() == "hello" and sorted(os.listdir(tmp_path)) == ["plain.txt", "t.txt"]


def test_a_link_to_an_empty_folder_is_written_through_like_a_link_to_a_full_one(tmp_path):
    """Truth: os.listdir of the linked folder, compared with the same command given --force over a link to a folder
    that holds a file (which writes through the link): the outputs land in the folder, nothing temporary is left."""
    for name, force in (("full", True), ("empty", False)):
        (tmp_path / name).mkdir()
        if force:
            (tmp_path / name / "user.txt").write_text("u")
        (tmp_path / f"{name}-link").symlink_to(tmp_path / name)
        with O.atomic_output(tmp_path / f"{name}-link", force=force) as tmp:
            (tmp / "a.txt").write_text("x")
        assert "a.txt" in os.listdir(tmp_path / name) and leftovers(tmp_path) == [], name


def test_a_broken_link_as_the_output_folder_is_refused_before_any_work(tmp_path):
    """Truth: os.readlink and os.path.exists: a link to nothing exists as a link only, so the outputs could never
    move in; check_target (which every command calls first) refuses it in one line naming the link's target."""
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert os.path.islink(tmp_path / "dangling") and not os.path.exists(tmp_path / "dangling")
    with pytest.raises(O.RunError, match=r"dangling: a broken link \(to .*nowhere\); remove it"):
        O.check_target(tmp_path / "dangling")
    assert leftovers(tmp_path) == []


def test_a_config_nested_past_pythons_recursion_limit_is_not_another_wings_folder(tmp_path):
    """Truth: json.loads itself raises RecursionError on 100,000 nested brackets (CPython's limit is far lower); the
    folder is then of no known kind (None), and is not a tracr folder, instead of the error escaping."""
    from mechscope.core.paths import folder_kind
    from mechscope.lm.models.convert.tracr import is_tracr_dir

    text = "[" * 100_000 + "]" * 100_000
    with pytest.raises(RecursionError):
        json.loads(text)
    (tmp_path / "config.json").write_text(text)
    assert folder_kind(tmp_path) is None and is_tracr_dir(tmp_path) is False
