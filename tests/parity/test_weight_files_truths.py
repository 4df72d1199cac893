"""Weight files against outside truths: the ``gguf`` package's writer and reader (every metadata type, alignments,
a 4-D tensor, version 2, Q8_0), safetensors' ``load_file`` and ``safe_open``, checkpoints sharded by hand with the
index written with ``json``, and ``torch.save``'s .bin shards (model loading and the folded view:
test_loading_folding_truths)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import GGUFValueType as T  # noqa: E402
from safetensors import SafetensorError, safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from mechscope.core.errors import MechscopeError  # noqa: E402
from mechscope.lm.models.checkpoint import open_checkpoint  # noqa: E402
from mechscope.lm.models.gguf_file import GGUFFile  # noqa: E402
from tests.fuzz.builders import gguf_bytes, gguf_parts, gpt2_state  # noqa: E402

# ---- GGUF ---------------------------------------------------------------------------------------

# one value per metadata type, each outside the range of the type it could be mistaken for
SCALARS = {
    "u8": (200, T.UINT8), "i8": (-100, T.INT8), "u16": (60000, T.UINT16), "i16": (-30000, T.INT16),
    "u32": (4_000_000_000, T.UINT32), "i32": (-2_000_000_000, T.INT32), "u64": (2**63 + 5, T.UINT64),
    "i64": (-(2**62) - 3, T.INT64), "f32": (1.5, T.FLOAT32), "f64": (0.1, T.FLOAT64), "yes": (True, T.BOOL),
    "no": (False, T.BOOL), "str": ("héllo wörld", T.STRING),
}  # fmt: skip
ARRAYS = {
    "a.u8": ([250, 1, 7], T.UINT8), "a.i16": ([-5, 7, -30000], T.INT16), "a.u64": ([2**64 - 1, 3], T.UINT64),
    "a.i64": ([-1, 2**40], T.INT64), "a.f64": ([0.1, -2.5], T.FLOAT64), "a.f32": ([0.5, -1.25, 3.0], T.FLOAT32),
    "a.str": (["a", "bé", ""], T.STRING),
}  # fmt: skip


def gguf_write(path, tensors: dict, kv: dict, align: int | None = None):
    """The ``gguf`` package's writer: ``kv`` maps a key to (value, type[, item type]); F32 tensors."""
    w = gguf.GGUFWriter(str(path), "llama")
    if align is not None:
        w.add_custom_alignment(align)
    for key, (value, vtype, *sub) in kv.items():
        w.add_key_value(key, value, vtype, sub_type=sub[0] if sub else None)
    for name, array in tensors.items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_metadata_of_every_value_type_is_what_was_written(tmp_path):
    """Truth: the values handed to GGUFWriter (u16 60000, u64 2⁶³+5, f64 0.1, ...), as GGUFReader reads them back;
    booleans come back as ``bool``."""
    kv = {f"k.{n}": v for n, v in SCALARS.items()} | {k: (v, T.ARRAY, t) for k, (v, t) in ARRAYS.items()}
    path = gguf_write(tmp_path / "m.gguf", {"w": np.ones((2, 32), np.float32)}, kv)
    ours, theirs = GGUFFile.open(path).meta, gguf.GGUFReader(path).fields
    for key, (value, *_) in kv.items():
        assert ours[key] == value == theirs[key].contents(), key
        assert type(ours[key]) is type(value), key


def test_gguf_nested_array_is_what_was_written(tmp_path):
    """Truth: an array of int32 arrays and one of string arrays written by GGUFWriter (GGUFReader's ``contents``
    flattens nested arrays, so the written literal is the reference)."""
    kv = {"n.int": ([[1, -2], [3]], T.ARRAY, T.ARRAY), "n.str": ([["x", "y"], ["z"]], T.ARRAY, T.ARRAY)}
    meta = GGUFFile.open(gguf_write(tmp_path / "n.gguf", {"w": np.ones((2, 32), np.float32)}, kv)).meta
    assert meta["n.int"] == [[1, -2], [3]] and meta["n.str"] == [["x", "y"], ["z"]]


def test_gguf_bool_array_reads_as_booleans(tmp_path):
    """Truth: GGUFReader's ``contents()`` of a BOOL array written by GGUFWriter: ``[True, False]`` (ours read the
    integers [1, 0], which write to JSON differently)."""
    kv = {"b": ([True, False], T.ARRAY, T.BOOL)}
    path = gguf_write(tmp_path / "b.gguf", {"w": np.ones((2, 32), np.float32)}, kv)
    assert gguf.GGUFReader(path).fields["b"].contents() == [True, False]
    assert [type(v) for v in GGUFFile.open(path).meta["b"]] == [bool, bool]


