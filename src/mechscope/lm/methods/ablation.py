"""Ablating attention heads: exactly, and estimated for every head by attribution patching.

A head is ablated by replacing its output ``z`` (``blocks.L.attn.hook_z``, [B, P, H, Dh]) and
measuring the change in the model's loss on the second copy of repeated random tokens:

* **mean-ablation** (the standard of ARENA 1.2): each position's z becomes the mean of that
  position's z over the batch of protocol sequences. Not a mean pooled over positions: BOS and
  the first copy behave differently from the second, and pooling them inflates some heads
  several times.
* **zero-ablation**: z becomes 0 (often off-distribution; shown for comparison).
* **resample-ablation**: z becomes the head's z on another sequence of the batch at the same
  position (sequence b takes sequence b − 1's, sequence 0 the last one's), which keeps it on the data.

Every number is per sequence, then averaged, with its spread.

Exact ablation of every head in a large model is slow (heads × kinds × sequences forward
passes). **Attribution patching** (Syed, Rager and Conmy 2023; Nanda 2023) estimates all of them
at once to first order: with g = ∂loss/∂z from one backward pass,
``Δloss ≈ Σ_{p,d} (z_replaced − z) · g``. The analysis measures exactly the heads the estimate
ranks highest and a seeded random sample of the rest, and reports how well estimate and exact
agree on those, so the reader can judge the estimate on the other heads.

All interventions go through :func:`mechscope.core.intervene.intervene` on a cached residual
stream, so each recomputes only the layers at and after the ablated head.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mechscope.core.hooks import hooks
from mechscope.core.intervene import intervene
from mechscope.core.results import Result, figure_data
from mechscope.core.stats import sample_sd, spearman
from mechscope.lm.methods.scores import sequences_per_chunk, token_losses
from mechscope.lm.models.transformer import HookedTransformer

KINDS = ("mean", "zero", "resample")
SETS_PER_RUN = 2  # interventions stacked into one forward pass: memory bounded whatever their number


def second_half(n: int) -> slice:
    """The positions whose next token is predictable inside the second copy: p predicts p + 1, both in copy 2."""
    return slice(n + 1, 2 * n)


def second_half_loss(model: HookedTransformer, resid_final: torch.Tensor, tokens: torch.Tensor, n: int):
    """Mean loss over the predictions inside the second copy, per sequence: [B] (float32). The logits are made a
    few sequences at a time (:func:`~mechscope.lm.methods.scores.token_losses`) unless a gradient is wanted."""
    return token_losses(model, resid_final, tokens, second_half(n)).mean(1)


def replacement(kind: str, z: torch.Tensor) -> torch.Tensor | float:
    """What replaces z [B, P, H, Dh] under each ablation kind."""
    if kind == "mean":
        return z.mean(0)  # [P, H, Dh]: each position's mean over the batch
    if kind == "zero":
        return 0.0
    return z.roll(1, dims=0)  # resample: sequence b takes sequence b-1's value (never its own for B > 1)


@dataclass(frozen=True)
class Capture:
    """One forward and backward over the protocol sequences: what every ablation needs."""

    resid_pre: list[torch.Tensor]  # per layer [B, P, D]
    z: list[torch.Tensor]  # per layer [B, P, H, Dh]
    grad: list[torch.Tensor] | None  # per layer ∂(Σ_b second-half loss_b)/∂z (None once the estimates are made)
    clean: torch.Tensor  # [B] second-half loss


def capture(model: HookedTransformer, tokens: torch.Tensor, n: int) -> Capture:
    """Residual streams, head outputs and their gradients: one forward pass without a graph, then the backward pass
    layer by layer from the last, each layer recomputed from its cached input (activation checkpointing). Memory
    holds one layer's graph at a time instead of all of them; the gradients are the same as one backward through
    the whole model (z is a leaf in both: gradients stop there)."""
    L = model.cfg.n_layers
    resid: list = [None] * L

    def keep_resid(layer):
        def hook(x, hp):
            resid[layer] = x.detach()

        return hook

    with torch.no_grad(), hooks(model, fwd=[(f"blocks.{i}.hook_resid_pre", keep_resid(i)) for i in range(L)]):
        final = model.run_blocks(model.embed(tokens))
    zs: list = [None] * L
    grads: list = [None] * L
    rotary = model.rotary(tokens.shape[1], final.device)
    loss, g = final_gradient(model, final, tokens, n)
    with torch.enable_grad():
        for layer in reversed(range(L)):
            x = resid[layer].detach().requires_grad_(True)
            with hooks(model, fwd=[(f"blocks.{layer}.attn.hook_z", _leaf(zs, layer))]):
                out = model.blocks[layer](x, rotary)
            grads[layer], g = torch.autograd.grad(out, [zs[layer], x], grad_outputs=g)
    return Capture(resid, [z.detach() for z in zs], [g.detach() for g in grads], loss.detach())


def final_gradient(model: HookedTransformer, final: torch.Tensor, tokens: torch.Tensor, n: int):
    """second_half_loss [B] and its gradient at the final residual stream [B, P, D], one backward per chunk of a
    few sequences (:func:`~mechscope.lm.methods.scores.sequences_per_chunk`, with the backward's four logits-sized
    tensors counted): each sequence's loss reads only its own rows, so the gradient is the whole batch's, bit for bit
    under MKL's strict mode (a test checks), and the logits are never whole (with a 50k vocabulary they and their
    gradients were the peak of ``lm heads`` on small models)."""
    per = sequences_per_chunk(model, second_half(n), tokens.shape[1], tensors=4)  # logits, log-softmax, 2 gradients
    losses, grads = [], []
    with torch.enable_grad():
        for i in range(0, final.shape[0], per):
            x = final[i : i + per].detach().requires_grad_(True)
            loss = second_half_loss(model, x, tokens[i : i + per], n)
            grads.append(torch.autograd.grad(loss.sum(), x)[0])
            losses.append(loss.detach())
    return torch.cat(losses), torch.cat(grads)


def _leaf(zs: list, layer: int):
    def hook(z, hp):
        z = z.detach().requires_grad_(True)  # gradients stop here: only ∂loss/∂z is computed
        zs[layer] = z
        return z

    return hook


def estimate(cap: Capture, kind: str) -> np.ndarray:
    """Attribution-patching estimate of each head's loss increase per sequence: [L, H, B]."""
    out = []
    for z, g in zip(cap.z, cap.grad, strict=True):
        delta = (torch.as_tensor(replacement(kind, z), dtype=z.dtype) - z).float()  # broadcasts to [B, P, H, Dh]
        out.append(torch.einsum("bphd,bphd->hb", delta, g.float()))
    return torch.stack(out).cpu().numpy()


