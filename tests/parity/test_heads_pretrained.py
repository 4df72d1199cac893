"""Induction heads in real pretrained models: SmolLM2 here; GPT-2 small wherever its weights are."""

from __future__ import annotations

import os

import numpy as np
import pytest

from mechscope.methods.heads import HeadProtocol, find_induction_heads
from mechscope.models.loading import load_model, smollm2_path


@pytest.fixture(scope="module")
def smollm2_heads():
    try:
        smollm2_path()
    except Exception as e:
        pytest.skip(str(e))
    model, _ = load_model("smollm2")
    protocol = HeadProtocol(batch=4, per_head_ablation=False, random_draws=5)
    return find_induction_heads(model, protocol)


def test_smollm2_in_context_learning(smollm2_heads):
    r = smollm2_heads
    assert r.loss_second_half < 0.3 * r.loss_first_half  # far below: measured 1.9 against 12.9


def test_smollm2_induction_heads(smollm2_heads):
    r = smollm2_heads
    found = r.to_dict()["induction_heads"]
    assert len(found) >= 3
    assert all(h["score"] >= 0.4 for h in found) and found[0]["score"] > 0.7
    assert len(r.to_dict()["previous_token_heads"]) >= 3
    # the induction heads sit above previous-token heads that K-compose into them
    assert any(c["previous_token_heads_feeding"] for c in r.composition)


def test_smollm2_top5_ablation_beats_random(smollm2_heads):
    k = smollm2_heads.top_k_ablation
    assert k["k"] == 5
    rnd_max = max(k["random_draws"])
    assert k["induction_heads_loss_increase"] > 5 * max(rnd_max, 0.1)


def gpt2_weights():
    path = os.environ.get("MECHSCOPE_GPT2")
    if path:
        return path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download("openai-community/gpt2", local_files_only=True)
    except Exception:
        return None


def test_gpt2_published_heads():
    path = gpt2_weights()
    if path is None:
        pytest.skip("GPT-2 weights not found (set MECHSCOPE_GPT2 to a gpt2 directory, or have it in the HF cache)")
    model, _ = load_model(path)
    r = find_induction_heads(model, HeadProtocol(per_head_ablation=False))
    flat = r.scores["induction"].flatten()
    top5 = {divmod(int(i), 12) for i in np.argsort(-flat)[:5]}
    assert top5 == {(5, 1), (5, 5), (6, 9), (7, 2), (7, 10)}  # Olsson et al.; the TransformerLens tutorials
    prev = r.scores["previous_token"].flatten()
    assert divmod(int(np.argmax(prev)), 12) == (4, 11)


@pytest.mark.slow
def test_smollm2_full_protocol_per_head_ablation():
    """The default protocol with per-head ablations (about 2.5 minutes): the heads that score as
    induction heads are the ones whose ablation costs the most."""
    try:
        smollm2_path()
    except Exception as e:
        pytest.skip(str(e))
    model, _ = load_model("smollm2")
    r = find_induction_heads(model, HeadProtocol())
    inc = r.scores["ablation_loss_increase"]
    induction = [(h["layer"], h["head"]) for h in r.to_dict()["induction_heads"]]
    assert np.mean([inc[lh] for lh in induction]) > 5 * np.median(inc)
    assert np.isfinite(r.scores["zero_ablation_loss_increase"]).all()
