"""Config values the tiny checkpoints leave at their defaults, against transformers on the same folder.

The tiny checkpoints (families.py) are saved by transformers 5, which writes its own current fields
(``rope_parameters``, ``layer_types``...): the legacy fields of hub configs (Pythia's ``rotary_pct``,
Gemma 3's ``sliding_window_pattern``, google/gemma-2b's ``hidden_act: "gelu"``) never reach our
converters there. Each test here edits a copy's config.json (or builds a checkpoint with a
non-default value) and compares our float32 logits with what transformers computes from that very
folder, or checks a refusal.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mechscope.core.errors import MechscopeError  # noqa: E402
from mechscope.lm.models.loading import load_model  # noqa: E402
from tests.conftest import shared_data_root  # noqa: E402
from tests.parity.families import V, save_random, tokens  # noqa: E402
from tests.parity.test_family_inputs import edited  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
warnings.filterwarnings("ignore", module="transformers")
transformers.logging.set_verbosity_error()


def max_diff(path) -> float:
    """max |our logits - transformers' logits| for the checkpoint folder, both read from it, in float32."""
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    model, _ = load_model(path, device="cpu", dtype="float32")
    x = tokens()
    with torch.no_grad():
        return (model(x) - ref(x).logits).abs().max().item()


# (tiny family, config.json fields set; None: removed); the hub config each one mirrors in its comment
EDITS = {
    # google/gemma-2b: hidden_act "gelu", which transformers' Gemma runs as the tanh approximation
    "gemma-hidden_act-gelu": ("gemma", {"hidden_act": "gelu"}),
    # Gemma 3's local layers with their own rotary base (rope_parameters per layer type)
    "gemma3-sliding-rope_theta": (
        "gemma3",
        {
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            }
        },
    ),
    # hub Gemma 3 configs: no layer_types, sliding_window_pattern; every pattern-th layer global (layer 1 of 2)
    "gemma3-sliding_window_pattern": (
        "gemma3",
        {"layer_types": None, "_sliding_window_pattern": None, "sliding_window_pattern": 2},
    ),
    # hub Gemma 2 configs: no layer_types; odd layers global
    "gemma2-no-layer_types": ("gemma2", {"layer_types": None}),
    # Pythia's config.json: rotary_pct and rotary_emb_base, no rope_parameters
    "neox-legacy-rotary": (
        "gpt_neox-parallel",
        {"rope_parameters": None, "rope_theta": None, "partial_rotary_factor": None, "rotary_pct": 0.5,
         "rotary_emb_base": 5000},
    ),
    # non-default LayerNorm epsilons under each family's own key
    "neox-layer_norm_eps": ("gpt_neox-parallel", {"layer_norm_eps": 0.01}),
    "gpt_neo-layer_norm_epsilon": ("gpt_neo", {"layer_norm_epsilon": 0.01}),
    "gptj-layer_norm_epsilon": ("gptj", {"layer_norm_epsilon": 0.01}),
}

# measured: 2.4e-6 for gemma with hidden_act "gelu" against 3.9e-4 if it ran as the exact erf GELU, and the
# other mix-ups at 1e-2 or more; test_families.py's 1e-4 (there with rtol 1e-4 too) would not separate the first
TOL = 3e-5


@pytest.mark.parametrize("case", EDITS)
def test_edited_config_matches_transformers(case, tiny_family, tmp_path):
    """Outside truth: transformers' logits on the same edited folder (its config class reads the legacy fields)."""
    check_edited(case, *EDITS[case], tiny_family, tmp_path)


def check_edited(case: str, name: str, changes: dict, tiny_family, tmp_path) -> None:
    """Tiny family ``name`` with its config.json edited by ``changes``: our logits within TOL of transformers'."""
    _, path = tiny_family(name)
    diff = max_diff(edited(path, tmp_path / "edited", **changes))
    assert diff < TOL, f"{case}: max |diff| {diff:.2e}"


