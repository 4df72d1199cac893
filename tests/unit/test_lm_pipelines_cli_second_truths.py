"""Second pass over the language pipelines' glue (lm heads, circuits, neurons, discover) and the lm CLI's helpers.

Outside truths: token strings parsed by hand; GPT-2's own tokenizer (``transformers``' GPT2TokenizerFast) and config
(``bos_token_id`` 50256); a greedy loop over ``transformers``' GPT2LMHeadModel; the documented rules (the windows a
text leaves, a prompt the context holds, runs/COMMAND/MODEL), each command's declared ``--help`` defaults, and the
``work`` rows the pipelines' comments define, computed by hand from the protocol.
"""

from __future__ import annotations

import json

import pytest
import torch

from mechscope.core.errors import MechscopeError
from tests.e2e.test_cli import run_main
from tests.e2e.test_cli_options_truths import Called, _declared_default, record
from tests.e2e.test_lm_cli import gpt2_dir  # noqa: F401  (fixture)
from tests.e2e.test_lm_pipelines_truths import is_window, spy
from tests.e2e.test_neurons_cli import TEXT, text_file  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def gpt2_tok(path):
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast(str(path / "vocab.json"), str(path / "merges.txt"))


@pytest.fixture(scope="module")
def bare_dir(gpt2_dir, tmp_path_factory):  # noqa: F811
    """The tiny GPT-2 without its tokenizer files: a model of token ids only."""
    bare = tmp_path_factory.mktemp("bare")
    for f in gpt2_dir.iterdir():
        if f.name not in ("vocab.json", "merges.txt"):
            (bare / f.name).write_bytes(f.read_bytes())
    return bare


def default_folder(command: str, model):
    """The docs' runs/COMMAND/MODEL: a local model's path without its leading /, its folders joined by _."""
    from pathlib import Path

    return Path("runs", command, "_".join(model.parts[1:]))


# ---- lm cli helpers


def test_parse_tokens_reads_ids_by_hand():
    """Outside truth: "0,2,3" is [0, 2, 3] (0 is a vocabulary index), spaces alone separate too; 2**63 - 1 is the
    last id taken; a negative id, 2**63, an empty item and a word are refused."""
    from mechscope.lm.cli.common import parse_tokens

    assert parse_tokens("0,2,3") == [0, 2, 3]
    assert parse_tokens("7 0 5") == [7, 0, 5]
    assert parse_tokens(str(2**63 - 1)) == [2**63 - 1]
    for bad in ("-1,2", str(2**63), "1,,3", "a,b"):
        with pytest.raises(MechscopeError, match="--tokens"):
            parse_tokens(bad)


def test_parse_heads_refuses_a_head_twice_and_keeps_the_order():
    """Outside truth: the heads written "1.0", "0.1" are (1, 0), (0, 1) in that order; "1.0" twice is refused."""
    from mechscope.lm.cli.common import parse_heads

    assert parse_heads(["1.0", "0.1"], "--head") == [(1, 0), (0, 1)]
    with pytest.raises(MechscopeError, match="--head given more than once for head 1.0"):
        parse_heads(["1.0", "0.1", "1.0"], "--head")
    with pytest.raises(MechscopeError, match=r"expected a head as LAYER.HEAD \(for example 5.1\), got 'x'"):
        parse_heads(["x"], "--head")


def hf_greedy(path, ids: list[int], n: int) -> list[int]:
    """A plain greedy loop over ``transformers``' own GPT2LMHeadModel."""
    import transformers

    model = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


def test_generate_prints_ids_of_the_greedy_loop_up_to_the_context(capsys, bare_dir):
    """Outside truths: a greedy loop over transformers' GPT2LMHeadModel; the context of 32 (GPT2Config n_positions)
    holds 30 + 2 tokens, not 30 + 3; no tokenizer: the ids printed separated by spaces."""
    prompt = [(7 * i + 3) % 500 for i in range(30)]
    code, out, err = run_main(capsys, "lm", "generate", "--model", str(bare_dir), "--tokens",
                              ",".join(map(str, prompt)), "--max-new-tokens", "2")  # fmt: skip
    assert code == 0, err
    assert out.strip() == " ".join(map(str, hf_greedy(bare_dir, prompt, 2)))
    code, _, err = run_main(capsys, "lm", "generate", "--model", str(bare_dir), "--tokens",
                            ",".join(map(str, prompt)), "--max-new-tokens", "3")  # fmt: skip
    assert code == 2 and err.strip().splitlines()[-1].startswith("mechscope: error: --max-new-tokens 3: ")
    assert "exceed the model's context of 32 tokens" in err and "Traceback" not in err


