"""A lean GGUF reader: metadata and tensor directory parsed straight from the file's bytes.

The ``gguf`` package's GGUFReader builds a Python object for every value of every field, which
for a tokenizer of 49,152 tokens and 48,900 merges takes seconds; this parser reads the same
header in a fraction of that and leaves the tensor data memory-mapped. Dequantisation
(Q4_0, Q4_1, Q5_x, Q8_0, K-quants, F16, BF16, F32...) is the ``gguf`` package's own
``gguf.quants.dequantize``.

Format (little-endian): "GGUF", version u32, tensor count u64, metadata count u64; metadata
key/value pairs; tensor infos (name, n_dims u32, dims u64[n] fastest-first, type u32, offset
u64); padding to ``general.alignment`` (32); tensor data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mechscope.core.errors import MechscopeError

# value type -> (struct format, numpy dtype)
_SCALARS = {
    0: ("<B", "<u1"),
    1: ("<b", "<i1"),
    2: ("<H", "<u2"),
    3: ("<h", "<i2"),
    4: ("<I", "<u4"),
    5: ("<i", "<i4"),
    6: ("<f", "<f4"),
    7: ("<?", "?"),  # BOOL: read as booleans, scalar and array alike
    10: ("<Q", "<u8"),
    11: ("<q", "<i8"),
    12: ("<d", "<f8"),
}
_STRING, _ARRAY = 8, 9


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (slowest first)
    qtype: int
    offset: int


class _Cursor:
    def __init__(self, buf: memoryview | bytes, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        try:
            value = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise MechscopeError(f"{self.path}: GGUF header cut short (truncated file?)") from None
        self.pos += struct.calcsize(fmt)
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise MechscopeError(f"{self.path}: GGUF header cut short (truncated file?)")
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, depth: int = 0):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype][0])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, n = self.take("<I"), self.take("<Q")
            if itype in _SCALARS:
                size = np.dtype(_SCALARS[itype][1]).itemsize
                if self.pos + n * size > len(self.buf):
                    raise MechscopeError(
                        f"{self.path}: GGUF array of {n} values runs past the end of the file (truncated or corrupt)"
                    )
                arr = np.frombuffer(self.buf, dtype=_SCALARS[itype][1], count=n, offset=self.pos)
                self.pos += arr.nbytes
                return arr.tolist()
            if depth >= 4 or itype not in (_STRING, _ARRAY):
                raise MechscopeError(f"{self.path}: GGUF array of unknown value type {itype} (corrupt file?)")
            if n > len(self.buf) - self.pos:  # every item takes at least one byte
                raise MechscopeError(f"{self.path}: GGUF array of {n} items runs past the end of the file")
            return [self.value(itype, depth + 1) for _ in range(n)]
        raise MechscopeError(f"{self.path}: unknown GGUF value type {vtype} (corrupt file?)")


MAX_DIMS = 4  # ggml's GGML_MAX_DIMS


class GGUFFile:
    def __init__(self, path: Path, meta: dict, tensors: dict[str, TensorInfo], data: np.memmap, start: int) -> None:
        self.path, self.meta, self.tensors, self._data, self._start = path, meta, tensors, data, start

    @classmethod
    def open(cls, path: str | Path) -> GGUFFile:
        path = Path(path)
        if not path.is_file():
            raise MechscopeError(f"{path}: GGUF file not found")
        if path.stat().st_size == 0:  # numpy cannot map an empty file: "cannot mmap an empty file" said less
            raise MechscopeError(f"{path}: not a GGUF file (it is empty)")
        try:
            data = np.memmap(path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise MechscopeError(f"{path}: cannot read ({e})") from None
        if bytes(data[:4]) != b"GGUF":
            raise MechscopeError(f"{path}: not a GGUF file (bad magic number)")
        if len(data) < 24:
            raise MechscopeError(f"{path}: a truncated GGUF file ({len(data)} bytes; its header alone takes 24)")
        cur = _Cursor(memoryview(data), path)
        cur.pos = 4
        version, n_tensors, n_kv = cur.take("<I"), cur.take("<Q"), cur.take("<Q")
        if version not in (2, 3):
            raise MechscopeError(f"{path}: unsupported GGUF version {version}; expected 2 or 3")
        if n_kv * 13 > len(data) or n_tensors * 24 > len(data):  # the smallest entry of each takes 13 / 24 bytes
            raise MechscopeError(
                f"{path}: GGUF header counts {n_kv} metadata entries and {n_tensors} tensors, more than "
                f"{len(data)} bytes can hold (corrupt file?)"
            )
        meta = {}
        for _ in range(n_kv):
            key = cur.string()
            if key in meta:
                raise MechscopeError(f"{path}: GGUF metadata key {key} appears twice (corrupt file?)")
            meta[key] = cur.value(cur.take("<I"))
        tensors = {}
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.take("<I")
            if not 1 <= n_dims <= MAX_DIMS:
                raise MechscopeError(f"{path}: tensor {name} has {n_dims} dimensions; expected 1 to {MAX_DIMS}")
            dims = [cur.take("<Q") for _ in range(n_dims)]
            qtype, offset = cur.take("<I"), cur.take("<Q")
            if name in tensors:
                raise MechscopeError(f"{path}: tensor {name} appears twice in the GGUF header (corrupt file?)")
            if any(not 1 <= d <= len(data) for d in dims):
                raise MechscopeError(f"{path}: tensor {name} has dimensions {dims}; expected sizes ≥ 1 within the file")
            tensors[name] = TensorInfo(name, tuple(reversed(dims)), qtype, offset)
        align = meta.get("general.alignment", 32)
        if not isinstance(align, int) or isinstance(align, bool) or not 1 <= align <= 1 << 16 or align & (align - 1):
            raise MechscopeError(f"{path}: metadata general.alignment is {align!r}; expected a power of two ≤ 65536")
        start = (cur.pos + align - 1) // align * align
        g = cls(path, meta, tensors, data, start)
        for info in tensors.values():  # unknown types and a truncated file are caught here, not at first use
            nbytes = g._nbytes(info)
            if start + info.offset + nbytes > len(data):
                raise MechscopeError(f"{path}: tensor {info.name} runs past the end of the file (truncated?)")
        return g

    def _nbytes(self, info: TensorInfo) -> int:
        """The tensor's size in the file; an unknown type or a row not a whole number of blocks is an error."""
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        try:
            qtype = GGMLQuantizationType(info.qtype)
            block, size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise MechscopeError(f"{self.path}: tensor {info.name} has unknown type {info.qtype}") from None
        if info.shape[-1] % block:
            raise MechscopeError(
                f"{self.path}: tensor {info.name} has rows of {info.shape[-1]} values; {qtype.name} stores blocks "
                f"of {block}"
            )
        return int(np.prod(info.shape, dtype=object)) // block * size

    def tensor(self, name: str) -> np.ndarray:
        """A tensor dequantised to float32, in numpy/PyTorch layout."""
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import dequantize

        if name not in self.tensors:
            raise MechscopeError(f"{self.path}: tensor {name} is missing")
        info = self.tensors[name]
        try:
            qtype = GGMLQuantizationType(info.qtype)
        except ValueError:
            raise MechscopeError(f"{self.path}: tensor {name} has unknown type {info.qtype}") from None
        block, size = GGML_QUANT_SIZES[qtype]
        begin = self._start + info.offset
        raw = self._data[begin : begin + self._nbytes(info)]
        if qtype == GGMLQuantizationType.F32:
            out = np.array(raw.view(np.float32).reshape(info.shape))
        elif qtype == GGMLQuantizationType.F16:
            out = raw.view(np.float16).reshape(info.shape).astype(np.float32)
        else:
            rows = raw.reshape(*info.shape[:-1], info.shape[-1] // block * size)
            try:
                out = np.ascontiguousarray(dequantize(rows, qtype), dtype=np.float32)
            except NotImplementedError:
                raise MechscopeError(f"{self.path}: tensor {name}: {qtype.name} is not supported") from None
        if not np.isfinite(out).all():
            bad = int((~np.isfinite(out)).sum())
            raise MechscopeError(f"{self.path}: tensor {name} holds {bad} non-finite value(s) (NaN or infinity)")
        return out
