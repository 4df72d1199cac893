"""What ``discover`` is handed must be of the model it runs on: a tracr task's metric holds the outputs of the
model it was made on, a kl task the clean run's predictions; a known circuit or a heads report's edges name
components of a graph; a CNN task has its images' shape and classes. Each was accepted (a silently wrong search),
refused only after the search, read truncated, or died in a shape or index error; each is one line now, before
the search."""

from __future__ import annotations

import copy

import pytest
import torch

from mechscope.cnn.methods.discovery import discover as cnn_discover
from mechscope.cnn.methods.discovery import image_task
from mechscope.cnn.models.spec import walk
from mechscope.core.errors import MechscopeError
from mechscope.lm.methods.discovery import discover
from mechscope.lm.methods.tasks import make_task
from tests.conftest import shared_data_root
from tests.unit.test_discovery_cnn import stroke_cnn, strokes


@pytest.fixture(scope="module")
def tracr():
    from mechscope.lm.models.convert.tracr import check_circuit
    from mechscope.lm.models.loading import load_model

    root = shared_data_root()
    if root is None or not (root / "tracr" / "hist" / "config.json").is_file():
        pytest.skip("tracr models not found in $MECHSCOPE_DATA or ../shared/data")
    models = {name: load_model(str(root / "tracr" / name))[0] for name in ("reverse", "hist")}
    return models, {name: check_circuit(m.tracr.directory, m.cfg) for name, m in models.items()}


def test_a_tracr_task_runs_only_on_its_own_model(tracr):
    """The reverse task on hist ran and returned a circuit (hist's vocabulary holds reverse's ids)."""
    (models, _) = tracr
    with pytest.raises(MechscopeError, match="^the task was made on another model"):
        discover(models["hist"], make_task(models["reverse"]), "eap", curve=False)
    again = discover(models["reverse"], make_task(models["reverse"]), "eap", curve=False)  # its own model: as before
    assert len(again.circuit.edges) > 0


def test_a_known_circuit_of_another_model_is_refused_before_the_search(tracr, monkeypatch):
    (models, known) = tracr
    import mechscope.lm.methods.discovery as d

    monkeypatch.setattr(d, "find_circuit", lambda *a, **k: pytest.fail("the search ran"))
    with pytest.raises(MechscopeError, match="known circuit 'reverse' is of another model than tracr/hist: "
                                             "unknown component"):  # fmt: skip
        discover(models["hist"], make_task(models["hist"]), "eap", known=known["reverse"], curve=False)
    with pytest.raises(MechscopeError, match="^known must be a KnownCircuit .* got dict"):
        discover(models["hist"], make_task(models["hist"]), "eap", known={"nodes": []}, curve=False)


def test_an_induction_task_is_tied_to_its_model_only_under_kl():
    """loss, logprob and logit_diff read the tokens only (any model of the vocabulary will do); kl holds the clean
    run's predictions."""
    from mechscope.lm.models.transformer import HookedTransformer, TransformerConfig

    cfg = TransformerConfig(d_model=16, n_layers=1, n_heads=2, d_head=8, d_vocab=50, n_ctx=32, attn_only=True)
    a, b = HookedTransformer(cfg), HookedTransformer(cfg)
    b.init_weights(torch.Generator().manual_seed(1))
    loss = make_task(a, "induction", "loss", n=4, batch=2)
    assert loss.made_on is None
    discover(b, loss, "eap", curve=False)
    kl = make_task(a, "induction", "kl", n=4, batch=2)
    with pytest.raises(MechscopeError, match="made on another model"):
        discover(b, kl, "eap-ig", curve=False)
    discover(a, kl, "eap-ig", curve=False)


@pytest.mark.parametrize(
    ("images", "labels", "kw", "said"),
    [
        (torch.rand(8, 1, 6, 6), torch.arange(8) % 2, {}, r"clean images are shaped \[1, 6, 6\]; the model takes"),
        (torch.rand(8, 3, 8, 8), torch.arange(8) % 2, {}, r"shaped \[3, 8, 8\]"),
        (torch.rand(8, 1, 8, 8), torch.arange(8) % 3, {"target": 2}, r"the task has class 2; the model has 2 classes"),
        (torch.rand(8, 1, 8, 8), torch.arange(8) % 3, {}, r"the task has class 2"),
    ],
)  # fmt: skip
def test_a_cnn_task_of_other_images_or_classes_is_one_line(images, labels, kw, said):
    """A RuntimeError of the convolution or the linear layer, or an IndexError of the metric, before."""
    task = image_task(images, labels, **kw)  # n: every image there is (8, or the class's 2)
    with pytest.raises(MechscopeError, match=said):
        cnn_discover(walk(stroke_cnn()), task, "eap", curve=False)


