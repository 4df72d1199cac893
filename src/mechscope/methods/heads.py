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
4. Copying: each head's direct effect, through its OV circuit and the final norm, on the logit
   of the token it attends to; and the OV circuit's eigenvalue positivity Σλ / Σ|λ| over the
   embedding (W_E W_V W_O W_U; layer norms left out, as in Elhage et al.).
5. Causal: zero- and mean-ablation of each head (change in second-half loss); the top-k
   induction heads ablated together against k random heads (several draws).
6. K-composition (Elhage et al.) between every earlier head and every induction head.

Memory: every attention score is reduced to per-head numbers inside the hook that sees the
pattern, so memory stays near one layer's attention for one batch; nothing is cached whole.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from mechscope.errors import MechscopeError
from mechscope.hooks import hooks
from mechscope.models.transformer import HookedTransformer

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
)


FEED_RATIO = 1.5  # K-composition relative to the mean over earlier heads that counts as "feeds"


@dataclass(frozen=True)
class Thresholds:
    """A head's label: the first rule it meets, in this order."""

    induction: float = 0.4  # induction score and prefix-matching score both at least this
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
    ablation_batch: int = 1  # sequences used for the per-head ablations (the slow part)
    per_head_ablation: bool = True
    top_k: int | None = None  # None: 5, or half the heads of a smaller model
    random_draws: int = 8
    thresholds: Thresholds = field(default_factory=Thresholds)

    def to_dict(self) -> dict:
        return asdict(self)


def default_token_range(model: HookedTransformer) -> tuple[int, int]:
    v = model.cfg.d_vocab
    if v >= 20000:
        return (1000, 10000)  # BPE ids are roughly frequency-ordered: skip specials and bytes, and rare merges
    return (1, v) if v > 1 else (0, v)


