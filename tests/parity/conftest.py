"""Parity tests compare with transformers on the CPU in float32 unless a test says otherwise."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _cpu_by_default(monkeypatch):
    # on a machine with a GPU, load_model's default device would be the GPU (and bfloat16)
    monkeypatch.setenv("MECHSCOPE_DEVICE", "cpu")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on one CPU thread: on a busy machine, several OpenMP threads spin-wait on every
    small op (a 2-layer forward measured 0.5 s on two threads against 4 ms on one)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """``tiny_family(name) -> (transformers model, directory)``: built once per session, on first use."""
    transformers = pytest.importorskip("transformers")
    from tests.parity.families import configs, save_random

    built: dict = {}
    cfgs = configs(transformers)

    def get(name: str):
        if name not in built:
            path = tmp_path_factory.mktemp(name)
            built[name] = (save_random(transformers, cfgs[name], path), path)
        return built[name]

    return get
