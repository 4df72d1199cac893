"""The bench scripts' helpers against outside truths: fake clocks with known durations, a known load average, hand
computations of each ratio, median and mean, and hand-built disagreeing outputs that the comparison gate must refuse.

The scripts run as ``python bench/NAME.py`` (bench/ on the path); here bench/ is appended to the path unless a
``benchlib`` is importable already (a mutated copy put first on PYTHONPATH)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

if importlib.util.find_spec("benchlib") is None:
    sys.path.append(str(Path(__file__).resolve().parents[2] / "bench"))
_PATH = list(sys.path)  # lm.py and speed_targets.py put their folders first when imported: undone below

benchlib = importlib.import_module("benchlib")
bench_sae = importlib.import_module("sae")
bench_lm = importlib.import_module("lm")
bench_attr = importlib.import_module("attribution")
same = importlib.import_module("same_behaviour")
scaling = importlib.import_module("scaling")
speed = importlib.import_module("speed_targets")
explain = importlib.import_module("explain")
heads = importlib.import_module("heads")
sys.path[:] = _PATH


class Clock:
    """A fake ``time.perf_counter``: it moves only when a fake workload says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def work(self, durations, result=None):
        """A callable that takes the next of ``durations`` (then 0) on each call and returns ``result``."""
        it = iter(durations)

        def fn(*_a, **_k):
            self.now += next(it, 0.0)
            return result

        return fn


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(time, "perf_counter", c)
    return c


def number(pattern: str, text: str) -> float:
    return float(re.search(pattern, text).group(1).replace(",", ""))


def test_load_line_reads_the_three_averages_in_order_and_the_cores(monkeypatch):
    """Outside truth: os.getloadavg set to (1.234, 5.678, 9.012) and 7 cores, written out by hand at 2 decimals."""
    monkeypatch.setattr(benchlib.os, "getloadavg", lambda: (1.234, 5.678, 9.012))
    monkeypatch.setattr(benchlib.os, "cpu_count", lambda: 7)
    assert benchlib.load() == "load 1.23 5.68 9.01 (7 CPUs)"


@pytest.mark.parametrize("module", [bench_attr, bench_lm], ids=["attribution", "lm"])
def test_best_interleaved_is_the_minimum_after_a_warm_up_in_alternation(clock, module):
    """Outside truth: durations chosen by hand; the warm-up (50, 60 s) is not kept, the best of 5, 3, 4 is 3 and of
    7, 9, 6 is 6, and the calls alternate A B A B."""
    order = []
    a, b = clock.work([50, 5, 3, 4]), clock.work([60, 7, 9, 6])
    fns = [lambda: (order.append("A"), a()), lambda: (order.append("B"), b())]
    assert module.best_interleaved(fns, 3) == [3, 6]
    assert order == ["A", "B"] * 4


def _forward_ratio(clock, capsys, ours_s, ref_s):
    logits = torch.zeros(2, 3, 5)
    ours = clock.work(ours_s, logits + torch.tensor([0.0, 0.0, 0.0, 0.0, 0.25]))
    ref = clock.work(ref_s, SimpleNamespace(logits=logits))
    ratio = bench_lm.forward_ratio("toy", ours, ref, 5, 2, 3, 3)
    return ratio, capsys.readouterr().out


def test_lm_forward_ratio_is_reference_over_ours(clock, capsys):
    """Outside truth: best of (0.5, 0.25, 0.75) = 250 ms for mechscope, of (1, 2, 1.5) = 1000 ms for transformers:
    transformers / mechscope = 4, PASS; the logits differ by 0.25 at one place (hand-built)."""
    ratio, out = _forward_ratio(clock, capsys, [9, 0.5, 0.25, 0.75], [9, 1.0, 2.0, 1.5])
    assert ratio == 4.0
    assert "mechscope 250 ms, transformers (eager) 1000 ms, ratio 4.00 (target >= 1.0: PASS)" in out
    assert "max |logit difference| 2.5e-01" in out


