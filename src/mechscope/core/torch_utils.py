"""Small torch utilities every part of mechscope uses: one way each to set eval mode, threads, count, time.

* :func:`evaluating` puts a model in eval mode for a block and restores every module's mode afterwards;
* :func:`torch_threads` runs a block with a number of torch threads, restored afterwards;
* :func:`n_parameters` counts a model's parameters;
* :class:`Timer` times named sections of a pipeline (``with timer.section("load"): ...``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

log = logging.getLogger(__name__)


@contextmanager
def evaluating(*models: nn.Module) -> Iterator[nn.Module]:
    """Put ``models`` in eval mode for a block and restore every submodule's train/eval mode afterwards, however
    the block ends. Yields the first model."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield models[0] if models else None
    finally:
        for m, mode in modes:
            m.training = mode


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run a block with ``n`` torch threads, restored afterwards (``None``: as they are). One thread: on a 2-core
    machine that anything else is using, two threads make small models 10-20 times slower (measured: 45 against
    900 ms per training step of the toy transformer); on a quiet machine one thread can cost a third more (``cnn
    visualize`` on the default run: 102 s against 74 s)."""
    from mechscope.core.validate import check_threads

    if n is None:
        yield
        return
    check_threads(n)  # a huge count crashes OpenMP (a segmentation fault, not an error)
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def described(x, dtype: bool = False) -> str:
    """A tensor as its shape (``[2, 10, 32]``, with its dtype first when asked), anything else as its type's name:
    what a one-line error says it got."""
    if not isinstance(x, torch.Tensor):
        return type(x).__name__
    return f"{x.dtype} {list(x.shape)}" if dtype else str(list(x.shape))


def n_parameters(model: nn.Module) -> int:
    """How many numbers the model's parameters hold."""
    return sum(p.numel() for p in model.parameters())


