"""Toy training: the phase-change detector on constructed series, and a short run end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mechscope.core.errors import MechscopeError
from mechscope.lm.toy import ToyConfig, checkpoint_steps, detect_phase_change, icl_score, repeat_spans, train_toy

TINY = dict(steps=30, d_model=32, n_heads=2, n_ctx=32, vocab=16, batch=8, checkpoints=6, min_span=4)


def test_detector_finds_a_constructed_phase_change():
    steps = checkpoint_steps(5000, 40)
    x = np.log10(np.maximum(steps, 1))
    jump = 1 / (1 + np.exp(-(x - np.log10(1200)) * 25))  # a sharp step at 1,200 on the log axis
    rng = np.random.default_rng(0)
    induction = 0.05 + 0.7 * jump + rng.normal(0, 0.01, len(steps))
    icl = -0.05 - 1.2 * jump + rng.normal(0, 0.02, len(steps))
    found = detect_phase_change(steps, list(induction), list(icl))
    assert found["detected"] and found["window"][0] <= 1200 <= found["window"][1]
    assert found["induction_jump"] > 0.2 and found["icl_jump"] < -0.3


def test_detector_ignores_noise_and_separate_jumps():
    steps = checkpoint_steps(3000, 30)
    rng = np.random.default_rng(1)
    flat = detect_phase_change(
        steps, list(0.05 + rng.normal(0, 0.01, len(steps))), list(rng.normal(0, 0.02, len(steps)))
    )
    assert not flat["detected"]
    x = np.log10(np.maximum(steps, 1))
    early = 1 / (1 + np.exp(-(x - 1.5) * 30))
    late = 1 / (1 + np.exp(-(x - 3.2) * 30))
    apart = detect_phase_change(steps, list(0.7 * early), list(-1.0 * late))  # they never move together
    assert not apart["detected"]


def test_icl_score_and_spans():
    loss = torch.cat([torch.full((10,), 4.0), torch.linspace(4, 1, 90)])
    assert icl_score(loss) < -2.5
    g = torch.Generator().manual_seed(0)
    x = torch.arange(64).repeat(32, 1)  # all tokens distinct within a row
    y = repeat_spans(x, 8, g)
    for row in y:
        assert len(row) - len(set(row.tolist())) >= 8  # a span of at least 8 now appears twice


def test_short_run_measures_everything(tmp_path):
    r = train_toy(ToyConfig(**TINY), out=tmp_path)
    steps = [row["step"] for row in r["series"]]
    assert steps[0] == 0 and steps[-1] == 30 and steps == sorted(set(steps))
    row = r["series"][-1]
    assert np.array(row["induction"]).shape == (2, 2) and np.array(row["previous_token"]).shape == (2, 2)
    assert np.array(row["k_composition"]).shape == (2, 2)
    assert set(r["final"]) >= {"max_induction_last_layer", "max_previous_token_layer0", "held_out_loss", "icl_score"}
    assert len(r["circuit"]["k_composition_series"]) == len(steps)
    assert len(list((tmp_path / "checkpoints").glob("step_*.safetensors"))) == len(steps)
    json.dumps(r, allow_nan=False)
    again = train_toy(ToyConfig(**TINY))
    assert again["series"][-1]["held_out_loss"] == row["held_out_loss"]  # seeded: the same run twice


def test_progress_bar_shows_the_induction_score_the_final_line_reports(monkeypatch):
    import mechscope.lm.toy as toy

    bars = []

    class Bar(toy.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(toy, "tqdm", Bar)
    r = train_toy(ToyConfig(**TINY), progress=False)
    final = r["final"]["max_induction_last_layer"]  # layer 1's best head, as the final line and the page say
    assert bars[0].postfix.endswith(f"highest induction (layer 1)={final:.2f}"), bars[0].postfix


def test_text_run_and_bad_input(tmp_path):
    text = "to be, or not to be: that is the question. " * 200
    r = train_toy(ToyConfig(**TINY, data="text"), text=text)
    assert r["vocab"] == len(set(text)) and r["series"][-1]["held_out_loss"] > 0
    with pytest.raises(MechscopeError, match="too short for a context of 32"):
        train_toy(ToyConfig(**TINY, data="text"), text="abc" * 20)
    with pytest.raises(MechscopeError, match="the text is empty"):
        train_toy(ToyConfig(**TINY, data="text"), text="  ")
    with pytest.raises(MechscopeError, match="--layers must be 1 or 2, got 3"):
        train_toy(ToyConfig(**{**TINY, "layers": 3}))
    with pytest.raises(MechscopeError, match="--steps must be at least 1, got 0"):
        train_toy(ToyConfig(**{**TINY, "steps": 0}))
