"""Why a head attends where it does: its attention score split over pairs of query-side and key-side sources
(QK attribution; Kamath et al. 2025, "Tracing Attention Computation Through Attention QK", on top of the local
replacement model of Ameisen et al. 2025).

In the local replacement model every earlier attention pattern and every norm denominator is frozen, so the query
vector ``q`` of head ``L.H`` at the query position and the key vector ``k`` at the key position (after q/k norms and
rotary) are affine in the sources: ``q = Σ_s q_s + q_0``, ``k = Σ_t k_t + k_0``, and the score
``scale · q·k = scale (Σ_{s,t} q_s·k_t + Σ_s q_s·k_0 + q_0·Σ_t k_t + q_0·k_0)`` exactly. Two views:

* **sources** (features, errors, embeddings: the graph's nodes): ``q_s`` is read by ``d_head`` backward passes
  (one per query dimension), likewise ``k_t``;
* **writers** (what is added to the residual stream at the query and key positions before layer ``L``: the token
  and position embeddings, each earlier head's output, each transcoder feature's decoder write, the error, the
  biases): each writer's part is the Jacobian of ``q`` (``k``) with respect to the residual there, times it. This
  view names the heads: an induction head's key side is carried by a previous-token head.

The bias terms ``q_0``, ``k_0`` (biases of every kind, and the norms' offsets) are reported as ``bias``; the parts
plus the bias terms equal the score to float rounding (``max_abs_residual``).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from mechscope.core.errors import MechscopeError
from mechscope.core.results import Result
from mechscope.core.validate import check_int
from mechscope.lm.methods.replacement import LocalReplacement


@dataclass(frozen=True)
class QKAttribution(Result):
    """The attribution of head ``layer.head``'s attention score from ``query_pos`` to ``key_pos``.

    ``score``: scaled q·k before the softmax (and any soft-cap); ``pattern``: the attention probability.
    ``query_sources``/``key_sources``: the largest parts, each ``{"id", "label", "score"}`` (its part of the score
    with the other side whole); ``pairs``: the largest source pairs ``{"query", "key", "score"}`` over every query
    part x key part; the same for ``*_writers`` / ``writer_pairs``; parts and pairs that are exactly zero are left
    out. ``bias``: the score's parts from the bias terms."""

    layer: int
    head: int
    query_pos: int
    key_pos: int
    score: float
    pattern: float
    query_sources: tuple[dict, ...]
    key_sources: tuple[dict, ...]
    pairs: tuple[dict, ...]
    query_writers: tuple[dict, ...]
    key_writers: tuple[dict, ...]
    writer_pairs: tuple[dict, ...]
    bias: dict
    max_abs_residual: float
    top_keys: tuple[dict, ...] = ()

    def summary(self) -> str:
        q = self.query_writers[0]["label"] if self.query_writers else "-"
        k = self.key_writers[0]["label"] if self.key_writers else "-"
        qs = self.query_sources[0]["label"] if self.query_sources else "-"
        ks = self.key_sources[0]["label"] if self.key_sources else "-"
        return (
            f"head {self.layer}.{self.head}, query {self.query_pos} -> key {self.key_pos} (p={self.pattern:.2f}, "
            f"score {self.score:.2f}): query side {qs} (written by {q}), key side {ks} (written by {k})"
        )


