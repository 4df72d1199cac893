"""Frozen configuration dataclasses; each run writes its config as config.json beside its outputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mechscope.errors import MechscopeError


@dataclass(frozen=True)
class TrainConfig:
    """How the MNIST CNN is trained.

    The defaults (5 epochs of AdamW with a one-cycle learning-rate schedule peaking at 5e-3,
    batch 128, each image shifted by up to 2 pixels) reach test accuracy above 0.992 in under
    a minute on a 2-core CPU; see bench/train_mnist.py.
    """

    epochs: int = 5
    batch_size: int = 128
    lr: float = 5e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.2
    seed: int = 0
    shift: int = 2  # augmentation: random translation of each image by up to this many pixels
    label_smoothing: float = 0.0
    train_limit: int | None = None  # use only the first N training images (quick runs, tests)
    max_steps: int | None = None  # stop after this many optimiser steps (quick runs, tests)

    def validate(self) -> None:
        if self.epochs < 1:
            raise MechscopeError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise MechscopeError(f"batch size must be at least 1, got {self.batch_size}")
        if not self.lr > 0:
            raise MechscopeError(f"learning rate must be positive, got {self.lr}")
        if self.train_limit is not None and self.train_limit < 1:
            raise MechscopeError(f"train limit must be at least 1, got {self.train_limit}")
        if self.shift < 0:
            raise MechscopeError(f"shift must be 0 or more pixels, got {self.shift}")
        if self.max_steps is not None and self.max_steps < 1:
            raise MechscopeError(f"max steps must be at least 1, got {self.max_steps}")

    def to_dict(self) -> dict:
        return asdict(self)
