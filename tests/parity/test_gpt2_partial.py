"""A published fact on GPT-2 small's real attention weights: previous-token head 4.11 K-composes into the
induction heads of Olsson et al. 2022 (5.1, 5.5, 6.9, 7.2, 7.10) once LayerNorm is folded in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mechscope.lm.methods.composition import composition_scores
from mechscope.lm.models.folding import analysis_weights
from mechscope.lm.models.loading import load_model

PARTIAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "gpt2-small-partial"
PUBLISHED = {(5, 1), (5, 5), (6, 9), (7, 2), (7, 10)}


@pytest.fixture(scope="module")
def gpt2_small():
    if not (PARTIAL / "model.safetensors").is_file():
        pytest.skip(f"{PARTIAL} not found")
    model, _ = load_model(PARTIAL, partial_ok=True)
    return model


def targets_of(view, source=(4, 11), k=6):
    k_comp = composition_scores(view, ("K",))["K"][source[0], source[1]].numpy()  # [L_target, H]
    rows = [(k_comp[layer, h], (layer, h)) for layer in range(5, 12) for h in range(12)]
    return [lh for _, lh in sorted(rows, reverse=True)[:k]]


def test_previous_token_head_composes_into_the_published_induction_heads(gpt2_small):
    top = targets_of(analysis_weights(gpt2_small))
    assert len(PUBLISHED & set(top)) >= 4, top
    assert top[:4] == [(6, 9), (5, 1), (5, 5), (7, 10)]  # the ranking the data's README gives


def test_folded_view_of_gpt2_small(gpt2_small):
    view = analysis_weights(gpt2_small)
    assert view.W_E is None and view.W_U is None and view.W_in is None  # absent from the checkpoint
    assert np.abs(view.W_O.mean(-1).numpy()).max() < 1e-6  # writing weights centred (LayerNorm model)
    assert np.abs(view.W_Q.mean(-2).numpy()).max() < 1e-6  # reading weights centred after folding
