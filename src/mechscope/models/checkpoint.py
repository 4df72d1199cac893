"""Reading checkpoints one tensor at a time, straight into the dtype and device the model wants.

A converter asks for foreign tensors by name (``state["h.0.attn.c_attn.weight"]``) and slices,
transposes and reshapes them; a :class:`LazyState` hands out :class:`DeferredTensor` s that
record those steps (their shapes are known from the file's header, through a meta tensor) and
read the file only when ``build`` materialises them, one parameter at a time, largest first.
So the model's own tensors are the only copy in memory: peak memory while loading stays near
the model's size plus one tensor. Safetensors files are read with plain ``readinto`` into a fresh tensor (the
``safetensors`` library hands out memory-mapped tensors, whose touched pages count against
resident memory as a second copy); ``pytorch_model.bin`` goes through ``torch.load(mmap=True)``.

Partial checkpoints (weights-only work): a name the file lacks reads as a :class:`MissingTensor`
placeholder that absorbs indexing and transposes, so converters need no special case; the loader
then names what is absent.

Safetensors layout: u64 header length, a JSON header ``{name: {dtype, shape, data_offsets}}``,
then the bytes, offsets counted from the end of the header.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from mechscope.errors import MechscopeError

StateDict = dict[str, torch.Tensor]

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class MissingTensor:
    """Stands for a tensor a partial checkpoint does not hold.

    A converter indexes, slices and transposes its inputs; on a missing one every such step
    gives the same placeholder back, so converters need no special case for partial files.
    The placeholder never reaches a model: ``build`` leaves those parameters unallocated
    (on the meta device) and records their names in ``model.missing_weights``.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __getitem__(self, key) -> MissingTensor:
        return self

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return self if attr in ("T", "mT", "H") else (lambda *a, **k: self)

    def __repr__(self) -> str:
        return f"MissingTensor({self.name!r})"


class PartialState(dict):
    """A state dict whose absent entries read as :class:`MissingTensor` (for partial checkpoints)."""

    def __missing__(self, key: str) -> MissingTensor:
        return MissingTensor(key)

    def __contains__(self, key) -> bool:  # `name in state` stays truthful for optional tensors
        return dict.__contains__(self, key)


class DeferredTensor:
    """A tensor still in its file, with the indexing, transposes and reshapes asked of it so far.

    ``shape`` replays the steps on a meta tensor (no reading); :meth:`materialize` reads the
    file and replays them for real. ``a @ b`` defers too (OPT folds its projections that way).
    """

    def __init__(self, real: Callable[[], torch.Tensor], meta: Callable[[], torch.Tensor], ops: tuple = ()) -> None:
        self._real, self._meta, self._ops = real, meta, ops

    def _then(self, op: str, *args, **kwargs) -> DeferredTensor:
        return DeferredTensor(self._real, self._meta, (*self._ops, (op, args, kwargs)))

    def __getitem__(self, key) -> DeferredTensor:
        return self._then("__getitem__", key)

    @property
    def T(self) -> DeferredTensor:  # noqa: N802 (torch's name)
        return self._then("t")

    def __getattr__(self, attr: str):
        if attr.startswith("_"):
            raise AttributeError(attr)
        return lambda *args, **kwargs: self._then(attr, *args, **kwargs)

    def __matmul__(self, other) -> DeferredTensor:
        def side(x, how):
            return getattr(x, how)() if isinstance(x, DeferredTensor) else x

        return DeferredTensor(
            lambda: side(self, "materialize") @ side(other, "materialize"),
            lambda: side(self, "as_meta") @ side(other, "as_meta"),
        )

    def _replay(self, t: torch.Tensor) -> torch.Tensor:
        for op, args, kwargs in self._ops:
            t = getattr(t, op)(*args, **kwargs)
        return t

    def as_meta(self) -> torch.Tensor:
        return self._replay(self._meta())

    @property
    def shape(self) -> torch.Size:
        return self.as_meta().shape

    def materialize(self) -> torch.Tensor:
        return self._replay(self._real())


def materialize(t):
    """A real tensor from a :class:`DeferredTensor` (anything else as it is)."""
    return t.materialize() if isinstance(t, DeferredTensor) else t


