"""Converter fields the tiny family checkpoints leave at a value where a mix-up is invisible, against transformers.

families.py's checkpoints set each family's variant switches, but some config fields keep a value at which a
converter that ignores or swaps them still matches: Llama's ``head_dim`` equal to hidden / heads, ``rms_norm_eps``
at its default, ``attention_bias`` and ``mlp_bias`` both on, GPT-NeoX's biases on, OPT's final norm present, the
legacy fields (Pythia's missing ``rotary_pct``, Qwen2's ``max_window_layers`` without ``layer_types``, Gemma 3's
``rope_local_base_freq``), a GGUF file's epsilon and rotary base at llama.cpp's defaults. Each test here builds (or
edits) a checkpoint with distinct non-default values and compares our float32 logits with what transformers (or
the gguf package's writer and transformers' Llama) computes from the same weights. The device-map tests check the
plan's arithmetic by hand (no GPU needed: no device is touched).
"""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mechscope.lm.models.devices import _expand, _normalise, placement  # noqa: E402
from mechscope.lm.models.loading import load_model  # noqa: E402
from tests.parity.families import V, save_random, tokens  # noqa: E402
from tests.parity.test_family_configs_truths import TOL, check_edited, max_diff  # noqa: E402
from tests.parity.test_family_inputs import edited  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
warnings.filterwarnings("ignore", module="transformers")
transformers.logging.set_verbosity_error()

SMALL = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)


def _llama(t, **kw):
    return t.LlamaConfig(**SMALL, intermediate_size=96, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, **kw)


BUILT = {
    # head_dim 32 with 4 heads of a 64-wide model (not hidden / heads = 16); eps 0.05 and theta 500, not defaults
    "llama-head_dim-eps-theta": lambda t: _llama(t, head_dim=32, rms_norm_eps=0.05, rope_theta=500.0),
    # biases on the MLP only, then on attention only: a converter that swaps the two switches is caught
    "llama-mlp_bias-only": lambda t: _llama(t, attention_bias=False, mlp_bias=True),
    "llama-attention_bias-only": lambda t: _llama(t, attention_bias=True, mlp_bias=False),
    # GPT-NeoX without biases on its attention (transformers' attention_bias=False)
    "neox-no-attention_bias": lambda t: t.GPTNeoXConfig(
        **SMALL, intermediate_size=96, rotary_pct=0.5, attention_bias=False, layer_norm_eps=0.02
    ),
    # OPT pre-LN with its final LayerNorm removed (OPTDecoder builds none when _remove_final_layer_norm)
    "opt-remove-final-norm": lambda t: t.OPTConfig(
        **SMALL, ffn_dim=96, word_embed_proj_dim=64, _remove_final_layer_norm=True
    ),
    # OPT with no bias on any Linear
    "opt-no-bias": lambda t: t.OPTConfig(**SMALL, ffn_dim=96, word_embed_proj_dim=64, enable_bias=False),
    # GPT-J rotating whole heads (rotary_dim = head size 16) with no n_inner (an MLP 4 x 64 wide)
    "gptj-full-rotary-no-n_inner": lambda t: t.GPTJConfig(
        vocab_size=V, n_embd=64, n_layer=2, n_head=4, rotary_dim=16, n_positions=64
    ),
    # Gemma with a head size twice hidden / heads, an eps of 0.05 and biases on attention
    "gemma-head_dim-eps-bias": lambda t: t.GemmaConfig(
        **SMALL, intermediate_size=96, num_key_value_heads=1, head_dim=32, rms_norm_eps=0.05, attention_bias=True
    ),
}


@pytest.mark.parametrize("case", BUILT)
def test_built_checkpoint_matches_transformers(case, tmp_path):
    """Outside truth: transformers' logits on a checkpoint it built and saved with the distinct non-default values."""
    save_random(transformers, BUILT[case](transformers), tmp_path)
    diff = max_diff(tmp_path)
    assert diff < TOL, f"{case}: max |diff| {diff:.2e}"


