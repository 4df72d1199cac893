"""Cross-layer transcoders (CLT; Ameisen et al. 2025, "Circuit Tracing", § 2.1): the features of layer ``l`` read
the residual stream at layer ``l``'s MLP input and write to the MLP outputs of every layer ``l' >= l``.

Notation (L MLP layers, F features per layer, D = d_model; raw units, no normalisation: training folds its scales
into the weights)::

    f_l   = sigma_l(x_l @ W_enc[l] + b_enc[l])                                  x_l [..., D] -> f_l [..., F]
    y'_l' = sum_{l <= l'} f_l @ W_dec[l][:, l' - l] + b_dec[l'] (+ x_l' @ W_skip[l'])           [..., D]

``W_enc [L, D, F]`` (mechscope's and SAELens' orientation), ``b_enc [L, F]``, ``W_dec[l] [F, L - l, D]`` (the
decoders of layer ``l``'s features into layers ``l, l+1, ..., L-1``, circuit-tracer's layout), ``b_dec [L, D]``,
``threshold [L, F]`` (JumpReLU), ``W_skip [L, D, D]`` (optional). ``sigma``: ``relu``, ``jumprelu``
(``z * (z > threshold)``) or ``topk`` (each layer's ``k`` largest, rectified: layer ``l``'s features never depend on
a later layer, so the replacement model stays causal).

The input ``x_l`` is ``blocks.l.mlp.hook_in`` (the MLP's input, after ln2; as mechscope's per-layer transcoders) or
``blocks.l.hook_mlp_in`` (the residual stream before ln2: circuit-tracer's ``hook_resid_mid``); the output is
``blocks.l'.hook_mlp_out``.

On disk (:meth:`CrossLayerTranscoder.save`, :meth:`CrossLayerTranscoder.load`): circuit-tracer's layout (its
``CrossLayerTranscoder.to_safetensors`` / ``load_clt``), one pair of files per layer ``i``:

* ``W_enc_i.safetensors``: ``W_enc_i [F, D]`` (circuit-tracer's orientation, the transpose of ours), ``b_enc_i
  [F]``, ``b_dec_i [D]``, ``threshold_i [F]`` (JumpReLU only), ``W_skip_i [D, D]`` (a skip path; mechscope's
  addition, ``x @ W_skip_i``);
* ``W_dec_i.safetensors``: ``W_dec_i [F, L - i, D]``;

and a ``cfg.json``: ``{"format": "mechscope.crosslayer_transcoder/1", "architecture", "k", "n_layers", "d_model",
"d_transcoder", "skip", "feature_input_hook", "feature_output_hook", "model_name"}``. A folder written by
circuit-tracer has no ``cfg.json``: it is read as ReLU (JumpReLU when ``threshold_0`` is there) reading
``hook_resid_mid``, circuit-tracer's default; a ``cfg.json`` with just ``feature_input_hook`` says otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from mechscope.core.dictionaries.activations import topk_relu
from mechscope.core.errors import MechscopeError
from mechscope.core.validate import read_json_object, read_safetensors

FORMAT = "mechscope.crosslayer_transcoder/1"
ARCHITECTURES = ("relu", "jumprelu", "topk")
# accepted names of the two places a CLT can read (with or without "blocks.L." before them) -> mechscope's hook
INPUT_HOOKS = {
    "mlp.hook_in": "mlp.hook_in",
    "ln2.hook_normalized": "mlp.hook_in",
    "hook_mlp_in": "hook_mlp_in",
    "hook_resid_mid": "hook_mlp_in",
}


class CrossLayerTranscoder(nn.Module):
    """A cross-layer transcoder (see the module docstring for the formulas and the file layout)."""

    def __init__(
        self,
        n_layers: int,
        d_model: int,
        d_transcoder: int,
        architecture: str = "topk",
        k: int | None = None,
        *,
        skip: bool = False,
        input_hook: str = "mlp.hook_in",
        source: str = "",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("n_layers", n_layers), ("d_model", d_model), ("d_transcoder", d_transcoder)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise MechscopeError(f"expected {name} to be a positive integer, got {v!r}")
        if architecture not in ARCHITECTURES:
            raise MechscopeError(f"expected a CLT architecture in {ARCHITECTURES}, got {architecture!r}")
        if architecture == "topk" and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d_transcoder):
            raise MechscopeError(f"expected k between 1 and {d_transcoder} for a TopK CLT, got {k!r}")
        if input_hook not in INPUT_HOOKS.values():
            raise MechscopeError(f"expected the input hook mlp.hook_in or hook_mlp_in, got {input_hook!r}")
        L, D, F = n_layers, d_model, d_transcoder
        self.n_layers, self.d_model, self.d_transcoder = L, D, F
        self.architecture, self.k = architecture, (k if architecture == "topk" else None)
        self.skip, self.input_hook, self.source = skip, input_hook, source
        self.paths: tuple[str, ...] = ()
        # initialisation (training's starting point): each feature's concatenated decoder a random unit vector,
        # the encoder Gaussian / sqrt(D), as the core's transcoders start
        w_enc = torch.randn(L, D, F, generator=generator, dtype=torch.float64) / D**0.5
        self.W_enc = nn.Parameter(w_enc.float())
        self.b_enc = nn.Parameter(torch.zeros(L, F))
        decs = []
        for i in range(L):
            w = torch.randn(F, L - i, D, generator=generator, dtype=torch.float64)
            decs.append(nn.Parameter((w / w.flatten(1).norm(dim=1)[:, None, None]).float()))
        self.W_dec = nn.ParameterList(decs)
        self.b_dec = nn.Parameter(torch.zeros(L, D))
        if architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.full((L, F), 0.001))
        if skip:
            self.W_skip = nn.Parameter(torch.zeros(L, D, D))

    # ---- the computation ------------------------------------------------------------------------------------

    @property
    def widths(self) -> list[int]:
        return [self.d_transcoder] * self.n_layers

    @property
    def layers(self):
        raise MechscopeError(
            "a cross-layer transcoder has no per-layer dictionaries (its features write to every later layer)"
        )

    def __len__(self) -> int:
        return self.n_layers

    def pre_activations(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """``x_l @ W_enc[l] + b_enc[l]``: ``[..., D] -> [..., F]``."""
        return x.to(self.W_enc.dtype) @ self.W_enc[layer] + self.b_enc[layer]

    def activate(self, layer: int, pre: torch.Tensor) -> torch.Tensor:
        if self.architecture == "relu":
            return pre.relu()
        if self.architecture == "topk":
            return topk_relu(pre, self.k)
        return pre * (pre > self.threshold[layer].clamp_min(0))

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s features ``[..., F]`` of its input ``x [..., D]``."""
        return self.activate(layer, self.pre_activations(layer, x))

    def decoder(self, src: int, dst: int) -> torch.Tensor:
        """The decoder of layer ``src``'s features into layer ``dst``'s MLP output, ``[F, D]`` (``src <= dst``)."""
        return self.W_dec[src][:, dst - src]

    crosslayer = True

    def reach(self, src: int) -> range:
        """The MLP layers layer ``src``'s features write to: it and every later one."""
        return range(src, self.n_layers)

    def encoder(self, layer: int, index: torch.Tensor) -> torch.Tensor:
        """Encoder vectors ``[n, D]`` of features ``index`` of ``layer`` (the gradient of their pre-activation)."""
        return self.W_enc[layer][:, index].T

    def constant_write(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """What layer ``layer``'s reconstruction adds whatever the features (the decoder bias, and the skip path's
        write for its input ``x [D]``), and whether there is a skip path."""
        if not self.skip:
            return self.b_dec[layer], False
        return self.b_dec[layer] + x.to(self.W_enc.dtype) @ self.W_skip[layer], True

    def decode(self, layer: int, feats: Mapping[int, torch.Tensor], x: torch.Tensor | None = None) -> torch.Tensor:
        """The reconstruction of layer ``layer``'s MLP output from the features ``feats[j] [..., F]`` of every layer
        ``j <= layer`` (and its input ``x`` for the skip path)."""
        out = self.b_dec[layer]
        for j in range(layer + 1):
            out = out + feats[j].to(self.W_enc.dtype) @ self.decoder(j, layer)
        if self.skip:
            if x is None:
                raise MechscopeError("expected the input x to decode a skip CLT")
            out = out + x.to(self.W_enc.dtype) @ self.W_skip[layer]
        return out

    def forward(self, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstructions ``[N, L, D]``, features ``[N, L, F]``) of the inputs of every layer ``xs [N, L, D]``."""
        feats = torch.stack([self.encode(i, xs[:, i]) for i in range(self.n_layers)], 1)
        return self.decode_all(feats, xs), feats

    def decode_all(self, feats: torch.Tensor, xs: torch.Tensor | None = None) -> torch.Tensor:
        """Every layer's reconstruction ``[N, L, D]`` from every layer's features ``[N, L, F]`` (one matrix product
        per source layer)."""
        N, L, D = feats.shape[0], self.n_layers, self.d_model
        out = self.b_dec.expand(N, L, D).clone()
        for i in range(L):
            w = self.W_dec[i].reshape(self.d_transcoder, (L - i) * D)
            out[:, i:] += (feats[:, i] @ w).reshape(N, L - i, D)
        if self.skip:
            out = out + torch.einsum("nld,lde->nle", xs, self.W_skip)
        return out

    # ---- checks, devices -----------------------------------------------------------------------------------

    def check(self, model) -> None:
        """Refuse, in one line, a CLT that does not fit the model's MLP layers or width."""
        cfg = model.cfg
        n_mlp = 0 if cfg.attn_only else cfg.n_layers
        if self.n_layers != n_mlp:
            raise MechscopeError(
                f"a cross-layer transcoder over {self.n_layers} layers for a model with {n_mlp} MLP layers "
                f"({cfg.name or 'this model'})"
            )
        if self.d_model != cfg.d_model:
            raise MechscopeError(
                f"the cross-layer transcoder reads and writes {self.d_model} dims; the model's d_model is {cfg.d_model}"
            )

    def to_model(self, device, dtype) -> CrossLayerTranscoder:
        """This CLT on ``device`` in ``dtype``, in eval mode (in place, as ``nn.Module.to``)."""
        return self.to(device=device, dtype=dtype).eval()

    # ---- files -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def save(self, path, model_name: str = "") -> Path:
        """Write the CLT in circuit-tracer's layout plus ``cfg.json`` (see the module docstring)."""
        from mechscope.core.outputs import save_tensors, write_json

        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        for i in range(self.n_layers):
            enc = {f"W_enc_{i}": self.W_enc[i].T.float(), f"b_enc_{i}": self.b_enc[i], f"b_dec_{i}": self.b_dec[i]}
            if self.architecture == "jumprelu":
                enc[f"threshold_{i}"] = self.threshold[i]
            if self.skip:
                enc[f"W_skip_{i}"] = self.W_skip[i]
            save_tensors(root / f"W_enc_{i}.safetensors", {k: v.float().cpu() for k, v in enc.items()})
            save_tensors(root / f"W_dec_{i}.safetensors", {f"W_dec_{i}": self.W_dec[i].float().cpu()})
        write_json(
            root / "cfg.json",
            {
                "format": FORMAT,
                "architecture": self.architecture,
                "k": self.k,
                "n_layers": self.n_layers,
                "d_model": self.d_model,
                "d_transcoder": self.d_transcoder,
                "skip": self.skip,
                "feature_input_hook": f"blocks.{{layer}}.{self.input_hook}",
                "feature_output_hook": "blocks.{layer}.hook_mlp_out",
                "model_name": model_name,
            },
        )
        return root

    @classmethod
    def load(cls, path) -> CrossLayerTranscoder:
        """A CLT from a folder in circuit-tracer's layout (see the module docstring); refused in one line when a
        file is missing, unreadable or of the wrong shape."""
        root = Path(path).expanduser()
        if not is_crosslayer(root):
            raise MechscopeError(f"{root}: not a cross-layer transcoder folder (no W_enc_0.safetensors)")
        cfg = _read_cfg(root)
        n = len(list(root.glob("W_enc_*.safetensors")))
        if not all((root / f"W_enc_{i}.safetensors").is_file() for i in range(n)):
            raise MechscopeError(f"{root}: expected W_enc_0 .. W_enc_{n - 1}.safetensors without a gap")
        enc0 = read_safetensors(root / "W_enc_0.safetensors")
        if "W_enc_0" not in enc0 or enc0["W_enc_0"].dim() != 2:
            raise MechscopeError(f"{root}/W_enc_0.safetensors: expected a tensor W_enc_0 [d_transcoder, d_model]")
        F, D = enc0["W_enc_0"].shape
        L = cfg.get("n_layers", n)
        if n != L:
            raise MechscopeError(f"{root}: cfg.json says {L} layers, the folder has {n} W_enc files")
        arch = cfg.get("architecture", "jumprelu" if "threshold_0" in enc0 else "relu")
        hook = cfg.get("feature_input_hook", "hook_resid_mid")
        short = re.sub(r"^blocks\.(\{layer\}|\d+)\.", "", str(hook))
        if short not in INPUT_HOOKS:
            raise MechscopeError(
                f"{root}: feature_input_hook {hook!r}: expected mlp.hook_in (after ln2) or hook_resid_mid / "
                "hook_mlp_in (before ln2)"
            )
        out_hook = re.sub(r"^blocks\.(\{layer\}|\d+)\.", "", str(cfg.get("feature_output_hook", "hook_mlp_out")))
        if out_hook != "hook_mlp_out":
            raise MechscopeError(f"{root}: writes {out_hook!r}; an attribution graph needs hook_mlp_out")
        skip = bool(cfg.get("skip", "W_skip_0" in enc0))
        try:
            clt = cls(L, D, F, arch, cfg.get("k"), skip=skip, input_hook=INPUT_HOOKS[short], source=str(root),
                      generator=torch.Generator())  # overwritten below: no draw from the global RNG
        except MechscopeError as e:
            raise MechscopeError(f"{root}/cfg.json: {e}") from None
        state, encs = {}, []
        for i in range(L):
            enc = read_safetensors(root / f"W_enc_{i}.safetensors")
            dec = read_safetensors(root / f"W_dec_{i}.safetensors")
            encs.append(enc)
            want = {f"W_enc_{i}": (F, D), f"b_enc_{i}": (F,), f"b_dec_{i}": (D,)}
            if arch == "jumprelu":
                want[f"threshold_{i}"] = (F,)
            if skip:
                want[f"W_skip_{i}"] = (D, D)
            for name, shape in [*want.items(), (f"W_dec_{i}", (F, L - i, D))]:
                t = (dec if name.startswith("W_dec") else enc).get(name)
                if t is None or tuple(t.shape) != shape:
                    got = "missing" if t is None else f"shape {list(t.shape)}"
                    raise MechscopeError(f"{root}: {name} is {got}, expected {list(shape)}")
            state[f"W_dec.{i}"] = dec[f"W_dec_{i}"]
        stack = lambda key: torch.stack([encs[i][f"{key}_{i}"] for i in range(L)])  # noqa: E731
        state |= {"W_enc": stack("W_enc").transpose(1, 2), "b_enc": stack("b_enc"), "b_dec": stack("b_dec")}
        if arch == "jumprelu":
            state["threshold"] = stack("threshold")
        if skip:
            state["W_skip"] = stack("W_skip")
        clt.load_state_dict({k: v.float().contiguous() for k, v in state.items()})
        clt.paths = (str(root),)
        return clt.eval()


def is_crosslayer(path) -> bool:
    """Whether the folder holds a cross-layer transcoder (circuit-tracer's ``W_enc_0.safetensors``)."""
    return (Path(path).expanduser() / "W_enc_0.safetensors").is_file()


def _read_cfg(root: Path) -> dict:
    where = root / "cfg.json"
    if not where.is_file():
        return {}
    raw = read_json_object(where, "cross-layer transcoder cfg.json")
    fmt = raw.get("format")
    if fmt is not None and fmt != FORMAT:
        raise MechscopeError(f"{where}: format {fmt!r}, expected {FORMAT}")
    for key in ("n_layers", "k"):
        v = raw.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise MechscopeError(f"{where}: expected {key} to be a positive integer, got {v!r}")
    return raw