def test_generate_adds_nothing_with_zero_and_twenty_by_default(capsys, bare_dir):
    """Outside truths: --max-new-tokens 0 echoes the ids (0 is allowed: "0 or more"); the declared default of the
    option (--help) is the number of ids added without it."""
    code, out, err = run_main(capsys, "lm", "generate", "--model", str(bare_dir), "--tokens", "5,0,9",
                              "--max-new-tokens", "0")  # fmt: skip
    assert (code, out.strip()) == (0, "5 0 9"), err
    default = _declared_default("lm generate", "--max-new-tokens")
    assert default == 20
    code, out, err = run_main(capsys, "lm", "generate", "--model", str(bare_dir), "--tokens", "5,0,9")
    assert code == 0, err
    assert out.split() == [str(i) for i in hf_greedy(bare_dir, [5, 0, 9], default)]


# ---- lm heads


def tokens_of(path, count: int) -> str:
    """A text that GPT-2's tokenizer reads as exactly ``count`` tokens ("a" and then " a"s)."""
    text = "a" + " a" * (count - 1)
    assert len(gpt2_tok(path).encode(text)) == count
    return text


def test_heads_text_needs_one_token_more_than_its_window(monkeypatch, gpt2_dir, tmp_path):  # noqa: F811
    """Outside truth: a window of L tokens drawn from a text needs L + 1 of them (one line when there are L); with
    L + 1 every window starts at the text's first token."""
    from mechscope.lm.methods.heads import HeadProtocol
    from mechscope.lm.pipelines.heads import induction_heads

    protocol = HeadProtocol(n=6, batch=2, text_batch=3, text_len=10)
    short = tmp_path / "short.txt"
    short.write_text(tokens_of(gpt2_dir, 10))
    with pytest.raises(MechscopeError, match="10 tokens, too short for windows of 10"):
        induction_heads(str(gpt2_dir), tmp_path / "h1", protocol, short)
    enough = tmp_path / "enough.txt"
    enough.write_text(tokens_of(gpt2_dir, 11))
    seen = record(monkeypatch, "mechscope.lm.pipelines.heads:find_induction_heads")
    with pytest.raises(Called):
        induction_heads(str(gpt2_dir), tmp_path / "h2", protocol, enough)
    ids = gpt2_tok(gpt2_dir).encode(enough.read_text())
    assert seen["text_tokens"].tolist() == [ids[:10]] * 3


def test_heads_reads_tinyshakespeare_by_default(monkeypatch, gpt2_dir, tmp_path):  # noqa: F811
    """Outside truth: the docs' default text, tinyshakespeare/input.txt under $MECHSCOPE_DATA: each window is a run of
    GPT-2's encoding of it (a plain search)."""
    from mechscope.core.paths import resolve_data_dir
    from mechscope.lm.methods.heads import HeadProtocol
    from mechscope.lm.pipelines.heads import induction_heads

    path = resolve_data_dir() / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    seen = record(monkeypatch, "mechscope.lm.pipelines.heads:find_induction_heads")
    with pytest.raises(Called):
        induction_heads(str(gpt2_dir), tmp_path / "h", HeadProtocol(n=6, batch=2, text_batch=2, text_len=12))
    windows = seen["text_tokens"]
    assert windows is not None and tuple(windows.shape) == (2, 12)
    ids = gpt2_tok(gpt2_dir).encode(path.read_text()[:300_000])
    assert all(is_window(w, ids) for w in windows)


def test_heads_refuses_a_text_for_a_model_without_tokenizer(bare_dir, tmp_path, text_file):  # noqa: F811
    """Outside truth: a model of token ids only cannot encode --text: one line, not a silent skip of the text."""
    from mechscope.lm.methods.heads import HeadProtocol
    from mechscope.lm.pipelines.heads import induction_heads

    with pytest.raises(MechscopeError, match="--text needs a tokenizer"):
        induction_heads(str(bare_dir), tmp_path / "h", HeadProtocol(n=6, batch=2), text_file)


