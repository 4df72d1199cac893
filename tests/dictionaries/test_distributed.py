"""Data-parallel training on two CPU processes (gloo) follows the one-process run at the same seed.

Tolerance: max |difference| of every parameter <= 1e-5 after 30 steps (measured: 1.2e-7 to 1.8e-7). The two
runs differ only in the order of float additions: a gradient averaged over two half-batches vs. one mean
over the batch.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from mechscope.core.dictionaries import DictionaryConfig, TrainConfig, planted_features, train
from tests.gloo import done, spawn

STEPS = 30
TOLERANCE = 1e-5
CONFIGS = {
    "relu": DictionaryConfig(d_in=12, d_sae=32, l1_coefficient=1.0, normalize_activations="expected_average_only_in"),
    "batchtopk": DictionaryConfig(d_in=12, d_sae=32, architecture="batchtopk", k=3),
    "jumprelu": DictionaryConfig(
        d_in=12, d_sae=32, architecture="jumprelu", l0_coefficient=0.5, bandwidth=0.1, init_threshold=0.1
    ),
    "topk-transcoder": DictionaryConfig(
        d_in=12, d_sae=32, architecture="topk", k=3, transcoder=True, d_out=12, skip=True
    ),
}


def batches(name: str):
    planted = planted_features(24, 12, probability=0.08, seed=0)
    out = list(planted.batches(STEPS, 64, seed=1))
    return [(x, x.flip(1) * 2) for x in out] if CONFIGS[name].transcoder else out


def settings() -> TrainConfig:
    return TrainConfig(lr=3e-3, progress=False, log_every=10, init_rows=256, dead_window=320, resample_every=10)


def worker(rank: int, world: int, rendezvous: str, out_dir: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        for name in names:
            result = train(CONFIGS[name], batches(name), settings())
            assert result.world_size == world
            if rank == 0:
                save_file(
                    {k: v.contiguous() for k, v in result.model.state_dict().items()},
                    os.path.join(out_dir, f"{name}.safetensors"),
                )
        dist.barrier()  # no rank gets past it before rank 0 has written every file
    finally:
        dist.destroy_process_group()
    done(out_dir, rank)


@pytest.fixture(scope="module")
def two_process_weights(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    spawn(worker, (2, str(out / "rendezvous"), str(out), list(CONFIGS)), out)
    return {name: load_file(str(out / f"{name}.safetensors")) for name in CONFIGS}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_processes_match_one(name, two_process_weights):
    single = train(CONFIGS[name], batches(name), settings()).model.state_dict()
    parallel = two_process_weights[name]
    assert single.keys() == parallel.keys()
    worst = max(float((single[k].double() - parallel[k].double()).abs().max()) for k in single)
    assert worst <= TOLERANCE, f"{name}: max |single - parallel| = {worst:.2e}"
