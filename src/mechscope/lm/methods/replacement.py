"""The local replacement model of a transformer on one prompt (Ameisen et al. 2025, "Circuit Tracing", § 2).

Given a :class:`~mechscope.lm.models.transformer.HookedTransformer` and one transcoder per MLP layer (reading
``blocks.L.mlp.hook_in``, the MLP's input after ln2, and predicting ``blocks.L.hook_mlp_out``):

* every MLP's output becomes ``Σ_i a_i W_dec[i] + b_dec (+ W_skip x) + ε_L``, with the **error node**
  ``ε_L[p] = mlp_out - transcoder_out`` at each layer and position, so the prompt's logits are unchanged;
* the **attention patterns** of every head and the **normalisation denominators** of every norm (ln1, ln2, the
  final norm, Gemma's post-norms, q/k norms) are frozen at their values on the prompt, so the network becomes
  linear in its sources: token embeddings (with learned positions where the model has them), feature activations
  and error vectors.

The frozen run is made with hooks only (:mod:`mechscope.core.hooks`): ``attn.hook_pattern`` returns the prompt's
pattern, each norm module's output is recomputed with the prompt's scale (LayerNorm: ``(x - mean x) s w + b``;
RMSNorm: ``w (x s)``), and ``hook_mlp_out`` returns the replacement's output. Every family the transformer file
runs works the same way; a final logit soft-cap (Gemma 2) is left out of the attributed logits (they are the logits
before the cap; the replacement model's capped logits equal the model's).

Sources are ordered ``[features (layer, position, index) | errors (layer-major) | inputs (positions)]``, as in
circuit-tracer. Logit targets are the logits minus their mean over the vocabulary (softmax ignores a shift), read at
one position (the last by default).

Transcoders (:mod:`mechscope.lm.methods.transcoders`) come from ``lm sae`` or SAELens' directory format, from the
MLP's own neurons (exact, for plain ReLU MLPs) or from training here.

A :class:`~mechscope.lm.methods.crosslayer.CrossLayerTranscoder` (CLT) can take the transcoders' place: layer ``l``'s
features read layer ``l``'s MLP input and write to every MLP output ``l' >= l``; the error node at ``(l', p)`` is the
MLP output minus the CLT's reconstruction of layer ``l'`` (the decoders of every earlier layer's active features
included), and a feature's row entries contract the gradients at the MLP outputs of every ``l' >= l`` with its
decoders into them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import hooks, module_hooks
from mechscope.lm.methods.crosslayer import CrossLayerTranscoder
from mechscope.lm.methods.tasks import check_model
from mechscope.lm.methods.transcoders import Transcoders
from mechscope.lm.models.transformer import HookedTransformer, LayerNorm, RMSNorm

MODES = ("direct", "frozen", "recomputed", "model")


# ---- the local replacement model ----------------------------------------------------------------------


@dataclass
class _Pass:
    """One frozen forward pass kept for backward passes: its leaves and the tensors gradients are injected into."""

    batch: int
    x0: torch.Tensor  # [B,P,D] the embedding, a leaf
    sites: list[torch.Tensor]  # per MLP layer [B,P,D]: a zero leaf added to the MLP output (its gradient is read)
    mlp_in: dict[int, torch.Tensor]  # per layer [B,P,D]: the transcoder's input
    final: torch.Tensor  # [B,P,D] after the final norm
    captured: dict[str, torch.Tensor]


class LocalReplacement:
    """The local replacement model of ``model`` on ``tokens`` [P] (or [1, P]) with ``transcoders``.

    ``skip_first``: no feature nodes at position 0 (the first token's residual is an outlier transcoders do not
    reconstruct; its MLP output is all error node, as circuit-tracer does for BOS). ``logit_pos``: where the logits
    are read (default the last position). Attributes after construction: ``feature_layer/pos/index/activation``
    [N] (the active features), ``errors`` [L,P,D], ``embedding`` [P,D], ``logits`` [P,V] (the model's own).
    """

    def __init__(
        self,
        model: HookedTransformer,
        transcoders: Transcoders,
        tokens: torch.Tensor,
        *,
        skip_first: bool = False,
        batch_size: int = 32,
    ) -> None:
        check_model(model)
        if not isinstance(transcoders, (Transcoders, CrossLayerTranscoder)):
            raise MechscopeError(f"expected Transcoders or a CrossLayerTranscoder, got {type(transcoders).__name__}")
        tokens = torch.as_tensor(tokens)
        tokens = tokens[None] if tokens.dim() == 1 else tokens
        model.check_tokens(tokens)
        if tokens.shape[0] != 1 or tokens.shape[1] < 1:
            raise MechscopeError(f"expected one prompt of at least one token, got shape {list(tokens.shape)}")
        transcoders.check(model)
        p = next(model.parameters())
        self.model, self.device, self.dtype = model, p.device, p.dtype
        # per-layer transcoders and a CLT answer the same layer-indexed calls (encode, decode, decoder, reach, ...)
        self.transcoders = transcoders.to_model(self.device, self.dtype)
        self.crosslayer = transcoders.crosslayer
        self.read_hook = transcoders.input_hook  # where the features read: mlp.hook_in or hook_mlp_in
        self.tokens = tokens.to(self.device)
        self.cfg = model.cfg
        self.P = tokens.shape[1]
        self.L = len(self.transcoders)
        self.batch_size = max(1, int(batch_size))
        self.skip_first = skip_first
        self._norms = self._norm_modules()
        self._pass: _Pass | None = None
        self._clean()

    # ---- the clean run ----------------------------------------------------------------------------

    def _norm_modules(self) -> dict[int, str]:
        names = {}
        for i, b in enumerate(self.model.blocks):
            for part in ("ln1", "ln2", "ln1_post", "ln2_post"):
                m = getattr(b, part, None)
                if m is not None:
                    names[id(m)] = f"blocks.{i}.{part}"
            for part in ("q_norm", "k_norm"):
                m = getattr(b.attn, part, None)
                if m is not None:
                    names[id(m)] = f"blocks.{i}.attn.{part}"
        if self.model.ln_final is not None:
            names[id(self.model.ln_final)] = "ln_final"
        return names

    @torch.no_grad()
    def _clean(self) -> None:
        model, L = self.model, self.L
        self.scales: dict[int, torch.Tensor] = {}
        self.patterns: dict[int, torch.Tensor] = {}
        mlp_in, mlp_out = {}, {}

        def norm_hook(module, args, output):
            key = id(module)
            if key in self._norms:
                self.scales[key] = _scale(module, args[0])
            return None

        fwd = [(f"blocks.{i}.attn.hook_pattern", self._store(self.patterns, i)) for i in range(self.cfg.n_layers)]
        fwd += [(f"blocks.{i}.{self.read_hook}", self._store(mlp_in, i)) for i in range(L)]
        fwd += [(f"blocks.{i}.hook_mlp_out", self._store(mlp_out, i)) for i in range(L)]
        with module_hooks(model, (LayerNorm, RMSNorm), forward=norm_hook), hooks(model, fwd=fwd):
            self.embedding = model.embed(self.tokens)[0]  # [P,D]
            resid = model.run_blocks(self.embedding[None])
            self.logits = model.unembed(resid)[0].float()  # [P,V] the model's own logits
        self.mlp_in = {i: mlp_in[i][0] for i in range(L)}
        self.mlp_out = {i: mlp_out[i][0] for i in range(L)}
        layers, pos, idx, act = [], [], [], []
        self.errors = torch.zeros(L, self.P, self.cfg.d_model, device=self.device, dtype=self.dtype)
        self.const: dict[int, torch.Tensor] = {}
        self.acts: dict[int, torch.Tensor] = {}
        for i in range(L):
            x = self.mlp_in[i]
            f = self.transcoders.encode(i, x)  # [P, d_sae]
            if self.skip_first:
                f[0] = 0
            self.acts[i] = f
            out = self.transcoders.decode(i, self.acts, x)
            self.errors[i] = self.mlp_out[i] - out
            nz = f.nonzero()
            layers.append(torch.full((len(nz),), i, dtype=torch.long))
            pos.append(nz[:, 0].cpu())
            idx.append(nz[:, 1].cpu())
            act.append(f[nz[:, 0], nz[:, 1]].float().cpu())
        cat = lambda xs, dt: torch.cat(xs) if xs else torch.zeros(0, dtype=dt)  # noqa: E731
        self.feature_layer = cat(layers, torch.long)
        self.feature_pos = cat(pos, torch.long)
        self.feature_index = cat(idx, torch.long)
        self.feature_activation = cat(act, torch.float32)
        self.layer_start = [int((self.feature_layer < i).sum()) for i in range(L + 1)]
        self.n_features = len(self.feature_layer)
        self.n_errors = L * self.P
        self.n_inputs = self.P

    @staticmethod
    def _store(d: dict, i: int):
        def fn(x, hook):
            d[i] = x.detach()

        return fn

    # ---- reading -------------------------------------------------------------------------------------------

    def pre_activations(self, mlp_in: dict[int, torch.Tensor]) -> torch.Tensor:
        """The pre-activation of every active feature [N] from transcoder inputs ``mlp_in[L]`` [P,D]."""
        out = []
        for i in range(self.L):
            s, e = self.layer_start[i], self.layer_start[i + 1]
            if e > s:
                z = self.transcoders.pre_activations(i, mlp_in[i])  # [P, d_sae]
                out.append(z[self.feature_pos[s:e], self.feature_index[s:e]].float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def demeaned(self, logits: torch.Tensor, targets: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits ``targets`` at ``pos`` minus the mean logit there: what the graph attributes."""
        row = logits[pos].float()
        return row[targets] - row.mean()

    def unembed_directions(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(directions [n, D] after the final norm, offsets [n]): demeaned logit = final · direction + offset."""
        W = self.model.W_U.float()  # [D, V]
        u = (W[:, targets] - W.mean(1, keepdim=True)).T
        b = self.model.b_U
        off = (b[targets] - b.mean()).float() if b is not None else torch.zeros(len(targets))
        return u, off

    def source_id(self, s: int) -> str:
        """The node id of source ``s`` (a feature, error or input)."""
        from mechscope.core.attribution_graph import node_id

        nf, ne = self.n_features, self.n_errors
        if s < nf:
            return node_id(
                "feature", int(self.feature_layer[s]), int(self.feature_index[s]), int(self.feature_pos[s]), 0
            )
        if s < nf + ne:
            layer, pos = divmod(s - nf, self.P)
            return node_id("error", layer, -1, pos, 0)
        pos = s - nf - ne
        return node_id("input", -1, int(self.tokens[0, pos]), pos, 0)

    def source_of(self, node: str) -> int:
        """The source index of a node id (``"3_1204_7"``, ``"3_-1_7"``, ``"E_42_0"``)."""
        m = re.fullmatch(r"(E|\d+)_(-?\d+)_(\d+)", node.strip())
        if not m:
            raise MechscopeError(f"expected a node id LAYER_FEATURE_POS (E_TOKEN_POS for a token), got {node!r}")
        a, b, c = m.group(1), int(m.group(2)), int(m.group(3))
        if not 0 <= c < self.P:
            raise MechscopeError(f"node {node}: position {c} outside the prompt's 0..{self.P - 1}")
        if a == "E":
            return self.n_features + self.n_errors + c
        layer = int(a)
        if not 0 <= layer < self.L:
            raise MechscopeError(f"node {node}: layer {layer} outside 0..{self.L - 1}")
        if b == -1:
            return self.n_features + layer * self.P + c
        s, e = self.layer_start[layer], self.layer_start[layer + 1]
        hit = ((self.feature_pos[s:e] == c) & (self.feature_index[s:e] == b)).nonzero()
        if not len(hit):
            raise MechscopeError(f"node {node}: feature {b} of layer {layer} is not active at position {c}")
        return s + int(hit[0, 0])

    # ---- the frozen run ------------------------------------------------------------------------------------

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """Attention patterns and norm scales fixed at the prompt's values for the block (hooks removed after)."""

        def norm_hook(module, args, output):
            key = id(module)
            if key not in self.scales:
                return None
            return _apply_frozen(module, args[0], self.scales[key])

        def pattern(i):
            def fn(x, hook):
                return self.patterns[i].expand_as(x)

            return fn

        fwd = [(f"blocks.{i}.attn.hook_pattern", pattern(i)) for i in range(self.cfg.n_layers)]
        with module_hooks(self.model, (LayerNorm, RMSNorm), forward=norm_hook), hooks(self.model, fwd=fwd):
            yield

    def _forward(
        self,
        x0: torch.Tensor,
        mode: str,
        values: dict[int, torch.Tensor] | None = None,
        error_delta: torch.Tensor | None = None,
        sites: list[torch.Tensor] | None = None,
        capture: tuple[str, ...] = (),
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[str, torch.Tensor]]:
        """One run on the residual ``x0`` [B,P,D]: returns (the residual after the last block, the transcoders'
        inputs, the captured activations). ``mode``: "direct" (features fixed at ``values``, frozen), "frozen"
        (features re-encoded from their inputs, except those in ``values``; attention and norms frozen),
        "recomputed" (the same with attention and norms live), "model" (the model itself, with the change of the
        features in ``values`` added to the MLP outputs)."""
        values = values or {}
        mlp_in: dict[int, torch.Tensor] = {}
        captured: dict[str, torch.Tensor] = {}
        cur: dict[int, torch.Tensor] = {}  # the latents of each layer in this run (a CLT's later layers read them)

        def take(i):
            def fn(x, hook):
                mlp_in[i] = x

            return fn

        def replace(i):
            def fn(out, hook):
                x = mlp_in[i]
                if mode == "model":  # every changed layer j that writes into i adds its change through its decoder
                    for j in sorted(values):
                        if i in self.transcoders.reach(j):
                            out = out + (values[j] - self.acts[j]).to(out.dtype) @ self.transcoders.decoder(j, i)
                    return out
                if mode == "direct":
                    f = values.get(i, self.acts[i])
                else:
                    f = self.transcoders.encode(i, x)
                    if self.skip_first:
                        f = f.clone()
                        f[:, 0] = 0
                    if i in values:
                        changed = values[i] != self.acts[i]
                        f = torch.where(changed, values[i].to(f.dtype), f)
                cur[i] = f
                base = self.transcoders.decode(i, cur, x) + self.errors[i]
                if error_delta is not None:
                    base = base + error_delta[i]
                return base + sites[i] if sites is not None else base

            return fn

        def keep(name):
            def fn(x, hook):
                captured[name] = x

            return fn

        fwd = [(f"blocks.{i}.{self.read_hook}", take(i)) for i in range(self.L)]
        fwd += [(f"blocks.{i}.hook_mlp_out", replace(i)) for i in range(self.L)]
        fwd += [(name, keep(name)) for name in capture]
        with ExitStack() as stack:
            if mode in ("direct", "frozen"):
                stack.enter_context(self.frozen())
            stack.enter_context(hooks(self.model, fwd=fwd))
            resid = self.model.run_blocks(x0)
        return resid, mlp_in, captured

    def final(self, resid: torch.Tensor, frozen: bool) -> torch.Tensor:
        """The residual after the final norm (its scale frozen or not)."""
        if self.model.ln_final is None:
            return resid
        if not frozen:
            return self.model.ln_final(resid)
        with self.frozen():
            return self.model.ln_final(resid)

    def logits_of(self, final: torch.Tensor) -> torch.Tensor:
        """Logits before any soft-cap from the final-normed residual [..., D]."""
        W = self.model.W_U
        out = final.to(W.dtype) @ W
        return out + self.model.b_U if self.model.b_U is not None else out

    @torch.no_grad()
    def replacement_logits(self) -> torch.Tensor:
        """The replacement model's logits [P,V] on the prompt (frozen, features and errors at their values): equal
        to the model's up to float rounding."""
        resid, _, _ = self._forward(self.embedding[None], "direct")
        out = self.logits_of(self.final(resid, True))[0]
        cap = self.cfg.final_logit_softcap
        return (out if cap is None else torch.tanh(out / cap) * cap).float()

    @torch.no_grad()
    def run(
        self,
        mode: str = "direct",
        features: dict[int, float] | None = None,
        scale_source: tuple[int, float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits before any soft-cap [P,V], pre-activations of the active features [N]) after setting
        ``features`` (source index -> new activation) or scaling one source by a factor (``scale_source``: a
        feature's activation, an error vector, an input embedding), in ``mode`` (see :meth:`_forward`)."""
        if mode not in MODES:
            raise MechscopeError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        values = {i: a.clone() for i, a in self.acts.items()}
        x0 = self.embedding[None].clone()
        err = None
        changes = dict(features or {})
        if scale_source is not None:
            s, factor = scale_source
            nf, ne = self.n_features, self.n_errors
            if s < nf:
                changes[s] = float(self.feature_activation[s]) * factor
            elif s < nf + ne:
                layer, pos = divmod(s - nf, self.P)
                err = torch.zeros_like(self.errors)
                err[layer, pos] = self.errors[layer, pos] * (factor - 1)
            else:
                pos = s - nf - ne
                x0[0, pos] = x0[0, pos] * factor
        touched = set()
        for s, v in changes.items():
            if not 0 <= s < self.n_features:
                raise MechscopeError(f"source {s} is not an active feature (0..{self.n_features - 1})")
            layer = int(self.feature_layer[s])
            values[layer][self.feature_pos[s], self.feature_index[s]] = float(v)
            touched.add(layer)
        if mode != "direct":
            values = {i: values[i] for i in touched}
        resid, mlp_in, _ = self._forward(x0, mode, values, err)
        frozen = mode in ("direct", "frozen")
        logits = self.logits_of(self.final(resid, frozen))[0].float()
        return logits, self.pre_activations({i: v[0] for i, v in mlp_in.items()})

    # ---- rows by backward passes (the LinearSystem of core.attribution_graph) -------------------------

    def _ensure_pass(self) -> _Pass:
        if self._pass is not None:
            return self._pass
        B, P, D = self.batch_size, self.P, self.cfg.d_model
        x0 = self.embedding.detach()[None].expand(B, P, D).clone().requires_grad_(True)
        sites = [torch.zeros(B, P, D, device=self.device, dtype=self.dtype, requires_grad=True) for _ in range(self.L)]
        with torch.enable_grad():
            resid, mlp_in, captured = self._forward(x0, "direct", sites=sites, capture=self._capture)
            final = self.final(resid, True)
        self._pass = _Pass(B, x0, sites, mlp_in, final, captured)
        return self._pass

    _capture: tuple[str, ...] = ()

    def release(self) -> None:
        """Free the kept forward pass (its graph holds activations of batch_size copies of the prompt)."""
        self._pass = None

    def backward_rows(
        self, inject: list[tuple[torch.Tensor, torch.Tensor]], b: int, extra: tuple[torch.Tensor, ...] = ()
    ) -> tuple[torch.Tensor, tuple]:
        """Rows [b, N+E+T] for one batch: ``inject`` lists (tensor of the kept pass, gradient of its shape);
        ``extra``: tensors of the pass whose gradients are returned too."""
        ps = self._ensure_pass()
        outs = [t for t, _ in inject]
        grads = [g for _, g in inject]
        inputs = [ps.x0, *ps.sites, *extra]
        got = torch.autograd.grad(outs, inputs, grads, retain_graph=True, allow_unused=True)
        gx0, gsites, gextra = got[0], got[1 : 1 + self.L], got[1 + self.L :]
        return self.contract(gx0, gsites, b), gextra

    @torch.no_grad()
    def contract(self, gx0: torch.Tensor | None, gsites, b: int) -> torch.Tensor:
        """Direct effects on the ``b`` targets from gradients at the embedding [B,P,D] and the MLP outputs."""
        nf, ne, nt = self.n_features, self.n_errors, self.n_inputs
        rows = torch.zeros(b, nf + ne + nt, dtype=torch.float32)
        if self.crosslayer:
            self._contract_features(gsites, b, rows)
        for i in range(self.L):
            g = gsites[i]
            if g is None:
                continue
            g = g[:b]
            s, e = self.layer_start[i], self.layer_start[i + 1]
            if e > s and not self.crosslayer:
                proj = g @ self.transcoders.decoder(i, i).T  # [b,P,d_sae]
                vals = proj[:, self.feature_pos[s:e], self.feature_index[s:e]]
                rows[:, s:e] = (vals * self.feature_activation[s:e].to(vals)).float().cpu()
            rows[:, nf + i * self.P : nf + (i + 1) * self.P] = (g * self.errors[i]).sum(-1).float().cpu()
        if gx0 is not None:
            rows[:, nf + ne :] = (gx0[:b] * self.embedding).sum(-1).float().cpu()
        return rows

    def _contract_features(self, gsites, b: int, rows: torch.Tensor) -> None:
        """A CLT's feature entries: feature (j, p, i) writes ``a · W_dec[j -> l'][i]`` into every MLP output
        ``l' >= j`` at position ``p``, so its entry is ``a Σ_{l' >= j} g_{l'}[p] · W_dec[j -> l'][i]``."""
        for j in range(self.L):
            s, e = self.layer_start[j], self.layer_start[j + 1]
            if e == s:
                continue
            pos, idx = self.feature_pos[s:e].to(self.device), self.feature_index[s:e].to(self.device)
            vals = None
            for dst in self.transcoders.reach(j):
                g = gsites[dst]
                if g is None:
                    continue
                w = self.transcoders.decoder(j, dst)[idx]  # [n, D]
                part = (g[:b, pos] * w.to(g.dtype)).sum(-1)  # [b, n]
                vals = part if vals is None else vals + part
            if vals is not None:
                rows[:, s:e] = (vals * self.feature_activation[s:e].to(vals)).float().cpu()

    def feature_rows(self, idx: torch.Tensor) -> torch.Tensor:
        ps = self._ensure_pass()
        b = len(idx)
        layers = self.feature_layer[idx]
        inject = []
        for layer in layers.unique().tolist():
            g = torch.zeros_like(ps.mlp_in[layer])
            rows = (layers == layer).nonzero().squeeze(1)
            f = idx[rows]
            g[rows.to(self.device), self.feature_pos[f].to(self.device)] = self.transcoders.encoder(
                layer, self.feature_index[f].to(self.device)
            ).to(g.dtype)
            inject.append((ps.mlp_in[layer], g))
        return self.backward_rows(inject, b)[0]

    def logit_rows(self, idx: torch.Tensor) -> torch.Tensor:
        ps = self._ensure_pass()
        g = torch.zeros_like(ps.final)
        g[torch.arange(len(idx)), self.logit_pos] = self.logit_directions[idx].to(g.dtype)
        return self.backward_rows([(ps.final, g)], len(idx))[0]

    # ---- logit targets -------------------------------------------------------------------------------

    logit_pos: int = -1
    logit_targets: torch.Tensor
    logit_directions: torch.Tensor
    logit_offsets: torch.Tensor

    def set_targets(self, targets: torch.Tensor, pos: int | None = None) -> None:
        """The logits to attribute (token ids) at ``pos`` (default the last position)."""
        pos = self.P - 1 if pos is None else int(pos)
        if not 0 <= pos < self.P:
            raise MechscopeError(f"logit position {pos} outside the prompt's 0..{self.P - 1}")
        targets = torch.as_tensor(targets, dtype=torch.long).reshape(-1)
        V = self.cfg.n_logits
        bad = targets[(targets < 0) | (targets >= V)]
        if len(bad):
            raise MechscopeError(f"logit {int(bad[0])} outside the model's 0..{V - 1}")
        self.logit_pos = pos
        self.logit_targets = targets.cpu()
        self.logit_directions, self.logit_offsets = self.unembed_directions(targets.to(self.device))

    def salient_logits(
        self, pos: int | None = None, max_n: int = 10, desired: float = 0.95
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The most probable next tokens at ``pos`` until their probability reaches ``desired`` (at most
        ``max_n``): (token ids, probabilities), as circuit-tracer chooses its logit nodes."""
        pos = self.P - 1 if pos is None else pos
        probs = torch.softmax(self.logits[pos].double(), -1)
        top = probs.topk(min(max_n, probs.numel()))
        cut = int((torch.cumsum(top.values, 0) < desired).sum()) + 1
        return top.indices[:cut].cpu(), top.values[:cut].float().cpu()


def _scale(module, x: torch.Tensor) -> torch.Tensor:
    """The normalisation factor a norm module applies to ``x`` [..., D] (its denominator's inverse)."""
    if isinstance(module, LayerNorm):
        xc = x - x.mean(-1, keepdim=True)
        return torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + module.eps).detach()
    xf = x.float()
    return torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + module.eps).detach()


def _apply_frozen(module, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The norm's output with its denominator fixed: linear in ``x`` (an affine map with the gain and bias)."""
    if isinstance(module, LayerNorm):
        return (x - x.mean(-1, keepdim=True)) * scale * module.w + module.b
    dtype = x.dtype
    y = x.float() * scale
    if module.plus_one:
        return (y * (1.0 + module.w.float())).to(dtype)
    return module.w * y.to(dtype)
