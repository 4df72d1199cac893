"""Transcoders for the local replacement model (:mod:`mechscope.lm.methods.replacement`): one per MLP layer, each
reading ``blocks.L.mlp.hook_in`` (the MLP's input after ln2) and predicting ``blocks.L.hook_mlp_out``.

They come from mechscope's ``lm sae`` or SAELens' directory format (:meth:`Transcoders.load`), from the MLP's own
neurons when the MLP is a plain ReLU (:meth:`Transcoders.from_mlp_neurons`: exact, every error node zero; tracr's
compiled models), or are trained here (:mod:`mechscope.lm.methods.replacement_training`). Layers without one get an
empty transcoder (:meth:`Transcoders.padded`), so their whole MLP output is the error node.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from mechscope.core.dictionaries import DictionaryConfig, SparseDictionary, load_saelens, save_saelens
from mechscope.core.errors import MechscopeError
from mechscope.lm.models.transformer import HookedTransformer


@dataclass(frozen=True)
class Transcoders:
    """One transcoder per MLP layer (``layers[L]`` reads ``blocks.L.mlp.hook_in`` and writes ``hook_mlp_out``), each
    folded to raw units; ``source`` says where they came from (paths, "mlp neurons", "trained here")."""

    layers: tuple[SparseDictionary, ...]
    source: str = ""
    paths: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for i, tc in enumerate(self.layers):
            if not isinstance(tc, SparseDictionary):
                raise MechscopeError(f"transcoder {i} is a {type(tc).__name__}, not a SparseDictionary")

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def widths(self) -> list[int]:
        return [tc.cfg.d_sae for tc in self.layers]

    def check(self, model: HookedTransformer) -> None:
        """Refuse, in one line, transcoders that do not fit the model's layers or widths."""
        cfg = model.cfg
        n_mlp = 0 if cfg.attn_only else cfg.n_layers
        if len(self.layers) != n_mlp:
            raise MechscopeError(
                f"{len(self.layers)} transcoders for a model with {n_mlp} MLP layers ({cfg.name or 'this model'}): "
                "give one per layer"
            )
        for i, tc in enumerate(self.layers):
            c = tc.cfg
            if c.d_in != cfg.d_model or c.d_out != cfg.d_model:
                raise MechscopeError(
                    f"transcoder of layer {i} maps {c.d_in} -> {c.d_out} dims; the model's MLPs map d_model "
                    f"{cfg.d_model} -> {cfg.d_model}"
                )

    def to(self, device, dtype) -> Transcoders:
        return Transcoders(
            tuple(tc.to(device=device, dtype=dtype).eval() for tc in self.layers), self.source, self.paths
        )

    # ---- the layer-indexed interface the replacement model reads (a CrossLayerTranscoder's too) ---------------

    crosslayer = False
    input_hook = "mlp.hook_in"  # where the features read

    def to_model(self, device, dtype) -> Transcoders:
        """These transcoders on ``device`` in ``dtype``, in eval mode (a copy)."""
        return self.to(device, dtype)

    def pre_activations(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s pre-activations ``[..., d_sae]`` of its input ``x [..., D]``."""
        tc = self.layers[layer]
        return tc.pre_activations(x.to(tc.W_enc.dtype))

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s latents ``[..., d_sae]`` of its input ``x [..., D]``."""
        return self.layers[layer].encode(x)

    def decoder(self, src: int, dst: int) -> torch.Tensor:
        """The decoder ``[d_sae, D]`` of layer ``src``'s latents into layer ``dst``'s MLP output (``dst == src``)."""
        if dst != src:
            raise MechscopeError(f"a per-layer transcoder writes to its own layer only ({src}), not to {dst}")
        return self.layers[src].W_dec

    def reach(self, src: int) -> range:
        """The MLP layers layer ``src``'s latents write to: its own."""
        return range(src, src + 1)

    def encoder(self, layer: int, index: torch.Tensor) -> torch.Tensor:
        """Encoder vectors ``[n, D]`` of latents ``index`` of ``layer`` (the gradient of their pre-activation)."""
        return self.layers[layer].W_enc[:, index].T

    def decode(self, layer: int, feats, x: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s reconstruction of its MLP output from its latents ``feats[layer] [..., d_sae]`` and
        its input ``x`` (the skip path's)."""
        tc = self.layers[layer]
        out = feats[layer].to(tc.W_dec.dtype) @ tc.W_dec + tc.b_dec
        return out + x @ tc.W_skip.T if tc.cfg.skip else out

    def constant_write(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """What layer ``layer``'s reconstruction adds whatever its latents (the decoder bias, and the skip path's
        write for its input ``x [D]``), and whether there is a skip path."""
        tc = self.layers[layer]
        if not tc.cfg.skip:
            return tc.b_dec, False
        return tc.b_dec + x @ tc.W_skip.T, True

    @classmethod
    def of(cls, dictionaries, source: str = "given") -> Transcoders:
        """Transcoders from a list of :class:`SparseDictionary` (normalisation folded in here)."""
        dicts = list(dictionaries)
        for i, d in enumerate(dicts):
            if not isinstance(d, SparseDictionary):
                raise MechscopeError(f"transcoder {i} is a {type(d).__name__}, not a SparseDictionary")
            if not d.cfg.transcoder:
                raise MechscopeError(
                    f"dictionary {i} is an SAE, not a transcoder (it must read mlp.hook_in and predict hook_mlp_out)"
                )
        return cls(tuple(d.folded().eval() for d in dicts), source)

    @classmethod
    def load(cls, path) -> Transcoders:
        """A folder of transcoders in SAELens' layout: one sub-folder per layer (``cfg.json`` with ``hook_layer``
        or a hook name ``blocks.L.mlp.hook_in``), or the folder of a single one."""
        root = Path(path).expanduser()
        if not root.is_dir():
            what = "is a file, not a transcoder folder" if root.exists() else "transcoder folder not found"
            raise MechscopeError(f"{root}: {what}")
        dirs = (
            [root] if (root / "cfg.json").is_file() else sorted(p for p in root.iterdir() if (p / "cfg.json").is_file())
        )
        if not dirs:
            raise MechscopeError(f"{root}: no transcoder (no cfg.json in it or in its sub-folders)")
        found: dict[int, tuple[SparseDictionary, str]] = {}
        for d in dirs:
            loaded = load_saelens(d)
            meta, model = loaded.metadata, loaded.model
            if not model.cfg.transcoder:
                raise MechscopeError(
                    f"{d}: an SAE, not a transcoder (expected reading mlp.hook_in, writing hook_mlp_out)"
                )
            layer = _layer_of(d, meta)
            hook = meta.get("hook_name") or ""
            if hook and not re.fullmatch(rf"blocks\.{layer}\.(mlp\.hook_in|ln2\.hook_normalized)", hook):
                raise MechscopeError(f"{d}: reads {hook!r}; an attribution graph needs blocks.{layer}.mlp.hook_in")
            out = meta.get("hook_name_out") or ""
            if out and out != f"blocks.{layer}.hook_mlp_out":
                raise MechscopeError(f"{d}: writes {out!r}; an attribution graph needs blocks.{layer}.hook_mlp_out")
            if layer in found:
                raise MechscopeError(f"{d}: a second transcoder for layer {layer} (also {found[layer][1]})")
            found[layer] = (model.folded().eval(), str(d))
        missing = [i for i in range(max(found) + 1) if i not in found]
        if missing:
            raise MechscopeError(f"{root}: no transcoder for layer {missing[0]} (layers found: {sorted(found)})")
        return cls(tuple(found[i][0] for i in sorted(found)), f"{root}", tuple(found[i][1] for i in sorted(found)))

    def save(self, path, model_name: str = "") -> Path:
        """Write each layer's transcoder as ``path/layer_L`` in SAELens' layout."""
        root = Path(path)
        for i, tc in enumerate(self.layers):
            save_saelens(
                tc,
                root / f"layer_{i}",
                hook_name=f"blocks.{i}.mlp.hook_in",
                hook_layer=i,
                model_name=model_name,
                hook_name_out=f"blocks.{i}.hook_mlp_out",
                hook_layer_out=i,
            )
        return root

    @classmethod
    def padded(cls, model: HookedTransformer, given: dict[int, SparseDictionary], source: str = "given") -> Transcoders:
        """Transcoders for the layers in ``given`` (layer -> transcoder, folded here) and an empty one (a single
        latent that never fires, decoding to zero) for every other MLP layer: there the whole MLP output is the
        error node, so a graph can be traced with transcoders for a subset of layers."""
        n = 0 if model.cfg.attn_only else model.cfg.n_layers
        bad = [i for i in given if not 0 <= i < n]
        if bad:
            raise MechscopeError(f"transcoder for layer {bad[0]}, outside the model's MLP layers 0..{n - 1}")
        D = model.cfg.d_model
        layers = tuple(given[i].folded().eval() if i in given else empty_transcoder(D) for i in range(n))
        return cls(layers, source)

    @property
    def empty_layers(self) -> list[int]:
        """Layers whose transcoder never fires (their MLP is all error node)."""
        return [i for i, tc in enumerate(self.layers) if is_empty(tc)]

    @classmethod
    def from_mlp_neurons(cls, model: HookedTransformer) -> Transcoders:
        """The MLPs' own neurons as transcoders: ``W_enc = W_in``, ``W_dec = W_out``, ReLU; exact (every error node
        zero) for non-gated ReLU MLPs, such as tracr's compiled models."""
        cfg = model.cfg
        if cfg.attn_only:
            return cls((), "mlp neurons")
        if cfg.gated_mlp or cfg.act != "relu" or cfg.post_attn_mlp_norm:
            raise MechscopeError(
                f"MLP neurons are exact transcoders only for plain ReLU MLPs; {cfg.name or 'this model'}"
                f" has act={cfg.act}{', gated' if cfg.gated_mlp else ''}: train transcoders instead"
            )
        out = []
        for block in model.blocks:
            mlp = block.mlp
            d = SparseDictionary.blank(
                DictionaryConfig(
                    d_in=cfg.d_model, d_sae=cfg.d_mlp, architecture="relu", transcoder=True, d_out=cfg.d_model
                )
            )
            with torch.no_grad():
                d.W_enc.copy_(mlp.up.weight.T.float())
                d.b_enc.copy_(mlp.up.bias.float() if mlp.up.bias is not None else torch.zeros(cfg.d_mlp))
                d.W_dec.copy_(mlp.down.weight.T.float())
                d.b_dec.copy_(mlp.down.bias.float() if mlp.down.bias is not None else torch.zeros(cfg.d_model))
            out.append(d.eval())
        return cls(tuple(out), "mlp neurons")


def empty_transcoder(d_model: int) -> SparseDictionary:
    """A transcoder that never fires and outputs zero: a layer left entirely to its error node."""
    cfg = DictionaryConfig(d_in=d_model, d_sae=1, architecture="relu", transcoder=True, d_out=d_model)
    d = SparseDictionary.blank(cfg)
    with torch.no_grad():
        for t in (d.W_enc, d.W_dec, d.b_dec):
            t.zero_()
        d.b_enc.fill_(-1.0)
    return d.eval()


@torch.no_grad()
def is_empty(tc: SparseDictionary) -> bool:
    return (
        tc.cfg.d_sae == 1
        and not tc.cfg.skip
        and float(tc.W_enc.abs().max()) == 0.0
        and float(tc.b_enc.max()) < 0
        and float(tc.W_dec.abs().max()) == 0.0
    )


def _layer_of(d: Path, meta: dict) -> int:
    layer = meta.get("hook_layer")
    if isinstance(layer, int) and not isinstance(layer, bool):
        return layer
    m = re.match(r"blocks\.(\d+)\.", meta.get("hook_name") or "")
    if m:
        return int(m.group(1))
    m = re.search(r"(\d+)$", d.name)
    if m:
        return int(m.group(1))
    raise MechscopeError(f"{d}: cfg.json names no layer (hook_layer or hook_name blocks.L...)")
