"""The ``work`` entry of ``lm neurons``, ``lm train-toy``, ``lm solu-compare``, ``cnn solu-compare`` and the attribution
graphs of both wings: in the JSON, read back, and equal to counts known by construction (one pass over a sample, the
training steps' tokens, a held-out text's tokens) or to the graph's own count of its backward passes, on tiny models
and a tiny .npz dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mechscope.cnn.models.cnn import CNN, CNNConfig
from mechscope.cnn.runs import save_run
from mechscope.core.attribution_graph import load_graph
from mechscope.lm.methods.attribution_graph import GraphSettings, LmAttributionGraph
from mechscope.lm.methods.neurons import NeuronsResult, SoluComparison
from mechscope.lm.methods.replacement import LocalReplacement
from mechscope.lm.toy import ToyConfig, ToyTraining
from tests.unit.test_attribution_graph_lm import TOKENS, random_transcoders, tiny
from tests.unit.test_work_discovery_universality import N_TEST, N_TRAIN, noise_npz

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "to be, or not to be: that is the question. whether 'tis nobler in the mind to suffer. " * 30


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> Path:
    return noise_npz(tmp_path_factory.mktemp("data"))


# ---- lm train-toy ------------------------------------------------------------------------------------------------

TOY = dict(d_model=16, n_heads=2, n_ctx=16, vocab=12, batch=4, steps=5, checkpoints=2, min_span=4, warmup=1)


def _measured_tokens(cfg: ToyConfig, records: int) -> int:
    """Tokens through the blocks of one checkpoint measurement: 128 held-out windows of n_ctx, 16 probes of BOS + 2n."""
    n = (cfg.n_ctx - 1) // 2
    return records * (128 * cfg.n_ctx + 16 * (1 + 2 * n))


def test_train_toy_counts_its_steps_and_measurements_for_both_models(tmp_path):
    """Synthetic data: a pass is one step's batch, so the backward passes are the steps, per model; the forward
    passes add the checkpoint measurements. The command's work is both models'."""
    from mechscope.lm.pipelines.toy import train_toy_run

    cfg = ToyConfig(**TOY)
    out, r = train_toy_run(cfg, tmp_path / "toy", progress=False)
    batch = cfg.batch * cfg.n_ctx
    w = r.work
    assert w["unit"] == "tokens" and w["rows_per_pass"] == batch and w["pass_over"].startswith("one training batch")
    assert w["backward_passes"] == 2 * cfg.n_steps and w["backward_tokens"] == 2 * cfg.n_steps * batch
    own, control = r.work["parts"]["2 layers"], r.series["control"]["work"]
    assert own["backward_passes"] == control["backward_passes"] == cfg.n_steps
    for part, series in ((own, r.series), (control, r.series["control"])):
        assert part["forward_passes"] * batch == cfg.n_steps * batch + _measured_tokens(cfg, len(series["series"]))
    assert w["forward_tokens"] == 2 * cfg.n_steps * batch + _measured_tokens(cfg, 2 * len(r.series["series"]))
    # layer calls: every step and measurement runs every block once, forward; every step, backward
    assert w["layer_calls"]["backward"] == cfg.n_steps * (2 + 1)
    saved = _json(out / ToyTraining.FILE)
    assert saved["work"] == w and "work" not in saved["series"] and ToyTraining.load(out).work == w
    assert set(ToyTraining.load(out).series) == set(r.series)  # the work is not in the series


def test_the_notebook_train_toy_counts_the_control_as_the_command_does(tmp_path):
    """mechscope.lm.train_toy(control=True) returned the main model's work alone; the command adds the control's."""
    import mechscope
    from mechscope.lm.pipelines.toy import train_toy_run

    cfg = ToyConfig(**TOY)
    _, command = train_toy_run(cfg, tmp_path / "toy", progress=False)
    notebook = mechscope.lm.train_toy(cfg, control=True)
    assert set(notebook.work["parts"]) == {"2 layers", "control (1 layer)"}
    assert notebook.work["backward_passes"] == 2 * cfg.n_steps and notebook.work == command.work


def test_train_toy_on_text_counts_passes_over_the_training_split(tmp_path, text_file):
    from mechscope.lm.pipelines.toy import train_toy_run

    cfg = ToyConfig(**TOY | {"data": "text", "layers": 1})
    out, r = train_toy_run(cfg, tmp_path / "toy", text_file, progress=False)
    split = int(len(TEXT) * 0.9)  # the first 90% of the characters
    w = r.work
    assert w["rows_per_pass"] == split and w["pass_over"].startswith("the training split") and "parts" not in w
    assert w["backward_tokens"] == cfg.n_steps * cfg.batch * cfg.n_ctx
    assert w["backward_passes"] == round(cfg.n_steps * cfg.batch * cfg.n_ctx / split, 3)
    assert _json(out / ToyTraining.FILE)["work"] == w


def test_old_records_without_work_still_load():
    assert ToyTraining.from_dict({"schema": ToyTraining.SCHEMA, "config": {}}).work is None


# ---- lm neurons and lm solu-compare -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gelu_toy(tmp_path_factory, text_file) -> Path:
    from mechscope.lm.pipelines.toy import train_toy_run

    run = tmp_path_factory.mktemp("toys") / "gelu"
    cfg = ToyConfig(**TOY | {"data": "text", "layers": 2, "mlp": "gelu", "d_mlp": 24})
    train_toy_run(cfg, run, text_file, control=False, progress=False)
    return run


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a tiny model counts no neuron: no median of nothing
@pytest.mark.parametrize("contexts", [0, 3])
def test_neurons_is_one_pass_over_the_sample_and_one_over_the_sequences_shown(gelu_toy, text_file, tmp_path,
                                                                              contexts):  # fmt: skip
    """The top activations are one pass over the N x P sample; the contexts shown rerun only the sequences that
    hold one (none when no context is shown)."""
    from mechscope.lm.pipelines.neurons import NeuronSettings, neurons

    s = NeuronSettings(k=5, sequences=12, length=16, contexts=contexts)
    out, r = neurons(str(gelu_toy), tmp_path / "n", text_file, s)
    n, p = r.tokens.shape
    shown = {c["seq"] for lay in r.layers for ctxs in lay.contexts for c in ctxs}
    assert bool(shown) == bool(contexts)
    w = r.work
    assert w["rows_per_pass"] == n * p == r.sample["tokens"] and w["backward_passes"] == 0.0
    assert w["forward_tokens"] == (n + len(shown)) * p
    assert w["forward_passes"] == pytest.approx(1 + len(shown) / n, abs=1e-3)
    assert _json(out / NeuronsResult.FILE)["work"] == w and NeuronsResult.load(out).work == w


def test_solu_compare_counts_training_held_out_loss_and_readings(tmp_path, text_file):
    from mechscope.lm.pipelines.neurons import CompareSettings, solu_compare_run

    s = CompareSettings(layers=1, d_model=16, n_heads=2, d_mlp=24, n_ctx=16, steps=3, batch=4, warmup=1, checkpoints=1,
                        k=5, sequences=8)  # fmt: skip
    out, r = solu_compare_run(s, tmp_path / "c", text_file)
    w = r.work
    sample = s.sequences * s.n_ctx  # the held-out windows the neurons are read on
    assert w["rows_per_pass"] == sample
    assert set(w["parts"]) == {"train GELU", "held-out loss GELU", "neurons GELU", "train SoLU",
                               "held-out loss SoLU", "neurons SoLU", "neurons SoLU after its LayerNorm"}  # fmt: skip
    # backward: only the training steps, batch x n_ctx tokens each, per model
    assert w["backward_tokens"] == 2 * s.steps * s.batch * s.n_ctx
    for m in r.models[:2]:
        training = _json(out / m["dir"] / ToyTraining.FILE)["work"]
        assert training["backward_tokens"] == s.steps * s.batch * s.n_ctx
        part = w["parts"][f"train {m['label']}"]
        assert part["forward_passes"] == round(training["forward_tokens"] / sample, 3)
        # the held-out loss reads the whole held-out text once
        assert w["parts"][f"held-out loss {m['label']}"]["forward_passes"] == round(m["held_out_tokens"] / sample, 3)
        reading = NeuronsResult.load(out / m["dir"] / "neurons").work
        assert reading["rows_per_pass"] == sample and 1.0 <= reading["forward_passes"] <= 2.0
        assert w["parts"][f"neurons {m['label']}"]["forward_passes"] == reading["forward_passes"]
    assert w["forward_tokens"] == sum(r.neurons[k].work["forward_tokens"] for k in r.neurons) + sum(
        _json(out / m["dir"] / ToyTraining.FILE)["work"]["forward_tokens"] + m["held_out_tokens"] for m in r.models[:2]
    )
    assert _json(out / SoluComparison.FILE)["work"] == w and SoluComparison.load(out).work == w


# ---- cnn solu-compare -----------------------------------------------------------------------------------------


def test_cnn_solu_compare_counts_each_networks_readings(tmp_path, npz):
    """Each network's reading runs the test images once and the mean's reference images (the first half of the
    training images, at most 1,000) once; the trainings are not counted."""
    from mechscope.cnn.config import TrainConfig
    from mechscope.cnn.methods.channel_selectivity import ActivationComparison
    from mechscope.cnn.pipelines.solu_cnn import solu_compare_cnn

    shape = CNNConfig(image_size=16, channels=(3, 4), kernel_size=3, padding=1, n_classes=3)
    out, r = solu_compare_cnn(tmp_path / "c", ("relu", "solu"), TrainConfig(epochs=1, batch_size=16, max_steps=2),
                              shape, dataset=str(npz))  # fmt: skip
    w = r.work
    per = N_TEST + N_TRAIN // 2
    assert w["unit"] == "images" and w["rows_per_pass"] == r.test_images == N_TEST
    assert set(w["parts"]) == {"relu", "solu"} and "training" in w["not_counted"]
    for m in w["parts"].values():
        assert m == {"forward_passes": round(per / N_TEST, 3), "backward_passes": 0.0}
    assert w["forward_images"] == 2 * per and w["forward_passes"] == round(2 * per / N_TEST, 3)
    assert _json(out / ActivationComparison.FILE)["work"] == w and ActivationComparison.load(out).work == w


# ---- attribution graphs -----------------------------------------------------------------------------------------


def test_lm_graph_logit_rows_cross_every_block_in_batch_size_copies(tmp_path):
    """Only the logits get rows: each of the graph's backward passes runs through every block of batch_size copies
    of the prompt; the forward passes are the clean run, the model's own logits, the replacement's and the kept pass
    of batch_size copies."""
    from mechscope.lm.pipelines.attribution_graph import graph_model

    model = tiny(n_layers=2)
    s = GraphSettings(max_feature_nodes=0, check_sources=0, batch_size=4)
    out, g = graph_model(model, tokens=TOKENS.tolist(), transcoders=random_transcoders(model), settings=s,
                         auto_intervention=False, dashboards=0, bos=False, out=tmp_path / "g")  # fmt: skip
    w, c = g.work, g.counts
    assert w["unit"] == "tokens" and w["rows_per_pass"] == len(TOKENS)
    assert w["graph"] == {"rows": c["rows"], "backward_passes": c["backward_passes"], "copies": 4}
    assert c["feature_nodes"] == 0 and c["backward_passes"] == -(-c["logit_nodes"] // 4)
    assert w["backward_passes"] == w["phases"]["graph"]["backward_passes"] == 4 * c["backward_passes"]
    assert w["layer_calls"]["backward"] == 2 * c["backward_passes"]
    assert w["forward_passes"] == w["phases"]["graph"]["forward_passes"] == 1 + 1 + 1 + 4
    assert w["phases"]["transcoders"] == {"forward_passes": 0.0, "backward_passes": 0.0}  # given, not trained
    assert _json(out / "graph.json")["work"] == w and load_graph(out, LmAttributionGraph).work == w


def test_lm_graph_feature_rows_cross_the_blocks_below_their_layer(tmp_path):
    """One row per backward pass (batch_size 1): a logit's row crosses every block, a feature's the blocks below its
    layer (its gradient enters inside its own block), so the blocks' backward calls are known from the features'
    layers, which a replacement built apart gives."""
    from mechscope.lm.pipelines.attribution_graph import graph_model

    model, L = tiny(n_layers=2), 2
    tcs = random_transcoders(model)
    s = GraphSettings(check_sources=0, batch_size=1, skip_first=False)
    _, g = graph_model(model, tokens=TOKENS.tolist(), transcoders=tcs, settings=s, auto_intervention=False,
                       dashboards=0, bos=False)  # fmt: skip
    rep = LocalReplacement(model, tcs, TOKENS, skip_first=False)
    c, w = g.counts, g.work
    assert c["feature_nodes"] == rep.n_features > 0 and c["backward_passes"] == c["rows"]  # every active feature
    calls = c["logit_nodes"] * L + int(rep.feature_layer.sum())
    assert w["layer_calls"]["backward"] == calls
    assert w["backward_passes"] == round(calls / L, 3)  # one copy of the prompt per pass
    assert w["forward_passes"] == 1 + 1 + 1 + 1


def test_lm_graph_counts_the_harvest_of_transcoders_trained_here_not_their_training(gelu_toy, text_file, tmp_path):
    """Training transcoders runs the harvest contexts through the blocks once (both layers in one group: a pass that
    stops inside the last block, which counts as run); their training steps run no block and are not counted."""
    from mechscope.lm.pipelines.attribution_graph import graph_model

    prompt = "to be, or not"
    out, g = graph_model(str(gelu_toy), prompt, train_tokens=256, text_file=text_file, dashboards=0,
                         settings=GraphSettings(max_feature_nodes=4, check_sources=0), out=tmp_path / "g")  # fmt: skip
    w, trained = g.work, _json(out / "transcoders" / "training.json")
    context = min(trained["settings"]["context"], ToyConfig(**TOY).n_ctx)
    P = len(prompt) + 1  # the characters and BOS
    assert w["rows_per_pass"] == P and "training steps of the transcoders" in w["not_counted"]
    assert w["phases"]["transcoders"] == {
        "forward_passes": round(trained["contexts"] * context / P, 3),
        "backward_passes": 0.0,
    }


def cnn_run(where: Path, npz: Path) -> Path:
    """A run directory of a random two-stage CNN (random biases too) on the .npz."""
    torch.manual_seed(0)
    model = CNN(CNNConfig(image_size=16, channels=(3, 4), kernel_size=3, padding=1, n_classes=3)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    where.mkdir(parents=True)
    save_run(where, model, {"data": {"name": "noise", "kind": "npz", "file": str(npz)}}, {})
    return where


def test_cnn_graph_backward_passes_stop_at_the_dictionaries(tmp_path, npz):
    """The stages are chained through their replaced outputs: a logit's row crosses no convolution and a feature's
    row its own stage's alone, so with one row per backward pass the convolutions' backward calls are the feature
    rows; the graph's own count has the logit's pass besides."""
    from mechscope.cnn.methods.attribution_graph import CnnAttributionGraph, CnnGraphSettings
    from mechscope.cnn.pipelines.attribution_graph import graph_model

    run = cnn_run(tmp_path / "run", npz)
    s = CnnGraphSettings(max_feature_nodes=12, check_sources=0, batch_size=1)
    out, g = graph_model(run, 2, dictionaries="channels", settings=s, auto_intervention=False, dashboards=0,
                         out=tmp_path / "g")  # fmt: skip
    w, c = g.work, g.counts
    assert w["unit"] == "images" and w["rows_per_pass"] == 1 and c["feature_nodes"] == 12
    assert w["graph"] == {"rows": 13, "backward_passes": 13, "copies": 1}
    assert w["layer_calls"]["backward"] == c["backward_passes"] - c["logit_nodes"] == 12
    assert w["backward_passes"] == 12 / 2  # in passes through both stages
    assert w["forward_passes"] == 1 + 1 + 1 + 1  # clean, own, replacement, the kept pass
    assert _json(out / "graph.json")["work"] == w and load_graph(out, CnnAttributionGraph).work == w


def test_cnn_graph_dashboards_and_interventions_are_their_own_phases(tmp_path, npz):
    from mechscope.cnn.methods.attribution_graph import CnnGraphSettings
    from mechscope.cnn.pipelines.attribution_graph import graph_model

    run = cnn_run(tmp_path / "run", npz)
    _, g = graph_model(run, 0, dictionaries="channels", settings=CnnGraphSettings(check_sources=2), dashboards=2)
    ph, b = g.work["phases"], g.settings["batch_size"]
    assert set(ph) == {"dictionaries", "graph", "interventions", "dashboards"} and g.features()
    assert ph["dictionaries"]["forward_passes"] == 0.0 and ph["interventions"]["forward_passes"] > 0
    assert ph["graph"]["forward_passes"] >= 1 + 1 + 1 + b + 2  # and the two sources checked (and their baseline)
    assert ph["dashboards"]["forward_passes"] >= N_TEST  # the first 2,000 test images (here all 48), per stage
    assert g.work["forward_passes"] == pytest.approx(sum(p["forward_passes"] for p in ph.values()), abs=1e-2)
    assert g.work["backward_passes"] == ph["graph"]["backward_passes"]
