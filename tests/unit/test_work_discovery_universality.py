"""The ``work`` entry of circuit discovery and causal scrubbing (both wings) and of CNN universality: in the JSON,
and equal to what the methods count themselves (``forward_passes``, ``backward_passes``) or to counts known by
construction, on tiny networks and a tiny .npz dataset."""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch

from mechscope.cnn.methods.discovery import CNNDiscovery
from mechscope.cnn.methods.scrubbing import CNNScrub
from mechscope.cnn.methods.universality import UniversalityResult
from mechscope.cnn.models.cnn import CNN, CNNConfig
from mechscope.cnn.runs import save_run
from mechscope.core.torch_utils import WorkCounter
from mechscope.lm.methods.discovery import LMDiscovery
from mechscope.lm.methods.scrubbing import LMScrub
from mechscope.lm.methods.tasks import make_task
from mechscope.lm.pipelines import discovery as lm_pipeline
from tests.unit.test_discovery_lm import tiny

pytestmark = pytest.mark.usefixtures("one_thread")

STAGES = 3  # the tiny CNNs' conv stages
N_TEST, N_TRAIN = 48, 60


def method_passes(r) -> int:
    """The discovery method's own forward passes: its scores, the faithfulness curve and the drawn circuit alone."""
    return r.scores.forward_passes + r.faithfulness.forward_passes + r.circuit_faithfulness["forward_passes"]


def noise_npz(where: Path) -> Path:
    """A 3-class dataset of seeded 16×16 noise images, N_TRAIN and N_TEST of them, in ``where``."""
    g = np.random.default_rng(0)
    path = where / "noise.npz"
    np.savez(path, x_train=g.integers(0, 256, (N_TRAIN, 16, 16)).astype(np.uint8), y_train=np.arange(N_TRAIN) % 3,
             x_test=g.integers(0, 256, (N_TEST, 16, 16)).astype(np.uint8), y_test=np.arange(N_TEST) % 3)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> Path:
    return noise_npz(tmp_path_factory.mktemp("data"))


def cnn_run(where: Path, npz: Path, seed: int = 0, channels=(3, 4, 5)) -> Path:
    """A run directory of a randomly initialised CNN of ``STAGES`` stages on the .npz."""
    torch.manual_seed(seed)
    model = CNN(CNNConfig(image_size=16, channels=channels, kernel_size=3, padding=1, n_classes=3)).eval()
    where.mkdir(parents=True)
    save_run(where, model, {"data": {"name": "noise", "kind": "npz", "file": str(npz)}}, {})
    return where


@pytest.fixture(scope="module")
def run_a(npz, tmp_path_factory) -> Path:
    return cnn_run(tmp_path_factory.mktemp("runs") / "a", npz)


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# ---- cnn discover and scrub ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "metric", "extra"),
    [("eap", "logprob", 0), ("eap-ig", "kl", 1), ("acdc", "logprob", 2), ("edge-patching", "logit", 0)],
)
def test_cnn_discover_counts_what_the_methods_count(run_a, tmp_path, method, metric, extra):
    """Every forward runs the clean or the corrupted batch of n images through the whole network: the counter's
    passes are the method's forward_passes (scores and faithfulness) plus the kl metric's clean logits (1) or
    ACDC's two runs for its default threshold (2). A backward stops at the first stage's receivers, so it runs
    S - 1 of the S stages' convolutions."""
    from mechscope.cnn.pipelines.discovery import discover_run

    steps = {"steps": 3} if method == "eap-ig" else {}  # the other methods refuse it (they do not read it)
    out, r = discover_run(run_a, tmp_path / "d", method=method, metric=metric, n=16, n_random=1, **steps)
    w = r.work
    assert w["unit"] == "images" and w["rows_per_pass"] == r.n_examples == 16
    assert w["forward_passes"] == method_passes(r) + extra
    assert w["layer_calls"]["forward"] == STAGES * w["forward_passes"]
    assert w["layer_calls"]["backward"] == (STAGES - 1) * r.scores.backward_passes
    assert w["backward_passes"] == round(r.scores.backward_passes * (STAGES - 1) / STAGES, 3)
    assert r.scores.backward_passes == {"eap": 1, "eap-ig": 3}.get(method, 0)
    assert _json(out / CNNDiscovery.FILE)["work"] == w and CNNDiscovery.load(out).work == w