BUILT = {
    # OPT without LayerNorm weights: transformers' LayerNorm(elementwise_affine=False) normalises only
    "opt-no-affine": lambda t: t.OPTConfig(**_opt(), layer_norm_elementwise_affine=False),
    # OPT with its own lm_head
    "opt-untied": lambda t: t.OPTConfig(**_opt(), tie_word_embeddings=False),
    # GPT-2 with a non-default layer_norm_epsilon (GPT-2's key, not layer_norm_eps)
    "gpt2-layer_norm_epsilon": lambda t: t.GPT2Config(
        vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, layer_norm_epsilon=0.01
    ),
}


def _opt() -> dict:
    return dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=96,
                max_position_embeddings=64, word_embed_proj_dim=64)  # fmt: skip


@pytest.mark.parametrize("case", BUILT)
def test_built_config_matches_transformers(case, tmp_path):
    """Outside truth: transformers' logits on a checkpoint it built and saved with the non-default value."""
    save_random(transformers, BUILT[case](transformers), tmp_path)
    if case == "opt-untied":  # the saved lm_head is its own tensor, not the embedding
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
        assert not torch.equal(ref.lm_head.weight, ref.model.decoder.embed_tokens.weight)
    diff = max_diff(tmp_path)
    assert diff < TOL, f"{case}: max |diff| {diff:.2e}"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tie_word_embeddings": False}, "unsupported GPT-2 config: tie_word_embeddings=False (supported: True)"),
        ({"scale_attn_weights": False}, "unsupported GPT-2 config: scale_attn_weights=False (supported: True)"),
    ],
)
def test_gpt2_values_we_do_not_build_are_refused(change, message, tmp_path):
    """Outside truth: transformers' GPT-2 with an untied lm_head or unscaled attention scores is another
    function than the one we build; refused in one line rather than run as something else."""
    save_random(transformers, BUILT["gpt2-layer_norm_epsilon"](transformers), tmp_path / "src")
    bad = edited(tmp_path / "src", tmp_path / "bad", **change)
    with pytest.raises(MechscopeError) as e:
        load_model(bad, device="cpu")
    assert str(e.value) == f"{bad}: {message}"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(layer_norm=True), "field 'layer_norm' is true; tracr models have no LayerNorm"),
        (lambda c: c["mlp"].update(activation="gelu"), "field 'mlp.activation' is \"gelu\"; tracr MLPs are ReLU"),
    ],
    ids=["layer_norm", "mlp.activation"],
)
def test_tracr_folder_claiming_another_model_is_refused(change, message, tmp_path):
    """Outside truth: tracr (Lindner et al. 2023) compiles models with no LayerNorm and ReLU MLPs, which is all
    we build; a config.json claiming otherwise is refused in one line naming the folder and the field."""
    root = shared_data_root()
    if root is None or not (root / "tracr" / "hist").is_dir():
        pytest.skip("tracr models not found in $MECHSCOPE_DATA or ../shared/data")
    d = tmp_path / "hist"
    shutil.copytree(root / "tracr" / "hist", d)
    for f in d.iterdir():
        f.chmod(0o644)
    cfg = json.loads((d / "config.json").read_text())
    change(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MechscopeError) as e:
        load_model(d, device="cpu")
    text = str(e.value)
    assert "\n" not in text and text.startswith(f"{d / 'config.json'}: ") and message in text, text


@pytest.mark.parametrize("name", ["gptj", "gpt_neo"])
def test_gptj_and_gpt_neo_attention_scores_in_float32(name, tiny_family):
    """Outside truth: transformers' GPTJAttention and GPTNeoSelfAttention cast queries and keys to float32 before
    the score matmul (whatever the model's dtype); in float32 the switch changes nothing, so the float32 parity tests
    cannot see it, and test_families.py's bfloat16 check only bounds the error. The converters must set it."""
    _, path = tiny_family(name)
    model, _ = load_model(path, device="cpu")
    assert model.cfg.attn_scores_float32 is True
