"""`mechscope cnn graph` and `mechscope lm graph` end to end: graph.json (checked by its own interventions),
graph.html (offline), circuit-tracer's JSON, `--view` of an annotated graph, nothing overwritten without --force; and
bad input (one line, exit 2): a prompt longer than the context, transcoders or dictionaries that do not fit, a logit
or image index out of range, a graph JSON that is not valid."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from mechscope.cnn.methods.attribution_graph import CnnAttributionGraph
from mechscope.core.attribution_graph import load_graph
from mechscope.lm.methods.attribution_graph import LmAttributionGraph
from tests.e2e.reports import check_report
from tests.e2e.test_cli import assert_one_line_error, run_main


@pytest.fixture(autouse=True)
def _two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _circuit_tracer(path: Path, n_nodes: int) -> None:
    ct = json.loads(path.read_text())
    assert {"metadata", "nodes", "links", "qParams"} <= set(ct) and len(ct["nodes"]) == n_nodes


def test_cnn_graph_cli(capsys, quick_run, mnist_root, tmp_path):
    out = tmp_path / "g"
    args = (
        "cnn",
        "graph",
        "--run",
        str(quick_run),
        "--data-dir",
        str(mnist_root),
        "--image",
        "3",
        "--channels",
        "--check",
        "8",
        "--dashboards",
        "3",
        "--out",
        str(out),
    )
    code, stdout, err = run_main(capsys, *args)
    assert code == 0, err
    assert "replacement score 1.000" in stdout and "ablate " in stdout  # the CNN's channels: exact transcoders
    g = load_graph(out / "graph.json", CnnAttributionGraph)
    e = g.exactness
    assert e["logits_max_abs_diff"] < 1e-4 and e["edges_max_abs_error"] < 1e-4 and e["edges_sources_checked"] == 8
    assert g.checks and g.dashboards and {n["kind"] for n in g.nodes} >= {"feature", "input", "logit"}
    assert check_report(out / "graph.html") >= 1  # the image, inlined; nothing on the network
    _circuit_tracer(out / "graph-circuit-tracer.json", len(g.nodes))
    assert (out / "graph_full.safetensors").is_file()
    code, _, err = run_main(capsys, *args)  # the folder exists: nothing overwritten without --force
    assert_one_line_error(code, err, "exists")
    # annotate (as the viewer's download does) and view again
    d = json.loads((out / "graph.json").read_text())
    feats = [n["id"] for n in d["nodes"] if n["kind"] == "feature"][:2]
    d |= {"pinned": feats, "supernodes": [{"label": "strokes", "members": feats}]}
    (tmp_path / "annotated.json").write_text(json.dumps(d))
    code, stdout, err = run_main(
        capsys, "cnn", "graph", "--view", str(tmp_path / "annotated.json"), "--out", str(tmp_path / "v")
    )
    assert code == 0, err
    assert "2 pinned, 1 supernodes" in stdout and (tmp_path / "v" / "graph.html").is_file()


@pytest.mark.parametrize(
    "extra,fragments",
    [
        (["--image", "100000"], ["image 100000 outside"]),
        (["--image", "0", "--target", "10"], ["class 10 out of range: expected 0..9"]),
        (["--image", "0", "--dictionaries", "WRONG"], ["the stage has 16"]),
    ],
)
def test_cnn_graph_bad_input(capsys, quick_run, mnist_root, tmp_path, extra, fragments):
    from mechscope.cnn.methods.replacement import StageDictionaries
    from mechscope.cnn.models.cnn import CNN, CNNConfig

    if "WRONG" in extra:  # dictionaries of a CNN with other widths
        StageDictionaries.channels(CNN(CNNConfig(channels=(8, 8)))).save(tmp_path / "wrong")
        extra = [str(tmp_path / "wrong") if x == "WRONG" else x for x in extra]
    base = ["cnn", "graph", "--run", str(quick_run), "--data-dir", str(mnist_root), "--check", "0", "--dashboards", "0"]
    if "--dictionaries" not in extra:
        base.append("--channels")
    code, _, err = run_main(capsys, *base, *extra, "--out", str(tmp_path / "g"))
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize(
    "extra,fragments",
    [
        (["--ablate", "1_x_2"], ["--ablate '1_x_2' is not a feature node's id LAYER_FEATURE_POS", "only feature"]),
        (["--ablate", "0_-1_3"], ["--ablate '0_-1_3' is not a feature node's id"]),  # an error node
        (["--steer", "E_0_4=2"], ["--steer 'E_0_4' is not a feature node's id"]),  # a pixel
        (["--ablate", "0_1_2,0_3_4", "--ablate", "0_3_4,0_1_2"], ["--ablate 0_1_2,0_3_4 given more than once"]),
    ],
)
def test_graph_interventions_are_checked_before_dictionaries_are_trained(capsys, quick_run, mnist_root, tmp_path,
                                                                         extra, fragments):  # fmt: skip
    """A malformed node id was named only after the dictionaries were trained here (two progress lines, a minute);
    now the one error line comes first."""
    base = ["cnn", "graph", "--run", str(quick_run), "--data-dir", str(mnist_root), "--dashboards", "0"]
    code, _, err = run_main(capsys, *base, *extra, "--out", str(tmp_path / "g"))
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("kind", ["cnn", "lm"])
@pytest.mark.parametrize("damage", ["not json", "edge", "schema"])
def test_view_refuses_an_invalid_graph_json(capsys, tmp_path, kind, damage):
    path = tmp_path / "graph.json"
    if damage == "not json":
        path.write_text("{nodes: ")
    else:
        d = {
            "schema": f"mechscope.{kind}_graph/1",
            "kind": kind,
            "model": "m",
            "title": "t",
            "input_labels": [],
            "layer_names": [],
            "nodes": [],
            "edges": [[0, 1, 0.5]],
            "scores": {},
            "counts": {},
            "settings": {},
        }
        if damage == "schema":
            d |= {"schema": "something/9", "edges": []}
        path.write_text(json.dumps(d))
    code, _, err = run_main(capsys, kind, "graph", "--view", str(path), "--out", str(tmp_path / "v"))
    assert_one_line_error(code, err, str(path))
    assert not (tmp_path / "v").exists()


TRACR = Path(__import__("os").environ.get("MECHSCOPE_DATA", "../shared/data")) / "tracr" / "hist"


@pytest.fixture()
def hist():
    if not (TRACR / "config.json").is_file():
        pytest.skip(f"tracr's hist not found at {TRACR}")
    return str(TRACR)


def test_lm_graph_cli_on_a_compiled_model(capsys, hist, tmp_path):
    out = tmp_path / "g"
    code, stdout, err = run_main(
        capsys,
        "lm",
        "graph",
        "--model",
        hist,
        "--tokens",
        "0,2,3,2,2,4",
        "--no-bos",
        "--neurons",
        "--logit-pos",
        "1",
        "--target",
        "#3",
        "--qk",
        "0.0@1",
        "--out",
        str(out),
    )
    assert code == 0, err
    assert "replacement score 1.000" in stdout
    g = load_graph(out / "graph.json", LmAttributionGraph)
    assert g.exactness["logits_max_abs_diff"] < 1e-4 and g.exactness["edges_max_abs_error"] < 1e-4
    assert g.settings["targets"] == [3] and g.qk and g.checks
    _circuit_tracer(out / "graph-circuit-tracer.json", len(g.nodes))
    text = (out / "graph.html").read_text()
    assert "agv-svg" in text and not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # offline
    assert "agv-svg" in g._repr_html_()  # the notebook view is the same viewer
    code, stdout, err = run_main(capsys, "lm", "graph", "--view", str(out / "graph.json"), "--out", str(tmp_path / "v"))
    assert code == 0, err


def test_edge_paths_name_the_head_tracr_compiled_to_carry_the_token(capsys, tmp_path):
    """tracr's reverse (4 layers): the output at position 1 of 'a b c b' is the token at position 4, which the
    compiled program moves there with its last layer's head (3.0): the paths give that input alone, carried by 3.0,
    in the CLI's line, graph.json and graph.html, the logit named by its class."""
    from mechscope.lm.methods.edge_paths import EdgePaths
    from mechscope.lm.notebook.attribution_graph import paths_page

    reverse = TRACR.parent / "reverse"
    if not (reverse / "config.json").is_file():
        pytest.skip(f"tracr's reverse not found at {reverse}")
    out = tmp_path / "g"
    code, stdout, err = run_main(capsys, "lm", "graph", "--model", str(reverse), "--prompt", "BOS a b c b", "--no-bos",
                                 "--neurons", "--logit-pos", "1", "--out", str(out))  # fmt: skip
    assert code == 0, err
    assert "inputs of 'b' by the head that carried them: 3.0 +0.667" in stdout
    g = load_graph(out / "graph.json", LmAttributionGraph)
    p = EdgePaths.from_dict(g.paths[0])
    assert (p.target, p.label, p.title()) == ("logit 1", "b", "'b'")
    assert [(r["source"], list(r["via"])) for r in p.rows] == [("E_3_4", ["3.0"])]  # rounding-sized edges left out
    assert p.rows[0]["edge"] == pytest.approx(2 / 3, abs=1e-5) and p.rows[0]["direct"] == 0
    html = (out / "graph.html").read_text()
    assert "Inputs of &#x27;b&#x27; by the head that carried them" in html
    assert "&#x27;b&#x27; at position 4 (E_3_4)" in html
    assert "Paths into &#x27;b&#x27;" in paths_page(p)  # the notebook's page names it so too


