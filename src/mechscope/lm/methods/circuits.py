"""The Mathematical Framework toolkit on one model: every weight-based reading, and the causal
ones where the checkpoint can run.

:func:`read_circuits` runs, on the folded analysis view: Q/K/V composition of every pair of
heads (with the random baseline), OV eigenvalue positivity, the positional QK pattern of every
head (learned positions), copying tables and query→key token pairs for chosen heads; and, when
the model can run a forward pass, direct logit attribution and the logit lens on a prompt and
the induction circuit with path patching (:func:`~mechscope.lm.methods.heads.find_induction_heads`
without the per-head exact ablations, except each confirmed edge's source, measured alone). Toy models get
the bigram table of the direct path and, with one layer, skip-trigrams. What a checkpoint cannot support (a
partial checkpoint has no token embedding; rotary models have no learned positions) is recorded with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from mechscope.core.errors import MechscopeError
from mechscope.core.results import Result, Saved, figure_data, saved
from mechscope.core.torch_utils import Timer
from mechscope.lm.methods import weights_circuits as FW
from mechscope.lm.methods.composition import CompositionResult, all_composition
from mechscope.lm.methods.direct import DirectLogitAttribution, LogitLens, direct_logit_attribution, logit_lens
from mechscope.lm.methods.heads import HeadProtocol, HeadsResult, WeightReadings, find_induction_heads
from mechscope.lm.models.folding import AnalysisWeights
from mechscope.lm.models.transformer import HookedTransformer


@dataclass(frozen=True)
class CircuitsResult(Result):
    """The Mathematical Framework toolkit's readings of one model; ``to_dict()`` is circuits.json.

    ``decoder`` (token id -> text) and ``prompt_text`` are for writing and showing it; they are not in the JSON.
    After ``load``, the parts saved as decoded text (OV copying, QK pairs, logit attribution, logit lens,
    positional QK, bigrams, skip-trigrams, the induction circuit) are :class:`~mechscope.core.results.Saved`.
    """

    SCHEMA = "mechscope.circuits/1"
    FILE = "circuits.json"

    model: str
    view: str  # what the analysis view folds
    composition: CompositionResult
    heads: tuple[tuple[int, int], ...]  # heads read out in detail
    eigen_positivity: np.ndarray | None = None  # [L, H]
    positional: FW.PositionalQK | Saved | None = None
    ov: FW.OVCopying | Saved | None = None
    qk: FW.QKPairs | Saved | None = None
    dla: DirectLogitAttribution | Saved | None = None
    lens: LogitLens | Saved | None = None
    induction: HeadsResult | Saved | None = None
    bigrams: FW.Bigrams | Saved | None = None
    skip_trigrams: FW.SkipTrigrams | Saved | None = None
    unavailable: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    work: dict | None = None  # forward and backward passes made (WorkCounter.summary), when the model could run
    decoder: Callable[[int], str] | None = figure_data()
    prompt_text: tuple[str, ...] | None = figure_data()

    def to_dict(self) -> dict:
        decode = self.decoder

        def opt(x, *args):
            return None if x is None else x.to_dict(*args)

        return {
            "schema": self.SCHEMA,
            "model": self.model,
            "analysis_view": self.view,
            "heads": [f"{layer}.{h}" for layer, h in self.heads],
            "composition": self.composition.to_dict(),
            "ov_eigen_positivity": None if self.eigen_positivity is None else self.eigen_positivity.round(5).tolist(),
            "positional_qk": opt(self.positional),
            "ov_copying": opt(self.ov, decode),
            "qk_token_pairs": opt(self.qk, decode),
            "direct_logit_attribution": opt(self.dla, decode),
            "logit_lens": opt(self.lens, decode),
            "induction_circuit": self._induction_dict(),
            "bigrams": opt(self.bigrams, decode),
            "skip_trigrams": opt(self.skip_trigrams, decode),
            "unavailable": self.unavailable,
            "seconds": self.seconds,
            "work": self.work,
        }

    def _induction_dict(self) -> dict | None:
        r = self.induction
        if r is None or isinstance(r, Saved):
            return None if r is None else r.data
        return {
            "circuit": r.circuit(),
            "edges": r.edges(),
            "criterion": r.criterion.to_dict(),
            "induction_heads": r.ranked("induction", "induction"),
            "previous_token_heads": r.ranked("previous_token", "previous_token"),
            "thresholds": r.protocol["thresholds"],
            "prefix_matching_heads": _prefix_matching_rows(r),
            "ablation": r.ablation["mean"].to_dict(),  # the confirmed edges' sources, mean-ablated alone (measured)
        }

    @classmethod
    def from_dict(cls, d: dict) -> CircuitsResult:
        eigen = d.get("ov_eigen_positivity")
        return cls(
            d["model"], d["analysis_view"], CompositionResult.from_dict(d["composition"]),
            tuple(tuple(int(x) for x in h.split(".")) for h in d["heads"]),
            None if eigen is None else np.array(eigen, dtype=float), saved(d.get("positional_qk")),
            saved(d.get("ov_copying")), saved(d.get("qk_token_pairs")), saved(d.get("direct_logit_attribution")),
            saved(d.get("logit_lens")), saved(d.get("induction_circuit")), saved(d.get("bigrams")),
            saved(d.get("skip_trigrams")), dict(d.get("unavailable") or {}), dict(d.get("seconds") or {}),
            d.get("work"),
        )  # fmt: skip


def _prefix_matching_rows(r: HeadsResult) -> list[dict]:
    """Every head at or above the prefix-matching threshold with the scores its label rests on (the summary's
    numbers), highest prefix-matching score first."""
    s = r.scores
    pm = np.asarray(s["prefix_matching"], dtype=float)
    eig = s.get("ov_eigen_positivity")
    rows = [
        {"head": f"{layer}.{h}", "label": r.labels[layer][h], "prefix_matching": float(pm[layer, h]),
         "copying": float(s["copying"][layer, h]),
         "ov_eigen_positivity": None if eig is None or not np.isfinite(eig[layer, h]) else float(eig[layer, h])}
        for layer, h in zip(*np.nonzero(pm >= r.protocol["thresholds"]["induction"]), strict=True)
    ]  # fmt: skip
    return sorted(rows, key=lambda row: -row["prefix_matching"])


CLASSES = "the model's outputs are classes of their own, not its input tokens: a compiled tracr model"


def default_heads(composition: CompositionResult, induction: HeadsResult | None, eigen: np.ndarray | None,
                  k: int = 6) -> list[tuple[int, int]]:  # fmt: skip
    """Heads worth reading out when the user names none: the induction circuit's heads when it ran,
    else the strongest K-composition targets and their sources, then the strongest copiers."""
    picks: list[tuple[int, int]] = []
    if induction is not None:
        picks += [(r["layer"], r["head"]) for r in induction.ranked("induction", "induction")[:3]]
        picks += [(r["layer"], r["head"]) for r in induction.ranked("previous_token", "previous_token")[:2]]
    for r in composition.top_pairs("K", 6):
        for name in (r["target"], r["source"]):
            layer, h = map(int, name.split("."))
            picks.append((layer, h))
    if eigen is not None:
        order = np.argsort(-eigen.ravel())[:2]
        picks += [divmod(int(i), eigen.shape[1]) for i in order]
    return list(dict.fromkeys(picks))[:k]


def read_circuits(
    model: HookedTransformer,
    view: AnalysisWeights,
    name: str,
    heads: list[tuple[int, int]] | None = None,
    prompt: torch.Tensor | None = None,
    protocol: HeadProtocol | None = None,
    token_range: tuple[int, int] | None = None,
    progress=None,
    decoder: Callable[[int], str] | None = None,
    prompt_text: list[str] | None = None,
) -> CircuitsResult:
    """Every reading the checkpoint supports (see the module docstring). ``decoder`` turns token ids into the
    text circuits.json and the report show (default: the ids as numbers)."""
    say = progress or (lambda msg: None)
    timer = Timer("circuits")
    gaps: dict[str, str] = {}
    got: dict = {}
    say("composition")
    with timer.section("composition"):
        composition = all_composition(view, top_n=30)
    classes = model.cfg.d_vocab_out is not None  # logits over output classes, not the input tokens (tracr)
    has_embed = view.W_E is not None and view.W_U is not None and not classes
    if has_embed:
        with timer.section("eigen_positivity"):
            got["eigen_positivity"] = FW.ov_eigen_positivity(view)
    else:
        why = CLASSES if classes else "needs the token embedding"
        gaps["ov_eigen_positivity"] = gaps["ov_copying"] = gaps["qk_token_pairs"] = gaps["bigrams"] = why
        gaps["skip_trigrams"] = why
    if view.W_pos is not None:
        say("positional QK")
        with timer.section("positional_qk"):
            got["positional"] = FW.positional_qk(view)
    else:
        gaps["positional_qk"] = f"the model has {model.cfg.positional} positions, not learned ones"
    if not model.missing_weights:
        if classes:
            gaps["induction_circuit"] = f"measures next-token loss on repeated tokens; {CLASSES}"
        else:
            say("induction circuit (path patching)")
            readings = _readings(view, got.get("eigen_positivity"), composition.scores)
            got["induction"] = _induction(model, protocol, timer, gaps, readings)
        if prompt is not None:
            say("direct logit attribution and logit lens")
            with timer.section("direct_logit_attribution"):
                got["dla"] = direct_logit_attribution(model, view, prompt)
            with timer.section("logit_lens"):
                got["lens"] = logit_lens(model, prompt)
    else:
        reason = "needs a forward pass, which a partial checkpoint cannot run"
        for key in ("direct_logit_attribution", "logit_lens", "induction_circuit"):
            gaps[key] = reason
    heads = heads or default_heads(composition, got.get("induction"), got.get("eigen_positivity"))
    if has_embed and heads:
        say("OV and QK circuits as tokens")
        with timer.section("ov_copying"):
            got["ov"] = FW.ov_copying(view, heads, token_range=token_range)
        with timer.section("qk_token_pairs"):
            got["qk"] = FW.qk_token_pairs(view, heads, token_range=token_range)
    if has_embed:
        got |= _tables(view, gaps)
    return CircuitsResult(name, view.describe(), composition, tuple(heads), unavailable=gaps,
                          seconds=dict(timer.seconds), decoder=decoder,
                          prompt_text=None if prompt_text is None else tuple(prompt_text), **got)  # fmt: skip


def _tables(view: AnalysisWeights, gaps: dict) -> dict:
    """The token-by-token tables of a toy vocabulary: bigrams of the direct path, and skip-trigrams of one layer."""
    if view.cfg.d_vocab > FW.MAX_TABLE_VOCAB:
        gaps["bigrams"] = gaps["skip_trigrams"] = "token-by-token tables are for small (toy) vocabularies"
        return {}
    got = {"bigrams": FW.bigrams(view)}
    if view.cfg.n_layers == 1:
        got["skip_trigrams"] = FW.skip_trigrams(view)
    else:
        gaps["skip_trigrams"] = "read out for one-layer models only (deeper heads compose)"
    return got


def _readings(view: AnalysisWeights, eigen: np.ndarray | None, scores: dict) -> WeightReadings | None:
    """The weight-only scores the induction protocol reads too, computed once: shared where ``view`` is the one
    the protocol folds itself (every option on) and the eigenvalues could be read."""
    folded = view.fold_ln and view.center_writing and view.center_unembed and view.fold_value_biases
    return WeightReadings(view, eigen, scores) if folded and eigen is not None else None


def induction_protocol(model) -> HeadProtocol:
    """The protocol ``lm circuits`` reads the induction circuit with by default: ``lm heads``' without the exact
    per-head ablations (but with each confirmed edge's source measured alone, the total its sentence cites), its
    sequences shortened to fit the model's context."""
    n_ctx = model.cfg.n_ctx
    n = min(50, (n_ctx - 1) // 2)
    return HeadProtocol(n=n, prefix_n=max(1, min(25, (n_ctx - 1) // 4)), per_head_ablation=False,
                        exact_path_sources=True)  # fmt: skip


def _induction(model, protocol, timer: Timer, gaps, readings: WeightReadings | None = None) -> HeadsResult | None:
    """The induction circuit with path patching; of the exact per-head ablations only the confirmed edges'
    sources (the rest is ``lm heads``)."""
    protocol = protocol or induction_protocol(model)
    if model.cfg.n_layers < 2:
        gaps["induction_circuit"] = "a one-layer model has no earlier head to compose with"
        return None
    try:
        with timer.section("induction_circuit"):
            return find_induction_heads(model, protocol, readings=readings)
    except MechscopeError as e:
        gaps["induction_circuit"] = str(e)
        return None
