"""Path patching of the induction circuit: does head A feed head B's keys? (Causal, not a weight score.)

K-composition says how well an earlier head's output space lines up with what a later head's
keys read; it cannot say that the later head *uses* it. Path patching (Wang et al. 2022;
Goldowsky-Dill et al. 2023) answers that: ablate the source head's output (here: replace its
z by the per-position batch mean, as in :mod:`~mechscope.lm.methods.ablation`) **only on the
path into the target head's key input** — queries, values and every other head see the clean
residual stream — and measure the target's induction score and the model's second-half loss.
An edge "source → target" is drawn only where this moves the target's induction score by at
least ``min_drop`` and by at least ``min_share`` of its clean value.

Grouped-query models share one key/value head among several query heads (SmolLM2: three), so a
key-side patch hits the whole group at once: the test is per key/value head, and its effect is
reported for each query head of the group, as one piece of evidence.

Implementation: with the clean residual stream entering the target's layer cached, the source's
change of output ``Δ = (z_ablated − z) W_O`` is added to that stream, normalised by the target
layer's ``ln1`` and projected by the key weights of the target's key/value head only; a hook on
``hook_k`` puts those keys in place. Only the target's block runs to read its pattern (every
source of one target in one batch); the downstream layers run once more, for the confirmed
edges only, to measure their effect on the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import hooks
from mechscope.core.results import Result, figure_data
from mechscope.core.stats import sample_sd
from mechscope.core.validate import check_int, shown
from mechscope.lm.methods.ablation import SETS_PER_RUN, Capture, replacement, second_half_loss
from mechscope.lm.models.transformer import HookedTransformer


@dataclass(frozen=True)
class Criterion(Result):
    """When a key-side path patch confirms an edge: the target's induction score falls by at
    least ``min_drop`` and by at least ``min_share`` of its clean value (mean over sequences)."""

    min_drop: float = 0.05
    min_share: float = 0.20

    def confirms(self, clean: np.ndarray, patched: np.ndarray) -> tuple[bool, ...]:
        """Per query head, from induction scores [Hq, B] clean and patched."""
        drop, base = (clean - patched).mean(-1), clean.mean(-1)
        return tuple(bool(d >= self.min_drop and d >= self.min_share * c) for d, c in zip(drop, base, strict=True))

    def margins(self, pp: PathPatch, batch: int) -> tuple[float, ...]:
        """Per query head of a path patch: how far its drop lies from this criterion's threshold (the larger of
        ``min_drop`` and ``min_share`` × the clean score), in standard errors of the drop over ``batch`` sequences
        (sd / √batch); positive above the threshold. ±inf where the drop has no spread."""
        n, out = max(int(batch), 1), []
        for clean, drop, sd in zip(pp.induction_clean, pp.drop, pp.drop_std, strict=True):
            gap = drop - max(self.min_drop, self.min_share * clean)
            se = sd / np.sqrt(n)
            out.append(float(gap / se) if se > 0 else float(np.copysign(np.inf, gap)))
        return tuple(out)


@dataclass(frozen=True)
class PathPatch(Result):
    """One key-side path patch: a source head ablated on the path into one key/value head.

    Per query head of the group, means over the protocol sequences: the induction score clean and patched,
    its drop and the drop's spread; whether the edge is confirmed; and, for confirmed edges, the second-half
    loss change. The per-sequence values (``clean``, ``patched`` [Hq, B], ``loss_per_sequence`` [B]) stay in
    memory, not in the JSON.
    """

    source: tuple[int, int]
    layer: int
    kv_head: int
    query_heads: tuple[int, ...]
    induction_clean: tuple[float, ...]
    induction_patched: tuple[float, ...]
    drop: tuple[float, ...]
    drop_std: tuple[float, ...]
    confirmed: tuple[bool, ...]
    loss_increase: float | None = None  # mean second-half loss change (measured for confirmed edges)
    loss_increase_std: float | None = None
    clean: np.ndarray | None = figure_data()
    patched: np.ndarray | None = figure_data()
    loss_per_sequence: np.ndarray | None = figure_data()

    @classmethod
    def measured(cls, source, layer, kv_head, query_heads, clean, patched, confirmed, loss=None) -> PathPatch:
        """From the induction scores clean and patched [Hq, B] and the loss change [B] (or None)."""
        return cls(
            tuple(source), layer, kv_head, tuple(query_heads),
            tuple(float(x) for x in clean.mean(-1)), tuple(float(x) for x in patched.mean(-1)),
            tuple(float(x) for x in (clean - patched).mean(-1)), tuple(float(x) for x in sample_sd(clean - patched)),
            tuple(confirmed), None if loss is None else float(loss.mean()),
            None if loss is None else float(sample_sd(loss)),
            clean, patched, loss,
        )  # fmt: skip

    def to_dict(self) -> dict:
        d = {
            "source": f"{self.source[0]}.{self.source[1]}",
            "target_layer": self.layer,
            "kv_head": self.kv_head,
            "query_heads": [f"{self.layer}.{h}" for h in self.query_heads],
            "induction_clean": list(self.induction_clean),
            "induction_patched": list(self.induction_patched),
            "drop": list(self.drop),
            "drop_std": list(self.drop_std),
            "confirmed": list(self.confirmed),
        }
        if self.loss_increase is not None:
            d["loss_increase"] = self.loss_increase
            d["loss_increase_std"] = self.loss_increase_std
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PathPatch:
        src = tuple(int(x) for x in d["source"].split("."))  # "layer.head"
        if len(src) != 2:
            raise MechscopeError(f"source must be a head 'layer.head', got {shown(d['source'])}")
        heads = tuple(int(q.split(".")[1]) for q in d["query_heads"])
        layer, kv = check_int(d["target_layer"], "target_layer", 0), check_int(d["kv_head"], "kv_head", 0)
        return cls(src, layer, kv, heads, tuple(d["induction_clean"]),
                   tuple(d["induction_patched"]), tuple(d["drop"]), tuple(d["drop_std"]), tuple(d["confirmed"]),
                   d.get("loss_increase"), d.get("loss_increase_std"))  # fmt: skip


def per_sequence_score(pattern: torch.Tensor, target: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Attention mass on the target keys [P, K], averaged over the query positions ``queries`` [P] (one mask for
    every sequence: the divisor is its count) of pattern [B, H, P, K]: [B, H]."""
    if queries.dim() != 1:
        raise ValueError(f"queries is one mask [P] for every sequence, got shape {tuple(queries.shape)}")
    target, queries = target.to(pattern.device), queries.to(pattern.device)
    mass = (pattern.float() * target.float()).sum(-1)  # [B, H, P]
    w = queries.float()
    return (mass * w).sum(-1) / w.sum().clamp(min=1)


