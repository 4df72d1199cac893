"""`lm train-toy --mlp`, `lm neurons`, `lm solu-compare` and `cnn solu-compare` end to end at tiny sizes;
bad input; the reports render offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechscope.cnn.methods.channel_selectivity import ActivationComparison
from mechscope.lm.methods.neurons import NeuronsResult, SoluComparison
from mechscope.lm.toy import ToyTraining
from tests.e2e.reports import check_report, render_in_chromium
from tests.e2e.test_cli import assert_one_line_error, run_main
from tests.records import assert_round_trip

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one torch thread


TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
) * 40


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT)
    return path


def _tiny_toy(monkeypatch):
    import mechscope.lm.toy as toy

    original = toy.ToyConfig

    def tiny(**kw):
        base = dict(d_model=32, n_heads=2, n_ctx=32, vocab=16, batch=8, checkpoints=3, min_span=4, warmup=1)
        return original(**{**base, **kw})

    monkeypatch.setattr(toy, "ToyConfig", tiny)


TINY = dict(d_model=32, n_heads=2, n_ctx=32, vocab=16, batch=8, checkpoints=3, min_span=4, warmup=1)


@pytest.fixture(scope="module")
def solu_run(tmp_path_factory, text_file):
    """A 1-layer SoLU toy trained on the text (through the library; the CLI's path is tested below)."""
    from mechscope.lm.pipelines.toy import train_toy_run
    from mechscope.lm.toy import ToyConfig

    out = tmp_path_factory.mktemp("toy") / "toy-solu"
    config = ToyConfig(**TINY, layers=1, data="text", steps=15, mlp="solu", d_mlp=48)
    train_toy_run(config, out, text_file, control=False, progress=False)
    return out


def test_train_toy_mlp_and_neurons(capsys, tmp_path, monkeypatch, text_file):
    _tiny_toy(monkeypatch)
    run = tmp_path / "toy-solu"
    code, stdout, err = run_main(
        capsys, "lm", "train-toy", "--data", "text", "--text", str(text_file), "--mlp", "solu", "--d-mlp", "48",
        "--layers", "1", "--steps", "15", "--out", str(run),
    )  # fmt: skip
    assert code == 0, err
    data = assert_round_trip(run / "training.json", ToyTraining)
    assert data["model"]["act"] == "solu_ln" and data["model"]["d_mlp"] == 48 and data["config"]["mlp"] == "solu"
    assert "SoLU followed by a LayerNorm" in (run / "training.html").read_text()
    out = tmp_path / "neurons"
    code, stdout, err = run_main(
        capsys, "lm", "neurons", "--model", str(run), "--text", str(text_file), "--sequences", "40",
        "--neuron", "0.7", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    assert "Median entropy of the current token" in stdout and "neurons.json and report.html written" in stdout
    result = assert_round_trip(out / "neurons.json", NeuronsResult)
    layer = result["layers"][0]
    assert layer["hook"] == "blocks.0.mlp.hook_mid" and len(layer["figures"]) == 48
    assert result["sample"]["sequences"] == 40 and result["sample"]["length"] == 32
    ctx = layer["contexts"][7][0]
    assert len(ctx["tokens"]) == len(ctx["acts"]) and "".join(ctx["tokens"]) in TEXT  # the text, decoded
    assert ctx["acts"][ctx["pos"] - ctx["start"]] == pytest.approx(ctx["act"], rel=1e-3)
    f = layer["figures"][7]
    assert 0 <= f["entropy"] <= np.log2(min(100, result["k"])) and 0 < f["top_share"] <= 1
    html = (out / "report.html").read_text()
    assert "<h2>Neurons asked for</h2>" in html and "0.7" in html and 'class="a10 top"' in html
    assert check_report(out / "report.html") == 1
    assert render_in_chromium(out / "report.html", tmp_path) == {"images": 1, "broken": []}
    code, _, err = run_main(capsys, "lm", "neurons", "--model", str(run), "--text", str(text_file), "--out", str(out))
    assert_one_line_error(code, err, "already exists", "--force")
    code, _, err = run_main(capsys, "lm", "neurons", "--model", str(run), "--text", str(text_file), "--site", "post",
                            "--sequences", "10", "--out", str(out), "--force")  # fmt: skip
    assert code == 0, err
    assert assert_round_trip(out / "neurons.json", NeuronsResult)["layers"][0]["hook"] == "blocks.0.mlp.hook_post"


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--layer", "3"], "layer 3 out of range: the MLP layers are 0..0"),
        (["--neuron", "0.48"], "neuron 0.48 out of range: layer 0 has neurons 0..47"),
        (["--neuron", "x"], "expected a neuron as LAYER.NEURON"),
        (["--site", "middle"], "--site must be one of auto, post, mid"),
        (["--text", "/no/such.txt"], "text file not found"),
        (["--sequences", "0"], "--sequences must be at least 1"),
    ],
)
def test_neurons_bad_input(capsys, tmp_path, solu_run, text_file, args, fragment):
    extra = [] if "--text" in args else ["--text", str(text_file)]
    code, _, err = run_main(capsys, "lm", "neurons", "--model", str(solu_run), "--out", str(tmp_path / "o"), *extra,
                            *args)  # fmt: skip
    assert_one_line_error(code, err, fragment)