# (tiny family, config.json fields set; None: removed); each mirrors an older hub config.json
EDITS = {
    # Pythia-like: no rope fields at all; transformers' GPT-NeoX defaults (a quarter of each head, base 10000)
    "neox-no-rope-fields": (
        "gpt_neox-parallel",
        dict.fromkeys(("rope_parameters", "rope_theta", "partial_rotary_factor", "rotary_pct", "rotary_emb_base")),
    ),
    # GPT-J's config.json without tie_word_embeddings: transformers' GPTJConfig default (untied)
    "gptj-no-tie-field": ("gptj", {"tie_word_embeddings": None}),
    # Qwen2 without layer_types: sliding windows on the layers from max_window_layers on (here layer 1 of 2)
    "qwen2-no-layer_types": ("qwen2", {"layer_types": None}),
    # ... and without use_sliding_window either: transformers' default is off, whatever sliding_window says
    "qwen2-no-use_sliding_window": ("qwen2", {"layer_types": None, "use_sliding_window": None}),
    # Gemma 2 without query_pre_attn_scalar: transformers' default 256 (attention scaled by 256 ** -0.5 = 1/16)
    "gemma2-no-query_pre_attn_scalar": ("gemma2", {"query_pre_attn_scalar": None}),
    # a rotary fraction whose product with the head size (16 x 0.42 = 6.72) is no integer: 6 dims rotate, not 7
    "neox-fractional-rotary": (
        "gpt_neox-parallel",
        {"rope_parameters": {"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 0.42}},
    ),
    # Gemma 3 with the pre-rope_parameters fields: rope_theta global, rope_local_base_freq for the local layers
    "gemma3-rope_local_base_freq": (
        "gemma3",
        {"rope_parameters": None, "rope_theta": 1000000.0, "rope_local_base_freq": 500.0},
    ),
}


@pytest.mark.parametrize("case", EDITS)
def test_legacy_config_matches_transformers(case, tiny_family, tmp_path):
    """Outside truth: transformers' logits on the same edited folder (its config class reads the older fields)."""
    check_edited(case, *EDITS[case], tiny_family, tmp_path)


def test_qwen2_window_starts_at_max_window_layers(tmp_path):
    """Outside truth: transformers' Qwen2Config.layer_types, computed from max_window_layers when absent: of 4 layers
    with max_window_layers 2, layers 2 and 3 slide (hand count: i >= 2); and its logits on that folder."""
    cfg = transformers.Qwen2Config(
        **{**SMALL, "num_hidden_layers": 4}, intermediate_size=96, num_key_value_heads=2,
        use_sliding_window=True, sliding_window=5, max_window_layers=2,
    )  # fmt: skip
    save_random(transformers, cfg, tmp_path / "src")
    path = edited(tmp_path / "src", tmp_path / "legacy", layer_types=None)
    model, _ = load_model(path, device="cpu")
    theirs = tuple(i for i, t in enumerate(cfg.layer_types) if t == "sliding_attention")
    assert model.cfg.sliding_window_layers == (2, 3) == theirs
    assert max_diff(path) < TOL


def test_qwen2_default_max_window_layers_is_28(tmp_path):
    """Outside truth: transformers' Qwen2Config read from a config.json with use_sliding_window but neither
    max_window_layers nor layer_types: its default max_window_layers 28 slides layers 28 and 29 of 30 (ours slid
    none before)."""
    cfg = transformers.Qwen2Config(
        vocab_size=V, hidden_size=16, num_hidden_layers=30, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=24, max_position_embeddings=64, use_sliding_window=True, sliding_window=5,
    )  # fmt: skip
    save_random(transformers, cfg, tmp_path / "src")
    path = edited(tmp_path / "src", tmp_path / "legacy", layer_types=None, max_window_layers=None)
    theirs = transformers.AutoConfig.from_pretrained(path).layer_types
    model, _ = load_model(path, device="cpu")
    assert model.cfg.sliding_window_layers == tuple(i for i, t in enumerate(theirs) if t == "sliding_attention")


def test_gpt_neo_default_window_of_256(tmp_path):
    """Outside truth: transformers' GPTNeoConfig default window_size (256) on a config.json without it, over 264 tokens
    (so the local layer's window cuts in); its logits on that folder."""
    cfg = transformers.GPTNeoConfig(
        vocab_size=V, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48, max_position_embeddings=272,
        attention_types=[[["global", "local"], 1]],
    )  # fmt: skip
    save_random(transformers, cfg, tmp_path / "src")
    path = edited(tmp_path / "src", tmp_path / "legacy", window_size=None)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    model, _ = load_model(path, device="cpu", dtype="float32")
    assert ref.config.window_size == 256 == model.cfg.sliding_window
    x = tokens(1, 264)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, rtol=1e-4, atol=1e-4)


def test_attention_patterns_match_transformers(tiny_family):
    """Outside truth: transformers' own attention probabilities (output_attentions) on the partial-rotary GPT-NeoX
    and the windowed Gemma 3, layer by layer, against our hook_pattern."""
    from mechscope.core.hooks import run_with_cache

    for name in ("gpt_neox-parallel", "gemma3"):
        ref, path = tiny_family(name)
        model, _ = load_model(path, device="cpu", dtype="float32")
        x = tokens()
        names = [f"blocks.{i}.attn.hook_pattern" for i in range(model.cfg.n_layers)]
        with torch.no_grad():
            theirs = ref(x, output_attentions=True).attentions
            _, cache = run_with_cache(model, x, names=names)
        for i, n in enumerate(names):
            torch.testing.assert_close(cache[n], theirs[i], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# GGUF: non-default epsilon and rotary base


def test_gguf_epsilon_and_rotary_base_are_read(tmp_path):
    """Outside truth: transformers' LlamaForCausalLM with rms_norm_eps 0.05 and rope_theta 500 on the weights the gguf
    package wrote (llama.cpp's defaults are 1e-5 and 10000: a reader ignoring the keys would not show at those)."""
    from tests.unit.test_gguf import llama_as_gguf

    extra = {"llama.rope.freq_base": 500.0, "llama.attention.layer_norm_rms_epsilon": 0.05}
    ref = llama_as_gguf(tmp_path / "t.gguf", None, extra)
    cfg = transformers.LlamaConfig(**{**ref.config.to_dict(), "rope_theta": 500.0, "rms_norm_eps": 0.05})
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": 500.0}
    truth = transformers.LlamaForCausalLM(cfg).eval()
    truth.load_state_dict(ref.state_dict())
    model, _ = load_model(tmp_path / "t.gguf", device="cpu")
    assert model.cfg.rotary_base == 500.0 and model.cfg.norm_eps == pytest.approx(0.05)
    x = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), truth(x).logits, rtol=1e-4, atol=1e-4)