def test_lm_forward_ratio_judges_the_logit_difference_against_its_tolerance(clock, capsys):
    """Outside truth: the hand-built logits differ by 0.25 at one place, above float32's 1e-3 (FAIL however fast);
    the same outputs within 0.5 PASS, and a half-precision run is not judged."""
    logits = torch.zeros(2, 3, 5)
    ours = logits + torch.tensor([0.0, 0.0, 0.0, 0.0, 0.25])
    for tol, verdict in ((1e-3, "(target <= 1e-03: FAIL)"), (0.5, "(target <= 5e-01: PASS)"), (None, "(not judged")):
        ref = clock.work([9, 1.0, 1.0, 1.0], SimpleNamespace(logits=logits))
        bench_lm.forward_ratio("toy", clock.work([9, 0.5, 0.5, 0.5], ours), ref, 5, 2, 3, 3, tol=tol)
        assert f"max |logit difference| 2.5e-01 {verdict}" in capsys.readouterr().out


def test_lm_forward_ratio_fails_when_ours_is_slower_and_passes_at_exactly_one(clock, capsys):
    """Outside truth: 1 s against 0.25 s is a ratio of 0.25 (FAIL); equal times are a ratio of 1 (target >= 1: PASS)."""
    out = _forward_ratio(clock, capsys, [0] + [1.0] * 3, [0] + [0.25] * 3)[1]
    assert "ratio 0.25 (target >= 1.0: FAIL)" in out
    assert "ratio 1.00 (target >= 1.0: PASS)" in _forward_ratio(clock, capsys, [0] + [0.5] * 3, [0] + [0.5] * 3)[1]


def test_sae_interleaved_is_the_median_of_each(clock):
    """Outside truth: medians of four by hand, the mean of the two middle values: (1, 2, 3, 10) -> 2.5 (mean 4,
    min 1), (0.5, 4, 8, 0.25) -> (0.5 + 4) / 2 = 2.25."""
    order = []
    a, b = clock.work([1, 2, 3, 10]), clock.work([0.5, 4, 8, 0.25])
    t = bench_sae.interleaved({"a": lambda: (order.append("a"), a()), "b": lambda: (order.append("b"), b())}, 4)
    assert t == {"a": 2.5, "b": 2.25}
    assert order == ["a", "b"] * 4


def _fake_interleaved(monkeypatch, times):
    seen = {}

    def fake(fns, repeats):
        seen.update(fns=set(fns), repeats=repeats)
        return dict(times)

    monkeypatch.setattr(bench_sae, "interleaved", fake)
    monkeypatch.setattr(bench_sae, "load", lambda: "LOAD-X")
    return seen


@pytest.mark.parametrize("harvest, verdict", [(5.0, "PASS"), (5.5, "FAIL")])
def test_sae_cnn_harvest_ratio_is_forward_over_harvest(monkeypatch, capsys, harvest, verdict):
    """Outside truth: 10,000 images in 4 s and in 5 s are 2,500 and 2,000 img/s, a ratio of 4 / 5 = 0.80 (target
    >= 0.8, met at the boundary); 4 / 5.5 = 0.73 fails."""
    seen = _fake_interleaved(monkeypatch, {"forward": 4.0, "harvest": harvest})
    bench_sae.bench_cnn_harvest(3)
    out = capsys.readouterr().out
    assert seen == {"fns": {"forward", "harvest"}, "repeats": 3}
    assert number(r"forward ([\d,]+) img/s", out) == 2500
    assert number(r"harvest ([\d,]+) img/s", out) == round(10_000 / harvest)
    assert f"ratio {4 / harvest:.2f} (target >= 0.8: {verdict}); LOAD-X" in out


@pytest.mark.parametrize("middle, verdict", [(4.0, "FAIL"), (2.5, "PASS")])
def test_sae_lm_harvest_ratios_and_the_worst_of_three(monkeypatch, capsys, middle, verdict):
    """Outside truth: 256 x 128 = 32,768 tokens; forward 2 s, the three harvests 2, 2.5 and ``middle`` s: ratios
    1.00, 0.80 and 2 / middle; the verdict is the worst of the three (0.50 fails, 0.80 passes)."""
    _fake_interleaved(monkeypatch, {"forward": 2.0, "full": 2.0, "last": 2.5, "middle": middle})
    bench_sae.bench_lm_harvest(None, 2)
    out = capsys.readouterr().out
    assert "32,768 tokens: forward 16,384 tok/s" in out
    assert "blocks.3.hook_resid_post without stopping" in out and "16,384 tok/s, ratio 1.00;" in out
    assert "13,107 tok/s, ratio 0.80; blocks.2.hook_resid_post" in out
    assert f"{32768 / middle:,.0f} tok/s, ratio {2 / middle:.2f} (target >= 0.8 for all three: {verdict})" in out


