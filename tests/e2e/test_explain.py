"""`mechscope mnist explain` end to end on a short run: JSON, report, independent re-checks, bad input."""

from __future__ import annotations

import json
import re
import shutil

import markupsafe
import pytest
import torch

from mechscope.cnn.data.mnist import MNIST
from mechscope.cnn.methods.explained import ExplainResult
from mechscope.core import intervene as A
from tests.e2e.reports import check_report, render_in_chromium
from tests.e2e.test_cli import assert_one_line_error, run_main
from tests.records import assert_round_trip

LIMIT = 2000  # test images: enough for every digit, fast enough for `make test`


def _png(path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1, 1))
    fig.subplots().imshow([[0, 1], [1, 0]])
    fig.savefig(path)


def _fake_linked_outputs(run):
    """featvis/ and attribution/ as `cnn visualize` and `cnn attribute` leave them (one unit each), made from
    the run's own weights (their hash recorded)."""
    from mechscope.cnn.runs import load_run
    from mechscope.core.outputs import write_json
    from tests.records import attribution_record, featvis_record

    sha = load_run(run).weights_sha256
    (run / "featvis" / "units").mkdir(parents=True)
    _png(run / "featvis" / "units" / "conv2_5.png")
    write_json(run / "featvis" / "featvis.json", featvis_record([("conv2.hook_post", 5, 1.0)], sha, 1.3).to_dict())
    (run / "attribution").mkdir()
    _png(run / "attribution" / "saliency.png")
    write_json(run / "attribution" / "faithfulness.json", attribution_record(["saliency"], sha).to_dict())


@pytest.fixture(scope="module")
def explained(quick_run, mnist_root, tmp_path_factory):
    """Explain a copy of the quick run (with linked outputs); record the model it used."""
    import mechscope.cnn.pipelines.explain as E
    from mechscope.cnn.config import ExplainSettings

    run = tmp_path_factory.mktemp("explain") / "run"
    shutil.copytree(quick_run, run)
    _fake_linked_outputs(run)
    used = []
    original = E.load_run

    def recording(path):
        loaded = original(path)
        used.append(loaded.model)
        return loaded

    E.load_run = recording
    try:
        out, result = E.explain_run(run, settings=ExplainSettings(test_limit=LIMIT), data_dir=mnist_root)
    finally:
        E.load_run = original
    return run, out, result, used[0]


def test_writes_report_and_mechanisms(explained):
    run, out, r, model = explained
    assert r.overview.n_test == LIMIT and r.class_names == tuple("0123456789")
    assert [c.target for c in r.circuits.circuits] == list(range(10)) and r.circuits.stage == "conv2"
    assert r.ablation.stage("conv1").mean.shape == (16, 10) and r.ablation.stage("conv2").zero.shape == (32, 10)
    assert r.ablation.readout.mean.shape == (512, 10)
    for stage in ("conv1", "conv2"):
        assert r.ablation.whole_stage(stage, "mean").test_accuracy < 0.2  # towards chance
    sel = r.selectivity_of("conv2")
    assert sel.index.shape == (32,) and sorted(sel.order) == list(range(32))
    assert r.patching.stage("conv1").position_mean.shape == (16, 12, 12)
    assert r.patching.clean_class == 8 and r.patching.corrupted_class == 3
    assert r.summary and all(isinstance(s, str) for s in r.summary)
    assert set(r.seconds) >= {"ablation", "patching", "circuits", "report"}
    from mechscope.cnn.runs import load_run

    assert r.model["weights_sha256"] == load_run(run).weights_sha256  # cnn discover --explain checks it
    saved = assert_round_trip(out / "mechanisms.json", ExplainResult)
    assert saved["schema"] == "mechscope.explain/3"
    assert saved == json.loads(json.dumps(r.to_dict()))  # the JSON is to_dict() of the result
    n_images = check_report(out / "report.html")
    assert n_images >= 11 + 48 + 2  # overview figures, one per channel, linked featvis and attribution
    html = (out / "report.html").read_text()
    assert 'alt="feature visualisation of conv2 channel 5"' in html
    assert 'alt="saliency"' in html
    # the order's two keys, each method's verdict, rho and gap
    assert "first those that pass the model-randomisation check (|Spearman ρ| under 0.5" in html
    rho = r"ρ -?\d\.\d\d on the non-zero pixels, -?\d\.\d\d over the image"
    verdict = rf": saliency \(passes, {rho}; gap -?\d\.\d\d\)\. "
    assert re.search(verdict + "A method that passes can still rank", html)
    assert "criterion on held-out images</th>" in html  # the circuits' criterion on images the search never saw
    for line in r.summary:  # the summary in the page is the result's, word for word
        assert str(markupsafe.escape(line)) in html


def test_report_renders_every_image_in_chromium(explained, tmp_path):
    _, out, _, _ = explained
    result = render_in_chromium(out / "report.html", tmp_path)
    assert result["broken"] == []
    assert result["images"] == check_report(out / "report.html")


def test_no_hook_remains_and_the_mode_is_kept(explained):
    from mechscope.core.hooks import attached_hooks

    model = explained[3]
    assert attached_hooks(model) == [] and not model.training


