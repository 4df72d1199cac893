"""GGUF: our reader against the gguf package for every supported type, and a Llama written as GGUF."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from mechscope.core.errors import MechscopeError  # noqa: E402
from mechscope.lm.models.gguf_file import GGUFFile  # noqa: E402
from mechscope.lm.models.loading import load_model, unpermute_rope  # noqa: E402


def write(path, tensors: dict, meta: dict | None = None, arch="llama"):
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (meta or {}).items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, value)
    for name, (array, qtype) in tensors.items():
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(name, array.astype(np.float32 if qtype == Q.F32 else np.float16))
        else:
            w.add_tensor(name, quantize(array, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_dequantise_matches_gguf_package(tmp_path, qtype):
    x = np.random.default_rng(0).standard_normal((48, 256)).astype(np.float32)
    write(tmp_path / "t.gguf", {"w": (x, qtype)})
    got = GGUFFile.open(tmp_path / "t.gguf").tensor("w")
    assert got.shape == (48, 256) and got.dtype == np.float32
    if qtype == Q.F32:
        np.testing.assert_array_equal(got, x)
    elif qtype == Q.F16:
        np.testing.assert_array_equal(got, x.astype(np.float16).astype(np.float32))
    else:
        np.testing.assert_array_equal(got, dequantize(quantize(x, qtype), qtype))
        assert np.abs(got - x).mean() < 0.2  # and it is a quantisation of x


def test_bad_files(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(MechscopeError, match="not a GGUF file"):
        GGUFFile.open(tmp_path / "bad.gguf")
    x = np.ones((32, 64), np.float32)
    write(tmp_path / "t.gguf", {"w": (x, Q.F32)})
    data = (tmp_path / "t.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 100])
    with pytest.raises(MechscopeError, match="truncated"):
        GGUFFile.open(tmp_path / "cut.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")  # was "cannot read (cannot mmap an empty file)"
    with pytest.raises(MechscopeError, match=r"empty.gguf: not a GGUF file \(it is empty\)$"):
        GGUFFile.open(tmp_path / "empty.gguf")
    (tmp_path / "head.gguf").write_bytes(data[:9])  # was "not a GGUF file (bad magic number)"
    with pytest.raises(MechscopeError, match=r"head.gguf: a truncated GGUF file \(9 bytes; its header alone"):
        GGUFFile.open(tmp_path / "head.gguf")
    (tmp_path / "cut2.gguf").write_bytes(data[:40])
    with pytest.raises(MechscopeError, match="cut short|truncated"):
        GGUFFile.open(tmp_path / "cut2.gguf")
    with pytest.raises(MechscopeError, match="tensor nothing is missing"):
        GGUFFile.open(tmp_path / "t.gguf").tensor("nothing")


def permute_like_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp():
    w = np.arange(8 * 6 * 3, dtype=np.float32).reshape(8 * 6, 3)
    np.testing.assert_array_equal(unpermute_rope(permute_like_llama_cpp(w, 6), 6), w)


def llama_as_gguf(path, head_dim: int | None = None, meta_extra: dict | None = None):
    """A tiny random transformers Llama (``head_dim`` None: hidden / heads) and its weights written as llama.cpp
    writes them (Q/K rows permuted), with ``meta_extra`` added to the metadata."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        vocab_size=256,
        max_position_embeddings=64,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        **({"head_dim": head_dim} if head_dim else {}),
    )
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    tensors = {
        "token_embd.weight": (sd["model.embed_tokens.weight"], Q.F32),
        "output_norm.weight": (sd["model.norm.weight"], Q.F32),
        "output.weight": (sd["lm_head.weight"], Q.F32),
    }
    for i in range(2):
        p = f"model.layers.{i}."
        names = {
            "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj",
            "ffn_gate": "mlp.gate_proj",
            "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj",
            "attn_norm": "input_layernorm",
            "ffn_norm": "post_attention_layernorm",
        }
        for ours, hf in names.items():
            tensors[f"blk.{i}.{ours}.weight"] = (sd[p + hf + ".weight"], Q.F32)
        tensors[f"blk.{i}.attn_q.weight"] = (permute_like_llama_cpp(sd[p + "self_attn.q_proj.weight"], 4), Q.F32)
        tensors[f"blk.{i}.attn_k.weight"] = (permute_like_llama_cpp(sd[p + "self_attn.k_proj.weight"], 2), Q.F32)
    alphabet = [chr(c) for c in range(ord("!"), ord("!") + 255)] + ['!"']  # the last token is the merge's
    meta = {
        "llama.block_count": 2,
        "llama.context_length": 64,
        "llama.embedding_length": 64,
        "llama.feed_forward_length": 96,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.freq_base": 10000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": alphabet,
        "tokenizer.ggml.merges": ['! "'],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }
    write(path, tensors, meta | (meta_extra or {}))
    return ref


@pytest.mark.parametrize(
    "head_dim, extra",
    [
        (None, {}),
        (32, {"llama.attention.key_length": 32, "llama.attention.value_length": 32, "llama.rope.dimension_count": 32}),
        (32, {"llama.attention.key_length": 32}),  # llama.cpp: values and rotation default to the key head size
    ],
    ids=["hidden-over-heads", "explicit-head-dim", "key-length-only"],
)
def test_llama_written_as_gguf_matches_transformers(tmp_path, head_dim, extra):
    """Truth: transformers' LlamaForCausalLM on the same weights, including a head size that is not hidden / heads
    (Llama's ``head_dim``; llama.cpp writes it as ``attention.key_length``)."""
    ref = llama_as_gguf(tmp_path / "tiny.gguf", head_dim, extra)
    model, tok = load_model(tmp_path / "tiny.gguf")
    assert model.cfg.kv_heads == 2 and not model.cfg.tie_embeddings and tok.vocab_size >= 256
    assert model.cfg.d_head == (head_dim or 16)
    x = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "extra, says",
    [
        ({"llama.attention.key_length": 32, "llama.rope.dimension_count": 16}, "rope.dimension_count is 16"),
        ({"llama.attention.key_length": 32, "llama.attention.value_length": 16}, "value_length is 16"),
        ({"llama.rope.dimension_count": 32}, "rope.dimension_count is 32 but the key head size is 16"),
        ({"llama.attention.key_length": 3}, "head size 3"),
    ],
)
def test_head_sizes_it_cannot_model_are_refused(tmp_path, extra, says):
    """A partial rotation (llama.cpp rotates the first rope.dimension_count of each head, after a whole-head row
    permutation we cannot undo for part of it) or values of another size: one line naming the key, not a shape
    error or a wrong model."""
    llama_as_gguf(tmp_path / "t.gguf", 32 if "llama.attention.key_length" in extra else None, extra)
    with pytest.raises(MechscopeError, match=says):
        load_model(tmp_path / "t.gguf")


def test_unsupported_architecture(tmp_path):
    write(tmp_path / "g.gguf", {"w": (np.ones((32, 32), np.float32), Q.F32)}, arch="gemma")
    with pytest.raises(MechscopeError, match="unsupported GGUF architecture 'gemma'"):
        load_model(tmp_path / "g.gguf")
