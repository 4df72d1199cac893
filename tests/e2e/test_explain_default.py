"""The default run explained in full (slow: trains the default CNN, then explains all 10,000 test images)."""

from __future__ import annotations

import pytest

from tests.e2e.reports import check_report, render_in_chromium
from tests.e2e.test_explain import verify_circuits


@pytest.mark.slow
def test_default_run_explained(mnist_root, mnist, tmp_path):
    from mechscope.cnn.pipelines.explain import explain_run
    from mechscope.cnn.pipelines.train import train
    from mechscope.cnn.runs import load_run
    from mechscope.core.hooks import attached_hooks

    run = tmp_path / "run"
    _, metrics = train(run, data_dir=mnist_root, progress=False)
    out, r = explain_run(run, data_dir=mnist_root)
    assert r.overview.n_test == 10_000 and r.overview.test_accuracy > 0.99
    n_images = check_report(out / "report.html")
    assert render_in_chromium(out / "report.html", tmp_path) == {"images": n_images, "broken": []}
    model = load_run(run).model
    verify_circuits(r, model, mnist, None)
    assert attached_hooks(model) == []
