"""The transformer's component graph: :class:`TransformerEdges`, the :class:`~mechscope.core.graphs.EdgeModel`
adapter of a :class:`~mechscope.lm.models.transformer.HookedTransformer`.

The standard EAP/ACDC graph (Conmy et al. 2023; Syed et al. 2023; Hanna et al. 2024), as
:func:`~mechscope.core.graphs.transformer_graph` names it: senders ``embed`` (token embeddings), ``pos_embed``
(learned positions; rotary models have none), every head ``blocks.L.attn.hH`` (its ``z @ W_O``, ``hook_result``)
and every ``blocks.L.mlp`` (``hook_mlp_out``); receivers every head's ``q``, ``k`` and ``v`` inputs (grouped-query
attention: one ``k`` and one ``v`` per key/value head, on the group's first head, read by the others), every MLP's
``in`` (``hook_mlp_in``) and ``unembed<out>`` (the last ``hook_resid_post``). Each receiver's input is its own
tensor, the residual stream *before* the norm the receiver applies: the transformer's split-input hook points
(``hook_q_input`` [B,P,H,D], ``hook_k_input``/``hook_v_input`` [B,P,G,D], active only when hooked, ln1 then
applied per head) give every head its own copy, so an edit of one head's query input leaves the others alone.
Everything runs through :mod:`mechscope.core.hooks`; unedited, the adapter's logits are the model's (tested).

Inputs are token ids [B, P], or a :class:`Tokens` batch of sequences of different lengths padded at the end:
the padded keys are masked out of every attention pattern (``hook_attn_scores``), so each sequence computes
exactly what it computes alone at its own length (tracr's non-causal programs must not see padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mechscope.core.errors import MechscopeError
from mechscope.core.graphs import residual_edge_attribution, residual_edge_mix, transformer_graph
from mechscope.core.hooks import hooks
from mechscope.lm.models.transformer import HookedTransformer


@dataclass(frozen=True)
class Tokens:
    """Token ids [B, P] padded at the end, and each row's own length [B] (keys past it are masked)."""

    ids: torch.Tensor
    lengths: torch.Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, rows) -> Tokens:
        return Tokens(self.ids[rows], self.lengths[rows])

    def valid(self) -> torch.Tensor:
        """[B, P]: True at the positions a row really has."""
        return torch.arange(self.ids.shape[1])[None] < self.lengths[:, None]


def pad_sequences(seqs, pad: int) -> Tokens:
    """Sequences of token ids (each its own length) as one padded :class:`Tokens` batch."""
    seqs = [list(map(int, s)) for s in seqs]
    if not seqs or min(len(s) for s in seqs) < 1:
        raise MechscopeError("expected at least one non-empty sequence")
    p = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), p), int(pad), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return Tokens(ids, torch.tensor([len(s) for s in seqs]))


def check_supported(model: HookedTransformer) -> None:
    """Refuse, in one line, the transformers whose residual stream is not a sum of head and MLP outputs."""
    cfg = model.cfg
    why = (
        "post-LN blocks (norm_after_residual) normalise the residual stream itself" if cfg.norm_after_residual
        else "post_attn_mlp_norm normalises the sum of the heads' outputs" if cfg.post_attn_mlp_norm
        else None
    )  # fmt: skip
    if why:
        raise MechscopeError(f"{cfg.name or 'this model'}: the component graph needs a residual stream that sums "
                             f"its writers' outputs, but {why}")  # fmt: skip
    model.check_complete()