def test_a_compiled_model_reads_and_names_its_own_vocabularies(capsys, hist, tmp_path):
    """tracr's hist: input words (BOS, PAD, a, b, c) for the prompt and the input nodes, output classes (the counts
    0..6) for --target and the logit nodes; the same graph as the ids give."""
    out, ref = tmp_path / "w", tmp_path / "ids"
    args = ["lm", "graph", "--model", hist, "--neurons", "--logit-pos", "1", "--dashboards", "0", "--out"]
    code, stdout, err = run_main(capsys, *args, str(out), "--prompt", "b a b b c", "--target", "3")
    assert code == 0, err
    assert "logits: '3'" in stdout and "inputs of '3' by the head that carried them" in stdout  # 'b' occurs 3 times
    code, _, err = run_main(capsys, *args, str(ref), "--tokens", "0,3,2,3,3,4", "--no-bos", "--target", "#3")
    assert code == 0, err
    g, r = load_graph(out / "graph.json", LmAttributionGraph), load_graph(ref / "graph.json", LmAttributionGraph)
    assert g.input_labels == ("BOS", "b", "a", "b", "b", "c") and g.title == "BOS b a b b c"
    assert g.settings["targets"] == r.settings["targets"] == [3] and g.edges == r.edges
    assert [n["label"] for n in g.nodes if n["kind"] == "logit"] == ["3"]
    for bad, fragment in (("b d", "'d' is not in the input vocabulary (BOS, PAD, a, b, c)"),):
        code, _, err = run_main(capsys, *args, str(tmp_path / "x"), "--prompt", bad)
        assert_one_line_error(code, err, fragment)
    code, _, err = run_main(capsys, *args, str(tmp_path / "y"), "--prompt", "b a", "--target", "9")
    assert_one_line_error(code, err, "'9' is not in the output vocabulary (0, 1, 2, 3, 4, 5, 6)")


