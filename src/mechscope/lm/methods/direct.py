"""Direct logit attribution and the logit lens: reading the residual stream in the vocabulary.

The residual stream at the last layer is a sum of what every component wrote: the token and
position embeddings, each attention head's output, each MLP's output, and the biases. The
final norm divides that sum by one scale per position, and the (centred) unembedding reads it
linearly, so each component's share of a logit is exact: ``component · W_U[:, t] / scale``
(Elhage et al. 2021; nostalgebraist's "logit lens" reads the partial sums layer by layer).

Both read the folded analysis view: the final norm's gain is in ``W_U``, the unembedding is
centred over the vocabulary (so a share is of the logit *relative to the mean logit*, which is
what softmax sees), and a head's output excludes its value bias, which is folded into ``b_O``.
The shares add up to the centred logit exactly: the result records both (``centred_logit`` and
``sum_of_shares``), and tests hold them equal on every family.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import run_with_cache
from mechscope.core.torch_utils import described
from mechscope.core.validate import check_int
from mechscope.lm.methods.scores import post_norm_scale, sequences_per_chunk
from mechscope.lm.models.folding import AnalysisWeights
from mechscope.lm.models.transformer import HookedTransformer


def final_scale(model: HookedTransformer, resid: torch.Tensor) -> torch.Tensor:
    """The final norm's divisor for each position of a residual stream [..., D]: [...]."""
    x = resid.float()
    if model.cfg.norm == "none":
        return torch.ones(x.shape[:-1], device=x.device)
    if model.cfg.norm == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    return (x.pow(2).mean(-1) + model.cfg.norm_eps).sqrt()


@dataclass(frozen=True)
class DirectLogitAttribution:
    """Each component's share of the centred logit of ``target`` at ``position``."""

    tokens: list[int]
    position: int
    target: int
    heads: np.ndarray  # [L, H]
    mlps: np.ndarray  # [L] (zeros for attention-only models)
    embed: float
    pos_embed: float
    biases: float  # attention output biases (with the folded value biases), and b_U
    logit: float  # the model's own centred logit of the target

    @property
    def total(self) -> float:
        return float(self.heads.sum() + self.mlps.sum() + self.embed + self.pos_embed + self.biases)

    def top_components(self, k: int = 10) -> list[tuple[str, float]]:
        comps = [(f"{lay}.{h}", float(v)) for (lay, h), v in np.ndenumerate(self.heads)]
        comps += [(f"MLP {lay}", float(v)) for lay, v in enumerate(self.mlps)]
        comps += [("embed", self.embed), ("pos_embed", self.pos_embed), ("biases", self.biases)]
        return sorted(comps, key=lambda c: -abs(c[1]))[:k]

    def to_dict(self, decode=None) -> dict:
        dec = decode or str
        return {
            "position": self.position,
            "target": self.target,
            "target_text": dec(self.target),
            "centred_logit": self.logit,
            "sum_of_shares": self.total,
            "heads": self.heads.round(5).tolist(),
            "mlps": self.mlps.round(5).tolist(),
            "embed": self.embed,
            "pos_embed": self.pos_embed,
            "biases": self.biases,
            "top_components": [{"component": c, "share": v} for c, v in self.top_components()],
        }


def one_sequence(model: HookedTransformer, tokens) -> torch.Tensor:
    """``tokens`` [P] or [1, P] as [1, P] on the model's device, checked (a list was "no attribute 'reshape'", an
    empty sequence "position must be an integer from 0 to -1")."""
    if not isinstance(tokens, torch.Tensor) or not (tokens.dim() == 1 or (tokens.dim() == 2 and len(tokens) == 1)):
        raise MechscopeError(f"expected one sequence of token ids, a tensor [P] or [1, P], got {described(tokens)}")
    if not tokens.numel():
        raise MechscopeError("the sequence of tokens is empty")
    tokens = tokens.reshape(1, -1)
    model.check_tokens(tokens)
    return tokens.to(model.W_E.device)


