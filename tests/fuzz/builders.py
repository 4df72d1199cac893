"""Tiny, valid inputs of every format mechscope reads, written from scratch (no download, no transformers).

Each builder writes into a directory and returns the path; the fuzz tests copy them into a fresh
temporary directory per example and corrupt the copy. Everything is small so that one example,
loader and command line together, takes milliseconds.
"""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import torch

# ---- images: .npz, IDX, class names ---------------------------------------------------------

SIZE, CLASSES, N_TRAIN, N_TEST = 8, 3, 48, 24
# a one-stage CNN that fits 8×8 images (the default needs 28×28)
TINY_CNN = ["--channels", "4", "--kernel-size", "3", "--padding", "1", "--pool", "2"]


def image_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)

    def split(n):
        y = np.arange(n) % CLASSES
        x = (g.random((n, SIZE, SIZE)) * 80).astype(np.uint8)
        for k in range(CLASSES):  # a bright row per class: learnable in a few steps
            x[y == k, 2 + 2 * k] = 230
        return x, y.astype(np.int64)

    x_train, y_train = split(N_TRAIN)
    x_test, y_test = split(N_TEST)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def write_npz(path: Path) -> Path:
    np.savez(path, **image_arrays())
    return path


def idx_bytes(array: np.ndarray, dtype_code: int = 0x08) -> bytes:
    """An IDX file: zero, type, number of dims, big-endian uint32 dims, data."""
    header = struct.pack(">HBB", 0, dtype_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


IDX_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def write_idx_folder(directory: Path, gz: bool) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for key, array in image_arrays().items():
        data = idx_bytes(array)
        name = IDX_NAMES[key] + (".gz" if gz else "")
        (directory / name).write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return directory


def write_class_names(path: Path) -> Path:
    path.write_text("stripe top\nstripe middle\nstripe bottom\n", encoding="utf-8")
    return path


def write_run(out: Path, npz: Path) -> Path:
    """A CNN run directory trained for two steps on the tiny .npz (through the real pipeline)."""
    from mechscope.cnn.config import TrainConfig
    from mechscope.cnn.models.cnn import CNNConfig
    from mechscope.cnn.pipelines.train import train

    shape = CNNConfig(channels=(4,), kernel_size=3, padding=1, pool=2)
    train(out, TrainConfig(epochs=1, batch_size=16, max_steps=2, shift=0), shape, str(npz), progress=False)
    return out


# ---- transformers: a tiny GPT-2 directory, its tokenizer files, a GGUF file ------------------

D, HEADS, INNER, CTX, LAYERS = 8, 2, 16, 16, 1
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("a", "n"), ("e", "r"), ("o", "n"), ("r", "e")]


def byte_vocab() -> dict[str, int]:
    """GPT-2's byte alphabet, the merges' tokens, then <|endoftext|>."""
    from mechscope.lm.tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    for a, b in MERGES:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


VOCAB = len(byte_vocab())


def gpt2_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    s = {"transformer.wte.weight": r(VOCAB, D), "transformer.wpe.weight": r(CTX, D)}
    for i in range(LAYERS):
        p = f"transformer.h.{i}."
        s |= {
            p + "ln_1.weight": 1 + r(D), p + "ln_1.bias": r(D), p + "ln_2.weight": 1 + r(D), p + "ln_2.bias": r(D),
            p + "attn.c_attn.weight": r(D, 3 * D), p + "attn.c_attn.bias": r(3 * D),
            p + "attn.c_proj.weight": r(D, D), p + "attn.c_proj.bias": r(D),
            p + "mlp.c_fc.weight": r(D, INNER), p + "mlp.c_fc.bias": r(INNER),
            p + "mlp.c_proj.weight": r(INNER, D), p + "mlp.c_proj.bias": r(D),
        }  # fmt: skip
    s |= {"transformer.ln_f.weight": 1 + r(D), "transformer.ln_f.bias": r(D)}
    return s


def gpt2_config() -> dict:
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "n_embd": D,
        "n_head": HEADS,
        "n_layer": LAYERS,
        "n_inner": INNER,
        "n_positions": CTX,
        "vocab_size": VOCAB,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "bos_token_id": VOCAB - 1,
        "eos_token_id": VOCAB - 1,
        "tie_word_embeddings": True,
        "scale_attn_weights": True,
    }


def write_gpt2_tokenizer(directory: Path) -> None:
    (directory / "vocab.json").write_text(json.dumps(byte_vocab()), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES), "utf-8")


