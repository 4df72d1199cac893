"""The language pipelines pass each setting to the method's own parameter and write what the method returned.

One layer below ``test_cli_options_truths``: each method a pipeline calls is wrapped by a spy bound to its own
``inspect.signature`` (so a value given to the wrong parameter shows under that parameter's name) that calls through
and keeps what it returned; the JSON the pipeline saved is read back with ``json`` and compared with it. Token
windows are checked against the text encoded by hand (a plain search for each window in the encoded text).
"""

from __future__ import annotations

import importlib
import inspect
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from mechscope.core.errors import MechscopeError
from tests.e2e.test_cli_options_truths import Called, record
from tests.e2e.test_graph_cli import TRACR
from tests.e2e.test_lm_cli import gpt2_dir  # noqa: F401  (fixture)
from tests.e2e.test_neurons_cli import TEXT, solu_run, text_file  # noqa: F401  (fixtures)
from tests.unit.test_cnn_pages_truths import Page

pytestmark = pytest.mark.usefixtures("one_thread")


def spy(monkeypatch, target: str) -> dict:
    """Wrap ``module:function``: its arguments bound to its signature, defaults applied, and ``result``."""
    module, name = target.split(":")
    mod = importlib.import_module(module)
    real = getattr(mod, name)
    sig, seen = inspect.signature(real), {}

    def wrapper(*a, **k):
        bound = sig.bind(*a, **k)
        bound.apply_defaults()
        seen.update(bound.arguments)
        seen["result"] = real(*a, **k)
        return seen["result"]

    monkeypatch.setattr(mod, name, wrapper)
    return seen


def is_window(row, ids: list[int]) -> bool:
    """A plain search: ``row`` is a run of consecutive ids of the encoded text."""
    row, n = [int(i) for i in row], len(row)
    return any(ids[s : s + n] == row for s in range(len(ids) - n + 1))


def saved(path) -> dict:
    return json.loads(path.read_text())


def body(record: dict) -> dict:
    """A record less what the pipeline adds around the method's result (timings, work, library versions)."""
    return {k: v for k, v in json.loads(json.dumps(record)).items() if k not in ("seconds", "work", "versions")}


