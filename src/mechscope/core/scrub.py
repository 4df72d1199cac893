"""Causal scrubbing on the component graph: test a hypothesis by resampling what it says does not matter.

Chan, Garriga-Alonso, Goldowsky-Dill, Greenblatt, Nitishinskaya, Radhakrishnan, Shlegeris & Thomas 2022,
"Causal Scrubbing: a method for rigorously testing interpretability hypotheses" (Alignment Forum / Redwood
Research). A hypothesis is a list of claims; a claim names edges (or paths of nodes) of the
:class:`~mechscope.core.graphs.graph.ComponentGraph` and a feature: "what flows along these edges depends on the
input only through ``feature(x)``" (no feature: "on the input itself"). Edges no claim names are claimed
irrelevant. As a dict (the JSON/YAML layout of a hypothesis file)::

    {"claims": [
        {"name": "sum path", "path": ["embed", "blocks.0.attn.h0<v>", "unembed"], "feature": "digit_sum"},
        {"name": "bias", "edges": ["embed->blocks.0.mlp<in>", ["pos_embed", "blocks.1.attn.h0", "q"]]}
    ]}

An edge may also be a glob pattern over edge names (``"input->conv1.*"``: every edge from the input into a conv1
channel), and one claim may be ``{"name": ..., "rest": true, "feature": ...}``: every edge the other claims do not
name (e.g. "the rest of the model depends only on the current token").

A path's steps may name a slot (``node<slot>``) or not (every slot the previous node feeds). Scrubbing is the
paper's treeified resampling at the level of the edge graph: the output is computed on each input ``x`` with
every edge into it carrying its sender's value from its own input: a uniformly random dataset row for an
irrelevant edge, a row ``x'`` with ``feature(x') = feature(x)`` for a claimed edge (``x`` itself without a
feature), and the claimed edge's sender is in turn computed the same way on ``x'``, recursively down to the input
nodes. All sampling is seeded. The behaviour recovered is ``(M_scrubbed - M_random) / (M_clean - M_random)``
with ``M_random`` the model with every edge into the output resampled; the breakdown scrubs one claim at a time
(everything else left clean), and the irrelevant edges alone, to show which claim fails.
"""

from __future__ import annotations

import fnmatch
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from mechscope.core.errors import MechscopeError
from mechscope.core.graphs.graph import ComponentGraph
from mechscope.core.graphs.protocol import Term, capture, check_model, edge_weight, metric_value, run
from mechscope.core.results import Result
from mechscope.core.validate import check_int, check_seed

RANDOM, IDENTITY = -2, -1
SAMPLINGS = ("edge", "sender")
_TOP_KEYS = {"claims", "name", "description"}
_CLAIM_KEYS = {"name", "path", "edges", "feature", "rest"}

Triple = tuple[str, str, str]


@dataclass(frozen=True)
class Claim:
    """Edges whose content depends on the input only through ``feature`` (None: the input itself)."""

    name: str
    edges: tuple[Triple, ...]
    feature: str | None = None


@dataclass(frozen=True)
class Hypothesis(Result):
    """The claims of a causal-scrubbing hypothesis; every edge they do not name is claimed irrelevant."""

    SCHEMA: ClassVar[str] = "mechscope.hypothesis/1"

    claims: tuple[Claim, ...]

    @classmethod
    def parse(cls, data: Any, graph: ComponentGraph) -> Hypothesis:
        return parse_hypothesis(data, graph)


# ---- parsing ------------------------------------------------------------------------------------


