"""The vision pipelines pass each setting to the method's own parameter, on the right split, and write what it returned.

One layer below ``test_cli_options_truths``: the methods a ``cnn`` pipeline calls are wrapped by spies bound to their
own ``inspect.signature`` (a value given to the wrong parameter shows under that parameter's name). Outside truths:
the tiny dataset's arrays read straight from its ``.npz`` with numpy (the test split is not the training split), the
run's model called by hand, a plain loop choosing the examples, and the JSON each pipeline saved read back with
``json``. The settings given within a test are all different numbers, so that two swapped arrive visibly swapped.
"""

from __future__ import annotations

import importlib
import inspect
import json

import numpy as np
import pytest
import torch

import tests.fuzz.builders as B
from mechscope.cnn.runs import load_run
from tests.e2e.test_cli_options_truths import Called, record
from tests.e2e.test_lm_pipelines_truths import body, spy

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The fuzz builders' 8×8, 3-class dataset and a one-stage run trained two steps on it (a few seconds)."""
    w = tmp_path_factory.mktemp("pipes")
    npz = B.write_npz(w / "data.npz")
    run = B.write_run(w / "run", npz)
    a = np.load(npz)
    split = {k: a[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    return {"run": run, "npz": npz, "w": w, **split}


def floats(x: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W] -> [N, 1, H, W] in [0, 1], by hand."""
    return torch.tensor(x.astype(np.float32) / 255.0)[:, None]


def calls(monkeypatch, target: str) -> list[dict]:
    """Every call of ``module:function`` (bound to its signature, defaults applied), passed through."""
    module, name = target.split(":")
    mod = importlib.import_module(module)
    real = getattr(mod, name)
    sig, seen = inspect.signature(real), []

    def wrapper(*a, **k):
        bound = sig.bind(*a, **k)
        bound.apply_defaults()
        seen.append(dict(bound.arguments))
        return real(*a, **k)

    monkeypatch.setattr(mod, name, wrapper)
    return seen


def saved(path) -> dict:
    return json.loads(path.read_text())


def pick(labels: np.ndarray, n: int, k: int) -> list[int]:
    """Classes in turn, earliest first: a plain loop over the labels (not the pipeline's per-class lists)."""
    used, out = set(), []
    while len(out) < n:
        before = len(out)
        for c in range(k):
            i = next((j for j, y in enumerate(labels) if y == c and j not in used), None)
            if i is not None and len(out) < n:
                used.add(i)
                out.append(i)
        if len(out) == before:
            break
    return out


# ---- cnn attribute -------------------------------------------------------------------------------------------------


def test_attribute_passes_its_settings_and_the_test_images_and_saves_what_it_found(monkeypatch, tiny, tmp_path):
    """Outside truths: the test split from the .npz, the examples chosen by a plain loop, the model's argmax by hand,
    Integrated Gradients with the steps asked and Grad-CAM on the layer asked; the JSON against the spy's result."""
    from mechscope.cnn.pipelines.attribute import attribute_run

    faith = spy(monkeypatch, "mechscope.cnn.pipelines.attribute:evaluate_faithfulness")
    out, result = attribute_run(tiny["run"], tmp_path / "a", methods=["saliency", "integrated_gradients", "gradcam"],
                                n=4, n_faithfulness=7, ig_steps=5, target="label", layer="conv1.hook_pre")  # fmt: skip
    idx = pick(tiny["y_test"], 7, 3)
    x = floats(tiny["x_test"][idx])
    torch.testing.assert_close(faith["inputs"], x)
    assert faith["target"].tolist() == tiny["y_test"][idx].tolist()  # the true labels, not the predictions
    assert faith["methods"]["integrated_gradients"].n_steps == 5
    assert faith["methods"]["gradcam"].layer == "conv1.hook_pre"
    grads = faith["methods"]["saliency"].attribute(load_run(tiny["run"]).model.eval(), x, faith["target"])
    torch.testing.assert_close(faith["attributions"]["saliency"], grads)  # the grids drawn are the ones ranked
    d = saved(out / "faithfulness.json")
    with torch.no_grad():
        pred = load_run(tiny["run"]).model.eval()(x[:4]).argmax(1).tolist()
    assert pred != tiny["y_test"][idx[:4]].tolist()  # else a swap of the two would go unseen
    ex = d["examples"]
    assert (ex["test_indices"], ex["labels"], ex["predictions"]) == (idx[:4], tiny["y_test"][idx[:4]].tolist(), pred)
    assert d["gradcam_layer"] == "conv1.hook_pre" and d["target"] == "label"
    assert d["integrated_gradients_completeness"]["steps"] == 5
    assert d["n_inputs"] == 7
    ranked = {k: m["insertion_minus_deletion"] for k, m in d["methods"].items()}
    assert ranked == pytest.approx({m.method: m.gap for m in faith["result"].methods})


def test_attribute_explains_the_class_asked_for(monkeypatch, tiny, tmp_path):
    """Outside truth: a class given by name is that class's index for every image (names from the .npz's order)."""
    from mechscope.cnn.pipelines.attribute import attribute_run

    faith = spy(monkeypatch, "mechscope.cnn.pipelines.attribute:evaluate_faithfulness")
    attribute_run(tiny["run"], tmp_path / "a", methods=["saliency"], n=2, n_faithfulness=3, target="2")
    assert faith["target"].tolist() == [2, 2, 2]


def test_attribute_integrates_from_the_datas_own_black(monkeypatch, tiny, tmp_path):
    """Outside truth: on float pixels from -0.5 to 1 (the .npz rescaled with numpy) Integrated Gradients and the
    faithfulness checks start from the lowest pixel of the images attributed, not from 0."""
    from mechscope.cnn.pipelines.attribute import attribute_run

    arrays = {k: tiny[k] for k in ("y_train", "y_test")}
    for k in ("x_train", "x_test"):
        arrays[k] = (tiny[k].astype(np.float32) / 255 * 1.5 - 0.5).astype(np.float32)
    np.savez(tmp_path / "wide.npz", **arrays)
    faith = spy(monkeypatch, "mechscope.cnn.pipelines.attribute:evaluate_faithfulness")
    attribute_run(tiny["run"], tmp_path / "a", methods=["integrated_gradients"], n=2, n_faithfulness=3, ig_steps=2,
                  dataset=str(tmp_path / "wide.npz"))  # fmt: skip
    lo = float(arrays["x_test"][pick(tiny["y_test"], 3, 3)].min())
    assert lo < -0.4
    assert faith["baseline"] == pytest.approx(lo) and faith["methods"][
        "integrated_gradients"
    ].baseline == pytest.approx(lo)


# ---- cnn visualize -------------------------------------------------------------------------------------------------


def test_visualize_renders_with_the_settings_asked_and_ranks_test_images(monkeypatch, tiny, tmp_path):
    """Outside truths: the three optimisations (maximise, minimise, diverse) each with the steps and
    parameterisation asked and seeds seed, seed+1, seed+2; the examples ranked over the .npz's test split; the
    settings in featvis.json as given."""
    from mechscope.cnn.pipelines.visualize import visualize_run

    renders = calls(monkeypatch, "mechscope.cnn.methods.featvis:render")
    examples = spy(monkeypatch, "mechscope.cnn.methods.featvis:dataset_examples")
    out, _ = visualize_run(tiny["run"], tmp_path / "v", units=[0, 2], steps=3, param="pixel", seed=5, n_diverse=2)
    got = [(c["steps"], c["param"], c["seed"], c["batch"]) for c in renders]
    # units 0 and 2 of each of the two default layers (conv1, the logits): 4 images, 2 diverse ones each
    assert got == [(3, "pixel", 5, 4), (3, "pixel", 6, 4), (3, "pixel", 7, 8)]
    torch.testing.assert_close(examples["images"], floats(tiny["x_test"]))
    s = saved(out / "featvis.json")["settings"]
    assert (s["steps"], s["parameterisation"], s["seed"], s["diverse_images"]) == (3, "pixel", 5, 2)


# ---- cnn tuning ----------------------------------------------------------------------------------------------------


def test_tuning_draws_with_the_seed_asked_and_takes_maxima_over_the_test_split(monkeypatch, tiny, tmp_path):
    """Outside truths: the seed given reaches the stimuli; the maxima are over the .npz's test images; tuning.json
    is the method's own result and records the run's weights."""
    from mechscope.cnn.pipelines.tuning import tuning_run

    stim = spy(monkeypatch, "mechscope.cnn.pipelines.tuning:draw_stimuli")
    maxima = spy(monkeypatch, "mechscope.cnn.pipelines.tuning:dataset_max")
    out, result = tuning_run(tiny["run"], tmp_path / "t", seed=9)
    assert stim["seed"] == 9 and tuple(stim["size"]) == (8, 8)
    torch.testing.assert_close(maxima["images"], floats(tiny["x_test"]))
    d = saved(out / "tuning.json")
    assert d["weights_sha256"] == load_run(tiny["run"]).weights_sha256
    units = [u for st in d["stages"] for u in st["units"]]
    assert [u["label"] for u in units] == [u.label for st in result.stages for u in st.units]


# ---- cnn blocks ----------------------------------------------------------------------------------------------------


def test_blocks_passes_each_setting_to_its_own_parameter(monkeypatch, tiny, tmp_path):
    """Outside truths: eight distinct settings each arriving under its own parameter name of the blocks methods,
    the test split from the .npz, and the settings blocks.json records."""
    from mechscope.cnn.pipelines.blocks import blocks_run

    sel = spy(monkeypatch, "mechscope.cnn.methods.blocks:select_images")
    nmf = spy(monkeypatch, "mechscope.cnn.methods.blocks:analyse_layer")
    ex = spy(monkeypatch, "mechscope.cnn.methods.blocks:attach_examples")
    vis = spy(monkeypatch, "mechscope.cnn.methods.blocks_vis:visualise_blocks")
    kw = {"image": 6, "groups": 2, "steps": 3, "seed": 7, "max_side": 5, "threshold": 0.8, "n_top": 1, "n_examples": 4}
    out, _ = blocks_run(tiny["run"], tmp_path / "b", **kw)
    assert (sel["image"], sel["typical"]) == (6, None)
    torch.testing.assert_close(sel["x"], floats(tiny["x_test"]))
    assert sel["labels"].tolist() == tiny["y_test"].tolist()
    assert {k: nmf[k] for k in ("groups", "threshold", "seed", "max_side", "n_top")} == {
        "groups": 2, "threshold": 0.8, "seed": 7, "max_side": 5, "n_top": 1}  # fmt: skip
    assert ex["k"] == 4 and (vis["steps"], vis["seed"]) == (3, 7)
    d = saved(out / "blocks.json")
    assert str(tiny["run"] / "featvis") in d["channel_source"]  # RUN/featvis looked in (absent here), as documented
    s = d["settings"]
    assert {k: s[k] for k in ("image", "groups", "steps", "seed", "grid_max_side", "threshold")} == {
        "image": 6, "groups": 2, "steps": 3, "seed": 7, "grid_max_side": 5, "threshold": 0.8}  # fmt: skip
    assert (s["n_top_channels"], s["n_examples"]) == (1, 4)


# ---- cnn discover --------------------------------------------------------------------------------------------------


def test_discover_passes_each_setting_and_the_test_split(monkeypatch, tiny, tmp_path):
    """Outside truths: the task built from the .npz's test split with the seed, size, class and corruption asked;
    the method with its own settings; discovery.json is the method's own result."""
    from mechscope.cnn.pipelines.discovery import discover_run

    task = spy(monkeypatch, "mechscope.cnn.pipelines.discovery:image_task")
    disc = spy(monkeypatch, "mechscope.cnn.pipelines.discovery:discover")
    out, _ = discover_run(tiny["run"], tmp_path / "d", method="eap", target=1, n=6,
                          seed=3, corrupt="other-class", threshold=0.05, ablation="mean", n_random=2)  # fmt: skip
    torch.testing.assert_close(task["images"], floats(tiny["x_test"]))
    assert task["labels"].tolist() == tiny["y_test"].tolist()
    assert (task["target"], task["n"], task["seed"], task["corrupt"]) == (1, 6, 3, "other-class")
    assert (disc["method"], disc["threshold"], disc["size"], disc["ablation"]) == ("eap", 0.05, None, "mean")
    assert (disc["n_random"], disc["seed"]) == (2, 3)
    d = saved(out / "discovery.json")
    assert body(d) == body(disc["result"].to_dict())


# ---- cnn graph -----------------------------------------------------------------------------------------------------


def test_graph_of_a_training_image_reads_the_training_split(monkeypatch, tiny, tmp_path):
    """Outside truths: image 30 of ``split="train"`` is row 30 of the .npz's x_train (the test split has 24 images),
    with its label from y_train; the class asked reaches the graph; the dashboards rank the same split."""
    from mechscope.cnn.pipelines.attribution_graph import graph_run

    graph = spy(monkeypatch, "mechscope.cnn.pipelines.attribution_graph:cnn_attribution_graph")
    dash = spy(monkeypatch, "mechscope.cnn.pipelines.attribution_graph:feature_examples")
    out, _ = graph_run(tiny["run"], 30, tmp_path / "g", split="train", dictionaries="channels", target=1, dashboards=2)
    assert len(tiny["x_test"]) <= 30 < len(tiny["x_train"])
    torch.testing.assert_close(graph["image"], floats(tiny["x_train"][30:31])[0])
    assert (graph["label"], graph["target"]) == (int(tiny["y_train"][30]), 1) == (0, 1)
    torch.testing.assert_close(dash["images"], floats(tiny["x_train"]))
    assert saved(out / "graph.json")["title"].startswith("image 30 of train")


# ---- cnn explain ---------------------------------------------------------------------------------------------------


def test_explain_passes_its_settings_to_patching_and_circuits(monkeypatch, tiny, tmp_path):
    """Outside truths: the test images and the reference means over the first training images (the .npz's
    splits); the patching pair and pair count, then the circuit classes, tolerance and resampling seed each under its
    own parameter (the recorders stop the run before anything is written)."""
    from mechscope.cnn.config import ExplainSettings
    from mechscope.cnn.pipelines.explain import explain_run

    s = ExplainSettings(patch=(2, 0), n_pairs=5, n_mean=9, held_out=6, tolerance=0.03,
                        resample_seed=4, classes=(1, 2))  # fmt: skip
    patch = record(monkeypatch, "mechscope.cnn.pipelines.explain:patching_study")
    with pytest.raises(Called):
        explain_run(tiny["run"], tmp_path / "e", s)
    assert (tuple(patch["pair"]), patch["n_pairs"]) == ((2, 0), 5)
    torch.testing.assert_close(patch["data"].x, floats(tiny["x_test"]))
    torch.testing.assert_close(patch["data"].x_ref, floats(tiny["x_train"][:9]))
    monkeypatch.setattr("mechscope.cnn.pipelines.explain.patching_study", lambda *a, **k: None)
    circ = record(monkeypatch, "mechscope.cnn.pipelines.explain:circuit_study")
    with pytest.raises(Called):
        explain_run(tiny["run"], tmp_path / "e", s)
    assert (circ["classes"], circ["tolerance"], circ["resample_seed"]) == ([1, 2], 0.03, 4)
    assert "training images 9-15" in circ["held_out_note"]


# ---- cnn train and solu-compare ------------------------------------------------------------------------------------


def test_solu_compare_trains_each_activation_with_the_settings_given(tiny, tmp_path):
    """Outside truths: each run directory's own config.json (read with json) names its activation and the seed and
    steps given; compare.json counts the test images as limited and its accuracies are the runs' own metrics."""
    from mechscope.cnn.config import TrainConfig
    from mechscope.cnn.models.cnn import CNNConfig
    from mechscope.cnn.pipelines.solu_cnn import solu_compare_cnn

    cfg = TrainConfig(epochs=1, batch_size=16, max_steps=2, shift=0, seed=5)
    shape = CNNConfig(channels=(4,), kernel_size=3, padding=1, pool=2)
    out, _ = solu_compare_cnn(tmp_path / "s", ("gelu", "relu"), cfg, shape, str(tiny["npz"]), test_limit=10)
    d = saved(out / "compare.json")
    assert [m["activation"] for m in d["models"]] == ["gelu", "relu"] and d["test_images"] == 10
    for m in d["models"]:
        run = saved(out / m["dir"] / "config.json")
        assert run["model"]["activation"] == m["activation"] and run["seed"] == 5
        assert run["training"]["max_steps"] == 2
        assert m["test_accuracy"] == saved(out / m["dir"] / "metrics.json")["test_accuracy"]


# ---- cnn universality ----------------------------------------------------------------------------------------------


def test_universality_baselines_are_seeded_per_run_on_the_test_split(monkeypatch, tiny, tmp_path):
    """Outside truths: the baseline of run i is ``CNN(config)`` built by hand after ``torch.manual_seed(1_000_000 +
    i)``; the activations are over the .npz's test split; each run's row names the seed its config.json gives."""
    from mechscope.cnn.config import TrainConfig
    from mechscope.cnn.methods import universality as U
    from mechscope.cnn.models.cnn import CNN, CNNConfig
    from mechscope.cnn.pipelines.train import train
    from mechscope.cnn.pipelines.universality import universality

    other = tmp_path / "seed1"
    shape = CNNConfig(channels=(4,), kernel_size=3, padding=1, pool=2)
    train(other, TrainConfig(epochs=1, batch_size=16, max_steps=2, shift=0, seed=1), shape, str(tiny["npz"]),
          progress=False)  # fmt: skip
    pairs = spy(monkeypatch, "mechscope.cnn.methods.universality:collect_pairs")
    out, _ = universality([tiny["run"], other], tmp_path / "u", vis_steps=1)
    torch.testing.assert_close(pairs["x"], floats(tiny["x_test"]))
    for i, run in enumerate([tiny["run"], other]):
        config = load_run(run).model.config  # loading draws random numbers too: before the seed
        torch.manual_seed(1_000_000 + i)
        by_hand = CNN(config)
        got = pairs["specs"][f"random {run.name}"].model  # its normalisation may be folded in: compare outputs
        with torch.no_grad():
            torch.testing.assert_close(got(floats(tiny["x_test"])), by_hand.eval()(floats(tiny["x_test"])))
    d = saved(out / U.UniversalityResult.FILE)
    assert [r["seed"] for r in d["runs"]] == [0, 1] and d["test_images"] == len(tiny["y_test"])
    assert [b["seed"] for b in d["baselines"]] == [1_000_000, 1_000_001]