@pytest.mark.parametrize("rss, verdict", [([100.0, 100.25, 101.0], "PASS"), ([100.0, 101.5, 100.5], "FAIL")])
def test_sae_memory_marks_and_the_budget_verdict(monkeypatch, capsys, rss, verdict):
    """Outside truth: a 1 MiB budget is 5,120 rows of 512 floats x 10, two whole batches of 2,048 = 4,096 rows
    (8 MiB), shards of 2**20 / 2048 / 16 = 32 rows (128 shards); the RSS over the start (faked) is read back at 50%
    and 100%, and the verdict is on the largest (1.0 <= 1 passes, 1.5 anywhere fails)."""
    it = iter(rss)
    monkeypatch.setattr(bench_sae, "current_rss_mb", lambda: next(it))
    monkeypatch.setattr(bench_sae, "load", lambda: "LOAD-X")
    bench_sae.bench_memory(1)
    out = capsys.readouterr().out
    assert "memory: 4,096 rows x 512 float32 = 8 MiB of activations (10 x a 1 MiB budget) in 128 shards" in out
    over = [r - rss[0] for r in rss[1:]]
    assert f"50%: RSS {over[0]:+.0f} MiB, 100%: RSS {over[1]:+.0f} MiB" in out
    assert f"(target: within the 1 MiB budget: {verdict})" in out


@pytest.mark.parametrize("theirs, verdict", [(3.0, "PASS"), (2.0, "PASS"), (1.5, "FAIL")])
def test_sae_training_ratio_is_sparsify_over_ours(monkeypatch, capsys, theirs, verdict):
    """Outside truth: one batch of 4,096 rows in 2 s (ours) against ``theirs`` s: 2,048 rows/s and 4096 / theirs,
    ratio theirs / 2 (target >= 1.0; equal times pass)."""
    pytest.importorskip("sparsify")
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    _fake_interleaved(monkeypatch, {"ours": 2.0, "sparsify": theirs})
    bench_sae.bench_training(2, d_in=8, steps=1)
    out = capsys.readouterr().out
    assert f"ours 2,048 rows/s, sparsify 1.3.3 {4096 / theirs:,.0f} rows/s: ratio {theirs / 2:.2f}" in out
    assert f"(target >= 1.0: {verdict}); LOAD-X" in out


# ---- speed_targets and scaling: the ratios against one pass ---------------------------------------------------


HEADS_JSON = {"labels": [[0] * 3] * 4, "seconds": {"load": 3.0}, "work": {"forward_passes": 10, "backward_passes": 2.5},
              "ablation": {"mean": {"measured": [{"head": "1.0"}, {"head": "3.2"}]},
                           "zero": {"measured": [{"head": "0.1"}]}}}  # fmt: skip


def test_exact_ablation_passes_by_a_plain_loop():
    """Outside truth: 4 layers; heads in layers 1, 3 and 0 re-run 3, 1 and 4 of the 4 layers: 0.75 + 0.25 + 1 = 2."""
    assert speed.exact_ablation_passes(HEADS_JSON) == 2.0


@pytest.mark.parametrize("wall, verdict", [(11.0, "MET"), (21.0, "NOT MET")])
def test_speed_targets_heads_ratios(monkeypatch, tmp_path, capsys, wall, verdict):
    """Outside truth: one forward 0.5 s before and 1.5 s after: 1.0 s; load 3 s; (wall - 3) / 1 = 8 (target <= 8:
    met at the boundary) or 18; passes 10 + 2 x 2.5 = 15; memory (800 - 150) / (400 + 100) = 1.3, 800 / 500 = 1.6."""
    (tmp_path / "heads").mkdir()
    (tmp_path / "heads/heads.json").write_text(json.dumps(HEADS_JSON))
    forwards = iter([(0.5, 1, 1.0, 1.0), (1.5, 100, 400.0, 100.0)])
    monkeypatch.setattr(speed, "one_forward", lambda model: next(forwards))
    monkeypatch.setattr(speed, "timed", lambda *a: (wall, 800.0, 150.0))
    row = speed.heads(tmp_path, {}, "m")
    out = capsys.readouterr().out
    assert (row["forward_s"], row["target_ratio"], row["passes"]) == (1.0, wall - 3.0, 15)
    assert row["limit_ratio"] == pytest.approx((wall - 3.0) / 15)
    assert (row["memory_ratio"], row["memory_ratio_above_baseline"], row["measured"]) == (1.6, 1.3, 3)
    assert f"= {wall - 3:.1f} (target <= 8, i.e. 11 s): {verdict}" in out
    assert "(1.0 passes" not in out and "are 2.0 passes (2 s at one pass each)" in out
    assert "1.60x, 1.30x above the process before its work (target <= 1.3x): MET" in out