def test_gguf_four_dimensional_tensor_matches_reader(tmp_path):
    """Truth: GGUFReader's array of a 4-D F32 tensor (ggml's maximum) with four distinct sizes."""
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 8)).astype(np.float32)
    path = gguf_write(tmp_path / "t.gguf", {"t": x}, {})
    got = GGUFFile.open(path).tensor("t")
    np.testing.assert_array_equal(got, np.asarray(gguf.GGUFReader(path).tensors[0].data))
    np.testing.assert_array_equal(got, x)


def header_end(path) -> int:
    return max(t.field.offset + sum(p.nbytes for p in t.field.parts) for t in gguf.GGUFReader(path).tensors)


def test_gguf_header_ending_on_the_alignment_needs_no_padding(tmp_path):
    """Truth: GGUFReader's tensor data for a file whose tensor directory ends exactly on a 32-byte boundary (the
    key's length is chosen so): the data then starts right there, not 32 bytes later."""
    x = np.arange(64, dtype=np.float32).reshape(2, 32)
    for n in range(32):
        path = gguf_write(tmp_path / f"a{n}.gguf", {"w": x}, {"pad." + "x" * n: (1, T.UINT8)})
        if header_end(path) % 32 == 0:
            break
    else:
        pytest.fail("no key length put the header end on the alignment")
    np.testing.assert_array_equal(GGUFFile.open(path).tensor("w"), x)


@pytest.mark.parametrize("align", [8, 16, 128])
def test_gguf_custom_alignments_match_reader(tmp_path, align):
    """Truth: GGUFReader's ``alignment`` and tensor data for files written with ``add_custom_alignment``."""
    x = np.random.default_rng(align).standard_normal((3, 32)).astype(np.float32)
    y = np.random.default_rng(align + 1).standard_normal((5,)).astype(np.float32)
    path = gguf_write(tmp_path / "a.gguf", {"x": x, "y": y}, {}, align=align)
    assert gguf.GGUFReader(path).alignment == align
    g = GGUFFile.open(path)
    np.testing.assert_array_equal(g.tensor("x"), x)
    np.testing.assert_array_equal(g.tensor("y"), y)


def test_gguf_alignment_not_a_power_of_two_refused(tmp_path):
    """Truth: ggml's gguf.cpp refuses a ``general.alignment`` that is not a power of two (here 48)."""
    meta, tensors = [("general.alignment", 4, 48)], [("w", (2, 32), 0, np.ones((2, 32), np.float32).tobytes())]
    (tmp_path / "a.gguf").write_bytes(gguf_bytes(meta, tensors, alignment=48))
    with pytest.raises(MechscopeError, match="general.alignment is 48; expected a power of two"):
        GGUFFile.open(tmp_path / "a.gguf")


def test_gguf_version_2_reads_as_reader_does(tmp_path):
    """Truth: GGUFReader, which accepts version 2 (the same layout as 3), on the builders' tiny Llama written as v2."""
    meta, tensors = gguf_parts()
    (tmp_path / "v2.gguf").write_bytes(gguf_bytes(meta, tensors, version=2))
    reader, ours = gguf.GGUFReader(tmp_path / "v2.gguf"), GGUFFile.open(tmp_path / "v2.gguf")
    assert ours.meta["llama.block_count"] == reader.fields["llama.block_count"].contents() == 1
    for t in reader.tensors:
        np.testing.assert_array_equal(ours.tensor(t.name), np.asarray(t.data, np.float32))


def test_gguf_duplicate_metadata_key_refused(tmp_path):
    """Truth: ggml's gguf.cpp refuses a file naming a metadata key twice."""
    meta = [("k", 4, 1), ("k", 4, 2)]
    (tmp_path / "d.gguf").write_bytes(gguf_bytes(meta, [("w", (32,), 0, np.ones(32, np.float32).tobytes())]))
    with pytest.raises(MechscopeError, match="key k appears twice"):
        GGUFFile.open(tmp_path / "d.gguf")


def test_gguf_q8_tensor_with_rows_of_blocks_and_an_odd_row_count(tmp_path):
    """Truth: gguf.quants' dequantisation of a Q8_0 tensor with 3 rows of 64 (blocks of 32 run along rows)."""
    x = np.random.default_rng(3).standard_normal((3, 64)).astype(np.float32)
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    w.add_tensor("q", gguf.quants.quantize(x, Q.Q8_0), raw_dtype=Q.Q8_0)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    want = gguf.quants.dequantize(gguf.quants.quantize(x, Q.Q8_0), Q.Q8_0)
    np.testing.assert_array_equal(GGUFFile.open(tmp_path / "q.gguf").tensor("q"), want)


# ---- safetensors and pytorch_model.bin --------------------------------------------------------------