def verify_circuits(r, model, mnist, limit: int | None) -> None:
    """Recompute each circuit's numbers with a hand-written forward: no mechscope hooks or ablation code."""
    tol = r.circuits.tolerance
    x, y = MNIST.to_float(mnist.test_images[:limit]), mnist.test_labels[:limit]

    def conv2_out(images):
        with torch.no_grad():
            return torch.cat(
                [model.conv2(model.conv1(model.normalize(images[s : s + 1000]))) for s in range(0, len(images), 1000)]
            )

    mean = conv2_out(MNIST.to_float(mnist.train_images[:10_000])).double().mean(0).float()  # [32, 4, 4]
    a = conv2_out(x)
    with torch.no_grad():
        full = model.fc(a.flatten(1)).argmax(1)
        reads_as = int(model.fc(mean.flatten()[None]).argmax(1))  # every conv2 channel at its mean
    whole = r.ablation.whole_stage("conv2", "mean")
    assert whole.reads_as == reads_as and float(whole.predicted_share[reads_as]) == 1.0
    # the sampling (donors from the data distribution: any other test image); the measurement is ours
    assert r.circuits.resample_donors == "data"
    donors = A.resample_donors(y, seed=r.circuits.resample_seed, other_class=False)
    assert (donors != torch.arange(len(y))).all()
    assert abs(float((y[donors] == y).double().mean()) - r.circuits.resample_same_class_share) < 1e-12
    a_donor = a[donors]
    assert len(r.circuits.circuits) == 10
    for c in r.circuits.circuits:
        d, chans = c.target, list(c.channels)
        kept = mean.expand_as(a).clone()
        kept[:, chans] = a[:, chans]
        with torch.no_grad():
            pred = model.fc(kept.flatten(1)).argmax(1)
        acc, full_acc = (pred[y == d] == d).double().mean(), (full[y == d] == d).double().mean()
        fp, full_fp = (pred[y != d] == d).double().mean(), (full[y != d] == d).double().mean()
        assert c.meets_criterion, c
        assert acc >= full_acc - tol - 1e-9, (d, float(acc), float(full_acc))
        assert fp <= full_fp + tol + 1e-9, (d, float(fp), float(full_fp))
        assert abs(float(acc) - c.sufficiency) < 1e-9
        assert 0 < c.size == len(chans) <= 32
        ablated = a.clone()
        ablated[:, chans] = mean[chans]
        with torch.no_grad():
            nec = (model.fc(ablated.flatten(1)).argmax(1)[y == d] == d).double().mean()
        assert abs(float(nec) - c.necessity) < 1e-9
        resampled = a.clone()
        resampled[:, chans] = a_donor[:, chans]
        with torch.no_grad():
            nec_r = (model.fc(resampled.flatten(1)).argmax(1)[y == d] == d).double().mean()
        assert abs(float(nec_r) - c.necessity_resample) < 1e-9


def test_every_circuit_meets_its_criterion_checked_independently(explained, mnist):
    _, _, r, model = explained
    verify_circuits(r, model, mnist, LIMIT)


def test_ablation_matrix_matches_a_hand_computation(explained, mnist):
    """Spot-check one conv1 channel's mean-ablation row against a forward written out by hand."""
    _, _, r, model = explained
    x, y = MNIST.to_float(mnist.test_images[:LIMIT]), mnist.test_labels[:LIMIT]
    with torch.no_grad():
        ref = (
            torch.cat(
                [
                    model.conv1(model.normalize(MNIST.to_float(mnist.train_images[s : s + 2000])))
                    for s in range(0, 10_000, 2000)
                ]
            )
            .double()
            .mean(0)
            .float()
        )
        a1 = model.conv1(model.normalize(x))
        base = model.fc(model.conv2(a1).flatten(1)).argmax(1)
        a1[:, 4] = ref[4]
        pred = model.fc(model.conv2(a1).flatten(1)).argmax(1)
    for d in range(10):
        change = float((pred[y == d] == d).double().mean() - (base[y == d] == d).double().mean())
        assert abs(change - float(r.ablation.stage("conv1").mean[4, d])) < 1e-9


def test_refuses_to_overwrite_without_force(capsys, explained, mnist_root):
    run, out, _, _ = explained
    code, _, err = run_main(capsys, "cnn", "explain", "--run", str(run), "--data-dir", str(mnist_root))
    assert_one_line_error(code, err, "already exists", "--force")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--digit", "10"], "class 10 out of range: expected 0..9"),
        (["--class", "-1"], "class -1 out of range"),
        (["--class", "cat"], "unknown class 'cat'; expected 0..9 or a class name"),
        (["--patch", "3,3"], "two different classes"),
        (["--patch", "3"], "--patch expects two classes"),
        (["--patch", "3,12"], "patching class 12 out of range"),
        (["--circuit-layer", "conv3"], "unknown layer 'conv3'; the stages are conv1, conv2"),
        (["--test-limit", "5"], "--test-limit must be at least 100"),
        (["--pairs", "0"], "--pairs must be at least 1"),
        (["--tolerance", "1.5"], "--tolerance must be in [0, 1)"),
    ],
)
def test_bad_options_are_one_line(capsys, quick_run, tmp_path, args, fragment):
    code, _, err = run_main(capsys, "mnist", "explain", "--run", str(quick_run), "--out", str(tmp_path / "o"), *args)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "o").exists()


def test_bad_runs_are_one_line(capsys, quick_run, tmp_path):
    code, _, err = run_main(capsys, "mnist", "explain", "--run", str(tmp_path / "absent"))
    assert_one_line_error(code, err, "run directory not found")
    other = tmp_path / "toy"  # a directory another command wrote
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"kind": "toy-transformer"}))
    code, _, err = run_main(capsys, "mnist", "explain", "--run", str(other))
    assert_one_line_error(code, err, "kind 'toy-transformer'", "expected 'cnn'")
    wide = tmp_path / "wide"  # a CNN of another shape
    shutil.copytree(quick_run, wide)
    cfg = json.loads((wide / "config.json").read_text())
    cfg["model"]["channels"] = [16, 8]
    (wide / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_main(capsys, "mnist", "explain", "--run", str(wide))
    assert_one_line_error(code, err, "weights of another architecture")
