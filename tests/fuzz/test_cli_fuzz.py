"""Corrupted inputs through the command line, in-process (``mechscope.cli.main``).

Each example copies a pristine input into a fresh directory, corrupts it, changes into that
directory and runs a command on it. The command either works (exit 0) or ends with exit 2 and
exactly one ``mechscope: error:`` line, the last thing on stderr; never a traceback; and nothing is
left outside the directory or half-written inside it (no output directory after an error, no
temporary directories either way).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz import builders as B
from tests.fuzz import mutations as M
from tests.fuzz.conftest import cli_examples, copy_input

N = cli_examples()
TRAIN = ["--max-steps", "1", "--epochs", "1", "--batch-size", "16", "--shift", "0", "--no-malloc-tuning", *B.TINY_CNN]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    from mechscope.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean(code: int, out: str, err: str, work: Path, inputs: set[str], target: str | None = None) -> None:
    assert "Traceback" not in err and "Traceback" not in out, err[-2000:]
    assert code in (0, 2), f"exit {code}: {err[-1000:]}"
    errors = [line for line in err.splitlines() if "mechscope: error:" in line]
    if code == 2:
        assert len(errors) == 1, err[-2000:]
        assert err.rstrip().splitlines()[-1].startswith("mechscope: error: "), err[-1000:]
    else:
        assert not errors, err
    made = {p.name for p in work.iterdir()} - inputs
    allowed = {target} if (target and code == 0) else set()
    assert made <= allowed, f"written outside the output or left after an error: {sorted(made - allowed)}"
    leftovers = [str(p) for p in work.rglob("*") if ".mechscope-tmp-" in p.name]
    assert not leftovers, leftovers


class InScratch:
    """A fresh directory per example, the working directory while the command runs."""

    def __enter__(self) -> Path:
        self.old = os.getcwd()
        self.path = Path(tempfile.mkdtemp(prefix="mechscope-clifuzz-"))
        os.chdir(self.path)
        return self.path

    def __exit__(self, *exc) -> None:
        os.chdir(self.old)
        shutil.rmtree(self.path, ignore_errors=True)


@settings(max_examples=N)
@given(data=st.data())
def test_cli_idx(pristine, capsys, data):
    with InScratch() as work:
        folder = copy_input(pristine["idx"], work)
        victim = data.draw(st.sampled_from(sorted(folder.iterdir())), label="file")
        victim.write_bytes(data.draw(M.corrupt_idx(victim.read_bytes())))
        args = ["cnn", "train", "--dataset", "idx", "--data-dir", folder, "--out", "o", *TRAIN]
        code, out, err = run_cli(args, capsys)
        assert_clean(code, out, err, work, {folder.name}, "o")


@settings(max_examples=N)
@given(data=st.data())
def test_cli_npz(pristine, capsys, data):
    with InScratch() as work:
        path = work / "data.npz"
        if data.draw(st.booleans(), label="arrays"):
            np.savez(path, **data.draw(M.corrupt_arrays()))
        else:
            path.write_bytes(data.draw(M.corrupt_bytes(pristine["npz"].read_bytes())))
        code, out, err = run_cli(["cnn", "train", "--dataset", path, "--out", "o", *TRAIN], capsys)
        assert_clean(code, out, err, work, {path.name}, "o")


@settings(max_examples=N)
@given(data=st.data())
def test_cli_run_dir(pristine, capsys, data):
    with InScratch() as work:
        run = copy_input(pristine["run"], work)
        victim = run / data.draw(st.sampled_from(["config.json", "metrics.json", "model.safetensors"]))
        if victim.suffix == ".json":
            victim.write_bytes(data.draw(M.corrupt_json_bytes(json.loads(victim.read_text()))))
        else:
            victim.write_bytes(data.draw(M.corrupt_safetensors(victim.read_bytes())))
        code, out, err = run_cli(["cnn", "evaluate", "--run", run], capsys)
        assert_clean(code, out, err, work, {run.name})


@settings(max_examples=N)
@given(data=st.data())
def test_cli_hf_dir(pristine, capsys, data):
    with InScratch() as work:
        model = copy_input(pristine[data.draw(st.sampled_from(["hf", "hf_json", "hf_shards"]))], work)
        victim = model / data.draw(st.sampled_from(sorted(p.name for p in model.iterdir())), label="file")
        raw = victim.read_bytes()
        if victim.suffix == ".safetensors":
            victim.write_bytes(data.draw(M.corrupt_safetensors(raw)))
        elif victim.suffix == ".json" and victim.name != "tokenizer.json":
            victim.write_bytes(data.draw(M.corrupt_json_bytes(json.loads(raw))))
        else:
            victim.write_bytes(data.draw(M.corrupt_bytes(raw)))
        args = ["lm", "generate", "--model", model, "--prompt", "the cat", "--max-new-tokens", "2", "--device", "cpu"]
        code, out, err = run_cli(args, capsys)
        assert_clean(code, out, err, work, {model.name})


@settings(max_examples=N)
@given(data=st.data())
def test_cli_gguf(pristine, capsys, data):
    with InScratch() as work:
        path = work / "tiny.gguf"
        if data.draw(st.booleans(), label="structured"):
            parts = data.draw(M.corrupt_gguf_parts(*B.gguf_parts()))
            try:
                raw = B.gguf_bytes(parts["meta"], parts["tensors"], parts["version"], parts["alignment"])
            except (OverflowError, ValueError, Exception):  # a value the writer cannot pack
                return
        else:
            raw = data.draw(M.corrupt_bytes(pristine["gguf"].read_bytes()))
        path.write_bytes(raw)
        args = ["lm", "generate", "--model", path, "--prompt", "the cat", "--max-new-tokens", "2", "--device", "cpu"]
        code, out, err = run_cli(args, capsys)
        assert_clean(code, out, err, work, {path.name})


@settings(max_examples=max(3, N // 3))
@given(data=st.data())
def test_cli_text(pristine, capsys, data):
    with InScratch() as work:
        path = work / "text.txt"
        raw = pristine["text"].read_bytes()
        path.write_bytes(data.draw(st.one_of(M.corrupt_bytes(raw), st.binary(max_size=64))))
        args = ["lm", "heads", "--model", pristine["hf"], "--text", path, "--n", "4", "--batch", "2",
                "--no-ablation", "--out", "o", "--device", "cpu"]  # fmt: skip
        code, out, err = run_cli(args, capsys)
        assert_clean(code, out, err, work, {path.name}, "o")


# ---- the commands added since the fuzzing was written: each fed a corrupted input ----------------------


def _corrupt_run(run: Path, data) -> None:
    victim = run / data.draw(st.sampled_from(["config.json", "metrics.json", "model.safetensors"]), label="file")
    if victim.suffix == ".json":
        victim.write_bytes(data.draw(M.corrupt_json_bytes(json.loads(victim.read_text()))))
    else:
        victim.write_bytes(data.draw(M.corrupt_safetensors(victim.read_bytes())))


@settings(max_examples=max(3, N // 2))
@given(data=st.data())
def test_cli_tuning_blocks_universality(pristine, capsys, data):
    with InScratch() as work:
        run = copy_input(pristine["run"], work)
        _corrupt_run(run, data)
        command = data.draw(st.sampled_from(["tuning", "blocks", "universality"]), label="command")
        args = {
            "tuning": ["cnn", "tuning", "--run", run, "--out", "o"],
            "blocks": ["cnn", "blocks", "--run", run, "--steps", "2", "--out", "o"],
            "universality": ["cnn", "universality", "--runs", run, "--runs", pristine["run"], "--vis-steps", "2",
                             "--out", "o"],
        }[command]  # fmt: skip
        code, out, err = run_cli(args, capsys)
        assert_clean(code, out, err, work, {run.name}, "o")


@settings(max_examples=max(3, N // 2))
@given(data=st.data())
def test_cli_circuits_hf_dir(pristine, capsys, data):
    with InScratch() as work:
        model = copy_input(pristine["hf"], work)
        victim = model / data.draw(st.sampled_from(sorted(p.name for p in model.iterdir())), label="file")
        raw = victim.read_bytes()
        if victim.suffix == ".safetensors":
            victim.write_bytes(data.draw(M.corrupt_safetensors(raw)))
        elif victim.suffix == ".json":
            victim.write_bytes(data.draw(M.corrupt_json_bytes(json.loads(raw))))
        else:
            victim.write_bytes(data.draw(M.corrupt_bytes(raw)))
        code, out, err = run_cli(["lm", "circuits", "--model", model, "--out", "o", "--device", "cpu"], capsys)
        assert_clean(code, out, err, work, {model.name}, "o")


@settings(max_examples=max(3, N // 2))
@given(data=st.data())
def test_cli_text_commands(pristine, capsys, data):
    with InScratch() as work:
        path = work / "text.txt"
        raw = pristine["text"].read_bytes()
        path.write_bytes(data.draw(st.one_of(M.corrupt_bytes(raw), st.binary(max_size=64), st.just(b"a" * 400))))
        command = data.draw(st.sampled_from(["train-toy", "neurons", "solu-compare"]), label="command")
        args = {
            "train-toy": ["lm", "train-toy", "--data", "text", "--text", path, "--steps", "2", "--layers", "1",
                          "--mlp", "gelu", "--d-mlp", "8", "--no-control", "--out", "o"],
            "neurons": ["lm", "neurons", "--model", pristine["hf"], "--text", path, "--k", "2", "--sequences", "2",
                        "--length", "8", "--out", "o", "--device", "cpu"],
            "solu-compare": ["lm", "solu-compare", "--text", path, "--steps", "2", "--d-model", "16", "--d-mlp", "16",
                             "--n-ctx", "16", "--batch", "4", "--k", "5", "--out", "o"],
        }[command]  # fmt: skip
        code, out, err = run_cli(args, capsys)
        assert_clean(code, out, err, work, {path.name}, "o")