def head_masks(shape: tuple[int, ...], heads: list[int]) -> torch.Tensor:
    """One mask per head over z's per-sequence shape [P, H, Dh]: [N, P, H, Dh]."""
    masks = torch.zeros(len(heads), *shape, dtype=torch.bool)
    for i, h in enumerate(heads):
        masks[i, :, h] = True
    return masks


@torch.no_grad()
def exact(
    model: HookedTransformer, cap: Capture, tokens: torch.Tensor, n: int, layer: int, heads: list[int], kind: str
) -> np.ndarray:
    """Measured loss increase of ablating each head of ``layer`` alone, per sequence: [len(heads), B]."""
    z = cap.z[layer]
    b = z.shape[0]
    masks = head_masks(tuple(z.shape[1:]), heads).to(z.device)
    rep = replacement(kind, z)

    def loss(out):  # [k, B, P, D] final residuals -> [k, B]
        k = out.shape[0]
        return second_half_loss(model, out.flatten(0, 1), tokens.repeat(k, 1), n).view(k, b)

    ablated = intervene(
        model,
        cap.resid_pre[layer],
        f"blocks.{layer}.attn.hook_z",
        masks,
        rep,
        reduce=loss,
        batch_size=SETS_PER_RUN * b,
        forward=lambda x: model.run_blocks(x, layer),
    )
    return (ablated - cap.clean[None]).cpu().numpy()


@torch.no_grad()
def group_losses(model: HookedTransformer, cap: Capture, tokens: torch.Tensor, n: int, heads, kind: str = "mean"):
    """Second-half loss per sequence [B] with all ``heads`` [(layer, head)] ablated together."""
    by_layer: dict[int, list[int]] = {}
    for layer, h in heads:
        by_layer.setdefault(layer, []).append(h)

    def make(layer):
        rep = replacement(kind, cap.z[layer])

        def hook(z, hp):
            z = z.clone()
            for h in by_layer[layer]:  # rep is [P, H, Dh] (mean), [B, P, H, Dh] (resample) or 0
                z[:, :, h] = rep[..., h, :] if isinstance(rep, torch.Tensor) else rep
            return z

        return hook

    start = min(by_layer)
    fwd = [(f"blocks.{layer}.attn.hook_z", make(layer)) for layer in by_layer]
    with hooks(model, fwd=fwd):
        final = model.run_blocks(cap.resid_pre[start], start)
    return second_half_loss(model, final, tokens, n)


