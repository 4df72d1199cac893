"""Tokenizers, GGUF loading and devices against second outside truths: OpenAI's BPE (``encoder.py``) over the real
GPT-2 files pre-split by llama.cpp's own LLAMA3 regex (run with the ``regex`` module, not the ``tokenizers`` library),
transformers' AutoTokenizer on a hand-built tokenizer.json, the ``gguf`` package's reader on a written Llama, the data
README's numbers and the documented device and dtype rules."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
regex = pytest.importorskip("regex")
transformers = pytest.importorskip("transformers")
from transformers.convert_slow_tokenizer import bytes_to_unicode as hf_b2u  # noqa: E402

from mechscope.core.errors import MechscopeError  # noqa: E402
from mechscope.lm.models import devices, loading  # noqa: E402
from mechscope.lm.models.gguf_file import GGUFFile  # noqa: E402
from mechscope.lm.models.loading import _name_list, load_model  # noqa: E402
from mechscope.lm.tokenizer import Tokenizer  # noqa: E402
from tests.unit.test_data_truths import openai_bpe  # noqa: E402
from tests.unit.test_gguf import llama_as_gguf  # noqa: E402
from tests.unit.test_tokenizer import gpt2_files  # noqa: E402, F401  (the fixture: the data folder's GPT-2 files)

# llama.cpp's LLAMA3 split (llama-vocab.cpp), the contractions spelled case by case instead of Meta's (?i:...)
LLAMA3_LLAMA_CPP = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# OpenAI's GPT-2 split (encoder.py)
GPT2_OPENAI = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
TEXTS = [
    "DON'TS, don'ts; I'LLX she'd've",  # Llama 3's contractions, any case, end a piece: 'T + S, not 'TS
    "1234567 and 89, 2024",  # digits in threes for Llama 3, whole for GPT-2
    "$hello (world) #tag @you",  # a symbol joins the word after it in Llama 3
    "a\n\n  b  \r\n\tc   end",
    "naïve café — 12€",
]


@pytest.fixture(scope="module")
def gpt2_bpe(gpt2_files):  # noqa: F811
    encoder = json.loads((gpt2_files / "encoder.json").read_text(encoding="utf-8"))
    lines = (gpt2_files / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    merges = [line for line in lines if line]
    return encoder, merges, {tuple(m.split(" ")): r for r, m in enumerate(merges)}


def gguf_tokenizer_meta(encoder, merges, pre):
    """GPT-2's vocabulary as llama.cpp writes it into a GGUF file: tokens in id order, merges as 'a b' strings."""
    tokens = sorted(encoder, key=encoder.get)
    assert tokens.index("<|endoftext|>") == 50256
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 50256,
            "tokenizer.ggml.eos_token_id": 50256}  # fmt: skip


def reference_ids(text, pattern, encoder, ranks) -> list[int]:
    """Split with ``regex``, spell each piece's bytes with transformers' byte map, merge with OpenAI's BPE."""
    b2u = hf_b2u()
    ids = []
    for piece in regex.findall(pattern, text):
        ids += [encoder[t] for t in openai_bpe("".join(b2u[b] for b in piece.encode("utf-8")), ranks)]
    return ids


@pytest.mark.parametrize("pre, pattern", [("llama-bpe", LLAMA3_LLAMA_CPP), ("gpt-2", GPT2_OPENAI)])
def test_gguf_pre_tokenizer_splits_as_llama_cpp_regex(gpt2_bpe, pre, pattern):
    """Truth: llama.cpp's LLAMA3 regex (or OpenAI's GPT-2 regex) run by the ``regex`` module, then OpenAI's BPE over
    the real vocab.bpe ranks; the GGUF tokenizer built from the same vocabulary must give the same ids."""
    encoder, merges, ranks = gpt2_bpe
    tok = Tokenizer.from_gguf_meta(gguf_tokenizer_meta(encoder, merges, pre))
    for text in TEXTS:
        assert tok.encode(text) == reference_ids(text, pattern, encoder, ranks), text
        assert tok.decode(tok.encode(text)) == text


