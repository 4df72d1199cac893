"""Reading attention heads' circuits as tokens (Elhage et al. 2021, "A Mathematical Framework").

Every function reads the folded analysis view (:mod:`mechscope.lm.models.folding`), so no score
depends on where a checkpoint keeps its norm gains or on a shift shared by every logit.

* **Full OV circuit** ``W_E W_V W_O W_U`` [V, V]: what a head writes to the logits when it
  attends to a token. Its *diagonal* is how much attending to token t raises t's own logit
  (copying); :func:`ov_copying` gives the diagonal for every token, the tokens each head copies
  most, and rank statistics (is t's own logit the top of its row?) on a seeded token sample.
  :func:`ov_eigen_positivity`: Σλ / Σ|λ| of the circuit's eigenvalues, 1 for a pure copier.
* **Full QK circuit** ``W_E W_Q W_Kᵀ W_Eᵀ``: which key tokens a query token attends to
  (:func:`qk_token_pairs`); **positional QK** ``W_pos W_Q W_Kᵀ W_posᵀ`` for learned positions
  (:func:`positional_qk`): where a head looks by position alone (a previous-token head's
  pattern sits on the first sub-diagonal).
* Toy attention-only models: the **direct path** ``W_E W_U`` is a bigram table
  (:func:`bigrams`), and in a 1-layer model each head's QK and OV circuits together give
  **skip-trigrams** "A … B → C" (:func:`skip_trigrams`).

Embeddings are passed through the reading layer's normalisation the way the model would see a
lone token (centred for LayerNorm, divided by its root mean square), so tokens compare on one
scale. Rows of W_U are centred over the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mechscope.core.errors import MechscopeError
from mechscope.core.validate import check_int
from mechscope.lm.methods.scores import check_heads, token_range_of
from mechscope.lm.models.folding import AnalysisWeights, check_view


def _need(view: AnalysisWeights, *names: str) -> None:
    check_view(view)
    missing = [n for n in names if getattr(view, n) is None]
    if missing:
        raise MechscopeError(f"this analysis needs {', '.join(missing)}, which the checkpoint does not hold")


def normalised(x: torch.Tensor, view: AnalysisWeights) -> torch.Tensor:
    """Rows as the model's norm layer without its gain would output them ([..., D]): LayerNorm or RMSNorm with the
    model's own epsilon (a fixed 1e-5 was 0.64 off an RMSNorm model's logits at eps 1e-2), unchanged without norms."""
    x = x.double()
    if view.cfg.norm == "none":
        return x
    if view.layernorm:
        x = x - x.mean(-1, keepdim=True)
    return x / (x.pow(2).mean(-1, keepdim=True) + view.cfg.norm_eps).sqrt()


OPERAND_BYTES = 32 * 2**20  # float64 rows of a (or columns of b) converted at a time by double_product


def per_block(length: int) -> int:
    """How many float64 rows of ``length`` fit in OPERAND_BYTES (at least one)."""
    return max(1, OPERAND_BYTES // (length * 8))


def double_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a.double() @ b.double()`` ([M, K] @ [K, N]) by blocks of the output, converting one block's rows of ``a``
    and columns of ``b`` at a time. The vocabulary-long factors whole in float64 are 2 × 226 MB for SmolLM2; the
    blocks cost time (0.6 s against 0.3 s for SmolLM2's W_U W_E).

    Each output entry is the same sum over all of K. The blocks give the whole product's bits where the BLAS sums an
    entry the same way whatever the product's shape (the machines of 4-5 December 2026); on an AMD EPYC they differ
    by an ulp or two.
    """
    rows, cols = per_block(a.shape[1]), per_block(b.shape[0])
    out = torch.empty(a.shape[0], b.shape[1], dtype=torch.float64)
    for j in range(0, b.shape[1], cols):
        bj = b[:, j : j + cols].double()
        for i in range(0, a.shape[0], rows):
            out[i : i + rows, j : j + cols] = a[i : i + rows].double() @ bj
    return out


@torch.no_grad()
def ov_eigen_positivity(view: AnalysisWeights) -> np.ndarray:
    """Σλ / Σ|λ| of each head's full OV circuit W_E W_V W_O W_U: [L, H] (1 = a pure copier).

    The V×V circuit has the same non-zero eigenvalues as the d_head × d_head matrix
    W_O W_U W_E W_V, which is what is decomposed.
    """
    _need(view, "W_E", "W_U")
    ue = double_product(view.W_U, view.W_E)  # [D, D]
    m = torch.stack([view.W_O[i].double() @ ue @ view.W_V[i].double() for i in range(view.n_layers)])  # [L, H, Dh, Dh]
    lam = torch.linalg.eigvals(m)
    return (lam.sum(-1).real / lam.abs().sum(-1).clamp(min=1e-30)).numpy()


