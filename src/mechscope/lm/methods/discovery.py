"""Circuit discovery and causal scrubbing on transformers: tasks, metrics, features of the input, results.

A **task** is a clean batch, a corrupted batch of the same shape and a scalar metric of the model's output on
the clean batch (:class:`Task`):

* ``induction`` (any model with a vocabulary): BOS + ``n`` random tokens + the same ``n`` again, ``batch``
  sequences (seeded); corrupted = the other sequences (each row gets the next row's tokens). Metrics on the
  second copy (positions n+1..2n−1, each predicting the next token, which the first copy gives away):
  ``loss`` (cross-entropy, the default; lower is better), ``logprob`` (its negative), ``kl`` (KL divergence
  from the clean run's predictions; zero with zero gradient at the clean run, so EAP cannot use it),
  ``logit_diff`` (the correct token's logit minus the corrupted sequence's token's).
* ``tracr`` (a tracr folder): every example of ``examples.json`` at its own length (padded, padded keys masked:
  :class:`~mechscope.lm.methods.graph.Tokens`), corrupted = another example (a seeded derangement; lengths may
  differ, which is what ``length`` and ``reverse`` depend on). Categorical outputs: ``logit_diff`` (default:
  the expected class's logit minus the logit of the class the corrupted example's run predicts there),
  ``logit``, ``logprob``, ``kl``, ``accuracy`` (not differentiable: ACDC and scrubbing only); numerical
  outputs: ``projection`` (default: (y − y')·(y₀ − y')/|y₀ − y'|², 1 at the clean run and 0 at the corrupted
  one) and ``mse`` (against the clean output). Positions 1..n only (BOS's output means nothing).

:func:`discover` runs EAP, EAP-IG, ACDC or exact edge patching (:mod:`mechscope.core.graphs`) through
:class:`~mechscope.lm.methods.graph.TransformerEdges`, cuts a circuit, draws the faithfulness curve and, for a
tracr model, scores the edges against ``circuit.json`` (every edge set). :func:`scrub_hypothesis` tests a
hypothesis (:func:`parse_hypothesis_file`) by causal scrubbing; its features come from :data:`FEATURES`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from mechscope.core.errors import MechscopeError
from mechscope.core.graphs import (
    MIB_FRACTIONS,
    Circuit,
    CircuitScore,
    EdgeScores,
    FaithfulnessCurve,
    TopEdges,
    acdc,
    auroc,
    check_method,
    check_threshold,
    eap,
    eap_ig,
    edge_patching,
    faithfulness_curve,
    score_circuit,
)
from mechscope.core.intervene import derangement
from mechscope.core.results import Result
from mechscope.core.scrub import (
    ScrubResult,
    hypothesis_file_claims,
    hypothesis_file_sampling,
    parse_hypothesis,
    scrub,
)
from mechscope.core.torch_utils import evaluating
from mechscope.lm.methods.graph import Tokens, TransformerEdges, pad_sequences
from mechscope.lm.methods.scores import repeated_tokens, token_range_of
from mechscope.lm.models.transformer import HookedTransformer

TASKS = ("induction", "tracr")
INDUCTION_METRICS = {"loss": "lower", "logprob": "higher", "kl": "lower", "logit_diff": "higher"}
CATEGORICAL_METRICS = {"logit_diff": "higher", "logit": "higher", "logprob": "higher", "kl": "lower",
                       "accuracy": "higher"}  # fmt: skip
NUMERICAL_METRICS = {"projection": "higher", "mse": "lower"}
NOT_DIFFERENTIABLE = {"accuracy"}


# ---- tasks ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A clean batch, a corrupted batch and a metric of the output on the clean batch (see the module docstring)."""

    kind: str
    metric_name: str
    better: str | None
    clean: Any = field(repr=False)
    corrupted: Any = field(repr=False)
    metric: Callable = field(repr=False, compare=False)
    description: str = ""
    period: int | None = None  # repeated sequences: the repeat's length n
    settings: dict = field(default_factory=dict)

    @property
    def ids(self) -> torch.Tensor:
        return self.clean.ids if isinstance(self.clean, Tokens) else self.clean

    @property
    def n_examples(self) -> int:
        return int(self.ids.shape[0])