def test_llama3_pieces_that_gpt2_would_split_merge_whole():
    """Truth: llama.cpp's LLAMA3 regex and OpenAI's BPE on a hand-made vocabulary whose merges cross GPT-2's piece
    boundaries ('$' + letters, punctuation + newline), which GPT-2's own merges never do: "$hello" is '$he' + l l o,
    ".\\n" is one token."""
    b2u = hf_b2u()
    tokens = [b2u[b] for b in range(256)] + ["$h", "$he", ".Ċ"]
    merges = ["$ h", "$h e", ". Ċ"]
    encoder, ranks = {t: i for i, t in enumerate(tokens)}, {tuple(m.split(" ")): r for r, m in enumerate(merges)}
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": merges}  # fmt: skip
    text = "$hello.\nnow $he"
    want = reference_ids(text, LLAMA3_LLAMA_CPP, encoder, ranks)
    assert Tokenizer.from_gguf_meta(meta).encode(text) == want
    assert encoder["$he"] in want and encoder[".Ċ"] in want


def test_llama3_and_gpt2_splits_differ_on_these_texts(gpt2_bpe):
    """Truth: the two regexes themselves, so that the test above tells one rule from the other (digits in threes)."""
    encoder, _, ranks = gpt2_bpe
    llama, gpt2 = (reference_ids(TEXTS[1], p, encoder, ranks) for p in (LLAMA3_LLAMA_CPP, GPT2_OPENAI))
    assert llama != gpt2 and len(llama) > len(gpt2)


def test_decode_refuses_ids_outside_the_vocabulary(gpt2_files):  # noqa: F811
    """Truth: the data README: encoder.json has 50,257 entries and <|endoftext|> is 50256, the last valid id."""
    tok = Tokenizer.from_gpt2_files(gpt2_files / "encoder.json", gpt2_files / "vocab.bpe")
    assert tok.decode([50256]) == "<|endoftext|>"
    for bad in (50257, -1):
        with pytest.raises(MechscopeError, match=rf"token id {bad} outside the vocabulary 0\.\.50256"):
            tok.decode([15496, bad])


def byte_alphabet_meta(**kw) -> dict:
    """256 single-byte tokens (GPT-2's spelling, in byte order) and '<s>' at 256, no merges."""
    b2u = hf_b2u()
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": [b2u[b] for b in range(256)] + ["<s>"]} | kw


def test_gguf_tokens_without_token_types_are_normal():
    """Truth: llama.cpp gives every token the NORMAL type when ``tokenizer.ggml.token_type`` is absent, so '<s>' is
    no control token: it encodes byte by byte (ids = the bytes of '<s>'); typed 3 (CONTROL) it is one id, 256."""
    assert Tokenizer.from_gguf_meta(byte_alphabet_meta()).encode("<s>x") == list(b"<s>x")
    typed = byte_alphabet_meta(**{"tokenizer.ggml.token_type": [1] * 256 + [3]})
    assert Tokenizer.from_gguf_meta(typed).encode("<s>x") == [256, ord("x")]


@pytest.mark.parametrize("key", ["tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"])
def test_gguf_special_id_must_index_the_token_list(key):
    """Truth: a GGUF token id indexes ``tokenizer.ggml.tokens`` (257 here): 256 is the last, 257 is none."""
    assert Tokenizer.from_gguf_meta(byte_alphabet_meta(**{key: 256})).encode("a", add_bos=False) == [ord("a")]
    with pytest.raises(MechscopeError, match=rf"{key} is 257; expected a token id 0\.\.256"):
        Tokenizer.from_gguf_meta(byte_alphabet_meta(**{key: 257}))