def check_protocol(model: HookedTransformer, p: HeadProtocol) -> tuple[HeadProtocol, tuple[int, int]]:
    """The protocol with its defaults resolved for this model, and the token range; or a clear error."""
    if p.prefix_n is None:
        p = replace(p, prefix_n=max(1, min(25, (model.cfg.n_ctx - 1) // max(p.prefix_repeats, 1))))
    if p.top_k is None:
        p = replace(p, top_k=max(1, min(5, model.cfg.n_layers * model.cfg.n_heads // 2)))
    lo, hi = p.token_range or default_token_range(model)
    if not 0 <= lo < hi <= model.cfg.d_vocab:
        raise MechscopeError(f"token range [{lo}, {hi}) outside the vocabulary 0..{model.cfg.d_vocab - 1}")
    for name, value in (("n", p.n), ("batch", p.batch), ("prefix_n", p.prefix_n), ("ablation_batch", p.ablation_batch)):
        if value < 1:
            raise MechscopeError(f"{name} must be at least 1, got {value}")
    if p.prefix_repeats < 2:
        raise MechscopeError(f"prefix_repeats must be at least 2, got {p.prefix_repeats}")
    longest = max(1 + 2 * p.n, 1 + p.prefix_repeats * p.prefix_n)
    if longest > model.cfg.n_ctx:
        raise MechscopeError(
            f"N = {p.n} needs {1 + 2 * p.n} positions and the prefix protocol {1 + p.prefix_repeats * p.prefix_n}; "
            f"the model's context is {model.cfg.n_ctx}"
        )
    n_heads = model.cfg.n_layers * model.cfg.n_heads
    if not 1 <= p.top_k <= n_heads:
        raise MechscopeError(f"top_k must be between 1 and {n_heads}, got {p.top_k}")
    return p, (lo, hi)


def repeated_tokens(
    model: HookedTransformer, n: int, batch: int, repeats: int, generator: torch.Generator, token_range
) -> torch.Tensor:
    """[batch, 1 + repeats·n]: BOS, then n random tokens repeated ``repeats`` times."""
    lo, hi = token_range
    seq = torch.randint(lo, hi, (batch, n), generator=generator)
    bos = model.cfg.bos_token_id if model.cfg.bos_token_id is not None else lo
    return torch.cat([torch.full((batch, 1), bos), seq.repeat(1, repeats)], 1)


# ---- masks: which keys count for each query ------------------------------------------------


def induction_mask(p: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Target [P, K] and queries [P] for the induction stripe on BOS + n + n."""
    target = torch.zeros(p, p, dtype=torch.bool)
    q = torch.arange(n + 1, 2 * n + 1)
    target[q, q - n + 1] = True
    queries = torch.zeros(p, dtype=torch.bool)
    queries[q] = True
    return target, queries


def previous_token_mask(p: int) -> tuple[torch.Tensor, torch.Tensor]:
    target = torch.zeros(p, p, dtype=torch.bool)
    q = torch.arange(1, p)
    target[q, q - 1] = True
    queries = torch.zeros(p, dtype=torch.bool)
    queries[1:] = True
    return target, queries


def duplicate_mask(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys k < q holding the same token as q: [B, P, K]; queries with at least one: [B, P]."""
    same = tokens[:, :, None] == tokens[:, None, :]
    target = same & torch.ones_like(same[0]).tril(-1)
    return target, target.any(-1)


def prefix_mask(tokens: torch.Tensor, first_query: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys k ≤ q whose previous token equals token q (k − 1 an earlier occurrence)."""
    b, p = tokens.shape
    prev = torch.cat([torch.full((b, 1), -1), tokens[:, :-1]], 1)  # token before each key
    target = (tokens[:, :, None] == prev[:, None, :]) & torch.ones(p, p, dtype=torch.bool).tril()
    queries = target.any(-1)
    queries[:, :first_query] = False
    return target, queries


def masked_score(pattern: torch.Tensor, target: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Mean over (batch, query) of attention mass on the target keys: [H]."""
    if target.dim() == 2:
        target, queries = target.expand(pattern.shape[0], -1, -1), queries.expand(pattern.shape[0], -1)
    mass = (pattern * target[:, None].to(pattern.dtype)).sum(-1)  # [B, H, P]
    w = queries[:, None].to(pattern.dtype)  # [B, 1, P]
    return (mass * w).sum((0, 2)) / w.sum().clamp(min=1)


def attention_scores(model: HookedTransformer, tokens: torch.Tensor, masks: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Each named mask's score for every head, [L, H], computed inside the pattern hooks."""
    cfg = model.cfg
    out = {name: np.zeros((cfg.n_layers, cfg.n_heads)) for name in masks}

    def scorer(layer):
        def hook(pattern, hp):
            for name, (target, queries) in masks.items():
                out[name][layer] = masked_score(pattern, target, queries).numpy()

        return hook

    with torch.no_grad(), hooks(model, fwd=[(f"blocks.{i}.attn.hook_pattern", scorer(i)) for i in range(cfg.n_layers)]):
        model(tokens)
    return out


def loss_per_position(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting token p+1 at position p: [B, P-1]."""
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")


# ---- weights-only analyses ----------------------------------------------------------------


def _head_weights(model: HookedTransformer, layer: int):
    attn = model.blocks[layer].attn
    groups = model.cfg.n_heads // model.cfg.kv_heads
    rep = lambda w: w.repeat_interleave(groups, 0)  # noqa: E731  kv heads -> query heads
    return attn.W_Q.detach(), rep(attn.W_K.detach()), rep(attn.W_V.detach()), attn.W_O.detach()


def ov_eigen_positivity(model: HookedTransformer) -> np.ndarray:
    """Σλ / Σ|λ| of each head's full OV circuit W_E W_V W_O W_U: [L, H] (1 = a pure copier)."""
    with torch.no_grad():
        ue = model.W_U.detach().double() @ model.W_E.detach().double()  # [D, D] = W_U W_E
        out = np.zeros((model.cfg.n_layers, model.cfg.n_heads))
        for layer in range(model.cfg.n_layers):
            _, _, wv, wo = _head_weights(model, layer)
            m = wo.double() @ ue @ wv.double()  # [H, Dh, Dh], same non-zero eigenvalues as the V x V circuit
            lam = torch.linalg.eigvals(m)
            out[layer] = (lam.sum(-1).real / lam.abs().sum(-1).clamp(min=1e-30)).numpy()
    return out


def k_composition(model: HookedTransformer, targets: list[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
    """K-composition of every earlier head into each target head: {(L, h): [L_target, H]}.

    ‖W_QK^T2 · W_OV^T1ᵀ‖_F / (‖W_QK‖_F ‖W_OV‖_F) with W_QK = W_Q W_Kᵀ and W_OV = W_V W_O
    (Elhage et al. 2021), computed through d_head × d_head factors.
    """
    cfg = model.cfg
    with torch.no_grad():
        w = [tuple(t.double() for t in _head_weights(model, layer)) for layer in range(cfg.n_layers)]
        out = {}
        for lt, ht in targets:
            wq, wk = w[lt][0][ht], w[lt][1][ht]  # [D, Dh]
            qq = wq.T @ wq  # [Dh, Dh]
            kk = wk.T @ wk
            qk_norm2 = torch.trace(qq @ kk)
            scores = np.zeros((lt, cfg.n_heads))
            for layer in range(lt):
                wv, wo = w[layer][2], w[layer][3]  # [H, D, Dh], [H, Dh, D]
                b = wk.T[None] @ wo.transpose(1, 2)  # Wkᵀ Woᵀ: [H, Dh, Dh]
                vv = wv.transpose(1, 2) @ wv  # [H, Dh, Dh]
                oo = wo @ wo.transpose(1, 2)
                num = torch.einsum("ij,hjk,hkl,hil->h", qq, b, vv, b)  # tr(QQ B VV Bᵀ)
                ov_norm2 = torch.einsum("hij,hji->h", vv, oo)
                denom = qk_norm2.sqrt() * ov_norm2.sqrt()
                # a head with no OV (or QK) circuit composes with nothing: 0, not 0/0
                scores[layer] = torch.where(denom > 0, num.clamp(min=0).sqrt() / denom.clamp(min=1e-300), 0.0).numpy()
            out[(lt, ht)] = scores
    return out


# ---- the analysis -------------------------------------------------------------------------


@dataclass
class HeadsResult:
    model: str
    protocol: dict
    scores: dict[str, np.ndarray]  # name -> [L, H]
    labels: list[list[str]]
    loss_per_position: list[float]  # mean over the batch, position p predicts token p+1
    loss_first_half: float
    loss_second_half: float
    top_k_ablation: dict
    composition: list[dict]
    seconds: dict[str, float]
    examples: dict = field(default_factory=dict)  # tokens and patterns for the viewer

    def ranked(self, score: str, label: str | None = None) -> list[dict]:
        s = self.scores[score]
        rows = [
            {"layer": int(layer), "head": int(h), "score": float(s[layer, h])}
            for layer in range(s.shape[0])
            for h in range(s.shape[1])
            if label is None or self.labels[layer][h] == label
        ]
        return sorted(rows, key=lambda r: -r["score"])

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "protocol": self.protocol,
            "thresholds": self.protocol["thresholds"],
            # a score that was not measured (no text, ablations skipped) is null, not NaN
            "scores": {
                k: [[None if np.isnan(x) else round(float(x), 6) for x in row] for row in np.asarray(v)]
                for k, v in self.scores.items()
            },
            "labels": self.labels,
            "induction_heads": self.ranked("induction", "induction"),
            "previous_token_heads": self.ranked("previous_token", "previous_token"),
            "duplicate_token_heads": self.ranked("duplicate_token", "duplicate_token"),
            "loss_per_position": self.loss_per_position,
            "loss_first_half": self.loss_first_half,
            "loss_second_half": self.loss_second_half,
            "top_k_ablation": self.top_k_ablation,
            "composition": self.composition,
            "composition_feed_ratio": FEED_RATIO,
            "seconds": self.seconds,
        }


def classify(scores: dict[str, np.ndarray], t: Thresholds) -> list[list[str]]:
    n_layers, n_heads = scores["induction"].shape
    labels = []
    for layer in range(n_layers):
        row = []
        for h in range(n_heads):
            if scores["induction"][layer, h] >= t.induction and scores["prefix_matching"][layer, h] >= t.induction:
                row.append("induction")
            elif scores["previous_token"][layer, h] >= t.previous_token:
                row.append("previous_token")
            elif scores["duplicate_token"][layer, h] >= t.duplicate_token:
                row.append("duplicate_token")
            else:
                row.append("none")
        labels.append(row)
    return labels


def _main_pass(model: HookedTransformer, tokens: torch.Tensor, n: int, keep: int):
    """One forward over the repeated tokens: scores in hooks, loss, z means, copying, residuals."""
    cfg = model.cfg
    b, p = tokens.shape
    ind_t, ind_q = induction_mask(p, n)
    prev_t, prev_q = previous_token_mask(p)
    dup_t, dup_q = duplicate_mask(tokens)
    scores = {k: np.zeros((cfg.n_layers, cfg.n_heads)) for k in ("induction", "previous_token", "duplicate_token")}
    z_mean = {}
    attended = {}
    copy_num = {}
    resid_pre = {}
    second = slice(n + 1, 2 * n + 1)

    def on_resid(layer):
        def hook(x, hp):
            resid_pre[layer] = x[:keep].clone()

        return hook

    def on_pattern(layer):
        def hook(pattern, hp):
            scores["induction"][layer] = masked_score(pattern, ind_t, ind_q).numpy()
            scores["previous_token"][layer] = masked_score(pattern, prev_t, prev_q).numpy()
            scores["duplicate_token"][layer] = masked_score(pattern, dup_t, dup_q).numpy()
            attended[layer] = pattern[:, :, second].argmax(-1)  # [B, H, n] key each query attends to most

        return hook

    def on_z(layer):
        def hook(z, hp):
            z_mean[layer] = z.mean((0, 1))  # [H, Dh]
            wo = model.blocks[layer].attn.W_O  # [H, Dh, D]
            r = torch.einsum("bphd,hdm->bhpm", z[:, second], wo)  # [B, H, n, D] each head's output
            if cfg.norm == "layernorm":
                r = r - r.mean(-1, keepdim=True)
            r = r * model.ln_final.w
            tok = tokens.gather(1, attended[layer].reshape(b, -1)).reshape(b, cfg.n_heads, n)
            wu = model.W_U.T[tok]  # [B, H, n, D]
            copy_num[layer] = (r * wu).sum(-1)  # [B, H, n], before the final norm's scale
            del attended[layer]

        return hook

    fwd = []
    for i in range(cfg.n_layers):
        fwd += [
            (f"blocks.{i}.hook_resid_pre", on_resid(i)),
            (f"blocks.{i}.attn.hook_pattern", on_pattern(i)),
            (f"blocks.{i}.attn.hook_z", on_z(i)),
        ]
    final = {}
    fwd.append((f"blocks.{cfg.n_layers - 1}.hook_resid_post", lambda x, hp: final.setdefault("resid", x)))
    with torch.no_grad(), hooks(model, fwd=fwd):
        logits = model(tokens)
    resid = final["resid"][:, second]  # [B, n, D]
    if cfg.norm == "layernorm":
        resid = resid - resid.mean(-1, keepdim=True)
    scale = (resid.pow(2).mean(-1) + cfg.norm_eps).sqrt()  # [B, n] the final norm's divisor
    scores["copying"] = np.stack([(copy_num[i] / scale[:, None]).mean((0, 2)).numpy() for i in range(cfg.n_layers)])
    return logits, scores, z_mean, resid_pre


def _second_half_loss(model, resid_final, tokens, n) -> torch.Tensor:
    """Mean loss over second-half predictions per sequence: [B]."""
    pos = slice(n + 1, 2 * n)  # position p predicts token p+1, both in the second copy
    logits = model.unembed(resid_final[:, pos])
    return F.cross_entropy(logits.transpose(1, 2), tokens[:, n + 2 : 2 * n + 1], reduction="none").mean(1)


def per_head_ablation(model, tokens, n, z_mean, resid_pre, chunk: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Second-half loss increase when each head is mean-ablated and zero-ablated: two [L, H] arrays."""
    cfg = model.cfg
    h = cfg.n_heads
    mean_inc, zero_inc = np.zeros((cfg.n_layers, h)), np.zeros((cfg.n_layers, h))
    with torch.no_grad():
        base = _second_half_loss(model, model.run_blocks(resid_pre[0].clone(), 0), tokens, n).mean()
        for layer in range(cfg.n_layers):
            x0 = resid_pre[layer]  # [b, P, D]
            b = x0.shape[0]
            variants = [(kind, head) for kind in ("mean", "zero") for head in range(h)]
            for c0 in range(0, len(variants), chunk):
                vs = variants[c0 : c0 + chunk]

                def ablate(z, hp, vs=vs, layer=layer, b=b):
                    z = z.clone()
                    for i, (kind, head) in enumerate(vs):
                        z[i * b : (i + 1) * b, :, head] = z_mean[layer][head] if kind == "mean" else 0.0
                    return z

                x = x0.repeat(len(vs), 1, 1)
                with hooks(model, fwd=[(f"blocks.{layer}.attn.hook_z", ablate)]):
                    final = model.run_blocks(x, layer)
                losses = _second_half_loss(model, final, tokens.repeat(len(vs), 1), n).view(len(vs), b).mean(1)
                for (kind, head), loss in zip(vs, losses, strict=True):
                    (mean_inc if kind == "mean" else zero_inc)[layer, head] = (loss - base).item()
    return mean_inc, zero_inc


def group_ablation(model, tokens, n, z_mean, heads: list[tuple[int, int]], clean: float) -> float:
    """Second-half loss increase over ``clean`` with all ``heads`` mean-ablated together."""
    by_layer: dict[int, list[int]] = {}
    for layer, h in heads:
        by_layer.setdefault(layer, []).append(h)

    def make(layer):
        def hook(z, hp):
            z = z.clone()
            for h in by_layer[layer]:
                z[:, :, h] = z_mean[layer][h]
            return z

        return hook

    with torch.no_grad(), hooks(model, fwd=[(f"blocks.{layer}.attn.hook_z", make(layer)) for layer in by_layer]):
        ablated = _second_half_loss(model, model.run_blocks(model.embed(tokens)), tokens, n).mean()
    return ablated.item() - clean


def capture_patterns(model, tokens: torch.Tensor, heads: list[tuple[int, int]]) -> dict[str, list]:
    """Attention patterns [P, K] of the chosen heads on one sequence (for the report's viewer)."""
    out = {}

    def grab(layer):
        def hook(pattern, hp):
            for lh in heads:
                if lh[0] == layer:
                    out[f"{layer}.{lh[1]}"] = pattern[0, lh[1]].numpy().round(4).tolist()

        return hook

    layers = sorted({layer for layer, _ in heads})
    with torch.no_grad(), hooks(model, fwd=[(f"blocks.{layer}.attn.hook_pattern", grab(layer)) for layer in layers]):
        model(tokens[:1])
    return out


def find_induction_heads(
    model: HookedTransformer,
    protocol: HeadProtocol | None = None,
    text_tokens: torch.Tensor | None = None,
    name: str = "",
    show: list[tuple[int, int]] | None = None,
    progress=None,
) -> HeadsResult:
    """Run every protocol on ``model``; ``text_tokens`` [B, P] enables the real-text scores."""
    p, token_range = check_protocol(model, protocol or HeadProtocol())
    cfg = model.cfg
    for layer, h in show or []:
        if not (0 <= layer < cfg.n_layers and 0 <= h < cfg.n_heads):
            raise MechscopeError(
                f"head {layer}.{h} out of range: layers 0..{cfg.n_layers - 1}, heads 0..{cfg.n_heads - 1}"
            )
    g = torch.Generator().manual_seed(p.seed)
    seconds = {}
    say = progress or (lambda msg: None)

    t = time.perf_counter()
    say("repeated random tokens")
    tokens = repeated_tokens(model, p.n, p.batch, 2, g, token_range)
    logits, scores, z_mean, resid_pre = _main_pass(model, tokens, p.n, min(p.ablation_batch, p.batch))
    loss = loss_per_position(logits, tokens).mean(0)
    seconds["repeated_tokens"] = time.perf_counter() - t

    t = time.perf_counter()
    say("prefix matching")
    ptoks = repeated_tokens(model, p.prefix_n, p.prefix_batch, p.prefix_repeats, g, token_range)
    scores |= attention_scores(model, ptoks, {"prefix_matching": prefix_mask(ptoks, 1 + p.prefix_n)})
    seconds["prefix_matching"] = time.perf_counter() - t

    t = time.perf_counter()
    if text_tokens is not None:
        say("previous-token heads on real text")
        scores |= attention_scores(
            model, text_tokens, {"previous_token_text": previous_token_mask(text_tokens.shape[1])}
        )
    else:
        scores["previous_token_text"] = np.full((cfg.n_layers, cfg.n_heads), np.nan)
    seconds["real_text"] = time.perf_counter() - t

    t = time.perf_counter()
    say("OV circuits")
    scores["ov_eigen_positivity"] = ov_eigen_positivity(model)
    seconds["ov_circuits"] = time.perf_counter() - t

    t = time.perf_counter()
    if p.per_head_ablation:
        say("per-head ablations")
        mean_inc, zero_inc = per_head_ablation(model, tokens[: p.ablation_batch], p.n, z_mean, resid_pre)
    else:
        mean_inc = zero_inc = np.full((cfg.n_layers, cfg.n_heads), np.nan)
    scores["ablation_loss_increase"], scores["zero_ablation_loss_increase"] = mean_inc, zero_inc
    seconds["per_head_ablation"] = time.perf_counter() - t

    labels = classify(scores, p.thresholds)

    t = time.perf_counter()
    say("top-k ablation")
    flat = scores["induction"].flatten()
    top = [divmod(int(i), cfg.n_heads) for i in np.argsort(-flat)[: p.top_k]]
    clean = float(loss[p.n + 1 : 2 * p.n].mean())  # the main pass's second-half loss
    top_inc = group_ablation(model, tokens, p.n, z_mean, top, clean)
    rnd = []
    for _ in range(p.random_draws):
        pick = torch.randperm(len(flat), generator=g)[: p.top_k].tolist()
        rnd.append(group_ablation(model, tokens, p.n, z_mean, [divmod(i, cfg.n_heads) for i in pick], clean))
    top_k = {
        "k": p.top_k,
        "heads": [{"layer": layer, "head": h} for layer, h in top],
        "ablation": "mean",
        "induction_heads_loss_increase": top_inc,
        "random_heads_loss_increase_mean": float(np.mean(rnd)),
        "random_heads_loss_increase_std": float(np.std(rnd)),
        "random_draws": rnd,
    }
    seconds["top_k_ablation"] = time.perf_counter() - t

    t = time.perf_counter()
    say("K-composition")
    by_induction = [divmod(int(i), cfg.n_heads) for i in np.argsort(-flat)]
    labelled = {
        (layer, h) for layer in range(cfg.n_layers) for h in range(cfg.n_heads) if labels[layer][h] == "induction"
    }
    targets = [lh for lh in by_induction if (lh in labelled or lh in top) and lh[0] > 0]
    comp = k_composition(model, targets)
    composition = []
    for (lt, ht), s in comp.items():
        rows = [
            {
                "layer": layer,
                "head": h,
                "k_composition": float(s[layer, h]),
                "previous_token_score": float(scores["previous_token"][layer, h]),
                "label": labels[layer][h],
            }
            for layer in range(lt)
            for h in range(cfg.n_heads)
        ]
        rows.sort(key=lambda r: -r["k_composition"])
        mean, std = float(s.mean()), float(s.std())
        # a previous-token head feeds this induction head when its K-composition is at least
        # FEED_RATIO times the average over every earlier head (the baseline Elhage et al. compare to)
        feeders = [r for r in rows if r["label"] == "previous_token" and r["k_composition"] >= FEED_RATIO * mean]
        composition.append(
            {
                "induction_head": {"layer": lt, "head": ht, "induction_score": float(scores["induction"][lt, ht])},
                "k_composition_mean": mean,
                "k_composition_std": std,
                "top_sources": rows[:5],
                "previous_token_heads_feeding": feeders,
            }
        )
    seconds["composition"] = time.perf_counter() - t

    by_previous = [divmod(int(i), cfg.n_heads) for i in np.argsort(-scores["previous_token"].flatten())]
    chosen = list(dict.fromkeys(list(show or []) + top[:3] + by_previous[:2]))  # heads shown in the viewer
    examples = {
        "heads": [f"{layer}.{h}" for layer, h in chosen],
        "repeated": {"tokens": tokens[0].tolist(), "patterns": capture_patterns(model, tokens, chosen)},
    }
    if text_tokens is not None:
        examples["text"] = {"tokens": text_tokens[0].tolist(), "patterns": capture_patterns(model, text_tokens, chosen)}

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
        composition=composition,
        seconds=seconds,
        examples=examples,
    )