def parse_hypothesis(data: Any, graph: ComponentGraph) -> Hypothesis:
    """A :class:`Hypothesis` from its dict (see the module docstring), checked against ``graph``."""
    if isinstance(data, Hypothesis):
        data = {
            "claims": [{"name": c.name, "edges": [list(e) for e in c.edges], "feature": c.feature} for c in data.claims]
        }
    if not isinstance(data, Mapping) or not isinstance(data.get("claims"), list):
        raise MechscopeError("a hypothesis is a dict with a list 'claims'")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise MechscopeError(f"unknown hypothesis key {sorted(unknown)[0]!r} (expected {', '.join(sorted(_TOP_KEYS))})")
    claims = [_claim(c, i, graph) for i, c in enumerate(data["claims"])]
    rest = [i for i, c in enumerate(data["claims"]) if isinstance(c, Mapping) and c.get("rest")]
    if len(rest) > 1:
        raise MechscopeError("only one claim may be the 'rest' (every edge the other claims do not name)")
    if rest:
        named = {e for c in claims for e in c.edges}
        edges = tuple(e for e in graph.edges if e not in named)
        if not edges:
            raise MechscopeError(f"claim {claims[rest[0]].name!r}: the other claims name every edge; no rest is left")
        claims[rest[0]] = Claim(claims[rest[0]].name, edges, claims[rest[0]].feature)
    claims = tuple(claims)
    _check_consistent(claims)
    return Hypothesis(claims=claims)


def hypothesis_file_claims(data: Any, where: str, keys: set[str], source: str, source_help: str) -> list:
    """The checks every wing's hypothesis file starts with: a JSON object, only ``keys``, a non-empty string under
    ``source`` (what the claims are about: a run, a model; ``source_help`` says so when it is missing) and a
    non-empty list of claims, which it returns. One line on any error, prefixed with ``where``."""
    if not isinstance(data, dict):
        raise MechscopeError(f"{where}: a hypothesis is a JSON object")
    bad = sorted(set(data) - keys)
    if bad:
        raise MechscopeError(f"{where}: unknown key {bad[0]!r} (expected {', '.join(sorted(keys))})")
    if not isinstance(data.get(source), str) or not data[source]:
        raise MechscopeError(f"{where}: {source_help}")
    claims = data.get("claims")
    if not isinstance(claims, list) or not claims:
        raise MechscopeError(f"{where}: 'claims' must be a non-empty list")
    return claims


def hypothesis_file_sampling(data: dict, where: str) -> tuple[str, bool]:
    """A hypothesis file's ``sampling`` ('edge' by default, or 'sender') and ``breakdown`` (true by default)."""
    sampling = data.get("sampling", "edge")
    if sampling not in ("edge", "sender"):
        raise MechscopeError(f"{where}: sampling must be 'edge' or 'sender', got {sampling!r}")
    if not isinstance(data.get("breakdown", True), bool):
        raise MechscopeError(f"{where}: breakdown must be true or false")
    return sampling, data.get("breakdown", True)


def hypothesis_file_ints(where: str, values: dict[str, tuple[Any, int]]) -> dict[str, int]:
    """A hypothesis file's integer settings, ``key -> (value, lowest)``, checked: a key ending in ``seed`` is a seed
    (0 to 2**63 - 1, what torch's generators take); ``samples`` at most 100,000 (a forward pass each per claim)."""
    out = {}
    for key, (v, low) in values.items():
        if key.endswith("seed"):
            check_seed(v, f"{where}: {key}")
        elif key == "samples":
            check_int(v, f"{where}: samples", low, 100_000)
        else:
            check_int(v, f"{where}: {key}", low)
        out[key] = v
    return out


def _claim(entry: Any, i: int, graph: ComponentGraph) -> Claim:
    if not isinstance(entry, Mapping):
        raise MechscopeError(f"claim {i}: expected a dict with 'path' or 'edges', got {type(entry).__name__}")
    name = entry.get("name", f"claim {i}")
    where = f"claim {name!r}" if isinstance(name, str) else f"claim {i}"
    bad = set(entry) - _CLAIM_KEYS
    if bad or not isinstance(name, str) or not name:
        what = f"unknown key {sorted(bad)[0]!r}" if bad else "its name must be a non-empty string"
        raise MechscopeError(f"{where}: {what}")
    feature = entry.get("feature")
    if feature is not None and (not isinstance(feature, str) or not feature):
        raise MechscopeError(f"{where}: feature must be a name or null, got {feature!r}")
    if "rest" in entry:
        if entry["rest"] is not True or "path" in entry or "edges" in entry:
            raise MechscopeError(f"{where}: 'rest' is true and comes without 'path' or 'edges'")
        return Claim(name=name, edges=(), feature=feature)  # filled in by parse_hypothesis
    if ("path" in entry) == ("edges" in entry):
        raise MechscopeError(f"{where}: give exactly one of 'path', 'edges' and 'rest'")
    try:
        ids = _path(entry["path"], graph) if "path" in entry else _edges(entry["edges"], graph)
    except MechscopeError as e:
        raise MechscopeError(f"{where}: {e}") from None
    return Claim(name=name, edges=tuple(graph.edges[e] for e in ids), feature=feature)


