"""``mechscope cnn blocks`` end to end: the quick MNIST run (one image, typical images, reuse of `cnn visualize`'s
channel pictures), other shapes of network and data, the report drawn offline in Chromium, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from mechscope.cnn.methods.blocks import BlocksResult
from tests.e2e.reports import check_report, render_in_chromium
from tests.e2e.test_cli import assert_one_line_error, run_main
from tests.records import assert_round_trip
from tests.shapes import CLASS_NAMES, splits

SMALL = ["--steps", "2", "--grid", "6"]


def test_blocks_one_image_report_and_json(capsys, quick_run, mnist_root, tmp_path):
    out = tmp_path / "blocks"
    code, stdout, err = run_main(capsys, "cnn", "blocks", "--run", str(quick_run), "--data-dir", str(mnist_root),
                                 "--image", "3", "--out", str(out), *SMALL)  # fmt: skip
    assert code == 0, err
    assert "Test image 3" in stdout and "blocks.json and report.html written" in stdout
    d = assert_round_trip(out / "blocks.json", BlocksResult)
    assert d["selection"]["images"] == [3] and [lb["stage"] for lb in d["layers"]] == ["conv1", "conv2"]
    for lb in d["layers"]:
        g = lb["groups"]
        assert g["explained"] >= 0.9 and g["curve"][g["k"] - 1] == g["explained"]
        assert all(b >= a - 1e-12 for a, b in zip(g["curve"], g["curve"][1:], strict=False))
        assert np.array(g["directions"]).shape == (g["k"], lb["shape"][0])
        assert lb["grid"] == [6, 6] if lb["stage"] == "conv1" else lb["grid"] == [4, 4]
        assert len(lb["example_images"]) == g["k"]
    last = d["flows"][-1]
    assert last["target"] == "logits" and len(last["targets"]) == 10
    np.testing.assert_allclose(last["grad_x_act"], last["actual_change"], atol=1e-3)  # linear read-out: exact
    assert "computed here" in d["channel_source"] and d["settings"]["weights_sha256"]
    assert check_report(out / "report.html") == 3 + 2 * 3
    seen = render_in_chromium(out / "report.html", tmp_path)
    assert seen["broken"] == [] and seen["images"] >= 8


def test_blocks_typical_reuses_channel_pictures_and_explain_links_it(capsys, quick_run, mnist_root, tmp_path):
    import torch

    from mechscope.cnn.methods.blocks_vis import save_for_blocks
    from mechscope.cnn.models.spec import walk
    from mechscope.cnn.pipelines.blocks import blocks_link
    from mechscope.cnn.runs import load_run

    run = tmp_path / "run"  # a copy of the run with channel pictures as `cnn visualize` saves them beside it
    run.mkdir()
    for f in quick_run.iterdir():
        if f.is_file():
            (run / f.name).write_bytes(f.read_bytes())
    (run / "featvis").mkdir()
    model = load_run(run).model
    spec = walk(model)
    assign = [(s.hook_post, c) for s in spec.stages for c in range(s.out_channels)]
    save_for_blocks(run / "featvis", model, spec, assign, torch.rand(len(assign), 1, 28, 28))
    code, stdout, err = run_main(capsys, "cnn", "blocks", "--run", str(run), "--data-dir", str(mnist_root),
                                 "--typical", "1", "--groups", "3", "--steps", "2", "--grid", "2")  # fmt: skip
    assert code == 0, err
    d = assert_round_trip(run / "blocks" / "blocks.json", BlocksResult)
    assert len(d["selection"]["images"]) == 10 and sorted(d["selection"]["labels"]) == list(range(10))
    assert all(lb["groups"]["k"] == 3 and lb["groups"]["chosen_by"] == "--groups" for lb in d["layers"])
    assert d["channel_source"].startswith("reused from")
    assert "Towards each class" in stdout
    assert check_report(run / "blocks" / "report.html") == 3 + 2 * 3  # per stage: grids, dictionary, groups
    assert blocks_link(run, run / "explain", load_run(run).model) == "../blocks/report.html"


@pytest.mark.parametrize(
    "name,args,rgb",
    [
        ("three-bn-gelu", ["--channels", "4,6,6", "--kernel-size", "3", "--padding", "1", "--batchnorm",
                           "--activation", "gelu", "--pool", "1"], False),
        ("rgb", ["--channels", "4,6", "--kernel-size", "3", "--padding", "1"], True),
    ],
)  # fmt: skip
def test_blocks_other_networks_and_data(capsys, tmp_path, name, args, rgb):
    data = tmp_path / "data.npz"
    np.savez(data, **splits(rgb=rgb, seed=3))
    names = tmp_path / "names.txt"
    names.write_text("\n".join(CLASS_NAMES) + "\n")
    run = tmp_path / name
    code, _, err = run_main(capsys, "cnn", "train", "--out", str(run), "--dataset", str(data), "--class-names",
                            str(names), *args, "--max-steps", "4", "--batch-size", "32")  # fmt: skip
    assert code == 0, err
    code, _, err = run_main(capsys, "cnn", "blocks", "--run", str(run), "--image", "1", *SMALL)
    assert code == 0, err
    d = assert_round_trip(run / "blocks" / "blocks.json", BlocksResult)
    n_stages = len(args[1].split(","))
    assert len(d["layers"]) == n_stages and len(d["flows"]) == n_stages
    assert d["flows"][-1]["targets"] == list(CLASS_NAMES)
    if name == "three-bn-gelu":  # 16×16 maps without pooling: averaged into a 6×6 grid
        assert all(lb["grid"] == [6, 6] and lb["shape"][1:] == [16, 16] for lb in d["layers"])
    assert check_report(run / "blocks" / "report.html") >= 4


@pytest.mark.parametrize(
    "extra,fragments",
    [
        (["--image", "10000"], ["--image 10000 out of range", "0..9999"]),
        (["--groups", "0"], ["--groups must be at least 1"]),
        (["--groups", "17"], ["--groups 17", "conv1 has only 16 channels"]),
        (["--typical", "0"], ["--typical must be at least 1"]),
        (["--typical", "1", "--image", "2"], ["exclude each other"]),
        (["--steps", "0"], ["--steps must be at least 1"]),
        (["--grid", "0"], ["--grid must be at least 1"]),
        (["--threads", "0"], ["--threads must be an integer from 1"]),
    ],
)
def test_blocks_bad_input(capsys, quick_run, mnist_root, tmp_path, extra, fragments):
    out = tmp_path / "blocks"
    code, _, err = run_main(capsys, "cnn", "blocks", "--run", str(quick_run), "--data-dir", str(mnist_root),
                            "--out", str(out), *extra)  # fmt: skip
    assert code == 2
    assert_one_line_error(code, err, *fragments)
    assert not out.exists()


def test_blocks_missing_run_and_existing_output(capsys, quick_run, mnist_root, tmp_path):
    code, _, err = run_main(capsys, "cnn", "blocks", "--run", str(tmp_path / "nope"))
    assert_one_line_error(code, err, "run directory not found")
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _, err = run_main(capsys, "cnn", "blocks", "--run", str(quick_run), "--data-dir", str(mnist_root),
                            "--out", str(out))  # fmt: skip
    assert_one_line_error(code, err, "already exists", "--force")
