"""GPT-NeoX, Llama, Qwen2, Gemma converters, GGUF and hub ids, second pass: the defaults hub configs lean on.

The tiny checkpoints (families.py) are saved by transformers 5, which writes every field it knows; a hub
config.json (Pythia's, google/gemma-2b's...) leaves many out, and a converter with a wrong default for one of
them matches on every tiny checkpoint. Here each config is read twice: by transformers' own config class
(``AutoConfig.from_pretrained`` on the same config.json: the outside truth) and by our converter (on placeholder
tensors, so no weights are needed), and the numerics each field decides are compared; a few folders are also run
against transformers' logits. GGUF: llama.cpp's defaults and refusals, with files written by the gguf package.
Hub ids: huggingface_hub's own reading of its environment variables.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mechscope.core.errors import MechscopeError  # noqa: E402
from mechscope.lm.models import hub  # noqa: E402
from mechscope.lm.models.checkpoint import MissingTensor  # noqa: E402
from mechscope.lm.models.convert import CONVERTERS  # noqa: E402
from mechscope.lm.models.loading import load_model  # noqa: E402
from tests.parity.families import V, save_random  # noqa: E402
from tests.parity.test_family_configs_truths import TOL, max_diff  # noqa: E402
from tests.parity.test_family_inputs import edited  # noqa: E402
from tests.unit.test_hub import fake_cache  # noqa: E402, F401

pytestmark = pytest.mark.usefixtures("one_thread")
warnings.filterwarnings("ignore", module="transformers")
transformers.logging.set_verbosity_error()

BASE = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)


class Placeholders(dict):
    """A state dict in which every tensor is absent (a placeholder): the converter's config alone."""

    def __missing__(self, key):
        return MissingTensor(key)


def both(model_type: str, fields: dict, tmp_path):
    """(transformers' config, ours) read from one config.json holding ``fields``."""
    d = tmp_path / model_type
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**fields, "model_type": model_type}))
    theirs = transformers.AutoConfig.from_pretrained(d)
    ours, _ = CONVERTERS[model_type](dict(fields), Placeholders())
    return theirs, ours


def test_pythia_config_defaults_as_transformers_reads_them(tmp_path):
    """Outside truth: transformers' GPTNeoXConfig on a config.json without attention_bias, use_parallel_residual,
    tie_word_embeddings, layer_norm_eps, hidden_act or any rope field (Pythia's era): its defaults, and the rotated
    dims of a 16-dim head by hand, int(16 x 0.25) = 4."""
    theirs, ours = both("gpt_neox", BASE, tmp_path)
    rope = theirs.rope_parameters
    assert (ours.attn_bias, ours.attn_out_bias) == (theirs.attention_bias,) * 2 == (True, True)
    assert ours.parallel_attn_mlp is theirs.use_parallel_residual is True
    assert ours.tie_embeddings is theirs.tie_word_embeddings is False
    assert (ours.norm_eps, ours.act) == (theirs.layer_norm_eps, theirs.hidden_act)
    assert ours.rotary_base == rope["rope_theta"] and ours.rotary_dim == int(16 * rope["partial_rotary_factor"]) == 4


def test_pythia_like_folder_matches_transformers(tiny_family, tmp_path):
    """Outside truth: transformers' logits on the parallel tiny GPT-NeoX with the defaulted fields removed from its
    config.json (untied, biased, parallel, gelu, eps 1e-5 all come from the defaults on both sides)."""
    _, path = tiny_family("gpt_neox-parallel")
    gone = dict.fromkeys(("attention_bias", "use_parallel_residual", "tie_word_embeddings", "hidden_act"))
    diff = max_diff(edited(path, tmp_path / "pythia", **gone))
    assert diff < TOL, f"max |diff| {diff:.2e}"