def _edges(specs: Any, graph: ComponentGraph) -> list[int]:
    if not isinstance(specs, list) or not specs:
        raise MechscopeError("'edges' must be a non-empty list")
    return list(dict.fromkeys(e for spec in specs for e in _edge_spec(spec, graph)))


def _edge_spec(spec: Any, graph: ComponentGraph) -> tuple[int, ...]:
    """``graph.parse_edge``, and glob patterns over edge names (``"input->conv1.*"``, ``"*->blocks.5.attn.h1<k>"``;
    a name without a slot matches every slot)."""
    if not (isinstance(spec, str) and any(ch in spec for ch in "*?[")):
        return graph.parse_edge(spec)
    pattern = spec if "<" in spec or spec.endswith("*") else spec + "<*>"
    found = tuple(e for e in range(graph.n_edges) if fnmatch.fnmatchcase(graph.edge_name(e), pattern))
    if not found:
        raise MechscopeError(f"no edge of the graph matches {spec!r}")
    return found


def _path(steps: Any, graph: ComponentGraph) -> list[int]:
    if not isinstance(steps, list) or len(steps) < 2 or not all(isinstance(s, str) for s in steps):
        raise MechscopeError("'path' must be a list of at least two component names")
    nodes = [graph.nodes[graph.parse_receiver(s)[0]].name for s in steps]
    seen: set[str] = set()
    for n in nodes:
        if n in seen:
            raise MechscopeError(f"the path visits {n!r} twice (a cycle)")
        seen.add(n)
    return [e for a, b in zip(nodes, steps[1:], strict=False) for e in graph.parse_edge([a, b])]


def _check_consistent(claims: tuple[Claim, ...]) -> None:
    names, owner = set(), {}
    for c in claims:
        if c.name in names:
            raise MechscopeError(f"two claims are named {c.name!r}")
        names.add(c.name)
        for e in c.edges:
            if e in owner and owner[e].feature != c.feature:
                raise MechscopeError(
                    f"edge {e[0]}->{e[1]}<{e[2]}> is claimed by {owner[e].name!r} and {c.name!r} "
                    "with different features"
                )
            owner.setdefault(e, c)


# ---- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimScrub(Result):
    """The metric with one part of the hypothesis scrubbed, and the behaviour it recovers. ``measured`` False: the
    part is the clean model by construction (a claim without a feature keeps its edges as they are; no edge is
    left unclaimed), so it was not run and reads the clean metric."""

    name: str
    metric: float
    metric_sd: float
    recovered: float
    measured: bool = True


@dataclass(frozen=True)
class ScrubResult(Result):
    """Causal scrubbing of one hypothesis: the behaviour recovered, overall and claim by claim."""

    SCHEMA: ClassVar[str] = "mechscope.scrub/1"

    hypothesis: Hypothesis
    metric_clean: float
    metric_random: float
    metric_random_sd: float
    metric_scrubbed: float
    metric_scrubbed_sd: float
    recovered: float
    recovered_sd: float
    claims: tuple[ClaimScrub, ...]
    unclaimed: ClaimScrub | None
    samples: int
    seed: int
    forward_passes: int
    seconds: float = math.nan
    sampling: str = "edge"


# ---- sampling -----------------------------------------------------------------------------------


