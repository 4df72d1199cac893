"""Plumbing whose numbers reach the reports, second pass, against outside truths: forward and backward calls counted
by plain torch hooks written here beside WorkCounter's; torch's own hook dictionaries after the counting; hand sums
for combine_work; pages parsed with html.parser; the staged training's counts by hand (steps x batch), its stream
record read with json; torchrun's joining with a recorded init_process_group; matplotlib's own rcParams."""

from __future__ import annotations

import json
from dataclasses import dataclass

import matplotlib
import numpy as np
import pytest
import torch
from torch import nn

from mechscope.core import show
from mechscope.core import torch_utils as tu
from mechscope.core.dictionaries import DictionaryConfig, harvest
from mechscope.core.dictionaries import parallel as DP
from mechscope.core.dictionaries.staged import claim_stage, train_from_store, train_staged, training_fields
from mechscope.core.dictionaries.train import TrainConfig
from mechscope.core.errors import MechscopeError
from mechscope.core.render import parallel as RP
from mechscope.core.results import Result
from tests.dictionaries.test_store import corpus
from tests.unit.test_cnn_pages_truths import Page

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- WorkCounter against plain torch hooks ------------------------------------------------------------------------


class Chain(nn.Module):
    def __init__(self, n: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(n)])

    def forward(self, x, start: int = 0):
        for b in self.blocks[start:]:
            x = torch.tanh(b(x))
        return x


def _plain_hooks(blocks) -> tuple[dict, list]:
    """Rows seen by register_forward_hook / register_full_backward_hook, the test's own count."""
    seen = {"f_calls": 0, "f_rows": 0, "b_calls": 0, "b_rows": 0}

    def fwd(m, args, out):
        seen["f_calls"] += 1
        seen["f_rows"] += args[0].shape[0]

    def bwd(m, gin, gout):
        seen["b_calls"] += 1
        seen["b_rows"] += gout[0].shape[0]

    handles = [h for b in blocks for h in (b.register_forward_hook(fwd), b.register_full_backward_hook(bwd))]
    return seen, handles


def test_counts_equal_plain_torch_hooks_and_every_hook_is_gone_after():
    """Truth: torch's forward and full-backward hooks on each block, counted by the test; and torch's own
    _forward_pre_hooks / _forward_hooks dicts, empty again once the counting ends. Batches of 5, 3 (from block 1),
    7 with a backward: distinct rows."""
    model = Chain(3)
    seen, handles = _plain_hooks(model.blocks)
    counter = tu.WorkCounter(model.blocks, "rows")
    with counter.counting():
        with torch.no_grad():
            model(torch.randn(5, 4))
            model(torch.randn(3, 4), start=1)
        model(torch.randn(7, 4, requires_grad=True)).sum().backward()
    for h in handles:
        h.remove()
    assert (counter.forward_calls, counter.forward_rows) == (seen["f_calls"], seen["f_rows"]) == (8, 15 + 6 + 21)
    assert (counter.backward_calls, counter.backward_rows) == (seen["b_calls"], seen["b_rows"]) == (3, 21)
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in model.blocks)
    work = counter.summary(7)
    assert work["forward_rows"] == 42 // 3 and work["forward_passes"] == round(42 / 3 / 7, 3)
    assert work["backward_rows"] == 7 and work["backward_passes"] == 1.0


def test_a_layer_called_by_keyword_counts_its_forward_as_its_backward():
    """Truth: the test's own count, by hand: a block called as ``block(input=x)`` (torch passes it as a keyword) runs
    a forward of 6 rows and, with the backward, a backward of 6; before, only the backward was counted."""
    block = nn.Linear(4, 4)
    counter = tu.WorkCounter([block], "rows")
    with counter.counting():
        block(input=torch.randn(6, 4, requires_grad=True)).sum().backward()
    assert (counter.forward_calls, counter.forward_rows) == (1, 6)
    assert (counter.backward_calls, counter.backward_rows) == (1, 6)


