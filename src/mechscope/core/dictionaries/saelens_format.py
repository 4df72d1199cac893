"""SAELens' on-disk layout: a directory with ``cfg.json`` and ``sae_weights.safetensors``.

Tensors (SAELens' names and orientation): ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_out]``,
``b_dec [d_out]``, ``threshold [d_sae]`` (jumprelu; BatchTopK is saved as a JumpReLU with its one threshold in
every entry, as SAELens does), ``W_skip [d_out, d_in]`` (skip transcoders).

``cfg.json`` is written with SAELens' flat keys (``d_in``, ``d_sae``, ``architecture``, ``hook_name``,
``hook_layer``, ``dtype``, ``device``, ``normalize_activations``, ``apply_b_dec_to_input``, ``model_name``,
``context_size``, ``prepend_bos``, ``dataset_path``, ``k`` and ``activation_fn_kwargs`` for topk, ``d_out`` and
``hook_name_out``/``hook_layer_out`` for transcoders), the same under ``metadata`` as SAELens 6 nests them, and
a ``mechscope`` block with our own settings (SAELens ignores it). The normalisation factor is folded into the
weights before saving (SAELens keeps no factor in the directory), so ``normalize_activations`` is "none".

Architectures: standard (= relu), topk, jumprelu, transcoder, skip_transcoder, jumprelu_transcoder,
jumprelu_skip_transcoder. SAELens has no TopK/BatchTopK transcoder: those save with a ``topk_transcoder``
architecture SAELens cannot read, which :func:`load_saelens` reads back.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import save_file

from mechscope.core.dictionaries.config import DictionaryConfig
from mechscope.core.dictionaries.sae import SparseDictionary
from mechscope.core.errors import MechscopeError
from mechscope.core.validate import read_safetensors

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
_RENAMED = {
    "hook_point": "hook_name",
    "hook_point_layer": "hook_layer",
    "hook_point_head_index": "hook_head_index",
    "activation_fn_str": "activation_fn",
}
_METADATA = (
    "model_name",
    "hook_name",
    "hook_layer",
    "hook_head_index",
    "context_size",
    "prepend_bos",
    "dataset_path",
    "hook_name_out",
    "hook_layer_out",
    "hook_head_index_out",
)
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SAE_ARCH = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}
_TC_ARCH = {
    ("relu", False): "transcoder",
    ("relu", True): "skip_transcoder",
    ("jumprelu", False): "jumprelu_transcoder",
    ("jumprelu", True): "jumprelu_skip_transcoder",
    ("batchtopk", False): "jumprelu_transcoder",
    ("batchtopk", True): "jumprelu_skip_transcoder",
    ("topk", False): "topk_transcoder",
    ("topk", True): "topk_skip_transcoder",
}
_READ_ARCH = {
    "standard": ("relu", False, False),
    "topk": ("topk", False, False),
    "jumprelu": ("jumprelu", False, False),
    **{name: (arch, True, skip) for (arch, skip), name in _TC_ARCH.items() if arch != "batchtopk"},
}


class LoadedDictionary(NamedTuple):
    """A dictionary read from disk and the rest of its ``cfg.json`` (hook, model, dataset; SAELens' names)."""

    model: SparseDictionary
    metadata: dict


def saelens_architecture(cfg: DictionaryConfig) -> str:
    """The ``architecture`` SAELens writes for ``cfg``."""
    return _TC_ARCH[(cfg.architecture, cfg.skip)] if cfg.transcoder else _SAE_ARCH[cfg.architecture]


def save_saelens(
    model: SparseDictionary,
    path,
    *,
    hook_name: str = "",
    hook_layer: int = 0,
    model_name: str = "",
    context_size: int | None = None,
    prepend_bos: bool = True,
    dataset_path: str = "",
    hook_name_out: str | None = None,
    hook_layer_out: int | None = None,
) -> Path:
    """Write ``model`` (its normalisation folded in) to the directory ``path``; returns it."""
    if not isinstance(model, SparseDictionary):
        raise MechscopeError(f"expected a SparseDictionary, got {type(model).__name__}")
    folded = model.folded()
    cfg = folded.cfg
    meta = {
        "model_name": model_name,
        "hook_name": hook_name,
        "hook_layer": hook_layer,
        "hook_head_index": None,
        "context_size": context_size,
        "prepend_bos": prepend_bos,
        "dataset_path": dataset_path,
    }
    if cfg.transcoder:
        meta |= {"hook_name_out": hook_name_out or "", "hook_layer_out": hook_layer_out, "hook_head_index_out": None}
    out: dict[str, Any] = {
        "architecture": saelens_architecture(cfg),
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": bool(cfg.apply_b_dec_to_input),
        "normalize_activations": "none",
        "reshape_activations": "none",
        "activation_fn": "topk" if cfg.architecture == "topk" else "relu",
        "activation_fn_str": "topk" if cfg.architecture == "topk" else "relu",  # SAELens 3-5's spelling
        **meta,
    }
    if cfg.architecture == "topk":
        out |= {"k": cfg.k, "activation_fn_kwargs": {"k": cfg.k}, "rescale_acts_by_decoder_norm": False}
    if cfg.transcoder:
        out["d_out"] = cfg.d_out
    out["metadata"] = dict(meta)
    out["mechscope"] = {
        "config": cfg.to_dict(),
        "folded_in_scale": model.in_scale.item(),
        "folded_out_scale": model.out_scale.item(),
        "normalize_activations": model.cfg.normalize_activations,
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    names = (
        ["W_enc", "b_enc", "W_dec", "b_dec"]
        + (["threshold"] if cfg.uses_threshold else [])
        + (["W_skip"] if cfg.skip else [])
    )
    state = folded.state_dict()
    save_file({n: state[n].detach().contiguous() for n in names}, str(path / WEIGHTS_FILE))
    (path / CFG_FILE).write_text(json.dumps(out, indent=2), encoding="utf-8")
    return path


def load_saelens(path, *, norm_scaling_factor: float | None = None) -> LoadedDictionary:
    """Read a dictionary saved by :func:`save_saelens` or by SAELens (current and older ``cfg.json`` keys).

    norm_scaling_factor: the factor of an ``expected_average_only_in`` dictionary (SAELens keeps it outside
    the directory; refused for a file without normalisation, whose weights hold it). Every field and tensor is
    checked; anything wrong is a one-line :class:`MechscopeError`, as is a key whose flat and ``metadata`` values
    differ or a flat ``k`` that differs from ``activation_fn_kwargs.k`` (no rule says which one wins).
    """
    path = Path(path)
    raw = _read_cfg(path)
    cfg, meta = _dictionary_config(path, raw, norm_scaling_factor)
    tensors = _read_tensors(path, cfg, raw)
    model = SparseDictionary.blank(cfg)
    state = model.state_dict()
    for name, t in tensors.items():
        state[name] = t
    if cfg.normalize_activations != "none":
        state["in_scale"] = state["out_scale"] = torch.tensor(float(norm_scaling_factor), dtype=torch.float64)
    model.load_state_dict(state)
    return LoadedDictionary(model.eval(), meta)


def dictionary_folder(path) -> Path:
    """``path`` as a dictionary's folder, refused in one line when it is a file (cfg.json itself was ".../cfg.json/
    cfg.json: not found", or, as a default output folder's parent, "cfg.json/evaluation: not a directory")."""
    path = Path(path)
    if path.is_file():
        raise MechscopeError(f"{path}: a file; give the dictionary's folder, which holds {CFG_FILE} and {WEIGHTS_FILE}")
    return path


def _read_cfg(path: Path) -> dict:
    where = path / CFG_FILE
    dictionary_folder(path)
    if not where.is_file():
        raise MechscopeError(f"{where}: not found (expected a SAELens directory with {CFG_FILE} and {WEIGHTS_FILE})")
    try:
        raw = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise MechscopeError(f"{where}: not readable JSON ({type(e).__name__})") from None
    if not isinstance(raw, dict):
        raise MechscopeError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    flat = {_RENAMED.get(k, k): v for k, v in raw.items()}
    nested = raw.get("metadata")
    if nested is not None and not isinstance(nested, dict):  # SAELens 6 writes an object; anything else is lost keys
        raise MechscopeError(f"{where}: expected metadata to be a JSON object, got {type(nested).__name__}")
    if isinstance(nested, dict):
        for k, v in nested.items():
            key = _RENAMED.get(k, k)
            if flat.get(key) is not None and v is not None and flat[key] != v:  # no rule says which one wins
                raise MechscopeError(f"{where}: {key} is {flat[key]!r} but metadata.{k} is {v!r}")
            flat.setdefault(key, v)
    return flat


def _int_field(where: Path, raw: dict, key: str) -> int:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise MechscopeError(f"{where}: expected {key} to be a positive integer, got {value!r}")
    return value


def _d_sae(where: Path, raw: dict, d_in: int) -> int:
    if raw.get("d_sae") is not None:
        return _int_field(where, raw, "d_sae")
    factor = raw.get("expansion_factor")
    if (
        isinstance(factor, bool)
        or not isinstance(factor, (int, float))
        or factor <= 0
        or d_in * factor != int(d_in * factor)
    ):
        raise MechscopeError(f"{where}: expected d_sae, or an expansion_factor giving a whole d_sae, got {factor!r}")
    return int(d_in * factor)


def _architecture(where: Path, raw: dict) -> tuple[str, bool, bool, int | None]:
    name = raw.get("architecture", "standard")
    if not isinstance(name, str):
        raise MechscopeError(f"{where}: expected architecture to be a string, got {name!r}")
    fn = raw.get("activation_fn")
    kwargs = raw.get("activation_fn_kwargs")
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, dict):
        raise MechscopeError(f"{where}: expected activation_fn_kwargs to be a JSON object, got {type(kwargs).__name__}")
    k = raw.get("k", kwargs.get("k"))
    if None not in (raw.get("k"), kwargs.get("k")) and raw["k"] != kwargs["k"]:
        raise MechscopeError(f"{where}: k is {raw['k']!r} but activation_fn_kwargs.k is {kwargs['k']!r}")
    if name == "standard" and fn == "topk":  # SAELens 3-5 wrote TopK SAEs as standard + activation_fn topk
        name = "topk"
    if name not in _READ_ARCH:
        raise MechscopeError(f"{where}: architecture {name!r} is not supported (supported: {', '.join(_READ_ARCH)})")
    arch, transcoder, skip = _READ_ARCH[name]
    if fn not in (None, "relu") and not (fn == "topk" and arch == "topk"):
        raise MechscopeError(f"{where}: activation_fn {fn!r} is not supported with architecture {name!r}")
    if raw.get("rescale_acts_by_decoder_norm"):
        raise MechscopeError(
            f"{where}: rescale_acts_by_decoder_norm=true is not supported (fold the decoder norm first)"
        )
    return arch, transcoder, skip, k if arch == "topk" else None


def _dictionary_config(path: Path, raw: dict, norm_scaling_factor) -> tuple[DictionaryConfig, dict]:
    where = path / CFG_FILE
    d_in = _int_field(where, raw, "d_in")
    d_sae = _d_sae(where, raw, d_in)
    arch, transcoder, skip, k = _architecture(where, raw)
    dtype = str(raw.get("dtype", "float32")).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise MechscopeError(f"{where}: expected dtype in {tuple(_DTYPES)}, got {raw.get('dtype')!r}")
    norm = _normalisation(where, raw.get("normalize_activations", "none"), norm_scaling_factor)
    apply = raw.get("apply_b_dec_to_input", not transcoder)
    if not isinstance(apply, bool):
        raise MechscopeError(f"{where}: expected apply_b_dec_to_input to be true or false, got {apply!r}")
    d_out = _int_field(where, raw, "d_out") if transcoder else None
    try:
        cfg = DictionaryConfig(
            d_in=d_in,
            d_sae=d_sae,
            architecture=arch,
            k=k,
            apply_b_dec_to_input=apply,
            dtype=dtype,
            normalize_activations=norm,
            transcoder=transcoder,
            d_out=d_out,
            skip=skip,
        )
    except MechscopeError as e:
        raise MechscopeError(f"{where}: {e}") from None
    cfg = _ours(where, raw, cfg)
    return cfg, {k: raw.get(k) for k in _METADATA if k in raw} | (
        {"mechscope": raw["mechscope"]} if "mechscope" in raw else {}
    )


def _normalisation(where: Path, value, factor) -> str:
    if value is None or value is False or value == "none":
        if factor is not None:  # the weights hold any normalisation already: a factor here would be a mistake
            raise MechscopeError(f"{where}: normalize_activations is none, so the file takes no norm_scaling_factor")
        return "none"
    if value is True or value == "expected_average_only_in":
        if factor is None or not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
            raise MechscopeError(
                f"{where}: normalize_activations=expected_average_only_in needs norm_scaling_factor (> 0)"
            )
        return "expected_average_only_in"
    raise MechscopeError(
        f"{where}: normalize_activations {value!r} is not supported (supported: none, expected_average_only_in)"
    )


def _ours(where: Path, raw: dict, cfg: DictionaryConfig) -> DictionaryConfig:
    """Our own settings from the ``mechscope`` block, checked against SAELens' keys."""
    block = raw.get("mechscope")
    if block is None:
        return cfg
    if not isinstance(block, dict):
        raise MechscopeError(f"{where}: expected the mechscope block to be a JSON object")
    try:
        ours = DictionaryConfig.from_dict(block.get("config"))
    except MechscopeError as e:
        raise MechscopeError(f"{where}: mechscope block: {e}") from None
    for key in ("d_in", "d_sae", "d_out", "transcoder", "skip", "dtype", "apply_b_dec_to_input"):
        if getattr(ours, key) != getattr(cfg, key):
            raise MechscopeError(
                f"{where}: mechscope block has {key}={getattr(ours, key)!r}, cfg.json {getattr(cfg, key)!r}"
            )
    if saelens_architecture(ours) != raw.get("architecture"):
        raise MechscopeError(
            f"{where}: mechscope block's {ours.architecture} does not match architecture {raw.get('architecture')!r}"
        )
    return ours if cfg.normalize_activations == "none" else cfg


def _read_tensors(path: Path, cfg: DictionaryConfig, raw: dict) -> dict[str, torch.Tensor]:
    where = path / WEIGHTS_FILE
    tensors = read_safetensors(where)
    tensors = _legacy_tensors(where, tensors)
    shapes = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "b_enc": (cfg.d_sae,),
        "W_dec": (cfg.d_sae, cfg.d_out),
        "b_dec": (cfg.d_out,),
    }
    if cfg.uses_threshold:
        shapes["threshold"] = (cfg.d_sae,)
    if cfg.skip:
        shapes["W_skip"] = (cfg.d_out, cfg.d_in)
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        raise MechscopeError(
            f"{where}: unexpected tensors {', '.join(extra)} for architecture {raw.get('architecture')!r}"
        )
    want = _DTYPES[cfg.dtype]
    for name, shape in shapes.items():
        t = tensors.get(name)
        if t is None:
            raise MechscopeError(f"{where}: missing tensor {name} (expected shape {list(shape)})")
        if tuple(t.shape) != shape:
            raise MechscopeError(f"{where}: tensor {name} has shape {list(t.shape)}, cfg.json says {list(shape)}")
        if t.dtype != want:
            raise MechscopeError(
                f"{where}: tensor {name} is {str(t.dtype).removeprefix('torch.')}, cfg.json says {cfg.dtype}"
            )
        if not torch.isfinite(t).all():
            raise MechscopeError(f"{where}: tensor {name} has NaN or infinite values")
    return tensors


def _legacy_tensors(where: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SAELens' older tensors: ``log_threshold`` (-> threshold), an all-ones ``scaling_factor`` (dropped)."""
    tensors = dict(tensors)
    if "log_threshold" in tensors and "threshold" not in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    scale = tensors.pop("scaling_factor", None)
    if scale is not None and not torch.all(scale == 1):
        raise MechscopeError(f"{where}: a finetuning scaling_factor other than 1 is not supported")
    return tensors
