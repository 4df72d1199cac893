"""Loading checked against outside truths: transformers on the same weights written as GGUF by the ``gguf``
package's own writer, hand-written safetensors files and indexes, and the documented device rules."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from mechscope.core.errors import MechscopeError  # noqa: E402
from mechscope.lm.models import devices  # noqa: E402
from mechscope.lm.models.checkpoint import open_checkpoint  # noqa: E402
from mechscope.lm.models.gguf_file import GGUFFile  # noqa: E402
from mechscope.lm.models.hub import resolve_hub  # noqa: E402
from mechscope.lm.models.loading import load_model  # noqa: E402
from tests.fuzz.builders import write_hf_dir  # noqa: E402
from tests.unit import test_hub  # noqa: E402
from tests.unit.test_gguf import permute_like_llama_cpp, write  # noqa: E402

fake_cache = test_hub.fake_cache  # the fixture: Pythia-70M at step3000 in a private, offline HF cache
HF_TO_GGUF = {"attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
              "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
              "ffn_norm": "post_attention_layernorm"}  # fmt: skip


def llama_as_gguf(path, *, eps=1e-5, theta=10000.0, align=None, bos=1, eos=2):
    """A random transformers Llama and the same weights written as GGUF by the ``gguf`` package (as llama.cpp
    lays them out: Q/K rows permuted); ``align``: the writer's ``add_custom_alignment``."""
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=96, vocab_size=256, max_position_embeddings=64, rope_theta=theta,
                                   tie_word_embeddings=False, rms_norm_eps=eps)  # fmt: skip
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper attention than at init (std 0.02), so that the RoPE base shows in the logits
        for layer in ref.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"],
               "output.weight": sd["lm_head.weight"]}  # fmt: skip
    for i in range(2):
        p = f"model.layers.{i}."
        tensors |= {f"blk.{i}.{ours}.weight": sd[p + hf + ".weight"] for ours, hf in HF_TO_GGUF.items()}
        tensors[f"blk.{i}.attn_q.weight"] = permute_like_llama_cpp(sd[p + "self_attn.q_proj.weight"], 4)
        tensors[f"blk.{i}.attn_k.weight"] = permute_like_llama_cpp(sd[p + "self_attn.k_proj.weight"], 2)
    meta = {"llama.block_count": 2, "llama.context_length": 64, "llama.embedding_length": 64,
            "llama.feed_forward_length": 96, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
            "llama.rope.freq_base": float(theta), "llama.attention.layer_norm_rms_epsilon": float(eps),
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
            "tokenizer.ggml.tokens": [chr(c) for c in range(ord("!"), ord("!") + 255)] + ['!"'],
            "tokenizer.ggml.merges": ['! "'], "tokenizer.ggml.bos_token_id": bos,
            "tokenizer.ggml.eos_token_id": eos}  # fmt: skip
    writer = gguf.GGUFWriter
    if align is not None:

        class Aligned(writer):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                self.add_custom_alignment(align)

        gguf.GGUFWriter = Aligned  # test_gguf.write builds its writer through the module
    try:
        write(path, {k: (v, Q.F32) for k, v in tensors.items()}, meta)
    finally:
        gguf.GGUFWriter = writer
    return ref


def assert_matches(model, ref):
    x = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, rtol=1e-4, atol=1e-4)


def test_gguf_with_custom_alignment_matches_transformers(tmp_path):
    """Truth: transformers on the same weights; the gguf writer pads the tensor data to ``general.alignment`` = 64
    (a reader assuming the default 32 starts its tensors up to 32 bytes early)."""
    ref = llama_as_gguf(tmp_path / "a.gguf", align=64)
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    assert reader.alignment == 64  # the writer did pad to 64
    header_end = max(t.field.offset + sum(p.nbytes for p in t.field.parts) for t in reader.tensors)
    assert 0 < header_end % 64 <= 32  # so 32-alignment would start the data 32 bytes early (else this test is void)
    model, _ = load_model(tmp_path / "a.gguf", device="cpu")
    assert_matches(model, ref)


def test_gguf_norm_eps_and_rope_base_match_transformers(tmp_path):
    """Truth: transformers with ``rms_norm_eps`` 1e-3 and ``rope_theta`` 5000, the values written in the GGUF's
    ``llama.attention.layer_norm_rms_epsilon`` and ``llama.rope.freq_base``."""
    ref = llama_as_gguf(tmp_path / "e.gguf", eps=1e-3, theta=5000.0)
    model, _ = load_model(tmp_path / "e.gguf", device="cpu")
    assert_matches(model, ref)
    assert model.cfg.norm_eps == pytest.approx(1e-3) and model.cfg.rotary_base == 5000.0