def same_json(a, b) -> None:
    """Two JSON values equal, NaN equal to NaN (a head with nothing to score)."""
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def close_json(a, b, path="") -> None:
    """Equal JSON values, numbers to 4 significant digits (a compact file's rounding)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), path
        for k in a:
            close_json(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            close_json(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert np.isclose(a, b, rtol=1e-3, atol=1e-12, equal_nan=True), (path, a, b)
    else:
        assert a == b, (path, a, b)


# ---- lm heads


def test_heads_pass_protocol_text_windows_and_show_and_save_the_result(monkeypatch, gpt2_dir, tmp_path):  # noqa: F811
    """Outside truths: the protocol object given, windows found by a plain search in the GPT-2 encoding of the text
    (``transformers``' GPT2TokenizerFast from the same vocab and merges), and the spy's returned result = the file."""
    from transformers import GPT2TokenizerFast

    from mechscope.lm.methods.heads import HeadProtocol
    from mechscope.lm.pipelines.heads import induction_heads

    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    seen = spy(monkeypatch, "mechscope.lm.pipelines.heads:find_induction_heads")
    protocol = HeadProtocol(n=6, batch=3, seed=5, text_batch=7, text_len=20, per_head_ablation=False)
    out, result = induction_heads(str(gpt2_dir), tmp_path / "h", protocol, text, show=[(1, 0)])
    assert seen["protocol"] is protocol and seen["show"] == [(1, 0)] and seen["name"] == str(gpt2_dir)
    assert seen["model"].cfg.n_layers == 2 and seen["model"].cfg.n_ctx == 32
    ids = GPT2TokenizerFast(str(gpt2_dir / "vocab.json"), str(gpt2_dir / "merges.txt")).encode(TEXT)
    windows = seen["text_tokens"]
    assert tuple(windows.shape) == (7, 20) and all(is_window(w, ids) for w in windows)
    g = torch.Generator().manual_seed(5)  # the seeded draw of the window starts, the protocol's seed
    assert [int(w[0]) for w in windows] == [ids[s] for s in torch.randint(0, len(ids) - 20, (7,), generator=g)]
    data = saved(out / "heads.json")
    for key in ("scores", "induction_heads", "previous_token_heads", "protocol", "model"):
        same_json(data[key], json.loads(json.dumps(seen["result"].to_dict()[key])))
    assert data["protocol"]["seed"] == 5 and data["protocol"]["text_len"] == 20
    assert result.token_text["text"] == [tokenizer_text(gpt2_dir, i) for i in result.examples["text"]["tokens"]]
    assert result.token_text["repeated"] == [tokenizer_text(gpt2_dir, i) for i in result.examples["repeated"]["tokens"]]


def tokenizer_text(path, i) -> str:
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast(str(path / "vocab.json"), str(path / "merges.txt")).decode([int(i)])


def test_heads_text_window_is_the_context_when_the_protocol_asks_longer(monkeypatch, gpt2_dir, tmp_path):  # noqa: F811
    """Outside truth: the model's context (GPT2Config n_positions=32) bounds a window asked 100 tokens long."""
    from mechscope.lm.methods.heads import HeadProtocol
    from mechscope.lm.pipelines.heads import induction_heads

    seen = record(monkeypatch, "mechscope.lm.pipelines.heads:find_induction_heads")
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    with pytest.raises(Called):
        induction_heads(str(gpt2_dir), tmp_path / "h", HeadProtocol(n=6, batch=2, text_batch=2, text_len=100), text)
    assert tuple(seen["text_tokens"].shape) == (2, 32)


def test_heads_force_overwrites_and_no_force_refuses(monkeypatch, gpt2_dir, tmp_path):  # noqa: F811
    """Outside truth: the --force rule: an existing folder is refused before any work unless forced."""
    from mechscope.lm.methods.heads import HeadProtocol
    from mechscope.lm.pipelines.heads import induction_heads

    out = tmp_path / "h"
    out.mkdir()
    (out / "old.txt").write_text("x")
    seen = record(monkeypatch, "mechscope.lm.pipelines.heads:find_induction_heads")
    with pytest.raises(MechscopeError, match="already exists"):
        induction_heads(str(gpt2_dir), out, HeadProtocol(n=6, batch=2))
    assert not seen
    with pytest.raises(Called):
        induction_heads(str(gpt2_dir), out, HeadProtocol(n=6, batch=2), force=True)


# ---- lm circuits


def test_circuits_pass_heads_and_prompt_and_save_the_result(monkeypatch, gpt2_dir, tmp_path):  # noqa: F811
    """Outside truths: the prompt's ids from ``transformers``' GPT2TokenizerFast, each decoded alone; the heads
    asked, in their order; the spy's returned result = circuits.json."""
    from transformers import GPT2TokenizerFast

    from mechscope.lm.methods.scores import default_token_range
    from mechscope.lm.pipelines.circuits import circuits

    seen = spy(monkeypatch, "mechscope.lm.pipelines.circuits:read_circuits")
    prompt = "The cat sat on the mat and the cat"
    out, _ = circuits(str(gpt2_dir), tmp_path / "c", heads=[(1, 1), (0, 0)], prompt=prompt)
    tok = GPT2TokenizerFast(str(gpt2_dir / "vocab.json"), str(gpt2_dir / "merges.txt"))
    ids = [int(i) for i in seen["prompt"]]
    assert ids == tok.encode(prompt)  # (GPT-2's tokenizer adds no BOS)
    assert seen["prompt_text"] == [tok.decode([i]) for i in ids]
    assert seen["heads"] == [(1, 1), (0, 0)] and seen["name"] == str(gpt2_dir)
    assert seen["token_range"] == default_token_range(seen["model"])
    assert seen["decoder"](ids[-1]) == tok.decode([ids[-1]])
    data = saved(out / "circuits.json")
    same_json(body(data), body(seen["result"].to_dict()))


def test_circuits_default_prompt_is_its_first_context_tokens(monkeypatch, gpt2_dir, tmp_path):  # noqa: F811
    """Outside truth: GPT2TokenizerFast's ids of the default prompt, cut at the context of 32."""
    from transformers import GPT2TokenizerFast

    from mechscope.lm.pipelines.circuits import DEFAULT_PROMPT, circuits

    seen = record(monkeypatch, "mechscope.lm.pipelines.circuits:read_circuits")
    with pytest.raises(Called):
        circuits(str(gpt2_dir), tmp_path / "c")
    tok = GPT2TokenizerFast(str(gpt2_dir / "vocab.json"), str(gpt2_dir / "merges.txt"))
    whole = tok.encode(DEFAULT_PROMPT)
    assert len(whole) > 32 and seen["heads"] is None
    assert [int(i) for i in seen["prompt"]] == whole[:32]  # (GPT-2's tokenizer adds no BOS)


def test_circuits_force_overwrites_and_no_force_refuses(monkeypatch, gpt2_dir, tmp_path):  # noqa: F811
    """Outside truth: the --force rule: an existing folder is refused before any reading unless forced."""
    from mechscope.lm.pipelines.circuits import circuits

    out = tmp_path / "c"
    out.mkdir()
    (out / "old.txt").write_text("x")  # (an empty folder is not refused)
    seen = record(monkeypatch, "mechscope.lm.pipelines.circuits:read_circuits")
    with pytest.raises(MechscopeError, match="already exists"):
        circuits(str(gpt2_dir), out)
    assert not seen
    with pytest.raises(Called):
        circuits(str(gpt2_dir), out, force=True)


# ---- lm discover


def test_discover_passes_the_task_settings_to_make_task(monkeypatch, gpt2_dir, tmp_path):  # noqa: F811
    """Outside truth: make_task's own signature; every setting given a value none of the others has."""
    from mechscope.lm.pipelines.discovery import discover_model

    seen = record(monkeypatch, "mechscope.lm.pipelines.discovery:make_task")
    with pytest.raises(Called):
        discover_model(str(gpt2_dir), tmp_path / "d", task="induction", metric="kl", n=7, batch=5, seed=3,
                       token_range=(100, 900), distinct=True)  # fmt: skip
    assert seen["model"].cfg.n_layers == 2 and seen["task"] == "induction" and seen["metric"] == "kl"
    assert seen["settings"] == {"n": 7, "batch": 5, "seed": 3, "limit": None, "token_range": (100, 900),
                                "distinct": True}  # fmt: skip


def test_discover_passes_the_method_settings_to_discover(monkeypatch, gpt2_dir, tmp_path):  # noqa: F811
    """Outside truths: discover's own signature; the task it gets is the one make_task returned."""
    from mechscope.lm.pipelines.discovery import discover_model

    task = spy(monkeypatch, "mechscope.lm.pipelines.discovery:make_task")
    seen = record(monkeypatch, "mechscope.lm.pipelines.discovery:discover")
    with pytest.raises(Called):
        discover_model(str(gpt2_dir), tmp_path / "d", method="acdc", size=9, threshold=0.07, ablation="mean",
                       n=4, batch=2, seed=6, n_random=3)  # fmt: skip
    assert seen["task"] is task["result"] and seen["method"] == "acdc" and seen["size"] == 9
    assert seen["threshold"] == 0.07 and seen["ablation"] == "mean" and seen["n_random"] == 3 and seen["seed"] == 6
    assert seen["curve"] is True and seen["steps"] is None and seen["known"] is None and seen["hand_edges"] is None
    assert seen["name"] == str(gpt2_dir) and task["settings"]["seed"] == 6
    seen.clear()
    with pytest.raises(Called):
        discover_model(str(gpt2_dir), tmp_path / "d", method="eap-ig", steps=4, curve=False, n=4, batch=2)
    assert seen["method"] == "eap-ig" and seen["steps"] == 4 and seen["curve"] is False


def test_discover_passes_the_edges_a_heads_report_confirmed(monkeypatch, gpt2_dir, tmp_path):  # noqa: F811
    """Outside truth: one confirmed path patch 0.1 -> layer 1's key head 0, written by hand into a heads report,
    is the edge blocks.0.attn.h1 -> blocks.1.attn.h0 (key input) in the graph's names."""
    from mechscope.lm.methods.heads import HeadProtocol
    from mechscope.lm.pipelines.discovery import discover_model
    from mechscope.lm.pipelines.heads import induction_heads

    out, _ = induction_heads(str(gpt2_dir), tmp_path / "h", HeadProtocol(n=6, batch=2, per_head_ablation=False))
    edge = {"source": "0.1", "target_layer": 1, "kv_head": 0, "query_heads": ["1.0"], "induction_clean": [0.5],
            "induction_patched": [0.1], "drop": [0.4], "drop_std": [0.1], "confirmed": [True]}  # fmt: skip
    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps(saved(out / "heads.json") | {"edges": [edge]}))
    seen = record(monkeypatch, "mechscope.lm.pipelines.discovery:discover")
    with pytest.raises(Called):
        discover_model(str(gpt2_dir), tmp_path / "d", compare_heads=heads, n=4, batch=2)
    assert seen["hand_edges"] == [("blocks.0.attn.h1", "blocks.1.attn.h0", "k")]