class _Feature:
    """Rows grouped by a feature's value, to draw a row that agrees with a given one. A feature gives one value
    per row ([N]) or one per row and position ([N, P]): then each position draws its own row among those that
    agree at that position."""

    def __init__(self, name: str, labels: Any, n: int) -> None:
        arr = labels.detach().cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
        if arr.ndim not in (1, 2) or len(arr) != n or arr.size == 0:
            raise MechscopeError(
                f"feature {name!r} must give one value per input row ({n}) or per row and position "
                f"([{n}, positions]), got shape {arr.shape}"
            )
        self.name = name
        self.positions = arr.shape[1] if arr.ndim == 2 else None
        try:
            _, codes = np.unique(arr.reshape(-1), return_inverse=True)
        except TypeError:
            raise MechscopeError(f"feature {name!r} mixes values that cannot be compared") from None
        codes = codes.reshape(-1)
        if self.positions is not None:  # agree at the same position: group by (position, value)
            p = self.positions
            _, codes = np.unique(codes.reshape(n, p) * p + np.arange(p), return_inverse=True)
            codes = codes.reshape(-1)
        counts = np.bincount(codes)
        self.codes = torch.as_tensor(codes)
        self.order = torch.as_tensor(np.argsort(codes, kind="stable"))
        self.counts = torch.as_tensor(counts)
        self.starts = torch.as_tensor(np.cumsum(counts) - counts)

    def _draw(self, items: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        c = self.codes[items]
        u = torch.rand(items.shape, generator=gen, dtype=torch.float64)
        pick = (u * self.counts[c]).long().clamp_max(self.counts[c] - 1)
        return self.order[self.starts[c] + pick]

    def sample(self, rows: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A donor row per row ([len(rows)]), or per row and position ([len(rows), P]) for a positional feature."""
        if self.positions is None:
            return self._draw(rows, gen)
        p = self.positions
        return self._draw(rows[:, None] * p + torch.arange(p), gen) // p


class _Scrubber:
    """Treeified resampling runs for one edge assignment (RANDOM, IDENTITY or a feature index per edge)."""

    def __init__(self, model, inputs, cache, features: list[_Feature], gen, max_forwards: int, sampling="edge"):
        self.model, self.inputs, self.cache, self.features = model, inputs, cache, features
        self.sampling = sampling
        self.graph: ComponentGraph = model.graph
        self.n = cache[0].shape[0]
        self.gen, self.max_forwards = gen, max_forwards
        self.forwards = 0

    def output(self, assign: np.ndarray):
        """The model's output on every row with the edges resampled as ``assign`` says."""
        self.assign, self.exact, self.budget = assign, self._exact(assign), self.max_forwards
        self.whole: dict[int, torch.Tensor] = {}  # a node's treeified value on every row (positional features)
        output, _ = self._forward(self.graph.output_nodes(), torch.arange(self.n))
        return output

    def _exact(self, assign: np.ndarray) -> np.ndarray:
        """Nodes whose treeified value is their clean value: every path into them is claimed as it is."""
        g = self.graph
        send, _ = g.edge_nodes()
        exact = np.zeros(len(g.nodes), dtype=bool)
        for node in g.topological_order:
            into = g.edges_into_inputs(node)
            exact[node] = bool(np.all(assign[into] == IDENTITY) and np.all(exact[send[into]]))
        return exact

    def _value(self, node: int, rows: torch.Tensor) -> torch.Tensor:
        s = self.graph.sender_of(node)
        if self.exact[node]:
            return self.cache[s][rows]
        _, senders = self._forward((node,), rows)
        return senders[s]

    def _forward(self, nodes, rows: torch.Tensor):
        self.budget -= 1
        self.forwards += 1
        if self.budget < 0:
            raise MechscopeError(
                f"the hypothesis treeifies into more than {self.max_forwards} forward passes: claim fewer paths "
                "or raise max_forwards"
            )
        if self.sampling == "sender":  # every receiver of the model at once: one forward for the whole tree
            return run(self.model, self.inputs, self._shared_terms(list(range(self.graph.n_receivers)), rows))
        receivers = list(dict.fromkeys(r for node in nodes for r in self.graph.inputs_of(node)))
        terms = [self._term(r, rows) for r in receivers]
        return run(self.model, self._rows(rows), terms)

    def _rows(self, rows: torch.Tensor):
        """The inputs of ``rows``, in their order: a node computed for them reads their attention masks too (with
        the batch's own order, a padded donor of another length was masked as the row it stood in for)."""
        if torch.equal(rows, torch.arange(self.n)):
            return self.inputs
        return self.inputs[rows]

    def _shared_terms(self, receivers: list[int], rows: torch.Tensor) -> list[Term]:
        """``sampling="sender"``: the whole treeified output in one forward. Every sender is resampled once per
        kind of edge: unclaimed edges carry its clean output on random rows; edges claimed with a feature carry its
        output *in this same forward* on rows that agree on the feature (row by row, or position by position),
        which is its treeified value on those rows; edges claimed as they are carry the run's own value."""
        g = self.graph
        eids = g.edges_into(receivers)
        kinds = self.assign[eids]
        terms = []
        for a in np.unique(kinds).tolist():
            if a == IDENTITY:
                continue
            ids = eids[kinds == a]
            values: list[torch.Tensor | None] = [None] * g.n_senders
            index: list[torch.Tensor | None] = [None] * g.n_senders
            for s in np.unique(g.edge_sender[ids]).tolist():
                if a == RANDOM:
                    values[s] = self.cache[s][torch.randint(self.n, (len(rows),), generator=self.gen)]
                else:
                    f = self.features[a]
                    if f.positions is not None and (self.cache[s].dim() < 2 or self.cache[s].shape[1] != f.positions):
                        raise MechscopeError(
                            f"feature {f.name!r} gives {f.positions} positions per row; "
                            f"{g.nodes[g.senders[s]].name}'s output has shape {tuple(self.cache[s].shape[1:])} per row"
                        )
                    index[s] = f.sample(rows, self.gen)
            weight = edge_weight(self.model, self.cache)
            weight[torch.as_tensor(ids, device=weight.device)] = 1.0
            terms.append(Term(weight, values, index=None if a == RANDOM else index))
        return terms

    def _term(self, receiver: int, rows: torch.Tensor) -> Term:
        g = self.graph
        values: list[torch.Tensor | None] = [None] * g.n_senders
        weight = edge_weight(self.model, self.cache)
        for e in g.edges_into([receiver]).tolist():
            s, a = int(g.edge_sender[e]), int(self.assign[e])
            if a == RANDOM:
                values[s] = self.cache[s][torch.randint(self.n, (len(rows),), generator=self.gen)]
            elif a != IDENTITY and self.features[a].positions is not None:
                values[s] = self._positional(g.senders[s], self.features[a], rows)
            else:
                src = rows if a == IDENTITY else self.features[a].sample(rows, self.gen)
                values[s] = self._value(g.senders[s], src)
            weight[e] = 1.0
        return Term(weight, values)

    def _positional(self, node: int, feature: _Feature, rows: torch.Tensor) -> torch.Tensor:
        """The node's value at each position of each row, from a row that agrees with it there."""
        s = self.graph.sender_of(node)
        if node not in self.whole:
            self.whole[node] = self.cache[s] if self.exact[node] else self._value(node, torch.arange(self.n))
        full = self.whole[node]
        p = feature.positions
        if full.dim() < 2 or full.shape[1] != p:
            raise MechscopeError(
                f"feature {feature.name!r} gives {p} positions per row; {self.graph.nodes[node].name}'s output has "
                f"shape {tuple(full.shape[1:])} per row"
            )
        return full[feature.sample(rows, self.gen), torch.arange(p)]


# ---- running ------------------------------------------------------------------------------------


def _assignment(graph: ComponentGraph, claims, names: list[str], default: int) -> np.ndarray:
    assign = np.full(graph.n_edges, default, dtype=np.int64)
    for c in claims:
        for s, n, slot in c.edges:
            assign[graph.edge_id(s, n, slot)] = IDENTITY if c.feature is None else names.index(c.feature)
    return assign


def _features(hyp: Hypothesis, features: Mapping | None, n: int) -> tuple[list[str], list[_Feature]]:
    features = {} if features is None else features
    if not isinstance(features, Mapping):
        raise MechscopeError(f"features must be a dict of name -> one value per row, got {type(features).__name__}")
    names = sorted({c.feature for c in hyp.claims if c.feature is not None})
    for name in names:
        if name not in features:
            raise MechscopeError(f"the hypothesis uses feature {name!r}, which features does not give")
    return names, [_Feature(name, features[name], n) for name in names]


def scrub(
    model,
    inputs: Any,
    *,
    metric,
    hypothesis,
    features: Mapping | None = None,
    samples: int = 10,
    seed: int = 0,
    breakdown: bool = True,
    max_forwards: int = 10_000,
    sampling: str = "edge",
) -> ScrubResult:
    """Causal scrubbing (Chan et al. 2022) of ``hypothesis`` (a :class:`Hypothesis` or its dict) on the dataset
    ``inputs``; ``metric`` maps the output on all rows, in order, to a scalar (a loss, an accuracy), and
    ``features`` maps each feature name to one value per row (or per row and position). Each figure is the mean
    over ``samples`` seeded resamplings. ``sampling``: ``"edge"`` (the paper's treeification: every edge draws its
    own rows) or ``"sender"`` (one draw per sender and kind of edge in each forward, shared by the sender's edges:
    a forward then holds one value per sender, which is what a model with tens of thousands of edges can
    afford)."""
    check_model(model)
    samples = check_int(samples, "samples", 1, 100_000)  # each a forward pass per claim: 1e12 ran without end
    check_seed(seed, "seed")
    max_forwards = check_int(max_forwards, "max_forwards", 1)
    if not isinstance(breakdown, bool):  # "no" was truthy: the breakdown ran
        raise MechscopeError(f"breakdown must be True or False, got {breakdown!r}")
    if sampling not in SAMPLINGS:
        raise MechscopeError(f"sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
    g = model.graph
    hyp = parse_hypothesis(hypothesis, g)
    t0 = time.perf_counter()
    clean_out, cache = capture(model, inputs)
    n = _rows(cache)
    names, feats = _features(hyp, features, n)
    sc = _Scrubber(model, inputs, cache, feats, torch.Generator().manual_seed(seed), max_forwards, sampling)
    measure = lambda a: _measure(sc, metric, a, samples)  # noqa: E731
    m_clean = float(metric_value(metric, clean_out))
    m_random, sd_random = measure(np.full(g.n_edges, RANDOM, dtype=np.int64))
    if m_clean == m_random or not math.isfinite(m_clean - m_random):
        raise MechscopeError(
            f"the clean and the resampled model give the same metric ({m_clean:g}): nothing to recover"
        )
    frac = lambda m: (m - m_random) / (m_clean - m_random)  # noqa: E731
    m_scrub, sd_scrub = measure(_assignment(g, hyp.claims, names, RANDOM))
    parts: list[ClaimScrub] = []
    unclaimed = None
    if breakdown:
        clean = lambda name: ClaimScrub(name, m_clean, 0.0, 1.0, measured=False)  # noqa: E731
        for c in hyp.claims:
            if c.feature is None:  # its edges as they are, the rest clean: the clean model
                parts.append(clean(c.name))
                continue
            m, sd = measure(_assignment(g, [c], names, IDENTITY))
            parts.append(ClaimScrub(c.name, m, sd, frac(m)))
        as_they_are = [Claim(c.name, c.edges, None) for c in hyp.claims]
        rest = _assignment(g, as_they_are, names, RANDOM)
        if not (rest == RANDOM).any():
            unclaimed = clean("irrelevant edges")
        else:
            m, sd = measure(rest)
            unclaimed = ClaimScrub("irrelevant edges", m, sd, frac(m))
    return ScrubResult(
        hypothesis=hyp,
        metric_clean=m_clean,
        metric_random=m_random,
        metric_random_sd=sd_random,
        metric_scrubbed=m_scrub,
        metric_scrubbed_sd=sd_scrub,
        recovered=frac(m_scrub),
        recovered_sd=sd_scrub / abs(m_clean - m_random),
        claims=tuple(parts),
        unclaimed=unclaimed,
        samples=samples,
        seed=seed,
        forward_passes=1 + sc.forwards,
        seconds=time.perf_counter() - t0,
        sampling=sampling,
    )


def _rows(cache) -> int:
    sizes = {int(s.shape[0]) for s in cache if s.dim() > 0}
    if len(sizes) != 1:
        raise MechscopeError(f"every sender output must have the batch first; got batch sizes {sorted(sizes)}")
    return sizes.pop()


def _measure(sc: _Scrubber, metric, assign: np.ndarray, samples: int) -> tuple[float, float]:
    vals = [float(metric_value(metric, sc.output(assign))) for _ in range(samples)]
    sd = float(np.std(vals, ddof=1)) if samples > 1 else 0.0
    return float(np.mean(vals)), sd
