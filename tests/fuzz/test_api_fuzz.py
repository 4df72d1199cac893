"""The Python API's public calls fed values a user could pass by mistake: each call works or raises
:class:`~mechscope.core.errors.MechscopeError` with one line; never another exception, never a hang."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mechscope
from mechscope.core.errors import MechscopeError
from tests.fuzz.conftest import cli_examples
from tests.unit.test_heads import hand_built

N = max(20, 3 * cli_examples())
VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-3, max_value=70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=5),
    st.lists(st.integers(min_value=-2, max_value=120), max_size=4),
)


@pytest.fixture(scope="module")
def model():
    return hand_built()


def one_line(e: MechscopeError) -> None:
    assert str(e) and "\n" not in str(e)


CALLS = {
    "repeated_tokens": lambda m, a: mechscope.lm.repeated_tokens(m, n=a[0], batch=a[1], seed=a[2]),
    "head_scores": lambda m, a: mechscope.lm.head_scores(m, n=a[0], batch=a[1], seed=a[2]),
    "ablate_heads": lambda m, a: mechscope.lm.ablate_heads(m, torch.tensor([[0, 5, 6, 5, 6]] * 2), [(a[0], a[1])],
                                                           kind="mean"),
    "attention": lambda m, a: mechscope.attention(m, a[2] if isinstance(a[2], list) else [1, 2, 3], a[0], a[1]),
    "circuits": lambda m, a: mechscope.lm.circuits(m, heads=[(a[0], a[1])]),
    "train_toy": lambda m, a: mechscope.lm.train_toy(steps=a[0], layers=a[1], seed=a[2], checkpoints=2,
                                                     d_model=16, n_heads=2, n_ctx=16, vocab=12, batch=4),
}


@pytest.mark.parametrize("call", sorted(CALLS))
@settings(max_examples=N)
@given(args=st.tuples(VALUES, VALUES, VALUES))
def test_api_calls_work_or_say_why_in_one_line(model, call, args):
    steps_ok = not (call == "train_toy" and isinstance(args[0], int) and not isinstance(args[0], bool)
                    and args[0] > 3)  # a valid long run is not a bad input: keep the test short
    if not steps_ok or (call == "head_scores" and isinstance(args[1], int) and args[1] > 64):
        return
    try:
        CALLS[call](model, args)
    except MechscopeError as e:
        one_line(e)


@pytest.mark.parametrize("n", [2.5, 2.0, True])
def test_a_count_given_as_a_float_or_a_bool_is_refused_not_truncated(model, n):
    """n=2.5 was not cut to 2, and 2.0 or True is not taken for an integer either: a count is an int."""
    with pytest.raises(MechscopeError, match="n must be an integer, got"):
        mechscope.lm.repeated_tokens(model, n=n)