def _explain(monkeypatch, tmp_path, before, after, wall, report):
    (tmp_path / "explain").mkdir()
    data = {"seconds": {"report": report, "collect": 1.234}, "work": {"forward_passes": 4, "backward_passes": 0.5}}
    (tmp_path / "explain/mechanisms.json").write_text(json.dumps(data))
    passes = iter([before, after])
    monkeypatch.setattr(speed, "one_cnn_pass", lambda run: next(passes))
    monkeypatch.setattr(speed, "timed", lambda *a: (wall, 300.0, 100.0))
    return speed.explain(tmp_path, {}, tmp_path / "run")


def test_speed_targets_explain_fastest_batch_of_the_mean(monkeypatch, tmp_path, capsys):
    """Outside truth: the means of before and after per batch by hand, {256: 0.5, 512: 0.375, 1024: 0.5, 2048: 1}:
    the fastest is 512 (before alone would say 1024); (7.75 - 0.25) / 0.375 = 20 (target <= 20 and under 30 s: met),
    7.5 / 1 = 7.5 against the 2,048 batch, passes 4 + 2 x 0.5 = 5, 7.5 / (5 x 0.375) = 4."""
    before, after = {256: 0.375, 512: 0.25, 1024: 0.125, 2048: 0.875}, {256: 0.625, 512: 0.5, 1024: 0.875, 2048: 1.125}
    row = _explain(monkeypatch, tmp_path, before, after, 7.75, 0.25)
    out = capsys.readouterr().out
    assert (row["forward_batch"], row["forward_s"], row["forward_s_before_after"]) == (512, 0.375, [0.25, 0.5])
    assert (row["target_ratio"], row["target_ratio_at_2048"], row["passes"], row["limit_ratio"]) == (20, 7.5, 5, 4)
    assert "= 20.0 <= 20: MET (7.5 against the 2,048-image pass)" in out
    assert "(wall - report) / (passes x one pass) = 4.00" in out


def test_speed_targets_explain_not_met_at_thirty_seconds(monkeypatch, tmp_path, capsys):
    """Outside truth: a 30.0 s wall with a ratio of 30 / 2 = 15 misses the 'under 30 s' half of the target."""
    two = dict.fromkeys((256, 512, 1024, 2048), 2.0)
    row = _explain(monkeypatch, tmp_path, two, two, 30.0, 0.0)
    assert row["target_ratio"] == 15.0
    assert "= 15.0 <= 20: NOT MET" in capsys.readouterr().out


def test_scaling_exponent_and_width_series():
    """Outside truth: seconds = 2 x size^1.5, the slope by hand between two points of a log-log line; the width
    series is the rows without 'stages', by parameters ascending."""
    size = [1e3, 1e4, 1e5]
    seconds = [2 * s**1.5 for s in size]
    hand = (math.log(seconds[2]) - math.log(seconds[0])) / (math.log(size[2]) - math.log(size[0]))
    assert scaling.exponent(size, seconds) == pytest.approx(hand) == pytest.approx(1.5)
    assert math.isnan(scaling.exponent([1.0], [2.0]))
    rows = [{"model": m, "parameters": p} for m, p in (("4x", 30), ("3 stages", 5), ("default", 10), ("2x", 20))]
    assert [r["model"] for r in scaling.width_series(rows)] == ["default", "2x", "4x"]