def _heads_and_sample(view, heads, sample, seed, token_range) -> tuple[list, torch.Tensor]:
    """The heads checked (in range, none twice) and the seeded token sample (``sample`` at least 1, the range inside
    the vocabulary): a head 2.0 of a 2-layer model was an IndexError, (0, -1) the last head, sample -5 95 tokens."""
    heads = check_heads(view, heads)
    check_int(sample, "sample", 1)
    token_range = token_range_of(view, token_range) if token_range is not None else None
    return heads, token_sample(view.cfg.d_vocab, sample, seed, token_range)


def token_sample(d_vocab: int, size: int, seed: int, token_range: tuple[int, int] | None = None) -> torch.Tensor:
    lo, hi = token_range or (0, d_vocab)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(hi - lo, generator=g)[: min(size, hi - lo)] + lo
    return ids.sort().values


@dataclass(frozen=True)
class OVCopying:
    """The full OV circuit's diagonal, read for each head."""

    heads: list[tuple[int, int]]
    top_tokens: list[list[tuple[int, float]]]  # per head: (token, raise of its own logit), largest first
    top1: np.ndarray  # per head: share of sampled tokens whose own logit tops their row
    top5: np.ndarray
    median_rank: np.ndarray  # 0 = own logit highest; the lower median of an even sample (torch.median)
    diagonal_mean: np.ndarray  # mean raise of a token's own logit over the vocabulary
    sample: int

    def to_dict(self, decode=None) -> dict:
        dec = decode or str
        return {
            "sample": self.sample,
            "heads": [
                {
                    "head": f"{layer}.{h}",
                    "top_tokens": [{"token": int(t), "text": dec(int(t)), "logit": round(v, 4)} for t, v in tops],
                    "own_logit_top1": float(a),
                    "own_logit_top5": float(b),
                    "median_rank": float(r),
                    "diagonal_mean": float(d),
                }
                for (layer, h), tops, a, b, r, d in zip(
                    self.heads,
                    self.top_tokens,
                    self.top1,
                    self.top5,
                    self.median_rank,
                    self.diagonal_mean,
                    strict=True,
                )
            ],
        }


@torch.no_grad()
def ov_copying(
    view: AnalysisWeights,
    heads: list[tuple[int, int]],
    k: int = 10,
    sample: int = 500,
    seed: int = 0,
    token_range: tuple[int, int] | None = None,
) -> OVCopying:
    """Copying tables of the full OV circuit for ``heads`` (diagonal over the whole vocabulary;
    ranks on ``sample`` seeded tokens, each row compared with all V logits)."""
    _need(view, "W_E", "W_U")
    heads, ids = _heads_and_sample(view, heads, sample, seed, token_range)
    k = check_int(k, "k", 1, view.cfg.d_vocab)
    tops, top1, top5, med, dmean = [], [], [], [], []
    for layer, h in heads:
        ev = _embedded_values(view, view.W_V[layer, h].double())  # [V, Dh]
        ou = double_product(view.W_O[layer, h], view.W_U)  # [Dh, V]
        diag = (ev * ou.T).sum(-1)  # [V] raise of each token's own logit
        best = torch.topk(diag, k)
        tops.append([(int(t), float(v)) for v, t in zip(best.values, best.indices, strict=True)])
        rank = _own_rank(ev[ids], ou, ids)
        top1.append(float((rank == 0).float().mean()))
        top5.append(float((rank < 5).float().mean()))
        med.append(float(rank.median()))
        dmean.append(float(diag.mean()))
    return OVCopying(heads, tops, np.array(top1), np.array(top5), np.array(med), np.array(dmean), len(ids))


def _embedded_values(view: AnalysisWeights, w_v: torch.Tensor) -> torch.Tensor:
    """``normalised(W_E) @ w_v`` [V, Dh] float64, normalising a block of the vocabulary at a time: every row is
    normalised and multiplied on its own, so the blocks give the whole computation's bits (a test checks) without the
    vocabulary-long float64 copies (3 × 226 MB for SmolLM2)."""
    rows = per_block(view.W_E.shape[1])
    out = torch.empty(view.W_E.shape[0], w_v.shape[1], dtype=torch.float64)
    for i in range(0, view.W_E.shape[0], rows):
        out[i : i + rows] = normalised(view.W_E[i : i + rows], view) @ w_v
    return out


