"""An on-disk activation store: harvest ``[N, d]`` batches into shuffled safetensors shards, stream them back.

Writing (:func:`harvest`): rows fill a buffer of ``buffer_rows`` rows (a whole number of shards). A full buffer
is one *window*: it is permuted (generator seeded by ``seed`` and the window's index) and written as
``buffer_rows / shard_rows`` shards, then ``manifest.json`` records the window. Memory holds the buffer, one
shard being written and one incoming batch, whatever the corpus size. A harvest stopped part-way and started
again with the same settings and the same input replays the input, skips the rows already in shards, and
writes the same shards as an uninterrupted harvest; a finished one is not redone.

Reading (:class:`ActivationReader`): each epoch visits the shards in a seeded order, ``mix_shards`` at a time,
shuffles their rows together with what is left of the previous group, and yields batches. Rows from
different windows are thus mixed at reading time. ``split=(d_in, d_out)`` yields ``(x, y)`` pairs from stored
rows that are ``[x, y]`` side by side (how a transcoder's input and target are harvested together).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from mechscope.core.errors import MechscopeError
from mechscope.core.results import Result

MANIFEST = "manifest.json"
SCHEMA = "mechscope.activation_store/1"
_SETTINGS = ("width", "dtype", "shard_rows", "buffer_rows", "seed")


@dataclass(frozen=True)
class HarvestResult(Result):
    """A harvest: where, how many rows of what width, in how many shards, and how fast (this session)."""

    SCHEMA: ClassVar[str] = "mechscope.harvest/1"

    directory: str
    rows: int
    width: int
    shards: int
    complete: bool
    resumed_rows: int
    seconds: float
    rows_per_second: float
    peak_rows_held: int


def _generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63))


class _Writer:
    """The shuffle buffer and the manifest of one store directory."""

    def __init__(self, directory: Path, shard_rows: int, buffer_rows: int, seed: int) -> None:
        self.dir, self.shard_rows, self.buffer_rows, self.seed = directory, shard_rows, buffer_rows, seed
        self.manifest: dict = {}
        self.buffer: torch.Tensor | None = None
        self.filled = 0
        self.peak = 0

    def open(self, width: int, dtype: torch.dtype) -> None:
        settings = {
            "width": width,
            "dtype": str(dtype).removeprefix("torch."),
            "shard_rows": self.shard_rows,
            "buffer_rows": self.buffer_rows,
            "seed": self.seed,
        }
        old = _read_manifest(self.dir) if (self.dir / MANIFEST).exists() else None
        if old is not None:
            for key in _SETTINGS:
                if old.get(key) != settings[key]:
                    raise MechscopeError(
                        f"{self.dir}: the store was started with {key}={old.get(key)!r}, "
                        f"this harvest has {settings[key]!r}; use the same settings or a new directory"
                    )
            self.manifest = old
        else:
            self.manifest = {"schema": SCHEMA, **settings, "rows": 0, "windows": 0, "shards": [], "complete": False}
        self.buffer = torch.empty(self.buffer_rows, width, dtype=dtype)

    def add(self, rows: torch.Tensor) -> None:
        """Copy ``rows [n, width]`` into the buffer, writing a window each time it fills."""
        self.peak = max(self.peak, self.filled + rows.shape[0])
        start = 0
        while start < rows.shape[0]:
            take = min(self.buffer_rows - self.filled, rows.shape[0] - start)
            self.buffer[self.filled : self.filled + take] = rows[start : start + take]
            self.filled += take
            start += take
            if self.filled == self.buffer_rows:
                self.flush(complete=False)

    def flush(self, complete: bool) -> None:
        """Write the buffer's rows (a permuted window) as shards and record them in the manifest."""
        m = self.manifest
        if self.filled:
            perm = torch.randperm(self.filled, generator=_generator(self.seed, m["windows"]))
            for start in range(0, self.filled, self.shard_rows):
                name = f"shard-{len(m['shards']):06d}.safetensors"
                rows = self.buffer[perm[start : start + self.shard_rows]]
                tmp = self.dir / f".{name}.tmp"
                save_file({"activations": rows.contiguous()}, str(tmp))
                os.replace(tmp, self.dir / name)
                m["shards"].append({"file": name, "rows": int(rows.shape[0])})
            m["rows"] += self.filled
            m["windows"] += 1
            self.filled = 0
        m["complete"] = complete
        _write_manifest(self.dir, m)


