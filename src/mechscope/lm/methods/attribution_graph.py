"""Attribution graphs of a transformer on one prompt (Ameisen et al. 2025), their checks and interventions.

:func:`attribution_graph` builds the local replacement model (:mod:`mechscope.lm.methods.replacement`), chooses the
logits (the most probable next tokens until 95 % of the probability, at most 10, or the ones asked for), computes
the rows of the logits and of the most influential features by backward passes (:func:`mechscope.core.
attribution_graph.build`), prunes (node and edge thresholds 0.8 and 0.98) and scores the graph, and checks it:

* ``exactness["logits_max_abs_diff"]``: the replacement model's logits against the model's own, on the prompt;
* ``exactness["edges_*"]``: a sample of sources scaled by 2 one at a time in the frozen replacement model (every
  other source fixed): the measured change of every computed pre-activation and logit against the graph's edges.

:func:`intervene` steers or ablates features (a node, a supernode) and reports the measured change of the logits
(attention and norms frozen or recomputed, features downstream re-encoded; or the model itself with the decoder
change added to its MLP outputs) beside what the graph predicts (through every computed edge, and through the
pruned graph alone). :mod:`mechscope.lm.methods.edge_paths` splits a target's inputs by the attention head that last
carried them into its position; :mod:`mechscope.lm.methods.attribution_graph_qk` explains an attention score.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from mechscope.core.attribution_graph import AttributionGraph, GraphIntervention, NodeInfo, assemble, build
from mechscope.core.attribution_graph import check_edges as core_check_edges
from mechscope.core.attribution_graph import intervene as core_intervene
from mechscope.core.errors import MechscopeError
from mechscope.core.torch_utils import evaluating
from mechscope.core.validate import check_int, settings_or
from mechscope.lm.methods.crosslayer import CrossLayerTranscoder
from mechscope.lm.methods.replacement import LocalReplacement
from mechscope.lm.methods.transcoders import Transcoders
from mechscope.lm.models.transformer import HookedTransformer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LmAttributionGraph(AttributionGraph):
    """A transformer's attribution graph (``lm graph``'s ``graph.json``; fields: :class:`~mechscope.core.
    attribution_graph.AttributionGraph`)."""

    SCHEMA: ClassVar[str] = "mechscope.lm_graph/1"
    FILE: ClassVar[str] = "graph.json"


@dataclass(frozen=True)
class GraphSettings:
    """How to build a graph. ``max_feature_nodes``: features that get a row (None: every active feature);
    ``edges_per_row``: feature entries kept per row (None: all; see core.attribution_graph.build);
    ``skip_first``: no features at position 0 (None: when the prompt starts with the model's BOS, unless the
    transcoders are the MLP's own neurons, which are exact there);
    ``check_sources``: sources checked against interventions (0: none)."""

    max_n_logits: int = 10
    desired_logit_prob: float = 0.95
    max_feature_nodes: int | None = None
    edges_per_row: int | None = None
    node_threshold: float = 0.8
    edge_threshold: float = 0.98
    batch_size: int = 32
    skip_first: bool | None = None
    check_sources: int = 16
    seed: int = 0

    def validate(self) -> None:
        from mechscope.core.attribution_graph import check_graph_settings
        from mechscope.core.validate import check_int

        check_int(self.max_n_logits, "max_n_logits", 1, 1000)
        check_graph_settings(self, ("desired_logit_prob", "node_threshold", "edge_threshold"))


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    if tokenizer is None:
        return [str(i) for i in ids]
    return [tokenizer.decode([i]) for i in ids]


def attribution_graph(
    model: HookedTransformer,
    transcoders: Transcoders | CrossLayerTranscoder,
    tokens,
    *,
    tokenizer=None,
    logit_tokenizer=None,
    targets=None,
    logit_pos: int | None = None,
    settings: GraphSettings | None = None,
    name: str = "",
    progress=None,
) -> tuple[LmAttributionGraph, LocalReplacement]:
    """The attribution graph of ``tokens`` [P] and the local replacement model it was computed on.

    ``targets``: token ids whose logits to attribute (default: the salient ones); ``logit_pos``: where (default:
    the last position). ``transcoders``: per-layer :class:`Transcoders` or one :class:`CrossLayerTranscoder`.
    ``tokenizer`` names the input tokens; ``logit_tokenizer`` the logits where they are not the input vocabulary
    (a tracr model's output classes); without one such logits are named by their ids."""
    s = settings_or(settings, GraphSettings)
    s.validate()
    if logit_pos is not None:  # 2.5 was position 2
        check_int(logit_pos, "logit_pos (--logit-pos)")
    tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    bos = model.cfg.bos_token_id
    # the BOS skip is for trained transcoders (they do not reconstruct BOS's outlier residual); the MLP's own neurons
    # reconstruct it exactly, so they keep their features there and every error node stays zero
    exact_tcs = transcoders.source == "mlp neurons" if isinstance(transcoders, Transcoders) else False
    auto = bos is not None and int(tokens[0]) == bos and len(tokens) > 1 and not exact_tcs
    skip = s.skip_first if s.skip_first is not None else auto
    with evaluating(model):
        rep = LocalReplacement(model, transcoders, tokens, skip_first=skip, batch_size=s.batch_size)
        with torch.no_grad():
            own = model(rep.tokens).float()[0]
        repl = rep.replacement_logits()
        exact = {"logits_max_abs_diff": float((repl - own).abs().max()), "logit_scale": float(own.abs().max())}
        pos = rep.P - 1 if logit_pos is None else int(logit_pos)
        if not 0 <= pos < rep.P:
            raise MechscopeError(f"logit position {pos} outside the prompt's 0..{rep.P - 1}")
        probs_all = torch.softmax(own[pos].double(), -1).float()
        if targets is None:
            ids, probs = rep.salient_logits(pos, s.max_n_logits, s.desired_logit_prob)
        else:
            ids = torch.as_tensor(targets, dtype=torch.long).reshape(-1)
            V = model.cfg.n_logits
            if len(ids) == 0 or ids.min() < 0 or ids.max() >= V:
                raise MechscopeError(f"target logit {ids.tolist()} outside the model's 0..{V - 1}")
            probs = probs_all[ids]
            if float(probs.sum()) <= 0:
                probs = torch.full((len(ids),), 1.0 / len(ids))
        rep.set_targets(ids, pos)
        timings["replacement"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        built = build(
            rep, probs, max_feature_nodes=s.max_feature_nodes, edges_per_row=s.edges_per_row, progress=progress
        )
        timings["rows"] = time.perf_counter() - t1
        if s.check_sources:
            exact |= check_edges(rep, built, s.check_sources, s.seed)
        rep.release()
    t2 = time.perf_counter()
    labels = token_texts(tokenizer, rep.tokens[0].tolist())
    out_tok = logit_tokenizer if logit_tokenizer is not None else tokenizer if model.cfg.d_vocab_out is None else None
    info = node_info(rep, labels, token_texts(out_tok, ids.tolist()), probs)
    fields = assemble(built, info, s.node_threshold, s.edge_threshold)
    timings["prune"] = time.perf_counter() - t2
    timings["total"] = time.perf_counter() - t0
    nodes = tuple(_label(n, labels) for n in fields["nodes"])
    graph = LmAttributionGraph(
        kind="lm",
        model=name or model.cfg.name,
        title=(tokenizer.decode(rep.tokens[0].tolist()) if tokenizer is not None else " ".join(labels)),
        input_labels=tuple(labels),
        layer_names=tuple(str(i) for i in range(rep.L)),
        nodes=nodes,
        edges=fields["edges"],
        scores=fields["scores"],
        counts=fields["counts"],
        settings={
            **s.__dict__,
            "skip_first": skip,
            "logit_pos": pos,
            "targets": ids.tolist(),
            "target_probabilities": probs.tolist(),
        },
        exactness=exact,
        dictionaries=_dictionaries(transcoders),
        seconds=timings,
        full=fields["full"],
    )
    return graph, rep


def _dictionaries(transcoders) -> dict:
    """What the graph's dictionaries were (graph.json's ``dictionaries``)."""
    if isinstance(transcoders, CrossLayerTranscoder):
        return {
            "source": transcoders.source,
            "paths": list(transcoders.paths),
            "widths": transcoders.widths,
            "architectures": [transcoders.architecture],
            "skip": transcoders.skip,
            "crosslayer": True,
            "input_hook": transcoders.input_hook,
        }
    return {
        "source": transcoders.source,
        "paths": list(transcoders.paths),
        "widths": transcoders.widths,
        "architectures": sorted({tc.cfg.architecture for tc in transcoders.layers}),
        "skip": any(tc.cfg.skip for tc in transcoders.layers),
    }


def _label(n: dict, labels: list[str]) -> dict:
    n = dict(n)
    if n["kind"] == "feature":
        n.setdefault("label", f"L{n['layer']} #{n['feature']}")
    elif n["kind"] == "error":
        n.setdefault("label", f"error L{n['layer']}")
    n["ctx_label"] = labels[n["pos"]] if 0 <= n["pos"] < len(labels) else ""
    return n


def node_info(rep: LocalReplacement, labels: list[str], logit_labels: list[str], probs: torch.Tensor) -> NodeInfo:
    P, L = rep.P, rep.L
    err_layer = torch.arange(L).repeat_interleave(P)
    err_pos = torch.arange(P).repeat(L)
    norms = rep.errors.float().norm(dim=-1).reshape(-1).cpu() if L else torch.zeros(0)
    return NodeInfo(
        feature_layer=rep.feature_layer,
        feature_pos=rep.feature_pos,
        feature_index=rep.feature_index,
        feature_activation=rep.feature_activation,
        feature_ctx=rep.feature_pos.float(),
        error_layer=err_layer,
        error_pos=err_pos,
        error_ctx=err_pos.float(),
        error_norm=norms,
        input_pos=torch.arange(P),
        input_index=rep.tokens[0].cpu(),
        input_ctx=torch.arange(P).float(),
        input_labels=labels,
        logit_index=rep.logit_targets,
        logit_labels=logit_labels,
        logit_weights=probs.float(),
        logit_pos=rep.logit_pos,
        logit_ctx=float(rep.logit_pos),
        n_layers=L,
    )


def check_edges(rep: LocalReplacement, built, n: int, seed: int = 0) -> dict:
    """:func:`mechscope.core.attribution_graph.check_edges` on the frozen replacement model."""

    def measure(scale):
        logits, pre = rep.run("direct", scale_source=scale)
        return pre, rep.demeaned(logits, rep.logit_targets, rep.logit_pos)

    return core_check_edges(built, measure, n, seed)


# ---- interventions ---------------------------------------------------------------------------------------


def intervene(
    graph: AttributionGraph,
    rep: LocalReplacement,
    nodes,
    *,
    value: float | None = None,
    scale: float | None = 0.0,
    description: str = "",
) -> GraphIntervention:
    """Set the features ``nodes`` (node ids; a supernode's members) to ``value``, or to ``scale`` times their
    activation (default 0: ablation), and set the measured change of the attributed logits (attention and norms
    frozen, or recomputed, features downstream re-encoded; or the model itself with the decoder change added to its
    MLP outputs) beside the graph's prediction (:class:`~mechscope.core.attribution_graph.GraphIntervention`)."""

    def measure(mode, changes):
        logits, _ = rep.run(mode, features=changes)
        return rep.demeaned(logits, rep.logit_targets, rep.logit_pos)

    return core_intervene(graph, rep, nodes, measure, value=value, scale=scale, description=description)


def finite(x: Any) -> float:
    x = float(x)
    return x if math.isfinite(x) else float("nan")


# ---- dashboards: top text contexts -----------------------------------------------------------------------------


@torch.no_grad()
def feature_examples(
    model: HookedTransformer,
    transcoders: Transcoders | CrossLayerTranscoder,
    contexts: torch.Tensor,
    features: list[tuple[int, int]],
    decode,
    n: int = 5,
    before: int = 10,
    after: int = 3,
) -> dict[str, dict]:
    """For each (layer, feature): the ``n`` contexts of ``contexts`` [B, T] where it fires most, as token texts
    around the peak with the activation at each token. Keys ``"layer_feature"``; positions 0 (BOS) left out."""
    from mechscope.core.hooks import hooks

    if not features:
        return {}
    by_layer: dict[int, list[int]] = {}
    for layer, f in features:
        by_layer.setdefault(layer, []).append(f)
    last = max(by_layer)
    dev = next(model.parameters()).device
    tcs, read = transcoders.to_model(dev, next(model.parameters()).dtype), transcoders.input_hook
    best = {k: torch.full((len(v), n), -math.inf) for k, v in by_layer.items()}
    where = {k: torch.zeros(len(v), n, 2, dtype=torch.long) for k, v in by_layer.items()}
    acts_keep: dict[tuple[int, int], torch.Tensor] = {}

    class Stop(Exception):
        pass

    for b0 in range(0, len(contexts), 16):
        batch = contexts[b0 : b0 + 16].to(dev)
        got: dict[int, torch.Tensor] = {}

        def grab(i, got=got):
            def fn(x, hook):
                got[i] = x
                if i == last:
                    raise Stop

            return fn

        with hooks(model, fwd=[(f"blocks.{i}.{read}", grab(i)) for i in by_layer]):
            with contextlib.suppress(Stop):
                model(batch)
        for layer, feats in by_layer.items():
            enc = tcs.encode(layer, got[layer])
            f = enc[..., torch.tensor(feats)].float().cpu()  # [b, T, F]
            f[:, 0] = 0
            val, pos = f.max(1)  # [b, F]
            for k in range(len(feats)):
                for r in range(len(batch)):
                    acts_keep[(b0 + r, layer * 10**7 + feats[k])] = f[r, :, k]
            allv = torch.cat([best[layer], val.T], 1)
            rows = torch.arange(b0, b0 + len(batch)).expand(len(feats), -1)
            alli = torch.cat([where[layer], torch.stack([rows, pos.T], -1)], 1)
            top = allv.topk(n, dim=1)
            best[layer] = top.values
            where[layer] = alli.gather(1, top.indices[..., None].expand(-1, -1, 2))
        keep = {
            (int(r), layer * 10**7 + feats[k])
            for layer, feats in by_layer.items()
            for k in range(len(feats))
            for r in where[layer][k, :, 0].tolist()
        }
        acts_keep = {key: v for key, v in acts_keep.items() if key in keep}
    out = {}
    for layer, feats in by_layer.items():
        for k, f in enumerate(feats):
            exs = []
            for v, (row, p) in zip(best[layer][k].tolist(), where[layer][k].tolist(), strict=True):
                if not (v > 0 and math.isfinite(v)):
                    continue
                lo, hi = max(1, p - before), min(contexts.shape[1], p + after + 1)
                acts = acts_keep[(row, layer * 10**7 + f)][lo:hi]
                exs.append(
                    {
                        "tokens": [decode(int(t)) for t in contexts[row, lo:hi]],
                        "acts": acts.tolist(),
                        "max": v,
                        "peak": p - lo,
                    }
                )
            out[f"{layer}_{f}"] = {"examples": exs}
    return out