def test_gguf_special_token_ids_are_the_written_ones(tmp_path):
    """Truth: the ``tokenizer.ggml.bos_token_id`` / ``eos_token_id`` values the gguf writer put in the file."""
    llama_as_gguf(tmp_path / "t.gguf", bos=1, eos=2)
    meta = gguf.GGUFReader(tmp_path / "t.gguf").fields
    assert meta["tokenizer.ggml.bos_token_id"].contents() == 1 and meta["tokenizer.ggml.eos_token_id"].contents() == 2
    model, _ = load_model(tmp_path / "t.gguf", device="cpu")
    assert (model.cfg.bos_token_id, model.cfg.eos_token_id) == (1, 2)


@pytest.mark.parametrize("qtype, bad", [(Q.F32, np.nan), (Q.F16, np.inf)])
def test_gguf_non_finite_tensor_refused(tmp_path, qtype, bad):
    """Truth: a tensor the gguf writer stored with one NaN (F32) or infinity (F16) in it."""
    x = np.ones((4, 32), np.float32)
    x[2, 5] = bad
    write(tmp_path / "n.gguf", {"w": (x, qtype)})
    g = GGUFFile.open(tmp_path / "n.gguf")
    with pytest.raises(MechscopeError, match=r"tensor w holds 1 non-finite value\(s\) \(NaN or infinity\)"):
        g.tensor("w")


def test_safetensors_overlapping_tensors_refused(tmp_path):
    """Truth: a hand-written safetensors file (u64 header length, JSON header, 24 data bytes) whose two F32[4]
    tensors share bytes 8..16."""
    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                         "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}).encode()  # fmt: skip
    data = np.arange(6, dtype="<f4").tobytes()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + data)
    with pytest.raises(MechscopeError, match="tensors a and b overlap in the file"):
        open_checkpoint(tmp_path)
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}).encode()  # fmt: skip
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + data)
    state = open_checkpoint(tmp_path)  # the same bytes, not overlapping: read as written
    assert state["b"].materialize().tolist() == [2.0, 3.0, 4.0, 5.0]


def test_sharded_index_naming_the_wrong_shard_refused(tmp_path):
    """Truth: model.safetensors.index.json as written beside two shards, with two tensors' shard names swapped."""
    directory = write_hf_dir(tmp_path / "m", shards=2)
    path = directory / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    shard1, shard2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    a = next(k for k, f in index["weight_map"].items() if f == shard1)
    b = next(k for k, f in index["weight_map"].items() if f == shard2)
    load_model(directory, device="cpu")  # as written: loads
    index["weight_map"][a], index["weight_map"][b] = shard2, shard1
    path.write_text(json.dumps(index))
    with pytest.raises(MechscopeError, match=f"puts tensor {a} in {shard2}; it is in {shard1}"):
        load_model(directory, device="cpu")


def test_weights_with_a_layer_the_config_lacks_refused(tmp_path):
    """Truth: a GPT-2 folder whose config.json says 1 layer and whose model.safetensors holds 2 (layer 1 a copy)."""
    directory = write_hf_dir(tmp_path / "m")
    state = load_file(directory / "model.safetensors")
    assert json.loads((directory / "config.json").read_text())["n_layer"] == 1
    state |= {k.replace(".h.0.", ".h.1."): v.clone() for k, v in state.items() if ".h.0." in k}
    save_file(state, str(directory / "model.safetensors"))
    message = r"tensors the config does not describe: transformer\.h\.\*\.attn.*says 1 layer"
    with pytest.raises(MechscopeError, match=message):
        load_model(directory, device="cpu")


def test_placement_longest_prefix_wins():
    """Truth: the documented rule, "its longest-prefix entry in the plan" (prefixes end at a dot; disk reads to
    the CPU)."""
    where = devices.placement({"": "cpu", "blocks": "cuda:0", "blocks.1": "cuda:1", "blocks.2": "disk"})
    assert where("blocks.1.attn.W_Q") == "cuda:1"
    assert where("blocks.0.attn.W_Q") == "cuda:0" and where("blocks.10.mlp.W_in") == "cuda:0"
    assert where("blocks.2.mlp.W_in") == "cpu" and where("W_E") == "cpu"
    assert devices.placement({"blocks.1": "cuda:1"})("blocks.0.x") == "cpu"  # nothing matches: the CPU


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_default_dtype_on_cuda(monkeypatch, bf16, expected):
    """Truth: the documented defaults, "float32 on the CPU, bfloat16 on a GPU" (float16 where the GPU has no
    bfloat16), with CUDA's answers faked and the device probe skipped."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(devices, "_probe", lambda dtype, device: None)
    assert devices.resolve_dtype(None, torch.device("cuda")) == expected
    assert devices.resolve_dtype(None, torch.device("cuda:0")) == expected
    assert devices.resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert devices.resolve_dtype("float32", torch.device("cuda")) == torch.float32  # asked for: kept


def test_hub_alias_is_case_insensitive(fake_cache):
    """Truth: the snapshot in the fake HF cache that ``EleutherAI/pythia-70m`` at ``step3000`` names."""
    assert resolve_hub("Pythia-70M@step3000") == fake_cache
    assert resolve_hub("PYTHIA-70m", revision="step3000") == fake_cache
