"""The models here are tiny: one intra-op thread is fastest, and avoids contention on a busy machine
(the scrubbing tests ran 30x slower with two threads while another process used the cores)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
