"""The analysis view of a transformer's weights: norms folded, writing weights and unembedding centred.

A score that reads weights (composition, OV and QK circuits, eigenvalues, direct effects) must
not depend on a choice that leaves the model's function unchanged. Three such choices hide in
raw checkpoints, and the field removes them before any weight-based analysis (Elhage et al.
2021; TransformerLens' ``fold_ln``, ``center_writing_weights``, ``center_unembed``,
``fold_value_biases``, which this reproduces):

* **Norm gains (and LayerNorm biases) folded** into the matrices that read the normalised
  stream: ``W_Q' = diag(w) W_Q``, ``b_Q' = b_Q + b W_Q`` (likewise K, V, the MLP's input and
  gate, and the unembedding after the final norm). For LayerNorm the reading matrices are then
  centred over d_model: the normalised stream has zero mean, so a component along the all-ones
  direction is never read.
* **Writing weights centred** (LayerNorm only): W_E, W_pos, W_O, b_O and the MLP's W_out lose
  their mean over d_model, the component LayerNorm subtracts anyway. RMSNorm does not subtract
  the mean, so RMSNorm models get the gains only.
* **Unembedding centred over the vocabulary**: softmax ignores a shift shared by every token,
  so ``W_U`` and ``b_U`` lose their mean over the vocabulary.
* **Value biases folded into b_O**: attention rows sum to one, so ``b_V`` adds the constant
  ``b_V W_O`` to a head's output; it moves into ``b_O`` and heads read as pure linear maps.

The model itself is never changed: it keeps computing transformers' logits. The view is a
separate set of tensors (float32, query heads throughout: grouped key/value heads are
expanded), and :func:`folded_model` turns it back into a model whose logits equal the
original's up to a shift per position — the test that the view is the same function.

With ``per_layer=True`` the view holds no second copy of the reading attention weights: ``W_Q``,
``W_K`` and ``W_V`` are :class:`FoldedLayers`, folded from the model a layer at a time when read
(one layer kept), with the same bits as the stacked view's slices; and a LayerNorm model's centred
``W_E`` is :class:`CentredRows`, centred as read. ``lm heads`` and ``lm circuits`` use it: for
Pythia-1b's shape the copies are 800 MB and 412 MB.

Shapes (TransformerLens' convention, row vectors: ``q = x W_Q + b_Q``)::

    W_Q, W_K, W_V [L, H, D, Dh]   b_Q, b_K, b_V [L, H, Dh]   W_O [L, H, Dh, D]   b_O [L, D]
    W_in, W_gate [L, D, M]   b_in [L, M]   W_out [L, M, D]   b_out [L, D]
    W_E [V, D]   W_pos [n_ctx, D]   W_U [D, V]   b_U [V]
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from mechscope.core.errors import MechscopeError
from mechscope.lm.models.transformer import HookedTransformer, TransformerConfig


class _ReadOnRead:
    """A weight of the per-layer view that is computed when indexed; ``shape``, ``len`` and ``dim`` as a tensor's."""

    shape: torch.Size

    def __len__(self) -> int:
        return self.shape[0]

    def dim(self) -> int:
        return len(self.shape)


class FoldedLayers(_ReadOnRead):
    """One reading attention weight of every layer, ``[L, H, D, Dh]``, folded from the model a layer at a time when
    read. ``w[layer]`` and ``w[layer, head, ...]`` give that layer's tensor (the stacked view's slice, bit for bit);
    ``w[a:b]`` stacks the layers (for code that needs the whole stack); ``shape`` is the stack's."""

    def __init__(self, folds: _LayerFolds, name: str):
        self._folds, self._name = folds, name
        self.shape = torch.Size((folds.model.cfg.n_layers, *folds.layer(0)[name].shape))

    def __getitem__(self, index):
        first, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        if isinstance(first, slice):
            stack = torch.stack([self._folds.layer(i)[self._name] for i in range(len(self))[first]])
            return stack[(slice(None), *rest)]
        layer = self._folds.layer(int(first))[self._name]
        return layer[rest] if rest else layer