def test_a_cnn_kl_task_runs_only_on_the_model_whose_logits_it_holds():
    model = stroke_cnn()
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.fc.weight.mul_(0.5)
    x, y = strokes()
    task = image_task(x, y, metric="kl", n=16, model=model)
    with pytest.raises(MechscopeError, match="made on another model"):
        cnn_discover(walk(other), task, "eap-ig", curve=False)
    assert cnn_discover(walk(model), task, "eap-ig", curve=False).scores.metric_clean == pytest.approx(0, abs=1e-12)
    assert image_task(x, y, n=16, model=model).made_on is None  # logprob reads the logits it is given


def test_the_api_names_the_setting_not_a_cli_flag():
    x, y = strokes()
    with pytest.raises(MechscopeError, match=r"^--n \(n\) must be an integer >= 2, got 1$"):
        image_task(x, y, n=1)


def _patch_record(**change) -> dict:
    record = {"source": "0.1", "target_layer": 1, "kv_head": 0, "query_heads": ["1.0"], "induction_clean": [0.5],
              "induction_patched": [0.1], "drop": [0.4], "drop_std": [0.1], "confirmed": [True]}  # fmt: skip
    return record | change


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"target_layer": 1.5}, "target_layer must be an integer, got 1.5"),
        ({"target_layer": -1}, "target_layer must be an integer from 0"),
        ({"kv_head": True}, "kv_head must be an integer, got true"),
        ({"source": "3"}, "source must be a head 'layer.head', got .3."),
    ],
)
def test_a_heads_reports_path_patches_are_read_whole_not_truncated(tmp_path, change, said):
    """A target layer of 1.5 was read as 1 (and --compare-heads compared with the edges of layer 1)."""
    from mechscope.core.errors import RunError
    from mechscope.lm.methods.path_patching import PathPatch

    assert PathPatch.from_dict(_patch_record()).layer == 1
    with pytest.raises(MechscopeError, match=said):
        PathPatch.from_dict(_patch_record(**change))
    assert issubclass(RunError, MechscopeError)


def test_hand_edges_are_checked_against_the_graph_before_the_search(tracr, monkeypatch):
    """An edge a heads report names but the model lacks (a layer past the last) was found only after the search."""
    (models, _) = tracr
    import mechscope.lm.methods.discovery as d

    monkeypatch.setattr(d, "find_circuit", lambda *a, **k: pytest.fail("the search ran"))
    model = models["reverse"]
    with pytest.raises(MechscopeError, match="unknown component 'blocks.9.attn.h0'"):
        discover(model, make_task(model), "eap", hand_edges=[("blocks.0.attn.h0", "blocks.9.attn.h0", "k")])
    with pytest.raises(MechscopeError, match="hand edges must be a non-empty list"):
        discover(model, make_task(model), "eap", hand_edges="blocks.0.attn.h0->blocks.1.mlp<in>")


def test_more_images_than_there_are_is_refused_not_shrunk():
    """``n`` above the images there are (of the class, with a target) gave fewer without a word; without n, 64 or
    every one there is."""
    x, y = strokes(16)
    assert image_task(x, y).settings["n"] == 16 and image_task(x, y, target=0).settings["n"] == 8
    with pytest.raises(MechscopeError, match="^n is 17: there are 16 test images$"):
        image_task(x, y, n=17)
    with pytest.raises(MechscopeError, match="^n is 9: class 1 has 8 test images$"):
        image_task(x, y, n=9, target=1)
    assert image_task(*strokes(100), n=70).settings["n"] == 70 and image_task(*strokes(100)).settings["n"] == 64


def test_a_scrub_hypothesis_asking_for_more_test_images_than_there_are_is_refused():
    from mechscope.cnn.methods.scrubbing import parse_hypothesis_file, scrub_hypothesis

    x, y = strokes(16)
    claims = [{"name": "a", "edges": ["input->conv1.*"], "feature": "class"}]
    hyp = parse_hypothesis_file({"run": "r", "data": {"n": 17}, "claims": claims}, "h.json")
    with pytest.raises(MechscopeError, match="^data.n is 17: there are 16 test images$"):
        scrub_hypothesis(walk(stroke_cnn()), x, y, hyp)


def test_cnn_hand_channels_are_checked_before_the_search(monkeypatch):
    import mechscope.cnn.methods.discovery as d

    monkeypatch.setattr(d, "find_circuit", lambda *a, **k: pytest.fail("the search ran"))
    x, y = strokes(16)
    with pytest.raises(MechscopeError, match="channel 7 is not a channel index"):
        cnn_discover(walk(stroke_cnn()), image_task(x, y), "eap", hand=[7], curve=False)


def test_a_limit_above_the_examples_says_all_there_are(tracr):
    models, _ = tracr
    every = make_task(models["hist"])
    n = every.settings["examples"]
    assert "all there are" not in every.description
    assert "all there are" not in make_task(models["hist"], limit=2).description
    more = make_task(models["hist"], limit=n + 50)
    assert more.settings["examples"] == n
    assert f"on the {n} examples of hist, all there are of the {n + 50} asked for (each" in more.description
