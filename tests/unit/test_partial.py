"""Partial checkpoints (GPT-2 small without its token embedding and MLP matrices): weights-only work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mechscope.core.errors import MechscopeError
from mechscope.lm.models.loading import load_model

PARTIAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "gpt2-small-partial"


@pytest.fixture(scope="module")
def partial():
    if not (PARTIAL / "model.safetensors").is_file():
        pytest.skip(f"{PARTIAL} not found")
    model, _ = load_model(PARTIAL, partial_ok=True)
    return model


def test_partial_loads_what_is_there(partial):
    cfg = partial.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.d_model) == (12, 12, 768)
    assert "W_E" in partial.missing_weights
    assert sum("mlp.up.weight" in n for n in partial.missing_weights) == 12
    assert not partial.blocks[4].attn.W_Q.is_meta and not partial.W_pos.is_meta
    # a published fact: row 0 of GPT-2's position embedding is far longer than the rest
    norms = partial.W_pos.norm(dim=1)
    assert 9.5 < norms[0] < 10.5 and 3.0 < norms[1:].median() < 3.8


def test_partial_refuses_a_forward_pass(partial):
    with pytest.raises(MechscopeError, match="partial checkpoint.*cannot run a forward pass"):
        partial(torch.tensor([[1, 2, 3]]))


def test_partial_refused_unless_asked():
    if not (PARTIAL / "model.safetensors").is_file():
        pytest.skip(f"{PARTIAL} not found")
    with pytest.raises(MechscopeError, match="partial checkpoint.*wte.weight.*lm circuits"):
        load_model(PARTIAL)