def test_heads_json_work_and_default_folder(monkeypatch, gpt2_dir, tmp_path):  # noqa: F811
    """Outside truths: the default folder runs/heads/MODEL (a local path without its leading /); work counted in
    passes over the protocol's batch of BOS + 2n tokens: 3 x (1 + 2 x 5) = 33 rows, by hand."""
    from mechscope.lm.methods.heads import HeadProtocol
    from mechscope.lm.pipelines.heads import induction_heads

    monkeypatch.chdir(tmp_path)
    out, _ = induction_heads(str(gpt2_dir), None, HeadProtocol(n=5, batch=3, per_head_ablation=False))
    assert out == default_folder("heads", gpt2_dir)
    work = json.loads((tmp_path / out / "heads.json").read_text())["work"]
    assert work["rows_per_pass"] == 33


# ---- lm circuits


def test_circuits_prompt_may_fill_the_context_but_not_pass_it(monkeypatch, gpt2_dir, tmp_path):  # noqa: F811
    """Outside truth: GPT2Config n_positions=32: a prompt of 32 tokens is read whole, one of 33 refused in one line."""
    from mechscope.lm.pipelines.circuits import circuits

    seen = record(monkeypatch, "mechscope.lm.pipelines.circuits:read_circuits")
    with pytest.raises(Called):
        circuits(str(gpt2_dir), tmp_path / "c1", prompt=tokens_of(gpt2_dir, 32))
    assert len(seen["prompt"]) == 32
    with pytest.raises(MechscopeError, match="the prompt is 33 tokens, longer than the context of 32"):
        circuits(str(gpt2_dir), tmp_path / "c2", prompt=tokens_of(gpt2_dir, 33))


def test_circuits_refuses_a_prompt_without_tokenizer(bare_dir, tmp_path):
    """Outside truth: a model of token ids only has nothing to encode --prompt with: one line."""
    from mechscope.lm.pipelines.circuits import circuits

    with pytest.raises(MechscopeError, match="no tokenizer to encode --prompt with"):
        circuits(str(bare_dir), tmp_path / "c", prompt="the cat")


def test_circuits_default_folder(monkeypatch, gpt2_dir, tmp_path):  # noqa: F811
    """Outside truth: the docs' runs/circuits/MODEL (a local path without its leading /)."""
    from mechscope.lm.pipelines.circuits import circuits

    monkeypatch.chdir(tmp_path)
    seen = record(monkeypatch, "mechscope.lm.pipelines.circuits:check_target")
    with pytest.raises(Called):
        circuits(str(gpt2_dir))
    assert seen["path"] == default_folder("circuits", gpt2_dir)


def test_circuits_refuses_an_empty_prompt_and_a_prompt_for_a_partial_checkpoint(monkeypatch, gpt2_dir, tmp_path):  # noqa: F811
    """Outside truths: "" encodes to no token at all (GPT-2 adds no BOS): one line; a partial checkpoint (the shared
    gpt2-small-partial, lacking weights) cannot run a prompt: one line, not a reading that drops the prompt."""
    from mechscope.core.paths import resolve_data_dir
    from mechscope.lm.pipelines.circuits import circuits

    assert gpt2_tok(gpt2_dir).encode("") == []
    record(monkeypatch, "mechscope.lm.pipelines.circuits:read_circuits")
    with pytest.raises(MechscopeError, match="the prompt is empty"):
        circuits(str(gpt2_dir), tmp_path / "c1", prompt="")
    partial = resolve_data_dir() / "gpt2-small-partial"
    if not (partial / "model.safetensors").is_file():
        pytest.skip(f"{partial} not found")
    with pytest.raises(MechscopeError, match="--prompt needs a forward pass, which a partial checkpoint cannot run"):
        circuits(str(partial), tmp_path / "c2", prompt="the cat")


def test_circuits_json_work_is_in_passes_over_the_induction_batch(gpt2_dir, tmp_path):  # noqa: F811
    """Outside truth: the comment's unit, the induction protocol's batch of BOS + 2n tokens, n shortened to the
    context of 32: n = (32 - 1) // 2 = 15, HeadProtocol's batch 8: 8 x 31 = 248 rows, by hand."""
    from mechscope.lm.pipelines.circuits import circuits

    out, _ = circuits(str(gpt2_dir), tmp_path / "c", heads=[(1, 0)], prompt="the cat sat")
    assert json.loads((out / "circuits.json").read_text())["work"]["rows_per_pass"] == 248


# ---- lm discover


