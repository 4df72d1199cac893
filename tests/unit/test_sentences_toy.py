"""The training-dynamics report's sentences (``lm train-toy``: report/toy.py), from a hand-made training.json."""

from __future__ import annotations

import copy

from mechscope.lm.report import toy as T
from mechscope.lm.toy import ToyTraining


def series(detected: bool) -> dict:
    rows = [
        {"step": s, "train_loss": 3.0, "held_out_loss": 3.0 - i, "icl_score": -0.1 * i * i,
         "induction": [[0.1, 0.1], [0.05 + 0.3 * i, 0.1]], "previous_token": [[0.2 * i, 0.1], [0.1, 0.1]],
         "k_composition": [[0.1, 0.1], [0.1, 0.1]]}
        for i, s in enumerate((0, 10, 100, 1000))
    ]  # fmt: skip
    phase = {"detected": detected, "step": 55, "window": [10, 100], "induction_jump": 0.3 if detected else 0.05,
             "icl_jump": -0.3, "share_of_range": 0.33 if detected else 0.12}  # fmt: skip
    circuit = {"induction_head": [1, 0], "previous_token_head": [0, 0], "k_composition_series": [0.1, 0.12, 0.3, 0.31],
               "k_composition_jump_at_phase_change": 0.18, "k_composition_range": 0.21}  # fmt: skip
    return {
        "config": {"layers": 2, "mlp": "none", "d_model": 32, "n_heads": 2, "n_ctx": 32, "data": "synthetic",
                   "min_span": 4, "lr": 1e-3, "warmup": 10, "batch": 8, "steps": 1000, "seed": 0},
        "model": {"d_mlp": 0}, "vocab": 20, "series": rows, "phase_change": phase, "train_seconds": 1.0,
        "final": {"max_induction_last_layer": 0.95, "max_previous_token_layer0": 0.6, "held_out_loss": 0.5,
                  "icl_score": -0.9},
        "circuit": circuit,
    }  # fmt: skip


def test_a_detected_phase_change_states_its_criterion():
    lines = T.summary_lines(series(True))
    assert lines[0].startswith("A phase change between steps 10 and 100")
    assert "rose by 0.30" in lines[0] and "fell by 0.30 nats" in lines[0]
    assert "each at least 20% of its range over the run (and the induction score by at least 0.1)" in lines[0]


def test_the_heads_are_not_called_a_circuit_without_a_causal_test():
    for detected in (True, False):
        text = " ".join(T.summary_lines(series(detected)))
        assert "No circuit formed" not in text and "The circuit:" not in text
        assert "no causal test" in text
        assert "(0.0, 0.60)" in text and "(1.0, 0.95)" in text  # each head's own score, at the end
    text = " ".join(T.summary_lines(series(True)))
    assert "moved by +0.180 inside the phase-change interval, of a range of 0.210" in text


def test_no_phase_change_says_how_close_it_came():
    line = T.summary_lines(series(False))[0]
    assert line.startswith("No phase change was detected")
    assert "12% of their range, induction +0.05" in line


def test_the_control_and_the_page():
    s = series(True)
    s["control"] = copy.deepcopy(s) | {"phase_change": {"detected": False, "share_of_range": 0.01,
                                                         "induction_jump": 0.0, "icl_jump": 0.0}}
    del s["control"]["circuit"]
    s["control"]["config"] = s["config"] | {"layers": 1}
    last = "1-layer control: highest induction score 0.95 at the end; no phase change was detected."
    assert T.summary_lines(s)[-1] == last
    html = ToyTraining(s)._repr_html_()
    for line in T.summary_lines(s):
        assert line.replace("&", "&amp;") in html


def test_a_measure_that_moved_most_in_another_interval_is_said():
    """The phase-change interval is where both moved together; the review's run had the induction score's own
    largest rise one checkpoint earlier, hidden behind the band. Here the ICL score falls most after it."""
    lines = T.summary_lines(series(True))
    assert lines[1] == ("The in-context-learning score fell most in another interval, steps 100–1000 (0.50, 56% of "
                        "its range), against 0.30 in the phase-change interval.")
    assert not any(s.startswith("The highest induction score rose most") for s in lines)  # 10–100 is its own


def test_no_phase_change_says_which_condition_failed():
    s = series(False)
    s["phase_change"] |= {"share_of_range": 0.45, "induction_jump": 0.01}
    assert "45% of their range, induction +0.01, under the 0.1 the induction score must rise)." in T.summary_lines(s)[0]
