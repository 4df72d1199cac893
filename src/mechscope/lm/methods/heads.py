"""Finding induction heads (Elhage et al. 2021; Olsson et al. 2022).

An induction head attends from a token to the token that followed an earlier occurrence of the
same token, and copies it: on "... A B ... A" it attends to B and raises B's logit. It works
with a previous-token head in an earlier layer, whose output tells each position which token
preceded it; the induction head's keys read that (K-composition).

Protocols (all seeded, tokenizer-free except the real-text one):

1. Repeated random tokens: BOS + N random tokens + the same N again. Induction score = mean
   attention from each second-half position to the position after its token's first
   occurrence. Per-position loss of the model (second half far below the first: in-context
   learning).
2. Prefix matching (Olsson et al.): N' random tokens repeated R times; attention from each
   token in repeats 2..R to every position that followed an earlier occurrence of it.
3. Previous-token score (attention to position − 1) on random tokens and on real text;
   duplicate-token score (attention to earlier copies of the same token).
4. Copying: each head's direct effect on the *centred* logit (unembedding centred over the
   vocabulary; softmax ignores a shared shift) of the token it attends to, through the folded
   analysis view (:mod:`mechscope.lm.models.folding`); and the OV circuit's eigenvalue positivity
   on the folded weights.
5. Causal: mean-, zero- and resample-ablation of every head (:mod:`.ablation`): estimated
   for every head by attribution patching; measured exactly (mean-ablation) on every head the
   report names (labelled heads, path-patching sources and targets, the table's rows), and under
   each kind on the heads with the largest estimates and a random sample, per sequence over all
   protocol sequences; the top-k induction heads mean-ablated together against k random heads.
6. The circuit: Q/K/V composition of every pair on the folded weights (:mod:`.composition`),
   and key-side path patching (:mod:`.path_patching`) of every candidate previous-token head
   into every induction head; only patching-confirmed edges count as "feeds".

A head is labelled an induction head by Olsson et al.'s two properties: prefix matching (its
prefix-matching score at least the threshold) and copying (positive centred copying).

Memory: attention scores are reduced to per-head numbers inside the hook that sees the pattern;
the residual stream and head outputs of the protocol batch are kept once for the ablations.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from mechscope.core.errors import MechscopeError
from mechscope.core.results import Result, figure_data
from mechscope.core.stats import sample_sd
from mechscope.core.torch_utils import Timer
from mechscope.core.validate import check_seed, check_types
from mechscope.lm.methods import ablation as HA
from mechscope.lm.methods.ablation import HeadAblation
from mechscope.lm.methods.composition import CompositionResult, all_composition
from mechscope.lm.methods.path_patching import Criterion, PathPatch, induction_edges
from mechscope.lm.methods.scores import (
    attention_scores,
    capture_patterns,
    check_heads,
    check_next_token_model,
    induction_mask,
    model_device,
    prefix_mask,
    previous_token_mask,
    repeated_tokens,
    score_pass,
    token_range_of,
)
from mechscope.lm.methods.weights_circuits import ov_eigen_positivity
from mechscope.lm.models.folding import AnalysisWeights, analysis_weights
from mechscope.lm.models.transformer import HookedTransformer

log = logging.getLogger(__name__)

SCORES = (
    "induction",
    "prefix_matching",
    "previous_token",
    "previous_token_text",
    "duplicate_token",
    "copying",
    "ov_eigen_positivity",
    "ablation_loss_increase",
    "zero_ablation_loss_increase",
    "resample_ablation_loss_increase",
)
ABLATION_SCORES = {
    "mean": "ablation_loss_increase",
    "zero": "zero_ablation_loss_increase",
    "resample": "resample_ablation_loss_increase",
}
MEMORY_BUDGET = 8 * 2**30  # bytes for the cached residual streams, head outputs and gradients


@dataclass(frozen=True)
class Thresholds:
    """A head's label: the first rule it meets, in this order."""

    induction: float = 0.4  # prefix-matching score at least this, and positive centred copying
    previous_token: float = 0.4  # previous-token score on random tokens
    duplicate_token: float = 0.4


