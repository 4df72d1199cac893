"""Small shared helpers for the sparse-dictionary tests (all CPU, seconds)."""

from __future__ import annotations

import pytest
import torch

from mechscope.core.dictionaries import DictionaryConfig, SparseDictionary


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """These dictionaries are tiny: one thread is as fast, and several spin badly when the cores are busy."""


def one_line_error(excinfo) -> str:
    """The message of a raised MechscopeError, asserted to be one non-empty line."""
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


@pytest.fixture()
def random_model():
    def make(**kw) -> SparseDictionary:
        cfg = DictionaryConfig(**({"d_in": 6, "d_sae": 10} | kw))
        model = SparseDictionary(cfg, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
            if cfg.uses_threshold:
                model.threshold.copy_(torch.linspace(0.01, 0.3, cfg.d_sae))
        return model

    return make