def write_tokenizer_json(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab=byte_vocab(), merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    (directory / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")


def write_hf_dir(directory: Path, tokenizer: str = "gpt2", shards: int = 1) -> Path:
    """config.json, the weights (one file, or ``shards`` files with model.safetensors.index.json) and a
    tokenizer (``gpt2``: vocab.json + merges.txt; ``json``: tokenizer.json; ``none``)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(gpt2_config(), indent=2), encoding="utf-8")
    state = gpt2_state()
    if shards == 1:
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = sorted(state)
        weight_map = {}
        for k in range(shards):
            part = names[k::shards]
            file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: state[n] for n in part}, str(directory / file), metadata={"format": "pt"})
            weight_map |= {n: file for n in part}
        index = {"metadata": {"total_size": sum(t.numel() * 4 for t in state.values())}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    if tokenizer == "gpt2":
        write_gpt2_tokenizer(directory)
    elif tokenizer == "json":
        write_tokenizer_json(directory)
    return directory


# GGUF: a minimal writer, so that the fuzz tests can write any header they like (types, counts).
GGUF_TYPES = {"u8": 0, "i8": 1, "u16": 2, "i16": 3, "u32": 4, "i32": 5, "f32": 6, "bool": 7, "str": 8, "arr": 9,
              "u64": 10, "i64": 11, "f64": 12}  # fmt: skip
_PACK = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_value(vtype: int, value) -> bytes:
    if vtype == 8:
        raw = str(value).encode("utf-8")
        return struct.pack("<Q", len(raw)) + raw
    if vtype == 9:
        itype, items = value
        return struct.pack("<IQ", itype, len(items)) + b"".join(gguf_value(itype, v) for v in items)
    return struct.pack(_PACK[vtype], value)


def gguf_bytes(meta: list[tuple[str, int, object]], tensors: list[tuple[str, tuple[int, ...], int, bytes]],
               version: int = 3, alignment: int = 32) -> bytes:  # fmt: skip
    """GGUF: magic, version, counts, metadata (key, type, value), tensor infos (dims fastest first), data."""
    out = [b"GGUF", struct.pack("<IQQ", version, len(tensors), len(meta))]
    for key, vtype, value in meta:
        out += [gguf_value(8, key), struct.pack("<I", vtype), gguf_value(vtype, value)]
    offset, blobs = 0, []
    for name, shape, qtype, data in tensors:
        out += [gguf_value(8, name), struct.pack("<I", len(shape))]
        out += [struct.pack("<Q", d) for d in reversed(shape)]
        out += [struct.pack("<IQ", qtype, offset)]
        pad = -len(data) % alignment
        blobs.append(data + b"\0" * pad)
        offset += len(data) + pad
    head = b"".join(out)
    head += b"\0" * (-len(head) % alignment)
    return head + b"".join(blobs)


def gguf_parts(seed: int = 0) -> tuple[list, list]:
    """(metadata, tensors) of a 1-block Llama with GPT-2's byte alphabet as its vocabulary (F32 and F16)."""
    from mechscope.lm.tokenizer import bytes_to_unicode

    g = np.random.default_rng(seed)
    tokens = list(bytes_to_unicode().values()) + ["Ġt", "he", "<s>", "</s>"]
    v, d, ff, kv = len(tokens), D, INNER, 1
    dh = d // HEADS
    meta = [
        ("general.architecture", 8, "llama"),
        ("general.name", 8, "tiny"),
        ("llama.block_count", 4, 1),
        ("llama.context_length", 4, CTX),
        ("llama.embedding_length", 4, d),
        ("llama.feed_forward_length", 4, ff),
        ("llama.attention.head_count", 4, HEADS),
        ("llama.attention.head_count_kv", 4, kv),
        ("llama.rope.freq_base", 6, 10000.0),
        ("llama.attention.layer_norm_rms_epsilon", 6, 1e-5),
        ("tokenizer.ggml.model", 8, "gpt2"),
        ("tokenizer.ggml.pre", 8, "gpt-2"),
        ("tokenizer.ggml.tokens", 9, (8, tokens)),
        ("tokenizer.ggml.merges", 9, (8, ["Ġ t", "h e"])),
        ("tokenizer.ggml.token_type", 9, (5, [1] * (v - 2) + [3, 3])),
        ("tokenizer.ggml.bos_token_id", 4, v - 2),
        ("tokenizer.ggml.eos_token_id", 4, v - 1),
    ]

    def f32(*shape):
        return (g.standard_normal(shape) * 0.2).astype(np.float32).tobytes()

    def f16(*shape):
        return (g.standard_normal(shape) * 0.2).astype(np.float16).tobytes()

    tensors = [
        ("token_embd.weight", (v, d), 0, f32(v, d)),
        ("output_norm.weight", (d,), 0, f32(d)),
        ("blk.0.attn_norm.weight", (d,), 0, f32(d)),
        ("blk.0.ffn_norm.weight", (d,), 0, f32(d)),
        ("blk.0.attn_q.weight", (HEADS * dh, d), 1, f16(HEADS * dh, d)),
        ("blk.0.attn_k.weight", (kv * dh, d), 1, f16(kv * dh, d)),
        ("blk.0.attn_v.weight", (kv * dh, d), 0, f32(kv * dh, d)),
        ("blk.0.attn_output.weight", (d, HEADS * dh), 0, f32(d, HEADS * dh)),
        ("blk.0.ffn_gate.weight", (ff, d), 1, f16(ff, d)),
        ("blk.0.ffn_up.weight", (ff, d), 0, f32(ff, d)),
        ("blk.0.ffn_down.weight", (d, ff), 0, f32(d, ff)),
    ]
    return meta, tensors


def write_gguf(path: Path) -> Path:
    path.write_bytes(gguf_bytes(*gguf_parts()))
    return path


# ---- toy runs and text -------------------------------------------------------------------------

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n" * 40
TOY = dict(d_model=16, n_heads=2, n_ctx=16, vocab=12, batch=4, checkpoints=2, min_span=2, warmup=1)


def write_text(path: Path) -> Path:
    path.write_text(TEXT, encoding="utf-8")
    return path


def write_toy_run(out: Path, text: Path) -> Path:
    """A 1-layer GELU toy trained for two steps on the text (through the real pipeline)."""
    from mechscope.lm.pipelines.toy import train_toy_run
    from mechscope.lm.toy import ToyConfig

    config = ToyConfig(**TOY, layers=1, data="text", steps=2, mlp="gelu", d_mlp=8)
    train_toy_run(config, out, text, control=False, progress=False)
    return out
