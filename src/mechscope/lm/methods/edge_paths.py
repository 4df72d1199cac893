"""A target's inputs in an attribution graph split by the attention head that last carried them into its position
(``direct``: written there). Exact in the local replacement model (attention and norms frozen, features fixed):
``edge = direct + Σ_heads via[head]``, and a source at another position has no direct part (causal attention is the
only way between positions; ``max_abs_residual`` measures what is left there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mechscope.core.attribution_graph.graph import target_title
from mechscope.core.errors import MechscopeError
from mechscope.core.results import Result
from mechscope.lm.methods.replacement import LocalReplacement


@dataclass(frozen=True)
class EdgePaths(Result):
    """The inputs of one target split by how they reach its position: ``direct`` (written at that position) or
    through attention head ``L.H`` (the last head that carried them there). ``rows``: per source, its edge and its
    parts; ``heads``: each head's total over every source. ``target``: "logit ID" or a feature node's id;
    ``label``: what a person reads for it (a logit's token text; the id where none was given)."""

    target: str
    rows: tuple[dict, ...]
    heads: tuple[dict, ...]
    max_abs_residual: float
    label: str = ""

    def title(self) -> str:
        """The target as a reader names it: a logit by its token text (quoted), a feature by its id."""
        return target_title(self.target, self.label)


def edge_paths(rep: LocalReplacement, target: str | int, n: int = 10, label: str | None = None) -> EdgePaths:
    """Split the direct effects on ``target`` (an index into the attributed logits, or a feature node id) by how
    each source's contribution reaches the target's position: written there (``direct``) or carried there by
    attention head ``L.H`` (the last head on its way). Exact: ``edge = direct + Σ_heads via[head]``; each head's part
    is the head's output at the target's position read through everything between it and the target there but later
    heads (the residual stream, the MLPs' skip paths, a post-attention norm), a backward pass per head.
    ``label``: the target's text (a logit's token), kept in the result. ``rows``: the ``n`` strongest sources with an
    edge above a millionth of the largest (below it, float rounding: fewer rows where fewer have one)."""
    cfg = rep.cfg
    H = cfg.n_heads
    if cfg.norm_after_residual:
        raise MechscopeError("edge paths need a pre-norm model (writers add up in the residual stream)")
    if isinstance(target, int):
        if not 0 <= target < len(rep.logit_targets):
            raise MechscopeError(f"logit {target} outside the attributed 0..{len(rep.logit_targets) - 1}")
        pos, layers = rep.logit_pos, list(range(cfg.n_layers))
        read = f"blocks.{cfg.n_layers - 1}.hook_resid_post"
        tname = f"logit {int(rep.logit_targets[target])}"
    else:
        s = rep.source_of(target)
        if s >= rep.n_features:
            raise MechscopeError(f"{target}: a target must be a feature or a logit")
        layer, pos = int(rep.feature_layer[s]), int(rep.feature_pos[s])
        layers = list(range(layer if cfg.parallel_attn_mlp else layer + 1))
        read = f"blocks.{layer}.hook_mlp_in"
        tname = target
    # the residual after each layer's heads, where their parts are read (a feature's own layer: its MLP input)
    outs = {i: f"blocks.{i}.hook_resid_post" for i in layers}
    if not isinstance(target, int) and layer in outs:
        outs[layer] = read
    rep.release()
    rep._capture = (*(f"blocks.{i}.{n}" for i in layers for n in ("attn.hook_result", "hook_mlp_in")), *outs.values(),
                    read)  # fmt: skip
    try:
        ps = rep._ensure_pass()
        if isinstance(target, int):
            out_t = ps.final
            g = torch.zeros_like(out_t)
            g[0, pos] = rep.logit_directions[target].to(g.dtype)
        else:
            out_t = ps.mlp_in[layer]
            g = torch.zeros_like(out_t)
            g[0, pos] = rep.transcoders.encoder(layer, rep.feature_index[s][None].to(rep.device))[0].to(g.dtype)
        total, _ = rep.backward_rows([(out_t, g)], 1)
        r = torch.autograd.grad([out_t], [ps.captured[read]], [g], retain_graph=True)[0][0, pos]  # the readout [D]
        readouts = _head_readouts(rep, ps, outs, r, pos)
        per_head = []
        B = ps.batch
        for i in layers:
            res = ps.captured[f"blocks.{i}.attn.hook_result"]
            for h0 in range(0, H, B):
                hs = list(range(h0, min(H, h0 + B)))
                inj = torch.zeros_like(res)
                for k, h in enumerate(hs):
                    inj[k, pos, h] = readouts[i][h]
                rows, _ = rep.backward_rows([(res, inj)], len(hs))
                per_head += [(f"{i}.{h}", rows[k]) for k, h in enumerate(hs)]
    finally:
        rep.release()
        rep._capture = ()
    total = total[0]
    via = torch.stack([r for _, r in per_head]) if per_head else torch.zeros(0, len(total))
    direct = total - via.sum(0)
    top = total.abs().argsort(descending=True)[:n]
    top = top[total[top].abs() > 1e-6 * total.abs().max()]  # no edge, or float rounding's, is not among the strongest
    rows = []
    for src in top.tolist():
        parts = {name: float(via[k, src]) for k, (name, _) in enumerate(per_head) if abs(float(via[k, src])) > 1e-9}
        parts = dict(sorted(parts.items(), key=lambda kv: -abs(kv[1]))[:5])
        rows.append(
            {"source": rep.source_id(src), "edge": float(total[src]), "direct": float(direct[src]), "via": parts}
        )
    heads = sorted(
        ({"head": name, "total": float(r.sum()), "abs": float(r.abs().sum())} for name, r in per_head),
        key=lambda d: -abs(d["total"]),
    )
    # a source at another position can only arrive through a head: its direct part must be zero
    other = torch.ones(len(total), dtype=torch.bool)
    other[_at_position(rep, pos)] = False
    resid = float(direct[other].abs().max()) if other.any() else 0.0
    return EdgePaths(target=tname, rows=tuple(rows), heads=tuple(heads), max_abs_residual=resid, label=label or tname)


def _head_readouts(rep: LocalReplacement, ps, outs: dict[int, str], r: torch.Tensor, pos: int) -> dict:
    """Each layer's heads' readouts [H, D] at ``pos``: the gradient of the target at each head's output through the
    paths that pass no later head. ``r``: the readout at the top layer's ``outs`` (the residual after its heads);
    going down a layer, the residual before its heads is read as ``r`` plus what its MLP's skip path reads from it
    (the features are fixed; nothing for a feature's own layer, read before its MLP)."""
    got = {}
    for i in sorted(outs, reverse=True):
        out = ps.captured[outs[i]]
        v = torch.zeros_like(out)
        v[0, pos] = r
        res = ps.captured[f"blocks.{i}.attn.hook_result"]
        got[i] = torch.autograd.grad([out], [res], [v], retain_graph=True)[0][0, pos]
        if outs[i].endswith("hook_resid_post") and i in ps.mlp_in:
            r = r + _skip_readout(rep, ps, i, r, pos)
    return got


def _skip_readout(rep: LocalReplacement, ps, i: int, r: torch.Tensor, pos: int) -> torch.Tensor:
    """What layer ``i``'s MLP, its features fixed, reads from the residual at ``pos`` [D] for a readout ``r`` of its
    output: the skip path's transpose, then the frozen norm before it (zero without a skip path)."""
    x = ps.mlp_in[i][0, pos].detach().requires_grad_(True)
    with torch.enable_grad():
        write, skip = rep.transcoders.constant_write(i, x)
        if not skip:
            return torch.zeros_like(r)
        u = torch.autograd.grad([write], [x], [r.to(write.dtype)])[0]
    if rep.read_hook == "hook_mlp_in":  # the features read the residual itself
        return u.to(r.dtype)
    back = torch.zeros_like(ps.mlp_in[i])
    back[0, pos] = u.to(back.dtype)
    resid = ps.captured[f"blocks.{i}.hook_mlp_in"]
    return torch.autograd.grad([ps.mlp_in[i]], [resid], [back], retain_graph=True)[0][0, pos]


def _at_position(rep: LocalReplacement, pos: int) -> torch.Tensor:
    """Source indices at position ``pos``."""
    nf, ne = rep.n_features, rep.n_errors
    feats = (rep.feature_pos == pos).nonzero().squeeze(1)
    errs = nf + torch.arange(rep.L) * rep.P + pos
    return torch.cat([feats, errs, torch.tensor([nf + ne + pos])])