def test_neurons_empty_text_and_models_without_mlps(capsys, tmp_path, monkeypatch, solu_run):
    (tmp_path / "empty.txt").write_text("  \n")
    code, _, err = run_main(capsys, "lm", "neurons", "--model", str(solu_run), "--text", str(tmp_path / "empty.txt"),
                            "--out", str(tmp_path / "o"))  # fmt: skip
    assert_one_line_error(code, err, "the text file is empty")
    # characters outside the toy's vocabulary are refused, not dropped (dropping joined the words around them)
    for text, said in (("ЖЖЖЖЖЖ", "1 character the model was not trained on ('Ж')"),
                       (TEXT[:500] + "Ж€" + TEXT[500:], "2 characters the model was not trained on ('Ж', '€')")):
        (tmp_path / "foreign.txt").write_text(text)
        code, _, err = run_main(capsys, "lm", "neurons", "--model", str(solu_run), "--text",
                                str(tmp_path / "foreign.txt"), "--out", str(tmp_path / "o"))  # fmt: skip
        assert_one_line_error(code, err, said)
        assert not (tmp_path / "o").exists()
    (tmp_path / "tiny.txt").write_text(TEXT[:5])  # 5 tokens for the top 100 activations: every share was NaN
    code, _, err = run_main(capsys, "lm", "neurons", "--model", str(solu_run), "--text", str(tmp_path / "tiny.txt"),
                            "--out", str(tmp_path / "o"))  # fmt: skip
    assert_one_line_error(code, err, "tiny.txt: 5 positions (1 sequence of 5), not more than the 100 top activations")
    code, _, err = run_main(capsys, "lm", "neurons", "--model", str(solu_run), "--text", str(tmp_path / "tiny.txt"),
                            "--k", "5", "--out", str(tmp_path / "o"))  # fmt: skip
    assert_one_line_error(code, err, "5 positions (1 sequence of 5), not more than the 5 top")  # all five: "top"
    _tiny_toy(monkeypatch)
    attn = tmp_path / "attn"
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    code, _, err = run_main(capsys, "lm", "train-toy", "--data", "text", "--text", str(text), "--layers", "1",
                            "--steps", "3", "--out", str(attn))  # fmt: skip
    assert code == 0, err
    code, _, err = run_main(capsys, "lm", "neurons", "--model", str(attn), "--text", str(text), "--out",
                            str(tmp_path / "o"))  # fmt: skip
    assert_one_line_error(code, err, "attn-only-1L has no MLP layers (attention-only)")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--d-mlp", "64"], "--d-mlp 64 needs MLPs: pass --mlp gelu or --mlp solu"),
        (["--mlp", "relu"], "--mlp must be one of none, gelu, solu, got 'relu'"),
        (["--mlp", "gelu", "--d-mlp", "0"], "--d-mlp must be at least 1, got 0"),
    ],
)
def test_train_toy_mlp_bad_input(capsys, tmp_path, args, fragment):
    code, _, err = run_main(capsys, "lm", "train-toy", "--out", str(tmp_path / "o"), *args)
    assert_one_line_error(code, err, fragment)


def test_neurons_on_a_loaded_gpt2(capsys, tmp_path, mnist_root, text_file):
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "gpt2"
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50257, n_positions=32, n_inner=40)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    tok = mnist_root / "gpt2-tokenizer"
    (path / "vocab.json").write_bytes((tok / "encoder.json").read_bytes())
    (path / "merges.txt").write_bytes((tok / "vocab.bpe").read_bytes())
    out = tmp_path / "n"
    code, _, err = run_main(capsys, "lm", "neurons", "--model", str(path), "--text", str(text_file), "--sequences",
                            "20", "--layer", "1", "--out", str(out))  # fmt: skip
    assert code == 0, err
    result = assert_round_trip(out / "neurons.json", NeuronsResult)
    assert [lay["layer"] for lay in result["layers"]] == [1] and len(result["layers"][0]["figures"]) == 40
    assert result["layers"][0]["hook"] == "blocks.1.mlp.hook_post"
    assert result["sample"]["skip_first"] == 1  # GPT-2's BOS starts every window and is never counted
    assert all(c["pos"] >= 1 for ctxs in result["layers"][0]["contexts"] for c in ctxs)
    assert check_report(out / "report.html") == 1


