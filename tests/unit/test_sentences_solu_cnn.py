"""The CNN activation comparison's sentences (``cnn solu-compare``: report/solu_cnn.py), from a hand-made
compare.json."""

from __future__ import annotations

from mechscope.cnn.report import solu_cnn as S


def stage(median, share, silent=0):
    return {"stage": "conv1", "channels": 8, "median": median, "share_ge_0.5": share, "silent": silent}


def test_accuracy_and_selectivity_with_silent_channels():
    result = {"models": [
        {"activation": "relu", "test_accuracy": 0.99, "stages": [stage(0.31, 0.5, silent=2)]},
        {"activation": "solu", "test_accuracy": 0.985, "stages": [stage(None, 0.0, silent=8)]},
    ]}  # fmt: skip
    lines = S.summary_lines(result)
    assert lines[0] == "Test accuracy: relu 0.9900, solu 0.9850."
    assert lines[1] == ("Class selectivity of conv1's 8 channels: relu median 0.31 (3 of the 6 that respond ≥ 0.5, "
                        "50%; 2 silent, left out); solu: every channel silent.")