def qk_attribution(
    rep: LocalReplacement,
    layer: int,
    head: int,
    query_pos: int | None = None,
    key_pos: int | None = None,
    n: int = 10,
    labels: list[str] | None = None,
) -> QKAttribution:
    """Split head ``layer.head``'s attention score from ``query_pos`` (default: the last position) to ``key_pos``
    (default: the key it attends to most, position 0 left out when another key is available) into pairs of sources
    and of writers (see the module docstring)."""
    cfg = rep.cfg
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in (layer, head)):  # (0, 1.5) read
        raise MechscopeError(f"a QK head is two integers (layer, head), got ({layer!r}, {head!r})")  # "head 0.1.5"
    layer, head = int(layer), int(head)
    if not (0 <= layer < cfg.n_layers and 0 <= head < cfg.n_heads):
        raise MechscopeError(f"head {layer}.{head} outside the model's {cfg.n_layers} layers x {cfg.n_heads} heads")
    for name, v in (("query", query_pos), ("key", key_pos)):  # 2.5 was position 2
        if v is not None:
            check_int(v, f"the QK {name} position")
    if cfg.norm_after_residual:
        raise MechscopeError("QK attribution needs a pre-norm model (writers add up in the residual stream)")
    P = rep.P
    qp = P - 1 if query_pos is None else int(query_pos)
    if not 0 <= qp < P:
        raise MechscopeError(f"query position {qp} outside the prompt's 0..{P - 1}")
    pat = rep.patterns[layer][0, head, qp].float().cpu()  # [K]
    if key_pos is None:
        cand = pat.clone()
        if qp > 0 and cfg.causal:
            cand[0] = -1
        kp = int(cand.argmax())
    else:
        kp = int(key_pos)
    if not 0 <= kp < P or (cfg.causal and kp > qp):
        raise MechscopeError(f"key position {kp} is not seen from query position {qp}")
    labels = labels or [str(int(t)) for t in rep.tokens[0]]
    g = head // (cfg.n_heads // cfg.kv_heads)
    rot = cfg.positional == "rotary"
    qname = f"blocks.{layer}.attn.hook_rot_q" if rot else f"blocks.{layer}.attn.hook_q"
    kname = f"blocks.{layer}.attn.hook_rot_k" if rot else f"blocks.{layer}.attn.hook_k"
    if cfg.qk_norm and not rot:
        raise MechscopeError("QK attribution of q/k-normed heads needs rotary positions (the vectors after the norm)")
    resid_name = f"blocks.{layer}.hook_resid_pre"
    Dh = cfg.d_head
    rep.release()
    rep._capture = (qname, kname, resid_name)
    try:
        ps = rep._ensure_pass()
        qv, kv, resid = ps.captured[qname], ps.captured[kname], ps.captured[resid_name]
        q_tot = qv[0, qp, head].detach().float()
        k_tot = kv[0, kp, g].detach().float()
        Qs, Jq = _side(rep, ps, qv, (qp, head), resid, Dh)
        Ks, Jk = _side(rep, ps, kv, (kp, g), resid, Dh)
    finally:
        rep.release()
        rep._capture = ()
    scale = _scale(rep, layer)
    score = float(scale * (q_tot @ k_tot))
    q0 = q_tot - Qs.sum(0)
    k0 = k_tot - Ks.sum(0)
    # sources
    nq = _top(Qs @ k_tot, n)
    nk = _top(Ks @ q_tot, n)
    src_pairs = _top_pairs(Qs, Ks, scale, n)
    used = set(nq.tolist()) | set(nk.tolist()) | {s for i, j, _ in src_pairs for s in (i, j)}
    sources = {s: rep.source_id(s) for s in used}
    src_lab = {s: _src_label(rep, s, labels) for s in sources}
    qsrc = tuple({"id": sources[s], "label": src_lab[s], "score": float(scale * (Qs[s] @ k_tot))} for s in nq.tolist())
    ksrc = tuple({"id": sources[s], "label": src_lab[s], "score": float(scale * (q_tot @ Ks[s]))} for s in nk.tolist())
    pairs = tuple(
        {"query": src_lab[i], "key": src_lab[j], "score": v, "query_id": sources[i], "key_id": sources[j]}
        for i, j, v in src_pairs
    )
    # writers (with post-sublayer norms the heads' outputs are normed before they are added: no writer view)
    if cfg.post_attn_mlp_norm:
        raise MechscopeError(
            "QK attribution by writers needs a model without post-sublayer norms (Gemma 2/3 have them)"
        )
    wq, lq = writers(rep, layer, qp, labels)
    wk, lk = writers(rep, layer, kp, labels)
    resid_q = resid[0, qp].detach().float()
    resid_k = resid[0, kp].detach().float()
    Wq = wq @ Jq.T  # [n_writers, Dh]
    Wk = wk @ Jk.T
    bq = q_tot - Jq @ resid_q  # q's constant part (biases of q and of the norm)
    bk = k_tot - Jk @ resid_k
    wsum_q = float((wq.sum(0) - resid_q).abs().max())
    wsum_k = float((wk.sum(0) - resid_k).abs().max())
    tq = _top(Wq @ k_tot, n)
    tk = _top(Wk @ q_tot, n)
    qw = tuple({"label": lq[i], "score": float(scale * (Wq[i] @ k_tot))} for i in tq.tolist())
    kw = tuple({"label": lk[i], "score": float(scale * (q_tot @ Wk[i]))} for i in tk.tolist())
    wpairs = tuple({"query": lq[i], "key": lk[j], "score": v} for i, j, v in _top_pairs(Wq, Wk, scale, n))
    total_src = float(scale * (Qs.sum(0) @ Ks.sum(0) + Qs.sum(0) @ k0 + q0 @ Ks.sum(0) + q0 @ k0))
    total_wr = float(scale * (Wq.sum(0) + bq) @ (Wk.sum(0) + bk))
    resid_err = max(abs(total_src - score), abs(total_wr - score))
    top_keys = tuple(
        {"pos": int(i), "label": labels[int(i)], "pattern": float(pat[i])}
        for i in pat.argsort(descending=True)[:5].tolist()
    )
    return QKAttribution(
        layer=layer,
        head=head,
        query_pos=qp,
        key_pos=kp,
        score=score,
        pattern=float(pat[kp]),
        query_sources=qsrc,
        key_sources=ksrc,
        pairs=pairs,
        query_writers=qw,
        key_writers=kw,
        writer_pairs=wpairs,
        bias={
            "query_bias_x_key": float(scale * (q0 @ k_tot)),
            "query_x_key_bias": float(scale * (Qs.sum(0) @ k0)),
            "writers_query_bias": float(scale * (bq @ k_tot)),
            "writers_key_bias": float(scale * ((q_tot - bq) @ bk)),
            "writer_sum_error": max(wsum_q, wsum_k),
        },
        max_abs_residual=resid_err,
        top_keys=top_keys,
    )


