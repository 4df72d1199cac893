"""`mechscope lm`: inspect and generate on a random GPT-2 checkpoint and on SmolLM2; bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mechscope.lm.methods.heads import HeadsResult
from mechscope.lm.toy import ToyTraining
from tests.e2e.reports import check_report, render_in_chromium
from tests.e2e.test_cli import assert_one_line_error, run_main
from tests.records import assert_round_trip

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, mnist_root):
    path = tmp_path_factory.mktemp("gpt2cli")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50257, n_positions=32)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    tok = mnist_root / "gpt2-tokenizer"
    (path / "vocab.json").write_bytes((tok / "encoder.json").read_bytes())
    (path / "merges.txt").write_bytes((tok / "vocab.bpe").read_bytes())
    return path


def test_inspect_runs_the_prompt_or_the_tokens_asked_for(capsys, gpt2_dir, tmp_path):
    """Without a tokenizer, --hook ran token ids 1..8 whatever --prompt said (exit 0); now --tokens runs ids and a
    prompt needs a tokenizer."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in gpt2_dir.iterdir():
        if f.name not in ("vocab.json", "merges.txt"):
            (bare / f.name).write_bytes(f.read_bytes())
    hook = ("--hook", "blocks.0.hook_resid_pre")
    code, _, err = run_main(capsys, "lm", "inspect", "--model", str(bare), *hook, "--prompt", "zzz")
    assert_one_line_error(code, err, "no tokenizer to read --prompt with; give --tokens")
    code, out, err = run_main(capsys, "lm", "inspect", "--model", str(bare), *hook, "--tokens", "5,6,7")
    assert code == 0, err
    assert "blocks.0.hook_resid_pre: shape [1, 3, " in out
    code, _, err = run_main(capsys, "lm", "inspect", "--model", str(bare), *hook, "--tokens", "1,2", "--prompt", "a")
    assert_one_line_error(code, err, "give --prompt or --tokens, not both")


def test_inspect_and_generate_random_gpt2(capsys, gpt2_dir):
    code, out, err = run_main(capsys, "lm", "inspect", "--model", str(gpt2_dir), "--hook", "blocks.1.attn.hook_pattern")
    assert code == 0, err
    assert "family      gpt2" in out and "blocks.{0..1}.attn.hook_result" in out
    assert "blocks.1.attn.hook_pattern: shape [1, 2, 9, 9]" in out  # 9 tokens in the default prompt
    # GPT-2's learned positions never call the rotary hooks: listed apart, since a hook that never fires is refused
    listed = next(line for line in out.splitlines() if line.startswith("hook points: "))
    assert "hook_rot_q" not in listed
    assert "not computed by this model (their modules exist): blocks.{0..1}.attn.hook_rot_q" in out
    code, out, err = run_main(
        capsys, "lm", "generate", "--model", str(gpt2_dir), "--prompt", "Hello", "--max-new-tokens", "5"
    )
    assert code == 0, err
    assert out.startswith("Hello")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["lm", "generate", "--tokens", "1,2,60000"], "token id 60000 outside the vocabulary 0..50256"),
        (["lm", "generate", "--tokens", ",".join(["5"] * 40)], "longer than the context window of 32"),
        (["lm", "inspect", "--hook", "blocks.7.attn.hook_q"], "unknown hook point 'blocks.7.attn.hook_q'"),
        (["lm", "generate", "--prompt", "x", "--max-new-tokens", "-1"], "--max-new-tokens must be 0 or more"),
    ],
)
def test_bad_input_on_model(capsys, gpt2_dir, args, fragment):
    code, _, err = run_main(capsys, *args[:2], "--model", str(gpt2_dir), *args[2:])
    assert_one_line_error(code, err, fragment)


