"""Every input format corrupted at random and read by the real loaders.

A loader either returns or raises :class:`MechscopeError` with one line that names the file; any other
exception (a traceback at the command line) fails the test, and Hypothesis shrinks it to the smallest
corruption that shows it. What a loader returns is not judged here (a corrupted byte often leaves a valid
file of other content); the format's own tests check what valid files give. ``HYPOTHESIS_PROFILE=campaign``
(``make test-fuzz``) runs 10,000 examples per format.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from mechscope.core.errors import MechscopeError
from tests.fuzz import builders as B
from tests.fuzz import mutations as M
from tests.fuzz.conftest import copy_input

COUNTS: dict[str, int] = {}  # examples run per format (printed by the campaign)


def check(fn, *names: str) -> str:
    """Run ``fn``; 'ok', or 'error' for a one-line MechscopeError naming one of ``names``."""
    try:
        fn()
    except MechscopeError as e:
        text = str(e)
        assert text.strip(), "an empty error message"
        assert "\n" not in text.strip(), f"a multi-line error: {text!r}"
        assert any(n in text for n in names), f"the error does not name the file ({names}): {text}"
        return "error"
    return "ok"


class Scratch:
    """A fresh temporary directory per example (Hypothesis reuses function-scoped fixtures)."""

    def __enter__(self) -> Path:
        self.path = Path(tempfile.mkdtemp(prefix="mechscope-fuzz-"))
        return self.path

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def count(fmt: str) -> None:
    """Count an example; with FUZZ_PROGRESS=DIR the count so far goes to DIR/FORMAT.count every 25 examples."""
    COUNTS[fmt] = COUNTS.get(fmt, 0) + 1
    progress = os.environ.get("FUZZ_PROGRESS")
    if progress and COUNTS[fmt] % 25 == 0:
        Path(progress, f"{fmt}.count").write_text(f"{COUNTS[fmt]}\n")


# ---- IDX ------------------------------------------------------------------------------------------


@given(data=st.data())
def test_idx(pristine, data):
    from mechscope.cnn.data.images import load_idx_folder

    count("idx")
    gz = data.draw(st.booleans(), label="gzip")
    with Scratch() as tmp:
        folder = copy_input(pristine["idx_gz" if gz else "idx"], tmp)
        victim = data.draw(st.sampled_from(sorted(folder.iterdir())), label="file")
        raw = victim.read_bytes()
        import gzip

        plain = gzip.decompress(raw) if gz else raw
        bad = data.draw(M.corrupt_idx(plain), label="idx bytes")
        if gz and data.draw(st.booleans(), label="corrupt the gzip itself"):
            victim.write_bytes(data.draw(M.corrupt_bytes(raw)))
        else:
            victim.write_bytes(gzip.compress(bad, mtime=0) if gz else bad)
        if data.draw(st.booleans(), label="a directory in its place"):
            victim.unlink()
            victim.mkdir()
        check(lambda: load_idx_folder(folder), folder.name)


# ---- .npz and class names ------------------------------------------------------------------------


@given(data=st.data())
def test_npz(pristine, data):
    from mechscope.cnn.data.images import load_npz

    count("npz")
    with Scratch() as tmp:
        path = tmp / "data.npz"
        if data.draw(st.booleans(), label="arrays, not bytes"):
            np.savez(path, **data.draw(M.corrupt_arrays()))
        else:
            path.write_bytes(data.draw(M.corrupt_bytes(pristine["npz"].read_bytes())))
        check(lambda: load_npz(path), path.name)


@given(data=st.data())
def test_class_names(pristine, data):
    from mechscope.cnn.data.images import load_npz, read_class_names

    count("class_names")
    with Scratch() as tmp:
        path = tmp / "classes.txt"
        raw = pristine["class_names"].read_bytes()
        lines = st.lists(st.text(max_size=6), max_size=6).map(lambda x: "\n".join(x).encode())
        bad = data.draw(st.one_of(M.corrupt_bytes(raw), st.binary(max_size=40), lines))
        path.write_bytes(bad)
        check(lambda: load_npz(pristine["npz"], read_class_names(path)), path.name, "data.npz")


# ---- run directories ------------------------------------------------------------------------------


@given(data=st.data())
def test_run_dir(pristine, data):
    from mechscope.cnn.runs import load_run, load_run_data

    count("run")
    with Scratch() as tmp:
        run = copy_input(pristine["run"], tmp)
        victim = data.draw(st.sampled_from(["config.json", "config.json", "metrics.json", "model.safetensors"]))
        path = run / victim
        if victim.endswith(".json"):
            path.write_bytes(data.draw(M.corrupt_json_bytes(json.loads(path.read_text()))))
        else:
            path.write_bytes(data.draw(M.corrupt_safetensors(path.read_bytes())))
        if data.draw(st.integers(0, 9), label="remove it") == 0:
            path.unlink()

        def load():
            loaded = load_run(run)
            load_run_data(loaded)

        check(load, run.name, "data.npz")


# ---- Hugging Face directories ---------------------------------------------------------------------


@given(data=st.data())
def test_hf_dir(pristine, data):
    from mechscope.lm.models.loading import load_model

    count("hf")
    with Scratch() as tmp:
        kind = data.draw(st.sampled_from(["hf", "hf", "hf_json", "hf_shards"]), label="directory")
        model = copy_input(pristine[kind], tmp)
        files = sorted(p.name for p in model.iterdir())
        victim = data.draw(st.sampled_from(["config.json", "config.json", *files]), label="file")
        path = model / victim
        raw = path.read_bytes()
        if victim.endswith(".safetensors"):
            path.write_bytes(data.draw(M.corrupt_safetensors(raw)))
        elif victim.endswith(".json") and victim != "tokenizer.json":
            path.write_bytes(data.draw(M.corrupt_json_bytes(json.loads(raw))))
        else:
            path.write_bytes(data.draw(M.corrupt_bytes(raw)))
        if victim == "config.json" and data.draw(st.integers(0, 3)) == 0:  # more layers in the weights than said
            config = B.gpt2_config() | {"n_layer": data.draw(st.sampled_from([0, 2, 3]))}
            path.write_text(json.dumps(config))

        def load():
            m, tok = load_model(model, device="cpu")
            if tok is not None:
                tok.decode(tok.encode("the cat"))

        check(load, model.name)


# ---- GGUF -----------------------------------------------------------------------------------------


@given(data=st.data())
def test_gguf(pristine, data):
    from mechscope.lm.models.loading import load_model

    count("gguf")
    with Scratch() as tmp:
        path = tmp / "tiny.gguf"
        if data.draw(st.booleans(), label="structured"):
            parts = data.draw(M.corrupt_gguf_parts(*B.gguf_parts()))
            try:
                raw = B.gguf_bytes(parts["meta"], parts["tensors"], parts["version"], parts["alignment"])
            except (struct.error, OverflowError, ValueError):  # a value the writer cannot pack: no such file
                return
        else:
            raw = data.draw(M.corrupt_bytes(pristine["gguf"].read_bytes()))
        path.write_bytes(raw)

        def load():
            m, tok = load_model(path, device="cpu")
            tok.decode(tok.encode("the cat"))

        check(load, path.name)


# ---- text files -----------------------------------------------------------------------------------


@given(data=st.data())
def test_text(pristine, data):
    from mechscope.lm.pipelines.neurons import read_text
    from mechscope.lm.toy import Data, ToyConfig

    count("text")
    with Scratch() as tmp:
        path = tmp / "text.txt"
        raw = pristine["text"].read_bytes()
        path.write_bytes(data.draw(st.one_of(M.corrupt_bytes(raw), st.binary(max_size=64),
                                             st.text(max_size=300).map(str.encode))))  # fmt: skip

        def load():
            text, _ = read_text(path)
            Data(ToyConfig(**B.TOY, layers=1, data="text", steps=1), text)

        check(load, path.name, "the text")
