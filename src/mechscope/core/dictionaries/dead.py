"""Dead latents during training: who is dead, and the ReLU method's cure (resampling).

A latent is dead once it has not fired (``f > 0``) on any of the last ``window`` tokens. TopK and BatchTopK
revive theirs through the AuxK loss (losses.py); ReLU dictionaries resample theirs, as in Bricken et al.
2023 ("Towards Monosemanticity", "Neuron resampling"), see :func:`resample_dead`.
"""

from __future__ import annotations

import torch

from mechscope.core.dictionaries.sae import SparseDictionary


class LatentActivity:
    """Tokens since each latent last fired, ``since [d_sae]`` (int64), counted over the global batch."""

    def __init__(self, d_sae: int) -> None:
        self.since = torch.zeros(d_sae, dtype=torch.int64)

    def update(self, fired: torch.Tensor, tokens: int) -> None:
        """``fired [d_sae]`` bool: whether each latent fired on any of this step's ``tokens`` tokens."""
        self.since += tokens
        self.since[fired.cpu()] = 0

    def dead(self, window: int) -> torch.Tensor:
        """``[d_sae]`` bool: latents silent for at least ``window`` tokens."""
        return self.since >= window


@torch.no_grad()
def resample_dead(
    model: SparseDictionary,
    optimizer: torch.optim.Optimizer,
    dead: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    generator: torch.Generator,
    encoder_scale: float = 0.2,
) -> int:
    """Re-initialise the ``dead [d_sae]`` latents from badly reconstructed inputs; returns how many.

    Towards Monosemanticity's recipe: draw inputs with probability proportional to the square of their loss
    ``||y' - y_hat'||^2``; set the decoder row to the drawn target (less ``b_dec``) at unit norm, the encoder
    column to the drawn input as the encoder sees it at ``encoder_scale`` (0.2) times the mean norm of the
    living encoder columns, the encoder bias to 0, and zero the Adam moments of those weights. (For an SAE the
    target is the input; for a transcoder the decoder row points at the drawn target.) x ``[N, d_in]``,
    y ``[N, d_out]``, raw units: the whole batch, so data-parallel ranks draw alike.
    """
    idx = torch.nonzero(dead).flatten().to(x.device)
    if idx.numel() == 0:
        return 0
    x_n, y_n = model.normalise_input(x), model.normalise_target(y)
    out = model.decode_normalised(model.activate(model.pre_activations(x_n)), x_n)
    weights = (y_n - out).pow(2).sum(-1).double().pow(2)
    if not weights.sum() > 0:
        weights = torch.ones_like(weights)
    picks = torch.multinomial(weights.cpu(), idx.numel(), replacement=True, generator=generator).to(x.device)
    enc_in = x_n[picks] - model.b_dec if model.cfg.apply_b_dec_to_input else x_n[picks]
    dec_dir = y_n[picks] - model.b_dec
    alive = ~dead
    alive_norm = float(model.W_enc[:, alive].norm(dim=0).mean()) if alive.any() else 1.0
    model.W_dec[idx] = dec_dir / dec_dir.norm(dim=1, keepdim=True).clamp_min(1e-12)
    model.W_enc[:, idx] = (enc_in / enc_in.norm(dim=1, keepdim=True).clamp_min(1e-12)).T * (encoder_scale * alive_norm)
    model.b_enc[idx] = 0
    _reset_moments(optimizer, model.W_dec, (idx,))
    _reset_moments(optimizer, model.W_enc, (slice(None), idx))
    _reset_moments(optimizer, model.b_enc, (idx,))
    return int(idx.numel())


def _reset_moments(optimizer: torch.optim.Optimizer, param: torch.nn.Parameter, index) -> None:
    state = optimizer.state.get(param, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][index] = 0