@torch.no_grad()
def direct_logit_attribution(
    model: HookedTransformer,
    view: AnalysisWeights,
    tokens: torch.Tensor,
    target: int | None = None,
    position: int = -1,
) -> DirectLogitAttribution:
    """Shares of the centred logit of ``target`` (default: the model's prediction) at one position.

    ``tokens`` [P] or [1, P]; ``position`` counts from the end when negative, as Python's indices do; a position
    outside the tokens, or a target outside the vocabulary, is refused in one line.
    """
    cfg = model.cfg
    tokens = one_sequence(model, tokens)
    p = tokens.shape[1]
    pos = check_int(position, "position", low=-p, high=p - 1) % p
    names = ["hook_embed", f"blocks.{cfg.n_layers - 1}.hook_resid_post"]
    names += [f"blocks.{i}.attn.hook_z" for i in range(cfg.n_layers)]
    if cfg.positional == "learned":
        names.append("hook_pos_embed")
    if not cfg.attn_only:
        names += [f"blocks.{i}.hook_mlp_out" for i in range(cfg.n_layers)]
    logits, cache = run_with_cache(model, tokens, names=names)
    final = cache[names[1]][0, pos]
    row = logits[0, pos].float()
    target = int(row.argmax()) if target is None else check_int(target, "target", low=0, high=row.shape[0] - 1)
    linear = _linear_logits(model, final)  # before any final soft-capping (Gemma 2): what the shares add up to
    scale = final_scale(model, final)
    direction = view.W_U[:, target].to(row.device) / scale  # [D]

    def share(x: torch.Tensor) -> float:
        return float(x.float() @ direction)

    heads = np.zeros((cfg.n_layers, cfg.n_heads))
    mlps = np.zeros(cfg.n_layers)
    biases = float(view.b_U[target])
    for i in range(cfg.n_layers):
        z_raw = cache[f"blocks.{i}.attn.hook_z"][0, pos].float()
        z = z_raw - view.value_bias[i].to(row.device)  # [H, Dh]
        out = torch.einsum("hd,hdm->hm", z, view.W_O[i].to(row.device))  # [H, D]
        post = float(post_norm_scale(model, i, z_raw[None, None])[0, 0])  # the post-attention norm's divisor, or 1
        heads[i] = (out @ direction).cpu().numpy() / post
        biases += share(view.b_O[i].to(row.device)) / post
        if not cfg.attn_only:
            mlps[i] = share(cache[f"blocks.{i}.hook_mlp_out"][0, pos])
    return DirectLogitAttribution(
        tokens=tokens[0].tolist(),
        position=pos,
        target=target,
        heads=heads,
        mlps=mlps,
        embed=share(cache["hook_embed"][0, pos]),
        pos_embed=share(cache["hook_pos_embed"][0, pos]) if "hook_pos_embed" in cache else 0.0,
        biases=biases,
        logit=float(linear[target] - linear.mean()),
    )


def _linear_logits(model: HookedTransformer, resid: torch.Tensor) -> torch.Tensor:
    """The model's logits from a final residual [D], without final soft-capping: [V] float32."""
    x = resid if model.ln_final is None else model.ln_final(resid)
    logits = x.float() @ model.W_U.float()
    return logits if model.b_U is None else logits + model.b_U.float()


@dataclass(frozen=True)
class LogitLens:
    """The residual stream after each layer read through the final norm and unembedding."""

    tokens: list[int]
    top: np.ndarray  # [L+1, P] top token after the embeddings (row 0) and after each layer
    top_prob: np.ndarray  # [L+1, P]
    next_logprob: np.ndarray  # [L+1, P-1] log-probability of the actual next token

    def to_dict(self, decode=None) -> dict:
        dec = decode or str
        return {
            "rows": "row 0: the embeddings; row i: after block i-1",
            "tokens": [dec(t) for t in self.tokens],
            "top": [[dec(int(t)) for t in row] for row in self.top],
            "top_prob": self.top_prob.round(4).tolist(),
            "next_token_logprob": self.next_logprob.round(4).tolist(),
        }


@torch.no_grad()
def logit_lens(model: HookedTransformer, tokens: torch.Tensor) -> LogitLens:
    """Top token and next-token log-probability after every layer, for one sequence [P] or [1, P]."""
    cfg = model.cfg
    tokens = one_sequence(model, tokens)
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(cfg.n_layers)]
    _, cache = run_with_cache(model, tokens, names=names)
    per = sequences_per_chunk(model, slice(None), tokens.shape[1])  # layers' rows whose logits fit in a chunk
    top, prob, nxt = [], [], []
    for i in range(0, len(names), per):  # all rows at once were 426 MB on SmolLM2's prompt of 36 tokens
        stream = torch.stack([cache[n][0] for n in names[i : i + per]])  # [l, P, D]
        logp = torch.log_softmax(model.unembed(stream).float(), -1)  # [l, P, V]
        best = logp.max(-1)
        top.append(best.indices)
        prob.append(best.values.exp())
        nxt.append(logp[:, :-1].gather(-1, tokens[0, 1:][None, :, None].expand(len(stream), -1, 1))[..., 0])
    return LogitLens(tokens[0].tolist(), *(torch.cat(t).cpu().numpy() for t in (top, prob, nxt)))