def test_a_summary_over_no_rows_keeps_zero_and_does_not_divide_by_it():
    """Truth: the documented record: rows_per_pass is what was given (0 for an empty input); the passes divide by
    at least one row (6 rows through 2 layers: 3 rows, 3.0)."""
    counter = tu.WorkCounter([nn.Identity(), nn.Identity()], "tokens")
    counter.forward_rows = 6
    work = counter.summary(0)
    assert work["rows_per_pass"] == 0 and work["forward_passes"] == 3.0 and work["forward_tokens"] == 3
    both = tu.combine_work({"a": work}, "a", 0)
    assert both["rows_per_pass"] == 0 and both["forward_passes"] == 3.0


def test_module_counting_counts_every_counter_at_once():
    """Truth: two networks' forwards counted by the test's plain hooks: 4 rows through 2 blocks, 9 through 3."""
    a, b = Chain(2), Chain(3)
    (sa, ha), (sb, hb) = _plain_hooks(a.blocks), _plain_hooks(b.blocks)
    counters = {"a": tu.WorkCounter(a.blocks, "rows"), "b": tu.WorkCounter(b.blocks, "rows")}
    with tu.counting(counters) as got, torch.no_grad():
        assert got is counters
        a(torch.randn(4, 4))
        b(torch.randn(9, 4))
    for h in ha + hb:
        h.remove()
    assert counters["a"].forward_rows == sa["f_rows"] == 8 and counters["b"].forward_rows == sb["f_rows"] == 27
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in [*a.blocks, *b.blocks])


def test_combine_work_of_three_parts_by_hand():
    """Truth: hand sums of distinct numbers (forward 11 + 23 + 5, backward 0 + 7 + 2) in passes of 8 rows; each
    part's own passes beside it."""
    parts = {
        name: {"unit": "rows", "forward_rows": f, "backward_rows": b, "layer_calls": {"forward": cf, "backward": cb}}
        for name, f, b, cf, cb in (("x", 11, 0, 1, 0), ("y", 23, 7, 4, 2), ("z", 5, 2, 9, 3))
    }
    work = tu.combine_work(parts, "three", 8)
    assert (work["forward_rows"], work["backward_rows"]) == (39, 9)
    assert (work["forward_passes"], work["backward_passes"]) == (round(39 / 8, 3), round(9 / 8, 3))
    assert work["layer_calls"] == {"forward": 14, "backward": 5}
    assert work["parts"]["y"] == {"forward_passes": round(23 / 8, 3), "backward_passes": round(7 / 8, 3)}
    assert list(work["parts"]) == ["x", "y", "z"]


# ---- the notebook display -----------------------------------------------------------------------------------------


class Heads(Page):
    """Page, and the text of <title> and <h1>."""

    def __init__(self, html: str):
        self.heads, self._head = {}, None
        super().__init__(html)

    def handle_starttag(self, tag, attrs):
        super().handle_starttag(tag, attrs)
        if tag in ("title", "h1"):
            self._head = tag
            self.heads[tag] = ""

    def handle_endtag(self, tag):
        super().handle_endtag(tag)
        self._head = None

    def handle_data(self, data):
        super().handle_data(data)
        if self._head:
            self.heads[self._head] += data


def test_page_and_table_escape_their_text_and_show_nan_as_a_dash():
    """Truth: html.parser's unescaped text is the original "<a & b>"; a float to 3 decimals, NaN as an em dash."""
    p = Heads(show.page("<a & b>", show.table_html(["<x>", "y"], [[float("nan"), 1.23456], ["<i>", 2]])))
    assert p.heads == {"title": "<a & b>", "h1": "<a & b>"}
    assert p.tables == [[["<x>", "y"], ["—", "1.235"], ["<i>", "2"]]]


@dataclass(frozen=True)
class Inner:
    a: int


@dataclass(frozen=True)
class Odd(Result):
    model: str
    tensor: torch.Tensor
    inner: Inner