class Timer:
    """Seconds per named section of a pipeline; a section run twice adds up.

    ``with timer.section("ablation"): ...`` logs the section's name at INFO (``-v``) and adds its wall time
    to ``timer.seconds["ablation"]``. ``timer.total()`` is the time since the timer was made.
    """

    def __init__(self, what: str = "") -> None:
        self.seconds: dict[str, float] = {}
        self.what = what
        self._start = time.perf_counter()

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        log.info("%s%s", f"{self.what}: " if self.what else "", name)
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def add(self, name: str, seconds: float) -> None:
        """Record a time measured elsewhere (a model's loading, say)."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def total(self) -> float:
        return time.perf_counter() - self._start


class WorkCounter:
    """How much computing an analysis did: forward and backward passes through a model's layers, and over how
    many rows (tokens or images).

    ``layers`` are the modules one full pass runs once each (a transformer's blocks, a CNN's stages); each call of
    one adds its input's rows (``rows(x)``: batch × positions for tokens, batch for images). A pass that starts
    part-way (an intervention rerunning the layers after the one it changed) counts the layers it ran. So
    ``forward_rows / len(layers)`` is the rows pushed through the whole model, and dividing by the rows of one
    pass of the analysis' main batch gives the number of full passes it cost. Backward passes are counted the
    same way from the gradients reaching each layer's output. Hooks are removed (and stop counting) when the
    counting ends.
    """

    def __init__(self, layers, unit: str, rows=None) -> None:
        self.layers = list(layers)
        self.unit = unit
        self.rows = rows or (lambda x: int(x.shape[0]))
        self.forward_rows = 0
        self.backward_rows = 0
        self.forward_calls = 0
        self.backward_calls = 0

    @contextmanager
    def counting(self) -> Iterator[WorkCounter]:
        active = [True]

        def on_forward(module, args, kwargs):
            first = args[0] if args else next(iter(kwargs.values()), None)  # a layer called by keyword counts too
            if isinstance(first, torch.Tensor):
                self.forward_calls += 1
                self.forward_rows += self.rows(first)

        def on_backward(grad: torch.Tensor) -> None:
            if active[0]:  # a graph kept beyond the counting counts nothing more
                self.backward_calls += 1
                self.backward_rows += self.rows(grad)

        def on_output(module, args, out):
            # The gradient reaching the layer's output, by a hook on that tensor: a module's full backward hook
            # would wrap the output in a custom function, and an in-place operation after the layer (ReLU(inplace
            # =True), common in users' networks) then fails on it.
            out = out[0] if isinstance(out, (tuple, list)) and out else out
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(on_backward)

        handles = []
        try:
            for m in self.layers:
                handles.append(m.register_forward_pre_hook(on_forward, with_kwargs=True))
                handles.append(m.register_forward_hook(on_output))
            yield self
        finally:
            active[0] = False
            for h in handles:
                h.remove()

    def add(self, rows: int, calls: int = 1, *, backward: bool = False) -> None:
        """Count a forward (and with ``backward`` a backward) of ``rows`` rows in ``calls`` calls that no hook sees
        (a loop that calls a model's methods rather than its layers counts its own steps this way)."""
        self.forward_rows += rows
        self.forward_calls += calls
        if backward:
            self.backward_rows += rows
            self.backward_calls += calls

    def summary(self, rows_per_pass: int) -> dict:
        """The counts, and the equivalent number of full passes over a batch of ``rows_per_pass`` rows."""
        n = max(len(self.layers), 1)
        per = max(rows_per_pass, 1)
        return {
            "unit": self.unit,
            "rows_per_pass": rows_per_pass,
            "forward_passes": round(self.forward_rows / n / per, 3),
            "backward_passes": round(self.backward_rows / n / per, 3),
            f"forward_{self.unit}": self.forward_rows // n,
            f"backward_{self.unit}": self.backward_rows // n,
            "layer_calls": {"forward": self.forward_calls, "backward": self.backward_calls},
        }

    def report(self, what: str, rows_per_pass: int) -> dict:
        """:meth:`summary`, and the same counts as one line at INFO (``-v``): ``what: F forward and B backward
        passes of R <unit>``. Every pipeline records its work this way, for its JSON's ``work``."""
        return _logged(what, self.summary(rows_per_pass))


@contextmanager
def counting(counters: dict) -> Iterator[dict]:
    """Every :class:`WorkCounter` of ``counters`` (a dict: one per network or tower) counting at once; their hooks
    are removed when the block ends."""
    with ExitStack() as stack:
        for c in counters.values():
            stack.enter_context(c.counting())
        yield counters


def _logged(what: str, work: dict) -> dict:
    log.info("%s: %s forward and %s backward passes of %s %s", what, work["forward_passes"],
             work["backward_passes"], work["rows_per_pass"], work["unit"])  # fmt: skip
    return work


def combine_work(parts: dict[str, dict], what: str, rows_per_pass: int) -> dict:
    """Several :meth:`WorkCounter.summary` dicts of one unit (several models, of the same depth or not, or the
    phases of a command, each counted in its own full passes) added up and expressed in passes of ``rows_per_pass``
    rows, as :meth:`WorkCounter.report` does for one counter (the ``-v`` line included); ``parts``: each summary's
    passes in those units."""
    unit = next(iter(parts.values()))["unit"]
    per = max(rows_per_pass, 1)

    def passes(p: dict) -> dict:
        return {"forward_passes": round(p[f"forward_{unit}"] / per, 3),
                "backward_passes": round(p[f"backward_{unit}"] / per, 3)}  # fmt: skip

    fwd = sum(p[f"forward_{unit}"] for p in parts.values())
    bwd = sum(p[f"backward_{unit}"] for p in parts.values())
    work = {
        "unit": unit,
        "rows_per_pass": rows_per_pass,
        "forward_passes": round(fwd / per, 3),
        "backward_passes": round(bwd / per, 3),
        f"forward_{unit}": fwd,
        f"backward_{unit}": bwd,
        "layer_calls": {k: sum(p["layer_calls"][k] for p in parts.values()) for k in ("forward", "backward")},
        "parts": {name: passes(p) for name, p in parts.items()},
    }
    return _logged(what, work)