def test_llama_config_defaults_as_transformers_reads_them(tmp_path):
    """Outside truth: transformers' LlamaConfig on a config.json with no num_key_value_heads, head_dim,
    rms_norm_eps, rope field, tie_word_embeddings or hidden_act: one key/value head per head, hidden / heads
    (96 / 4 = 24), its defaults."""
    theirs, ours = both("llama", dict(BASE, hidden_size=96), tmp_path)
    assert (ours.n_kv_heads, ours.d_head) == (theirs.num_key_value_heads, theirs.head_dim) == (4, 24)
    assert (ours.norm_eps, ours.act, ours.tie_embeddings) == (theirs.rms_norm_eps, theirs.hidden_act, False)
    assert ours.rotary_base == theirs.rope_parameters["rope_theta"] and ours.rotary_width == 24


def test_rope_scaling_of_default_type_wins_over_rope_parameters(tmp_path):
    """Outside truth: transformers' LlamaConfig, where a ``rope_scaling`` dict replaces ``rope_parameters`` (here
    theta 900 against 300: it keeps 900)."""
    fields = dict(BASE, rope_scaling={"rope_type": "default", "rope_theta": 900.0})
    fields["rope_parameters"] = {"rope_type": "default", "rope_theta": 300.0}
    theirs, ours = both("llama", fields, tmp_path)
    assert ours.rotary_base == theirs.rope_parameters["rope_theta"] == 900.0


def test_llama_without_kv_heads_and_rope_fields_matches_transformers(tmp_path):
    """Outside truth: transformers' logits on a Llama saved with as many key/value heads as heads, then its
    config.json stripped of num_key_value_heads, head_dim, rms_norm_eps, rope_parameters, tie and hidden_act."""
    cfg = transformers.LlamaConfig(**BASE, num_key_value_heads=4, max_position_embeddings=64)
    save_random(transformers, cfg, tmp_path / "src")
    gone = ("num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters", "tie_word_embeddings", "hidden_act")
    diff = max_diff(edited(tmp_path / "src", tmp_path / "bare", **dict.fromkeys(gone)))
    assert diff < TOL, f"max |diff| {diff:.2e}"


def test_gemma_without_tie_field_is_tied(tiny_family, tmp_path):
    """Outside truth: transformers' GemmaConfig default tie_word_embeddings=True (google/gemma-2b's config.json has
    no lm_head); its logits on the tiny Gemma with the field removed."""
    theirs, ours = both("gemma", BASE, tmp_path)
    assert ours.tie_embeddings is theirs.tie_word_embeddings is True
    assert ours.embed_scale == pytest.approx(64**0.5)  # sqrt(hidden_size), not of the head size
    _, path = tiny_family("gemma")
    diff = max_diff(edited(path, tmp_path / "untold", tie_word_embeddings=None))
    assert diff < TOL, f"max |diff| {diff:.2e}"


def test_gemma2_defaults_as_transformers_reads_them(tmp_path):
    """Outside truth: transformers' Gemma2Config on a config.json without soft-capping, window, scalar or layer
    types: final cap 30, attention cap 50, window 4096, 256 ** -0.5 = 1/16, even layers sliding."""
    theirs, ours = both("gemma2", BASE, tmp_path)
    assert ours.final_logit_softcap == theirs.final_logit_softcapping == 30.0
    assert ours.attn_logit_softcap == theirs.attn_logit_softcapping == 50.0
    assert ours.sliding_window == theirs.sliding_window == 4096
    assert ours.attn_scale == pytest.approx(theirs.query_pre_attn_scalar**-0.5) == 1 / 16
    slide = tuple(i for i, t in enumerate(theirs.layer_types) if t == "sliding_attention")
    assert ours.sliding_window_layers == slide == (0,)


def test_gemma3_defaults_as_transformers_reads_them(tmp_path):
    """Outside truth: transformers' Gemma3TextConfig on a 7-layer config.json without layer types, pattern, rope
    fields or soft-capping: five local layers to one global (layer 5 global, hand count), bases 1e6 and 1e4, no
    final cap."""
    theirs, ours = both("gemma3_text", dict(BASE, num_hidden_layers=7), tmp_path)
    slide = tuple(i for i, t in enumerate(theirs.layer_types) if t == "sliding_attention")
    assert ours.sliding_window_layers == slide == (0, 1, 2, 3, 4, 6)
    rope = theirs.rope_parameters
    assert ours.rotary_base == rope["full_attention"]["rope_theta"] == 1e6
    assert ours.rotary_base_local == rope["sliding_attention"]["rope_theta"] == 1e4
    assert ours.final_logit_softcap is theirs.final_logit_softcapping is None


