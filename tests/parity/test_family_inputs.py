"""Bad input for every family (one line, named), per-head weight views, and tokenizer.json."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mechscope.core.errors import MechscopeError  # noqa: E402
from mechscope.lm.models.convert import CONVERTERS  # noqa: E402
from mechscope.lm.models.loading import load_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

DISPLAY = {
    "gpt_neox-parallel": "GPT-NeoX",
    "gpt_neo": "GPT-Neo",
    "gptj": "GPT-J",
    "opt": "OPT",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "mistral": "Mistral",
    "gemma": "Gemma",
    "gemma2": "Gemma2",
    "gemma3": "Gemma3",
    "phi3": "Phi3",
}


def edited(src, dst, **changes):
    """A copy of a checkpoint directory with config.json fields changed (None: removed)."""
    shutil.copytree(src, dst)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return dst


@pytest.mark.parametrize("name", DISPLAY)
def test_unknown_config_field_is_named(name, tiny_family, tmp_path):
    _, path = tiny_family(name)
    bad = edited(path, tmp_path / "bad", some_new_trick=1)
    with pytest.raises(MechscopeError, match=f"unsupported {DISPLAY[name]} config field 'some_new_trick'"):
        load_model(bad, device="cpu")


@pytest.mark.parametrize(
    "name, change, message",
    [
        ("gpt_neox-parallel", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope scaling 'linear'"),
        ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope scaling 'longrope'"),
        ("gptj", {"rotary": False}, "rotary=False"),
        ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
        ("gemma3", {"rope_parameters": None, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
                    "rope_scaling": {"rope_type": "linear", "factor": 8.0}}, "rope scaling 'linear'"),  # older fields
        ("qwen2", {"use_mrope": True}, "use_mrope=True"),
        ("opt", {"activation_function": "swiglu"}, "activation_function='swiglu'"),
        ("gpt_neo", {"attention_layers": ["global", "sparse"]}, "attention layers"),
        ("gemma2", {"layer_types": ["sliding_attention", "chunked_attention"]}, "layer type 'chunked_attention'"),
        ("qwen3", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [1]}}, "mrope"),
    ],
)
def test_function_changing_values_refused(name, change, message, tiny_family, tmp_path):
    _, path = tiny_family(name)
    with pytest.raises(MechscopeError, match=message):
        load_model(edited(path, tmp_path / "bad", **change), device="cpu")


def test_unknown_model_type_lists_the_supported(tiny_family, tmp_path):
    _, path = tiny_family("qwen2")
    with pytest.raises(MechscopeError, match="unsupported architecture 'mamba'") as e:
        load_model(edited(path, tmp_path / "bad", model_type="mamba"), device="cpu")
    assert all(kind in str(e.value) for kind in CONVERTERS) and len(CONVERTERS) == 13


def test_tensors_that_do_not_match_the_config(tiny_family, tmp_path):
    _, path = tiny_family("qwen3")
    with pytest.raises(MechscopeError, match=r"mlp\.up\.weight has shape \[96, 64\], expected \[100, 64\]"):
        load_model(edited(path, tmp_path / "a", intermediate_size=100), device="cpu")
    _, path = tiny_family("phi3")  # a fused tensor, checked before it is split
    with pytest.raises(MechscopeError, match=r"qkv_proj.weight has shape \[128, 64\], expected \[192, 64\]"):
        load_model(edited(path, tmp_path / "b", num_key_value_heads=4), device="cpu")


def test_per_head_views_of_fused_and_grouped_weights(tiny_family):
    ref, path = tiny_family("gpt_neox-parallel")
    model, _ = load_model(path, device="cpu")
    fused = ref.gpt_neox.layers[1].attention.query_key_value.weight.view(4, 3, 16, 64)  # [H, qkv, Dh, D]
    attn = model.blocks[1].attn
    for h in range(4):
        torch.testing.assert_close(attn.W_Q[h], fused[h, 0].T)
        torch.testing.assert_close(attn.W_V[h], fused[h, 2].T)
    ref, path = tiny_family("phi3")  # fused Q/K/V rows, two key/value heads
    model, _ = load_model(path, device="cpu")
    qkv = ref.model.layers[0].self_attn.qkv_proj.weight  # [(4 + 2 + 2) * 16, 64]
    assert model.blocks[0].attn.W_K.shape == (2, 64, 16)
    torch.testing.assert_close(model.blocks[0].attn.W_K[1], qkv[5 * 16 : 6 * 16].T)
    ref, path = tiny_family("gptj")
    model, _ = load_model(path, device="cpu")
    out = ref.transformer.h[0].attn.out_proj.weight  # [D, H*Dh]
    torch.testing.assert_close(model.blocks[0].attn.W_O[3], out[:, 48:64].T)
    torch.testing.assert_close(model.b_U, ref.lm_head.bias)


def _tiny_tokenizer(directory, bos_processor: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<bos>", "<eos>"])
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    if bos_processor:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok.save(str(directory / "tokenizer.json"))


@pytest.mark.parametrize("name, adds_bos", [("gemma", True), ("gpt_neox-parallel", False)])
def test_tokenizer_json_as_transformers_reads_it(name, adds_bos, tiny_family, tmp_path):
    _, path = tiny_family(name)
    d = edited(path, tmp_path / "tok", bos_token_id=1, eos_token_id=2)
    _tiny_tokenizer(d, bos_processor=adds_bos)
    _, tok = load_model(d, device="cpu")
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    text = "the lazy fox jumps"
    assert tok.encode(text) == theirs(text)["input_ids"]
    assert (tok.encode(text)[0] == 1) == adds_bos and tok.eos_token_id == 2
    assert tok.decode(tok.encode(text, add_bos=False)) == text
    (d / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": not adds_bos}))
    _, tok = load_model(d, device="cpu")
    assert (tok.encode(text)[0] == 1) == (not adds_bos)
