"""Attribution graphs of mechscope's CNN on one image: one digit's logit traced to dictionary features at
receptive-field positions, exactly (:mod:`mechscope.cnn.methods.replacement` builds the local replacement model;
:mod:`mechscope.core.attribution_graph` the rows, pruning, scores and checks).

:func:`cnn_attribution_graph` returns the graph and the replacement model; :func:`train_dictionaries` trains one
small dictionary per stage (SAEs on ``conv{i}.hook_out`` or channel transcoders across each ReLU) on the
training images with the core's trainer; :func:`intervene` ablates or steers features and sets the measured change
beside the graph's prediction; :func:`feature_examples` finds each feature's top image patches (its dashboard).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from mechscope.cnn.methods.replacement import KINDS, CnnReplacement, StageDictionaries, check_model, receptive_centres
from mechscope.cnn.models.cnn import CNN
from mechscope.core.attribution_graph import AttributionGraph, GraphIntervention, NodeInfo, assemble, build
from mechscope.core.attribution_graph import check_edges as core_check_edges
from mechscope.core.attribution_graph import intervene as core_intervene
from mechscope.core.dictionaries import DictionaryConfig, TrainConfig, train
from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import run_with_cache
from mechscope.core.results import Result, figure_data
from mechscope.core.torch_utils import evaluating
from mechscope.core.validate import settings_or


@dataclass(frozen=True)
class CnnAttributionGraph(AttributionGraph):
    """A CNN's attribution graph (``cnn graph``'s ``graph.json``; fields: :class:`~mechscope.core.
    attribution_graph.AttributionGraph`)."""

    SCHEMA: ClassVar[str] = "mechscope.cnn_graph/1"
    FILE: ClassVar[str] = "graph.json"


@dataclass(frozen=True)
class CnnGraphSettings:
    """How to build a CNN graph (as :class:`mechscope.lm.methods.attribution_graph.GraphSettings`)."""

    max_feature_nodes: int | None = None
    edges_per_row: int | None = None
    node_threshold: float = 0.8
    edge_threshold: float = 0.98
    batch_size: int = 64
    check_sources: int = 16
    seed: int = 0

    def validate(self) -> None:
        from mechscope.core.attribution_graph import check_graph_settings

        check_graph_settings(self)


def cnn_attribution_graph(
    model: CNN,
    dictionaries: StageDictionaries,
    image: torch.Tensor,
    *,
    target: int | None = None,
    label: int | None = None,
    class_names: tuple[str, ...] | None = None,
    settings: CnnGraphSettings | None = None,
    name: str = "",
    title: str = "",
) -> tuple[CnnAttributionGraph, CnnReplacement]:
    """The attribution graph of ``image`` [C,H,W] for class ``target``'s logit (default: the predicted class)."""
    s = settings_or(settings, CnnGraphSettings)
    s.validate()
    t0 = time.perf_counter()
    timings = {}
    with evaluating(model):
        rep = CnnReplacement(model, dictionaries, image, batch_size=s.batch_size)
        with torch.no_grad():
            own = model(rep.image)[0].float()
        exact = {
            "logits_max_abs_diff": float((rep.replacement_logits() - own).abs().max()),
            "logit_scale": float(own.abs().max()),
        }
        K = model.config.n_classes
        c = int(own.argmax()) if target is None else int(target)
        if not 0 <= c < K:
            raise MechscopeError(f"class {c} outside the model's 0..{K - 1}")
        rep.set_targets([c])
        prob = float(torch.softmax(own.double(), -1)[c])
        timings["replacement"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        built = build(rep, torch.ones(1), max_feature_nodes=s.max_feature_nodes, edges_per_row=s.edges_per_row)
        timings["rows"] = time.perf_counter() - t1
        if s.check_sources:

            def measure(scale):
                logits, pre = rep.run("direct", scale_source=scale)
                return pre, rep.demeaned(logits, rep.logit_targets)

            exact |= core_check_edges(built, measure, s.check_sources, s.seed)
        # every input of the logit plus the biases: the logit itself (the bias part is what no source explains)
        row = built.triplets.rows == built.n - 1
        exact["logit_sum_of_inputs"] = float(built.triplets.values[row].double().sum())
        exact["logit_demeaned"] = float(rep.demeaned(own, rep.logit_targets)[0])
        rep.release()
    t2 = time.perf_counter()
    names = class_names or tuple(str(i) for i in range(K))
    info = node_info(rep, [names[c]], torch.tensor([prob]))
    fields = assemble(built, info, s.node_threshold, s.edge_threshold, all_inputs=False)
    timings["prune"] = time.perf_counter() - t2
    timings["total"] = time.perf_counter() - t0
    stage_names = tuple(f"conv{i + 1}" for i in range(rep.L))
    nodes = tuple(_label(n, rep, stage_names) for n in fields["nodes"])
    _, H, W = rep.x_norm.shape
    graph = CnnAttributionGraph(
        kind="cnn",
        model=name or "cnn",
        title=title or f"class {names[c]} (p={prob:.3f})" + (f", label {names[label]}" if label is not None else ""),
        input_labels=tuple(f"({p // W},{p % W})" for p in range(H * W)),
        layer_names=stage_names,
        nodes=nodes,
        edges=fields["edges"],
        scores=fields["scores"],
        counts=fields["counts"],
        settings={
            **asdict(s),
            "targets": [c],
            "target_probabilities": [prob],
            "dictionary_kind": dictionaries.kind,
            "label": label,
            "image_size": [H, W],
            "grids": [list(g) for g in rep.grid],
            "image_pixels": rep.image[0].mean(0).clamp(0, 1).mul(1000).round().div(1000).tolist(),
        },
        exactness=exact,
        dictionaries={
            "kind": dictionaries.kind,
            "source": dictionaries.source,
            "paths": list(dictionaries.paths),
            "widths": dictionaries.widths,
        },
        seconds=timings,
        full=fields["full"],
    )
    return graph, rep


def node_info(rep: CnnReplacement, labels: list[str], probs: torch.Tensor) -> NodeInfo:
    centres = receptive_centres(rep.model, rep.dicts.kind)
    _, H, W = rep.x_norm.shape

    def ctx(layer: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(pos))
        for i, (start, jump, _) in enumerate(centres):
            m = layer == i
            w = rep.grid[i][1]
            out[m] = start + (pos[m] % w).float() * jump
        return out

    err_layer = torch.cat([torch.full((h * w,), i) for i, (h, w) in enumerate(rep.grid)])
    err_pos = torch.cat([torch.arange(h * w) for h, w in rep.grid])
    norms = torch.cat([rep.errors[i].norm(dim=-1) for i in range(rep.L)])
    return NodeInfo(
        feature_layer=rep.feature_layer,
        feature_pos=rep.feature_pos,
        feature_index=rep.feature_index,
        feature_activation=rep.feature_activation,
        feature_ctx=ctx(rep.feature_layer, rep.feature_pos),
        error_layer=err_layer,
        error_pos=err_pos,
        error_ctx=ctx(err_layer, err_pos),
        error_norm=norms,
        input_pos=torch.arange(H * W),
        input_index=torch.zeros(H * W, dtype=torch.long),
        input_ctx=(torch.arange(H * W) % W).float(),
        input_labels=[f"pixel ({p // W},{p % W})" for p in range(H * W)],
        logit_index=rep.logit_targets,
        logit_labels=labels,
        logit_weights=probs.float(),
        logit_pos=0,
        logit_ctx=(W - 1) / 2,
        n_layers=rep.L,
    )


def _label(n: dict, rep: CnnReplacement, stages: tuple[str, ...]) -> dict:
    n = dict(n)
    if n["kind"] in ("feature", "error"):
        h, w = rep.grid[n["layer"]]
        y, x = divmod(n["pos"], w)
        n["ctx_label"] = f"({y},{x})"
        n.setdefault(
            "label",
            f"{stages[n['layer']]} #{n['feature']} at ({y},{x})"
            if n["kind"] == "feature"
            else f"error {stages[n['layer']]} at ({y},{x})",
        )
        start, jump, _ = receptive_centres(rep.model, rep.dicts.kind)[n["layer"]]
        n["rf_centre"] = [start + y * jump, start + x * jump]
    elif n["kind"] == "input":
        _, H, W = rep.x_norm.shape
        n["ctx_label"] = n["label"]
        n["value"] = float(rep.x_norm[:, n["pos"] // W, n["pos"] % W].sum())
    else:
        n["ctx_label"] = "logit"
    return n


def intervene(
    graph: AttributionGraph,
    rep: CnnReplacement,
    nodes,
    *,
    value: float | None = None,
    scale: float | None = 0.0,
    description: str = "",
) -> GraphIntervention:
    """Ablate (default) or steer features of the CNN graph; the measured change against the graph's prediction."""

    def measure(mode, changes):
        logits, _ = rep.run(mode, features=changes)
        return rep.demeaned(logits, rep.logit_targets)

    return core_intervene(graph, rep, nodes, measure, value=value, scale=scale, description=description)


# ---- dictionaries trained here ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CnnDictionaryTraining:
    """One dictionary per stage: ``kind`` (sae or transcoder), ``expansion`` × channels latents, TopK ``k``,
    trained on ``rows`` positions drawn (seeded) from ``images`` training images, for ``steps`` steps of ``batch``."""

    kind: str = "sae"
    expansion: int = 4
    k: int = 4
    images: int = 4000
    rows: int = 200_000
    steps: int = 1500
    batch: int = 512
    lr: float = 2e-3
    seed: int = 0

    def validate(self) -> None:
        from mechscope.core.validate import check_int

        if self.kind not in ("sae", "transcoder"):
            raise MechscopeError(f"kind must be sae or transcoder, got {self.kind!r}")
        for name, hi in (
            ("expansion", 1024),
            ("k", 10**5),
            ("images", 10**7),
            ("rows", 10**9),
            ("steps", 10**8),
            ("batch", 10**6),
        ):
            check_int(getattr(self, name), name, 1, hi)


@dataclass(frozen=True)
class TrainedDictionaries(Result):
    """What was trained and how well (per stage: explained variance, L0, error share, dead latents, on held-out
    positions of test images)."""

    settings: dict
    stages: tuple[dict, ...]
    seconds: float
    dictionaries: object = figure_data()


def train_dictionaries(
    model: CNN,
    train_images: torch.Tensor,
    test_images: torch.Tensor,
    settings: CnnDictionaryTraining | None = None,
    progress=None,
) -> TrainedDictionaries:
    """One small dictionary per stage, trained with :func:`mechscope.core.dictionaries.train`."""
    s = settings_or(settings, CnnDictionaryTraining)
    s.validate()
    check_model(model)
    start = time.perf_counter()
    g = torch.Generator().manual_seed(s.seed)
    x = train_images[torch.randperm(len(train_images), generator=g)[: s.images]]
    xe = test_images[:500]
    dicts, rows = [], []
    with evaluating(model):
        for i, c in enumerate(model.config.channels):
            a, b = (f"conv{i + 1}.{h}" for h in KINDS[s.kind])
            xin, xout = _rows(model, x, a, b)
            pick = torch.randperm(len(xin), generator=g)[: s.rows]
            xin, xout = xin[pick], xout[pick]
            if len(xin) < s.batch:  # _batches would never yield a batch: training would wait forever
                raise MechscopeError(
                    f"conv{i + 1} gives {len(xin):,} training positions from {len(x):,} images, fewer than one "
                    f"batch of {s.batch:,}: use more training images or a smaller batch"
                )
            cfg = DictionaryConfig(
                d_in=c,
                d_sae=s.expansion * c,
                architecture="topk",
                k=min(s.k, s.expansion * c),
                transcoder=s.kind == "transcoder",
                d_out=c if s.kind == "transcoder" else None,
            )
            t0 = time.perf_counter()
            tc = TrainConfig(
                lr=s.lr,
                seed=s.seed + i,
                max_steps=s.steps,
                progress=False,
                log_every=100,
                init_rows=min(4096, len(xin)),
            )
            result = train(cfg, _batches(xin, xout if cfg.transcoder else None, s.batch, g), tc)
            d = result.model.eval()
            ein, eout = _rows(model, xe, a, b)
            q = _quality(d, ein, eout) | {
                "stage": f"conv{i + 1}",
                "seconds": time.perf_counter() - t0,
                "rows": len(xin),
                "d_sae": cfg.d_sae,
            }
            rows.append(q)
            dicts.append(d)
            if progress:
                progress(
                    f"conv{i + 1}: explained variance {q['explained_variance']:.3f}, L0 {q['l0']:.2f}, error "
                    f"share {q['error_share']:.3f}"
                )
    return TrainedDictionaries(
        settings=asdict(s),
        stages=tuple(rows),
        seconds=time.perf_counter() - start,
        dictionaries=StageDictionaries.of(s.kind, dicts, source="trained here"),
    )


@torch.no_grad()
def _rows(model: CNN, x: torch.Tensor, a: str, b: str, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    ins, outs = [], []
    for j in range(0, len(x), batch):
        _, cache = run_with_cache(model, x[j : j + batch], names=list(dict.fromkeys([a, b])))
        for name, store in ((a, ins), (b, outs)):
            t = cache[name]
            store.append(t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]))
    return torch.cat(ins), torch.cat(outs)


def _batches(x, y, batch, g):
    """Shuffled batches without end: ``(x, y)`` pairs for a transcoder, ``x`` alone for an SAE (``y`` None)."""
    while True:
        order = torch.randperm(len(x), generator=g)
        for j in range(0, len(order) - batch + 1, batch):
            idx = order[j : j + batch]
            yield x[idx] if y is None else (x[idx], y[idx])


@torch.no_grad()
def _quality(d, x, y) -> dict:
    out, f = d(x)
    err = y - out
    var = (y - y.mean(0)).pow(2).sum()
    return {
        "explained_variance": 1 - float(err.pow(2).sum() / var) if var > 0 else float("nan"),
        "l0": float((f > 0).float().sum(-1).mean()),
        "error_share": float(err.norm(dim=-1).mean() / y.norm(dim=-1).mean().clamp_min(1e-12)),
        "dead": int(((f > 0).sum(0) == 0).sum()),
    }


# ---- dashboards: top image patches -------------------------------------------------------------------------


@torch.no_grad()
def feature_examples(
    model: CNN, dictionaries: StageDictionaries, images: torch.Tensor, features: list[tuple[int, int]], n: int = 6
) -> dict[str, list[dict]]:
    """For each (stage, feature): the ``n`` images where it fires most (at its strongest position), each with the
    receptive-field crop around that position (grey levels 0-255, rows) and the activation. Keys ``"stage_feature"``."""
    out: dict[str, list[dict]] = {}
    by_stage: dict[int, list[int]] = {}
    for st, f in features:
        by_stage.setdefault(st, []).append(f)
    for st, feats in by_stage.items():
        hook = dictionaries.hooks(st)[0]
        idx = torch.tensor(feats)
        best = torch.full((len(feats), n), -math.inf)
        where = torch.zeros(len(feats), n, 2, dtype=torch.long)
        for j in range(0, len(images), 500):
            _, cache = run_with_cache(model, images[j : j + 500], names=[hook])
            t = cache[hook]
            B, C, h, w = t.shape
            f = dictionaries.layers[st].encode(t.permute(0, 2, 3, 1).reshape(-1, C))[:, idx].reshape(B, h * w, -1)
            val, pos = f.max(1)  # [B, F]: each image's strongest position
            allv = torch.cat([best, val.T], 1)
            alli = torch.cat([where, torch.stack([torch.arange(j, j + B).expand(len(feats), -1), pos.T], -1)], 1)
            top = allv.topk(n, dim=1)
            best = top.values
            where = alli.gather(1, top.indices[..., None].expand(-1, -1, 2))
        start, jump, _ = receptive_centres(model, dictionaries.kind)[st]
        size = _rf_size(model, st, dictionaries.kind)
        _, ww = _grid(model, st, dictionaries.kind)
        for k, f in enumerate(feats):
            ex = []
            for v, (img, p) in zip(best[k].tolist(), where[k].tolist(), strict=True):
                if not (v > 0 and math.isfinite(v)):
                    continue
                y, x = divmod(p, ww)
                y0 = int(round(start + y * jump - (size - 1) / 2))
                x0 = int(round(start + x * jump - (size - 1) / 2))
                grey = images[img].mean(0)
                crop = grey[max(0, y0) : y0 + size, max(0, x0) : x0 + size]
                ex.append(
                    {
                        "image": int(img),
                        "pos": [y, x],
                        "activation": v,
                        "box": [y0, x0, size],
                        "pixels": (crop * 255).round().int().tolist(),
                    }
                )
            out[f"{st}_{f}"] = ex
    return out


def _grid(model: CNN, stage: int, kind: str) -> tuple[int, int]:
    conv, pooled = model.config.stage_sizes()[stage]
    s = pooled if kind == "sae" and model.config.pool > 1 else conv
    return s, s


def _rf_size(model: CNN, stage: int, kind: str) -> int:
    c = model.config
    size, jump = 1, 1
    for i in range(stage + 1):
        size += (c.kernel_size - 1) * jump
        if c.pool > 1 and (i < stage or kind == "sae"):
            size += (c.pool - 1) * jump
            jump *= c.pool
    return size