class _LayerFolds:
    """Folds one layer's attention weights at a time and keeps the last layer folded (readers sweep layer by layer,
    reading several weights of each)."""

    def __init__(self, model: HookedTransformer, fold: bool, center: bool):
        self.model, self.fold, self.center = model, fold, center
        self._last: tuple[int, dict] | None = None

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        n = self.model.cfg.n_layers
        if not -n <= i < n:
            raise IndexError(f"layer {i} of a {n}-layer model")
        i %= n
        if self._last is None or self._last[0] != i:
            self._last = (i, _attention(self.model, i, self.fold, self.center))
        return self._last[1]


class CentredRows(_ReadOnRead):
    """A matrix ``[V, D]`` less each row's mean, subtracted when read: ``w[rows]`` and ``w[rows, cols]`` give the
    centred copy's bits (each entry is the same subtraction) without holding the copy. The per-layer view's W_E of a
    LayerNorm model (412 MB for Pythia-1b's shape)."""

    def __init__(self, t: torch.Tensor):
        self._t, self._mean, self.shape = t, t.mean(-1, keepdim=True), t.shape

    def __getitem__(self, index) -> torch.Tensor:
        return self._t[index] - self._mean.expand(self.shape)[index]  # the means broadcast along each row, not copied


# What the per-layer view folds when read. W_O stays stacked: the value biases' fold into b_O multiplies b_V by every
# layer's W_O in one einsum, whose last bits a layer-by-layer product does not reproduce (measured).
LAZY = ("W_Q", "W_K", "W_V")


@dataclass(frozen=True)
class AnalysisWeights:
    """The weights a circuit analysis reads; ``None`` where a partial checkpoint lacks them."""

    cfg: TransformerConfig
    W_Q: torch.Tensor | FoldedLayers
    b_Q: torch.Tensor
    W_K: torch.Tensor | FoldedLayers
    b_K: torch.Tensor
    W_V: torch.Tensor | FoldedLayers
    b_V: torch.Tensor  # zero once folded into b_O (value_bias keeps what was folded)
    W_O: torch.Tensor
    b_O: torch.Tensor
    W_E: torch.Tensor | CentredRows | None
    W_pos: torch.Tensor | None
    W_U: torch.Tensor | None
    b_U: torch.Tensor
    W_in: torch.Tensor | None = None
    b_in: torch.Tensor | None = None
    W_gate: torch.Tensor | None = None
    b_gate: torch.Tensor | None = None
    W_out: torch.Tensor | None = None
    b_out: torch.Tensor | None = None
    value_bias: torch.Tensor | None = None  # [L, H, Dh] the b_V that fold_value_biases moved into b_O
    mlp_inner_norms: tuple | None = None  # per layer: the SoLU MLP's own LayerNorm state (act='solu_ln'), unfolded
    scale_free: tuple[str, ...] = ()  # gains folded past a normalisation (see scale_free_folds)
    fold_ln: bool = True
    center_writing: bool = True
    center_unembed: bool = True
    fold_value_biases: bool = True

    @property
    def n_layers(self) -> int:
        return self.W_Q.shape[0]

    @property
    def n_heads(self) -> int:
        return self.W_Q.shape[1]

    def OV(self, layer: int) -> torch.Tensor:
        """Each head's OV matrix W_V W_O [H, D, D] (for small models and tests; analyses use factors)."""
        return self.W_V[layer] @ self.W_O[layer]

    def QK(self, layer: int) -> torch.Tensor:
        """Each head's QK matrix W_Q W_Kᵀ [H, D, D]."""
        return self.W_Q[layer] @ self.W_K[layer].transpose(-1, -2)

    def describe(self) -> str:
        parts = [
            "norm gains folded" + (" (and LayerNorm biases; reading weights centred)" if self.layernorm else "")
            if self.fold_ln
            else "norms not folded",
            "writing weights centred" if self.center_writing and self.layernorm else "",
            "unembedding centred over the vocabulary" if self.center_unembed else "",
            "value biases folded into b_O" if self.fold_value_biases else "",
            f"gains of {' and '.join(self.scale_free)} folded as directions (up to per-position scales)"
            if self.scale_free
            else "",
        ]
        return "; ".join(p for p in parts if p)

    @property
    def layernorm(self) -> bool:
        return self.cfg.norm == "layernorm"