@dataclass(frozen=True)
class HeadProtocol:
    n: int = 50  # random tokens per half
    batch: int = 8
    seed: int = 0
    token_range: tuple[int, int] | None = None  # [low, high) token ids; default avoids specials and rare tokens
    prefix_n: int | None = None  # None: 25 (Olsson et al.), or as many as the context allows
    prefix_repeats: int = 4
    prefix_batch: int = 4
    text_batch: int = 4
    text_len: int = 128
    per_head_ablation: bool = True  # exact per-head ablations (estimates are always made)
    # without them: still measure (mean-ablation) each confirmed path-patching edge's source, whose total effect the
    # circuit sentences set beside its path's (lm circuits; a previous-token head's estimate can miss by nats)
    exact_path_sources: bool = False
    exact_top: int = 8  # heads measured exactly per ablation kind, by estimated effect
    exact_random: int = 8  # and a seeded random sample of other heads (mean-ablation)
    path_candidates: int = 3  # besides previous-token heads, the top-K-composition sources tested per target
    top_k: int | None = None  # None: 5, or half the heads of a smaller model
    random_draws: int = 8
    thresholds: Thresholds = field(default_factory=Thresholds)

    def to_dict(self) -> dict:
        return asdict(self)


def check_protocol(model: HookedTransformer, p: HeadProtocol) -> tuple[HeadProtocol, tuple[int, int]]:
    """The protocol with its defaults resolved for this model, and the token range; or a clear error."""
    check_next_token_model(model)
    check_types(p)
    check_seed(p.seed)
    if p.prefix_n is None:
        p = replace(p, prefix_n=max(1, min(25, (model.cfg.n_ctx - 1) // max(p.prefix_repeats, 1))))
    if p.top_k is None:
        p = replace(p, top_k=max(1, min(5, model.cfg.n_layers * model.cfg.n_heads // 2)))
    lo, hi = token_range_of(model, p.token_range)
    if p.n < 2:  # the second copy's loss is over the positions that predict a token inside it: none with n = 1
        raise MechscopeError(f"--n (n) must be at least 2 (the second copy's loss needs a token to predict), got {p.n}")
    if p.batch < 2:
        raise MechscopeError(f"--batch (batch) must be at least 2 (mean- and resample-ablation need others), "
                             f"got {p.batch}")  # fmt: skip
    if p.prefix_n < 1:
        raise MechscopeError(f"prefix_n must be at least 1, got {p.prefix_n}")
    for name, value in (("exact_top", p.exact_top), ("exact_random", p.exact_random)):
        if value < 0:
            raise MechscopeError(f"{name} must be 0 or more, got {value}")
    cfg = model.cfg
    need = 3 * cfg.n_layers * p.batch * (1 + 2 * p.n) * max(cfg.d_model, cfg.n_heads * cfg.d_head) * 4
    if need > MEMORY_BUDGET:
        raise MechscopeError(
            f"batch {p.batch} × {1 + 2 * p.n} positions would cache {need / 2**30:.1f} GiB of activations for the "
            f"ablations (budget {MEMORY_BUDGET / 2**30:.0f} GiB); use a smaller --batch or --n"
        )
    if p.prefix_repeats < 2:
        raise MechscopeError(f"prefix_repeats must be at least 2, got {p.prefix_repeats}")
    ctx, most_n = model.cfg.n_ctx, (model.cfg.n_ctx - 1) // 2
    if 1 + 2 * p.n > ctx:
        fix = f"use --n {most_n} or fewer" if most_n >= 2 else "the induction test needs at least 5"
        raise MechscopeError(f"--n (n) {p.n} needs {1 + 2 * p.n} positions (a BOS and two copies of {p.n} tokens); "
                             f"the model's context is {ctx}: {fix}")  # fmt: skip
    if 1 + p.prefix_repeats * p.prefix_n > ctx:
        raise MechscopeError(
            f"the prefix-matching test needs {1 + p.prefix_repeats * p.prefix_n} positions (a BOS and "
            f"{p.prefix_repeats} copies of prefix_n = {p.prefix_n} tokens); the model's context is {ctx}: use a "
            "smaller prefix_n or prefix_repeats"
        )
    n_heads = model.cfg.n_layers * model.cfg.n_heads
    most = max(1, n_heads // 2)  # the random control draws as many from the other heads (none with one head)
    if not 1 <= p.top_k <= most:
        raise MechscopeError(f"--top-k (top_k) must be between 1 and {most} (half the {n_heads} heads: the random "
                             f"control draws as many from the others), got {p.top_k}")  # fmt: skip
    return p, (lo, hi)


def classify(scores: dict[str, np.ndarray], t: Thresholds) -> list[list[str]]:
    """Olsson et al.'s induction head: prefix matching and copying; then previous-token, duplicate-token."""
    n_layers, n_heads = scores["induction"].shape
    labels = []
    for layer in range(n_layers):
        row = []
        for h in range(n_heads):
            if scores["prefix_matching"][layer, h] >= t.induction and scores["copying"][layer, h] > 0:
                row.append("induction")
            elif scores["previous_token"][layer, h] >= t.previous_token:
                row.append("previous_token")
            elif scores["duplicate_token"][layer, h] >= t.duplicate_token:
                row.append("duplicate_token")
            else:
                row.append("none")
        labels.append(row)
    return labels


# ---- the result ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadsResult(Result):
    """Everything ``find_induction_heads`` measured; ``to_dict()`` is heads.json (``load`` reads it back).

    ``examples`` (token ids and attention patterns of the heads shown), ``token_text`` (their text) and
    ``model_ref`` (a weak reference to the model, for the viewer of a head not captured) are for showing
    the result; they are not in the JSON.
    """

    SCHEMA = "mechscope.heads/2"
    FILE = "heads.json"

    model: str
    protocol: dict
    scores: dict[str, np.ndarray]  # name -> [L, H]
    labels: list[list[str]]
    loss_per_position: list[float]  # mean over the batch, position p predicts token p+1
    loss_first_half: float
    loss_second_half: float
    top_k_ablation: dict
    ablation: dict[str, HeadAblation]  # kind -> estimates for all heads, measurements for some
    composition: CompositionResult
    path_patches: tuple[PathPatch, ...]  # every test (after ``load``: the confirmed ones)
    circuit_rows: tuple[dict, ...]  # per induction head: the strongest K-composition sources, every path-patching test
    criterion: Criterion
    kv_groups: int  # query heads per key/value head
    seconds: dict[str, float]
    work: dict | None = None  # forward and backward passes made, and over how many tokens (WorkCounter.summary)
    examples: dict = figure_data(None)
    token_text: dict = figure_data(None)
    model_ref: Any = figure_data()

    def ranked(self, score: str, label: str | None = None) -> list[dict]:
        s = self.scores[score]
        rows = [
            {"layer": int(layer), "head": int(h), "score": float(s[layer, h])}
            for layer in range(s.shape[0])
            for h in range(s.shape[1])
            if label is None or self.labels[layer][h] == label
        ]
        return sorted(rows, key=lambda r: -r["score"])

    def edges(self) -> list[dict]:
        """Path-patching-confirmed edges: one per (source, key/value head), with every query head's effect."""
        out = []
        for pp in self.path_patches:
            if any(pp.confirmed):
                targets = [h for h, ok in zip(pp.query_heads, pp.confirmed, strict=True) if ok]
                out.append(pp.to_dict() | {"targets": [f"{pp.layer}.{h}" for h in targets]})
        return out

    def table(self, n: int | None = 20):
        """The heads ranked by induction score (the report's table; ``n=None``: every head), as a table view."""
        return self.render_view("table", n)

    def show(self, layer: int, head: int, model=None):
        """That head's attention viewer on the repeated random tokens (needs the model for a head not captured)."""
        return self.render_view("show", layer, head, model)

    def circuit(self) -> list[dict]:
        """Per induction head: the strongest K-composition sources (folded) and every path-patching test."""
        return list(self.circuit_rows)

    def edge_margin(self, pp: PathPatch) -> tuple[float, ...]:
        """Per query head of a path patch: its drop's distance from the criterion's threshold in standard errors
        over the protocol's sequences (:meth:`Criterion.margins`)."""
        return self.criterion.margins(pp, self.protocol.get("batch", 1))

    def induction_heads(self) -> list[tuple[int, int]]:
        return [(layer, h) for layer, row in enumerate(self.labels) for h, lab in enumerate(row) if lab == "induction"]

    def to_dict(self) -> dict:
        return {
            "schema": self.SCHEMA,
            "model": self.model,
            "protocol": self.protocol,
            "thresholds": self.protocol["thresholds"],
            # a score that was not measured (no text) is null, not NaN
            "scores": {
                k: [[None if np.isnan(x) else round(float(x), 6) for x in row] for row in np.asarray(v)]
                for k, v in self.scores.items()
            },
            "score_spread": {
                ABLATION_SCORES[k]: np.round(a.spread(), 6).tolist() for k, a in self.ablation.items()
            },
            "labels": self.labels,
            "induction_heads": self.ranked("induction", "induction"),
            "previous_token_heads": self.ranked("previous_token", "previous_token"),
            "duplicate_token_heads": self.ranked("duplicate_token", "duplicate_token"),
            "loss_per_position": self.loss_per_position,
            "loss_first_half": self.loss_first_half,
            "loss_second_half": self.loss_second_half,
            "ablation": {k: a.to_dict() for k, a in self.ablation.items()},
            "top_k_ablation": self.top_k_ablation,
            "composition": self.composition.to_dict(),
            "circuit": self.circuit(),
            "edges": self.edges(),
            "path_patching_criterion": self.criterion.to_dict(),
            "kv_groups": self.kv_groups,
            "seconds": self.seconds,
            "work": self.work,
        }

    @classmethod
    def from_dict(cls, d: dict) -> HeadsResult:
        scores = {k: np.array([[np.nan if x is None else x for x in row] for row in v], dtype=float)
                  for k, v in d["scores"].items()}  # fmt: skip
        ablation = {
            k: HeadAblation.from_summary(a, scores[ABLATION_SCORES[k]], d["score_spread"][ABLATION_SCORES[k]])
            for k, a in d["ablation"].items()
        }
        return cls(
            d["model"], d["protocol"], scores, d["labels"], d["loss_per_position"], d["loss_first_half"],
            d["loss_second_half"], d["top_k_ablation"], ablation, CompositionResult.from_dict(d["composition"]),
            tuple(PathPatch.from_dict(e) for e in d["edges"]), tuple(d["circuit"]),
            Criterion.from_dict(d["path_patching_criterion"]), d["kv_groups"], d.get("seconds", {}), d.get("work"),
        )  # fmt: skip


def circuit_rows(scores, labels, composition: CompositionResult, patches, kv_groups: int, batch: int,
                 criterion: Criterion | None = None) -> tuple[dict, ...]:  # fmt: skip
    """Per induction head (layer > 0): the strongest K-composition sources (folded) and every path-patching test,
    each with its drop's distance from the criterion's threshold in standard errors over ``batch`` sequences."""
    heads = [(layer, h) for layer, row in enumerate(labels) for h, lab in enumerate(row) if lab == "induction"]
    margins = {id(pp): (criterion or Criterion()).margins(pp, batch) for pp in patches}
    return tuple(_circuit_row(scores, labels, composition, patches, margins, kv_groups, layer, h)
                 for layer, h in heads if layer > 0)  # fmt: skip


def _circuit_row(scores, labels, comp: CompositionResult, patches, margins, g: int, layer: int, h: int) -> dict:
    k = comp.into("K", layer, h)
    H = k.shape[1]
    first = h - h % g  # the first query head of this key/value head's group
    tests = [pp for pp in patches if pp.layer == layer and h in pp.query_heads]
    tests.sort(key=lambda pp: -pp.drop[pp.query_heads.index(h)])

    def test_row(pp: PathPatch) -> dict:
        i = pp.query_heads.index(h)
        ls, hs = pp.source
        return {
            "source": f"{ls}.{hs}",
            "source_label": labels[ls][hs],
            # each query head's row mean, as heads.json has always had it (the edges list holds the same means
            # taken over the whole [Hq, B] array, which can differ in the last float32 bit)
            "induction_clean": float(pp.clean[i].mean()) if pp.clean is not None else pp.induction_clean[i],
            "induction_patched": float(pp.patched[i].mean()) if pp.patched is not None else pp.induction_patched[i],
            "drop": float(pp.drop[i]),
            "drop_std": float(pp.drop_std[i]),  # over the sequences
            # drop − threshold, in standard errors (sd / √sequences); None where the drop has no spread
            "margin_se": margins[id(pp)][i] if np.isfinite(margins[id(pp)][i]) else None,
            "k_composition": float(comp.scores["K"][ls, hs, layer, h]),
            "confirmed": pp.confirmed[i],
            "loss_increase": pp.loss_increase,
        }

    return {
        "induction_head": {"layer": layer, "head": h, "induction_score": float(scores["induction"][layer, h])},
        "kv_head": h // g,
        "shares_keys_with": [f"{layer}.{q}" for q in range(first, first + g) if q != h],
        "top_k_composition": [
            {
                "head": f"{j // H}.{j % H}",
                "k_composition": float(k.ravel()[j]),
                "above_baseline": float(k.ravel()[j] - comp.baseline.mean),
            }
            for j in np.argsort(-k.ravel())[:5]
        ],
        "path_patching": [test_row(pp) for pp in tests],
    }


# ---- the analysis -------------------------------------------------------------------------


def path_tests(labels, composition: CompositionResult, kv_groups: int, extra: int) -> dict:
    """Which sources to path-patch into each induction head's key/value head: every earlier
    previous-token head, and the ``extra`` strongest K-composition sources of each query head."""
    tests: dict[tuple[int, int], list[tuple[int, int]]] = {}
    H = len(labels[0])
    for layer, row in enumerate(labels):
        for h, lab in enumerate(row):
            if lab != "induction" or layer == 0:
                continue
            key = (layer, h // kv_groups)
            srcs = tests.setdefault(key, [])
            prev = [(lay, hh) for lay in range(layer) for hh in range(H) if labels[lay][hh] == "previous_token"]
            k = composition.into("K", layer, h).ravel()
            top = [divmod(int(j), H) for j in np.argsort(-k)[:extra]]
            for src in prev + top:
                if src not in srcs:
                    srcs.append(src)
    return tests


TABLE_ROWS = 20  # the report's table: the heads with the highest induction scores


def named_heads(labels, tests: dict, table: list[tuple[int, int]], kv_groups: int) -> list[tuple[int, int]]:
    """Every head the report names: labelled heads, the path-patching sources and targets (each query head of
    a tested key/value group), and the table's rows; in a fixed order."""
    heads = [(layer, h) for layer, row in enumerate(labels) for h, lab in enumerate(row) if lab != "none"]
    for (layer, kv), sources in tests.items():
        heads += list(sources) + [(layer, q) for q in range(kv * kv_groups, (kv + 1) * kv_groups)]
    return list(dict.fromkeys(heads + list(table)))


def _top_k(model, cap, tokens, n, scores, k, draws, g) -> dict:
    """The top-k heads by induction score mean-ablated together, against k random heads drawn from the others (a
    draw over every head shared half its heads with the top k in a small model)."""
    cfg = model.cfg
    flat = scores["induction"].flatten()
    order = np.argsort(-flat)
    top = [divmod(int(i), cfg.n_heads) for i in order[:k]]
    rest = torch.as_tensor(np.sort(order[k:]).copy())
    rnd = []
    for _ in range(draws if len(rest) >= k else 0):  # a one-head model has no other head to draw from
        pick = rest[torch.randperm(len(rest), generator=g)[:k]].tolist()
        rnd.append(HA.group(model, cap, tokens, n, [divmod(i, cfg.n_heads) for i in pick]))
    return {
        "k": k,
        "heads": [{"layer": layer, "head": h} for layer, h in top],
        "ablation": "mean (per position, over the batch)",
        "induction_heads_loss_increase": HA.group(model, cap, tokens, n, top),
        "random_heads_loss_increase_mean": float(np.mean(rnd)) if rnd else float("nan"),
        "random_heads_loss_increase_std": float(sample_sd(rnd)) if rnd else float("nan"),
        "random_draws": rnd,
    }


@dataclass(frozen=True)
class WeightReadings:
    """What the protocol reads from the weights alone, when a caller has it already (``lm circuits`` reads the
    same): the folded view of ``model`` with every option on (:func:`~mechscope.lm.models.folding.analysis_weights`;
    the MLPs may be left out), each head's OV eigenvalue positivity [L, H] of that view, and its composition
    scores as arrays (mode -> [L, H, L, H], :func:`~mechscope.lm.methods.composition.composition_scores`)."""

    view: AnalysisWeights
    eigen: np.ndarray
    composition: dict[str, np.ndarray]


def find_induction_heads(
    model: HookedTransformer,
    protocol: HeadProtocol | None = None,
    text_tokens: torch.Tensor | None = None,
    name: str = "",
    show: list[tuple[int, int]] | None = None,
    progress=None,
    readings: WeightReadings | None = None,
) -> HeadsResult:
    """Run every protocol on ``model``; ``text_tokens`` [B, P] enables the real-text scores. ``readings``: the
    weight-only scores, computed once per load by a caller that has them (then not computed again here)."""
    model.check_complete()
    p, token_range = check_protocol(model, protocol or HeadProtocol())
    show = check_heads(model, show) if show is not None else None  # a zip is read once, here
    cfg = model.cfg
    dev = model_device(model)
    g = torch.Generator().manual_seed(p.seed)
    say = progress or (lambda msg: None)
    timer = Timer("heads")

    say("folded weights")
    with timer.section("folding"):  # the heads alone: no second copy of the MLPs, W_Q, W_K, W_V folded when read
        view = analysis_weights(model, mlp=False, per_layer=True) if readings is None else readings.view
    say("OV circuits")
    with timer.section("ov_circuits"):  # first, so that the embedding is freed before any activation is made
        eigen = ov_eigen_positivity(view) if readings is None else readings.eigen
    view = replace(view, W_E=None)  # (a LayerNorm model's centred copy: 206 MB for Pythia-410m)
    say("repeated random tokens")
    with timer.section("repeated_tokens"):
        tokens = repeated_tokens(model, p.n, p.batch, 2, g, token_range).to(dev)
        sp = score_pass(model, tokens, p.n, view)
        loss, scores = sp.loss, sp.scores
    view = replace(view, W_U=None)  # the composition reads the heads alone: free the vocabulary-long copy
    say("prefix matching")
    with timer.section("prefix_matching"):
        ptoks = repeated_tokens(model, p.prefix_n, p.prefix_batch, p.prefix_repeats, g, token_range)
        scores |= attention_scores(model, ptoks, {"prefix_matching": prefix_mask(ptoks, 1 + p.prefix_n)})
    with timer.section("real_text"):
        if text_tokens is not None:
            say("previous-token heads on real text")
            text_mask = previous_token_mask(text_tokens.shape[1])
            scores |= attention_scores(model, text_tokens, {"previous_token_text": text_mask})
        else:
            scores["previous_token_text"] = np.full((cfg.n_layers, cfg.n_heads), np.nan)
    scores["ov_eigen_positivity"] = eigen

    labels = classify(scores, p.thresholds)  # from the attention and copying scores, not the ablations
    say("composition")
    with timer.section("composition"):
        composition = all_composition(view, seed=p.seed, top_n=20, scores=readings and readings.composition)
    del view  # the folded weights are done with: the ablations below reuse their memory
    kv_groups = cfg.n_heads // cfg.kv_heads
    tests = path_tests(labels, composition, kv_groups, p.path_candidates)
    by_induction = [divmod(int(i), cfg.n_heads) for i in np.argsort(-scores["induction"].flatten())]
    say("per-head ablations (attribution patching)")
    with timer.section("per_head_ablation"):
        cap = HA.capture(model, tokens, p.n)
        estimates = {kind: HA.estimate(cap, kind) for kind in HA.KINDS}
        cap = replace(cap, grad=None)  # read by the estimates only: one activation-sized tensor per layer freed
    say("path patching")
    with timer.section("path_patching"):
        patches = induction_edges(model, cap, tokens, p.n, tests, induction_mask(tokens.shape[1], p.n))
    with timer.section("per_head_ablation"):
        top, rnd = (p.exact_top, p.exact_random) if p.per_head_ablation else (0, 0)
        always = by_induction[: p.top_k] if p.per_head_ablation else []
        if p.per_head_ablation:
            named = named_heads(labels, tests, by_induction[:TABLE_ROWS], kv_groups)
            say("per-head ablations (exact: the labelled heads, path-patching heads, table rows, largest estimates)")
        else:  # lm circuits: only the confirmed edges' sources, whose totals its sentences cite
            named = sorted({pp.source for pp in patches if any(pp.confirmed)}) if p.exact_path_sources else []
            if named:
                say(f"exact ablations of the {len(named)} confirmed path sources")
        ablation = HA.ablate_heads(model, cap, tokens, p.n, top, rnd, g, always=always, named=named,
                                   estimates=estimates)  # fmt: skip
        for kind, a in ablation.items():
            scores[ABLATION_SCORES[kind]] = a.best()
    say("top-k ablation")
    with timer.section("top_k_ablation"):
        top_k = _top_k(model, cap, tokens, p.n, scores, p.top_k, p.random_draws, g)

    with timer.section("examples"):
        by_previous = [divmod(int(i), cfg.n_heads) for i in np.argsort(-scores["previous_token"].flatten())]
        chosen = list(dict.fromkeys(list(show or []) + by_induction[:3] + by_previous[:2]))  # heads in the viewer
        examples = {
            "heads": [f"{layer}.{h}" for layer, h in chosen],
            "repeated": {"tokens": tokens[0].tolist(), "patterns": capture_patterns(model, tokens, chosen)},
        }
        if text_tokens is not None:
            examples["text"] = {"tokens": text_tokens[0].tolist(),
                                "patterns": capture_patterns(model, text_tokens, chosen)}  # fmt: skip
    n = p.n
    return HeadsResult(
        model=name or cfg.name,
        protocol=p.to_dict() | {"token_range": list(token_range)},
        scores=scores,
        labels=labels,
        loss_per_position=loss.tolist(),
        loss_first_half=float(loss[1:n].mean()),
        loss_second_half=float(loss[n + 1 : 2 * n].mean()),
        top_k_ablation=top_k,
        ablation=ablation,
        composition=composition,
        path_patches=tuple(patches),
        circuit_rows=circuit_rows(scores, labels, composition, patches, kv_groups, p.batch),
        criterion=Criterion(),
        kv_groups=kv_groups,
        seconds=dict(timer.seconds),
        examples=examples,
    )
