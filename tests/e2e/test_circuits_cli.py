"""`mechscope lm circuits`: real GPT-2 small attention weights (partial), a random GPT-2, a toy run; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mechscope.lm.methods.circuits import CircuitsResult
from tests.e2e.reports import check_report, render_in_chromium
from tests.e2e.test_cli import assert_one_line_error, run_main
from tests.e2e.test_lm_cli import gpt2_dir  # noqa: F401  (fixture)
from tests.records import assert_round_trip

PARTIAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "gpt2-small-partial"


@pytest.fixture(scope="module")
def partial():
    if not (PARTIAL / "model.safetensors").is_file():
        pytest.skip(f"{PARTIAL} not found")
    return PARTIAL


def test_circuits_on_partial_gpt2_small(capsys, partial, tmp_path):
    out = tmp_path / "c"
    code, stdout, err = run_main(capsys, "lm", "circuits", "--model", str(partial), "--out", str(out))
    assert code == 0, err
    assert "strongest K-composition" in stdout and "not available: ov copying (needs the token embedding)" in stdout
    data = assert_round_trip(out / "circuits.json", CircuitsResult)
    assert data["composition"]["baseline"]["mean"] == pytest.approx(768**-0.5, abs=0.002)
    assert len(data["positional_qk"]["previous_position_mass"]) == 12  # every head's positional pattern
    assert "direct_logit_attribution" in data["unavailable"] and data["induction_circuit"] is None
    n = check_report(out / "report.html")
    assert n == 5  # Q, K, V composition; previous-position map; every head's positional pattern
    assert render_in_chromium(out / "report.html", tmp_path) == {"images": n, "broken": []}
    # a forward pass on the partial checkpoint: one line
    args = ["lm", "circuits", "--model", str(partial), "--prompt", "hi", "--out", str(tmp_path / "p")]
    code, _, err = run_main(capsys, *args)
    assert_one_line_error(code, err, "--prompt needs a forward pass", "partial checkpoint", "leave --prompt out")
    code, _, err = run_main(capsys, "lm", "heads", "--model", str(partial), "--out", str(tmp_path / "h"))
    assert_one_line_error(code, err, "partial checkpoint", "lm circuits")


def test_circuits_on_a_random_gpt2(capsys, gpt2_dir, tmp_path):  # noqa: F811
    out = tmp_path / "c"
    code, stdout, err = run_main(
        capsys, "lm", "circuits", "--model", str(gpt2_dir), "--head", "1.0", "--prompt", "one two one two", "--out",
        str(out),
    )
    assert code == 0, err
    data = assert_round_trip(out / "circuits.json", CircuitsResult)
    dla = data["direct_logit_attribution"]
    assert dla["sum_of_shares"] == pytest.approx(dla["centred_logit"], abs=1e-3)
    assert data["heads"] == ["1.0"] and data["ov_copying"]["heads"][0]["head"] == "1.0"
    assert data["induction_circuit"] is not None and "induction circuit (path patching)" in stdout
    assert len(data["logit_lens"]["top"]) == 3  # embeddings + 2 layers
    n = check_report(out / "report.html")
    assert render_in_chromium(out / "report.html", tmp_path) == {"images": n, "broken": []}


def test_circuits_on_a_one_layer_toy_run(capsys, tmp_path, monkeypatch):
    import mechscope.lm.toy as toy

    original = toy.ToyConfig

    def tiny(**kw):
        return original(**{**dict(d_model=32, n_heads=2, n_ctx=32, vocab=16, batch=8, checkpoints=3, min_span=4), **kw})

    monkeypatch.setattr(toy, "ToyConfig", tiny)
    run = tmp_path / "toy"
    code, _, err = run_main(capsys, "lm", "train-toy", "--layers", "1", "--steps", "6", "--out", str(run))
    assert code == 0, err
    out = tmp_path / "c"
    code, stdout, err = run_main(capsys, "lm", "circuits", "--model", str(run), "--out", str(out))
    assert code == 0, err
    assert "K-composition: no pair of heads to score (one layer" in stdout  # it printed an empty list
    assert "No pair of heads to score:</b> every head is in the one layer" in (out / "report.html").read_text()
    data = assert_round_trip(out / "circuits.json", CircuitsResult)
    assert len(data["bigrams"]["top"]) == 20
    assert [h["head"] for h in data["skip_trigrams"]["heads"]] == ["0.0", "0.1"]
    assert "one-layer model" in data["unavailable"]["induction_circuit"]
    check_report(out / "report.html")
    # one checkpoint of the run
    ckpt = sorted((run / "checkpoints").glob("step_*.safetensors"))[0]
    code, _, err = run_main(capsys, "lm", "circuits", "--model", str(ckpt), "--out", str(tmp_path / "c0"))
    assert code == 0, err
    # a toy's --device and --dtype are checked and used as any model's (they were silently ignored)
    for extra, said in ((["--dtype", "int8"], "unsupported dtype 'int8'"), (["--device", "tpu"], "unknown device")):
        code, _, err = run_main(capsys, "lm", "circuits", "--model", str(run), *extra, "--out", str(tmp_path / "x"))
        assert_one_line_error(code, err, said)
    code, _, err = run_main(capsys, "lm", "circuits", "--model", str(run), "--dtype", "bfloat16", "--out",
                            str(tmp_path / "bf"))  # fmt: skip
    assert code == 0, err
    assert next(toy.load_toy(run, dtype="bfloat16")[0].parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--head", "2.0"], "head 2.0 out of range: layers 0..1, heads 0..1"),
        (["--head", "x"], "expected a head as LAYER.HEAD"),
        (["--prompt", "word " * 40], "longer than the context of 32"),
        (["--device-map", "balanced"], "--device-map takes 'auto'"),
    ],
)
def test_circuits_bad_input(capsys, gpt2_dir, tmp_path, args, fragment):  # noqa: F811
    code, _, err = run_main(capsys, "lm", "circuits", "--model", str(gpt2_dir), "--out", str(tmp_path / "o"), *args)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "o").exists()


def test_circuits_on_a_model_whose_context_is_short(capsys, tmp_path):
    # valid input that once crashed: the positional grid assumed a context of at least 24 positions
    from tests.fuzz import builders as B

    model = B.write_hf_dir(tmp_path / "hf")  # GPT-2 family, a context of 16 positions
    code, stdout, err = run_main(capsys, "lm", "circuits", "--model", str(model), "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert_round_trip(tmp_path / "o" / "circuits.json", CircuitsResult)


def test_circuits_and_heads_on_a_tracr_model(capsys, tmp_path):
    """tracr's outputs are classes of their own (d_vocab_out), so the readings that set input tokens against outputs
    are marked not available, not multiplied across two vocabularies (they raised a shape error); lm heads, whose
    loss is a next-token loss, refuses the model in one line."""
    import os

    reverse = Path(os.environ.get("MECHSCOPE_DATA", "../shared/data")) / "tracr" / "reverse"
    if not (reverse / "config.json").is_file():
        pytest.skip(f"tracr's reverse not found at {reverse}")
    out = tmp_path / "c"
    code, stdout, err = run_main(capsys, "lm", "circuits", "--model", str(reverse), "--out", str(out))
    assert code == 0, err
    d = json.loads((out / "circuits.json").read_text())
    gone = d["unavailable"]
    for key in ("ov_eigen_positivity", "ov_copying", "qk_token_pairs", "bigrams", "skip_trigrams", "induction_circuit"):
        assert "classes of their own" in gone[key], key
    assert d["composition"] and "not available: induction circuit" in stdout
    code, _, err = run_main(capsys, "lm", "heads", "--model", str(reverse), "--out", str(tmp_path / "h"))
    assert_one_line_error(code, err, "classes of their own, not next tokens")
    assert not (tmp_path / "h").exists()


def test_a_head_given_twice_is_refused_before_the_model_is_read(capsys, tmp_path):
    for cmd, flag in (("circuits", "--head"), ("heads", "--show")):
        out = tmp_path / cmd
        code, _, err = run_main(capsys, "lm", cmd, "--model", str(tmp_path / "none"), flag, "1.0", flag, "0.1",
                                flag, "1.0", "--out", str(out))  # fmt: skip
        assert_one_line_error(code, err, f"{flag} given more than once for head 1.0")
        assert not out.exists()