def test_scaling_timed_reads_peak_and_baseline(monkeypatch, tmp_path, clock):
    """Outside truth: a fake child that takes 2.5 s and writes 'VmHWM VmRSS' = '3072 1024' KiB: 3 and 1 MiB."""

    def fake_run(cmd, **_):
        Path(cmd[3]).write_text("3072 1024")
        clock.now += 2.5
        return SimpleNamespace(returncode=0, stderr="")

    monkeypatch.setattr(scaling.subprocess, "run", fake_run)
    assert scaling.timed(["lm", "heads"], {}, tmp_path) == (2.5, 3.0, 1.0)


def test_one_cnn_pass_is_the_median_of_the_second_round(monkeypatch, clock):
    """Outside truth: 1,024 images; a first round of 1 s per call (not kept), then passes of (0.5, 0.25, 2) s at
    batch 256 (4 calls each) and (0.75, 1, 0.125) s at 512 (2 calls each): medians 0.5 and 0.75 by hand."""
    import mechscope.cnn.runs as runs

    per_call = [1.0] * 3 * (4 + 2)
    per_call += [p / 4 for p in (0.5, 0.25, 2.0) for _ in range(4)]
    per_call += [p / 2 for p in (0.75, 1.0, 0.125) for _ in range(2)]
    model = clock.work(per_call)
    monkeypatch.setattr(runs, "load_run", lambda run: SimpleNamespace(model=model))
    monkeypatch.setattr(runs, "load_run_data", lambda loaded: SimpleNamespace(test_float=lambda: torch.zeros(1024, 1)))
    assert scaling.one_cnn_pass(Path("r"), batches=(256, 512)) == {256: 0.5, 512: 0.75}


def test_scaling_figure_plots_walls_and_the_load(monkeypatch, tmp_path):
    """Outside truth: hand-built rows; the plotted x is parameters x tokens, y the walls; the width series sorted by
    parameters; the title quotes each half's own load when they differ."""
    from matplotlib.figure import Figure

    figs = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figs.append(self))
    lm = [
        {"model": "pythia-a", "parameters": 10, "tokens": 808, "wall_s": 3.0, "weights_mib": 1.0, "peak_mib": 7.0},
        {"model": "pythia-b", "parameters": 40, "tokens": 808, "wall_s": 5.0, "weights_mib": 4.0, "peak_mib": 9.0},
    ]
    cnn = [{"model": "4x 64,128", "parameters": 400, "wall_s": 8.0, "peak_mib": 50.0},
           {"model": "default 16,32", "parameters": 100, "wall_s": 2.0, "peak_mib": 30.0},
           {"model": "3 stages 16,32,32", "parameters": 150, "wall_s": 6.0, "peak_mib": 40.0}]  # fmt: skip
    scaling.figure({"heads": lm, "cnn": cnn}, tmp_path / "f.png", {"heads": (1.0, 2.0), "cnn": (3.0, 4.5)})
    ax0, ax1, ax2 = figs[0].axes
    assert list(ax0.lines[0].get_xdata()) == [8080, 32320] and list(ax0.lines[0].get_ydata()) == [3.0, 5.0]
    assert list(ax1.lines[0].get_xdata()) == [100, 400] and list(ax1.lines[0].get_ydata()) == [2.0, 8.0]
    assert list(ax1.lines[1].get_ydata()) == [2.0, 6.0]
    assert list(ax2.lines[0].get_xdata()) == [1.0, 4.0] and list(ax2.lines[0].get_ydata()) == [7.0, 9.0]
    assert "load average heads 1.0 → 2.0; cnn 3.0 → 4.5" in figs[0]._suptitle.get_text()


# ---- whole scripts with fake workloads ---------------------------------------------------------------------------


def _explain_main(monkeypatch, capsys, three_stage_s):
    result = SimpleNamespace(seconds={"a": 1.0}, stage_names=["conv1"], overview=SimpleNamespace(n_test=10_000),
                             circuits=SimpleNamespace(circuits=[SimpleNamespace(meets_criterion=True)]))  # fmt: skip
    times = {"A": 4.0, "B": three_stage_s}
    monkeypatch.setattr(explain, "explain_timed", lambda run, out: (times[run], result))
    monkeypatch.setattr(explain, "keep_freed_memory", lambda: None)
    monkeypatch.setattr(explain, "load", lambda: "LOAD-X")
    monkeypatch.setattr(sys, "argv", ["explain.py", "--run", "A", "--run3", "B"])
    explain.main()
    return capsys.readouterr().out.splitlines()[-1]