def _rewritten_gguf(monkeypatch, path, change):
    """test_gguf's tiny Llama written as GGUF, its tensors and metadata passed through ``change`` before writing."""
    from tests.unit import test_gguf

    real = test_gguf.write
    monkeypatch.setattr(test_gguf, "write", lambda p, tensors, meta: real(p, *change(dict(tensors), dict(meta))))
    return test_gguf.llama_as_gguf(path)


def test_gguf_without_output_weight_is_tied(monkeypatch, tmp_path):
    """Outside truth: llama.cpp writes no output.weight for a tied model (SmolLM2); transformers' Llama with its
    lm_head set to the embedding on the same weights."""

    def drop_output(tensors, meta):
        tensors.pop("output.weight")
        return tensors, meta

    ref = _rewritten_gguf(monkeypatch, tmp_path / "t.gguf", drop_output)
    with torch.no_grad():
        ref.lm_head.weight.copy_(ref.model.embed_tokens.weight)
    model, _ = load_model(tmp_path / "t.gguf", device="cpu")
    x = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, rtol=1e-4, atol=1e-4)


def test_gguf_without_head_count_kv_has_one_kv_head_per_head(monkeypatch, tmp_path):
    """Outside truth: llama.cpp reads a missing attention.head_count_kv as head_count; the file's 2 key/value heads
    each repeated for its 2 query heads (numpy repeat) make that 4-head model, which computes what transformers'
    2-key/value-head Llama does on the original weights."""
    import numpy as np

    def four_kv_heads(tensors, meta):
        meta.pop("llama.attention.head_count_kv")
        for name, (w, q) in list(tensors.items()):
            if name.endswith(("attn_k.weight", "attn_v.weight")):
                tensors[name] = (np.repeat(w.reshape(2, 16, 64), 2, axis=0).reshape(64, 64), q)
        return tensors, meta

    ref = _rewritten_gguf(monkeypatch, tmp_path / "t.gguf", four_kv_heads)
    model, _ = load_model(tmp_path / "t.gguf", device="cpu")
    assert model.cfg.kv_heads == 4
    x = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, rtol=1e-4, atol=1e-4)