def test_discover_saves_what_discover_returned_on_a_tracr_model(monkeypatch, tmp_path):
    """Outside truths: the spy's returned result = discovery.json; tracr's own circuit.json is the `known` given."""
    from mechscope.lm.pipelines.discovery import discover_model

    if not (TRACR / "config.json").is_file():
        pytest.skip(f"tracr's hist not found at {TRACR}")
    seen = spy(monkeypatch, "mechscope.lm.pipelines.discovery:discover")
    out, result = discover_model(str(TRACR), tmp_path / "d", method="acdc", n_random=2, seed=4)
    assert seen["known"] is not None and seen["seed"] == 4 and seen["n_random"] == 2
    data = saved(out / "discovery.json")
    same_json(body(data), body(seen["result"].to_dict()))
    assert result.method == data["method"] == "acdc"


# ---- lm neurons


def test_neurons_pass_the_settings_and_windows_of_the_text(monkeypatch, solu_run, text_file, tmp_path):  # noqa: F811
    """Outside truths: read_neurons' own signature; each window a run of the text's characters in the toy's
    vocabulary (a plain search), of the length asked; the spy's returned result = neurons.json."""
    from mechscope.lm.methods.neurons import sample_windows
    from mechscope.lm.pipelines.neurons import NeuronSettings, neurons

    seen = spy(monkeypatch, "mechscope.lm.methods.neurons:read_neurons")
    settings = NeuronSettings(layers=(0,), neurons=((0, 3),), k=7, sequences=9, length=12, contexts=3, seed=4,
                              min_count=2)  # fmt: skip
    out, result = neurons(str(solu_run), tmp_path / "n", text_file, settings)
    tokens = seen["tokens"]
    vocab = sorted(set(TEXT))
    ids = [vocab.index(c) for c in TEXT]
    assert tuple(tokens.shape) == (9, 12) and all(is_window(w, ids) for w in tokens)
    drawn = sample_windows(torch.tensor(ids), 9, 12, 4)  # the sampler called directly with the seed asked
    assert torch.equal(tokens, drawn) and not torch.equal(tokens, sample_windows(torch.tensor(ids), 9, 12, 0))
    assert seen["layers"] == [0] and seen["k"] == 7 and seen["n_contexts"] == 3 and seen["min_count"] == 2
    assert seen["seed"] == 4 and seen["skip_first"] == 0 and seen["site"] == "auto"
    assert seen["sample"] == {"seed": 4, "source": str(text_file)} and seen["name"] == result.model
    data = saved(out / "neurons.json")  # compact: 4 significant digits
    close_json(body(data), body(result.to_dict()))
    same_json(body(replace(result, decoder=None).to_dict()), body(seen["result"].to_dict()))
    assert result.decoder(ids[0]) == TEXT[0]
    asked_table = [t for t in Page((out / "report.html").read_text()).tables if t and t[0][0] == "neuron"][0]
    fig = data["layers"][0]["figures"][3]  # the neuron asked, 0.3, first: its cells from neurons.json
    assert asked_table[1][:2] == ["0.3", f"{fig['entropy']:.2f}"] and asked_table[1][5] == str(fig["n"])