def test_discover_passes_limit_and_uses_the_default_folder(monkeypatch, gpt2_dir, tmp_path):  # noqa: F811
    """Outside truths: make_task's own signature gets the limit asked (a value no other setting has); the default
    folder is runs/discover/MODEL."""
    from mechscope.lm.pipelines.discovery import discover_model

    seen = record(monkeypatch, "mechscope.lm.pipelines.discovery:make_task")
    with pytest.raises(Called):
        discover_model(str(gpt2_dir), tmp_path / "d", n=4, batch=2, limit=3)
    assert seen["settings"]["limit"] == 3
    monkeypatch.chdir(tmp_path)
    target = record(monkeypatch, "mechscope.lm.pipelines.discovery:check_target")
    with pytest.raises(Called):
        discover_model(str(gpt2_dir), n=4, batch=2)
    assert target["path"] == default_folder("discover", gpt2_dir)


def heads_report(gpt2_dir, tmp_path, **change) -> str:  # noqa: F811
    """A heads.json of the tiny GPT-2 with ``change`` written over it by hand."""
    from mechscope.lm.methods.heads import HeadProtocol
    from mechscope.lm.pipelines.heads import induction_heads

    out, _ = induction_heads(
        str(gpt2_dir), tmp_path / f"h{len(change)}", HeadProtocol(n=6, batch=2, per_head_ablation=False)
    )
    path = tmp_path / f"changed{len(change)}.json"
    path.write_text(json.dumps(json.loads((out / "heads.json").read_text()) | change))
    return path


def test_discover_refuses_a_heads_report_with_no_edge_or_other_groups(gpt2_dir, tmp_path):  # noqa: F811
    """Outside truths: a report edited by hand to confirm no edge has nothing to compare; one claiming 2 query heads
    per key/value head is not of this model (GPT-2: one per head)."""
    from mechscope.lm.pipelines.discovery import discover_model

    edge = {"source": "0.1", "target_layer": 1, "kv_head": 0, "query_heads": ["1.0"], "induction_clean": [0.5],
            "induction_patched": [0.1], "drop": [0.4], "drop_std": [0.1], "confirmed": [False]}  # fmt: skip
    none = heads_report(gpt2_dir, tmp_path, edges=[edge])
    with pytest.raises(MechscopeError, match="confirmed no edge to compare with"):
        discover_model(str(gpt2_dir), tmp_path / "d1", compare_heads=none, n=4, batch=2)
    grouped = heads_report(gpt2_dir, tmp_path, edges=[edge | {"confirmed": [True]}], kv_groups=2)
    with pytest.raises(MechscopeError, match="2 query heads per key/value head; this model has 2 × 2 and 1"):
        discover_model(str(gpt2_dir), tmp_path / "d2", compare_heads=grouped, n=4, batch=2)


def test_scrub_default_folder_is_the_file_stem_made_safe():
    """Outside truth: runs/scrub/NAME, NAME the hypothesis file's stem with each run of other characters one _."""
    from mechscope.lm.pipelines.discovery import _name

    assert _name("hyp/my hyp!!") == "my_hyp_"
    assert _name("a/b/c.d-e/") == "c.d-e"


# ---- lm neurons


def test_neuron_settings_bounds():
    """Outside truths: the documented bounds: --k, --sequences at least 1 and at most 100,000 / 1,000,000, --length at
    least 2, --contexts 0 or more."""
    from mechscope.lm.pipelines.neurons import NeuronSettings

    for ok in (dict(k=1), dict(k=100_000), dict(sequences=1), dict(length=2), dict(contexts=0), dict(contexts=1000)):
        NeuronSettings(**ok).validate()
    for bad in (dict(k=0), dict(k=100_001), dict(sequences=0), dict(length=1), dict(contexts=-1),
                dict(contexts=1001), dict(sequences=1_000_001)):  # fmt: skip
        with pytest.raises(MechscopeError, match=f"--{next(iter(bad))}"):
            NeuronSettings(**bad).validate()


def test_neuron_settings_defaults_are_the_help_defaults():
    """Outside truth: each lm neurons option's declared default (its --help)."""
    from mechscope.lm.pipelines.neurons import NeuronSettings

    s = NeuronSettings()
    for flag, field in (("--k", "k"), ("--sequences", "sequences"), ("--contexts", "contexts"), ("--site", "site"),
                        ("--seed", "seed"), ("--length", "length")):  # fmt: skip
        assert getattr(s, field) == _declared_default("lm neurons", flag), flag