def test_counting_changes_no_number_of_a_discovery(run_a, tmp_path, monkeypatch):
    """The counter's hooks (a backward hook on every convolution) leave every number as it was."""
    from mechscope.cnn.pipelines.discovery import discover_run

    _, counted = discover_run(run_a, tmp_path / "a", method="eap-ig", n=16, steps=2, n_random=1)
    monkeypatch.setattr(WorkCounter, "counting", lambda self: nullcontext(self))
    _, plain = discover_run(run_a, tmp_path / "b", method="eap-ig", n=16, steps=2, n_random=1)
    a, b = counted.to_dict(), plain.to_dict()
    for d in (a, b):
        d.pop("seconds"), d["scores"].pop("seconds"), d["faithfulness"].pop("seconds")
    assert b.pop("work")["forward_passes"] == 0.0 and a.pop("work")["forward_passes"] > 0
    assert a == b


def test_cnn_scrub_counts_the_scrubber_and_one_clean_run(run_a, tmp_path, caplog):
    from mechscope.cnn.pipelines.discovery import scrub_file

    hyp = {"run": str(run_a), "metric": "logprob", "data": {"n": 40}, "samples": 2,
           "claims": [{"name": "first", "edges": ["input->conv1.*"]},
                      {"name": "class", "edges": ["conv2.c0->*"], "feature": "class"}]}  # fmt: skip
    with caplog.at_level(logging.INFO, logger="mechscope.core.torch_utils"):
        out, r = scrub_file(hyp, "h.json", tmp_path / "s")
    w = r.work
    assert w["rows_per_pass"] == r.settings["n"] == 40 and w["unit"] == "images"
    assert w["forward_passes"] == r.scrub.forward_passes + 1 and w["backward_passes"] == 0.0
    assert _json(out / CNNScrub.FILE)["work"] == w
    assert f"cnn scrub: {w['forward_passes']} forward and 0.0 backward passes of 40 images" in caplog.messages


def test_json_without_work_still_loads(run_a, tmp_path):
    from mechscope.cnn.pipelines.discovery import discover_run

    _, r = discover_run(run_a, tmp_path / "d", method="eap", n=8, curve=False)
    d = r.to_dict()
    del d["work"]
    assert CNNDiscovery.from_dict(d).work is None


# ---- lm discover and scrub -----------------------------------------------------------------------------


@pytest.fixture()
def tiny_lm(monkeypatch):
    """``lm discover`` and ``scrub`` on a 2-layer transformer, whatever the model's name."""
    model = tiny("gpt2", layers=2, n_ctx=32)
    monkeypatch.setattr(lm_pipeline, "load_any", lambda spec, *args, **kwargs: model)
    return model


@pytest.mark.parametrize(("method", "extra"), [("eap", 0), ("eap-ig", 0), ("acdc", 2)])
def test_lm_discover_counts_what_the_methods_count(tiny_lm, tmp_path, method, extra):
    """Tokens through the blocks, in passes over the induction task's clean batch (4 × (1 + 2 × 6) tokens): the
    method's passes, the task's clean run (1) and ACDC's threshold runs (2); every backward runs every block."""
    steps = {"steps": 3} if method == "eap-ig" else {}
    out, r = lm_pipeline.discover_model("tiny", tmp_path / "d", method=method, n=6, batch=4, n_random=1,
                                        size=10, token_range=(3, 23), **steps)  # fmt: skip
    w = r.work
    assert w["unit"] == "tokens" and w["rows_per_pass"] == 4 * 13
    assert w["forward_passes"] == method_passes(r) + 1 + extra
    assert w["backward_passes"] == r.scores.backward_passes == {"eap": 1, "eap-ig": 3}.get(method, 0)
    assert w["layer_calls"] == {"forward": 2 * w["forward_passes"], "backward": 2 * w["backward_passes"]}
    assert _json(out / LMDiscovery.FILE)["work"] == w and LMDiscovery.load(out).work == w