def test_the_fields_page_shows_a_tensor_by_shape_and_a_nested_record_by_name():
    """Truth: the page parsed with html.parser; the shape and class name written by hand."""
    r = Odd("", torch.zeros(3, 1, 2), Inner(5))
    cells = {row["field"]: row["value"] for row in Page(show.fields_page(r)).table("field")}
    assert cells == {"model": "", "tensor": "array [3, 1, 2]", "inner": "Inner"}
    assert show.summary_text(r) == "<mechscope Odd: shown as HTML; .save_html(path) writes its report>"


@dataclass(frozen=True)
class OddChild(Odd):
    pass


def test_the_nearest_renderer_wins_and_a_saved_page_is_the_full_one(monkeypatch, tmp_path):
    """Truth: the documented lookup (nearest in the MRO) and the two ways out: to_html asks for the notebook view
    (full False), save_html for the whole page (full True), recorded by the renderer itself."""
    monkeypatch.setattr(show, "_REGISTRY", dict(show._REGISTRY))
    asked = []
    show.renders(Odd)(lambda r, full: show.page("parent", ""))
    show.renders(OddChild)(lambda r, full: asked.append(full) or show.page("child", "<h2>S</h2><p>body</p>"))
    r = OddChild("m", torch.zeros(1), Inner(1))
    show.to_html(r)
    text = show.save_html(r, tmp_path / "p.html").read_text()
    assert asked == [False, True] and Heads(text).heads["title"] == "child"
    assert show._wing_of(OddChild) is None
    assert show._wing_of(type("X", (), {"__module__": "mechscope.cnn.results.sub"})) == "mechscope.cnn"


# ---- staged training ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("staged") / "store"
    harvest(corpus(2), path, shard_rows=100, progress=False)  # 200 rows of width 8
    return path


def _staged(store, out, **kw):
    kw = {"batch_size": 50, "epochs": 2, "lr": 3e-3, "seed": 7, "progress": False} | kw
    return train_staged(store, DictionaryConfig(d_in=8, d_sae=4), out, name="sae train", rows=200, **kw)


def test_staged_work_is_steps_times_batch_in_passes_of_the_stores_rows(store, tmp_path):
    """Truth: by hand: 200 rows, batches of 50, 2 epochs = 8 steps, 400 rows each way = 2 passes of 200; the
    settings given (lr 3e-3, seed 7) are the training's; the stream record read back with json."""
    s = _staged(store, tmp_path / "out", checkpoint_every=3)
    assert s.rank == 0 and s.trained.steps == 8
    assert s.work == {
        "unit": "rows", "rows_per_pass": 200, "forward_passes": 2.0, "backward_passes": 2.0,
        "forward_rows": 400, "backward_rows": 400, "layer_calls": {"forward": 8, "backward": 8},
    }  # fmt: skip
    assert (s.trained.train_config["lr"], s.trained.train_config["seed"]) == (3e-3, 7)
    where = tmp_path / "out.partial" / "checkpoints"
    assert json.loads((where / "stream.json").read_text()) == {
        "store": str(store.absolute()), "batch_size": 50, "epochs": 2, "rows": 200}  # fmt: skip
    assert sorted(p.name for p in where.glob("step-*")) == ["step-000000006", "step-000000008"]


def test_a_resumed_run_counts_only_its_own_steps(store, tmp_path):
    """Truth: steps 1-4 of 8 checkpointed, then resumed to step 6: 2 steps of 50 rows = 100 rows, half a pass of 200."""
    _staged(store, tmp_path / "out", steps=4, checkpoint_every=2)
    s = _staged(store, tmp_path / "out", steps=6, checkpoint_every=2, resume=True)
    assert (s.trained.resumed_from_step, s.trained.steps) == (4, 6)
    assert (s.work["forward_rows"], s.work["forward_passes"], s.work["layer_calls"]["forward"]) == (100, 0.5, 2)


def test_staged_refuses_a_full_target_and_a_resume_with_nothing_to_resume(store, tmp_path):
    """Truth: the documented refusals: a non-empty out without force, --resume with no checkpoint folder."""
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(MechscopeError, match="not empty"):
        _staged(store, tmp_path / "full")
    tc = TrainConfig(progress=False)
    with pytest.raises(MechscopeError, match="no checkpoint to resume from"):
        train_from_store(store, DictionaryConfig(d_in=8, d_sae=4), tc, tmp_path / "o", batch_size=50, resume=True)


