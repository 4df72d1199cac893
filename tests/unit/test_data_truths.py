"""Data paths against outside truths: the GPT-2 tokenizer (OpenAI's published BPE algorithm, the ``tokenizers`` and
``transformers`` libraries on the real files), the real MNIST IDX bytes parsed by hand, and hand computations of
what training is documented to do (seeded batch order, shift range, one-cycle learning rate, confusion matrix)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import struct

import numpy as np
import pytest
import torch

from mechscope.lm.tokenizer import Tokenizer, bytes_to_unicode
from tests.unit import test_tokenizer

gpt2_dir = test_tokenizer.gpt2_files  # the GPT-2 tokenizer folder of the data directory (skips where absent)


def openai_bpe(word, ranks: dict) -> list[str]:
    """OpenAI's ``encoder.py`` ``bpe``: repeatedly merge the lowest-ranked adjacent pair of ``word``'s symbols (a
    string, one symbol per character, or a list of symbols)."""
    parts = list(word)
    while len(parts) > 1:
        pairs = set(zip(parts, parts[1:], strict=False))
        best = min(pairs, key=lambda p: ranks.get(p, math.inf))
        if best not in ranks:
            break
        out, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                out.append(parts[i] + parts[i + 1])
                i += 2
            else:
                out.append(parts[i])
                i += 1
        parts = out
    return parts


def test_gpt2_bpe_follows_openais_merge_order_to_the_last_merge(gpt2_dir):
    """Outside truth: OpenAI's BPE algorithm (encoder.py) over the real vocab.bpe ranks, on words spelled from the
    first, last and a sample of merges, pre-split by the ``tokenizers`` library's own ByteLevel pre-tokenizer."""
    from tokenizers import pre_tokenizers

    encoder = json.loads((gpt2_dir / "encoder.json").read_text(encoding="utf-8"))
    lines = (gpt2_dir / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    merges = [tuple(line.split(" ")) for line in lines if line]
    assert len(merges) == 50000
    ranks = {m: r for r, m in enumerate(merges)}
    chosen = merges[:50] + merges[-200:] + merges[:: 997]
    from transformers.convert_slow_tokenizer import bytes_to_unicode as hf_b2u

    to_byte = {c: b for b, c in hf_b2u().items()}
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    ours = Tokenizer.from_gpt2_files(gpt2_dir / "encoder.json", gpt2_dir / "vocab.bpe")
    checked = 0
    for a, b in chosen:
        try:
            text = bytes(to_byte[c] for c in a + b).decode("utf-8")
        except UnicodeDecodeError:
            continue
        expected = [encoder[t] for piece, _ in pre.pre_tokenize_str(text) for t in openai_bpe(piece, ranks)]
        assert ours.encode(text) == expected, (a, b, text)
        checked += 1
    assert checked > 200


def test_byte_map_is_gpt2s():
    """Outside truth: transformers' copy of OpenAI's ``bytes_to_unicode`` and the ``tokenizers`` library's
    ByteLevel pre-tokenizer, which spells byte 0 as 'Ā' and newline as 'Ċ'."""
    from tokenizers import pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode as hf_b2u

    assert bytes_to_unicode() == hf_b2u()
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    ascii_text = "".join(chr(b) for b in range(128))
    (spelled, _), = pre.pre_tokenize_str(ascii_text)
    assert spelled == "".join(bytes_to_unicode()[b] for b in range(128))


def test_bos_is_prepended_as_transformers_does(gpt2_dir, tmp_path):
    """Outside truth: transformers' GPT2TokenizerFast with ``add_bos_token`` true in tokenizer_config.json puts
    <|endoftext|> (50256) first: [50256, 15496, 995] for "Hello world"."""
    transformers = pytest.importorskip("transformers")
    (tmp_path / "vocab.json").write_bytes((gpt2_dir / "encoder.json").read_bytes())
    (tmp_path / "merges.txt").write_bytes((gpt2_dir / "vocab.bpe").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    ref = transformers.GPT2TokenizerFast.from_pretrained(tmp_path)
    ours = Tokenizer.from_hf_dir(tmp_path)
    for text in ("Hello world", "To be, or not to be"):
        assert ours.encode(text) == ref(text)["input_ids"]
    assert ours.encode("Hello world") == [50256, 15496, 995]
    assert ours.encode("Hello world", add_bos=False) == [15496, 995]


def test_context_length_by_hand():
    """Outside truth: hand computation of the documented rule (the default, or the model's context if shorter; an
    asked length up to and including n_ctx)."""
    from mechscope.core.errors import MechscopeError
    from mechscope.lm.text import context_length

    assert context_length(None, 1024, 128, "--length") == 128
    assert context_length(None, 64, 128, "--length") == 64
    assert context_length(64, 64, 128, "--length") == 64
    with pytest.raises(MechscopeError, match="65 is longer than the model's context of 64"):
        context_length(65, 64, 128, "--length")


def _raw_idx(path):
    """An IDX gzip parsed by hand: struct for the big-endian header, numpy for the bytes after it."""
    raw = gzip.decompress(path.read_bytes())
    magic, n = struct.unpack(">II", raw[:8])
    if magic == 0x803:
        rows, cols = struct.unpack(">II", raw[8:16])
        return np.frombuffer(raw, np.uint8, offset=16).reshape(n, rows, cols)
    assert magic == 0x801
    return np.frombuffer(raw, np.uint8, offset=8)


@pytest.fixture(scope="module")
def raw_mnist(mnist_root):
    d = mnist_root / "mnist"
    return {k: _raw_idx(d / f) for k, f in (("train_images", "train-images-idx3-ubyte.gz"),
                                             ("test_images", "t10k-images-idx3-ubyte.gz"),
                                             ("train_labels", "train-labels-idx1-ubyte.gz"),
                                             ("test_labels", "t10k-labels-idx1-ubyte.gz"))}  # fmt: skip


def test_mnist_pixels_and_labels_are_the_files_bytes(mnist, raw_mnist):
    """Outside truth: the four real MNIST IDX files parsed by hand (rows then columns, C order), pixels / 255."""
    from mechscope.cnn.data.images import ImageDataset
    from mechscope.cnn.data.mnist import MNIST

    for split in ("train", "test"):
        assert np.array_equal(getattr(mnist, f"{split}_images").numpy(), raw_mnist[f"{split}_images"])
        assert np.array_equal(getattr(mnist, f"{split}_labels").numpy(), raw_mnist[f"{split}_labels"])
    expected = torch.from_numpy(raw_mnist["test_images"][:50].astype(np.float32) / 255.0)[:, None]
    torch.testing.assert_close(MNIST.to_float(mnist.test_images[:50]), expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(ImageDataset.to_float(mnist.test_images[:50]), expected, rtol=0, atol=1e-7)
    assert ImageDataset.to_float(torch.full((1, 1, 8, 8), 255, dtype=torch.uint8)).max().item() == 1.0


def test_mean_and_std_of_other_data_are_their_training_images_by_hand(tmp_path):
    """Outside truth: numpy's mean and std (ddof 1) of the training pixels / 255, not the test pixels."""
    from mechscope.cnn.data.images import load_dataset
    from mechscope.cnn.training import model_config_for

    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 100, (20, 8, 8), dtype=np.uint8)
    x_test = rng.integers(150, 256, (10, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x_train=x_train, y_train=np.arange(20) % 2, x_test=x_test, y_test=np.arange(10) % 2)
    cfg = model_config_for(load_dataset(str(tmp_path / "d.npz")))
    px = x_train.astype(np.float64) / 255
    assert cfg.mean == round(float(px.mean()), 4) and cfg.std == round(float(px.std(ddof=1)), 4)


def test_random_shift_covers_every_offset_exactly():
    """Outside truth: by hand, a shift of up to s pixels moves a single lit pixel to each of the (2s + 1)^2
    positions around it, and nowhere else."""
    from mechscope.cnn.training import random_shift

    s, n = 2, 2000
    img = torch.zeros(n, 1, 9, 9)
    img[:, 0, 4, 4] = 1.0
    out = random_shift(img, s, torch.Generator().manual_seed(0))
    assert torch.all(out.sum((1, 2, 3)) == 1)
    ys, xs = out[:, 0].flatten(1).argmax(1).div(9, rounding_mode="floor"), out[:, 0].flatten(1).argmax(1) % 9
    seen = {(int(y) - 4, int(x) - 4) for y, x in zip(ys, xs, strict=True)}
    assert seen == {(dy, dx) for dy in range(-s, s + 1) for dx in range(-s, s + 1)}


def test_evaluate_confusion_matrix_rows_are_true_classes():
    """Outside truth: a hand-made confusion matrix for fixed predictions (rows true class, columns predicted)."""
    from mechscope.cnn.training import evaluate

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 3).float()

    pred = torch.tensor([1, 1, 2, 0, 2])
    labels = torch.tensor([0, 0, 2, 1, 1])
    e = evaluate(Fixed(), pred.float().view(5, 1, 1, 1).expand(5, 1, 2, 2).clone(), labels, 3)
    assert e.confusion_matrix == [[0, 2, 0], [1, 0, 1], [0, 0, 1]]
    assert e.per_class_accuracy == [0.0, 0.0, 1.0] and e.accuracy == pytest.approx(0.2)


def _one_cycle(step: int, total: int, lr: float, pct: float) -> float:
    """torch's documented OneCycleLR (cosine, div_factor 25, final_div_factor 1e4), by hand."""
    start, low = lr / 25, lr / 25 / 1e4
    peak = pct * total - 1

    def cos(a, b, frac):
        return b + (a - b) / 2 * (1 + math.cos(math.pi * frac))

    if step <= peak:
        return cos(start, lr, step / peak)
    return cos(lr, low, (step - peak) / (total - 1 - peak))


def test_seeded_batch_order_and_one_cycle_learning_rate(mnist, monkeypatch):
    """Outside truth: by hand, the first batches are ``torch.randperm(n)`` of a generator seeded with the run's
    seed, and the learning rate of step i follows the one-cycle formula (warm-up fraction 0.2, peak --lr)."""
    from mechscope.cnn.config import TrainConfig
    from mechscope.cnn.training import train_cnn

    seen_targets, lrs = [], []
    real_ce = torch.nn.functional.cross_entropy

    def ce(logits, target, **kw):
        seen_targets.append(target.clone())
        return real_ce(logits, target, **kw)

    real_step = torch.optim.AdamW.step

    def step(self, *a, **kw):
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", ce)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    cfg = TrainConfig(epochs=1, train_limit=160, batch_size=16, seed=11, shift=0, lr=1e-3)
    small = dataclasses.replace(mnist, test_images=mnist.test_images[:64], test_labels=mnist.test_labels[:64])
    train_cnn(small, cfg, progress=False)
    order = torch.randperm(160, generator=torch.Generator().manual_seed(11))
    for i in range(3):
        assert torch.equal(seen_targets[i], mnist.train_labels[order[16 * i : 16 * (i + 1)]])
    assert len(lrs) == 10
    for i, got in enumerate(lrs):
        assert got == pytest.approx(_one_cycle(i, 10, 1e-3, 0.2), rel=1e-6), i