def test_lm_scrub_counts_the_scrubber_and_the_task(tiny_lm, tmp_path):
    hyp = {"model": "tiny", "metric": "loss", "data": {"n": 6, "batch": 4, "token_range": [3, 23]}, "samples": 2,
           "claims": [{"name": "one edge", "edges": ["embed->blocks.0.attn.h0<q>"]}]}  # fmt: skip
    out, r = lm_pipeline.scrub_file(hyp, "h.json", tmp_path / "s")
    w = r.work
    assert w["rows_per_pass"] == 4 * 13 and w["forward_passes"] == r.scrub.forward_passes + 1
    assert w["backward_passes"] == 0.0 and _json(out / LMScrub.FILE)["work"] == w


def test_lm_discover_on_tracr_counts_padded_tokens_and_both_task_runs(tmp_path):
    from tests.unit.test_tracr import tracr_root

    hist = str(tracr_root() / "hist")
    out, r = lm_pipeline.discover_model(hist, tmp_path / "d", method="eap-ig", steps=2, n_random=1)
    task = make_task(lm_pipeline.load_any(hist))
    w = r.work
    assert w["rows_per_pass"] == task.ids.numel() and r.n_examples == task.ids.shape[0]
    assert w["forward_passes"] == method_passes(r) + 2  # clean, corrupted
    assert w["backward_passes"] == r.scores.backward_passes == 2


# ---- cnn universality ----------------------------------------------------------------------------------


def test_universality_counts_each_network(npz, run_a, tmp_path, caplog):
    """One counter per network. A random baseline only makes the one pass over the test images. A run without
    RUN/explain and RUN/featvis also has its class circuits searched (the last stage's mean over N_TRAIN // 2
    training images, and a second pass over the test images) and its shown units rendered: steps + 1 forwards and
    steps backwards of one image per unit, the backward down from the deepest unit's stage."""
    from mechscope.cnn.config import ExplainSettings
    from mechscope.cnn.pipelines.universality import shown_pairs, universality

    run_b = cnn_run(tmp_path / "b", npz, seed=1, channels=(4, 4, 6))
    steps = 2
    with caplog.at_level(logging.INFO, logger="mechscope.core.torch_utils"):
        out, u = universality([run_a, run_b], tmp_path / "u", vis_steps=steps)
    assert set(u.work) == {"a", "b", "random a", "random b"} and u.test_images == N_TEST
    for lab in ("random a", "random b"):
        assert u.work[lab]["forward_passes"] == 1.0 and u.work[lab]["backward_passes"] == 0.0
    shown = shown_pairs(u.comparisons, "a")
    units = {"a": {(st, p.a) for _, _, st, rows in shown for p in rows},
             "b": {(st, p.b) for _, _, st, rows in shown for p in rows}}  # fmt: skip
    reference = min(ExplainSettings().n_mean, N_TRAIN // 2)
    for lab in ("a", "b"):
        w = u.work[lab]
        assert "computed here" in next(r for r in u.runs if r["label"] == lab)["circuits"]
        assert w["rows_per_pass"] == N_TEST and w["unit"] == "images"
        assert w["forward_images"] == N_TEST + reference + N_TEST + (steps + 1) * len(units[lab])
        deepest = max(int(st.removeprefix("conv")) for st, _ in units[lab])
        assert w["layer_calls"]["backward"] == steps * deepest
        assert w["backward_images"] == steps * len(units[lab]) * deepest // STAGES
    assert _json(out / UniversalityResult.FILE)["work"] == u.work and UniversalityResult.load(out).work == u.work
    assert f"cnn universality, random b: 1.0 forward and 0.0 backward passes of {N_TEST} images" in caplog.messages
