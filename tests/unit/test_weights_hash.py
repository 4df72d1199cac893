"""The weights' hash: the same weights give the same hash wherever they come from, and explain links the
feature visualisations and attribution grids beside a run only when they were made from its weights."""

from __future__ import annotations

import json

import torch

from mechscope.cnn.models.cnn import CNN
from mechscope.cnn.pipelines.explain import linked_outputs
from mechscope.cnn.runs import WEIGHTS_KEY, load_run, prepare_out_dir, same_weights, save_run, weights_hash


def _run(tmp_path, seed=0):
    torch.manual_seed(seed)
    model = CNN()
    out = prepare_out_dir(tmp_path / f"run{seed}")
    save_run(out, model, {"seed": seed, "data": {"name": "mnist", "kind": "builtin"}}, {})
    return out, model


def test_same_weights_same_hash_wherever_they_come_from(tmp_path):
    path, model = _run(tmp_path)
    run = load_run(path)
    assert run.weights_sha256 == weights_hash(model) == weights_hash(run.model)
    assert json.loads((path / "config.json").read_text())[WEIGHTS_KEY] == run.weights_sha256
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-6
    assert weights_hash(model) != run.weights_sha256


def test_same_weights_says_why_not():
    assert same_weights({WEIGHTS_KEY: "ab" * 32}, "ab" * 32) == (True, "")
    ok, why = same_weights({WEIGHTS_KEY: "cd" * 32}, "ab" * 32)
    assert not ok and "other weights" in why
    ok, why = same_weights({}, "ab" * 32)
    assert not ok and "no weights hash" in why
    assert not same_weights(None, "ab" * 32)[0]


def _linked(run, sha):
    from mechscope.core.outputs import write_json
    from tests.records import attribution_record, featvis_record

    (run / "featvis" / "units").mkdir(parents=True)
    (run / "featvis" / "units" / "conv2_5.png").write_bytes(b"png")
    write_json(run / "featvis" / "featvis.json", featvis_record([("conv2.hook_post", 5, 1.0)], sha).to_dict())
    (run / "attribution").mkdir()
    (run / "attribution" / "saliency.png").write_bytes(b"png")
    write_json(run / "attribution" / "faithfulness.json", attribution_record(["saliency"], sha).to_dict())


def test_explain_links_only_outputs_of_the_same_weights(tmp_path):
    path, _ = _run(tmp_path)
    sha = load_run(path).weights_sha256
    _linked(path, sha)
    linked = linked_outputs(path, sha)
    assert linked["featvis"] and linked["attribution"] and not linked.get("notes")


def test_outputs_of_other_weights_are_left_out_with_a_note(tmp_path):
    path, _ = _run(tmp_path)
    other, _ = _run(tmp_path, seed=1)  # `train --force` into the run: new weights, old outputs beside them
    _linked(path, load_run(other).weights_sha256)
    linked = linked_outputs(path, load_run(path).weights_sha256)
    assert linked["featvis"] is None and linked["attribution"] is None
    assert len(linked["notes"]) == 2 and all("other weights" in n for n in linked["notes"])


def test_outputs_without_a_hash_are_left_out(tmp_path):
    path, _ = _run(tmp_path)
    _linked(path, None)
    linked = linked_outputs(path, load_run(path).weights_sha256)
    assert linked["featvis"] is None and linked["attribution"] is None
    assert all("no weights hash" in n for n in linked["notes"])
