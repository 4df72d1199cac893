"""The training batch stream: checked full-batch ``(x, y)`` pairs, with a look-ahead for initialisation
and a skip for resuming."""

from __future__ import annotations

import torch
import torch.distributed as dist

from mechscope.core.dictionaries.config import DictionaryConfig
from mechscope.core.errors import MechscopeError


class BatchStream:
    """The batch stream as full-batch ``(x, y)`` pairs, checked, with a look-ahead for initialisation."""

    def __init__(self, cfg: DictionaryConfig, batches, group) -> None:
        try:
            self.it = iter(batches)
        except TypeError:
            raise MechscopeError(f"expected an iterable of activation batches, got {type(batches).__name__}") from None
        self.cfg, self.world = cfg, dist.get_world_size(group) if group is not None else 1
        self.peeked: list = []
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.peeked.pop(0) if self.peeked else self._check(next(self.it))
        self.index += 1
        return batch

    def peek_rows(self, rows: int) -> list:
        """The first batches holding at least ``rows`` rows (or all), kept for training."""
        while sum(b[0].shape[0] for b in self.peeked) < rows:
            try:
                self.peeked.append(self._check(next(self.it)))
            except StopIteration:
                break
        return list(self.peeked)

    def skip(self, n: int) -> None:
        for _ in range(n):
            try:
                next(self)
            except StopIteration:
                raise MechscopeError(
                    f"the data ended after {self.index} batches; the checkpoint had seen {n}"
                ) from None

    def _check(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        if cfg.transcoder:
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise MechscopeError("expected (input, target) pairs of tensors for a transcoder")
            x, y = batch
        else:
            if not isinstance(batch, torch.Tensor):
                raise MechscopeError(
                    f"expected activation batches as tensors [N, {cfg.d_in}], got {type(batch).__name__}"
                )
            x = y = batch
        for t, width, what in ((x, cfg.d_in, "input"), (y, cfg.d_out, "target")):
            if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape[1] != width or not t.is_floating_point():
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise MechscopeError(f"expected {what} batches as float tensors [N, {width}], got {got}")
        if x.shape[0] != y.shape[0] or x.shape[0] == 0 or x.shape[0] % self.world:
            raise MechscopeError(
                f"expected non-empty batches with as many targets as inputs and rows divisible by the "
                f"{self.world} ranks, got {x.shape[0]} inputs and {y.shape[0]} targets"
            )
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            raise MechscopeError("expected finite activations, got NaN or infinity in a batch")
        return x, y
