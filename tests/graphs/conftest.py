"""The models here are tiny: one intra-op thread is fastest, and avoids contention on a busy machine
(the scrubbing tests ran 30x slower with two threads while another process used the cores)."""

from __future__ import annotations

import pytest

from mechscope.core.torch_utils import torch_threads


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):  # for the whole module: its fixtures build models once
        yield