def test_neurons_length_defaults_to_64_cut_at_the_context(monkeypatch, solu_run, text_file, tmp_path):  # noqa: F811
    """Outside truth: the toy's context (n_ctx=32 in TINY) bounds the default length of 64."""
    from mechscope.lm.pipelines.neurons import NeuronSettings, neurons

    seen = record(monkeypatch, "mechscope.lm.methods.neurons:read_neurons")
    with pytest.raises(Called):
        neurons(str(solu_run), tmp_path / "n", text_file, NeuronSettings(sequences=5, k=3))
    assert tuple(seen["tokens"].shape) == (5, 32) and seen["layers"] is None and seen["n_contexts"] == 5


# ---- lm graph


def test_graph_passes_targets_positions_and_qk_heads(monkeypatch, tmp_path):
    """Outside truths: the methods' own signatures; the qk spec (layer, head, query, key) split into its parameters,
    the path count into edge_paths' n; the spy's returned graph's settings = graph.json's."""
    from mechscope.lm.methods.attribution_graph import GraphSettings
    from mechscope.lm.pipelines.attribution_graph import graph_run

    if not (TRACR / "config.json").is_file():
        pytest.skip(f"tracr's hist not found at {TRACR}")
    graph = spy(monkeypatch, "mechscope.lm.pipelines.attribution_graph:attribution_graph")
    qk = spy(monkeypatch, "mechscope.lm.pipelines.attribution_graph:qk_attribution")
    paths = spy(monkeypatch, "mechscope.lm.pipelines.attribution_graph:edge_paths")
    checks = spy(monkeypatch, "mechscope.lm.pipelines.attribution_graph:asked_interventions")
    settings = GraphSettings(seed=2, batch_size=8)
    out, g = graph_run(str(TRACR), None, tmp_path / "g", tokens=[0, 2, 3, 2, 2, 4], bos=False, transcoders="neurons",
                       logit_pos=1, targets=["#3"], settings=settings, qk=[(0, 0, 4, 2)], paths=5)  # fmt: skip
    assert [int(i) for i in graph["tokens"]] == [0, 2, 3, 2, 2, 4] and graph["targets"] == [3]
    assert graph["logit_pos"] == 1 and graph["settings"] is settings
    assert (qk["layer"], qk["head"], qk["query_pos"], qk["key_pos"]) == (0, 0, 4, 2)
    assert paths["n"] == 5 and paths["target"] == 0
    data = saved(out / "graph.json")
    assert data["settings"]["targets"] == [3] and len(data["qk"]) == 1 and len(data["paths"]) == 1
    same_json(data["qk"][0], qk["result"].to_dict())
    same_json(data["paths"][0], paths["result"].to_dict())
    assert checks["result"] and data["checks"] == json.loads(json.dumps([c.to_dict() for c in checks["result"]]))
    same_json(data["nodes"], graph["result"][0].to_dict()["nodes"])


def test_graph_refuses_an_existing_folder_before_any_work(monkeypatch, tmp_path):
    """Outside truth: the --force rule: an existing folder is refused before the graph is computed."""
    from mechscope.lm.pipelines.attribution_graph import graph_run

    if not (TRACR / "config.json").is_file():
        pytest.skip(f"tracr's hist not found at {TRACR}")
    out = tmp_path / "g"
    out.mkdir()
    (out / "old.txt").write_text("x")
    seen = record(monkeypatch, "mechscope.lm.pipelines.attribution_graph:attribution_graph")
    with pytest.raises(MechscopeError, match="already exists"):
        graph_run(str(TRACR), None, out, tokens=[0, 2, 3], bos=False, transcoders="neurons")
    assert not seen
    with pytest.raises(Called):
        graph_run(str(TRACR), None, out, force=True, tokens=[0, 2, 3], bos=False, transcoders="neurons")