def test_explain_ratio_is_three_stage_over_default(monkeypatch, capsys):
    """Outside truth: 8 s / 4 s = 2.00 (target <= 2: PASS at the boundary), 8.5 / 4 = 2.12 fails."""
    assert _explain_main(monkeypatch, capsys, 8.0) == "3-stage / default: 2.00 (target <= 2) PASS; LOAD-X at the end"
    assert _explain_main(monkeypatch, capsys, 8.5).startswith("3-stage / default: 2.12 (target <= 2) FAIL")


@pytest.mark.parametrize("total, verdict", [(180.0, "PASS"), (180.5, "FAIL")])
def test_heads_script_total_and_remainder(monkeypatch, capsys, clock, total, verdict):
    """Outside truth: a fake analysis of ``total`` s whose steps took 100 and 30 s leaves total - 130 s for the
    report; 3 + 2 heads in the labels; target <= 180 s."""
    result = SimpleNamespace(seconds={"scan": 100.0, "ablate": 30.0}, labels=[[0, 0, 0], [0, 0]], work={"f": 1})
    monkeypatch.setattr(heads, "induction_heads", clock.work([total], (None, result)))
    monkeypatch.setattr(heads.os, "getloadavg", lambda: (1.5, 0.0, 0.0))
    monkeypatch.setattr(sys, "argv", ["heads.py"])
    heads.main()
    out = capsys.readouterr().out
    assert f"report + JSON       {total - 130:7.1f} s" in out
    assert "load average 1.5 at the start, 1.5 at the end" in out
    assert out.rstrip().endswith(f"total {total:.1f} s for 5 heads (target <= 180 s): {verdict}")


def test_discovery_timed_is_the_best_of_its_repeats_with_the_output(clock):
    """Outside truth: calls of 3, 1 and 2 s: the best is 1 s, and the workload's own result comes back."""
    assert importlib.import_module("discovery")._timed(clock.work([3.0, 1.0, 2.0], "out"), repeat=3) == (1.0, "out")


def test_circuits_fmt_quotes_the_median_from_three_times():
    """Outside truth: the median of (3, 1, 2) by hand is 2; two times are quoted without one."""
    fmt = importlib.import_module("circuits").fmt
    assert fmt([3.0, 1.0, 2.0]) == "3.00, 1.00, 2.00; median 2.00"
    assert fmt([3.0, 1.0]) == "3.00, 1.00"


def test_scaling_lm_rows_ratio_subtracts_the_load(monkeypatch, tmp_path):
    """Outside truth: (13 s wall - 3 s load) / ((8 + 2 x 1) passes x 0.5 s) = 2; memory 600 / (100 + 200) = 2 and
    (600 - 300) / 300 = 1; two measured heads."""
    out = tmp_path / "heads/pythia-14m"
    out.mkdir(parents=True)
    data = {"work": {"forward_passes": 8, "backward_passes": 1}, "seconds": {"load": 3.0},
            "ablation": {"mean": {"measured": [{"head": "0.0"}, {"head": "1.0"}]}}}  # fmt: skip
    (out / "heads.json").write_text(json.dumps(data))
    monkeypatch.setattr(scaling, "pythia_dir", lambda name, where: where / name)
    monkeypatch.setattr(scaling, "timed", lambda *a: (13.0, 600.0, 300.0))
    monkeypatch.setattr(scaling, "one_forward", lambda path: (0.5, 1234, 100.0, 200.0))
    [row] = scaling.lm_rows(["pythia-14m"], tmp_path, {})
    assert (row["ratio"], row["passes"], row["memory_ratio"], row["memory_ratio_above_baseline"]) == (2, 10, 2, 1)
    assert (row["parameters"], row["tokens"], row["measured_heads"]) == (1234, 808, 2)


