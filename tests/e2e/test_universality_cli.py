"""`mechscope cnn universality` end to end on two quick runs: the files, trained pairs above the random baseline,
a report Chromium draws offline, and bad input as one line."""

from __future__ import annotations

import json
import shutil

import pytest

from mechscope.cnn.methods.universality import UniversalityResult
from tests.e2e.reports import check_report, render_in_chromium
from tests.e2e.test_cli import assert_one_line_error, run_main
from tests.records import assert_round_trip

QUICK = ("--test-limit", "300", "--vis-steps", "4")


@pytest.fixture(scope="module")
def second_run(mnist_root, tmp_path_factory):
    """Another quick run like conftest's, with seed 1."""
    from mechscope.cnn.config import TrainConfig
    from mechscope.cnn.pipelines.train import train

    out = tmp_path_factory.mktemp("runs") / "quick-seed1"
    config = TrainConfig(epochs=1, train_limit=4096, batch_size=64, lr=3e-3, seed=1)
    train(out, config, data_dir=mnist_root, progress=False)
    return out


def test_universality_report_json_and_baseline(capsys, quick_run, second_run, mnist_root, tmp_path):
    out = tmp_path / "uni"
    code, stdout, err = run_main(capsys, "cnn", "universality", "--runs", str(quick_run), str(second_run),
                                 "--out", str(out), "--data-dir", str(mnist_root), *QUICK)  # fmt: skip
    assert code == 0, err
    assert "universality.json and report.html written" in stdout
    d = assert_round_trip(out / "universality.json", UniversalityResult)
    assert d["test_images"] == 300 and [r["label"] for r in d["runs"]] == ["quick", "quick-seed1"]
    kinds = [c["kind"] for c in d["comparisons"]]
    assert kinds == ["trained", "baseline", "baseline"]
    tests = d["best_match_tests"]  # the summary's test, in the JSON too
    assert set(tests) == {s["stage"] for s in d["comparisons"][0]["stages"]}
    assert all(0 <= t["p"] <= 1 and 0 <= t["superiority"] <= 1 for t in tests.values())
    assert all(f"p = {t['p']:.2g}" in " ".join(d["summary"]) for t in tests.values())
    trained, baselines = d["comparisons"][0], d["comparisons"][1:]
    for i, stage in enumerate(trained["stages"]):  # trained against trained beats trained against random
        assert stage["cka"] > max(b["stages"][i]["cka"] for b in baselines) or i == 0
        med = sorted(stage["best_a"])[len(stage["best_a"]) // 2]
        assert med > max(sorted(b["stages"][i]["best_a"])[len(b["stages"][i]["best_a"]) // 2] for b in baselines)
    assert len(trained["circuits"]) == 10 and all(c["overlap"] >= 0 for c in trained["circuits"])
    assert len(d["cka"]) == len(d["cka_labels"]) == 8
    assert d["summary"] and "median best-match correlation" in d["summary"][1]
    report = out / "report.html"
    n = check_report(report)
    assert n >= 10
    drawn = render_in_chromium(report, tmp_path)
    assert drawn["images"] == n and not drawn["broken"]


def _edited_copy(run, tmp_path, name, edit):
    dest = tmp_path / name
    shutil.copytree(run, dest)
    config = json.loads((dest / "config.json").read_text())
    edit(config)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_universality_bad_input(capsys, quick_run, mnist_root, tmp_path):
    from mechscope.cnn.models.cnn import CNN, CNNConfig
    from mechscope.cnn.runs import save_run

    def other_data(c):
        c["data"]["name"] = "fashion-mnist"
        c["data"]["md5"] = {"t10k-labels-idx1-ubyte.gz": "0" * 32}

    fashion = _edited_copy(quick_run, tmp_path, "fashion", other_data)
    five = tmp_path / "five"
    five.mkdir()
    config = json.loads((quick_run / "config.json").read_text())
    config.pop("kind"), config.pop("model"), config.pop("versions", None)
    save_run(five, CNN(CNNConfig(n_classes=5)), config, {})
    deep = tmp_path / "deep"
    deep.mkdir()
    save_run(deep, CNN(CNNConfig(channels=(4, 4, 4), kernel_size=3, padding=1)), config, {})
    copy = tmp_path / "copy"
    shutil.copytree(quick_run, copy)
    cases = [
        ([str(quick_run), str(fashion)], ("fashion-mnist", "same dataset")),
        ([str(quick_run), str(five)], ("10 classes", "has 5")),
        ([str(quick_run), str(deep)], ("2 conv stages", "has 3", "same depth")),
        ([str(quick_run)], ("two or more runs",)),
        ([str(quick_run), str(tmp_path / "nope")], ("not found",)),
        ([str(quick_run), str(quick_run / ".")], ("different runs", "given more than once")),  # itself: universal
        ([str(quick_run), str(copy)], ("different networks; the same weights are in", "copy")),  # a byte copy
    ]
    for runs, fragments in cases:
        out = tmp_path / "out"
        code, _, err = run_main(capsys, "cnn", "universality", "--runs", *runs, "--out", str(out),
                                "--data-dir", str(mnist_root), *QUICK)  # fmt: skip
        assert code == 2
        assert_one_line_error(code, err, *fragments)
        assert not out.exists()
    code, _, err = run_main(capsys, "cnn", "universality", "--runs", str(quick_run), str(fashion), "--test-limit", "1",
                            "--out", str(tmp_path / "out"))  # fmt: skip
    assert_one_line_error(code, err, "--test-limit must be at least 100 images")  # CKA over 1 image was NaN
    out = tmp_path / "taken"
    out.mkdir()
    (out / "x").write_text("x")
    code, _, err = run_main(capsys, "cnn", "universality", "--runs", str(quick_run), str(five),
                            "--out", str(out), *QUICK)  # fmt: skip
    assert_one_line_error(code, err, "--force")