def check_finite_weights(model: HookedTransformer) -> None:
    """Every weight in memory finite: an eigendecomposition of a NaN matrix crashed the process (oneMKL's DGEBAL
    refuses it and torch goes on), an infinite one raised LinAlgError, and every score of either is NaN."""
    bad = [n for n, t in model.named_parameters() if not t.is_meta and not bool(torch.isfinite(t).all())]
    if bad:
        tensors = "1 weight tensor holds" if len(bad) == 1 else f"{len(bad)} weight tensors hold"
        raise MechscopeError(f"{tensors} NaN or infinite values "
                             f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): no score can be read "
                             "from them")  # fmt: skip


def _present(t: torch.Tensor | None) -> torch.Tensor | None:
    """A float32 CPU copy of a weight; None where a partial checkpoint lacks it (the view lives on the CPU)."""
    return None if t is None or t.is_meta else t.detach().float().cpu()


def _gain_bias(norm) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A norm's multiplier (1 + w for Gemma's norms) and bias (LayerNorm), float32."""
    w = (norm.gain if hasattr(norm, "gain") else norm.w).detach().float().cpu()
    b = getattr(norm, "b", None)
    return w, (None if b is None else b.detach().float().cpu())


def _fold_reader(w_read: torch.Tensor, b_read: torch.Tensor | None, gain, bias, center: bool):
    """Fold a norm (gain [D], bias [D] or None) into a matrix that reads its output: [..., D, X]."""
    b_read = torch.zeros(w_read.shape[:-2] + w_read.shape[-1:]) if b_read is None else b_read
    if bias is not None:
        b_read = b_read + torch.einsum("d,...dx->...x", bias, w_read)
    w_read = w_read * gain[:, None]  # a new tensor: centred in place below
    if center:
        w_read -= w_read.mean(-2, keepdim=True)
    return w_read, b_read


def _center_rows(t: torch.Tensor | None, own: bool = False) -> torch.Tensor | None:
    """Rows less their mean; in place when the view ``own``s ``t`` (no second copy: 206 MB for Pythia-410m's W_U)."""
    if t is None:
        return None
    mean = t.mean(-1, keepdim=True)
    return t.sub_(mean) if own else t - mean


def _attention(model: HookedTransformer, layer: int, fold: bool, center: bool) -> dict[str, torch.Tensor]:
    cfg, block = model.cfg, model.blocks[layer]
    attn = block.attn
    groups = cfg.n_heads // cfg.kv_heads
    h, g, dh = cfg.n_heads, cfg.kv_heads, cfg.d_head

    def bias(lin, n):
        return torch.zeros(n, dh) if lin.bias is None else lin.bias.detach().float().cpu().view(n, dh)

    def kv(weight, lin):  # key/value heads expanded to the query heads that share them
        return weight.detach().float().cpu().repeat_interleave(groups, 0), bias(lin, g).repeat_interleave(groups, 0)

    w = {"Q": (attn.W_Q.detach().float().cpu(), bias(attn.q, h)), "K": kv(attn.W_K, attn.k), "V": kv(attn.W_V, attn.v)}
    out = {}
    gain, nbias = _gain_bias(block.ln1)
    for name, (W, b) in w.items():
        if fold:
            W, b = _fold_reader(W, b, gain, nbias, center)
        out[f"W_{name}"], out[f"b_{name}"] = W, b
    if fold and attn.q_norm is not None:  # QK-norm: its gains scale the query and key dimensions
        for name, norm in (("Q", attn.q_norm), ("K", attn.k_norm)):
            g = _gain_bias(norm)[0]
            out[f"W_{name}"], out[f"b_{name}"] = out[f"W_{name}"] * g, out[f"b_{name}"] * g
    out["W_O"] = attn.W_O.detach().float().cpu()
    out["b_O"] = attn.b_O.detach().float().cpu().clone()
    if fold and block.ln1_post is not None:  # a norm on the attention output: its gain scales what heads write
        g = _gain_bias(block.ln1_post)[0]
        out["W_O"], out["b_O"] = out["W_O"] * g, out["b_O"] * g
    return out


def _mlp(model: HookedTransformer, layer: int, fold: bool, center: bool) -> dict[str, torch.Tensor | None]:
    block = model.blocks[layer]
    mlp = block.mlp
    if mlp is None or mlp.up.weight.is_meta or mlp.down.weight.is_meta:
        return {}
    gain, nbias = _gain_bias(block.ln2)

    def reader(lin):
        if lin is None:
            return None, None
        W = lin.weight.detach().float().cpu().T  # [D, M]
        b = None if lin.bias is None else lin.bias.detach().float().cpu()
        return _fold_reader(W, b, gain, nbias, center) if fold else (W, b)

    W_in, b_in = reader(mlp.up)
    W_gate, b_gate = reader(mlp.gate)
    W_out = mlp.down.weight.detach().float().cpu().T  # [M, D]
    b_out = torch.zeros(W_out.shape[1]) if mlp.down.bias is None else mlp.down.bias.detach().float().cpu()
    if fold and block.ln2_post is not None:
        g = _gain_bias(block.ln2_post)[0]
        W_out, b_out = W_out * g, b_out * g
    return {"W_in": W_in, "b_in": b_in, "W_gate": W_gate, "b_gate": b_gate, "W_out": W_out, "b_out": b_out}


def check_foldable(cfg: TransformerConfig) -> None:
    """Refuse, in one line, a model whose weights the analysis view cannot fold."""
    if cfg.norm not in ("layernorm", "rmsnorm", "none"):
        raise MechscopeError(f"cannot fold a {cfg.norm!r} norm into the weights (supported: layernorm, rmsnorm, none)")
    if cfg.norm_after_residual:
        raise MechscopeError(
            "a post-LN model (norms after each residual addition, as OPT-350m) has no residual stream that heads "
            "write into linearly: the folded analysis view is not defined for it"
        )


def scale_free_folds(cfg: TransformerConfig) -> tuple[str, ...]:
    """Gains the view folds past a normalisation: right as directions, but only up to a positive scale per
    position and head, so the view cannot be run as a model."""
    return tuple(
        name
        for name, on in (("qk_norm", cfg.qk_norm), ("post_attn_mlp_norm", cfg.post_attn_mlp_norm))
        if on
    )


def check_view(view) -> None:
    """``view`` is an :class:`AnalysisWeights` (the model itself was "no attribute 'W_V'")."""
    if not isinstance(view, AnalysisWeights):
        raise MechscopeError(f"expected the model's analysis weights (analysis_weights(model)), got "
                             f"{type(view).__name__}")  # fmt: skip


@torch.no_grad()
def analysis_weights(
    model: HookedTransformer,
    fold_ln: bool = True,
    center_writing: bool = True,
    center_unembed: bool = True,
    fold_value_biases: bool = True,
    mlp: bool = True,
    per_layer: bool = False,
) -> AnalysisWeights:
    """The folded analysis view of ``model`` (all options on), or the raw weights (all off). ``mlp=False`` leaves
    the MLP weights out (``W_in`` ... ``b_out`` None; the attention and embedding weights are the same): for
    analyses of the heads alone, which then hold no second copy of the MLPs. ``per_layer=True`` folds ``W_Q``,
    ``W_K`` and ``W_V`` when read (:class:`FoldedLayers`: the same values, no stacked copy) and centres a LayerNorm
    model's ``W_E`` as read (:class:`CentredRows`); the view then reads the model's weights, which must not change
    while it is in use."""
    if not isinstance(model, HookedTransformer):  # a name or a transformers model was "no attribute 'cfg'"
        raise MechscopeError(f"analysis_weights takes a loaded model (load_model(...)), got {type(model).__name__}")
    cfg = model.cfg
    check_foldable(cfg)
    offloaded = [n for n, t in model.named_parameters() if t.is_meta and n not in model.missing_weights]
    if offloaded:
        raise MechscopeError(
            f"{len(offloaded)} weights ({offloaded[0]}, ...) are offloaded to disk by the device map: weights-only "
            "analyses need every weight in memory (load without --device-map, or give it more memory)"
        )
    check_finite_weights(model)
    layernorm = cfg.norm == "layernorm"
    center_read = fold_ln and layernorm
    center_write = center_writing and layernorm
    folds = _LayerFolds(model, fold_ln, center_read) if per_layer else None
    att = _stacked((_attention(model, i, fold_ln, center_read) for i in range(cfg.n_layers)), cfg.n_layers,
                   skip=LAZY if per_layer else ())  # fmt: skip
    if per_layer:
        att |= {name: FoldedLayers(folds, name) for name in LAZY}
    with_mlp, mlp = mlp, {}
    mlps = [_mlp(model, i, fold_ln, center_read) for i in range(cfg.n_layers)] if with_mlp else []
    if mlps and all(mlps):
        mlp = {k: torch.stack([m[k] for m in mlps]) for k in mlps[0] if mlps[0][k] is not None}
    del mlps

    W_E, W_pos = _present(model.W_E), _present(getattr(model, "W_pos", None))
    if W_E is not None and cfg.embed_scale != 1.0:
        W_E = W_E * cfg.embed_scale  # what the embedding writes into the stream (Gemma: × √d_model)
    W_U = _present(model.W_U)
    b_U = torch.zeros(cfg.n_logits) if model.b_U is None else model.b_U.detach().float().cpu().clone()
    own_unembed = fold_ln and W_U is not None and model.ln_final is not None  # folding makes a new W_U
    if own_unembed:
        gain, nbias = _gain_bias(model.ln_final)
        W_U, b_U = _fold_reader(W_U, b_U, gain, nbias, center_read)
    value_bias = att["b_V"].clone()
    if fold_value_biases:
        att["b_O"] = att["b_O"] + torch.einsum("lhd,lhdm->lm", att["b_V"], att["W_O"])
        att["b_V"] = torch.zeros_like(att["b_V"])
    if center_write:
        att["W_O"], att["b_O"] = _center_rows(att["W_O"], own=True), _center_rows(att["b_O"], own=True)
        W_E, W_pos = (CentredRows(W_E) if per_layer and W_E is not None else _center_rows(W_E)), _center_rows(W_pos)
        if mlp:
            mlp["W_out"], mlp["b_out"] = _center_rows(mlp["W_out"]), _center_rows(mlp["b_out"])
    if center_unembed and W_U is not None:
        W_U, b_U = _center_rows(W_U, own=own_unembed), b_U - b_U.mean()
    return AnalysisWeights(
        cfg=cfg,
        **att,
        **mlp,
        W_E=W_E,
        W_pos=W_pos,
        W_U=W_U,
        b_U=b_U,
        value_bias=value_bias,
        mlp_inner_norms=_inner_norms(model),
        scale_free=scale_free_folds(cfg) if fold_ln else (),
        fold_ln=fold_ln,
        center_writing=center_writing,
        center_unembed=center_unembed,
        fold_value_biases=fold_value_biases,
    )


def _stacked(layers, n: int, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Per-layer tensors (an iterator of dicts) written into [n, ...] ones as they come: no layer list beside the
    stack (for SmolLM2 the attention weights would be held twice, 160 MB each). The ``skip``ped ones are not kept."""
    out = {}
    for i, layer in enumerate(layers):
        for k, t in layer.items():
            if k in skip:
                continue
            if i == 0:
                out[k] = t.new_empty((n, *t.shape))
            out[k][i] = t
    return out


def _inner_norms(model: HookedTransformer) -> tuple | None:
    mlps = [b.mlp for b in model.blocks]
    if not mlps or mlps[0] is None or getattr(mlps[0], "ln", None) is None:
        return None
    return tuple({k: v.detach().float().cpu() for k, v in m.ln.state_dict().items()} for m in mlps)


def raw_weights(model: HookedTransformer) -> AnalysisWeights:
    """The checkpoint's own weights in the same layout (for comparison with the folded view)."""
    return analysis_weights(model, fold_ln=False, center_writing=False, center_unembed=False, fold_value_biases=False)


@torch.no_grad()
def folded_model(view: AnalysisWeights) -> tuple[HookedTransformer, torch.Tensor]:
    """A model that computes with the view's weights (norm gains 1, biases 0), and its b_U [V].

    ``model.unembed(resid) + b_U`` gives logits equal to the original model's up to a shift per
    position (exactly equal without ``center_unembed``). The test that folding keeps the function.
    """
    cfg = view.cfg
    if not view.fold_ln:
        raise MechscopeError("folded_model needs the folded view (fold_ln=True)")
    if view.scale_free:
        raise MechscopeError(
            f"a view with {' and '.join(view.scale_free)} folded is an analysis view up to per-position scales; "
            "it cannot be run as a model"
        )
    if view.W_E is None or view.W_U is None or (not cfg.attn_only and view.W_in is None):
        raise MechscopeError("the analysis view of a partial checkpoint cannot be run as a model")
    fcfg = replace(
        cfg,
        n_kv_heads=None,
        attn_bias=True,
        attn_out_bias=True,
        mlp_bias=not cfg.attn_only,
        tie_embeddings=False,
        norm_weight_plus_one=False,  # the folded gains are all one
        embed_scale=1.0,  # folded into W_E
        unembed_bias=False,  # returned as b_U
    )
    model = HookedTransformer(fcfg)
    for i, block in enumerate(model.blocks):
        a = block.attn
        for name in "QKV":
            lin = getattr(a, name.lower())
            lin.weight.copy_(getattr(view, f"W_{name}")[i].permute(0, 2, 1).reshape(-1, cfg.d_model))
            lin.bias.copy_(getattr(view, f"b_{name}")[i].reshape(-1))
        a.o.weight.copy_(view.W_O[i].reshape(-1, cfg.d_model).T)
        a.o.bias.copy_(view.b_O[i])
        if block.mlp is not None:
            block.mlp.up.weight.copy_(view.W_in[i].T)
            block.mlp.up.bias.copy_(view.b_in[i] if view.b_in is not None else torch.zeros(cfg.d_mlp))
            if block.mlp.gate is not None:
                block.mlp.gate.weight.copy_(view.W_gate[i].T)
                block.mlp.gate.bias.copy_(view.b_gate[i] if view.b_gate is not None else torch.zeros(cfg.d_mlp))
            block.mlp.down.weight.copy_(view.W_out[i].T)
            block.mlp.down.bias.copy_(view.b_out[i])
            if block.mlp.ln is not None:  # the SoLU MLP's inner LayerNorm stays as it is (nothing reads it linearly)
                block.mlp.ln.load_state_dict(view.mlp_inner_norms[i])
    norms = [m for b in model.blocks for m in (b.ln1, b.ln2) if m is not None]
    for norm in norms + ([model.ln_final] if model.ln_final is not None else []):
        if getattr(norm, "w", None) is not None:  # norm="none" (tracr) has no gain
            norm.w.fill_(1.0)
        if getattr(norm, "b", None) is not None:
            norm.b.zero_()
    model.W_E.copy_(view.W_E[:])
    if view.W_pos is not None:
        model.W_pos.copy_(view.W_pos)
    model.W_U_untied.copy_(view.W_U)
    return model.eval(), view.b_U
