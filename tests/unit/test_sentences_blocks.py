"""The Building Blocks report's sentences (``cnn blocks``: report/blocks.py), from a hand-made result.

conv1 (2 groups) → conv2 (2 groups) → logits of 2 classes. The logits flow is exact (groups + residual equal
the measured change from zeroing conv2); the conv1 → conv2 flow is not (gap 0.2): its sentences must say
"first-order estimate" and put each group's measured removal beside its estimate.
"""

from __future__ import annotations

import numpy as np

from mechscope.cnn.methods.blocks import BlocksResult, LayerBlocks, Selection
from mechscope.cnn.methods.group_attribution import GroupFlow
from mechscope.cnn.methods.nmf_groups import NMFGroups
from mechscope.cnn.report import blocks as B


def layer(stage: str) -> LayerBlocks:
    g = NMFGroups(stage, 2, "threshold", 0.9, (0.7, 0.93), 0.93, 0.0, np.eye(2, 3), np.ones((4, 2)), (0.6, 0.4))
    z = np.zeros((1, 4, 2))
    return LayerBlocks(stage, f"{stage}.hook_out", (3, 2, 2), (2, 2), g, z.astype(int), z, np.zeros((1, 4)),
                       np.zeros((2, 1), int), np.zeros((2, 1)), np.zeros((2, 1, 4), int), (0, 5, 0, 5))  # fmt: skip


def make_result() -> BlocksResult:
    pair = GroupFlow("conv1", "conv2", ("group 1", "group 2"), np.array([[0.5, 0.1], [0.05, 0.3]]), np.zeros(2),
                     np.array([0.55, 0.4]), np.array([0.75, 0.4]), np.array([[0.8, 0.1], [0.0, 0.25]]))  # fmt: skip
    logits = GroupFlow("conv2", "logits", ("cat", "dog"), np.array([[2.0, -1.0], [0.5, 1.5]]), np.array([0.1, 0.0]),
                       np.array([2.6, 0.5]), np.array([2.6, 0.5]), np.array([[2.0, -1.0], [0.5, 1.5]]))  # fmt: skip
    sel = Selection((7,), (7,), (0,), (0,), (0.97,), "test image 7")
    return BlocksResult(sel, (layer("conv1"), layer("conv2")), (pair, logits), ("cat", "dog"), {"typical": None}, "")


def test_a_group_share_says_of_what():
    line = B.summary_lines(make_result())[1]
    assert "the largest group carries 60.0% of the groups' summed squared norm (Σ_g ‖W_g H_g‖²)" in line
    assert "of the groups' total" not in line


def test_exact_and_estimated_flows_say_which():
    lines = B.summary_lines(make_result())
    cat = next(s for s in lines if s.startswith("Logit cat"))
    why = next(s for s in lines if s.startswith("Logits followed"))
    assert "the 2 that conv2 contributes most to (measured, as is minus set to zero): " in why  # why these logits
    assert "(exact here: groups + residual equal the measured contribution)" in cat
    assert "conv2 group 1 +2.00 (measured, as is minus removed alone: +2.00)" in cat
    assert "(the logit as it is minus the logit with conv2 set to zero;" in cat  # a positive contribution raises it
    pair = next(s for s in lines if s.startswith("conv1 → conv2, by gradient × activation"))
    assert "(a first-order estimate, not an ablation)" in pair and "strongest" not in pair
    assert "group 1 → group 1 +0.50 (measured, as is minus group 1 removed alone: +0.80)" in pair
    gap = next(s for s in lines if s.startswith("conv1 → conv2: groups + residual"))
    assert "largest gap 0.200" in gap and "a first-order estimate" in gap
    exact = next(s for s in lines if s.startswith("conv2 → logits: groups + residual equal"))
    assert "gradient × activation is exact" in exact
