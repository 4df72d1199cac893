"""The activation store: shards, shuffling, resuming, bounded memory, reading back."""

from __future__ import annotations

import gc
import json

import pytest
import torch
from safetensors.torch import load_file

from mechscope.core.dictionaries import ActivationReader, harvest
from mechscope.core.errors import MechscopeError

from .conftest import one_line_error


def corpus(n_batches: int, rows: int = 100, d: int = 8):
    """Rows numbered in column 0 so every row can be traced; a generator, never all in memory."""
    for b in range(n_batches):
        x = torch.randn(rows, d, generator=torch.Generator().manual_seed(b))
        x[:, 0] = torch.arange(b * rows, (b + 1) * rows, dtype=torch.float32)
        yield x


def shard_tensors(path):
    manifest = json.loads((path / "manifest.json").read_text())
    return [load_file(str(path / s["file"]))["activations"] for s in manifest["shards"]]


def test_harvest_writes_every_row_once_shuffled(tmp_path):
    r = harvest(corpus(25), tmp_path, shard_rows=256, buffer_rows=1024, seed=3, progress=False)
    assert r.rows == 2500 and r.width == 8 and r.shards == 10 and r.complete and r.rows_per_second > 0
    rows = torch.cat(shard_tensors(tmp_path))
    assert sorted(rows[:, 0].long().tolist()) == list(range(2500))
    assert not torch.equal(rows[:1024, 0], torch.arange(1024.0))  # shuffled within the window
    assert r.to_dict()["schema"] == "mechscope.harvest/1"


def interrupted(n: int = 25, at: int = 13):
    """corpus(n), interrupted (KeyboardInterrupt) when batch ``at`` is asked for."""
    for i, batch in enumerate(corpus(n)):
        if i == at:
            raise KeyboardInterrupt
        yield batch


def test_interrupted_harvest_resumes_to_the_same_shards(tmp_path):
    whole = harvest(corpus(25), tmp_path / "whole", shard_rows=256, buffer_rows=512, seed=1, progress=False)

    with pytest.raises(KeyboardInterrupt):
        harvest(interrupted(), tmp_path / "cut", shard_rows=256, buffer_rows=512, seed=1, progress=False)
    partial = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert 0 < partial["rows"] < 2500 and not partial["complete"]
    again = harvest(corpus(25), tmp_path / "cut", shard_rows=256, buffer_rows=512, seed=1, progress=False)
    assert again.resumed_rows == partial["rows"] and again.rows == whole.rows == 2500
    for a, b in zip(shard_tensors(tmp_path / "whole"), shard_tensors(tmp_path / "cut"), strict=True):
        assert torch.equal(a, b)
    done = harvest(corpus(25), tmp_path / "cut", shard_rows=256, buffer_rows=512, seed=1, progress=False)
    assert done.resumed_rows == 2500  # a finished store is not redone


def live_tensor_bytes() -> int:
    kinds = (torch.Tensor, torch.nn.Parameter)
    return sum(o.untyped_storage().nbytes() for o in gc.get_objects() if type(o) in kinds)


def test_memory_stays_bounded_by_the_buffer(tmp_path):
    def watched(n_batches, peaks):
        for i, batch in enumerate(corpus(n_batches, rows=500, d=32)):
            if i % 8 == 7:  # a scan of every live tensor takes a while: every 8th batch, from the buffer's 2nd fill
                peaks.append(live_tensor_bytes())
            yield batch

    small, large = [], []
    a = harvest(watched(8, small), tmp_path / "small", shard_rows=500, buffer_rows=1000, progress=False)
    b = harvest(watched(80, large), tmp_path / "large", shard_rows=500, buffer_rows=1000, progress=False)
    assert b.rows == 10 * a.rows == 40000
    assert a.peak_rows_held == b.peak_rows_held <= 1000 + 500
    assert max(large) <= max(small) + 64 * 1024  # 10x the corpus, the same live tensor memory (about 200 kB)


