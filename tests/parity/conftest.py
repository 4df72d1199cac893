"""Parity tests compare with transformers on the CPU in float32 unless a test says otherwise."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _cpu_by_default(monkeypatch):
    # on a machine with a GPU, load_model's default device would be the GPU (and bfloat16)
    monkeypatch.setenv("MECHSCOPE_DEVICE", "cpu")