def _own_rank(rows_in: torch.Tensor, ou: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[S] how many of all V logits beat each sampled token's own in its row ``rows_in @ ou`` ([S, Dh] @ [Dh, V]),
    a block of rows at a time (500 rows over SmolLM2's vocabulary are 197 MB in float64)."""
    step = per_block(ou.shape[1])
    ranks = []
    for i in range(0, len(ids), step):
        rows = rows_in[i : i + step] @ ou  # [s, V]
        ranks.append((rows > rows.gather(1, ids[i : i + step, None])).sum(1).float())
    return torch.cat(ranks) if ranks else torch.zeros(0)


@dataclass(frozen=True)
class QKPairs:
    heads: list[tuple[int, int]]
    pairs: list[list[tuple[int, int, float]]]  # per head: (query token, key token, score), largest first
    sample: int

    def to_dict(self, decode=None) -> dict:
        dec = decode or str
        return {
            "sample": self.sample,
            "heads": [
                {
                    "head": f"{layer}.{h}",
                    "pairs": [
                        {
                            "query": int(q),
                            "key": int(kk),
                            "query_text": dec(int(q)),
                            "key_text": dec(int(kk)),
                            "score": round(s, 4),
                        }
                        for q, kk, s in pairs
                    ],
                }
                for (layer, h), pairs in zip(self.heads, self.pairs, strict=True)
            ],
        }


@torch.no_grad()
def qk_token_pairs(
    view: AnalysisWeights,
    heads: list[tuple[int, int]],
    k: int = 10,
    sample: int = 2000,
    seed: int = 0,
    token_range: tuple[int, int] | None = None,
) -> QKPairs:
    """The query→key token pairs with the largest attention scores in each head's full QK circuit,
    among ``sample`` seeded tokens (as query and as key), scaled by 1/√d_head."""
    _need(view, "W_E")
    heads, ids = _heads_and_sample(view, heads, sample, seed, token_range)
    k = check_int(k, "k", 1, len(ids) ** 2)
    emb = normalised(view.W_E[ids], view)  # [S, D]
    out = []
    for layer, h in heads:
        q = emb @ view.W_Q[layer, h].double() + view.b_Q[layer, h].double()
        kk = emb @ view.W_K[layer, h].double() + view.b_K[layer, h].double()
        s = (q @ kk.T) / view.cfg.d_head**0.5  # [S, S]
        best = torch.topk(s.flatten(), k)
        out.append(
            [
                (int(ids[i // len(ids)]), int(ids[i % len(ids)]), float(v))
                for v, i in zip(best.values, best.indices.tolist(), strict=True)
            ]
        )
    return QKPairs(heads, out, len(ids))


@dataclass(frozen=True)
class PositionalQK:
    """Each head's attention pattern from positions alone, on the first ``n`` positions."""

    patterns: np.ndarray  # [L, H, n, n] softmax over earlier positions of W_pos W_QK W_posᵀ / √d_head
    offset_mass: np.ndarray  # [L, H, max_offset+1] mean attention to offset 0 (self), 1 (previous), ...
    n: int

    def previous_token(self) -> np.ndarray:
        """[L, H] mean attention to the previous position (offset 1) from position alone."""
        return self.offset_mass[..., 1]

    def to_dict(self) -> dict:
        prev = self.previous_token()
        order = np.argsort(-prev.ravel())[:10]
        H = prev.shape[1]
        return {
            "positions": self.n,
            "definition": "softmax over earlier positions of (W_pos W_Q + b_Q)(W_pos W_K + b_K)ᵀ/√d_head, "
            "rows of W_pos normalised as the layer's norm would",
            "previous_position_mass": prev.round(5).tolist(),
            "strongest_previous_position_heads": [
                {"head": f"{i // H}.{i % H}", "mass": float(prev.ravel()[i])} for i in order
            ],
        }


@torch.no_grad()
def positional_qk(view: AnalysisWeights, n: int = 64, max_offset: int = 4) -> PositionalQK:
    """Positional attention of every head (learned positions only)."""
    _need(view, "W_pos")
    n = min(check_int(n, "n", 1), view.W_pos.shape[0])
    check_int(max_offset, "max_offset", 0)  # -1 was torch.stack's "expected a non-empty list"
    pos = normalised(view.W_pos[:n], view).float()  # [n, D]
    q = torch.einsum("pd,lhde->lhpe", pos, view.W_Q[:]) + view.b_Q[:, :, None]  # [:] stacks a per-layer view
    k = torch.einsum("pd,lhde->lhpe", pos, view.W_K[:]) + view.b_K[:, :, None]
    s = q @ k.transpose(-1, -2) / view.cfg.d_head**0.5  # [L, H, n, n]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    pat = s.masked_fill(~causal, float("-inf")).softmax(-1)
    mass = []
    for off in range(max_offset + 1):
        rows = torch.arange(off, n)
        mass.append(pat[..., rows, rows - off].mean(-1))
    return PositionalQK(pat.numpy(), torch.stack(mass, -1).numpy(), n)


# ---- toy attention-only models: the direct path and skip-trigrams -------------------------

MAX_TABLE_VOCAB = 5000  # V × V tables only for small vocabularies (toy models)


@dataclass(frozen=True)
class Bigrams:
    """The direct path W_E W_U (through the final norm) as a bigram table: [V, V] centred logits."""

    table: np.ndarray

    def top(self, k: int = 20) -> list[tuple[int, int, float]]:
        flat = np.argsort(-self.table.ravel())[:k]
        v = self.table.shape[1]
        return [(int(i // v), int(i % v), float(self.table.ravel()[i])) for i in flat]

    def to_dict(self, decode=None, k: int = 20) -> dict:
        dec = decode or str
        return {
            "definition": "centred logit of the next token B given the current token A through the direct path",
            "top": [{"current": dec(a), "next": dec(b), "logit": round(s, 4)} for a, b, s in self.top(k)],
        }


def _check_small_vocab(view: AnalysisWeights) -> None:
    if view.cfg.d_vocab > MAX_TABLE_VOCAB:
        raise MechscopeError(
            f"token-by-token tables need a small vocabulary (at most {MAX_TABLE_VOCAB}), this model has "
            f"{view.cfg.d_vocab}; they are meant for the toy models of lm train-toy"
        )


@torch.no_grad()
def bigrams(view: AnalysisWeights) -> Bigrams:
    _need(view, "W_E", "W_U")
    _check_small_vocab(view)
    emb = normalised(view.W_E[:], view)  # [:]: the whole matrix of a per-layer view
    return Bigrams(((emb @ view.W_U.double()) + view.b_U.double()).numpy())


@dataclass(frozen=True)
class SkipTrigrams:
    """Per head of a 1-layer model: "B … A → C" where A attends to B (QK) and attending to B raises C (OV)."""

    heads: list[tuple[int, int]]
    triples: list[list[tuple[int, int, int, float, float]]]  # (A, B, C, QK score, OV logit)

    def to_dict(self, decode=None) -> dict:
        dec = decode or str
        return {
            "definition": "A (current token) attends to an earlier B with QK score s; attending to B raises the "
            "centred logit of C by o (full QK and OV circuits of the folded weights, positions left out)",
            "heads": [
                {
                    "head": f"{layer}.{h}",
                    "skip_trigrams": [
                        {"A": dec(a), "B": dec(b), "C": dec(c), "qk": round(s, 4), "ov": round(o, 4)}
                        for a, b, c, s, o in rows
                    ],
                }
                for (layer, h), rows in zip(self.heads, self.triples, strict=True)
            ],
        }


@torch.no_grad()
def skip_trigrams(view: AnalysisWeights, layer: int = 0, k: int = 15) -> SkipTrigrams:
    """The strongest skip-trigrams of every head of ``layer`` (Elhage et al. 2021, one-layer models)."""
    _need(view, "W_E", "W_U")
    _check_small_vocab(view)
    layer = check_int(layer, "layer", 0, view.cfg.n_layers - 1)  # -1 was the last layer
    k = check_int(k, "k", 1, view.cfg.d_vocab**2)
    emb = normalised(view.W_E[:], view)  # [V, D]
    heads, out = [], []
    for h in range(view.n_heads):
        q = emb @ view.W_Q[layer, h].double() + view.b_Q[layer, h].double()
        kk = emb @ view.W_K[layer, h].double() + view.b_K[layer, h].double()
        qk = (q @ kk.T) / view.cfg.d_head**0.5  # [A, B]
        ov = (emb @ view.W_V[layer, h].double()) @ (view.W_O[layer, h].double() @ view.W_U.double())  # [B, C]
        best = torch.topk(qk.flatten(), k)
        v = qk.shape[1]
        rows = []
        for s, i in zip(best.values.tolist(), best.indices.tolist(), strict=True):
            a, b = divmod(i, v)
            c = int(ov[b].argmax())
            rows.append((a, b, c, s, float(ov[b, c])))
        heads.append((layer, h))
        out.append(rows)
    return SkipTrigrams(heads, out)
