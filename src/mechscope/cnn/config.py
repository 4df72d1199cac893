"""Frozen configuration dataclasses; each run writes its config as config.json beside its outputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mechscope.core.errors import MechscopeError
from mechscope.core.validate import check_lr, check_seed, check_types, repeated, scalar


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
        check_types(self, {
            "epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr",
            "seed": "--seed", "shift": "--shift", "train_limit": "--train-limit",
            "max_steps": "--max-steps",
        })
        if self.epochs < 1:
            raise MechscopeError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise MechscopeError(f"--batch-size must be at least 1, got {self.batch_size}")
        check_lr(self.lr)
        check_seed(self.seed)
        if not 0 <= self.warmup_fraction < 1:
            raise MechscopeError(f"warm-up fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0 <= self.weight_decay < 1 or not 0 <= self.label_smoothing < 1:
            raise MechscopeError(
                f"weight decay and label smoothing must be in [0, 1), got {self.weight_decay}, {self.label_smoothing}"
            )
        if self.train_limit is not None and self.train_limit < 1:
            raise MechscopeError(f"--train-limit must be at least 1, got {self.train_limit}")
        if self.shift < 0:
            raise MechscopeError(f"--shift must be 0 or more pixels, got {self.shift}")
        if self.max_steps is not None and self.max_steps < 1:
            raise MechscopeError(f"--max-steps must be at least 1, got {self.max_steps}")
        for name, value, high in (("--epochs", self.epochs, 10_000), ("--batch-size", self.batch_size, 65_536),
                                  ("--max-steps", self.max_steps, 10**8), ("--shift", self.shift, 64)):  # fmt: skip
            if value is not None and value > high:
                raise MechscopeError(f"{name} must be at most {high:,}, got {value:,}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ExplainSettings:
    """What `explain` measures and how (every default is the quick start's).

    ``classes``: the classes to find circuits for (None: all). ``patch``: the (clean, corrupted)
    class pair for activation patching (None: 8 and 3 on MNIST, else the pair the model confuses
    most). ``circuit_layer``: the stage whose channels circuits are made of (None: the last).
    ``n_mean``: training images the mean activations are taken over; ``held_out``: the next
    training images, for the circuits' held-out check.
    """

    classes: tuple[int | str, ...] | None = None  # indices or class names
    patch: tuple[int | str, int | str] | None = None
    n_pairs: int = 16
    tolerance: float = 0.01
    test_limit: int | None = None
    circuit_layer: str | None = None
    n_mean: int = 10_000
    held_out: int = 10_000
    resample_seed: int = 0
    batch_size: int = 2048

    def validate(self) -> None:
        check_types(self, {
            "n_pairs": "--pairs", "tolerance": "--tolerance", "test_limit": "--test-limit",
        })
        if self.n_pairs < 1:
            raise MechscopeError(f"--pairs must be at least 1, got {self.n_pairs}")
        if self.test_limit is not None and self.test_limit < 100:
            raise MechscopeError(f"--test-limit must be at least 100 images, got {self.test_limit}")
        if not 0 <= self.tolerance < 1:
            raise MechscopeError(f"--tolerance must be in [0, 1), got {self.tolerance}")
        check_seed(self.resample_seed, "resample_seed")
        for name, value in (("n_mean", self.n_mean), ("batch_size", self.batch_size)):
            if value < 1:
                raise MechscopeError(f"{name} must be at least 1, got {value}")
        if self.held_out < 0:
            raise MechscopeError(f"held_out must be 0 or more, got {self.held_out}")

    def resolve(self, class_names) -> ExplainSettings:
        """Classes given by name or index, as indices checked against ``class_names``."""
        from dataclasses import replace

        classes = tuple(class_index(c, class_names) for c in self.classes) if self.classes else None
        twice = repeated(classes or ())
        if twice:  # one circuit was searched and the settings recorded it twice
            raise MechscopeError(f"--class {class_names[twice[0]]} given more than once")
        patch = resolve_pair(self.patch, class_names) if self.patch else None
        return replace(self, classes=classes, patch=patch)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_pair(pair, class_names) -> tuple[int, int]:
    """A patching pair (clean, corrupted) of two different classes, by name or index, as indices."""
    if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__") or len(pair) != 2:  # (1,) was an IndexError
        raise MechscopeError(f"patch expects two classes (clean, corrupted), got {pair!r}")
    a, b = (class_index(c, class_names, "patching class") for c in pair)  # 10 of ten was an IndexError, -1 the 9
    if a == b:  # the gap to recover was 0: every share NaN
        raise MechscopeError(f"patching needs two different classes, got {pair[0]} and {pair[1]}")
    return a, b


def class_index(c: int | str, class_names, what: str = "class") -> int:
    """A class given by its name or its index, as an index checked against ``class_names``; one line otherwise."""
    import numbers
    import re

    k = len(class_names)
    if isinstance(c, str) and c in class_names:
        return list(class_names).index(c)
    c = scalar(c)  # a class out of a tensor or an array of them
    whole = isinstance(c, numbers.Integral) and not isinstance(c, bool)  # int(3.7) was class 3, int(True) class 1
    digits = isinstance(c, str) and re.fullmatch(r"-?[0-9]+", c.strip()) is not None  # not "³" (int() refuses it)
    if not (whole or digits):
        raise MechscopeError(f"unknown {what} {c!r}; expected 0..{k - 1} or a class name")
    i = int(c)
    if not 0 <= i < k:
        raise MechscopeError(f"{what} {i} out of range: expected 0..{k - 1}")
    return i