class TransformerEdges:
    """The :class:`~mechscope.core.graphs.EdgeModel` of a :class:`HookedTransformer` (see the module docstring)."""

    residual_stream = True  # edge_mix is residual_edge_mix: the core mixes through its buffered fast path

    def __init__(self, model: HookedTransformer) -> None:
        check_supported(model)
        cfg = model.cfg
        self.model = model
        self.has_pos = cfg.positional == "learned"
        self.has_mlp = not cfg.attn_only
        self.graph = transformer_graph(
            cfg.n_layers, cfg.n_heads, pos_embed=self.has_pos, n_kv_heads=cfg.kv_heads, mlp=self.has_mlp,
            parallel=cfg.parallel_attn_mlp,
        )  # fmt: skip
        g, group = self.graph, cfg.n_heads // cfg.kv_heads
        node = g.node_id
        self.s_embed = g.sender_of(node("embed"))
        self.s_pos = g.sender_of(node("pos_embed")) if self.has_pos else None
        self.s_heads = [[g.sender_of(node(f"blocks.{L}.attn.h{h}")) for h in range(cfg.n_heads)]
                        for L in range(cfg.n_layers)]  # fmt: skip
        rid = g._index["receiver"]
        self.r_q = [[rid[(f"blocks.{L}.attn.h{h}", "q")] for h in range(cfg.n_heads)] for L in range(cfg.n_layers)]
        self.r_kv = {
            slot: [[rid[(f"blocks.{L}.attn.h{k * group}", slot)] for k in range(cfg.kv_heads)]
                   for L in range(cfg.n_layers)]
            for slot in ("k", "v")
        }  # fmt: skip
        if self.has_mlp:
            self.s_mlp = [g.sender_of(node(f"blocks.{L}.mlp")) for L in range(cfg.n_layers)]
            self.r_mlp = [rid[(f"blocks.{L}.mlp", "in")] for L in range(cfg.n_layers)]
        self.r_out = rid[("unembed", "out")]
        self.forwards = 0

    # ---- the protocol ---------------------------------------------------------------------------

    def forward(self, inputs, edit=None):
        ids, lengths = _unpack(inputs)
        model, cfg = self.model, self.model.cfg
        senders: list[torch.Tensor | None] = [None] * self.graph.n_senders
        self.forwards += 1

        def keep(s):
            def fn(x, hook):
                senders[s] = x

            return fn

        def split(ids_):
            def fn(x, hook):
                ins = list(x.unbind(2))
                if edit is not None:
                    ins = edit(ids_, ins, senders)
                return torch.stack(ins, 2)

            return fn

        def single(r):
            def fn(x, hook):
                return x if edit is None else edit([r], [x], senders)[0]

            return fn

        def heads_out(L):
            def fn(x, hook):
                for h, s in enumerate(self.s_heads[L]):
                    senders[s] = x[:, :, h]

            return fn

        fwd = [("hook_embed", keep(self.s_embed))]
        if self.has_pos:
            fwd.append(("hook_pos_embed", keep(self.s_pos)))
        for L in range(cfg.n_layers):
            a = f"blocks.{L}.attn."
            fwd += [(a + "hook_q_input", split(self.r_q[L])), (a + "hook_k_input", split(self.r_kv["k"][L])),
                    (a + "hook_v_input", split(self.r_kv["v"][L])), (a + "hook_result", heads_out(L))]  # fmt: skip
            if self.has_mlp:
                fwd += [(f"blocks.{L}.hook_mlp_in", single(self.r_mlp[L])), (f"blocks.{L}.hook_mlp_out",
                                                                               keep(self.s_mlp[L]))]  # fmt: skip
            if lengths is not None:
                fwd.append((a + "hook_attn_scores", _key_mask(lengths)))
        fwd.append((f"blocks.{cfg.n_layers - 1}.hook_resid_post", single(self.r_out)))
        with hooks(model, fwd=fwd):
            logits = model(ids)
        return logits, senders

    def edge_mix(self, values, weight, receivers):
        return residual_edge_mix(self.graph, values, weight, receivers)

    def edge_attribution(self, values, grads):
        return residual_edge_attribution(self.graph, values, grads)


def short_name(name: str) -> str:
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blocks" and parts[2] == "attn":
        return f"{parts[1]}.{parts[3][1:]}"
    if len(parts) == 3 and parts[0] == "blocks" and parts[2] == "mlp":
        return f"MLP {parts[1]}"
    return name


def _unpack(inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(inputs, Tokens):
        full = bool((inputs.lengths == inputs.ids.shape[1]).all())
        return inputs.ids, None if full else inputs.lengths
    if torch.is_tensor(inputs) and inputs.dim() == 2 and not inputs.is_floating_point():
        return inputs, None
    raise MechscopeError(f"expected token ids [batch, position] or a Tokens batch, got {type(inputs).__name__}")


def _key_mask(lengths: torch.Tensor):
    def fn(scores, hook):  # [B,H,P,K]: keys at or past a row's length never count
        k = scores.shape[-1]
        pad = torch.arange(k, device=scores.device)[None, :] >= lengths.to(scores.device)[:, None]  # [B,K]
        return scores.masked_fill(pad[:, None, None, :], float("-inf"))

    return fn