def test_solu_compare_tiny(capsys, tmp_path, text_file):
    out = tmp_path / "cmp"
    code, stdout, err = run_main(
        capsys, "lm", "solu-compare", "--text", str(text_file), "--steps", "6", "--d-model", "16", "--d-mlp", "24",
        "--n-ctx", "16", "--batch", "4", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    assert "Held-out loss: GELU" in stdout and "SoLU" in stdout
    data = assert_round_trip(out / "compare.json", SoluComparison)
    labels = [m["label"] for m in data["models"]]
    assert labels == ["GELU", "SoLU", "SoLU after its LayerNorm"]
    assert data["models"][0]["hooks"] == ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]  # 2 layers by default
    assert data["models"][1]["hooks"] == ["blocks.0.mlp.hook_mid", "blocks.1.mlp.hook_mid"]
    g, s = data["models"][0], data["models"][1]
    assert g["held_out_tokens"] == s["held_out_tokens"] > 0 and g["held_out_loss"] != s["held_out_loss"]
    assert len(g["most_monosemantic"]) <= 20 and data["settings"]["steps"] == 6
    for sub in ("gelu", "solu"):  # each model is a train-toy run with its own neurons report
        assert (out / sub / "training.json").is_file() and (out / sub / "neurons" / "report.html").is_file()
    assert check_report(out / "report.html") == 1
    assert render_in_chromium(out / "report.html", tmp_path) == {"images": 1, "broken": []}
    code, _, err = run_main(capsys, "lm", "solu-compare", "--d-model", "30", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "--d-model 30 is not a multiple of 4 heads")


@pytest.fixture(scope="module")
def shapes_npz(tmp_path_factory):
    from tests.shapes import CLASS_NAMES, splits

    root = tmp_path_factory.mktemp("shapes")
    np.savez(root / "grey.npz", **splits(seed=1))
    (root / "names.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    return root


def test_cnn_solu_compare(capsys, tmp_path, shapes_npz):
    out = tmp_path / "cnn"
    code, stdout, err = run_main(
        capsys, "cnn", "solu-compare", "--dataset", str(shapes_npz / "grey.npz"), "--class-names",
        str(shapes_npz / "names.txt"), "--epochs", "2", "--batch-size", "32", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    assert stdout.startswith("Test accuracy: relu") and "Class selectivity of conv2" in stdout
    data = assert_round_trip(out / "compare.json", ActivationComparison)
    assert [m["activation"] for m in data["models"]] == ["relu", "gelu", "solu"]
    for m in data["models"]:
        assert 0 <= m["test_accuracy"] <= 1 and [s["stage"] for s in m["stages"]] == ["conv1", "conv2"]
        assert (out / m["dir"] / "model.safetensors").is_file()  # an ordinary run
    solu = data["channels"]["solu"][0]
    assert len(solu["index"]) == 16 and all(0 <= v <= 1 for v in solu["index"])
    # class means recomputed by hand from conv1.hook_out of the saved run, and the index from them
    from mechscope.cnn.data.images import load_dataset
    from mechscope.cnn.runs import load_run
    from mechscope.core.hooks import run_with_cache

    test = load_dataset(str(shapes_npz / "grey.npz"))
    _, cache = run_with_cache(load_run(out / "solu").model, test.test_float(), names=["conv1.hook_out"])
    per_image = cache["conv1.hook_out"][:, 3].mean((1, 2))  # channel 3, mean over positions
    means = torch.stack([per_image[test.test_labels == k].mean() for k in range(4)]).double()
    assert solu["class_means"][3] == pytest.approx(means.tolist(), abs=1e-5)
    shifted = means - means.min()
    top, rest = shifted.max(), (shifted.sum() - shifted.max()) / 3  # mu_max, the mean of the other three
    by_hand = (top - rest) / (top + rest)
    assert solu["index"][3] == pytest.approx(float(by_hand), abs=1e-5)
    assert check_report(out / "report.html") == 2
    assert render_in_chromium(out / "report.html", tmp_path) == {"images": 2, "broken": []}
    assert data["test_set"] == data["test_images"] and "(--test-limit)" not in (out / "report.html").read_text()
    code, _, err = run_main(capsys, "cnn", "solu-compare", "--activations", "solu", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "--activations takes two or more of relu, gelu, solu, got solu")
    code, _, err = run_main(capsys, "cnn", "solu-compare", "--activations", "relu,tanh", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "got relu, tanh")


def test_solu_compare_with_no_neuron_counted(capsys, tmp_path, text_file):
    # valid input that once crashed (KeyError in the summary): so short a run that no neuron is counted
    out = tmp_path / "cmp"
    code, stdout, err = run_main(capsys, "lm", "solu-compare", "--text", str(text_file), "--steps", "5", "--d-model",
                                 "16", "--d-mlp", "16", "--n-ctx", "16", "--batch", "4", "--k", "5", "--out", str(out))
    assert code == 0, err
    assert_round_trip(out / "compare.json", SoluComparison)