def test_neurons_of_gpt2_start_each_window_with_its_bos(monkeypatch, gpt2_dir, text_file, tmp_path):  # noqa: F811
    """Outside truths: GPT2Config's bos_token_id (50256) first in each window, then a run of GPT-2's encoding of the
    text; --length counts the BOS; the default 64 is cut at the context of 32; the BOS is skipped when reading."""
    import transformers

    from mechscope.lm.pipelines.neurons import NeuronSettings, neurons

    bos = transformers.GPT2Config().bos_token_id
    ids = gpt2_tok(gpt2_dir).encode(TEXT)
    for length, width in ((10, 10), (None, 32)):
        seen = record(monkeypatch, "mechscope.lm.methods.neurons:read_neurons")
        with pytest.raises(Called):
            neurons(str(gpt2_dir), tmp_path / "n", text_file, NeuronSettings(sequences=3, k=2, length=length))
        tokens = seen["tokens"]
        assert tuple(tokens.shape) == (3, width) and tokens[:, 0].tolist() == [bos] * 3
        assert all(is_window(w[1:], ids) for w in tokens) and seen["skip_first"] == 1


def test_neurons_refuses_a_neuron_of_a_layer_not_read(gpt2_dir, text_file, tmp_path):  # noqa: F811
    """Outside truth: --layer 0 reads layer 0 only, so --neuron 1.0 (a neuron of layer 1) is refused in one line."""
    from mechscope.lm.pipelines.neurons import NeuronSettings, neurons

    settings = NeuronSettings(layers=(0,), neurons=((1, 0),), sequences=2, k=2)
    with pytest.raises(MechscopeError, match=r"neuron 1.0: layer 1 is not among the MLP layers read \(\[0\]\)"):
        neurons(str(gpt2_dir), tmp_path / "n", text_file, settings)


def test_neurons_work_is_in_passes_over_the_sample(monkeypatch, gpt2_dir, text_file, tmp_path):  # noqa: F811
    """Outside truth: the docstring's unit: passes over the sample's sequences x positions (BOS included), 3 x 10."""
    from mechscope.lm.pipelines.neurons import NeuronSettings, neurons

    seen = spy(monkeypatch, "mechscope.lm.methods.neurons:read_neurons")
    out, result = neurons(str(gpt2_dir), tmp_path / "n", text_file, NeuronSettings(sequences=3, k=2, length=10))
    assert seen["tokens"].numel() == 30
    assert json.loads((out / "neurons.json").read_text())["work"]["rows_per_pass"] == 30


def test_compare_toy_is_plain_text_of_the_mlp_asked():
    """Outside truths: the compared toys differ only in their MLP; plain text (no repeated spans injected); the
    shortest span min(8, half the context): 5 for a context of 10, 8 for 64."""
    from mechscope.lm.pipelines.neurons import CompareSettings

    short, long = CompareSettings(n_ctx=10), CompareSettings()
    gelu, solu = short.toy("gelu"), short.toy("solu")
    assert (gelu.mlp, solu.mlp, gelu.data, gelu.repeat_fraction) == ("gelu", "solu", "text", 0.0)
    assert (gelu.min_span, long.toy("gelu").min_span, gelu.n_ctx, gelu.d_mlp) == (5, 8, 10, 512)
    with pytest.raises(MechscopeError, match="--n-ctx"):
        CompareSettings(n_ctx=1).validate()


@pytest.mark.parametrize("field, flag", [("d_model", "--d-model"), ("d_mlp", "--d-mlp"), ("batch", "--batch"),
                                         ("k", "--k"), ("layers", "--layers"), ("sequences", "sequences")])  # fmt: skip
def test_compare_settings_name_the_option_given_zero(field, flag):
    """Truth: the command's own option names (`lm solu-compare --help`). --d-model 0 was refused as 'd_model must be
    at least 1' (the toy's field), --batch 0 as '--batch, --k and sequences must be...' (sequences is no option)."""
    from mechscope.lm.pipelines.neurons import CompareSettings

    with pytest.raises(MechscopeError, match=f"^{flag} must be at least 1, got 0$"):
        CompareSettings(**{field: 0}).validate()


def test_compare_neuron_ids_read_back_as_the_neurons():
    """Outside truth: compare.json's neuron ids are in --neuron's LAYER.NEURON form: parse_neuron reads each back."""
    from mechscope.lm.cli.neurons import parse_neuron
    from mechscope.lm.pipelines.neurons import _ids

    pairs = [(1, 7), (0, 30), (2, 0)]
    assert [parse_neuron(s) for s in _ids(pairs)] == pairs
