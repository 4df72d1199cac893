"""Tokenizers: GPT-2 BPE from OpenAI's files against transformers; SmolLM2's GGUF tokenizer."""

from __future__ import annotations

import pytest

from mechscope.core.errors import MechscopeError
from mechscope.lm.tokenizer import CharTokenizer, Tokenizer


@pytest.fixture(scope="module")
def gpt2_files(mnist_root):
    d = mnist_root / "gpt2-tokenizer"
    if not (d / "encoder.json").exists():
        pytest.skip("GPT-2 tokenizer files not found in the data directory")
    return d


@pytest.fixture(scope="module")
def shakespeare(mnist_root):
    text = (mnist_root / "tinyshakespeare" / "input.txt").read_text()
    return [p for p in text.split("\n\n")[100:130] if p.strip()]


def test_gpt2_matches_transformers(gpt2_files, shakespeare, tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer.from_gpt2_files(gpt2_files / "encoder.json", gpt2_files / "vocab.bpe")
    # the same two files under Hugging Face's names (encoder.json = vocab.json, vocab.bpe = merges.txt)
    (tmp_path / "vocab.json").write_bytes((gpt2_files / "encoder.json").read_bytes())
    (tmp_path / "merges.txt").write_bytes((gpt2_files / "vocab.bpe").read_bytes())
    ref = transformers.GPT2TokenizerFast.from_pretrained(tmp_path)
    assert Tokenizer.from_hf_dir(tmp_path).encode("Hello world") == [15496, 995]
    assert ours.vocab_size == 50257 and ours.eos_token_id == 50256
    extra = ["  spaces  and\ttabs\n", "naïve café — “quotes” 😀", "1234567 tokens<|endoftext|>next"]
    for text in shakespeare + extra:
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids) == text
    assert ours.encode("Hello world") == [15496, 995]  # GPT-2's well-known ids


def test_smollm2_tokenizer(shakespeare):
    from mechscope.lm.models.loading import smollm2_path

    try:
        path = smollm2_path()
    except Exception as e:
        pytest.skip(str(e))
    from mechscope.lm.models.gguf_file import GGUFFile

    ours = Tokenizer.from_gguf_meta(GGUFFile.open(path).meta)
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in shakespeare[:10] + ["<|im_start|>user\nHi there<|im_end|>"]:
        ids = ours.encode(text)
        assert ids == ref(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ids) == text
    # SmolLM2 splits numbers into single digits (its own tokenizer.json and llama.cpp's "smollm"
    # rule); transformers' GGUF converter does not know that rule and keeps GPT-2's grouping
    digits = ours.encode("2024")
    assert [ours.decode([i]) for i in digits] == ["2", "0", "2", "4"]


def test_char_tokenizer_round_trip_and_unknown_characters():
    chars = sorted(set("to be or not to be\n"))
    tok = CharTokenizer(chars)
    text = "not to be\nor to be"
    ids = tok.encode(text)
    assert ids == [chars.index(c) for c in text] and tok.decode(ids) == text and tok.vocab_size == len(chars)
    assert tok.decode([0, len(chars), -1]) == f"{chars[0]}#{len(chars)}#-1"  # ids outside shown, not dropped
    with pytest.raises(MechscopeError, match=r"2 characters the model was not trained on \('!', 'x'\); its "
                       r"vocabulary is the 8 characters"):
        tok.encode("to bex!")  # dropping them would read "to be"
    many = "".join(chr(0x400 + i) for i in range(7))
    with pytest.raises(MechscopeError, match=r"7 characters .* and 2 more\)"):
        tok.encode(many)


def test_a_text_is_named_in_its_encoding_error_and_circuits_default_prompt_is_skipped(caplog):
    from mechscope.lm.pipelines.circuits import DEFAULT_PROMPT, _prompt_ids
    from mechscope.lm.tokenizer import encode_named

    tok = CharTokenizer(sorted(set("abc ")))
    assert encode_named(tok.encode, "cab", "the prompt") == [3, 1, 2]
    with pytest.raises(MechscopeError, match=r"^data/t\.txt: 1 character the model was not trained on \('d'\)"):
        encode_named(tok.encode, "abd", "data/t.txt")
    with pytest.raises(MechscopeError, match=r"^the prompt: 1 character .*\('d'\)"):
        _prompt_ids(tok.encode, "a d", 8)  # a prompt given is refused
    assert _prompt_ids(tok.encode, "ab c", 8) == [1, 2, 0, 3]
    with caplog.at_level("WARNING"):
        assert _prompt_ids(tok.encode, None, 8) is None  # the default prompt, unreadable: no prompt, said
    assert "no prompt read: the default prompt has" in caplog.text and "give one with --prompt" in caplog.text
    full = CharTokenizer(sorted(set(DEFAULT_PROMPT)))
    assert full.decode(_prompt_ids(full.encode, None, 8)) == DEFAULT_PROMPT[:8]