def test_reader_streams_shuffled_batches(tmp_path):
    harvest(corpus(20), tmp_path, shard_rows=200, buffer_rows=400, seed=0, progress=False)
    reader = ActivationReader(tmp_path, batch_size=64, seed=5, mix_shards=3, epochs=2)
    batches = list(reader)
    assert all(b.shape == (64, 8) for b in batches) and len(batches) == 4000 // 64
    ids = torch.cat(batches)[:, 0].long()
    first_epoch = ids[: 2000 - 2000 % 64]
    assert len(set(first_epoch.tolist())) == len(first_epoch)  # no row twice within an epoch
    assert [
        torch.equal(a, b)
        for a, b in zip(batches, ActivationReader(tmp_path, 64, seed=5, mix_shards=3, epochs=2), strict=True)
    ]
    assert not torch.equal(batches[0], next(iter(ActivationReader(tmp_path, 64, seed=6))))
    pairs = next(iter(ActivationReader(tmp_path, 16, split=(3, 5))))
    assert pairs[0].shape == (16, 3) and pairs[1].shape == (16, 5)
    tail = list(ActivationReader(tmp_path, 300, drop_last=False))
    assert sum(b.shape[0] for b in tail) == 2000


def test_bad_harvests_and_stores_are_one_line_errors(tmp_path):
    cases = [
        (lambda: harvest(iter([]), tmp_path / "a", progress=False), "empty"),
        (lambda: harvest([torch.zeros(4)], tmp_path / "b", progress=False), "[N, d]"),
        (
            lambda: harvest([torch.zeros(4, 3), torch.zeros(4, 5)], tmp_path / "c", shard_rows=2, progress=False),
            "width",
        ),
        (lambda: harvest([torch.full((4, 3), float("nan"))], tmp_path / "d", progress=False), "finite"),
        (lambda: harvest(corpus(1), tmp_path / "e", shard_rows=3, buffer_rows=4, progress=False), "multiple"),
        (lambda: ActivationReader(tmp_path / "nowhere", 4), "not found"),
    ]
    for call, expected in cases:
        with pytest.raises(MechscopeError) as e:
            call()
        assert expected in one_line_error(e), expected
    harvest(corpus(2), tmp_path / "f", shard_rows=50, progress=False)
    with pytest.raises(MechscopeError) as e:
        harvest(corpus(2), tmp_path / "f", shard_rows=100, progress=False)
    assert "shard_rows" in one_line_error(e)
    with pytest.raises(MechscopeError) as e:
        ActivationReader(tmp_path / "f", 4, split=(3, 3))
    one_line_error(e)
    (tmp_path / "f" / "shard-000000.safetensors").write_bytes(b"junk")
    with pytest.raises(MechscopeError) as e:
        list(ActivationReader(tmp_path / "f", 4))
    assert "shard" in one_line_error(e)


def test_a_store_feeds_training(tmp_path):
    from mechscope.core.dictionaries import DictionaryConfig, TrainConfig, planted_features, train

    planted = planted_features(24, 12, probability=0.08, seed=0)
    harvest(planted.batches(30, 100, seed=0), tmp_path, shard_rows=200, buffer_rows=600, progress=False)
    reader = ActivationReader(tmp_path, batch_size=64, seed=1)
    cfg = DictionaryConfig(d_in=12, d_sae=32, architecture="topk", k=3)
    a = train(cfg, reader, TrainConfig(progress=False, init_rows=256))
    b = train(cfg, reader, TrainConfig(progress=False, init_rows=256))
    assert a.steps == 3000 // 64 and torch.equal(a.model.W_dec, b.model.W_dec)


def test_a_harvest_stage_resumes_only_with_its_own_settings(tmp_path):
    from mechscope.core.dictionaries.staged import claim_stage

    stage = tmp_path / "out.partial"
    claim_stage(stage, {"hook": "conv2.hook_out", "limit": 100})  # made, with its settings
    assert (stage / "settings.json").is_file()
    claim_stage(stage, {"limit": 100, "hook": "conv2.hook_out"})  # the same harvest: resumes
    with pytest.raises(MechscopeError, match="an interrupted harvest with other settings is there"):
        claim_stage(stage, {"hook": "conv2.hook_out", "limit": 200})
    (stage / "settings.json").write_text("{not json")
    with pytest.raises(MechscopeError, match="other settings"):
        claim_stage(stage, {"hook": "conv2.hook_out", "limit": 100})