def test_lm_graph_loads_on_the_device_and_dtype_asked(capsys, hist, tmp_path):
    """lm graph took no --device/--dtype/--revision though the docs say every command that loads a model does: in
    bfloat16 the same graph's edges move by bfloat16's rounding (reported by its own exactness check)."""
    args = ["lm", "graph", "--model", hist, "--neurons", "--prompt", "b a b b c", "--dashboards", "0", "--out"]
    code, _, err = run_main(capsys, *args, str(tmp_path / "f32"), "--device", "cpu", "--dtype", "float32")
    assert code == 0, err
    code, _, err = run_main(capsys, *args, str(tmp_path / "bf16"), "--dtype", "bfloat16")
    assert code == 0, err
    f32 = load_graph(tmp_path / "f32" / "graph.json", LmAttributionGraph)
    bf16 = load_graph(tmp_path / "bf16" / "graph.json", LmAttributionGraph)
    assert f32.exactness["edges_max_rel_error"] < 1e-5 < bf16.exactness["edges_max_rel_error"] < 1e-2
    code, _, err = run_main(capsys, *args, str(tmp_path / "x"), "--device", "tpu")
    assert_one_line_error(code, err, "tpu")
    code, _, err = run_main(capsys, "lm", "graph", "--view", str(tmp_path / "f32" / "graph.json"), "--dtype", "float32")
    assert_one_line_error(code, err, "--view re-renders a saved graph", "dtype")


