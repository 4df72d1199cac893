"""The sparse dictionary model: one ``nn.Module`` for SAEs and transcoders of every architecture.

Notation (shapes for N tokens): ``x [N, d_in]`` the input, ``y [N, d_out]`` the target (``y = x`` for an
SAE), ``f [N, d_sae]`` the latents.

    x' = s_in * x                                   (normalisation; s_in = 1 unless normalize_activations)
    z  = (x' - b_dec * a) @ W_enc + b_enc           (a = apply_b_dec_to_input; W_enc [d_in, d_sae])
    f  = sigma(z)                                   (relu, topk, batchtopk or jumprelu; see activations.py)
    y' = f @ W_dec + b_dec (+ x' @ W_skip^T)        (W_dec [d_sae, d_out]; W_skip [d_out, d_in])
    y_hat = y' / s_out

This is SAELens' layout and orientation (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``, the decoder's
rows are the latents' directions), so saving is a rename-free copy.

Decoder norm, as each method specifies: every architecture here keeps the decoder rows at unit norm
(renormalised after each optimiser step, with the gradient component parallel to each row removed before
it) -- Bricken et al. 2023 for ReLU+L1 (so the L1 penalty equals the decoder-norm-weighted one), Gao et al.
2024 for TopK, Bussmann et al. 2024 for BatchTopK (which follows Gao), Rajamanoharan et al. 2024 for JumpReLU.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from mechscope.core.dictionaries.activations import batch_topk, jumprelu, topk_relu
from mechscope.core.dictionaries.config import DictionaryConfig
from mechscope.core.errors import MechscopeError


class DictionaryOutput(NamedTuple):
    """What :meth:`SparseDictionary.forward` returns: ``output [..., d_out]`` and ``latents [..., d_sae]``."""

    output: torch.Tensor
    latents: torch.Tensor


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


class SparseDictionary(nn.Module):
    """A sparse autoencoder or transcoder (see the module docstring for the formulas).

    Parameters: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_out]``, ``b_dec [d_out]``,
    ``threshold [d_sae]`` (jumprelu: a parameter; batchtopk: a buffer, the inference threshold), ``W_skip
    [d_out, d_in]`` (skip transcoders). Buffers ``in_scale`` and ``out_scale`` hold the normalisation factors.
    ``generator`` seeds the initialisation (decoder rows random unit vectors, encoder = decoder transposed for
    an SAE as in Gao et al. 2024, section A.1; thresholds at ``init_threshold``; biases zero).
    """

    def __init__(self, cfg: DictionaryConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not isinstance(cfg, DictionaryConfig):
            raise MechscopeError(f"expected a DictionaryConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        dt = _dtype(cfg.dtype)
        d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.d_out
        w_dec = torch.randn(d_sae, d_out, generator=generator, dtype=torch.float64)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        if cfg.transcoder:
            w_enc = torch.randn(d_in, d_sae, generator=generator, dtype=torch.float64) / d_in**0.5
        else:
            w_enc = w_dec.T.clone()
        self.W_enc = nn.Parameter(w_enc.to(dt).contiguous())
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dt))
        self.W_dec = nn.Parameter(w_dec.to(dt).contiguous())
        self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=dt))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.full((d_sae,), cfg.init_threshold, dtype=dt))
        elif cfg.architecture == "batchtopk":
            self.register_buffer("threshold", torch.zeros(d_sae, dtype=dt))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(d_out, d_in, dtype=dt))
        self.register_buffer("in_scale", torch.ones((), dtype=torch.float64))
        self.register_buffer("out_scale", torch.ones((), dtype=torch.float64))

    @classmethod
    def blank(cls, cfg: DictionaryConfig) -> SparseDictionary:
        """A dictionary whose weights the caller overwrites (a file's, a model's own): its throwaway initial weights
        come from a generator of its own, so building it draws nothing from the caller's global one."""
        return cls(cfg, generator=torch.Generator())

    # ---- the forward pass in normalised space ---------------------------------------------------

    def normalise_input(self, x: torch.Tensor) -> torch.Tensor:
        """``s_in * x`` in the model's dtype. x: ``[..., d_in]``."""
        self._check_width(x, self.cfg.d_in, "input")
        x = x.to(self.W_enc.dtype)
        return x * self.in_scale.to(x.dtype) if self._scaled else x

    def normalise_target(self, y: torch.Tensor) -> torch.Tensor:
        """``s_out * y`` in the model's dtype. y: ``[..., d_out]``."""
        self._check_width(y, self.cfg.d_out, "target")
        y = y.to(self.W_dec.dtype)
        return y * self.out_scale.to(y.dtype) if self._scaled else y

    def pre_activations(self, x_norm: torch.Tensor) -> torch.Tensor:
        """``z = (x' - a b_dec) W_enc + b_enc``: ``[N, d_in]`` (normalised) -> ``[N, d_sae]``."""
        if self.cfg.apply_b_dec_to_input:
            x_norm = x_norm - self.b_dec
        return x_norm @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor, *, group=None) -> torch.Tensor:
        """``f = sigma(z)``. BatchTopK keeps the batch's top ``k*B`` while training and thresholds otherwise."""
        arch = self.cfg.architecture
        if arch == "relu":
            return pre.relu()
        if arch == "topk":
            return topk_relu(pre, self.cfg.k)
        if arch == "batchtopk":
            if self.training:
                return batch_topk(pre, self.cfg.k, group)
            return pre * (pre > self.threshold.clamp_min(0))
        return jumprelu(pre, self.threshold.clamp_min(0), self.cfg.bandwidth)

    def decode_normalised(self, f: torch.Tensor, x_norm: torch.Tensor | None = None) -> torch.Tensor:
        """``y' = f W_dec + b_dec (+ x' W_skip^T)``: ``[N, d_sae]`` -> ``[N, d_out]`` (normalised space)."""
        out = f @ self.W_dec + self.b_dec
        if self.cfg.skip:
            if x_norm is None:
                raise MechscopeError("expected the input x to decode a skip transcoder (its skip path reads x)")
            out = out + x_norm @ self.W_skip.T
        return out

    # ---- the public forward pass in the activations' own units ---------------------------------

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents ``f [..., d_sae]`` of inputs ``x [..., d_in]`` (raw units; normalised inside)."""
        lead, flat = self._flatten(x, self.cfg.d_in, "input")
        return self.activate(self.pre_activations(self.normalise_input(flat))).reshape(*lead, self.cfg.d_sae)

    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Output ``[..., d_out]`` in raw units of latents ``f [..., d_sae]`` (``x`` only for skip transcoders)."""
        lead, flat = self._flatten(f, self.cfg.d_sae, "latents")
        x_norm = None
        if x is not None:  # a wrong width was view()'s error, other rows a matmul's
            x_lead, x_flat = self._flatten(x, self.cfg.d_in, "input")
            if x_lead != lead:
                raise MechscopeError(f"expected an input x for each row of latents {list(lead)}, got {list(x_lead)}")
            x_norm = self.normalise_input(x_flat)
        out = self.decode_normalised(flat.to(self.W_dec.dtype), x_norm)
        return self.denormalise_output(out).reshape(*lead, self.cfg.d_out)

    def forward(self, x: torch.Tensor) -> DictionaryOutput:
        """``(output [..., d_out], latents [..., d_sae])`` for inputs ``x [..., d_in]``, raw units."""
        lead, flat = self._flatten(x, self.cfg.d_in, "input")
        x_norm = self.normalise_input(flat)
        f = self.activate(self.pre_activations(x_norm))
        out = self.denormalise_output(self.decode_normalised(f, x_norm))
        return DictionaryOutput(out.reshape(*lead, self.cfg.d_out), f.reshape(*lead, self.cfg.d_sae))

    def denormalise_output(self, out: torch.Tensor) -> torch.Tensor:
        """``y' / s_out``: normalised outputs back to the target's units."""
        return out / self.out_scale.to(out.dtype) if self._scaled else out

    # ---- the decoder-norm constraint --------------------------------------------------------------

    @torch.no_grad()
    def set_decoder_unit_norm(self) -> None:
        """Renormalise every decoder row to unit L2 norm (after each optimiser step)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """``g_i <- g_i - (g_i . d_i) d_i`` for each (unit) decoder row ``d_i`` (before each step)."""
        if self.W_dec.grad is None:
            return
        unit = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_dec.grad.sub_((self.W_dec.grad * unit).sum(dim=1, keepdim=True) * unit)

    @property
    def decoder_directions(self) -> torch.Tensor:
        """The latents' unit directions in output space, ``[d_sae, d_out]`` (a detached copy)."""
        w = self.W_dec.detach()
        return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)

    # ---- normalisation folding ----------------------------------------------------------------------

    @torch.no_grad()
    def folded(self) -> SparseDictionary:
        """A copy that reads and writes raw activations with no scaling: ``W_enc <- s_in W_enc``, ``W_dec <-
        W_dec / s_out``, ``b_dec <- b_dec / s_out``, ``W_skip <- W_skip s_in / s_out`` (SAELens'
        ``fold_activation_norm_scaling_factor``); where b_dec is also subtracted from the input and the two scales
        differ (set by hand: training and SAELens files give an SAE one scale), ``b_enc`` takes up the difference,
        ``(s_in / s_out - 1) b_dec W_enc``. The latents are unchanged."""
        import dataclasses

        cfg = dataclasses.replace(self.cfg, normalize_activations="none")
        out = SparseDictionary.blank(cfg)
        state = {k: v.clone() for k, v in self.state_dict().items()}
        s_in, s_out = self.in_scale.item(), self.out_scale.item()
        if self._scaled:
            state["W_enc"] = (state["W_enc"].double() * s_in).to(state["W_enc"].dtype)
            state["W_dec"] = (state["W_dec"].double() / s_out).to(state["W_dec"].dtype)
            state["b_dec"] = (state["b_dec"].double() / s_out).to(state["b_dec"].dtype)
            if cfg.apply_b_dec_to_input and s_in != s_out:  # x - b_dec/s_out read at s_in: b_enc takes the difference
                shift = (s_in / s_out - 1) * (self.b_dec.double() @ self.W_enc.double())
                state["b_enc"] = (state["b_enc"].double() + shift).to(state["b_enc"].dtype)
            if cfg.skip:
                state["W_skip"] = (state["W_skip"].double() * (s_in / s_out)).to(state["W_skip"].dtype)
            state["in_scale"] = torch.ones((), dtype=torch.float64)
            state["out_scale"] = torch.ones((), dtype=torch.float64)
        out.load_state_dict(state)
        return out.train(self.training)

    # ---- helpers ----------------------------------------------------------------------------------------

    @property
    def _scaled(self) -> bool:
        return self.cfg.normalize_activations != "none"

    def _check_width(self, t: torch.Tensor, width: int, what: str) -> None:
        if not isinstance(t, torch.Tensor) or t.ndim < 1 or t.shape[-1] != width:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise MechscopeError(f"expected the {what}'s last dimension to be {width}, got shape {shape}")

    def _flatten(self, t: torch.Tensor, width: int, what: str) -> tuple[tuple[int, ...], torch.Tensor]:
        self._check_width(t, width, what)
        return tuple(t.shape[:-1]), t.reshape(-1, width)
