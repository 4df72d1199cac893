"""Tokenizers: GPT-2 BPE from OpenAI's files against transformers; SmolLM2's GGUF tokenizer."""

from __future__ import annotations

import pytest

from mechscope.lm.tokenizer import Tokenizer


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