@pytest.mark.parametrize(
    "extra,fragments",
    [
        (["--tokens", "0,2,3,2,2,4,2,3", "--neurons"], ["longer than the context"]),
        (["--tokens", "0,2,3", "--neurons", "--target", "#7"], ["outside the model's 0..6"]),
        (["--tokens", "0,2,3", "--neurons", "--logit-pos", "5"], ["logit position 5 outside"]),
        (["--tokens", "0,2,3", "--neurons", "--ablate", "L0F3"], ["--ablate 'L0F3' is not a feature node's id"]),
        (["--tokens", "0,2,3", "--transcoders", "WRONG"], ["d_model 20"]),
        (["--tokens", "0,2,3", "--transcoders", "TWO"], ["2 transcoders", "1 MLP layers"]),
    ],
)
def test_lm_graph_bad_input(capsys, hist, tmp_path, extra, fragments):
    from mechscope.core.dictionaries import DictionaryConfig, SparseDictionary
    from mechscope.lm.methods.transcoders import Transcoders

    if "WRONG" in extra or "TWO" in extra:
        width = 16 if "WRONG" in extra else 20
        d = SparseDictionary(DictionaryConfig(d_in=width, d_sae=8, transcoder=True, d_out=width))
        Transcoders((d,) * (1 if "WRONG" in extra else 2)).save(tmp_path / "tc")
        extra = [str(tmp_path / "tc") if x in ("WRONG", "TWO") else x for x in extra]
    code, _, err = run_main(capsys, "lm", "graph", "--model", hist, "--no-bos", *extra, "--out", str(tmp_path / "g"))
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "g").exists()


TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n") * 40


def _gelu_toy(tmp_path: Path, layers: int) -> tuple[Path, Path]:
    """(a GELU toy of ``layers`` layers trained here for a few steps, the text it was trained on)."""
    from mechscope.lm.pipelines.toy import train_toy_run
    from mechscope.lm.toy import ToyConfig

    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    run = tmp_path / "toy"
    cfg = ToyConfig(d_model=32, n_heads=2, n_ctx=32, vocab=16, batch=8, checkpoints=2, min_span=4, warmup=1,
                    layers=layers, data="text", steps=5, mlp="gelu", d_mlp=48)  # fmt: skip
    train_toy_run(cfg, run, text, control=False, progress=False)
    return run, text


def test_lm_graph_cli_trains_transcoders_for_a_toy_with_mlps(capsys, tmp_path, monkeypatch):
    """A 1-layer GELU toy (a few steps): `--train-transcoders` trains one here, the graph is exact against its own
    interventions, and the transcoders are saved beside the graph in SAELens' layout (they load back). The text
    (checked first, then read for the transcoders and the dashboards) is read once."""
    import mechscope.core.validate as validate
    from mechscope.lm.methods.transcoders import Transcoders

    run, text = _gelu_toy(tmp_path, layers=1)
    reads, read = [], validate.read_text_file
    monkeypatch.setattr(validate, "read_text_file", lambda path, *a, **k: reads.append(path) or read(path, *a, **k))
    out = tmp_path / "g"
    code, stdout, err = run_main(
        capsys,
        "lm",
        "graph",
        "--model",
        str(run),
        "--tokens",
        "1,2,3,4,1,2,3",
        "--train-transcoders",
        "2048",
        "--text",
        str(text),
        "--check",
        "8",
        "--out",
        str(out),
    )
    assert code == 0, err
    g = load_graph(out / "graph.json", LmAttributionGraph)
    assert g.exactness["logits_max_abs_diff"] < 1e-4 and g.exactness["edges_max_abs_error"] < 1e-4
    assert g.dictionaries["source"] == "trained here" and g.dictionaries["quality"][0]["layer"] == 0
    assert Transcoders.load(out / "transcoders").widths == g.dictionaries["widths"]
    assert [str(p) for p in reads] == [str(text)] and g.dashboards  # the dashboards read the same text
    # a prompt in the toy's characters is read as them; a character it never saw is refused, not dropped
    known = TEXT[:6]
    code, _, err = run_main(capsys, "lm", "graph", "--model", str(run), "--prompt", known, "--transcoders",
                            str(out / "transcoders"), "--out", str(tmp_path / "p"))  # fmt: skip
    assert code == 0, err
    g = load_graph(tmp_path / "p" / "graph.json", LmAttributionGraph)
    assert "".join(g.input_labels[1:]) == known, g.input_labels  # after the toy's BOS (token 0)
    code, _, err = run_main(capsys, "lm", "graph", "--model", str(run), "--prompt", known + "Ж", "--transcoders",
                            str(out / "transcoders"), "--out", str(tmp_path / "q"))  # fmt: skip
    assert_one_line_error(code, err, "1 character the model was not trained on ('Ж')")
    assert not (tmp_path / "q").exists()


