"""Hypothesis strategies that corrupt inputs: bytes (truncation, flips, overwrites, insertions), JSON
(wrong types, absurd and missing fields, non-UTF-8, another top-level type), and the structured
headers of IDX, safetensors and GGUF (wrong magic, counts, dtypes, shapes, offsets)."""

from __future__ import annotations

import contextlib
import json
import struct
import warnings

import numpy as np
from hypothesis import strategies as st

from tests.fuzz.builders import image_arrays

ABSURD_INTS = [0, -1, 1, 2, 3, 7, 2**31 - 1, 2**31, 2**32, 2**53, 2**63 - 1, 2**63, 2**64, 10**30, -(2**63)]
ABSURD_FLOATS = [0.0, -0.0, 1e-300, 1e300, -1.5, 0.5, 1e30]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(ABSURD_INTS),
    st.integers(-1000, 1000),
    st.sampled_from(ABSURD_FLOATS),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(max_size=12),
    st.sampled_from(["", "relu", "gelu_new", "llama", "gpt2", "F32", "BOOL", "X9", "mnist", "idx", "npz", "cnn"]),
)
json_values = st.recursive(
    scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8
)


def _position(draw, n: int) -> int:
    """An index into n bytes, biased to the first 64 (where the headers are)."""
    if n <= 1:
        return 0
    return draw(st.one_of(st.integers(0, min(n - 1, 64)), st.integers(0, n - 1)))


@st.composite
def corrupt_bytes(draw, data: bytes) -> bytes:
    """``data`` truncated, with bytes flipped, overwritten, zeroed, inserted or appended, or emptied."""
    n = len(data)
    op = draw(st.sampled_from(["truncate", "flip", "overwrite", "zero", "insert", "append", "empty"]))
    if op == "empty" or n == 0:
        return b""
    if op == "truncate":
        return data[: _position(draw, n)]
    if op == "flip":
        b = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            b[_position(draw, n)] ^= draw(st.integers(1, 255))
        return bytes(b)
    if op == "overwrite":
        i, chunk = _position(draw, n), draw(st.binary(min_size=1, max_size=32))
        return data[:i] + chunk + data[i + len(chunk) :]
    if op == "zero":
        i = _position(draw, n)
        return data[:i] + b"\0" * draw(st.integers(1, 64)) + data[i + 64 :]
    if op == "insert":
        i = _position(draw, n)
        return data[:i] + draw(st.binary(min_size=1, max_size=32)) + data[i:]
    return data + draw(st.binary(min_size=1, max_size=64))