def _side(rep, ps, vec: torch.Tensor, at: tuple[int, int], resid: torch.Tensor, Dh: int):
    """(each source's part of the vector [n_sources, Dh], the Jacobian of the vector w.r.t. the residual at its
    position [Dh, D]) by Dh backward passes (in batches of the kept pass)."""
    pos, h = at
    B = ps.batch
    parts, jac = [], []
    for j0 in range(0, Dh, B):
        js = list(range(j0, min(Dh, j0 + B)))
        inj = torch.zeros_like(vec)
        for k, j in enumerate(js):
            inj[k, pos, h, j] = 1.0
        rows, (gres,) = rep.backward_rows([(vec, inj)], len(js), extra=(resid,))
        parts.append(rows)
        jac.append(gres[: len(js), pos].float())
    return torch.cat(parts).T.contiguous(), torch.cat(jac)  # [n_src, Dh], [Dh, D]


def _scale(rep: LocalReplacement, layer: int) -> float:
    return float(rep.model.blocks[layer].attn.scale)


def _top(v: torch.Tensor, n: int) -> torch.Tensor:
    """The indices of the ``n`` largest entries of ``v`` by magnitude, largest first; exact zeros left out."""
    top = v.abs().argsort(descending=True)[:n]
    return top[v[top] != 0]