def group(model: HookedTransformer, cap: Capture, tokens: torch.Tensor, n: int, heads, kind: str = "mean") -> float:
    """Mean loss increase with all ``heads`` [(layer, head)] ablated together."""
    return float((group_losses(model, cap, tokens, n, heads, kind) - cap.clean).mean())


@dataclass(frozen=True)
class HeadAblation(Result):
    """Per-head ablation effects under one kind: the estimate for every head, the measurement for some.

    Second-half loss increases (nats): ``estimate_mean``/``estimate_std`` [L, H] over the protocol sequences,
    ``exact_mean``/``exact_std`` {(layer, head): float} for the heads measured exactly; the per-sequence values
    (``estimate`` [L, H, B], ``exact`` {(layer, head): [B]}) are kept in memory, not in the JSON.
    """

    kind: str
    estimate_mean: np.ndarray
    estimate_std: np.ndarray
    exact_mean: dict[tuple[int, int], float]
    exact_std: dict[tuple[int, int], float]
    measured_estimate: dict[tuple[int, int], float]  # the estimate's mean over sequences on the measured heads
    estimate: np.ndarray | None = figure_data()
    exact: dict | None = figure_data()

    @classmethod
    def measured(cls, kind: str, estimate: np.ndarray, exact: dict[tuple[int, int], np.ndarray]) -> HeadAblation:
        """From the per-sequence estimate [L, H, B] and measurements {(layer, head): [B]}."""
        return cls(
            kind, estimate.mean(-1), sample_sd(estimate).astype(estimate.dtype),
            {lh: float(np.mean(v)) for lh, v in exact.items()},
            {lh: float(sample_sd(v)) for lh, v in exact.items()}, {lh: float(estimate[lh].mean()) for lh in exact},
            estimate, exact,
        )  # fmt: skip

    def best(self) -> np.ndarray:
        """[L, H] mean over sequences: measured where measured, the estimate elsewhere."""
        out = self.estimate_mean.copy()
        for (layer, h), v in self.exact_mean.items():
            out[layer, h] = v
        return out

    def spread(self) -> np.ndarray:
        """[L, H] standard deviation over sequences (of the measurement where there is one)."""
        out = self.estimate_std.copy()
        for (layer, h), v in self.exact_std.items():
            out[layer, h] = v
        return out

    def measured_mask(self) -> np.ndarray:
        """[L, H] True where the head was measured exactly (its value in :meth:`best` is not an estimate)."""
        mask = np.zeros(np.shape(self.estimate_mean), dtype=bool)
        for lh in self.exact_mean:
            mask[lh] = True
        return mask

    def errors(self) -> dict[tuple[int, int], float]:
        """Estimate − measurement (nats) on each head measured both ways."""
        return {lh: self.measured_estimate[lh] - v for lh, v in sorted(self.exact_mean.items())}

    def agreement(self) -> dict:
        """How well the estimate predicts the measurement on the heads measured both ways."""
        if len(self.exact_mean) < 2:
            return {"heads": len(self.exact_mean)}
        keys = sorted(self.exact_mean)
        est = np.array([self.measured_estimate[lh] for lh in keys], dtype=np.float32)  # as measured: float32
        ex = np.array([self.exact_mean[lh] for lh in keys], dtype=np.float32)
        varied = est.std() > 0 and ex.std() > 0
        corr = float(np.corrcoef(est, ex)[0, 1]) if varied else None
        rho = float(spearman(torch.from_numpy(est)[None].double(), torch.from_numpy(ex)[None].double())[0])
        return {
            "heads": len(keys),
            "pearson": corr,
            "spearman": rho if varied else None,  # one head far off moves Pearson's r alone
            "max_abs_error": float(np.abs(est - ex).max()),
            "median_abs_error": float(np.median(np.abs(est - ex))),
            "median_abs_measured": float(np.median(np.abs(ex))),  # what an error of that size is against
        }

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "measured": [
                {
                    "head": f"{layer}.{h}",
                    "mean": self.exact_mean[(layer, h)],
                    "std": self.exact_std[(layer, h)],
                    "estimate": self.measured_estimate[(layer, h)],
                }
                for (layer, h) in sorted(self.exact_mean)
            ],
            "agreement": self.agreement(),
        }

    @classmethod
    def from_summary(cls, d: dict, best: np.ndarray, spread: np.ndarray) -> HeadAblation:
        """Rebuilt from heads.json: this kind's entry, and its rows of ``scores`` and ``score_spread`` [L, H]."""
        # float32, as the estimates were computed (heads.json's spread is rounded in float32)
        est_mean, est_std = np.array(best, dtype=np.float32), np.array(spread, dtype=np.float32)
        exact_mean, exact_std, measured_estimate = {}, {}, {}
        for row in d["measured"]:
            lh = tuple(int(x) for x in row["head"].split("."))
            exact_mean[lh], exact_std[lh] = float(row["mean"]), float(row["std"])
            measured_estimate[lh] = est_mean[lh] = float(row["estimate"])
            est_std[lh] = np.nan  # only the measurement's spread was saved
        return cls(d["kind"], est_mean, est_std, exact_mean, exact_std, measured_estimate)


