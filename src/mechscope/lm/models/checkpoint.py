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

from mechscope.core.errors import MechscopeError

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
    meta tensor of its shape and dtype. Absent names read as :class:`MissingTensor`;
    ``name in state`` tells what the file holds. Nothing is cached.
    """

    def __init__(
        self, readers: dict[str, tuple[Callable, Callable]], convert=lambda t: t, used: set | None = None, names=None
    ) -> None:
        self._readers, self._convert = readers, convert
        self.used = used if used is not None else set()  # the file's names asked for (shared with renamed views)
        self._names = names or {k: k for k in readers}  # our name -> the file's name

    def __getitem__(self, key: str):
        if key not in self._readers:
            return MissingTensor(key)
        self.used.add(self._names[key])
        read, meta = self._readers[key]
        return DeferredTensor(lambda: self._convert(read()), lambda: self._convert(meta()))

    def unused(self) -> list[str]:
        """The file's tensors no converter asked for (a checkpoint must match its config exactly)."""
        return sorted(set(self._names.values()) - self.used)

    def __contains__(self, key) -> bool:
        return key in self._readers

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)

    def renamed(self, rename: Callable[[str], str]) -> LazyState:
        names = {rename(k): self._names[k] for k in self._readers}
        return LazyState({rename(k): r for k, r in self._readers.items()}, self._convert, self.used, names)


def strip_prefix(state, prefix: str):
    """The same state dict (same type) without ``prefix`` on its names."""
    if isinstance(state, LazyState):
        return state.renamed(lambda k: k.removeprefix(prefix))
    return type(state)((k.removeprefix(prefix), v) for k, v in state.items())


def _safetensors_readers(path: Path) -> dict[str, tuple[Callable, Callable]]:
    """A reader per tensor of a safetensors file, every header field checked against the file.

    Header: a u64 length, then a JSON object ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``
    (and an optional ``__metadata__`` of strings); offsets count from the end of the header and every
    tensor's bytes must lie inside the file and match its dtype and shape.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MechscopeError(f"{path}: {size} bytes, too short for a safetensors file (8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise MechscopeError(
                    f"{path}: header length {n} runs past the file's end ({size} bytes); truncated or not safetensors"
                )
            raw = f.read(n)
    except OSError as e:
        raise MechscopeError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise MechscopeError(f"{path}: corrupt safetensors header (not JSON: {type(e).__name__})") from None
    if not isinstance(header, dict):
        raise MechscopeError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}; expected an object)")
    start = 8 + n
    readers = {}
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise MechscopeError(f"{path}: safetensors field '__metadata__' must map strings to strings")
            continue
        where = f"{path}: tensor {name}"
        if not isinstance(info, dict):
            raise MechscopeError(f"{where}: header entry is {type(info).__name__}; expected an object")
        dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype_name, str) or dtype_name not in SAFETENSORS_DTYPES:
            raise MechscopeError(
                f"{where}: field 'dtype' is {dtype_name!r}; expected one of {', '.join(SAFETENSORS_DTYPES)}"
            )
        if not isinstance(shape, list) or not all(_count(s) for s in shape):
            raise MechscopeError(f"{where}: field 'shape' is {shape!r}; expected a list of sizes ≥ 0")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)):
            raise MechscopeError(f"{where}: field 'data_offsets' is {offsets!r}; expected [begin, end]")
        dtype, (begin, end) = SAFETENSORS_DTYPES[dtype_name], offsets
        numel = 1
        for s in shape:
            numel *= s
        if begin > end or end - begin != numel * dtype.itemsize:
            raise MechscopeError(
                f"{where}: data_offsets {offsets} hold {end - begin} bytes; shape {shape} in {dtype_name} "
                f"needs {numel * dtype.itemsize}"
            )
        if start + end > size:
            raise MechscopeError(f"{where}: runs past the file's end ({start + end} > {size} bytes; truncated?)")
        spans.append((begin, end, name))
        readers[name] = (_reader(path, start + begin, dtype, tuple(shape), numel), _meta(dtype, tuple(shape)))
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:], strict=False):
        if begin_b < end_a:
            raise MechscopeError(f"{path}: tensors {a} and {b} overlap in the file (corrupt header)")
    return readers


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**53


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
    origin: dict[str, Path] = {}
    files = weight_files(Path(directory))
    for path in files:
        found = _safetensors_readers(path) if path.suffix == ".safetensors" else _bin_readers(path)
        for name in found:
            if name in origin:
                raise MechscopeError(f"{path}: tensor {name} is in {origin[name].name} too (shards overlap)")
            origin[name] = path
        readers.update(found)
    _check_index(Path(directory), files, origin)

    def convert(t: torch.Tensor) -> torch.Tensor:
        target = dtype if dtype is not None and t.is_floating_point() else t.dtype
        return t.to(device="meta" if t.is_meta else device, dtype=target)

    return LazyState(readers, convert)


INDEX = "model.safetensors.index.json"


def _check_index(directory: Path, files: list[Path], origin: dict[str, Path]) -> None:
    """A sharded checkpoint's index: every tensor it names in the shard it names, and no other."""
    path = directory / INDEX
    if not path.exists() or len(files) < 2:
        return
    from mechscope.core.validate import field, read_json_object

    weight_map = field(read_json_object(path, "safetensors index"), "weight_map", "object", path)
    for name, file in weight_map.items():
        if not isinstance(file, str):
            raise MechscopeError(f"{path}: field 'weight_map.{name}' is {file!r}; expected a shard's file name")
        if name not in origin:
            raise MechscopeError(f"{path}: names tensor {name}, which no shard holds (a shard missing or cut?)")
        if origin[name].name != file:
            raise MechscopeError(f"{path}: puts tensor {name} in {file}; it is in {origin[name].name}")
    unlisted = sorted(set(origin) - set(weight_map))
    if unlisted:
        raise MechscopeError(f"{path}: does not list tensor {unlisted[0]} (in {origin[unlisted[0]].name})")