def word_level_dir(directory, config: dict, tokenizer_config: dict):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", "<eot>", "hello", "world"]
    backend = Backend(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<extra>"])  # id 6, outside the model's own vocabulary (as Llama 3's specials are)
    directory.mkdir()
    backend.save(str(directory / "tokenizer.json"))
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return directory


def test_special_token_given_as_a_dict_reads_as_transformers_does(tmp_path):
    """Truth: transformers' AutoTokenizer on the same folder, whose tokenizer_config.json gives the BOS and EOS tokens
    as {"content": ...} objects (ids 1 and 3, distinct from every fallback)."""
    tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False,
            "bos_token": {"__type": "AddedToken", "content": "<s>", "special": True},
            "eos_token": {"__type": "AddedToken", "content": "<eot>", "special": True}}  # fmt: skip
    d = word_level_dir(tmp_path / "t", {}, tcfg)
    ref = transformers.AutoTokenizer.from_pretrained(d)
    tok = Tokenizer.from_hf_dir(d)
    assert (tok.bos_token_id, tok.eos_token_id) == (ref.bos_token_id, ref.eos_token_id) == (1, 3)


def test_added_tokens_count_in_the_vocabulary(tmp_path):
    """Truth: transformers' ``len(tokenizer)`` (added tokens included) and its decoding of the added token's id 6."""
    d = word_level_dir(tmp_path / "t", {}, {"tokenizer_class": "PreTrainedTokenizerFast"})
    ref, tok = transformers.AutoTokenizer.from_pretrained(d), Tokenizer.from_hf_dir(d)
    assert tok.vocab_size == len(ref) == 7
    assert tok.decode([4, 6]).split() == ref.decode([4, 6]).split() == ["hello", "<extra>"]


def test_config_ids_come_first_and_a_list_gives_its_first(tmp_path):
    """Truth: the documented rule, "an id from config.json (a list: its first), else the id of tokenizer_config.json's
    token string": config says BOS 4 and EOS [3, 2], tokenizer_config.json says <s> (1) and </s> (2)."""
    tcfg = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    tok = Tokenizer.from_hf_dir(word_level_dir(tmp_path / "t", {"bos_token_id": 4, "eos_token_id": [3, 2]}, tcfg))
    assert (tok.bos_token_id, tok.eos_token_id) == (4, 3)
    assert tok.encode("world hello") == [4, 5, 4]


def test_gguf_loaded_in_bfloat16_holds_the_files_values_rounded(tmp_path):
    """Truth: the ``gguf`` package's GGUFReader of the written file, rounded to bfloat16 by torch: the embedding and
    a block's norm gains are those values, in bfloat16 (not float32, not zeros)."""
    llama_as_gguf(tmp_path / "b.gguf")
    model, _ = load_model(tmp_path / "b.gguf", dtype="bfloat16", device="cpu")
    data = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "b.gguf").tensors}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    want = torch.from_numpy(data["token_embd.weight"].reshape(256, 64).copy()).to(torch.bfloat16)
    assert torch.equal(model.W_E, want)
    norm = torch.from_numpy(data["output_norm.weight"].copy()).to(torch.bfloat16)
    assert torch.equal(next(v for k, v in model.state_dict().items() if v.shape == (64,) and "ln_final" in k), norm)


def test_smollm2_spec_is_case_insensitive(monkeypatch):
    """Truth: the data README: the package's SmolLM2-135M-Instruct.Q4_1.gguf, 98,362,432 bytes, is what
    ``smollm2`` (any case) loads."""
    try:
        path = loading.smollm2_path()
    except MechscopeError as e:
        pytest.skip(str(e))
    asked = []
    monkeypatch.setattr(loading, "load_gguf", lambda p, *a, **k: asked.append(p) or ("model", "tok"))
    for spec in ("smollm2", "SmolLM2"):
        assert load_model(spec, device="cpu") == ("model", "tok")
    assert asked == [path, path] and path.stat().st_size == 98_362_432


def fake_cuda(monkeypatch, count: int):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_cuda_ordinals_run_from_zero_to_count_minus_one(monkeypatch):
    """Truth: CUDA device ordinals are 0..device_count()-1 (torch.cuda docs); two GPUs faked."""
    fake_cuda(monkeypatch, 2)
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(MechscopeError, match="device 'cuda:2' is not there"):
        devices.resolve_device("cuda:2")