def harvest(
    batches,
    directory,
    *,
    shard_rows: int = 65536,
    buffer_rows: int | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    input_offset: int = 0,
) -> HarvestResult:
    """Store every row of ``batches`` (an iterable of ``[N, d]`` float tensors) under ``directory``.

    buffer_rows: the shuffle buffer (a multiple of shard_rows; default 4 shards). dtype: what to store (default:
    the first batch's). input_offset: the batches start this many rows into the input (a caller resuming a
    harvest skipped them itself; see :func:`stored_rows`). Returns a :class:`HarvestResult` with the throughput
    (rows per second).
    """
    (result,) = harvest_many(
        ([b] for b in batches), [directory], shard_rows=shard_rows, buffer_rows=buffer_rows, seed=seed, dtype=dtype,
        progress=progress, input_offset=input_offset,
    )  # fmt: skip
    return result


def stored_rows(directory) -> int:
    """Rows already in the store at ``directory`` (0 when there is none yet); a finished store counts whole."""
    where = Path(directory) / MANIFEST
    return int(_read_manifest(Path(directory))["rows"]) if where.exists() else 0


def harvest_many(
    batches,
    directories,
    *,
    shard_rows: int = 65536,
    buffer_rows: int | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    input_offset: int = 0,
) -> list[HarvestResult]:
    """:func:`harvest` into several stores from one pass: ``batches`` yields a list of ``[N, d_i]`` tensors per
    step, one per directory (the same N for all: rows of one input, e.g. several hook points of one forward)."""
    buffer_rows = 4 * shard_rows if buffer_rows is None else buffer_rows
    for name, value in (("shard_rows", shard_rows), ("buffer_rows", buffer_rows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MechscopeError(f"expected {name} to be a positive integer, got {value!r}")
    if buffer_rows % shard_rows:
        raise MechscopeError(f"expected buffer_rows to be a multiple of shard_rows ({shard_rows}), got {buffer_rows}")
    if isinstance(input_offset, bool) or not isinstance(input_offset, int) or input_offset < 0:
        raise MechscopeError(f"expected input_offset to be an integer >= 0, got {input_offset!r}")
    directories = [Path(d) for d in directories]
    if not directories:
        raise MechscopeError("expected at least one store directory")
    for d in directories:
        d.mkdir(parents=True, exist_ok=True)
    writers = [_Writer(d, shard_rows, buffer_rows, seed) for d in directories]
    started, skips, resumed, seen = time.perf_counter(), None, [0] * len(writers), 0
    done = False
    bar = tqdm(unit="rows", unit_scale=True, disable=not progress, desc="harvest")
    try:
        for step in batches:
            if len(step) != len(writers):
                raise MechscopeError(f"expected {len(writers)} activation batches per step, got {len(step)}")
            step = [_check_batch(b, w) for b, w in zip(step, writers, strict=True)]
            if len({b.shape[0] for b in step}) != 1:
                raise MechscopeError("expected the same number of rows for every store in one step")
            if skips is None:
                for w, b in zip(writers, step, strict=True):
                    w.open(b.shape[1], dtype or b.dtype)
                resumed = [w.manifest["rows"] for w in writers]
                if any(w.manifest["complete"] for w in writers):
                    if not all(w.manifest["complete"] for w in writers):
                        raise MechscopeError(f"{directories[0].parent}: some stores are finished and some not")
                    done = True
                    break
                skips = []
                for d, r in zip(directories, resumed, strict=True):
                    if r < input_offset:
                        raise MechscopeError(
                            f"{d}: the store holds {r} rows; the input was said to start at row {input_offset}"
                        )
                    skips.append(r - input_offset)
            for i, (w, b) in enumerate(zip(writers, step, strict=True)):
                b = b.to(w.buffer.dtype)
                if skips[i]:
                    cut = min(skips[i], b.shape[0])
                    b, skips[i] = b[cut:], skips[i] - cut
                w.add(b)
            seen += step[0].shape[0]
            bar.update(step[0].shape[0])
    finally:
        bar.close()
    if writers[0].buffer is None:
        raise MechscopeError("expected activation batches to store, got an empty stream")
    if not done and any(skips):
        raise MechscopeError(
            f"{directories[0]}: the input ended before the {resumed[0]} rows already stored; is it the same input?"
        )
    for w in writers:
        if not w.manifest["complete"]:
            w.flush(complete=True)
    seconds = time.perf_counter() - started
    out = []
    for d, w, r in zip(directories, writers, resumed, strict=True):
        m = w.manifest
        out.append(HarvestResult(str(d), m["rows"], m["width"], len(m["shards"]), True, r, seconds,
                                 seen / seconds if seconds > 0 else 0.0, w.peak))  # fmt: skip
    return out


def _check_batch(batch, writer: _Writer) -> torch.Tensor:
    if not isinstance(batch, torch.Tensor) or batch.ndim != 2 or not batch.is_floating_point():
        got = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
        raise MechscopeError(f"expected activation batches as float tensors [N, d], got {got}")
    if writer.buffer is not None and batch.shape[1] != writer.buffer.shape[1]:
        raise MechscopeError(f"expected batches of width {writer.buffer.shape[1]}, got {batch.shape[1]}")
    if not torch.isfinite(batch).all():
        raise MechscopeError("expected finite activations, got NaN or infinity in a batch")
    return batch.detach().cpu()


def _write_manifest(directory: Path, manifest: dict) -> None:
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    os.replace(tmp, directory / MANIFEST)


def _read_manifest(directory: Path) -> dict:
    where = Path(directory) / MANIFEST
    try:
        m = json.loads(where.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MechscopeError(f"{where}: not found (expected an activation store)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MechscopeError(f"{where}: not a readable manifest ({type(e).__name__})") from None
    if not isinstance(m, dict) or m.get("schema") != SCHEMA or not isinstance(m.get("shards"), list):
        raise MechscopeError(f"{where}: expected a {SCHEMA} manifest")
    return m


class ActivationReader:
    """Shuffled batches ``[batch_size, d]`` (or ``(x, y)`` with ``split``) from a store, ``epochs`` times.

    Memory holds ``mix_shards`` shards and one batch. The order depends only on ``seed`` (and the store).
    """

    def __init__(
        self,
        directory,
        batch_size: int,
        *,
        seed: int = 0,
        mix_shards: int = 4,
        epochs: int = 1,
        split: tuple[int, int] | None = None,
        drop_last: bool = True,
    ) -> None:
        self.dir = Path(directory)
        self.manifest = _read_manifest(self.dir)
        for name, value in (("batch_size", batch_size), ("mix_shards", mix_shards), ("epochs", epochs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MechscopeError(f"expected {name} to be a positive integer, got {value!r}")
        if split is not None and (len(split) != 2 or sum(split) != self.manifest["width"] or min(split) < 1):
            raise MechscopeError(f"expected split (d_in, d_out) adding up to the stored width {self.manifest['width']}")
        if not self.manifest["shards"]:
            raise MechscopeError(f"{self.dir}: the store holds no shards")
        self.batch_size, self.seed, self.mix, self.epochs = batch_size, seed, mix_shards, epochs
        self.split, self.drop_last = split, drop_last

    @property
    def rows(self) -> int:
        return int(self.manifest["rows"])

    def __iter__(self):
        shards = self.manifest["shards"]
        left = None
        for epoch in range(self.epochs):
            order = torch.randperm(len(shards), generator=_generator(self.seed, epoch)).tolist()
            for g, start in enumerate(range(0, len(order), self.mix)):
                pool = [self._load(shards[i]) for i in order[start : start + self.mix]]
                pool = torch.cat(([left] if left is not None else []) + pool)
                pool = pool[torch.randperm(pool.shape[0], generator=_generator(self.seed + 1, epoch * 1_000_000 + g))]
                full = pool.shape[0] // self.batch_size * self.batch_size
                for b in range(0, full, self.batch_size):
                    yield self._out(pool[b : b + self.batch_size])
                left = pool[full:] if full < pool.shape[0] else None
        if left is not None and not self.drop_last:
            yield self._out(left)

    def _out(self, rows: torch.Tensor):
        return rows if self.split is None else (rows[:, : self.split[0]], rows[:, self.split[0] :])

    def _load(self, entry: dict) -> torch.Tensor:
        where = self.dir / str(entry.get("file"))
        try:
            t = load_file(str(where))["activations"]
        except (OSError, SafetensorError, KeyError) as e:
            raise MechscopeError(f"{where}: not a readable shard ({type(e).__name__})") from None
        if t.ndim != 2 or t.shape != (entry.get("rows"), self.manifest["width"]):
            raise MechscopeError(f"{where}: shape {list(t.shape)} does not match the manifest")
        return t
