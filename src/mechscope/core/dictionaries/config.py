"""The settings of one sparse dictionary (an SAE or a transcoder), checked once when made.

A :class:`DictionaryConfig` says what the dictionary computes and how its sparsity is paid for; how it is
trained (learning rate, steps, warm-ups) lives in :class:`mechscope.core.dictionaries.train.TrainConfig`.

Architectures (``architecture``):

``relu``
    ReLU encoder with an L1 penalty on the latents, unit-norm decoder columns (Bricken et al. 2023,
    "Towards Monosemanticity").
``topk``
    Keep the ``k`` largest pre-activations of each token (Gao et al. 2024, "Scaling and evaluating sparse
    autoencoders"); no sparsity penalty, AuxK loss against dead latents.
``batchtopk``
    Keep the ``k * batch`` largest activations of the whole batch (Bussmann et al. 2024, "BatchTopK Sparse
    Autoencoders"); at inference a JumpReLU with one threshold estimated during training.
``jumprelu``
    ``z * H(z - theta)`` with a learned threshold per latent, trained through straight-through estimators
    with a rectangle kernel of width ``bandwidth`` and an L0 penalty (Rajamanoharan et al. 2024, "Jumping
    Ahead"). The threshold is the parameter itself, clamped at 0 after each step (as SAELens and
    dictionary_learning do), not ``exp(log theta)`` as in the paper's appendix: under Adam a log threshold
    moves by about ``theta * lr`` per step and barely leaves a small initial value.

A transcoder (``transcoder=True``) reads ``d_in`` and writes ``d_out`` (Dunefsky et al. 2024); with
``skip=True`` it adds a linear skip path ``W_skip x`` (skip transcoders, Paulo et al. 2025).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from mechscope.core.errors import MechscopeError

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")
NORMALISATIONS = ("none", "expected_average_only_in")
DTYPES = ("float32", "float64", "float16", "bfloat16")


@dataclass(frozen=True)
class DictionaryConfig:
    """What a sparse dictionary computes.

    d_in, d_sae: input width and number of latents. d_out: output width of a transcoder (``d_in`` for an SAE).
    k: active latents per token (topk) or on average per token (batchtopk); unused otherwise.
    l1_coefficient: weight of the L1 penalty (relu). l0_coefficient: weight of the L0 penalty (jumprelu).
    bandwidth, init_threshold: the JumpReLU kernel width and the thresholds' starting value.
    apply_b_dec_to_input: subtract the decoder bias from the input before encoding (SAEs only; ``None``:
    on for an SAE, off for a transcoder, whose decoder bias lives in the output space).
    normalize_activations: ``"none"``, or ``"expected_average_only_in"``: inputs (and targets) are scaled so
    that their mean squared norm is ``d_in`` (``d_out``), the factor estimated from data before training and
    kept on the model so it can be folded back into the weights (Anthropic, April 2024 update; SAELens' name).
    aux_k: latents the AuxK loss uses (topk/batchtopk; ``None``: ``d_in // 2`` as in Gao et al. B.1);
    aux_k_coefficient: its weight (1/32 in Gao et al.; 0 turns it off).
    """

    d_in: int
    d_sae: int
    architecture: str = "relu"
    k: int | None = None
    l1_coefficient: float = 5.0
    l0_coefficient: float = 1.0
    bandwidth: float = 0.001
    init_threshold: float = 0.001
    apply_b_dec_to_input: bool | None = None
    normalize_activations: str = "none"
    transcoder: bool = False
    d_out: int | None = None
    skip: bool = False
    aux_k: int | None = None
    aux_k_coefficient: float = 1 / 32
    dtype: str = "float32"

    def __post_init__(self) -> None:
        _check_sizes(self)
        _check_method(self)
        if self.apply_b_dec_to_input is None:
            object.__setattr__(self, "apply_b_dec_to_input", not self.transcoder)
        if self.transcoder and self.apply_b_dec_to_input:
            raise MechscopeError("apply_b_dec_to_input needs an SAE: a transcoder's decoder bias is in output space")
        if self.d_out is None:
            object.__setattr__(self, "d_out", self.d_in)
        elif not self.transcoder and self.d_out != self.d_in:
            raise MechscopeError(f"expected d_out == d_in ({self.d_in}) for an SAE, got {self.d_out}; set transcoder")
        if self.skip and not self.transcoder:
            raise MechscopeError("expected transcoder=True with skip=True (a skip path belongs to a transcoder)")

    @property
    def uses_threshold(self) -> bool:
        """Whether the model carries a ``threshold`` (JumpReLU; BatchTopK at inference)."""
        return self.architecture in ("jumprelu", "batchtopk")

    @property
    def k_aux(self) -> int:
        """Latents the AuxK loss may use: ``aux_k``, else ``d_in // 2`` (Gao et al. 2024, B.1), at most d_sae."""
        return min(self.aux_k if self.aux_k is not None else max(1, self.d_in // 2), self.d_sae)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DictionaryConfig:
        """The config ``to_dict`` wrote; unknown keys are refused."""
        if not isinstance(data, dict):
            raise MechscopeError(f"expected a dictionary config (a JSON object), got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MechscopeError(f"unknown dictionary config keys: {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as e:
            raise MechscopeError(f"not a complete dictionary config: {e}") from None


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise MechscopeError(f"expected {name} to be a positive integer, got {value!r}")


def _finite_non_negative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise MechscopeError(f"expected {name} to be a finite number >= 0, got {value!r}")


def _check_sizes(cfg: DictionaryConfig) -> None:
    _positive_int("d_in", cfg.d_in)
    _positive_int("d_sae", cfg.d_sae)
    if cfg.d_out is not None:
        _positive_int("d_out", cfg.d_out)
    if cfg.dtype not in DTYPES:
        raise MechscopeError(f"expected dtype in {DTYPES}, got {cfg.dtype!r}")
    if cfg.normalize_activations not in NORMALISATIONS:
        raise MechscopeError(f"expected normalize_activations in {NORMALISATIONS}, got {cfg.normalize_activations!r}")


def _check_method(cfg: DictionaryConfig) -> None:
    if cfg.architecture not in ARCHITECTURES:
        raise MechscopeError(f"expected architecture in {ARCHITECTURES}, got {cfg.architecture!r}")
    for name in ("l1_coefficient", "l0_coefficient", "aux_k_coefficient"):
        _finite_non_negative(name, getattr(cfg, name))
    for name in ("bandwidth", "init_threshold"):
        _finite_non_negative(name, getattr(cfg, name))
        if getattr(cfg, name) == 0:
            raise MechscopeError(f"expected {name} > 0, got 0")
    if cfg.aux_k is not None:
        _positive_int("aux_k", cfg.aux_k)
    if cfg.architecture in ("topk", "batchtopk"):
        if cfg.k is None:
            raise MechscopeError(f"expected k (active latents per token) for architecture {cfg.architecture}")
        _positive_int("k", cfg.k)
        if cfg.k > cfg.d_sae:
            raise MechscopeError(f"expected k <= d_sae ({cfg.d_sae}), got k={cfg.k}")


ARCHITECTURE_OPTIONS = {"--k": ("topk", "batchtopk"), "--l1": ("relu",), "--l0": ("jumprelu",)}


def check_options(*, d_sae=None, expansion=None, l1_coefficient=None, steps=None, checkpoint_every=0, lr=None,
                  architecture=None, k=None) -> None:  # fmt: skip
    """Both wings' ``sae train`` options, each one line by its option before any work (the configs' own checks
    name their fields: ``max_steps``, ``l1_coefficient``); ``--d-sae`` and ``--expansion`` both given is a conflict
    (the expansion was ignored)."""
    from mechscope.core.validate import check_int, check_lr

    if d_sae is not None and expansion is not None:
        raise MechscopeError("give --d-sae or --expansion, not both (the width is d_in x expansion, or d_sae)")
    for name, v, low in (("--d-sae", d_sae, 1), ("--expansion", expansion, 1), ("--steps", steps, 1)):
        if v is not None:
            check_int(v, name, low, 10**9)
    check_int(checkpoint_every, "--checkpoint-every", 0, 10**9)
    v = l1_coefficient
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
        raise MechscopeError(f"--l1 must be a finite number >= 0, got {v!r}")
    if lr is not None:  # 1e39 overflowed inside Adam's step (a traceback), 0 trains nothing
        check_lr(lr)
    if architecture is not None:  # an option typed for another architecture was silently unread
        from mechscope.core.validate import typed_options

        typed = typed_options()
        wrong = [o for o, archs in ARCHITECTURE_OPTIONS.items() if o in typed and architecture not in archs]
        if wrong:
            raise MechscopeError(f"{', '.join(wrong)} not read by --architecture {architecture} (--k: topk and "
                                 "batchtopk; --l1: relu; --l0: jumprelu)")  # fmt: skip
    if k is not None and architecture in (None, "topk", "batchtopk"):  # after: "--k not read by relu" says more
        check_int(k, "--k", 1, 10**9)