def mixed_state() -> dict[str, torch.Tensor]:
    """One tensor per safetensors dtype, values outside the range of a same-sized type (u8 200, bf16 1e30)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g)
    return {
        "f32": x, "f64": x.double() / 3, "f16": (x * 7).half(), "bf16": (x * 1e30).bfloat16(),
        "i64": torch.tensor([2**40, -3]), "i32": torch.tensor([-7, 2**30], dtype=torch.int32),
        "i16": torch.tensor([-300, 12], dtype=torch.int16), "i8": torch.tensor([-100, 5], dtype=torch.int8),
        "u8": torch.tensor([200, 255, 3], dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
    }  # fmt: skip


def test_every_safetensors_dtype_reads_as_load_file(tmp_path):
    """Truth: safetensors' own ``load_file``: same dtype and the same bits for every tensor (dtype=None keeps the
    file's)."""
    save_file(mixed_state(), str(tmp_path / "model.safetensors"))
    want, state = load_file(tmp_path / "model.safetensors"), open_checkpoint(tmp_path)
    assert sorted(state) == sorted(want)
    for name, t in want.items():
        got = state[name].materialize()
        assert got.dtype == t.dtype and torch.equal(got, t), name


def test_a_dtype_converts_floating_tensors_only(tmp_path):
    """Truth: ``load_file``'s tensors with ``.to(float16)`` applied to the floating ones; integer and boolean
    tensors keep their dtype and values."""
    save_file(mixed_state(), str(tmp_path / "model.safetensors"))
    want, state = load_file(tmp_path / "model.safetensors"), open_checkpoint(tmp_path, dtype=torch.float16)
    for name, t in want.items():
        expected = t.to(torch.float16) if t.is_floating_point() else t
        got = state[name].materialize()
        assert got.dtype == expected.dtype and torch.equal(got, expected), name


def shard_by_hand(directory, state: dict, n: int, drop_from_index: str | None = None) -> dict:
    """``n`` shards named as transformers names them and model.safetensors.index.json written with json."""
    directory.mkdir(parents=True, exist_ok=True)
    names, weight_map = sorted(state), {}
    for k in range(n):
        file = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        save_file({name: state[name] for name in names[k::n]}, str(directory / file))
        weight_map |= {name: file for name in names[k::n]}
    weight_map.pop(drop_from_index, None)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return weight_map


def test_hand_sharded_checkpoint_equals_the_unsharded_one(tmp_path):
    """Truth: ``load_file`` of the unsharded file holding the same state, and the shard each tensor was put in."""
    state = gpt2_state()
    (tmp_path / "one").mkdir()
    save_file(state, str(tmp_path / "one" / "model.safetensors"))
    shard_by_hand(tmp_path / "three", state, 3)
    want, got = load_file(tmp_path / "one" / "model.safetensors"), open_checkpoint(tmp_path / "three")
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert torch.equal(got[name].materialize(), t), name


def test_index_that_omits_a_tensor_is_refused(tmp_path):
    """Truth: an index written with json whose weight_map leaves out one tensor a shard holds."""
    shard_by_hand(tmp_path, gpt2_state(), 2, drop_from_index="transformer.wpe.weight")
    with pytest.raises(MechscopeError, match=r"does not list tensor transformer\.wpe\.weight"):
        open_checkpoint(tmp_path)


def test_index_naming_a_tensor_no_shard_holds_is_refused(tmp_path):
    """Truth: an index written with json that names a tensor ("ghost") written to no shard."""
    weight_map = shard_by_hand(tmp_path, gpt2_state(), 2)
    weight_map["ghost"] = "model-00001-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(MechscopeError, match="names tensor ghost, which no shard holds"):
        open_checkpoint(tmp_path)


def test_two_shards_holding_one_tensor_are_refused(tmp_path):
    """Truth: two shards written with save_file that both hold "b"."""
    save_file({"a": torch.ones(2), "b": torch.zeros(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.ones(2)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    with pytest.raises(MechscopeError, match="tensor b is in model-00001-of-00002.safetensors too"):
        open_checkpoint(tmp_path)


def test_sharded_pytorch_bin_with_a_non_tensor_entry(tmp_path):
    """Truth: the tensors handed to ``torch.save`` in two ``pytorch_model-*-of-*.bin`` shards; the integer entry
    beside them ("step", as old trainers saved) is not a tensor and is not listed."""
    state = mixed_state()
    names = sorted(state)
    torch.save({n: state[n] for n in names[:4]} | {"step": 7}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({n: state[n] for n in names[4:]}, tmp_path / "pytorch_model-00002-of-00002.bin")
    got = open_checkpoint(tmp_path)
    assert sorted(got) == names
    for name in names:
        t = got[name].materialize()
        assert t.dtype == state[name].dtype and torch.equal(t, state[name]), name


def test_safetensors_metadata_with_a_non_string_value_is_refused(tmp_path):
    """Truth: safetensors' own ``safe_open`` refuses a ``__metadata__`` whose value is a number."""
    header = json.dumps({"__metadata__": {"format": 1}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})
    raw = header.encode()
    (tmp_path / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(8))
    with pytest.raises(SafetensorError):
        safe_open(tmp_path / "model.safetensors", "pt")
    with pytest.raises(MechscopeError, match="'__metadata__' must map strings to strings"):
        open_checkpoint(tmp_path)