def _top_pairs(a: torch.Tensor, b: torch.Tensor, scale: float, n: int, rows: int = 1024) -> list[tuple]:
    """The ``n`` pairs (i, j, scale · a_i·b_j) of largest magnitude over every pair of rows of ``a`` [I, Dh] and
    ``b`` [J, Dh], largest first, exact zeros left out: a block of ``rows`` rows of the [I, J] matrix at a time, so
    memory stays at one block however many sources the graph has."""
    vals, idx = a.new_zeros(0), torch.zeros(0, dtype=torch.long, device=a.device)
    for r0 in range(0, a.shape[0], rows):
        m = (scale * (a[r0 : r0 + rows] @ b.T)).flatten()
        top = m.abs().topk(min(n, m.numel())).indices
        vals, idx = torch.cat([vals, m[top]]), torch.cat([idx, top + r0 * b.shape[0]])
        keep = vals.abs().argsort(descending=True, stable=True)[:n]
        vals, idx = vals[keep], idx[keep]
    return [(*divmod(int(f), b.shape[0]), float(v)) for f, v in zip(idx, vals, strict=True) if v != 0]


def _src_label(rep: LocalReplacement, s: int, labels: list[str]) -> str:
    nf, ne = rep.n_features, rep.n_errors
    if s < nf:
        p = int(rep.feature_pos[s])
        return f"L{int(rep.feature_layer[s])} #{int(rep.feature_index[s])} @{p} {labels[p]!r}"
    if s < nf + ne:
        layer, p = divmod(s - nf, rep.P)
        return f"error L{layer} @{p} {labels[p]!r}"
    p = s - nf - ne
    return f"embedding @{p} {labels[p]!r}"


@torch.no_grad()
def writers(rep: LocalReplacement, layer: int, pos: int, labels: list[str]) -> tuple[torch.Tensor, list[str]]:
    """What is added to the residual stream at ``pos`` before block ``layer``: [n_writers, D] and their labels
    (token and position embeddings, each earlier head's output and its layer's output bias, each active feature's
    decoder write, each layer's transcoder bias and skip path, each error vector). They sum to the residual."""
    cfg = rep.cfg
    names = [f"blocks.{i}.attn.hook_result" for i in range(layer)]
    names += [n for n in ("hook_embed", "hook_pos_embed") if n != "hook_pos_embed" or cfg.positional == "learned"]
    # the frozen run reproduces the prompt: its heads' outputs are the prompt's
    from mechscope.core.hooks import hooks

    got: dict[str, torch.Tensor] = {}

    def keep(name):
        def fn(x, hook):
            got[name] = x.detach()

        return fn

    with hooks(rep.model, fwd=[(n, keep(n)) for n in names]):
        rep._forward(rep.model.embed(rep.tokens), "direct")
    vecs, labs = [], []
    vecs.append(got["hook_embed"][0, pos])
    labs.append(f"token embedding @{pos} {labels[pos]!r}")
    if "hook_pos_embed" in got:
        vecs.append(got["hook_pos_embed"][0, pos])
        labs.append(f"position embedding @{pos}")
    for i in range(layer):
        res = got[f"blocks.{i}.attn.hook_result"][0, pos]  # [H, D]
        for h in range(cfg.n_heads):
            vecs.append(res[h])
            labs.append(f"head {i}.{h}")
        b_o = rep.model.blocks[i].attn.b_O
        if b_o.abs().sum() > 0:
            vecs.append(b_o.detach())
            labs.append(f"attention bias L{i}")
        if i < rep.L:  # the transcoder's writes into the MLP outputs below ``layer`` (a CLT's reach later ones)
            f, reach = rep.acts[i][pos], [d for d in rep.transcoders.reach(i) if d < layer]
            for j in f.nonzero().squeeze(1).tolist():
                vecs.append(f[j] * sum(rep.transcoders.decoder(i, d)[j] for d in reach))
                labs.append(f"L{i} #{j} @{pos} {labels[pos]!r}")
            rest, skip = rep.transcoders.constant_write(i, rep.mlp_in[i][pos])
            vecs.append(rest)
            labs.append(f"transcoder bias{' and skip' if skip else ''} L{i}")
            vecs.append(rep.errors[i, pos])
            labs.append(f"error L{i} @{pos}")
    return torch.stack([v.float() for v in vecs]), labs
