"""Q-, K- and V-composition between attention heads (Elhage et al. 2021, "A Mathematical Framework").

A head in an earlier layer writes into the residual stream through its OV circuit
``W_OV = W_V W_O``; a later head reads that stream three ways: into its queries and keys
through ``W_QK = W_Q W_Kᵀ``, and into its values through its own ``W_OV``. How much the
earlier head's output space lines up with what the later head reads is the composition score

    Q: ‖W_OV¹ W_QK²‖_F / (‖W_OV¹‖_F ‖W_QK²‖_F)
    K: ‖W_OV¹ W_QK²ᵀ‖_F / (…)          V: ‖W_OV¹ W_OV²‖_F / (…)

(TransformerLens' ``all_composition_scores`` uses the same definitions). Two random matrices
of these shapes already score about 1/√d_model, so Elhage et al. and ARENA 1.2 subtract a
random-matrix baseline; :func:`random_baseline` measures it for the model's shapes.

How it is computed. Every W_OV and W_QK is a d_model × d_model matrix of rank d_head, a
product A B with A [d_model, d_head] and B [d_head, d_model]. For any such product
‖A X‖_F = ‖(AᵀA)^½ X‖_F, so with the d_head × d_head Gram roots

    left  = (W_V¹ᵀ W_V¹)^½ W_O¹             [d_head, d_model]  per source head
    right = A² (B² B²ᵀ)^½                    [d_model, d_head]  per target head

the score of a pair is ‖left · right‖_F / (‖left‖_F ‖right‖_F): one matrix multiply per
target layer, [sources·d_head, d_model] × [d_model, 3·heads·d_head] for all three kinds at
once, gives every pair (about 9,500 pairs × 3 kinds for GPT-2 small in a few seconds on two
cores), and no d_model² matrix is ever formed. Gram roots in float64, products in float32,
whatever the model's dtype.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from mechscope.core.errors import MechscopeError
from mechscope.core.results import Result, figure_data
from mechscope.core.torch_utils import torch_threads
from mechscope.core.validate import check_int
from mechscope.lm.models.folding import AnalysisWeights, check_view

MODES = ("Q", "K", "V")


def sqrt_psd(G: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of batches of positive semi-definite matrices [..., n, n] (float64).

    The eigendecompositions run on one thread: the matrices are d_head-sized, a batch of 270 takes
    0.2 s so, and 6.6 s with two threads when anything else shares a 2-core machine (measured).
    """
    with torch_threads(1):
        lam, P = torch.linalg.eigh(G.double())
    return (P * lam.clamp(min=0).sqrt()[..., None, :]) @ P.transpose(-1, -2)