def test_mechscope_device_overrides_the_best_device(monkeypatch):
    """Truth: the documented default, "$MECHSCOPE_DEVICE if set, else the best one present" (CUDA faked present)."""
    fake_cuda(monkeypatch, 1)
    monkeypatch.delenv("MECHSCOPE_DEVICE", raising=False)
    assert devices.best_device() == torch.device("cuda")
    monkeypatch.setenv("MECHSCOPE_DEVICE", "cpu")
    assert devices.best_device() == torch.device("cpu")


def test_a_device_type_outside_the_documented_list_is_refused():
    """Truth: the documented devices, cpu, cuda, cuda:N and mps; torch knows 'meta', which is none of them."""
    with pytest.raises(MechscopeError, match="unsupported device 'meta'; expected cpu, cuda, cuda:N or mps"):
        devices.resolve_device("meta")


def test_name_list_collapses_layers_then_counts():
    """Truth: the docstring's rule by hand: layer numbers become '*', repeats go, four names shown, then a count."""
    names = [f"h.{i}.mlp.c_fc.weight" for i in range(3)] + ["a", "b", "c", "d", "e"]
    assert _name_list(names) == "h.*.mlp.c_fc.weight, a, b, c and 2 more"
    assert _name_list(["x", "y"]) == "x, y"


@pytest.fixture(scope="module")
def typed_gguf(tmp_path_factory):
    """A Llama GGUF whose vocabulary has a user-defined token <think> (type 4, id 253) and a control token <s>
    (type 3, id 254); the rest normal."""
    path = tmp_path_factory.mktemp("typed") / "t.gguf"
    tokens = [chr(c) for c in range(ord("!"), ord("!") + 250)] + ["Ġ", '!"', " x", "<think>", "<s>", "<|x|>"]
    extra = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": ['! "', "Ġ x"],
             "tokenizer.ggml.token_type": [1] * 253 + [4, 3, 1]}  # fmt: skip
    llama_as_gguf(path, None, extra)
    ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return Tokenizer.from_gguf_meta(GGUFFile.open(path).meta), ref


def test_gguf_control_and_normal_tokens_encode_as_transformers(typed_gguf):
    """Truth: transformers' own GGUF tokenizer on the same file: the control token <s> is one id (254), the normal
    token <|x|> (no merges reach it) is spelled out, the token " x" stored raw is reached by the merge "Ġ x"."""
    ours, ref = typed_gguf
    for text in ("x<s>y", "a<|x|>b", "hello", "a x"):
        assert ours.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text
    assert ours.encode("x<s>y") == [87, 254, 88]
    assert ours.encode("a x") == [64, 252]  # " x", stored raw, is GPT-2's "Ġx", which the merge "Ġ x" makes


def test_gguf_user_defined_token_is_matched_whole(typed_gguf):
    """Truth: transformers' GGUF tokenizer (and llama.cpp, which always matches USER_DEFINED tokens whole): "a<think>b"
    is [64, 253, 65] (the code before cut <think> into its characters), and it decodes back as text."""
    ours, ref = typed_gguf
    assert ref("a<think>b", add_special_tokens=False)["input_ids"] == [64, 253, 65]
    assert ours.encode("a<think>b") == [64, 253, 65]
    assert ours.decode([64, 253, 65]) == ref.decode([64, 253, 65]) == "a<think>b"


def test_config_with_more_layers_than_tensors_names_the_count(tmp_path):
    """Truth: safetensors' ``safe_open`` count of the tensors in the written file; config.json then claims one layer
    per tensor plus one."""
    from safetensors import safe_open

    from tests.fuzz.builders import write_hf_dir

    directory = write_hf_dir(tmp_path / "m")
    with safe_open(directory / "model.safetensors", "pt") as f:
        n = len(list(f.keys()))
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"n_layer": n + 1}))
    with pytest.raises(MechscopeError, match=rf"field 'n_layer' is {n + 1}; the weights hold only {n} tensors"):
        load_model(directory, device="cpu")
