"""tracr's compiled transformers (Lindner et al. 2023) as mechscope transformers, with their examples.

A tracr folder (``shared/data/tracr/<program>``; its README gives the layout) holds ``config.json`` (sizes, BOS and
PAD ids, causal or not, the attention scale, the output: categorical with its vocabulary or numerical),
``model.safetensors`` with TransformerLens names (``embed.W_E`` [V, D], ``pos_embed.W_pos`` [n_ctx, D],
``blocks.L.attn.W_Q/W_K/W_V`` [H, D, Dh], ``W_O`` [H, Dh, D], ``blocks.L.mlp.W_in`` [D, M], ``b_in``, ``W_out``,
``b_out``, ``unembed.W_U`` [D, V_out]), ``circuit.json`` (the ground truth) and ``examples.json``.

The model is our :class:`~mechscope.lm.models.transformer.HookedTransformer` with ``norm="none"`` (no LayerNorm,
no final norm), ReLU MLPs with biases, no attention biases, learned positions, its own attention scale
(1/sqrt(padded d_head)), ``causal`` from the config (only ``frac_prevs`` is causal) and ``d_vocab_out`` logits.
BOS sits at position 0 and every sequence runs at its own length: PAD is an ordinary token and padding would
change a non-causal model's outputs. :func:`is_tracr_dir` is what :func:`~mechscope.lm.models.loading.load_model`
detects; every missing or inconsistent file is a one-line error naming it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from mechscope.core.errors import MechscopeError
from mechscope.lm.models.transformer import TransformerConfig

FILES = ("config.json", "model.safetensors", "circuit.json", "examples.json")
SIZES = ("d_model", "n_layers", "n_heads", "d_head", "d_mlp", "n_ctx", "d_vocab", "d_vocab_out")


@dataclass(frozen=True)
class TracrInfo:
    """What running a tracr model needs beyond its weights: the vocabularies, BOS and the kind of output."""

    name: str
    directory: str
    input_vocab: tuple[str, ...]
    bos_id: int
    pad_id: int | None
    output_type: str  # categorical | numerical
    output_vocab: tuple | None
    causal: bool
    max_seq_len: int


class VocabTokenizer:
    """A tracr vocabulary as a tokenizer: ``encode`` maps whitespace-separated words (``"a c b"``) to their ids,
    ``decode`` ids to their words. Built from :class:`TracrInfo`'s input or (categorical) output vocabulary."""

    def __init__(self, words, what: str = "vocabulary") -> None:
        self.words = tuple(str(w) for w in words)
        self.lookup = {w: i for i, w in enumerate(self.words)}
        self.what = what

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        unknown = [w for w in text.split() if w not in self.lookup]
        if unknown:
            raise MechscopeError(f"{unknown[0]!r} is not in the {self.what} ({', '.join(self.words)}); separate "
                                 "words with spaces")  # fmt: skip
        return [self.lookup[w] for w in text.split()]

    def decode(self, ids) -> str:
        return " ".join(self.words[int(i)] if 0 <= int(i) < len(self.words) else f"#{int(i)}" for i in ids)


def vocab_tokenizers(model) -> tuple[VocabTokenizer | None, VocabTokenizer | None]:
    """(input, output) tokenizers of a tracr model (``model.tracr``; the output one for a categorical output
    only), or (None, None) for any other model."""
    info = getattr(model, "tracr", None)
    if info is None:
        return None, None
    out = VocabTokenizer(info.output_vocab, "output vocabulary") if info.output_vocab is not None else None
    return VocabTokenizer(info.input_vocab, "input vocabulary"), out


@dataclass(frozen=True)
class TracrExamples:
    """``examples.json``: token ids (BOS first, each its own length), the compiled model's outputs at positions
    1..n (class ids or values) and its logits at every position."""

    ids: tuple[tuple[int, ...], ...]
    outputs: tuple[tuple, ...]  # class ids (categorical) or values (numerical), positions 1..n
    logits: tuple[tuple[tuple[float, ...], ...], ...]  # [n+1, V_out] per example
    rasp: tuple[tuple, ...]

    def __len__(self) -> int:
        return len(self.ids)