@dataclass(frozen=True)
class HeadAblationResult(Result):
    """Loss on the second copy of repeated tokens with ``heads`` ablated together, against the clean model."""

    SCHEMA = "mechscope.head-ablation/1"

    heads: tuple[tuple[int, int], ...]
    kind: str
    clean_loss: float
    ablated_loss: float
    per_sequence: tuple[float, ...]  # loss increase per sequence

    @property
    def loss_increase(self) -> float:
        return self.ablated_loss - self.clean_loss


@torch.no_grad()
def ablate_together(model: HookedTransformer, tokens: torch.Tensor, heads, kind: str = "mean") -> HeadAblationResult:
    """Second-copy loss on repeated tokens [B, 1 + 2n] with ``heads`` [(layer, head)] ablated together (checked
    by the caller): the same intervention as :func:`group`, per sequence."""
    n = tokens.shape[1] // 2
    cap = capture(model, tokens, n)
    ablated = group_losses(model, cap, tokens, n, heads, kind)
    return HeadAblationResult(tuple(heads), kind, float(cap.clean.mean()), float(ablated.mean()),
                              tuple((ablated - cap.clean).cpu().tolist()))  # fmt: skip


def ablate_heads(
    model: HookedTransformer,
    cap: Capture,
    tokens: torch.Tensor,
    n: int,
    top: int,
    random: int,
    generator: torch.Generator,
    kinds: tuple[str, ...] = KINDS,
    always: list[tuple[int, int]] = (),
    named: list[tuple[int, int]] = (),
    estimates: dict[str, np.ndarray] | None = None,
) -> dict[str, HeadAblation]:
    """Estimate every head under each kind (or take ``estimates``, kind -> [L, H, B], from a capture whose
    gradients are freed); measure exactly the ``top`` heads by estimate (per kind), the heads in ``always`` and, for
    mean-ablation (the kind the report's sentences use), every head in ``named`` and a seeded sample of ``random``
    others.

    First-order estimates miss heads whose effect passes through a later head's saturated softmax (a
    previous-token head's does: its estimate can be ~0 where its exact cost is several nats), so every head
    a report names goes in ``named`` and is measured whatever the estimate says; the random sample then
    shows how the estimate does on the rest.
    """
    L, H = model.cfg.n_layers, model.cfg.n_heads
    out = {}
    for kind in kinds:
        est = estimate(cap, kind) if estimates is None else estimates[kind]
        mean = est.mean(-1).ravel()
        chosen = [divmod(int(i), H) for i in np.argsort(-np.abs(mean))[:top]]
        extra = [*always, *named] if kind == "mean" else list(always)
        chosen = list(dict.fromkeys(chosen + [tuple(lh) for lh in extra]))  # each head once, in order
        if kind == "mean" and random:
            rest = [i for i in torch.randperm(L * H, generator=generator).tolist() if divmod(i, H) not in chosen]
            chosen += [divmod(i, H) for i in rest[:random]]
        measured: dict[tuple[int, int], np.ndarray] = {}
        for layer in sorted({lh[0] for lh in chosen}):
            heads = [h for (lay, h) in chosen if lay == layer]
            for h, row in zip(heads, exact(model, cap, tokens, n, layer, heads, kind), strict=True):
                measured[(layer, h)] = row
        out[kind] = HeadAblation.measured(kind, est, measured)
    return out