def test_training_fields_copy_every_number_to_its_own_field():
    """Truth: distinct values written by hand, each read back under its own name; no history: no final metrics."""
    cfg = {"architecture": "relu", "d_in": 2, "d_sae": 3, "d_out": 4}
    r = type("R", (), dict(config=cfg, train_config={"lr": 1.0}, steps=11, rows=13, seconds=17.0,
                           rows_per_second=19.0, world_size=23, resumed_from_step=29, history=()))  # fmt: skip
    f = training_fields(r, model="m", hook="h", target=None, store="s", batch_size=31, epochs=37)
    got = {k: f[k] for k in ("steps", "rows", "seconds", "rows_per_second", "world_size", "resumed_from_step")}
    assert got == {"steps": 11, "rows": 13, "seconds": 17.0, "rows_per_second": 19.0, "world_size": 23,
                   "resumed_from_step": 29}  # fmt: skip
    assert (f["batch_size"], f["epochs"], f["final"], f["target"]) == (31, 37, {}, None)
    assert (f["model"], f["hook"], f["store"]) == ("m", "h", "s")


def test_a_stage_resumes_with_a_tuple_setting_and_refuses_a_corrupt_record(tmp_path):
    """Truth: json turns a tuple into a list: the same settings given again as a tuple are the same harvest."""
    claim_stage(tmp_path / "st", {"shape": (3, 4), "n": 1})
    claim_stage(tmp_path / "st", {"shape": (3, 4), "n": 1})
    (tmp_path / "st" / "settings.json").write_text("[")
    with pytest.raises(MechscopeError, match="other settings"):
        claim_stage(tmp_path / "st", {"shape": (3, 4), "n": 1})


# ---- joining torchrun's processes ---------------------------------------------------------------------------------


def test_torchrun_is_joined_with_gloo_on_the_cpu_and_nccl_on_cuda(monkeypatch):
    """Truth: the module's documented backends, recorded by a stand-in init_process_group; distributed=False
    under torchrun joins nothing."""
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(k, v)
    joined = []
    monkeypatch.setattr(DP.dist, "init_process_group", joined.append)
    assert DP.init_from_env(False) is False and joined == []
    assert DP.init_from_env(None) is True and DP.init_from_env(True, "cuda:1") is True
    assert joined == ["gloo", "nccl"]


# ---- the figure helper's switches ---------------------------------------------------------------------------------


def test_the_helper_needs_four_jobs_two_cores_and_no_switch_off(monkeypatch):
    """Truth: the documented rule (fewer than 4 jobs, one core, or MECHSCOPE_FIGURE_PROCESS=0: no helper)."""
    monkeypatch.delenv("MECHSCOPE_FIGURE_PROCESS", raising=False)
    monkeypatch.setattr(RP.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert (RP._use_helper(3), RP._use_helper(4)) == (False, True)
    monkeypatch.setenv("MECHSCOPE_FIGURE_PROCESS", "0")
    assert not RP._use_helper(40)
    monkeypatch.setenv("MECHSCOPE_FIGURE_PROCESS", "1")
    monkeypatch.setattr(RP.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert not RP._use_helper(40)


def test_the_helper_gets_the_changed_drawing_settings_only():
    """Truth: matplotlib's own rcParams: a changed line width is sent; process settings changed from their defaults
    (interactive, backend_fallback) and the unchanged defaults are not."""
    changed = {"lines.linewidth": 3.25, "interactive": True, "backend_fallback": False}
    with matplotlib.rc_context(changed):
        assert [matplotlib.rcParams[k] != matplotlib.rcParamsDefault[k] for k in changed] == [True] * 3
        got = RP._drawing_settings()
    assert got.get("lines.linewidth") == 3.25
    assert not {"backend", "interactive", "backend_fallback"} & set(got)
    assert all(v != matplotlib.rcParamsDefault[k] for k, v in got.items() if not isinstance(v, np.ndarray))