def is_tracr_dir(path: str | Path) -> bool:
    """A folder whose ``config.json`` says tracr compiled it."""
    path = Path(path)
    cfg = path / "config.json"
    if not (path.is_dir() and cfg.is_file()):
        return False
    try:
        import json

        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):  # not tracr's: the loader says what it is
        return False
    source = data.get("source") if isinstance(data, dict) else None
    return isinstance(source, dict) and str(source.get("compiler", "")).lower().startswith("tracr")


def _need(directory: Path, name: str) -> Path:
    path = directory / name
    if not path.is_file():
        raise MechscopeError(f"{path}: missing; a tracr folder holds {', '.join(FILES)}")
    return path


def _int(config: dict, key: str, where: Path, low: int = 1) -> int:
    v = config.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise MechscopeError(f"{where}: field {key!r} is {v!r}; expected a whole number >= {low}")
    return v


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _refuse(path: Path, key: str, value, want: str):
    from mechscope.core.validate import shown

    raise MechscopeError(f"{path}: field {key!r} is {shown(value)}; {want}")


def check_claims(config: dict, path: Path) -> None:
    """What config.json says the model is beyond its sizes, against what :func:`tracr_config` builds: no LayerNorm,
    ReLU MLPs, BOS and PAD named in the input vocabulary, a distinct name per token and per class. A folder that
    claims another model is one line naming the file and the field, not run as something else. A field left out
    is not required. (What depends on the sizes is :func:`check_block_claims`, once the weights match them.)"""
    from mechscope.core.validate import repeated

    for key in ("attention", "mlp", "head_widths", "tensors"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            _refuse(path, key, config[key], "expected a JSON object")
    if config.get("layer_norm", False) is not False:
        _refuse(path, "layer_norm", config["layer_norm"], "tracr models have no LayerNorm and mechscope builds none "
                "(false)")  # fmt: skip
    act = (config.get("mlp") or {}).get("activation", "relu")
    if act != "relu":
        _refuse(path, "mlp.activation", act, 'tracr MLPs are ReLU and mechscope builds them so ("relu")')
    vocab = config["input_vocab"]
    if not all(isinstance(t, str) for t in vocab) or repeated(vocab):
        _refuse(path, "input_vocab", vocab, "expected distinct token strings, the token with id i at index i")
    for key, id_key in (("bos_token", "bos_id"), ("pad_token", "pad_id")):
        token, i = config.get(key), config.get(id_key)
        if key in config and (token not in vocab or (i is not None and token != vocab[i])):
            said = f"input_vocab[{id_key} = {i}] is {vocab[i]!r}" if i is not None else "it is not in input_vocab"
            _refuse(path, key, token, said)
    out = config["output"]
    if out["type"] == "categorical" and (
        not all(isinstance(c, (str, int, float)) and not isinstance(c, bool) for c in out["vocab"])
        or repeated(str(c) for c in out["vocab"])
    ):  # fmt: skip
        _refuse(path, "output.vocab", out["vocab"], "expected a distinct name (a string or a number) for every class")


def check_block_claims(config: dict, path: Path) -> None:
    """config.json's per-block and per-head fields against its sizes (checked against model.safetensors first):
    one presence flag and MLP width per block, a head width per head at most ``d_head``, the tensor shapes the
    weights have, one residual label per dimension. A field left out is not required."""
    L, H, Dh, M, D = config["n_layers"], config["n_heads"], config["d_head"], config["d_mlp"], config["d_model"]
    for key in ("attn_present", "mlp_present"):
        flags = config.get(key, [True] * L)
        if not isinstance(flags, list) or len(flags) != L or not all(isinstance(x, bool) for x in flags):
            _refuse(path, key, flags, f"expected n_layers = {L} flags (true or false), one per block")
    widths = config.get("mlp_widths", [0] * L)
    if not isinstance(widths, list) or len(widths) != L or not all(_is_int(w) and 0 <= w <= M for w in widths):
        _refuse(path, "mlp_widths", widths, f"expected n_layers = {L} widths from 0 to d_mlp = {M}, one per block")
    for kind in ("qk", "ov"):
        widths = (config.get("head_widths") or {}).get(kind, [[0] * H] * L)
        if not isinstance(widths, list) or len(widths) != L or not all(
            isinstance(row, list) and len(row) == H and all(_is_int(w) and 0 <= w <= Dh for w in row) for row in widths
        ):
            _refuse(path, f"head_widths.{kind}", widths, f"expected [{L} blocks][{H} heads] widths from 0 to d_head "
                    f"= {Dh}")  # fmt: skip
    if config.get("tensors") is not None:
        expected = expected_shapes(config)
        for name, shape in config["tensors"].items():
            if name not in expected:
                _refuse(path, f"tensors.{name}", shape, f"the model has no such tensor ({L} blocks)")
            if shape != list(expected[name]):
                _refuse(path, f"tensors.{name}", shape, f"model.safetensors holds {list(expected[name])}")
        missing = sorted(set(expected) - set(config["tensors"]))
        if missing:
            raise MechscopeError(f"{path}: field 'tensors' lacks {missing[0]}, a tensor of this model")
    for key in ("residual_labels", "residual_dims"):
        dims = config.get(key, [None] * D)
        if not isinstance(dims, list) or len(dims) != D:
            _refuse(path, key, dims, f"expected d_model = {D} entries, one per residual dimension")


def read_config(directory: Path) -> tuple[dict, TracrInfo]:
    """config.json, checked: the sizes, the vocabularies, BOS, the output and the attention scale."""
    from mechscope.core.validate import read_json_object

    path = _need(directory, "config.json")
    config = read_json_object(path, "tracr config.json")
    for key in SIZES:
        _int(config, key, path)
    vocab = config.get("input_vocab")
    if not isinstance(vocab, list) or len(vocab) != config["d_vocab"]:
        raise MechscopeError(f"{path}: input_vocab must list d_vocab = {config['d_vocab']} tokens")
    bos = _int(config, "bos_id", path, 0)
    if bos >= config["d_vocab"]:
        raise MechscopeError(f"{path}: bos_id {bos} outside the vocabulary 0..{config['d_vocab'] - 1}")
    pad = config.get("pad_id")
    if pad is not None:  # tasks pad batches with it: like bos_id, a token of the vocabulary
        pad = _int(config, "pad_id", path, 0)
        if pad >= config["d_vocab"]:
            raise MechscopeError(f"{path}: pad_id {pad} outside the vocabulary 0..{config['d_vocab'] - 1}")
    out = config.get("output")
    if not isinstance(out, dict) or out.get("type") not in ("categorical", "numerical"):
        raise MechscopeError(f"{path}: output.type must be 'categorical' or 'numerical'")
    if out["type"] == "categorical" and (not isinstance(out.get("vocab"), list)
                                          or len(out["vocab"]) != config["d_vocab_out"]):  # fmt: skip
        raise MechscopeError(f"{path}: a categorical output needs output.vocab of d_vocab_out = "
                             f"{config['d_vocab_out']} classes")  # fmt: skip
    if out["type"] == "numerical" and config["d_vocab_out"] != 1:
        raise MechscopeError(f"{path}: a numerical output has d_vocab_out 1, got {config['d_vocab_out']}")
    check_claims(config, path)
    if not isinstance(config.get("causal"), bool):
        raise MechscopeError(f"{path}: field 'causal' must be true or false")
    scale = (config.get("attention") or {}).get("scale", config["d_head"] ** -0.5)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise MechscopeError(f"{path}: attention.scale must be a positive number, got {scale!r}")
    max_len = config.get("max_seq_len", config["n_ctx"] - 1)
    if isinstance(max_len, bool) or not isinstance(max_len, int) or not 1 <= max_len < config["n_ctx"]:
        raise MechscopeError(f"{path}: max_seq_len {max_len!r} must be below n_ctx {config['n_ctx']} (BOS + tokens)")
    info = TracrInfo(
        name=str(config.get("name", directory.name)),
        directory=str(directory),
        input_vocab=tuple(str(t) for t in vocab),
        bos_id=bos,
        pad_id=pad,
        output_type=out["type"],
        output_vocab=tuple(out["vocab"]) if out["type"] == "categorical" else None,
        causal=config["causal"],
        max_seq_len=max_len,
    )
    return config, info


def tracr_config(config: dict) -> TransformerConfig:
    """Our config for a tracr model: no norm, ReLU MLPs with biases, no attention biases, its own scale."""
    return TransformerConfig(
        d_model=config["d_model"],
        n_layers=config["n_layers"],
        n_heads=config["n_heads"],
        d_head=config["d_head"],
        d_vocab=config["d_vocab"],
        n_ctx=config["n_ctx"],
        d_mlp=config["d_mlp"],
        act="relu",
        norm="none",
        positional="learned",
        attn_bias=False,
        attn_out_bias=False,
        mlp_bias=True,
        tie_embeddings=False,
        bos_token_id=config["bos_id"],
        family="tracr",
        name=f"tracr/{config.get('name', '')}",
        final_norm=False,
        attn_scale=float((config.get("attention") or {}).get("scale", config["d_head"] ** -0.5)),
        causal=config["causal"],
        d_vocab_out=config["d_vocab_out"],
    )


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """TransformerLens names and shapes of every tensor a tracr model.safetensors holds."""
    D, H, Dh, M = config["d_model"], config["n_heads"], config["d_head"], config["d_mlp"]
    shapes = {"embed.W_E": (config["d_vocab"], D), "pos_embed.W_pos": (config["n_ctx"], D),
              "unembed.W_U": (D, config["d_vocab_out"])}  # fmt: skip
    for L in range(config["n_layers"]):
        a, m = f"blocks.{L}.attn.", f"blocks.{L}.mlp."
        shapes |= {a + "W_Q": (H, D, Dh), a + "W_K": (H, D, Dh), a + "W_V": (H, D, Dh), a + "W_O": (H, Dh, D)}
        shapes |= {m + "W_in": (D, M), m + "b_in": (M,), m + "W_out": (M, D), m + "b_out": (D,)}
    return shapes


def convert_tracr(config: dict, state: dict[str, torch.Tensor]) -> tuple[TransformerConfig, dict]:
    """(our config, our state dict) from a tracr config and its TransformerLens-named tensors."""
    cfg = tracr_config(config)
    H, Dh, D = cfg.n_heads, cfg.d_head, cfg.d_model
    ours = {"W_E": state["embed.W_E"], "W_pos": state["pos_embed.W_pos"], "W_U_untied": state["unembed.W_U"]}
    for L in range(cfg.n_layers):
        a, m, b = f"blocks.{L}.attn.", f"blocks.{L}.mlp.", f"blocks.{L}."
        for ours_name, tl in (("q", "W_Q"), ("k", "W_K"), ("v", "W_V")):  # [H, D, Dh] -> Linear [H·Dh, D]
            ours[f"{b}attn.{ours_name}.weight"] = state[a + tl].permute(0, 2, 1).reshape(H * Dh, D)
        ours[f"{b}attn.o.weight"] = state[a + "W_O"].reshape(H * Dh, D).T  # [H, Dh, D] -> Linear [D, H·Dh]
        ours[f"{b}mlp.up.weight"] = state[m + "W_in"].T
        ours[f"{b}mlp.up.bias"] = state[m + "b_in"]
        ours[f"{b}mlp.down.weight"] = state[m + "W_out"].T
        ours[f"{b}mlp.down.bias"] = state[m + "b_out"]
    return cfg, {k: v.contiguous() for k, v in ours.items()}


def read_weights(directory: Path, config: dict) -> dict[str, torch.Tensor]:
    """model.safetensors, checked tensor by tensor against config.json's sizes."""
    from mechscope.core.validate import read_safetensors

    path = _need(directory, "model.safetensors")
    state = read_safetensors(path)
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise MechscopeError(f"{path}: lacks {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                                                                else ""))  # fmt: skip
    extra = sorted(set(state) - set(expected))
    if extra:
        raise MechscopeError(f"{path}: holds {extra[0]}, which config.json's {config['n_layers']} blocks do not have")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise MechscopeError(
                f"{path}: {k} has shape {list(state[k].shape)}; config.json's sizes give {list(shape)}"
            )
        if not state[k].is_floating_point() or not torch.isfinite(state[k]).all():
            raise MechscopeError(f"{path}: {k} must hold finite floating-point numbers")
    return state


def read_tracr(directory: str | Path) -> tuple[TransformerConfig, dict, TracrInfo]:
    """(our config, our state dict, :class:`TracrInfo`) of a tracr folder, every file checked;
    :func:`~mechscope.lm.models.loading.load_model` builds the model (``model.tracr`` is the info; no tokenizer:
    the inputs are token ids, ``info.input_vocab`` names them)."""
    directory = Path(directory)
    config, info = read_config(directory)
    state = read_weights(directory, config)
    check_block_claims(config, directory / "config.json")
    cfg, ours = convert_tracr(config, state)
    return cfg, ours, info


def read_examples(directory: str | Path, info: TracrInfo, d_vocab: int, d_vocab_out: int) -> TracrExamples:
    """examples.json, checked: BOS first, ids in the vocabulary, one output per token, logits at every position."""
    from mechscope.core.validate import read_json_object

    path = _need(Path(directory), "examples.json")
    data = read_json_object(path, "tracr examples.json")
    rows = data.get("examples")
    if not isinstance(rows, list) or not rows:
        raise MechscopeError(f"{path}: 'examples' must be a non-empty list")
    ids, outs, logits, rasp = [], [], [], []
    key = "model_output_ids" if info.output_type == "categorical" else "model_output"
    for i, ex in enumerate(rows):
        where = f"{path}: example {i}"
        if not isinstance(ex, dict):
            raise MechscopeError(f"{where}: expected an object")
        seq = ex.get("ids")
        if (
            not isinstance(seq, list)
            or not 2 <= len(seq) <= info.max_seq_len + 1
            or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < d_vocab for t in seq)
        ):
            raise MechscopeError(f"{where}: ids must be 2 to {info.max_seq_len + 1} token ids below {d_vocab}")
        if seq[0] != info.bos_id:
            raise MechscopeError(f"{where}: ids[0] is {seq[0]}, not BOS ({info.bos_id})")
        toks = ex.get("tokens")
        if toks is not None and toks != [info.input_vocab[t] for t in seq]:
            raise MechscopeError(f"{where}: tokens do not match ids through config.json's input_vocab")
        out = ex.get(key)
        if not isinstance(out, list) or len(out) != len(seq) - 1:
            raise MechscopeError(f"{where}: {key} must have one entry per token after BOS ({len(seq) - 1})")
        if info.output_type == "categorical" and not all(
            isinstance(o, int) and not isinstance(o, bool) and 0 <= o < d_vocab_out for o in out
        ):
            raise MechscopeError(f"{where}: {key} must be class ids below {d_vocab_out}")
        if info.output_type == "numerical" and not all(
            isinstance(o, (int, float)) and not isinstance(o, bool) and math.isfinite(o) for o in out
        ):
            raise MechscopeError(f"{where}: {key} must be finite numbers")
        lg = ex.get("model_logits")
        if (not isinstance(lg, list) or len(lg) != len(seq)
                or not all(isinstance(r, list) and len(r) == d_vocab_out for r in lg)):  # fmt: skip
            raise MechscopeError(f"{where}: model_logits must be [{len(seq)}, {d_vocab_out}]")
        ids.append(tuple(seq))
        outs.append(tuple(out))
        logits.append(tuple(tuple(float(x) for x in r) for r in lg))
        rasp.append(tuple(ex.get("rasp_output", ())))
    return TracrExamples(tuple(ids), tuple(outs), tuple(logits), tuple(rasp))


def check_circuit(directory: str | Path, cfg: TransformerConfig):
    """circuit.json, loaded (:func:`~mechscope.core.graphs.load_circuit`) and checked against the model's sizes."""
    from mechscope.core.graphs import load_circuit

    path = _need(Path(directory), "circuit.json")
    known = load_circuit(path)
    if (known.n_layers, known.n_heads) != (cfg.n_layers, cfg.n_heads):
        raise MechscopeError(
            f"{path}: names {known.n_layers} blocks × {known.n_heads} heads; config.json says "
            f"{cfg.n_layers} × {cfg.n_heads}"
        )
    return known