def test_layer_types_of_the_wrong_length_are_refused(tmp_path):
    """Outside truth: transformers' Gemma2Config refuses one layer type for two layers (its validate_layer_type);
    so do we, in one line, rather than leave the second layer's attention to chance."""
    fields = dict(BASE, layer_types=["sliding_attention"])
    with pytest.raises(Exception, match=r"must be equal to the number of .layer_types. \(1\)"):
        transformers.Gemma2Config(**fields)
    with pytest.raises(MechscopeError, match="unsupported Gemma2 config: 1 layer_types for 2 layers"):
        CONVERTERS["gemma2"](fields, Placeholders())


def test_qwen2_without_window_fields_slides_nowhere(tmp_path):
    """Outside truth: transformers' Qwen2Config default use_sliding_window=False: every layer full attention."""
    theirs, ours = both("qwen2", dict(BASE, num_key_value_heads=2, sliding_window=5), tmp_path)
    assert set(theirs.layer_types) == {"full_attention"} and ours.sliding_window_layers == ()
    assert ours.attn_bias is True and ours.attn_out_bias is False  # Qwen2Attention: bias on q/k/v, none on o_proj


def test_first_listed_eos_token_is_the_stop_token(tmp_path):
    """Outside truth: transformers' LlamaConfig keeps ``eos_token_id`` as the list written (Llama 3 style); its
    first entry (7, not 9) is the one we stop on, and a bos of 0 is a valid id (transformers accepts it)."""
    theirs, ours = both("llama", dict(BASE, bos_token_id=0, eos_token_id=[7, 9]), tmp_path)
    assert ours.eos_token_id == theirs.eos_token_id[0] == 7 and ours.bos_token_id == theirs.bos_token_id == 0


# ---------------------------------------------------------------------------------------------------------------
# GGUF: llama.cpp's defaults and refusals


def _gguf(monkeypatch, path, **meta):
    """test_gguf's tiny Llama as GGUF with metadata keys changed (None: removed); transformers' model back."""
    from tests.parity.test_convert_truths import _rewritten_gguf

    def change(tensors, m):
        m.update(meta)
        return tensors, {k: v for k, v in m.items() if v is not None}

    return _rewritten_gguf(monkeypatch, path, change)


def test_gguf_without_freq_base_uses_llama_cpp_default(monkeypatch, tmp_path):
    """Outside truth: llama.cpp reads a missing rope.freq_base as 10000; transformers' Llama (rope_theta 10000) on
    the same weights."""
    ref = _gguf(monkeypatch, tmp_path / "t.gguf", **{"llama.rope.freq_base": None})
    model, _ = load_model(tmp_path / "t.gguf", device="cpu")
    assert model.cfg.rotary_base == 10000.0
    x = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, rtol=1e-4, atol=1e-4)


def test_gguf_norms_before_attention_and_mlp_are_not_swapped(monkeypatch, tmp_path):
    """Outside truth: transformers' Llama with post_attention_layernorm set to the distinct weights (0.5 to 1.5,
    numpy linspace) written as blk.N.ffn_norm (llama.cpp's name for it); attn_norm stays at ones."""
    import numpy as np

    scale = np.linspace(0.5, 1.5, 64, dtype=np.float32)

    def ffn_norms(tensors, meta):
        for name, (w, q) in list(tensors.items()):
            if name.endswith("ffn_norm.weight"):
                tensors[name] = (w * scale, q)
        return tensors, meta

    from tests.parity.test_convert_truths import _rewritten_gguf

    ref = _rewritten_gguf(monkeypatch, tmp_path / "t.gguf", ffn_norms)
    with torch.no_grad():
        for layer in ref.model.layers:
            layer.post_attention_layernorm.weight.mul_(torch.from_numpy(scale))
    model, _ = load_model(tmp_path / "t.gguf", device="cpu")
    x = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, rtol=1e-4, atol=1e-4)