def _key_hook(keys: torch.Tensor, kv_head: int):
    """Replace one key/value head's keys [N, P, Dh] (before rotary)."""

    def hook(k, hp):
        k = k.clone()
        k[:, :, kv_head] = keys
        return k

    return hook


def _source_deltas(model, cap: Capture, sources: list[tuple[int, int]], kind: str) -> torch.Tensor:
    """Each source head's change of output when ablated: [S, B, P, D]."""
    out = []
    for ls, hs in sources:
        z = cap.z[ls]
        rep = replacement(kind, z)
        rep = rep[..., hs, :] if isinstance(rep, torch.Tensor) else torch.zeros_like(z[:, :, hs])
        out.append((rep - z[:, :, hs]) @ model.blocks[ls].attn.W_O[hs])
    return torch.stack(out)


@torch.no_grad()
def key_patch(
    model: HookedTransformer,
    cap: Capture,
    layer: int,
    kv_head: int,
    sources: list[tuple[int, int]],
    ind_mask: tuple[torch.Tensor, torch.Tensor],
    kind: str = "mean",
) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Induction scores of the group's query heads, clean [Hq, B] and with each source ablated on
    their key path [S, Hq, B] (the target's block run on SETS_PER_RUN sources' batches at a time); and the patched
    keys."""
    cfg = model.cfg
    groups = cfg.n_heads // cfg.kv_heads
    queries = list(range(kv_head * groups, (kv_head + 1) * groups))
    x = cap.resid_pre[layer]  # [B, P, D]
    b, p, d = x.shape
    block = model.blocks[layer]
    xs = x[None] + _source_deltas(model, cap, sources, kind)  # [S, B, P, D]
    k = block.attn.k(block.ln1(xs.reshape(-1, p, d)))  # [S·B, P, G·Dh]
    keys = k.view(-1, p, cfg.kv_heads, cfg.d_head)[:, :, kv_head]  # [S·B, P, Dh]
    scores = {}

    def grab(name):
        def hook(pattern, hp):
            scores[name] = per_sequence_score(pattern[:, queries], *ind_mask)  # [N, Hq]

        return hook

    rotary = model.rotary(p, x.device)
    pat = f"blocks.{layer}.attn.hook_pattern"
    with hooks(model, fwd=[(pat, grab("clean"))]):
        block(x, rotary)
    kv = f"blocks.{layer}.attn.hook_k"
    patched = []
    for part in keys.split(SETS_PER_RUN * b):  # memory does not grow with the number of sources
        with hooks(model, fwd=[(pat, grab("patched")), (kv, _key_hook(part, kv_head))]):
            block(x.repeat(part.shape[0] // b, 1, 1), rotary)
        patched.append(scores["patched"])
    clean = scores["clean"].T.cpu().numpy()  # [Hq, B]
    patched = torch.cat(patched).view(len(sources), b, len(queries)).permute(0, 2, 1).cpu().numpy()
    return clean, patched, keys


@torch.no_grad()
def loss_effect(
    model: HookedTransformer, cap: Capture, tokens: torch.Tensor, n: int, layer: int, kv_head: int, keys: torch.Tensor
) -> np.ndarray:
    """Second-half loss change [S, B] with each set of patched keys [S·B, P, Dh] in place, SETS_PER_RUN sets per run
    (as the exact head ablations batch), so memory does not grow with the number of sets."""
    x = cap.resid_pre[layer]
    b = x.shape[0]
    out = []
    for part in keys.split(SETS_PER_RUN * b):
        s = part.shape[0] // b
        with hooks(model, fwd=[(f"blocks.{layer}.attn.hook_k", _key_hook(part, kv_head))]):
            final = model.run_blocks(x.repeat(s, 1, 1), layer)
        out.append(second_half_loss(model, final, tokens.repeat(s, 1), n).view(s, -1))
    return (torch.cat(out) - cap.clean[None]).cpu().numpy()


def induction_edges(
    model: HookedTransformer,
    cap: Capture,
    tokens: torch.Tensor,
    n: int,
    tests: dict[tuple[int, int], list[tuple[int, int]]],
    ind_mask: tuple[torch.Tensor, torch.Tensor],
    criterion: Criterion | None = None,
) -> list[PathPatch]:
    """Run every test {(layer, kv_head): [source heads]}; measure the loss effect of confirmed edges."""
    criterion = criterion or Criterion()
    groups = model.cfg.n_heads // model.cfg.kv_heads
    out = []
    for (layer, g), sources in tests.items():
        queries = tuple(range(g * groups, (g + 1) * groups))
        clean, patched, keys = key_patch(model, cap, layer, g, sources, ind_mask)
        ok = [criterion.confirms(clean, pt) for pt in patched]
        chosen = [i for i, c in enumerate(ok) if any(c)]
        loss = {}
        if chosen:
            b = clean.shape[1]
            sel = torch.cat([keys[i * b : (i + 1) * b] for i in chosen])
            loss = dict(zip(chosen, loss_effect(model, cap, tokens, n, layer, g, sel), strict=True))
        for i, src in enumerate(sources):
            out.append(PathPatch.measured(src, layer, g, queries, clean, patched[i], ok[i], loss.get(i)))
    return out
