"""The Mathematical Framework toolkit on one model: every weight-based reading, and the causal
ones where the checkpoint can run.

:func:`read_circuits` runs, on the folded analysis view: Q/K/V composition of every pair of
heads (with the random baseline), OV eigenvalue positivity, the positional QK pattern of every
head (learned positions), copying tables and query→key token pairs for chosen heads; and, when
the model can run a forward pass, direct logit attribution and the logit lens on a prompt and
the induction circuit with path patching (:func:`~mechscope.methods.heads.find_induction_heads`
without the per-head exact ablations). Toy models get the bigram table of the direct path and,
with one layer, skip-trigrams. What a checkpoint cannot support (a partial checkpoint has no
token embedding; rotary models have no learned positions) is recorded with the reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from mechscope.errors import MechscopeError
from mechscope.methods import framework as FW
from mechscope.methods.composition import CompositionResult, all_composition
from mechscope.methods.direct import DirectLogitAttribution, LogitLens, direct_logit_attribution, logit_lens
from mechscope.methods.heads import HeadProtocol, HeadsResult, find_induction_heads
from mechscope.models.folding import AnalysisWeights
from mechscope.models.transformer import HookedTransformer
from mechscope.results import Shown


@dataclass
class CircuitsResult(Shown):
    model: str
    view: str  # what the analysis view folds
    composition: CompositionResult
    heads: list[tuple[int, int]]  # heads read out in detail
    eigen_positivity: np.ndarray | None = None  # [L, H]
    positional: FW.PositionalQK | None = None
    ov: FW.OVCopying | None = None
    qk: FW.QKPairs | None = None
    dla: DirectLogitAttribution | None = None
    lens: LogitLens | None = None
    induction: HeadsResult | None = None
    bigrams: FW.Bigrams | None = None
    skip_trigrams: FW.SkipTrigrams | None = None
    unavailable: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self, decode: Callable[[int], str] | None = None) -> dict:
        def opt(x, *args):
            return None if x is None else x.to_dict(*args)

        return {
            "schema": "mechscope.circuits/1",
            "model": self.model,
            "analysis_view": self.view,
            "heads": [f"{layer}.{h}" for layer, h in self.heads],
            "composition": self.composition.to_dict(top=30),
            "ov_eigen_positivity": None if self.eigen_positivity is None else self.eigen_positivity.round(5).tolist(),
            "positional_qk": opt(self.positional),
            "ov_copying": opt(self.ov, decode),
            "qk_token_pairs": opt(self.qk, decode),
            "direct_logit_attribution": opt(self.dla, decode),
            "logit_lens": opt(self.lens, decode),
            "induction_circuit": None
            if self.induction is None
            else {
                "circuit": self.induction.circuit(),
                "edges": self.induction.edges(),
                "criterion": self.induction.criterion.to_dict(),
                "induction_heads": self.induction.ranked("induction", "induction"),
                "previous_token_heads": self.induction.ranked("previous_token", "previous_token"),
            },
            "bigrams": opt(self.bigrams, decode),
            "skip_trigrams": opt(self.skip_trigrams, decode),
            "unavailable": self.unavailable,
            "seconds": self.seconds,
        }


def default_heads(result: CircuitsResult, k: int = 6) -> list[tuple[int, int]]:
    """Heads worth reading out when the user names none: the induction circuit's heads when it ran,
    else the strongest K-composition targets and their sources, then the strongest copiers."""
    picks: list[tuple[int, int]] = []
    if result.induction is not None:
        picks += [(r["layer"], r["head"]) for r in result.induction.ranked("induction", "induction")[:3]]
        picks += [(r["layer"], r["head"]) for r in result.induction.ranked("previous_token", "previous_token")[:2]]
    for r in result.composition.top_pairs("K", 6):
        for name in (r["target"], r["source"]):
            layer, h = map(int, name.split("."))
            picks.append((layer, h))
    if result.eigen_positivity is not None:
        order = np.argsort(-result.eigen_positivity.ravel())[:2]
        picks += [divmod(int(i), result.eigen_positivity.shape[1]) for i in order]
    return list(dict.fromkeys(picks))[:k]


def _timed(seconds: dict, name: str, fn, *args, **kwargs):
    t = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        seconds[name] = time.perf_counter() - t


def read_circuits(
    model: HookedTransformer,
    view: AnalysisWeights,
    name: str,
    heads: list[tuple[int, int]] | None = None,
    prompt: torch.Tensor | None = None,
    protocol: HeadProtocol | None = None,
    token_range: tuple[int, int] | None = None,
    progress=None,
) -> CircuitsResult:
    """Every reading the checkpoint supports (see the module docstring)."""
    say = progress or (lambda msg: None)
    secs: dict[str, float] = {}
    say("composition")
    result = CircuitsResult(name, view.describe(), _timed(secs, "composition", all_composition, view), [])
    result.seconds = secs
    gaps = result.unavailable
    has_embed = view.W_E is not None and view.W_U is not None
    can_run = not model.missing_weights
    if has_embed:
        result.eigen_positivity = _timed(secs, "eigen_positivity", FW.ov_eigen_positivity, view)
    else:
        gaps["ov_eigen_positivity"] = gaps["ov_copying"] = gaps["qk_token_pairs"] = "needs the token embedding"
    if view.W_pos is not None:
        say("positional QK")
        result.positional = _timed(secs, "positional_qk", FW.positional_qk, view)
    else:
        gaps["positional_qk"] = f"the model has {model.cfg.positional} positions, not learned ones"
    if can_run:
        say("induction circuit (path patching)")
        result.induction = _induction(model, protocol, secs, gaps)
        if prompt is not None:
            say("direct logit attribution and logit lens")
            result.dla = _timed(secs, "direct_logit_attribution", direct_logit_attribution, model, view, prompt)
            result.lens = _timed(secs, "logit_lens", logit_lens, model, prompt)
    else:
        reason = "needs a forward pass, which a partial checkpoint cannot run"
        for key in ("direct_logit_attribution", "logit_lens", "induction_circuit"):
            gaps[key] = reason
    result.heads = heads or default_heads(result)
    if has_embed and result.heads:
        say("OV and QK circuits as tokens")
        result.ov = _timed(secs, "ov_copying", FW.ov_copying, view, result.heads, token_range=token_range)
        result.qk = _timed(secs, "qk_token_pairs", FW.qk_token_pairs, view, result.heads, token_range=token_range)
    if not has_embed:
        gaps["bigrams"] = gaps["skip_trigrams"] = "needs the token embedding"
    elif view.cfg.d_vocab > FW.MAX_TABLE_VOCAB:
        gaps["bigrams"] = gaps["skip_trigrams"] = "token-by-token tables are for small (toy) vocabularies"
    else:
        result.bigrams = FW.bigrams(view)
        if view.cfg.n_layers == 1:
            result.skip_trigrams = FW.skip_trigrams(view)
        else:
            gaps["skip_trigrams"] = "read out for one-layer models only (deeper heads compose)"
    return result


def _induction(model, protocol, secs, gaps) -> HeadsResult | None:
    """The induction circuit with path patching; no exact per-head ablations (that is ``lm heads``)."""
    n_ctx = model.cfg.n_ctx
    n = min(50, (n_ctx - 1) // 2)
    protocol = protocol or HeadProtocol(n=n, prefix_n=max(1, min(25, (n_ctx - 1) // 4)), per_head_ablation=False)
    if model.cfg.n_layers < 2:
        gaps["induction_circuit"] = "a one-layer model has no earlier head to compose with"
        return None
    try:
        return _timed(secs, "induction_circuit", find_induction_heads, model, protocol)
    except MechscopeError as e:
        gaps["induction_circuit"] = str(e)
        return None