def gram_left(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """(AᵀA)^½ B for A [..., D, Dh], B [..., Dh, D]: same Frobenius products as A B from the left.

    The d_head-sized Gram matrix and its root in float64, the product with B in float32.
    """
    return left_root(A).float() @ B.float()


def gram_right(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """A (B Bᵀ)^½ for A [..., D, Dh], B [..., Dh, D]: same Frobenius products as A B from the right."""
    return A.float() @ right_root(B).float()


def left_root(A: torch.Tensor) -> torch.Tensor:
    """(AᵀA)^½ in float64 for A [..., D, Dh]: :func:`gram_left`'s root."""
    A = A.double()
    return sqrt_psd(A.transpose(-1, -2) @ A)


def right_root(B: torch.Tensor) -> torch.Tensor:
    """(B Bᵀ)^½ in float64 for B [..., Dh, D]: :func:`gram_right`'s root."""
    B = B.double()
    return sqrt_psd(B @ B.transpose(-1, -2))


def readers(w: AnalysisWeights, layer: int | None = None) -> dict[str, torch.Tensor]:
    """The reading side of every head for each kind: [L, H, D, Dh], or one layer's [H, D, Dh] (see the module
    docstring). One layer gives the same bits as its slice of all (a test checks), in 1/L of the memory."""
    at = slice(None) if layer is None else layer
    WQ, WK, WV, WO = w.W_Q[at], w.W_K[at], w.W_V[at], w.W_O[at]
    return {
        "Q": gram_right(WQ, WK.transpose(-1, -2)),  # W_QK = W_Q W_Kᵀ
        "K": gram_right(WK, WQ.transpose(-1, -2)),  # W_QKᵀ = W_K W_Qᵀ
        "V": gram_right(WV, WO),  # W_OV = W_V W_O
    }


PRODUCT_BYTES = 32 * 2**20  # one block of products [sources·d_head, modes·heads·d_head]: ~290 MB whole for Pythia-410m


def composition_scores(w: AnalysisWeights, modes: tuple[str, ...] = MODES) -> dict[str, torch.Tensor]:
    """Composition of every earlier head into every later head: mode -> [L_src, H_src, L_tgt, H_tgt].

    Zero where the source is not in an earlier layer (TransformerLens' layout).
    """
    check_view(w)
    for mode in modes:
        if mode not in MODES:
            raise MechscopeError(f"composition mode must be one of Q, K, V, got {mode!r}")
    L, H, D, Dh = w.W_V.shape
    src = torch.stack([gram_left(w.W_V[i], w.W_O[i]) for i in range(L)])  # [L, H, Dh, D]: a layer's bits as all's
    norm_src = torch.linalg.vector_norm(src, dim=(-1, -2))  # ‖W_OV¹‖_F [L, H]
    out = torch.zeros(len(modes), L, H, L, H)
    per = max(1, PRODUCT_BYTES // (H * Dh * len(modes) * H * Dh * 4))  # source layers per product
    for lt in range(1, L):
        tgt = readers(w, lt)  # one target layer's readers at a time
        norm_tgt = torch.stack([torch.linalg.vector_norm(tgt[m], dim=(-1, -2)) for m in modes])  # [M, H]
        b = torch.cat([tgt[m].permute(1, 0, 2).reshape(D, H * Dh) for m in modes], 1)  # [D, M·H·Dh]
        for l0 in range(0, lt, per):  # a few source layers at a time: the same rows, the same numbers
            l1 = min(lt, l0 + per)
            c = (src[l0:l1].reshape((l1 - l0) * H * Dh, D) @ b).view(l1 - l0, H, Dh, len(modes), H, Dh)
            num = torch.linalg.vector_norm(c, dim=(2, 5)).permute(2, 0, 1, 3)  # [M, l1 - l0, H_src, H_tgt]
            denom = norm_src[None, l0:l1, :, None] * norm_tgt[:, None, None, :]
            out[:, l0:l1, :, lt] = torch.where(denom > 0, num / denom.clamp(min=1e-30), torch.zeros(()))
    return dict(zip(modes, out, strict=True))


@dataclass(frozen=True)
class Baseline(Result):
    mean: float
    std: float
    samples: int
    seed: int


# Float64 factors drawn at a time: 16 samples for Pythia-1b's shapes, 128 for Pythia-410m's, all 200 for SmolLM2's.
# Blocks of 32 MiB or more come from fresh pages that glibc hands back when they are freed; smaller ones come from
# its heap, which may keep them (docs/development.md, "The composition baseline").
BASELINE_BLOCK_BYTES = 64 * 2**20


@functools.lru_cache(maxsize=16)  # depends only on the shapes and the seed, not on any weight
def random_baseline(d_model: int, d_head: int, samples: int = 200, seed: int = 0) -> Baseline:
    """Composition score of random matrices shaped like the model's (Gaussian factors, seeded).

    W_OV¹ = A¹ B¹ and W² = A² B² with A [d_model, d_head], B [d_head, d_model] independent; the
    score does not depend on the scale. About 1/√d_model for d_head ≪ d_model, with a small spread.

    Each factor of every sample is drawn in that order (A¹, B¹, A², B²), a block of samples at a time
    (:data:`BASELINE_BLOCK_BYTES`). Only the two d_head × d_head Gram roots are kept for every sample (float32):
    the generator's states at the start of B¹ and of A² are saved as their draws are skipped, and the last loop
    draws both again, a block at a time beside each other, to form each block's left and right factors. The four
    float64 draws were held at once before (4 × 839 MB for Pythia-1b's shapes), then the float32 left factors and
    A² (2 × 419 MB). The blocks are the same random numbers as one draw of each factor (a test checks the baseline
    bit for bit against the whole computation), which torch's CPU generator gives when every block holds a multiple
    of 16 numbers; otherwise each factor is drawn whole.
    """
    for name, v in (("d_model", d_model), ("d_head", d_head), ("samples", samples)):
        check_int(v, name, 1)  # d_model 0 was a ZeroDivisionError, samples 0 a baseline of NaN
    g = torch.Generator().manual_seed(seed)
    spans = _spans(samples, d_model * d_head)

    def factor(gen, *shape):  # one factor of every sample, block by block, in the order one whole draw makes them
        return (torch.randn(j - i, *shape, generator=gen, dtype=torch.float64) for i, j in spans)

    def rows(blocks):  # the blocks' results written into one tensor over the samples as they come
        out = None
        for (i, j), block in zip(spans, blocks, strict=True):
            out = block.new_empty((samples, *block.shape[1:])) if out is None else out
            out[i:j] = block
        return out

    def skipped(*shape):  # the generator's state where this factor's draws start; then past them
        state = g.get_state()
        for _ in factor(g, *shape):
            pass
        return torch.Generator().set_state(state)

    roots1 = rows(left_root(a).float() for a in factor(g, d_model, d_head))  # (A¹ᵀA¹)^½
    b1, a2 = skipped(d_head, d_model), skipped(d_model, d_head)
    roots2 = rows(right_root(b).float() for b in factor(g, d_head, d_model))  # (B²B²ᵀ)^½
    score = torch.empty(samples, dtype=torch.float32)
    blocks = zip(spans, factor(b1, d_head, d_model), factor(a2, d_model, d_head), strict=True)
    for (i, j), b, a in blocks:  # left = gram_left(A¹, B¹), right = gram_right(A², B²), a block at a time
        left = roots1[i:j] @ b.float()
        right = a.float() @ roots2[i:j]
        num = (left @ right).pow(2).sum((-1, -2)).sqrt()
        score[i:j] = num / (left.pow(2).sum((-1, -2)).sqrt() * right.pow(2).sum((-1, -2)).sqrt())
    score = score.numpy()
    return Baseline(mean=float(score.mean()), std=float(score.std()), samples=samples, seed=seed)


def _spans(samples: int, per_sample: int) -> list[tuple[int, int]]:
    """The samples [i, j) of each block of :func:`random_baseline`'s draws (``per_sample`` float64 numbers each):
    blocks of :data:`BASELINE_BLOCK_BYTES` where every block holds a multiple of 16 numbers (then the blocks draw
    what one whole draw does), else one block."""
    k = max(1, BASELINE_BLOCK_BYTES // (8 * per_sample))
    spans = [(i, min(i + k, samples)) for i in range(0, samples, k)]
    return spans if all((j - i) * per_sample % 16 == 0 for i, j in spans) else [(0, samples)]


DEFINITION = "‖W_OV¹ · W²‖_F / (‖W_OV¹‖_F ‖W²‖_F), W² = W_QK (Q), W_QKᵀ (K), W_OV (V); Elhage et al. 2021"


@dataclass(frozen=True)
class CompositionResult(Result):
    """Q/K/V composition of every head pair: the strongest pairs (saved) and every score (in memory).

    ``top``: mode -> the ``top_n`` strongest pairs with their score above the baseline (the JSON);
    ``scores``: mode -> [L, H, L, H] raw scores, 0 where the source is not earlier (not saved: after ``load``
    it is None, and :meth:`top_pairs` reads the saved pairs).
    """

    SCHEMA = "mechscope.composition/1"

    baseline: Baseline
    folded: bool
    top_n: int
    top: dict[str, list[dict]]
    scores: dict[str, np.ndarray] | None = figure_data()

    @classmethod
    def of(cls, scores: dict[str, np.ndarray], baseline: Baseline, folded: bool, top_n: int = 20):
        top = {m: _top_pairs(scores[m], baseline, top_n) for m in scores}
        return cls(baseline, folded, top_n, top, scores)

    def above_baseline(self, mode: str) -> np.ndarray:
        s = self.scores[mode]
        valid = self.valid_mask(s.shape)
        return np.where(valid, s - self.baseline.mean, 0.0)

    @staticmethod
    def valid_mask(shape) -> np.ndarray:
        L = shape[0]
        earlier = np.arange(L)[:, None] < np.arange(L)[None, :]
        return np.broadcast_to(earlier[:, None, :, None], shape)

    def top_pairs(self, mode: str, k: int = 20) -> list[dict]:
        if self.scores is None:
            return self.top[mode][:k]
        return _top_pairs(self.scores[mode], self.baseline, k)

    def into(self, mode: str, layer: int, head: int) -> np.ndarray:
        """Scores of every earlier head into one target: [layer, H]."""
        return self.scores[mode][:layer, :, layer, head]

    def to_dict(self) -> dict:
        return {
            "definition": DEFINITION,
            "folded_weights": self.folded,
            "baseline": self.baseline.to_dict(),
            "top_pairs": self.top,
        }

    @classmethod
    def from_dict(cls, d: dict) -> CompositionResult:
        top = {m: list(rows) for m, rows in d["top_pairs"].items()}
        return cls(Baseline(**d["baseline"]), bool(d["folded_weights"]), max((len(r) for r in top.values()), default=0),
                   top)  # fmt: skip


def _top_pairs(s: np.ndarray, baseline: Baseline, k: int) -> list[dict]:
    valid = CompositionResult.valid_mask(s.shape)
    flat = np.where(valid, s, -np.inf).ravel()
    order = np.argsort(-flat)[:k]
    rows = []
    for i in order:
        if not np.isfinite(flat[i]):
            break
        ls, hs, lt, ht = np.unravel_index(i, s.shape)
        rows.append(
            {
                "source": f"{ls}.{hs}",
                "target": f"{lt}.{ht}",
                "score": float(flat[i]),
                "above_baseline": float(flat[i] - baseline.mean),
                "z": float((flat[i] - baseline.mean) / baseline.std) if baseline.std > 0 else None,
            }
        )
    return rows


def all_composition(w: AnalysisWeights, baseline_samples: int = 200, seed: int = 0, top_n: int = 20,
                    scores: dict[str, np.ndarray] | None = None):  # fmt: skip
    """Q, K and V composition for every pair of heads in different layers, with the random baseline. ``scores``:
    :func:`composition_scores` of ``w`` as arrays, when they were computed already (once per load)."""
    check_view(w)
    check_int(top_n, "top_n", 0)
    scores = scores if scores is not None else {m: t.numpy() for m, t in composition_scores(w).items()}
    base = random_baseline(w.cfg.d_model, w.cfg.d_head, baseline_samples, seed)
    return CompositionResult.of(scores, base, w.fold_ln, top_n)