class LazyState(Mapping):
    """Tensors by name as :class:`DeferredTensor` s, read and converted by ``convert`` when materialised.

    ``readers[name]`` is ``(read, meta)``: a function that reads the tensor and one that gives a
    meta tensor of its shape and dtype. Absent names read as :class:`MissingTensor` (as
    :class:`PartialState`); ``name in state`` tells what the file holds. Nothing is cached.
    """

    def __init__(self, readers: dict[str, tuple[Callable, Callable]], convert=lambda t: t) -> None:
        self._readers, self._convert = readers, convert

    def __getitem__(self, key: str):
        if key not in self._readers:
            return MissingTensor(key)
        read, meta = self._readers[key]
        return DeferredTensor(lambda: self._convert(read()), lambda: self._convert(meta()))

    def __contains__(self, key) -> bool:
        return key in self._readers

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)

    def renamed(self, rename: Callable[[str], str]) -> LazyState:
        return LazyState({rename(k): r for k, r in self._readers.items()}, self._convert)


def strip_prefix(state, prefix: str):
    """The same state dict (same type: a :class:`PartialState` stays one) without ``prefix`` on its names."""
    if isinstance(state, LazyState):
        return state.renamed(lambda k: k.removeprefix(prefix))
    return type(state)((k.removeprefix(prefix), v) for k, v in state.items())


def _safetensors_readers(path: Path) -> dict[str, tuple[Callable, Callable]]:
    """A reader per tensor of a safetensors file (header checked against the file's size)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise MechscopeError(f"{path}: corrupt or unreadable weights ({type(e).__name__}: {e})") from None
    start = 8 + n
    readers = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = SAFETENSORS_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise MechscopeError(f"{path}: corrupt or unreadable weights (tensor {name}: {info!r})") from None
        numel = 1
        for s in shape:
            numel *= s
        if start + end > size or end - begin != numel * dtype.itemsize:
            raise MechscopeError(f"{path}: corrupt or unreadable weights (tensor {name} runs past the file's end)")
        readers[name] = (_reader(path, start + begin, dtype, tuple(shape), numel), _meta(dtype, tuple(shape)))
    return readers


def _meta(dtype: torch.dtype, shape: tuple[int, ...]):
    return lambda: torch.empty(shape, dtype=dtype, device="meta")


def _reader(path: Path, offset: int, dtype: torch.dtype, shape: tuple[int, ...], numel: int):
    def read() -> torch.Tensor:
        out = torch.empty(numel, dtype=dtype)
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            view = memoryview(out.view(torch.uint8).numpy())
            got = 0
            while got < len(view):
                k = f.readinto(view[got:])
                if not k:
                    raise MechscopeError(f"{path}: corrupt or unreadable weights (file cut short)")
                got += k
        return out.view(shape)

    return read


def _bin_readers(path: Path) -> dict[str, tuple[Callable, Callable]]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a corrupt file
        raise MechscopeError(f"{path}: corrupt or unreadable weights ({type(e).__name__}: {e})") from None
    return {
        k: ((lambda v=v: v.clone()), _meta(v.dtype, tuple(v.shape)))  # clone: off the memory map
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
    }


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a Hugging Face directory: one or several safetensors, or a .bin."""
    single = directory / "model.safetensors"
    if single.exists():
        return [single]
    shards = sorted(directory.glob("model-*-of-*.safetensors")) or sorted(directory.glob("model-*.safetensors"))
    if shards:
        return shards
    for name in ("pytorch_model.bin",):
        if (directory / name).exists():
            return [directory / name]
    bins = sorted(directory.glob("pytorch_model-*-of-*.bin"))
    if bins:
        return bins
    raise MechscopeError(f"{directory}: no model.safetensors or pytorch_model.bin")


def open_checkpoint(directory: str | Path, dtype: torch.dtype | None = None, device=None) -> LazyState:
    """The directory's tensors, each read on demand and converted to ``dtype`` on ``device``.

    Integer and boolean tensors keep their dtype; ``dtype=None`` keeps the file's.
    """
    readers: dict[str, tuple[Callable, Callable]] = {}
    for path in weight_files(Path(directory)):
        readers.update(_safetensors_readers(path) if path.suffix == ".safetensors" else _bin_readers(path))

    def convert(t: torch.Tensor) -> torch.Tensor:
        target = dtype if dtype is not None and t.is_floating_point() else t.dtype
        return t.to(device="meta" if t.is_meta else device, dtype=target)

    return LazyState(readers, convert)


def read_state_dict(directory: Path) -> StateDict:
    """Every tensor of a directory, as stored (for tests and tools; loading reads lazily)."""
    state = open_checkpoint(directory)
    return {k: state[k].materialize() for k in state}