def _check_metric(name: str | None, table: dict, kind: str) -> str:
    name = next(iter(table)) if name is None else name
    if name not in table:
        raise MechscopeError(f"unknown metric {name!r} for the {kind} task: one of {', '.join(table)}")
    return name


def _run(model: HookedTransformer, inputs) -> torch.Tensor:
    with torch.no_grad(), evaluating(model):
        out, _ = TransformerEdges(model).forward(inputs)
    return out.detach()


def induction_task(
    model: HookedTransformer,
    metric: str | None = None,
    *,
    n: int = 20,
    batch: int = 8,
    seed: int = 0,
    token_range: tuple[int, int] | None = None,
    distinct: bool = False,
) -> Task:
    """Repeated random tokens (BOS + n + the same n); corrupted = each row's next row. ``distinct``: each copy's
    n tokens all different (drawn without replacement: with a range of exactly n tokens, every row is a
    permutation of the same tokens, so rows agree on the token at a position often enough for scrubbing's
    per-position features)."""
    name = _check_metric(metric, INDUCTION_METRICS, "induction")
    for what, v, low in (("n", n, 2), ("batch", batch, 2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise MechscopeError(f"the induction task needs {what} >= {low}, got {v!r}")
    if 1 + 2 * n > model.cfg.n_ctx:
        raise MechscopeError(f"BOS + 2 × {n} tokens do not fit the context of {model.cfg.n_ctx}")
    lo, hi = token_range_of(model, token_range)
    gen = torch.Generator().manual_seed(seed)
    if distinct:
        if hi - lo < n:
            raise MechscopeError(f"{n} distinct tokens need a token range of at least {n}, got [{lo}, {hi})")
        seq = torch.stack([lo + torch.randperm(hi - lo, generator=gen)[:n] for _ in range(batch)])
        bos = model.cfg.bos_token_id if model.cfg.bos_token_id is not None else lo
        clean = torch.cat([torch.full((batch, 1), bos), seq, seq], 1)
    else:
        clean = repeated_tokens(model, n, batch, 2, gen, (lo, hi))
    corrupted = clean.roll(-1, 0)
    q = torch.arange(n + 1, 2 * n)  # second-copy positions whose next token the first copy gives away
    target, other = clean[:, q + 1], corrupted[:, q + 1]
    clean_lp = F.log_softmax(_run(model, clean)[:, q].double(), -1)

    def logprob(out):
        lp = F.log_softmax(out[:, q].double(), -1)
        return lp.gather(-1, target[..., None]).mean()

    fns = {
        "loss": lambda out: -logprob(out),
        "logprob": logprob,
        "kl": lambda out: (
            F.kl_div(F.log_softmax(out[:, q].double(), -1), clean_lp, log_target=True, reduction="none").sum(-1).mean()
        ),  # fmt: skip
        "logit_diff": lambda out: (
            (out[:, q].gather(-1, target[..., None]) - out[:, q].gather(-1, other[..., None])).double().mean()
        ),
    }
    return Task("induction", name, INDUCTION_METRICS[name], clean, corrupted, fns[name],
                f"second-copy {name} on BOS + {n} random{' distinct' if distinct else ''} tokens [{lo}, {hi}) "
                f"repeated, {batch} sequences; "
                "corrupted: another of the sequences", n,
                {"n": n, "batch": batch, "seed": seed, "token_range": [lo, hi], "distinct": distinct})  # fmt: skip


def tracr_task(model: HookedTransformer, metric: str | None = None, *, seed: int = 0, limit: int | None = None) -> Task:
    """Every example of the tracr model's ``examples.json`` (or the first ``limit``); corrupted = another example."""
    from mechscope.lm.models.convert.tracr import read_examples

    info = getattr(model, "tracr", None)
    if info is None:
        raise MechscopeError("the tracr task needs a tracr model (a folder of shared/data/tracr)")
    numerical = info.output_type == "numerical"
    table = NUMERICAL_METRICS if numerical else CATEGORICAL_METRICS
    name = _check_metric(metric, table, f"tracr ({info.output_type} output)")
    ex = read_examples(info.directory, info, model.cfg.d_vocab, model.cfg.n_logits)
    ids = list(ex.ids)
    outputs = list(ex.outputs)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 2:
            raise MechscopeError(f"limit must be an integer >= 2, got {limit!r}")
        ids, outputs = ids[:limit], outputs[:limit]
    clean = pad_sequences(ids, info.pad_id if info.pad_id is not None else info.bos_id)
    corrupted = clean[derangement(len(ids), torch.Generator().manual_seed(seed))]
    valid = clean.valid()
    valid[:, 0] = False  # BOS's output means nothing
    clean_out = _run(model, clean)
    corrupted_out = _run(model, corrupted)
    if numerical:
        y0, y1 = clean_out[..., 0].double(), corrupted_out[..., 0].double()
        d = torch.where(valid, y0 - y1, torch.zeros_like(y0))
        denom = float((d * d).sum())

        def projection(out):
            if denom == 0:
                raise MechscopeError("the corrupted examples give the clean outputs: nothing to measure")
            return ((out[..., 0].double() - y1) * d).sum() / denom

        fns = {"projection": projection,
               "mse": lambda out: ((out[..., 0].double() - y0)[valid] ** 2).mean()}  # fmt: skip
    else:
        target = torch.zeros_like(clean.ids)
        for i, o in enumerate(outputs):
            target[i, 1 : 1 + len(o)] = torch.tensor(o)
        other = corrupted_out.argmax(-1)
        clean_lp = F.log_softmax(clean_out.double(), -1)

        def pick(out, cls):
            return out.double().gather(-1, cls[..., None])[..., 0][valid]

        fns = {
            "logit_diff": lambda out: (pick(out, target) - pick(out, other)).mean(),
            "logit": lambda out: pick(out, target).mean(),
            "logprob": lambda out: pick(F.log_softmax(out.double(), -1), target).mean(),
            "kl": lambda out: (
                F.kl_div(F.log_softmax(out.double(), -1), clean_lp, log_target=True, reduction="none")
                .sum(-1)[valid]
                .mean()
            ),  # fmt: skip
            "accuracy": lambda out: (out.argmax(-1) == target)[valid].double().mean(),
        }
    return Task("tracr", name, table[name], clean, corrupted, fns[name],
                f"{name} on the {len(ids)} examples of {info.name} (each at its own length); corrupted: another "
                "example (a seeded derangement)", None,
                {"seed": seed, "limit": limit, "examples": len(ids)})  # fmt: skip


def make_task(model: HookedTransformer, task: str | None = None, metric: str | None = None, **settings) -> Task:
    """The task a model suits (``tracr`` for tracr models, ``induction`` otherwise) or the one named."""
    kind = task or ("tracr" if getattr(model, "tracr", None) is not None else "induction")
    if kind not in TASKS:
        raise MechscopeError(f"unknown task {kind!r}: one of {', '.join(TASKS)}")
    if kind == "tracr":
        return tracr_task(model, metric, **{k: v for k, v in settings.items() if k in ("seed", "limit")})
    keep = ("n", "batch", "seed", "token_range", "distinct")
    return induction_task(model, metric, **{k: v for k, v in settings.items() if k in keep and v is not None})


# ---- features of the input (causal scrubbing) ---------------------------------------------------------

FEATURES = {
    "token": "the token at the position (per position)",
    "prev_token": "the token one position back, i−1 (per position; -1 at position 0)",
    "token[i-K]": "the token K positions back (per position), e.g. token[i-2]",
    "token[i-n]": "the token one repeat back in a repeated sequence (per position; needs the induction task)",
    "token[i-n+K]": "the token n−K positions back, e.g. token[i-n+1] (the token after the earlier copy)",
    "position": "the position (per position: any row, same position)",
    "length": "the sequence's length (per row: tracr's length-dependent programs)",
    "sequence": "the row itself (per row; recursively resampled, so the same as no feature)",
}
_TOKEN = re.compile(r"^token\[i(?:(?P<sign>[+-])(?P<k>\d+)|-n(?:(?P<nsign>[+-])(?P<nk>\d+))?)?\]$")


def _shifted(ids: torch.Tensor, back: int) -> torch.Tensor:
    """The token ``back`` positions back (forward for negative), -1 where there is none."""
    out = torch.full_like(ids, -1)
    p = ids.shape[1]
    if back >= 0 and back < p:
        out[:, back:] = ids[:, : p - back]
    elif back < 0 and -back < p:
        out[:, : p + back] = ids[:, -back:]
    return out


def feature_values(name: str, task: Task) -> torch.Tensor:
    """The values of feature ``name`` on the task's clean batch: [N] (per row) or [N, P] (per row and position)."""
    ids = task.ids
    lengths = task.clean.lengths if isinstance(task.clean, Tokens) else torch.full((len(ids),), ids.shape[1])
    if name == "token":
        return ids
    if name == "prev_token":
        return _shifted(ids, 1)
    if name == "position":
        return torch.arange(ids.shape[1]).expand_as(ids)
    if name == "length":
        return lengths
    if name == "sequence":
        return torch.arange(len(ids))
    m = _TOKEN.match(name)
    if m is None:
        raise MechscopeError(f"unknown feature {name!r}: one of {', '.join(FEATURES)}")
    if m["k"] is not None:
        return _shifted(ids, int(m["k"]) * (1 if m["sign"] == "-" else -1))
    if "-n" in name:
        if task.period is None:
            raise MechscopeError(f"feature {name!r} needs a repeated sequence (the induction task)")
        k = int(m["nk"] or 0) * (1 if m["nsign"] == "-" else -1)
        return _shifted(ids, task.period + k)
    return ids


# ---- results --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LMDiscovery(TopEdges, Result):
    """One circuit-discovery run on a transformer: the scored edges, the circuit, its faithfulness curve, and
    (tracr) the scores against the known circuit; ``discovery.json``."""

    SCHEMA: ClassVar[str] = "mechscope.lm_discovery/1"
    FILE: ClassVar[str] = "discovery.json"

    model: str
    task: str
    task_description: str
    metric: str
    better: str | None
    method: str
    settings: dict
    n_examples: int
    scores: EdgeScores
    circuit: Circuit
    faithfulness: FaithfulnessCurve | None
    ground_truth: dict[str, CircuitScore]  # edge set -> score (tracr)
    known_nodes: tuple[str, ...]
    known_edges: tuple[tuple[str, str, str], ...]  # the known circuit's primary edges (drawn for tracr)
    comparison: dict | None  # against the heads report's path-patched edges
    seconds: dict[str, float]
    # forward and backward passes, in passes over the task's clean batch of tokens (batch x positions, tracr's padding
    # included; WorkCounter over the blocks): the method's own forward_passes and backward_passes (scores and
    # faithfulness), plus the task's clean run (induction; tracr: clean and corrupted) and ACDC's two runs that set
    # its default threshold
    work: dict | None = None


@dataclass(frozen=True)
class LMScrub(Result):
    """Causal scrubbing of one hypothesis on a transformer; ``scrub.json``."""

    SCHEMA: ClassVar[str] = "mechscope.lm_scrub/1"
    FILE: ClassVar[str] = "scrub.json"

    model: str
    name: str
    description: str
    task: str
    task_description: str
    metric: str
    better: str | None
    settings: dict
    features: dict[str, str]  # the features the claims use, described
    scrub: ScrubResult
    seconds: dict[str, float]
    # forward passes, in passes over the task's clean batch of tokens (batch x positions, tracr's padding included;
    # WorkCounter over the blocks): scrub.forward_passes and the task's clean run (induction; tracr: clean and
    # corrupted); None unless scrub_hypothesis was given a counter
    work: dict | None = None


# ---- discovery ----------------------------------------------------------------------------------------


def _circuit(scores: EdgeScores, method: str, size, threshold, default: int) -> Circuit:
    if method == "acdc" and size is None:
        return scores.circuit()
    if size is None and threshold is not None:
        return scores.circuit(int(np.sum(np.abs(scores.scores) >= threshold)))
    return scores.circuit(min(default, scores.graph.n_edges) if size is None else size)


def discover(
    model: HookedTransformer,
    task: Task,
    method: str = "eap-ig",
    *,
    size: int | float | None = None,
    threshold: float | None = None,
    steps: int = 5,
    ablation: str = "patch",
    curve: bool = True,
    n_random: int = 5,
    seed: int = 0,
    known=None,
    hand_edges: list[tuple[str, str, str]] | None = None,
    name: str = "",
    progress: bool = False,
) -> LMDiscovery:
    """Discover the circuit of ``task`` on ``model`` (see the module docstring). ``size``: edges (int) or a
    fraction of them in the circuit (default: the known circuit's primary edges, ACDC's own, or 30);
    ``threshold``: ACDC's tau (default 1% of |M(clean) − M(corrupted)|) or, for the others, a cut on |score|;
    ``known``: a :class:`~mechscope.core.graphs.KnownCircuit` to score against; ``hand_edges``: edges found by
    hand (the heads report's path patching) to compare with."""
    check_method(method)
    threshold = None if threshold is None else check_threshold(threshold)
    if method in ("eap", "eap-ig") and task.metric_name in NOT_DIFFERENTIABLE:
        raise MechscopeError(f"{method} needs a differentiable metric; {task.metric_name!r} is not (use acdc)")
    if method == "eap" and task.metric_name == "kl":
        raise MechscopeError("eap scores nothing with kl: its gradient is 0 at the clean run (use eap-ig or acdc)")
    edges = TransformerEdges(model)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    args = (edges, task.clean, task.corrupted)
    kw = {"metric": task.metric, "better": task.better}
    with evaluating(model):
        if method == "eap":
            scores = eap(*args, ablation=ablation, **kw)
        elif method == "eap-ig":
            scores = eap_ig(*args, steps=steps, **kw)
        elif method == "edge-patching":
            scores = edge_patching(*args, ablation=ablation, progress=progress, **kw)
        else:
            if threshold is None:
                with torch.no_grad():
                    m0 = float(task.metric(edges.forward(task.clean)[0]))
                    m1 = float(task.metric(edges.forward(task.corrupted)[0]))
                threshold = 0.01 * abs(m0 - m1)
            scores = acdc(*args, threshold=threshold, ablation=ablation, progress=progress, **kw)
        seconds["discovery"] = time.perf_counter() - t0
        default = len(known.edge_set("primary")) if known is not None else 30
        circuit = _circuit(scores, method, size, threshold if method != "acdc" else None, default)
        faith = None
        if curve:
            t1 = time.perf_counter()
            faith = faithfulness_curve(edges, scores, task.clean, task.corrupted, metric=task.metric,
                                       ablation="patch" if method == "eap-ig" else ablation, n_random=n_random,
                                       seed=seed, fractions=MIB_FRACTIONS, progress=progress)  # fmt: skip
            seconds["faithfulness"] = time.perf_counter() - t1
    truth = {}
    if known is not None:
        truth = {s: score_circuit(scores, known, edge_set=s) for s in known.edge_sets}
    settings = {"steps": steps if method == "eap-ig" else None, "ablation": ablation, "size": size,
                "threshold": threshold, "n_random": n_random, "seed": seed, **task.settings}  # fmt: skip
    return LMDiscovery(
        model=name or model.cfg.name,
        task=task.kind,
        task_description=task.description,
        metric=task.metric_name,
        better=task.better,
        method=method,
        settings=settings,
        n_examples=task.n_examples,
        scores=scores,
        circuit=circuit,
        faithfulness=faith,
        ground_truth=truth,
        known_nodes=tuple(known.nodes) if known is not None else (),
        known_edges=tuple(known.edge_set("primary")) if known is not None else (),
        comparison=compare_edges(scores, hand_edges, len(circuit)) if hand_edges else None,
        seconds=seconds,
    )


def compare_edges(scores: EdgeScores, hand: list[tuple[str, str, str]], top: int) -> dict:
    """Where edges found by hand rank among the discovered scores: rank of each (by |score|, 1 = first, among
    every edge and among the edges into the same kind of slot), AUROC of the hand edges against every other
    edge and against the other edges into the same slots, and how many sit in the top ``top``."""
    g = scores.graph
    key = np.abs(scores.scores)
    order = np.argsort(-key, kind="stable")
    rank = np.empty(len(key), dtype=np.int64)
    rank[order] = np.arange(1, len(key) + 1)
    ids = [g.edge_id(*e) for e in hand]
    slots = {g.edges[e][2] for e in ids}
    same = np.asarray([g.edges[e][2] in slots for e in range(g.n_edges)], dtype=bool)
    labels = np.zeros(g.n_edges, dtype=bool)
    labels[ids] = True
    in_slot = np.flatnonzero(same)
    slot_rank = {e: int(np.sum(key[in_slot] > key[e])) + 1 for e in ids}
    return {
        "edges": [
            {
                "edge": g.edge_name(e),
                "score": float(scores.scores[e]),
                "rank": int(rank[e]),
                "rank_in_slot": slot_rank[e],
            }
            for e in ids
        ],  # fmt: skip
        "slots": sorted(slots),
        "n_edges": g.n_edges,
        "n_slot_edges": int(same.sum()),
        "auroc": auroc(key, labels),
        "auroc_in_slot": auroc(key[in_slot], labels[in_slot]),
        "top": top,
        "in_top": int(sum(rank[e] <= top for e in ids)),
    }


def heads_edges(heads, kv_groups: int | None = None) -> list[tuple[str, str, str]]:
    """The key-side edges the heads report confirmed by path patching, in the graph's names: source head ->
    the key input of the target key/value head (on its group's first query head)."""
    g = kv_groups or heads.kv_groups
    out = []
    for pp in heads.path_patches:
        if any(pp.confirmed):
            src = f"blocks.{pp.source[0]}.attn.h{pp.source[1]}"
            out.append((src, f"blocks.{pp.layer}.attn.h{pp.kv_head * g}", "k"))
    return list(dict.fromkeys(out))


# ---- scrubbing -----------------------------------------------------------------------------------------

HYPOTHESIS_KEYS = {"name", "description", "model", "wing", "task", "metric", "data", "claims", "samples", "seed",
                   "sampling", "breakdown"}  # fmt: skip
DATA_KEYS = {"n", "batch", "seed", "token_range", "limit", "distinct"}


@dataclass(frozen=True)
class HypothesisSpec:
    """A hypothesis file's settings (its claims stay as the file gives them until the model's graph checks them)."""

    name: str
    description: str
    model: str
    task: str | None
    metric: str | None
    data: dict
    claims: tuple
    samples: int
    seed: int
    sampling: str
    breakdown: bool = True


def parse_hypothesis_file(data: Any, where: str = "hypothesis") -> HypothesisSpec:
    """A transformer hypothesis (JSON object) checked for its keys and types; one line on any error."""
    source_help = "'model' must name the model (smollm2, a folder, a toy run)"
    claims = hypothesis_file_claims(data, where, HYPOTHESIS_KEYS, "model", source_help)
    d = data.get("data", {})
    if not isinstance(d, dict) or set(d) - DATA_KEYS:
        raise MechscopeError(f"{where}: 'data' must be an object with keys among {', '.join(sorted(DATA_KEYS))}")
    for key, low in (("n", 2), ("batch", 2), ("seed", 0), ("limit", 2)):
        v = d.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            raise MechscopeError(f"{where}: data.{key} must be an integer >= {low}, got {v!r}")
    if d.get("distinct") is not None and not isinstance(d["distinct"], bool):
        raise MechscopeError(f"{where}: data.distinct must be true or false")
    tr = d.get("token_range")
    if tr is not None and not (isinstance(tr, list) and len(tr) == 2 and all(isinstance(x, int) for x in tr)):
        raise MechscopeError(f"{where}: data.token_range must be [low, high)")
    samples, seed = data.get("samples", 10), data.get("seed", 0)
    for key, v, low in (("samples", samples, 1), ("seed", seed, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise MechscopeError(f"{where}: {key} must be an integer >= {low}, got {v!r}")
    for key in ("task", "metric", "name", "description", "sampling"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise MechscopeError(f"{where}: {key} must be a string")
    sampling, breakdown = hypothesis_file_sampling(data, where)
    for c in claims:
        f = c.get("feature") if isinstance(c, dict) else None
        if f is not None and (not isinstance(f, str) or (f not in FEATURES and _TOKEN.match(f) is None)):
            raise MechscopeError(f"{where}: unknown feature {f!r}; the transformer features: {', '.join(FEATURES)}")
    return HypothesisSpec(
        name=str(data.get("name", Path(where).stem)),
        description=str(data.get("description", "")),
        model=data["model"],
        task=data.get("task"),
        metric=data.get("metric"),
        data=dict(d),
        claims=tuple(claims),
        samples=samples,
        seed=seed,
        sampling=sampling,
        breakdown=breakdown,
    )


def scrub_hypothesis(model: HookedTransformer, spec: HypothesisSpec, *, name: str = "", counter=None) -> LMScrub:
    """Causal scrubbing of the hypothesis ``spec`` on ``model`` (its task's clean batch is the dataset).
    ``counter``: a :class:`~mechscope.core.torch_utils.WorkCounter` over ``model`` that counts while the task is
    made and scrubbed; the result's ``work`` is its report, in passes over the task's clean tokens."""
    t0 = time.perf_counter()
    settings = {k: v for k, v in spec.data.items() if k != "token_range"}
    if spec.data.get("token_range") is not None:
        settings["token_range"] = tuple(spec.data["token_range"])
    with counter.counting() if counter is not None else nullcontext():
        task = make_task(model, spec.task, spec.metric, **settings)
        edges = TransformerEdges(model)
        hyp = parse_hypothesis({"claims": list(spec.claims)}, edges.graph)  # unknown component, slot or edge: one line
        used = sorted({c.feature for c in hyp.claims if c.feature is not None})
        feats = {f: feature_values(f, task) for f in used}
        with evaluating(model):
            res = scrub(edges, task.clean, metric=task.metric, hypothesis=hyp, features=feats, samples=spec.samples,
                        seed=spec.seed, sampling=spec.sampling, breakdown=spec.breakdown)  # fmt: skip
    work = None if counter is None else counter.report("lm scrub", task.ids.numel())
    return LMScrub(
        model=name or model.cfg.name,
        name=spec.name,
        description=spec.description,
        task=task.kind,
        task_description=task.description,
        metric=task.metric_name,
        better=task.better,
        settings={**task.settings, "samples": spec.samples, "seed": spec.seed, "sampling": spec.sampling},
        features={f: _describe(f) for f in used},
        scrub=res,
        seconds={"scrub": time.perf_counter() - t0},
        work=work,
    )


def _describe(name: str) -> str:
    if name in FEATURES:
        return FEATURES[name]
    return f"the token at that offset ({name})"
