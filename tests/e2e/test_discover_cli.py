"""``mechscope lm discover``, ``mechscope cnn discover`` and ``mechscope scrub``: outputs that load back, reports
that stand alone, and every bad input one line with exit status 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mechscope.cnn.methods.discovery import CNNDiscovery
from mechscope.cnn.methods.scrubbing import CNNScrub
from mechscope.lm.methods.discovery import LMDiscovery
from mechscope.lm.methods.scrubbing import LMScrub
from tests.e2e.test_cli import assert_one_line_error, run_main
from tests.unit.test_repr_html import check_fragment
from tests.unit.test_tracr import tracr_root


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Single-threaded: these models are tiny, and on a machine shared with other jobs two threads spinning for
    cores another process holds make these tests 5x slower (98 s against 21 s measured at load 4)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _standalone(report: Path) -> None:
    html = report.read_text(encoding="utf-8")
    assert '<img src="data:image/png;base64,' in html and "http://" not in html and "https://" not in html


def test_lm_discover_on_a_tracr_model(capsys, tmp_path):
    out = tmp_path / "hist"
    code, stdout, err = run_main(capsys, "lm", "discover", "--model", str(tracr_root() / "hist"), "--method", "acdc",
                                 "--out", str(out), "--random", "2")  # fmt: skip
    assert code == 0, err
    assert ("Against circuit.json (primary edges, 4): edge AUROC 1.000; precision 1.00 and recall 1.00 of the top 4 "
            "edges (as many as the set has); node AUROC undefined (every head and MLP is in the known circuit), node "
            "recall of the top 2 nodes (as many as it has) 1.00. The drawn circuit's 4 edges hold 4 of them "
            "(precision 1.00, recall 1.00).") in stdout
    # ACDC's circuit is hist's known one: alone (every other edge patched) it does what the model does
    assert "the circuit alone: logit_diff 0.7528, 100.0% of the way from the empty circuit" in stdout
    assert "Alone (every other edge carries the corrupted input&#39;s value) it gives 0.7528: 100.0%" in (
        out / "report.html").read_text()
    r = LMDiscovery.load(out)
    assert r.method == "acdc" and r.ground_truth["primary"].node_recall_at_size == 1.0 and r.faithfulness.n_random == 2
    _standalone(out / "report.html")
    check_fragment(r._repr_html_())  # in a notebook: the same page as one self-contained fragment
    code, _, err = run_main(capsys, "lm", "discover", "--model", str(tracr_root() / "hist"), "--out", str(out))
    assert_one_line_error(code, err, "--force")


def test_lm_scrub_on_a_tracr_model(capsys, tmp_path):
    circuit = json.loads((tracr_root() / "length" / "circuit.json").read_text())
    hyp = {"name": "length", "model": str(tracr_root() / "length"), "metric": "accuracy", "samples": 3,
           "sampling": "sender",
           "claims": [{"name": "the compiled circuit", "edges": [list(e) for e in circuit["edge_sets"]["all"]
                                                                  if e[0] != "blocks.0.attn.h0"]},
                      {"name": "the head's output depends only on the length",
                       "edges": ["blocks.0.attn.h0->blocks.0.mlp<in>"], "feature": "length"}]}  # fmt: skip
    path = tmp_path / "length.json"
    path.write_text(json.dumps(hyp))
    threads = torch.get_num_threads()
    code, stdout, err = run_main(capsys, "scrub", "--hypothesis", str(path), "--out", str(tmp_path / "s"),
                                 "--threads", "2")  # fmt: skip
    assert code == 0, err
    assert torch.get_num_threads() == threads  # --threads holds for the command only
    assert "100.0% ± 0.0% of the behaviour recovered" in stdout
    r = LMScrub.load(tmp_path / "s")
    assert r.scrub.recovered == pytest.approx(1.0) and r.features == {"length": r.features["length"]}
    page = (tmp_path / "s" / "report.html").read_text()
    task = r.task_description.split("; corrupted:")[0]  # discovery's corrupted input is not what scrubbing runs
    assert f": {task};" in page and "derangement" not in page  # the task and its examples
    passes = f"{r.scrub.forward_passes:,} forward passes of the scrubbing in "  # the shared page: core/render
    assert passes in page and f"({r.work['forward_passes']:,.0f} with the clean runs" in page
    _standalone(tmp_path / "s" / "report.html")
    check_fragment(r._repr_html_())


def test_cnn_discover_and_scrub(capsys, tmp_path, quick_run):
    out = tmp_path / "d"
    code, stdout, err = run_main(capsys, "cnn", "discover", "--run", str(quick_run), "--class", "1", "--n", "16",
                                 "--method", "eap", "--random", "1", "--out", str(out))  # fmt: skip
    assert code == 0, err
    r = CNNDiscovery.load(out)
    assert r.target == 1 and r.scores.graph.n_edges == 16 + 16 * 32 + 32 and "faithfulness: CPR" in stdout
    _standalone(out / "report.html")
    check_fragment(r._repr_html_())
    hyp = {"run": str(quick_run), "metric": "accuracy", "target": 1, "data": {"n": 60}, "samples": 2,
           "claims": [{"name": "everything", "edges": ["*"]}]}  # fmt: skip
    path = tmp_path / "all.json"
    path.write_text(json.dumps(hyp))
    code, stdout, err = run_main(capsys, "scrub", "--hypothesis", str(path), "--out", str(tmp_path / "s"))
    assert code == 0, err
    scrubbed = CNNScrub.load(tmp_path / "s")
    assert scrubbed.scrub.recovered == pytest.approx(1.0)
    # accuracy with a target reads the target's images only: the page says how many (each moves it by 1/k)
    k = scrubbed.settings["metric_images"]
    assert 0 < k < 60 and f"(60 test images, class 1; the metric averages over the {k} of class 1)" in (
        tmp_path / "s" / "report.html").read_text()
    assert scrubbed.scrub.metric_clean * k == pytest.approx(round(scrubbed.scrub.metric_clean * k))
    check_fragment(scrubbed._repr_html_())


def _hyp(tmp_path, **data) -> str:
    path = tmp_path / "h.json"
    path.write_text(json.dumps({"model": str(tracr_root() / "hist"), **data}))
    return str(path)


BAD_CLAIMS = [
    ([{"name": "x", "edges": ["embed->blocks.0.attn.h7<q>"]}], "unknown component 'blocks.0.attn.h7'"),
    ([{"name": "x", "edges": ["embed->blocks.0.attn.h0<hook_z>"]}], "no input slot 'hook_z'"),
    ([{"name": "x", "path": ["unembed", "blocks.0.mlp"]}], "no edge from 'unembed'"),
    ([{"name": "x", "path": ["blocks.0.mlp", "blocks.0.attn.h0"]}], "no edge from"),
    ([{"name": "x", "edges": ["embed->unembed"], "feature": "mood"}], "unknown feature 'mood'"),
    ([{"name": "x"}], "exactly one of 'path', 'edges' and 'rest'"),
]


@pytest.mark.parametrize(("claims", "match"), BAD_CLAIMS)
def test_a_bad_hypothesis_is_one_line(capsys, tmp_path, claims, match):
    code, _, err = run_main(capsys, "scrub", "--hypothesis", _hyp(tmp_path, claims=claims), "--out",
                            str(tmp_path / "o"))  # fmt: skip
    assert_one_line_error(code, err, match)
    assert code == 2 and not (tmp_path / "o").exists()


def test_unreadable_hypothesis_files_are_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, _, err = run_main(capsys, "scrub", "--hypothesis", str(bad))
    assert_one_line_error(code, err, "corrupt JSON")
    code, _, err = run_main(capsys, "scrub", "--hypothesis", str(tmp_path / "none.json"))
    assert_one_line_error(code, err, "not found")
    code, _, err = run_main(capsys, "scrub", "--hypothesis", _hyp(tmp_path, claims=[], colour=1))
    assert_one_line_error(code, err, "unknown key 'colour'")
    for wing in ("", False, 0, None):  # falsy: it fell back to guessing the wing, where 5 was refused
        code, _, err = run_main(capsys, "scrub", "--hypothesis", _hyp(tmp_path, claims=[], wing=wing))
        assert_one_line_error(code, err, f"'wing' must be 'lm' or 'cnn', got {wing!r}")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("--threshold", "-0.5", "--method", "acdc"), "--threshold must be >= 0"),
        (("--threshold", "nan", "--method", "acdc"), "--threshold must be a finite number"),
        (("--metric", "bleu"), "unknown metric 'bleu'"),
        (("--metric", "accuracy", "--method", "eap"), "differentiable"),
        (("--metric", "kl", "--method", "eap"), "gradient is 0"),
        (("--method", "gradcam"), "unknown method"),
        (("--size", "2.5"), "--size as a fraction"),
        (("--size", "many"), "--size expects"),
        (("--size", "0"), "--size as an edge count must be at least 1, got 0"),  # wrote a circuit of no edge
        (("--size", "1000"), "circuit size 1000 is more than the graph's 13 edges"),  # was after the scoring
        (("--task", "ioi"), "unknown task"),
        (("--task", "induction", "--n", "3", "--batch", "2"), "not next tokens (a compiled tracr model)"),
        (("--threads", "0"), "--threads must be an integer from 1"),
    ],
)
def test_bad_lm_discover_settings_are_one_line(capsys, tmp_path, args, match):
    code, _, err = run_main(capsys, "lm", "discover", "--model", str(tracr_root() / "hist"), "--out",
                            str(tmp_path / "o"), *args)  # fmt: skip
    assert_one_line_error(code, err, match)
    assert code == 2


@pytest.mark.parametrize("missing", ["examples.json", "circuit.json", "model.safetensors"])
def test_a_tracr_folder_with_a_missing_file_is_one_line(capsys, tmp_path, missing):
    d = tmp_path / "hist"
    shutil.copytree(tracr_root() / "hist", d)
    for f in d.iterdir():
        f.chmod(0o644)
    (d / missing).unlink()
    code, _, err = run_main(capsys, "lm", "discover", "--model", str(d), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, f"{missing}: missing")


def test_an_inconsistent_tracr_folder_is_one_line(capsys, tmp_path):
    d = tmp_path / "hist"
    shutil.copytree(tracr_root() / "hist", d)
    for f in d.iterdir():
        f.chmod(0o644)
    cfg = json.loads((d / "config.json").read_text())
    cfg["d_mlp"] = 15
    (d / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_main(capsys, "lm", "discover", "--model", str(d), "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "blocks.0.mlp.W_in has shape [20, 14]; config.json's sizes give [20, 15]")


def test_bad_cnn_discover_settings_are_one_line(capsys, tmp_path, quick_run):
    for args, match in [
        (("--threshold", "-1", "--method", "acdc"), "--threshold must be >= 0"),
        (("--metric", "detect"), "needs a target class"),
        (("--class", "12"), "class 12 out of range: expected 0..9"),
        (("--digit", "12"), "class 12 out of range: expected 0..9"),  # the mnist group's name, as cnn explain takes
        (("--explain", str(tmp_path)), "--explain compares a class's circuit"),
        (("--class", "1", "--explain", str(tmp_path)), "mechanisms.json: not found"),
        (("--threads", "-1"), "--threads must be an integer from 1"),
        (("--n", "20000"), "n is 20,000: there are 10,000 test images"),
        (("--n", "2000", "--class", "3"), "n is 2,000: class 3 has"),
    ]:
        code, _, err = run_main(capsys, "cnn", "discover", "--run", str(quick_run), "--n", "8", "--out",
                                str(tmp_path / "o"), *args)  # fmt: skip
        assert_one_line_error(code, err, match)
        assert code == 2
    # a mechanisms.json's channels are checked against the run's last stage (each was a traceback)
    for i, (channels, match) in enumerate([
        ([999], "channel 999 is not a channel index (0..31)"), ([-1], "channel -1 is not"),
        ([2**64], "is not a channel index"), (["a"], "channel 'a' is not"), ([1.7], "channel 1.7 is not"),
        ([True], "channel True is not"), ([[1]], "channel [1] is not"), (None, "non-empty list"),
        ([], "non-empty list"), ([3, 3], "name a channel twice"),
    ]):  # fmt: skip
        folder = tmp_path / f"explain{i}"
        folder.mkdir()
        (folder / "mechanisms.json").write_text(json.dumps({"circuits": {"circuits": [{"target": 1,
                                                                                       "channels": channels}]}}))
        code, _, err = run_main(capsys, "cnn", "discover", "--run", str(quick_run), "--n", "8", "--class", "1",
                                "--explain", str(folder), "--out", str(tmp_path / "o"))  # fmt: skip
        assert_one_line_error(code, err, match)
    (tmp_path / "explain0" / "mechanisms.json").write_text(json.dumps({"circuits": {"circuits": None}}))
    code, _, err = run_main(capsys, "cnn", "discover", "--run", str(quick_run), "--n", "8", "--class", "1",
                            "--explain", str(tmp_path / "explain0"), "--out", str(tmp_path / "o"))  # fmt: skip
    assert_one_line_error(code, err, "circuits.circuits is not a list")
    for text, said in (("[1, 2]", "holds a JSON list; expected an object (cnn explain mechanisms.json)"),
                       ('{"circuits": [1]}', "circuits.circuits is not a list"),
                       ('{"circuits": {"circuits": [], "circuits": []}}', "corrupt JSON")):  # fmt: skip
        (tmp_path / "explain0" / "mechanisms.json").write_text(text)
        code, _, err = run_main(capsys, "cnn", "discover", "--run", str(quick_run), "--n", "8", "--class", "1",
                                "--explain", str(tmp_path / "explain0"), "--out", str(tmp_path / "o"))  # fmt: skip
        assert_one_line_error(code, err, said)
        assert "TypeError" not in err
    # another run's explanation (channel numbers of other weights) is refused where the file records its weights
    other = {"model": {"weights_sha256": "0" * 64}, "circuits": {"circuits": [{"target": 1, "channels": [3]}]}}
    (tmp_path / "explain0" / "mechanisms.json").write_text(json.dumps(other))
    code, _, err = run_main(capsys, "cnn", "discover", "--run", str(quick_run), "--n", "8", "--class", "1",
                            "--explain", str(tmp_path / "explain0"), "--out", str(tmp_path / "o"))  # fmt: skip
    assert_one_line_error(code, err, "not this run's explanation: it was made from other weights (sha256 000000000000")


def test_task_settings_a_file_gives_are_checked_against_its_task(capsys, tmp_path):
    """A tracr hypothesis's induction settings were dropped without a word (data.n of 2**64 ran); the error names the
    file. A tracr folder whose examples are all the same gave a meaningless all-zero circuit (and one example, a
    'derangement' message)."""
    claims = [{"name": "x", "edges": ["*"]}]
    for data, match in [({"n": 5}, "n: not settings of the tracr task (it reads seed, limit)"),
                        ({"n": 2**64}, "n: not settings of the tracr task"),
                        ({"token_range": [3, 1]}, "token_range: not settings of the tracr task")]:  # fmt: skip
        path = _hyp(tmp_path, claims=claims, data=data, samples=2)
        code, _, err = run_main(capsys, "scrub", "--hypothesis", path, "--out", str(tmp_path / "o"))
        assert_one_line_error(code, err, f"{path}: {match}")
    d = tmp_path / "same"
    shutil.copytree(tracr_root() / "hist", d)
    for f in d.iterdir():
        f.chmod(0o644)
    ex = json.loads((d / "examples.json").read_text())
    for n, match in ((20, "examples.json: every example is the same"), (1, "it needs two or more")):
        ex["examples"] = [ex["examples"][3]] * n
        (d / "examples.json").write_text(json.dumps(ex))
        code, _, err = run_main(capsys, "lm", "discover", "--model", str(d), "--method", "eap", "--no-curve",
                                "--out", str(tmp_path / "o"))  # fmt: skip
        assert_one_line_error(code, err, match)


@pytest.mark.parametrize(("args", "match"), [
    (["--method", "eap", "--steps", "5"], "--steps is EAP-IG's interpolation steps; --method eap does not read it"),
    (["--method", "acdc", "--steps", "0"], "--method acdc does not read it"),
    (["--no-curve", "--random", "5"], "which --no-curve skips"),  # its default value, given: refused too
    (["--method", "eap-ig", "--ablation", "zero"], "eap-ig integrates from the corrupted input's activations: it "
                                                   "does not read --ablation zero"),  # recorded, never applied
    (["--method", "acdc", "--ablation", "half"], "unknown ablation 'half': one of patch, mean, zero"),
])  # fmt: skip
def test_discover_refuses_settings_its_other_settings_leave_unread(capsys, tmp_path, args, match):
    for wing, model in (("lm", ["--model", str(tracr_root() / "length")]), ("cnn", ["--run", str(tmp_path / "no")])):
        code, _, err = run_main(capsys, wing, "discover", *model, *args, "--out", str(tmp_path / wing))
        assert_one_line_error(code, err, match)  # before the model or the run is read
        assert not (tmp_path / wing).exists()