def test_tracr_scale_defaults_to_one_over_sqrt_d_head(tmp_path):
    """Outside truth: tracr's attention scale is 1/sqrt(padded d_head) (its config's scale_note); with the explicit
    attention.scale removed, hist (d_head 5) still reproduces the compiled model's logits in examples.json."""
    import json
    import shutil

    from mechscope.lm.models.convert.tracr import read_examples
    from tests.conftest import shared_data_root

    root = shared_data_root()
    if root is None or not (root / "tracr" / "hist").is_dir():
        pytest.skip("tracr models not found in $MECHSCOPE_DATA or ../shared/data")
    d = shutil.copytree(root / "tracr" / "hist", tmp_path / "hist")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["attention"]["scale"]
    (d / "config.json").chmod(0o644)
    (d / "config.json").write_text(json.dumps(cfg))
    model, _ = load_model(d, device="cpu")
    assert model.cfg.attn_scale == pytest.approx(1 / 5**0.5)
    ex = read_examples(d, model.tracr, model.cfg.d_vocab, model.cfg.n_logits)
    with torch.no_grad():
        for ids, logits in list(zip(ex.ids, ex.logits, strict=True))[:20]:
            torch.testing.assert_close(model(torch.tensor([ids]))[0], torch.tensor(logits), rtol=1e-6, atol=5e-6)


# ---------------------------------------------------------------------------------------------------------------
# Device plans, by hand (no device is touched)


def test_placement_is_longest_whole_name_prefix():
    """Outside truth: the rule written out by hand: a parameter goes where its longest plan entry that is the whole
    name or a dotted prefix of it says ("blocks.1" is no prefix of "blocks.10..."), disk reads to the CPU first."""
    plan = {"": "cuda:2", "blocks": "cuda:1", "blocks.1": "disk", "blocks.10": "cuda:3", "W_U_untied": "cpu"}
    where = placement(plan)
    expected = {
        "W_E": "cuda:2",
        "W_U_untied": "cpu",
        "blocks.0.attn.q.weight": "cuda:1",
        "blocks.1.mlp.up.weight": "cpu",
        "blocks.10.ln1.w": "cuda:3",
        "blocks.11.ln1.w": "cuda:1",
    }
    assert {k: where(k) for k in expected} == expected
    assert placement({"blocks.0": "cuda:0"})("W_E") == "cpu"  # no entry: the CPU


def test_root_entry_expands_and_root_weights_stay_in_memory():
    """Outside truth: the model's own children and root parameters listed by torch (named_children,
    named_parameters(recurse=False)); a whole-model entry becomes one per child, an explicit entry is kept, and a
    root parameter planned for disk is moved to the CPU (accelerate pages only modules)."""
    from mechscope.lm.models.transformer import HookedTransformer, TransformerConfig

    cfg = TransformerConfig(d_model=8, n_layers=2, n_heads=2, d_head=4, d_vocab=11, n_ctx=6, d_mlp=12)
    with torch.device("meta"):
        meta = HookedTransformer(cfg)
    children = [n for n, _ in meta.named_children()]
    roots = [n for n, _ in meta.named_parameters(recurse=False)]
    assert roots and "blocks" in children
    plan = _expand({"": "disk", "blocks": "cuda:1"}, meta)
    expected = {**dict.fromkeys(children, "disk"), **dict.fromkeys(roots, "cpu"), "blocks": "cuda:1"}
    assert plan == expected
    assert [_normalise(3), _normalise("cuda:0"), _normalise("disk")] == ["cuda:3", "cuda:0", "disk"]