def test_bad_model_files(capsys, gpt2_dir, tmp_path, monkeypatch):
    code, _, err = run_main(capsys, "lm", "inspect", "--model", str(tmp_path / "nothing.gguf"))
    assert_one_line_error(code, err, "GGUF file not found")
    code, _, err = run_main(capsys, "lm", "inspect", "--model", str(tmp_path / "missing-dir") + "/")
    assert_one_line_error(code, err, "no such model directory")

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((gpt2_dir / "config.json").read_text())
    (broken / "model.safetensors").write_bytes((gpt2_dir / "model.safetensors").read_bytes()[:500])
    code, _, err = run_main(capsys, "lm", "inspect", "--model", str(broken))
    assert_one_line_error(code, err, "model.safetensors: header length", "runs past the file's end")
    (broken / "model.safetensors").unlink()
    code, _, err = run_main(capsys, "lm", "inspect", "--model", str(broken))
    assert_one_line_error(code, err, "no model.safetensors or pytorch_model.bin")

    cfg = json.loads((gpt2_dir / "config.json").read_text())
    (broken / "model.safetensors").write_bytes((gpt2_dir / "model.safetensors").read_bytes())
    (broken / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
    code, _, err = run_main(capsys, "lm", "inspect", "--model", str(broken))
    assert_one_line_error(code, err, "unsupported architecture 'mamba'")
    (broken / "config.json").write_text(json.dumps({**cfg, "rotary_dim": 16}))
    code, _, err = run_main(capsys, "lm", "inspect", "--model", str(broken))
    assert_one_line_error(code, err, "unsupported GPT-2 config field 'rotary_dim'")

    (tmp_path / "fake.gguf").write_bytes(b"GGUF" + b"\x03\0\0\0" + b"\xff" * 30)
    code, _, err = run_main(capsys, "lm", "inspect", "--model", str(tmp_path / "fake.gguf"))
    assert code != 0 and "Traceback" not in err


def test_hub_id_offline_message(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code, _, err = run_main(capsys, "lm", "inspect", "--model", "gpt2")
    assert_one_line_error(code, err, "'gpt2' is not in the Hugging Face cache", "openai-community/gpt2")


def test_generate_smollm2(capsys):
    from mechscope.lm.models.loading import smollm2_path

    try:
        smollm2_path()
    except Exception as e:
        pytest.skip(str(e))
    code, out, err = run_main(capsys, "lm", "generate", "--model", "smollm2", "--prompt", "The capital of France is")
    assert code == 0, err
    assert out.startswith("The capital of France is Paris")


def test_heads_cli_writes_json_and_report(capsys, gpt2_dir, tmp_path):
    out = tmp_path / "heads"
    code, stdout, err = run_main(
        capsys, "lm", "heads", "--model", str(gpt2_dir), "--n", "10", "--batch", "2", "--show", "1.1", "--out", str(out)
    )
    assert code == 0, err
    data = assert_round_trip(out / "heads.json", HeadsResult)
    for key in (
        "model",
        "protocol",
        "scores",
        "induction_heads",
        "previous_token_heads",
        "loss_first_half",
        "loss_second_half",
        "top_k_ablation",
        "composition",
        "thresholds",
        "labels",
    ):
        assert key in data
    for name in (
        "induction",
        "prefix_matching",
        "previous_token",
        "duplicate_token",
        "copying",
        "ov_eigen_positivity",
        "ablation_loss_increase",
    ):
        assert np.array(data["scores"][name], dtype=float).shape == (2, 2)
    assert data["protocol"]["seed"] == 0 and data["protocol"]["n"] == 10
    n_images = check_report(out / "report.html")
    assert n_images >= 5
    assert render_in_chromium(out / "report.html", tmp_path) == {"images": n_images, "broken": []}
    html = (out / "report.html").read_text()
    assert "<script>" in html and '"1.1"' in html  # the viewer has the head asked for
    code, _, err = run_main(capsys, "lm", "heads", "--model", str(gpt2_dir), "--n", "10", "--out", str(out))
    assert_one_line_error(code, err, "already exists", "--force")
    # lm discover --compare-heads reads a report of a model of this shape only (kv_groups 0 put every edge on h0)
    record = json.loads((out / "heads.json").read_text())
    for i, change in enumerate(({"kv_groups": 0}, {"scores": {**record["scores"], "induction": [[0.0]]}})):
        bad = tmp_path / f"heads{i}.json"
        bad.write_text(json.dumps(record | change))
        code, _, err = run_main(capsys, "lm", "discover", "--model", str(gpt2_dir), "--compare-heads", str(bad),
                                "--out", str(tmp_path / "d"))  # fmt: skip
        assert_one_line_error(code, err, f"{bad}: a heads report of a model with")
    edge = {"source": "0.1", "target_layer": 9, "kv_head": 0, "query_heads": ["9.0"], "induction_clean": [0.5],
            "induction_patched": [0.1], "drop": [0.4], "drop_std": [0.1], "confirmed": [True]}  # fmt: skip
    for change, said in (({"target_layer": 9}, "unknown component 'blocks.9.attn.h0'"),
                         ({"target_layer": 1.5}, "target_layer must be an integer, got 1.5")):  # fmt: skip
        bad = tmp_path / "heads_edge.json"
        bad.write_text(json.dumps(record | {"edges": [edge | change]}))
        code, _, err = run_main(capsys, "lm", "discover", "--model", str(gpt2_dir), "--compare-heads", str(bad),
                                "--out", str(tmp_path / "d"))  # fmt: skip
        assert_one_line_error(code, err, f"{bad}: {said}")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--n", "50"], "--n (n) 50 needs 101 positions (a BOS and two copies of 50 tokens); the model's context "
                        "is 32: use --n 15 or fewer"),
        (["--n", "10", "--show", "2.0"], "head 2.0 out of range: layers 0..1, heads 0..1"),
        (["--n", "10", "--show", "x"], "expected a head as LAYER.HEAD"),
        (["--n", "10", "--text", "/no/such/file.txt"], "text file not found"),
    ],
)
def test_heads_bad_input(capsys, gpt2_dir, tmp_path, args, fragment):
    code, _, err = run_main(capsys, "lm", "heads", "--model", str(gpt2_dir), "--out", str(tmp_path / "o"), *args)
    assert_one_line_error(code, err, fragment)