def test_gguf_name_and_token_ids_are_read(monkeypatch, tmp_path):
    """Outside truth: the metadata the gguf package wrote: general.name, and token ids 5 and 255 (the last of
    256 tokens) read back as written."""
    meta = {"general.name": "Tiny Llama", "tokenizer.ggml.bos_token_id": 5, "tokenizer.ggml.eos_token_id": 255}
    _gguf(monkeypatch, tmp_path / "t.gguf", **meta)
    model, _ = load_model(tmp_path / "t.gguf", device="cpu")
    assert (model.cfg.name, model.cfg.bos_token_id, model.cfg.eos_token_id) == ("Tiny Llama", 5, 255)


@pytest.mark.parametrize(
    "meta, says",
    [
        ({"tokenizer.ggml.bos_token_id": 256}, "tokenizer.ggml.bos_token_id is 256; expected a token id from 0 to 255"),
        ({"llama.attention.head_count_kv": 3}, "4 attention heads cannot share 3 key/value heads"),
    ],
    ids=["bos-past-the-vocabulary", "kv-heads-not-dividing"],
)
def test_gguf_values_llama_cpp_cannot_run_are_refused(monkeypatch, tmp_path, meta, says):
    """Outside truth: 256 tokens have ids 0 to 255 (hand count); 4 query heads cannot be shared evenly by 3 key/value
    heads (4 % 3 = 1, llama.cpp asserts n_head % n_head_kv == 0)."""
    _gguf(monkeypatch, tmp_path / "t.gguf", **meta)
    with pytest.raises(MechscopeError, match=says):
        load_model(tmp_path / "t.gguf", device="cpu")


# ---------------------------------------------------------------------------------------------------------------
# Hub ids


def test_short_name_in_any_case_and_the_same_revision_twice(fake_cache):  # noqa: F811
    """Outside truth: the hub's repo for the short name (EleutherAI/pythia-70m, written by hand) whatever its case;
    a revision given both in the id and as the argument, when the same, is one revision."""
    assert hub.resolve_hub("Pythia-70M@step3000") == fake_cache
    assert hub.split_revision("EleutherAI/pythia-70m@step3000", "step3000") == ("EleutherAI/pythia-70m", "step3000")
    assert hub.HUB_ALIASES["pythia-70m-deduped"] == "EleutherAI/pythia-70m-deduped"


@pytest.mark.parametrize(
    "files, bins",
    [(["config.json", "model.safetensors", "pytorch_model.bin"], False), (["config.json", "pytorch_model.bin"], True)],
)
def test_bin_files_only_where_no_safetensors(monkeypatch, files, bins):
    """Outside truth: the repository listing (huggingface_hub.list_repo_files, faked): .bin patterns are added only
    when no file there ends in .safetensors (Pythia's training-step branches)."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, revision=None: files)
    got = hub._patterns("EleutherAI/pythia-70m", "step3000")
    assert ("pytorch_model.bin" in got) is bins and "model.safetensors" in got


def test_hf_endpoint_host_is_the_one_resolved(monkeypatch):
    """Outside truth: huggingface_hub's HF_ENDPOINT names the hub's address; its host is the one to resolve."""
    import socket

    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example:8443")
    asked = []

    def no_dns(host, *a, **k):
        asked.append(host)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    assert hub.hub_host_unresolved() == "hf-mirror.example" and asked == ["hf-mirror.example"]


@pytest.mark.parametrize("value", ["true", "yes", "ON"])
def test_offline_variable_read_as_huggingface_hub_reads_it(monkeypatch, tmp_path, value):
    """Outside truth: huggingface_hub.constants.ENV_VARS_TRUE_VALUES (compared upper-cased): each of these values
    means offline, so the answer comes without any host look-up or download."""
    import socket

    import huggingface_hub
    import huggingface_hub.constants as c

    assert value.upper() in c.ENV_VARS_TRUE_VALUES
    monkeypatch.setenv("HF_HUB_OFFLINE", value)

    def download(repo, **kw):
        if not kw.get("local_files_only"):
            pytest.fail("a download was tried")
        raise FileNotFoundError(repo)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: pytest.fail("a host was looked up"))
    with pytest.raises(MechscopeError, match="not in the Hugging Face cache") as e:
        hub.resolve_hub("no-such/model")
    assert "offline:" not in str(e.value)