def test_attribution_main_ratio_is_captum_over_ours(monkeypatch, tmp_path, capsys, clock):
    """Outside truth: best of (0.5, 0.25) s for mechscope and of (1, 0.75) s for Captum: 0.75 / 0.25 = 3.00 (PASS);
    attributions differing by 0.5 (hand-built); fake children reporting VmHWM 4096, 3072, 2048 KiB: 4, 3, 2 MiB."""
    import captum.attr

    x = torch.zeros(64, 4)
    ours = clock.work([9, 0.5, 0.25], x + 0.5)
    theirs = clock.work([9, 1.0, 0.75], x)
    monkeypatch.setattr(bench_attr, "IntegratedGradients", lambda n_steps: SimpleNamespace(attribute=ours))
    monkeypatch.setattr(captum.attr, "IntegratedGradients", lambda model: SimpleNamespace(attribute=theirs))
    monkeypatch.setattr(bench_attr, "load_run", lambda run: SimpleNamespace(model=lambda t: torch.zeros(len(t), 10)))
    monkeypatch.setattr(bench_attr, "load_mnist", lambda: SimpleNamespace(test_images=x))
    monkeypatch.setattr(bench_attr, "MNIST", SimpleNamespace(to_float=lambda t: t))
    peaks = iter(["1024 4096", "1024 3072", "1024 2048"])
    monkeypatch.setattr(bench_attr.subprocess, "run", lambda *a, **k: SimpleNamespace(returncode=0, stdout=next(peaks)))
    monkeypatch.setattr(bench_attr, "load", lambda: "LOAD-X")
    monkeypatch.setattr(sys, "argv", ["attribution.py", "--run", str(tmp_path), "--repeats", "2"])
    bench_attr.main()
    out = capsys.readouterr().out
    assert "mechscope 250 ms, captum 750 ms, ratio captum/mechscope 3.00 (target >= 1.0): PASS" in out
    assert "max |difference| 5.0e-01 (target <= 1e-04: FAIL)" in out
    assert "MiB; 1 before the attribution starts): no chunking 4, batch_size 4096 3, batch_size 512 2" in out
    assert json.loads(out.strip().splitlines()[-1])["ig_ratio_vs_captum"] == 3.0


@pytest.mark.parametrize("seconds, verdict", [(60.0, "PASS"), (60.5, "FAIL")])
def test_featvis_script_seconds_units_and_exceeding(monkeypatch, capsys, clock, seconds, verdict):
    """Outside truth: channels 2, 1 and 1 are 4 units; a render of ``seconds`` s (target <= 60 s); reached
    (2, 2, 5, 0) against test-set maxima (1, 2, 3, 4): two exceed by hand (2 > 1 and 5 > 3; 2 = 2 does not)."""
    featvis = importlib.import_module("featvis")
    layers = ["conv1.hook_post", "conv2.hook_post", "hook_logits"]
    probe = {
        "conv1.hook_post": torch.zeros(1, 2),
        "conv2.hook_post": torch.zeros(1, 1),
        "hook_logits": torch.zeros(1, 1),
    }

    class Objective:
        def __sub__(self, other):
            return self

        def __call__(self, cache):
            return torch.tensor([2.0, 2.0, 5.0, 0.0])

    best = dict(zip(layers, [torch.tensor([1.0, 2.0]), torch.tensor([3.0]), torch.tensor([4.0])], strict=True))
    fv = SimpleNamespace(units_objective=lambda assign: Objective(), total_variation=lambda: 0,
                         render=clock.work([seconds], SimpleNamespace(images=None)),
                         dataset_means_max=lambda model, x, names: best)  # fmt: skip
    monkeypatch.setattr(featvis, "FV", fv)
    monkeypatch.setattr(featvis, "run_with_cache", lambda model, x, names: (None, probe))
    monkeypatch.setattr(featvis, "load_run", lambda run: SimpleNamespace(model=None))
    monkeypatch.setattr(featvis, "load_mnist", lambda: SimpleNamespace(test_images=torch.zeros(1, 28, 28)))
    monkeypatch.setattr(featvis, "load", lambda: "LOAD-X")
    monkeypatch.setattr(sys, "argv", ["featvis.py", "--run", "r", "--steps", "7"])
    featvis.main()
    out = capsys.readouterr().out
    assert f"4 units x 7 steps in one batch: {seconds:.1f} s (target <= 60 s: {verdict}; LOAD-X at the end)" in out
    assert out.rstrip().endswith("2 of 4 visualisations exceed their unit's maximum over the 10,000 test images")