def test_heads_unknown_model(capsys, tmp_path):
    code, _, err = run_main(
        capsys, "lm", "heads", "--model", str(tmp_path / "nope") + "/", "--out", str(tmp_path / "o")
    )
    assert_one_line_error(code, err, "no such model directory")


def test_train_toy_cli(capsys, tmp_path, monkeypatch):
    import mechscope.lm.toy as toy

    # the command's own defaults take minutes; a tiny model exercises the same path in seconds
    original = toy.ToyConfig

    def tiny(**kw):
        return original(**{**dict(d_model=32, n_heads=2, n_ctx=32, vocab=16, batch=8, checkpoints=5, min_span=4), **kw})

    monkeypatch.setattr(toy, "ToyConfig", tiny)
    out = tmp_path / "toy"
    code, stdout, err = run_main(capsys, "lm", "train-toy", "--steps", "12", "--out", str(out))
    assert code == 0, err
    data = assert_round_trip(out / "training.json", ToyTraining)
    assert data["config"]["layers"] == 2 and data["control"]["config"]["layers"] == 1
    assert "phase_change" in data and "1-layer control" in stdout
    assert check_report(out / "training.html") == 2
    assert render_in_chromium(out / "training.html", tmp_path) == {"images": 2, "broken": []}


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--layers", "3"], "--layers must be 1 or 2, got 3"),
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--data", "text", "--text", "/no/such.txt"], "text file not found"),
        (["--data", "images"], "--data must be synthetic or text"),
    ],
)
def test_train_toy_bad_input(capsys, tmp_path, args, fragment):
    code, _, err = run_main(capsys, "lm", "train-toy", "--out", str(tmp_path / "o"), *args)
    assert_one_line_error(code, err, fragment)


def test_train_toy_empty_text(capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("\n")
    code, _, err = run_main(
        capsys, "lm", "train-toy", "--data", "text", "--text", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o")
    )
    assert_one_line_error(code, err, "the text file is empty")


def test_lm_heads_reads_a_train_toy_run(capsys, tmp_path):
    """lm heads refused a train-toy run ('not a Hugging Face model directory') although train-toy is where a student
    watches induction heads form; it now reads the run with its characters as the tokenizer."""
    from mechscope.lm.pipelines.toy import train_toy_run
    from mechscope.lm.toy import ToyConfig

    text = tmp_path / "text.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 40)
    toy = tmp_path / "toy"
    train_toy_run(ToyConfig(layers=2, data="text", steps=5, d_model=32, n_heads=2, n_ctx=32, batch=8, checkpoints=2,
                            min_span=4, warmup=1), toy, text, control=False, progress=False)  # fmt: skip
    out = tmp_path / "heads"
    code, stdout, err = run_main(capsys, "lm", "heads", "--model", str(toy), "--n", "10", "--batch", "4", "--text",
                                 str(text), "--no-ablation", "--out", str(out))  # fmt: skip
    assert code == 0, err
    r = assert_round_trip(out / "heads.json", HeadsResult)
    text_scores = np.asarray(r["scores"]["previous_token_text"], dtype=float)
    assert text_scores.shape == (2, 2) and np.isfinite(text_scores).all()  # the text read through its characters
    # one loader for every lm command: the options a toy run has no use for are refused, not ignored (lm circuits
    # and neurons ignored them)
    for command in (["heads"], ["circuits"], ["neurons"], ["discover"], ["sae", "harvest", "--hook",
                                                                         "blocks.0.hook_resid_post"]):
        code, _, err = run_main(capsys, "lm", *command, "--model", str(toy), "--revision", "step1", "--out",
                                str(tmp_path / f"rev-{command[0]}"))  # fmt: skip
        assert_one_line_error(code, err, "--revision and --device-map read a hub id or a model folder")
