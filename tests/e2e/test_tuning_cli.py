"""`mechscope cnn tuning` end to end: on the quick run (files, JSON against the model, offline report drawn by
Chromium), bad input as one line, and the microscope report of `cnn explain` showing the curves only for the
weights they were made from (a small three-stage RGB network, fast to explain)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from mechscope.cnn.methods.tuning import TuningResult
from tests.e2e.reports import check_report, render_in_chromium
from tests.e2e.test_cli import assert_one_line_error, run_main
from tests.records import assert_round_trip


def test_tuning_on_the_quick_run(capsys, quick_run, mnist_root, tmp_path):
    from mechscope.cnn.methods.stimuli import draw_stimuli
    from mechscope.cnn.runs import load_run, weights_hash
    from mechscope.core.hooks import run_with_cache

    run = tmp_path / "run"
    shutil.copytree(quick_run, run)
    code, out, err = run_main(capsys, "cnn", "tuning", "--run", str(run), "--data-dir", str(mnist_root))
    assert code == 0, err
    where = run / "tuning"
    assert "units are tuned to these stimuli (conv1" in out and f"written to {where}" in out
    data = assert_round_trip(where / "tuning.json", TuningResult)
    assert data["schema"] == "mechscope.tuning/2" and data["input_shape"] == [1, 28, 28]
    assert data["value_range"] == [0.0, 1.0]
    assert [len(s["units"]) for s in data["stages"]] == [16, 32]
    assert data["stimuli"]["counts"] == {"line": 60, "edge": 120, "curve": 600, "line_end": 120, "corner": 360,
                                         "blob": 30, "ring": 20}  # fmt: skip
    model = load_run(run).model
    assert data["weights_sha256"] == weights_hash(model)
    # one unit's recorded curve against the model run by hand on the same stimuli
    stim = draw_stimuli(28, seed=0)
    _, cache = run_with_cache(model, stim.images, names=["conv1.hook_post"])
    peak = cache["conv1.hook_post"].flatten(2).amax(2)  # [N, 16]
    unit = data["stages"][0]["units"][3]
    edge = next(c for c in unit["curves"] if c["family"] == "edge" and c["axis"] == "angle")
    rows = [i for i, s in enumerate(stim.stimuli) if s.family == "edge" and s.angle == 45.0]
    assert edge["x"][3] == 45.0 and edge["response"][3] == pytest.approx(float(peak[rows, 3].mean()), rel=1e-5)
    for s in data["stages"]:
        for u in s["units"]:
            assert u["label"] and (u["label"] == "not tuned to these stimuli") == (not u["tuned"])
            if u["tuned"]:
                assert u["drive"] >= 0.5 and (u["sharpness"] <= 0.3 or u["sharpness_kind"] == "size fall-off")
            assert (where / "units" / f"{s['stage']}_{u['channel']}.png").is_file()
    n = check_report(where / "report.html")
    assert n == 48 + 2 + 1  # one figure per unit, one per stage, the stimuli
    assert render_in_chromium(where / "report.html", tmp_path) == {"images": n, "broken": []}
    # the output is there: refused without --force, before any work
    code, _, err = run_main(capsys, "cnn", "tuning", "--run", str(run), "--data-dir", str(mnist_root))
    assert_one_line_error(code, err, "already exists", "--force")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--seed", "-1"], "--seed must be an integer from 0 to 2**63 - 1, got -1"),
        (["--seed", "abc"], "Invalid value for '--seed'"),
        (["--seed", str(2**63)], "--seed must be an integer from 0 to 2**63 - 1"),
    ],
)
def test_bad_seed_is_one_line(capsys, quick_run, tmp_path, args, fragment):
    code, _, err = run_main(capsys, "cnn", "tuning", "--run", str(quick_run), "--out", str(tmp_path / "o"), *args)
    assert code == 2
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "o").exists()


def test_missing_or_broken_run_is_one_line(capsys, tmp_path):
    code, _, err = run_main(capsys, "cnn", "tuning", "--run", str(tmp_path / "absent"))
    assert code == 2
    assert_one_line_error(code, err, "run directory not found")
    (tmp_path / "empty").mkdir()
    code, _, err = run_main(capsys, "cnn", "tuning", "--run", str(tmp_path / "empty"))
    assert_one_line_error(code, err, "not a mechscope run directory")
    code, _, err = run_main(capsys, "cnn", "tuning")
    assert_one_line_error(code, err, "--run")


@pytest.fixture(scope="module")
def rgb_data(tmp_path_factory):
    from tests.shapes import CLASS_NAMES, splits

    root = tmp_path_factory.mktemp("tuning-shapes")
    np.savez(root / "rgb.npz", **splits(n_train=160, n_test=100, rgb=True, seed=2))
    (root / "names.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    return root


def test_microscope_shows_curves_of_the_same_weights_only(capsys, tmp_path, rgb_data):
    from types import SimpleNamespace

    from safetensors.torch import load_file, save_file

    from mechscope.cnn.runs import load_run, weights_hash

    run = tmp_path / "run"
    code, _, err = run_main(
        capsys, "cnn", "train", "--out", str(run), "--dataset", str(rgb_data / "rgb.npz"), "--class-names",
        str(rgb_data / "names.txt"), "--channels", "2,3,3", "--kernel-size", "3", "--padding", "1", "--batchnorm",
        "--activation", "gelu", "--epochs", "8", "--batch-size", "32", "--shift", "1",
    )  # fmt: skip
    assert code == 0, err
    code, out, err = run_main(capsys, "cnn", "tuning", "--run", str(run), "--seed", "5")
    assert code == 0, err
    data = assert_round_trip(run / "tuning" / "tuning.json", TuningResult)
    assert data["input_shape"] == [3, 16, 16] and data["stimuli"]["seed"] == 5
    assert [len(s["units"]) for s in data["stages"]] == [2, 3, 3]
    from mechscope.cnn.config import ExplainSettings
    from mechscope.cnn.pipelines.explain import explain_run

    out, result = explain_run(run, settings=ExplainSettings(classes=("box",), n_pairs=2))
    page = (out / "report.html").read_text()
    assert page.count('alt="tuning curves of ') == 8  # every channel's section
    assert "No tuning curves beside the run" not in page
    line = next(s for s in result.summary if s.startswith("Tuning curves on synthetic stimuli"))
    tuned = sum(u["tuned"] for s in data["stages"] for u in s["units"])
    assert f"{tuned} of 8 units tuned" in line
    # other weights: the link says why, and the report and its summary leave the curves out
    from mechscope.cnn.pipelines.tuning import linked_tuning
    from mechscope.cnn.report.microscope import report_context
    from mechscope.cnn.report.summary import summarise
    from mechscope.core.render.html import render

    state = load_file(str(run / "model.safetensors"))
    state["conv1.conv.weight"] = state["conv1.conv.weight"] * 1.5
    save_file(state, str(run / "model.safetensors"), metadata={"kind": "cnn"})
    config = json.loads((run / "config.json").read_text())  # new weights with their record, as a retraining leaves
    config["weights_sha256"] = weights_hash(SimpleNamespace(state_dict=lambda: state))
    (run / "config.json").write_text(json.dumps(config))
    other = linked_tuning(run, load_run(run).model)
    assert "made from other weights" in other["stale"] and "units" not in other
    assert not any(s.startswith("Tuning curves on synthetic stimuli") for s in summarise(result, {"tuning": other}))
    context = report_context(result, {"tuning": other}, channels=False)  # the page without its channel sections
    page = render("mechscope.cnn", "microscope.html.j2", tmp_path / "stale.html", **context).read_text()
    assert "not shown: it was made from other weights" in page
    # --force makes them again, for the new weights
    code, _, err = run_main(capsys, "cnn", "tuning", "--run", str(run), "--force")
    assert code == 0, err
    recorded = assert_round_trip(run / "tuning" / "tuning.json", TuningResult)["weights_sha256"]
    assert recorded == weights_hash(load_run(run).model)