def test_lm_graph_cli_trains_and_loads_a_crosslayer_transcoder(capsys, tmp_path):
    """A 2-layer GELU toy: `--train-transcoders N --crosslayer` trains one cross-layer transcoder here, the graph is
    exact against its own interventions, the CLT is saved in circuit-tracer's layout, and `--transcoders` on that
    folder detects the layout and gives the same graph."""
    from mechscope.lm.methods.crosslayer import CrossLayerTranscoder

    run, text = _gelu_toy(tmp_path, layers=2)
    common = (
        "lm",
        "graph",
        "--model",
        str(run),
        "--tokens",
        "1,2,3,4,1,2,3",
        "--text",
        str(text),
        "--check",
        "8",
        "--paths",
        "0",
    )
    out = tmp_path / "g"
    code, stdout, err = run_main(
        capsys,
        *common,
        "--train-transcoders",
        "2048",
        "--crosslayer",
        "--dashboards",
        "2",
        "--examples",
        "512",
        "--out",
        str(out),
    )
    assert code == 0, err
    g = load_graph(out / "graph.json", LmAttributionGraph)
    assert g.exactness["logits_max_abs_diff"] < 1e-4 and g.exactness["edges_max_abs_error"] < 1e-4
    assert g.dictionaries["crosslayer"] and g.dictionaries["trained"]["crosslayer"]
    assert [r["layer"] for r in g.dictionaries["quality"]] == [0, 1] and g.dashboards
    assert (out / "transcoders" / "W_dec_1.safetensors").is_file()
    clt = CrossLayerTranscoder.load(out / "transcoders")
    assert clt.widths == g.dictionaries["widths"] == [128, 128]
    code, stdout, err = run_main(
        capsys, *common, "--transcoders", str(out / "transcoders"), "--dashboards", "0", "--out", str(tmp_path / "h")
    )
    assert code == 0, err
    h = load_graph(tmp_path / "h" / "graph.json", LmAttributionGraph)
    assert h.dictionaries["crosslayer"] and [n["id"] for n in h.nodes] == [n["id"] for n in g.nodes]
    assert h.scores["replacement"] == pytest.approx(g.scores["replacement"], abs=1e-6)


@pytest.mark.parametrize(
    "extra,fragments",
    [
        (["--tokens", "0,2,3", "--crosslayer"], ["--crosslayer trains", "--train-transcoders"]),
        (["--tokens", "0,2,3", "--train-transcoders", "0"], ["--train-transcoders", "from 256", "got 0"]),
        (["--tokens", "0,2,3", "--neurons", "--train-transcoders", "0"], ["give one of"]),  # 0 was taken as not given
        (["--tokens", "0,2,3", "--crosslayer", "--train-transcoders", "0"], ["--train-transcoders", "got 0"]),
        (["--tokens", "0,2,3", "--transcoders", "CLT16"], ["d_model is 20"]),
        (["--tokens", "0,2,3", "--transcoders", "CLT2"], ["over 2 layers", "1 MLP layers"]),
    ],
)
def test_lm_graph_bad_crosslayer_input(capsys, hist, tmp_path, extra, fragments):
    from mechscope.lm.methods.crosslayer import CrossLayerTranscoder

    for name, layers, width in (("CLT16", 1, 16), ("CLT2", 2, 20), ("CLT20", 1, 20)):
        if name in extra:
            CrossLayerTranscoder(layers, width, 8, "relu").save(tmp_path / "clt")
            extra = [str(tmp_path / "clt") if x == name else x for x in extra]
    code, _, err = run_main(capsys, "lm", "graph", "--model", hist, "--no-bos", *extra, "--out", str(tmp_path / "g"))
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "g").exists()