def _paths(obj, prefix=()) -> list[tuple]:
    """Every path (tuple of keys and indices) to a value inside obj."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append((*prefix, k))
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list) and len(obj) <= 16:
        for i, v in enumerate(obj):
            out.append((*prefix, i))
            out += _paths(v, (*prefix, i))
    return out


def _parent(obj, path):
    for k in path[:-1]:
        obj = obj[k]
    return obj


@st.composite
def corrupt_json_obj(draw, obj: dict):
    """A deep copy of ``obj`` with one to three fields set to other JSON values, deleted or added."""
    obj = json.loads(json.dumps(obj))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(obj)
        op = draw(st.sampled_from(["set", "set", "set", "delete", "add"]))
        if not paths or op == "add":
            target = obj if not paths else draw(st.sampled_from([obj] + [v for v in (_walk(obj, p) for p in paths)
                                                                          if isinstance(v, dict)]))  # fmt: skip
            target[draw(st.text(max_size=8))] = draw(json_values)
            continue
        path = draw(st.sampled_from(paths))
        parent = _parent(obj, path)
        if op == "delete":
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_values)
    return obj


def _walk(obj, path):
    for k in path:
        obj = obj[k]
    return obj


@st.composite
def corrupt_json_bytes(draw, obj: dict) -> bytes:
    """JSON text of ``obj`` with wrong or missing fields, another top-level type, or corrupt bytes."""
    op = draw(st.sampled_from(["fields", "fields", "fields", "toplevel", "bytes", "latin1", "nonfinite"]))
    if op == "fields":
        return json.dumps(draw(corrupt_json_obj(obj))).encode()
    if op == "toplevel":
        return json.dumps(draw(st.one_of(st.lists(json_values, max_size=3), scalars))).encode()
    if op == "latin1":
        return json.dumps(obj).replace('"', '"\xe9', 1).encode("latin-1", errors="replace")
    if op == "nonfinite":
        paths = [
            p for p in _paths(obj) if isinstance(_walk(obj, p), (int, float)) and not isinstance(_walk(obj, p), bool)
        ]
        if not paths:
            return json.dumps(obj).encode()
        copy = json.loads(json.dumps(obj))
        path = draw(st.sampled_from(paths))
        _parent(copy, path)[path[-1]] = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
        return json.dumps(copy).encode()  # NaN / Infinity literals: not JSON
    return draw(corrupt_bytes(json.dumps(obj, indent=1).encode()))


# ---- IDX ---------------------------------------------------------------------------------------


@st.composite
def corrupt_idx(draw, data: bytes) -> bytes:
    """An IDX file with its header rewritten (zero field, type, dims count, sizes) or its bytes corrupted."""
    if draw(st.booleans()):
        return draw(corrupt_bytes(data))
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    dims = list(struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim]))
    body = data[4 + 4 * ndim :]
    field = draw(st.sampled_from(["zero", "dtype", "ndim", "dims", "body"]))
    if field == "zero":
        zero = draw(st.integers(1, 0xFFFF))
    elif field == "dtype":
        dtype = draw(st.sampled_from([0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x00, 0xFF]))
    elif field == "ndim":
        ndim = draw(st.integers(0, 6))
        dims = (dims + [draw(st.integers(0, 40)) for _ in range(6)])[:ndim]
    elif field == "dims":
        i = draw(st.integers(0, len(dims) - 1))
        dims[i] = draw(st.one_of(st.integers(0, 64), st.sampled_from([2**32 - 1, 2**31, 2**16])))
    else:
        body = (
            body[: draw(st.integers(0, len(body)))] if draw(st.booleans()) else body + b"\1" * draw(st.integers(1, 99))
        )
    return struct.pack(">HBB", zero, dtype, ndim % 256) + struct.pack(f">{len(dims)}I", *dims) + body


# ---- safetensors -----------------------------------------------------------------------------


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


@st.composite
def corrupt_safetensors(draw, data: bytes) -> bytes:
    """A safetensors file with its JSON header's fields changed (dtype, shape, offsets, metadata), its length
    prefix wrong, or its bytes corrupted."""
    op = draw(st.sampled_from(["header", "header", "entry", "length", "bytes"]))
    if op == "bytes":
        return draw(corrupt_bytes(data))
    header, body = split_safetensors(data)
    if op == "length":
        raw = json.dumps(header).encode()
        n = draw(st.sampled_from([0, 1, len(raw) - 1, len(raw) + 1, 2**63, 2**64 - 1, len(raw) + len(body) + 1]))
        return struct.pack("<Q", n) + raw + body
    if op == "entry":
        name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        entry = header[name]
        key = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        entry[key] = draw(st.one_of(
            json_values,
            st.sampled_from(["F16", "BF16", "I64", "U8", "BOOL", "F64", "F8_E4M3", "Q4"]),
            st.lists(st.sampled_from(ABSURD_INTS), max_size=4),
            st.lists(st.integers(0, 4096), min_size=1, max_size=3),
        ))  # fmt: skip
    else:
        header = draw(corrupt_json_obj(header))
    raw = json.dumps(header).encode() if draw(st.booleans()) else draw(corrupt_json_bytes(header))
    return struct.pack("<Q", len(raw)) + raw + body


# ---- GGUF --------------------------------------------------------------------------------------


@st.composite
def corrupt_gguf_parts(draw, meta: list, tensors: list) -> dict:
    """Arguments of builders.gguf_bytes with the metadata or tensor directory changed."""
    meta, tensors = list(meta), list(tensors)
    version, alignment = 3, 32
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["drop_key", "value", "vtype", "add_key", "dup_key", "qtype", "shape",
                                   "drop_tensor", "add_tensor", "data", "version", "alignment"]))  # fmt: skip
        if op == "drop_key" and meta:
            meta.pop(draw(st.integers(0, len(meta) - 1)))
        elif op == "value" and meta:
            i = draw(st.integers(0, len(meta) - 1))
            key, vtype, _ = meta[i]
            if vtype in (4, 5, 10, 11, 0, 1, 2, 3):
                lim = {0: 255, 1: 127, 2: 65535, 3: 32767, 4: 2**32 - 1, 5: 2**31 - 1, 10: 2**64 - 1, 11: 2**63 - 1}[
                    vtype
                ]
                lo = 0 if vtype in (0, 2, 4, 10) else -lim - 1
                value = draw(st.one_of(st.sampled_from([lo, 0, 1, 2, lim]), st.integers(lo, min(lim, 4096))))
            elif vtype in (6, 12):
                value = draw(st.floats(width=32 if vtype == 6 else 64))
            elif vtype == 8:
                value = draw(st.one_of(st.text(max_size=10), st.sampled_from(["llama", "gpt2", "gptx", "smollm"])))
            elif vtype == 9:
                itype = meta[i][2][0]
                value = (itype, draw(st.lists(st.text(max_size=4) if itype == 8 else st.integers(0, 3), max_size=5)))
            else:
                value = draw(st.booleans())
            meta[i] = (key, vtype, value)
        elif op == "vtype" and meta:
            i = draw(st.integers(0, len(meta) - 1))
            key = meta[i][0]
            meta[i] = draw(st.sampled_from([(key, 8, "12"), (key, 6, 1.5), (key, 7, True), (key, 4, 3), (key, 12, -1.0),
                                            (key, 9, (4, [1, 2])), (key, 9, (8, ["a"])), (key, 11, -5)]))  # fmt: skip
        elif op == "add_key":
            keys = ["llama.rope.scaling.type", "llama.foo", "general.alignment", "tokenizer.ggml.add_bos_token", "x"]
            meta.append((draw(st.sampled_from(keys)), 4, draw(st.integers(0, 64))))
        elif op == "dup_key" and meta:
            meta.append(meta[draw(st.integers(0, len(meta) - 1))])
        elif op == "qtype" and tensors:
            i = draw(st.integers(0, len(tensors) - 1))
            name, shape, _, data = tensors[i]
            tensors[i] = (
                name,
                shape,
                draw(st.one_of(st.integers(0, 40), st.sampled_from([77, 2**31, 2**32 - 1]))),
                data,
            )
        elif op == "shape" and tensors:
            i = draw(st.integers(0, len(tensors) - 1))
            name, shape, q, data = tensors[i]
            shape = tuple(draw(st.lists(st.one_of(st.integers(0, 300), st.sampled_from([2**32, 2**62])), max_size=5)))
            tensors[i] = (name, shape, q, data)
        elif op == "drop_tensor" and tensors:
            tensors.pop(draw(st.integers(0, len(tensors) - 1)))
        elif op == "add_tensor":
            name = draw(st.sampled_from(["blk.1.attn_q.weight", "rope_freqs.weight", "output.weight", "extra"]))
            tensors.append((name, (8,), 0, b"\0" * 32))
        elif op == "data" and tensors:
            i = draw(st.integers(0, len(tensors) - 1))
            name, shape, q, data = tensors[i]
            if q == 0 and draw(st.booleans()):  # a non-finite weight
                data = struct.pack("<f", draw(st.sampled_from([float("nan"), float("inf")]))) + data[4:]
            else:
                data = data[: draw(st.integers(0, len(data)))]
            tensors[i] = (name, shape, q, data)
        elif op == "version":
            version = draw(st.sampled_from([0, 1, 4, 2**31]))
        elif op == "alignment":
            alignment = draw(st.sampled_from([1, 8, 64]))
            meta.append(("general.alignment", 4, draw(st.sampled_from([0, 3, 7, alignment, 2**20]))))
    return {"meta": meta, "tensors": tensors, "version": version, "alignment": alignment}


# ---- .npz arrays ----------------------------------------------------------------------------------

ARRAY_DTYPES = [np.uint8, np.int8, np.int64, np.float32, np.float64, np.bool_, np.complex64, np.uint16, "<U3"]


@st.composite
def corrupt_arrays(draw) -> dict:
    arrays = image_arrays()
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(arrays)))
        op = draw(st.sampled_from(["dtype", "shape", "drop", "nonfinite", "values", "length", "extra"]))
        a = arrays.get(key)
        if a is None or a.size == 0 or a.ndim == 0:
            continue
        with contextlib.suppress(OverflowError, ValueError, TypeError), _quiet_casts():  # an op it cannot take: skipped
            _array_op(draw, arrays, key, op, a)
    return arrays


@contextlib.contextmanager
def _quiet_casts():
    """Casting NaN to an integer or a complex to a real is the point of a corruption: not a warning in the run."""
    with np.errstate(invalid="ignore", over="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", np.exceptions.ComplexWarning)
        yield


def _array_op(draw, arrays, key, op, a) -> None:
    if op == "dtype":
        arrays[key] = a.astype(draw(st.sampled_from(ARRAY_DTYPES)))
    elif op == "shape":
        shape = draw(st.lists(st.integers(0, 12), min_size=0, max_size=5))
        arrays[key] = np.zeros(shape, dtype=a.dtype)
    elif op == "drop":
        del arrays[key]
    elif op == "nonfinite":
        b = a.astype(np.float32)
        b.flat[draw(st.integers(0, b.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        arrays[key] = b
    elif op == "values":
        b = a.astype(np.int64)
        b.flat[draw(st.integers(0, b.size - 1))] = draw(st.sampled_from(ABSURD_INTS[:10]))
        arrays[key] = b
    elif op == "length":
        arrays[key] = a[: draw(st.integers(0, len(a)))]
    else:
        arrays["extra_" + draw(st.text(min_size=1, max_size=5))] = a  # not "file": a keyword of np.savez
