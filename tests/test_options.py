"""Request validation: decoding controls and questions, by hand-picked cases and by fuzzing."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capdemo.options import LIMITS, MAX_QUESTION_CHARS, CaptionOptions, check_method, clean_question

NUMBERS = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=5))


@settings(max_examples=300, deadline=None)
@given(question=st.one_of(st.text(max_size=2 * MAX_QUESTION_CHARS), st.none(), st.integers(), st.binary(max_size=20)))
def test_question_box_fuzz(question):
    try:
        cleaned = clean_question(question)
    except ValueError as err:
        assert "\n" not in str(err) and str(err)
        return
    assert cleaned and len(cleaned) <= MAX_QUESTION_CHARS
    assert cleaned == cleaned.strip() and "  " not in cleaned and all(ch.isprintable() for ch in cleaned)


@settings(max_examples=300, deadline=None)
@given(values=st.fixed_dictionaries({name: NUMBERS for name in LIMITS}))
def test_decoding_controls_fuzz(values):
    try:
        options = CaptionOptions(**values).validated()
    except ValueError as err:
        assert "\n" not in str(err) and any(name in str(err) for name in LIMITS)
        return
    for name, (low, high) in LIMITS.items():
        value = getattr(options, name)
        if value is None:
            continue
        assert not isinstance(value, bool) and low <= value <= high and math.isfinite(value)
        if name != "noise_variance":
            assert isinstance(value, int)


@pytest.mark.parametrize("raw,cleaned", [
    ("  what colour\tis it?\n", "what colour is it?"),
    ("is\x00 there\x1b a cat?", "is there a cat?"),
])
def test_questions_are_cleaned(raw, cleaned):
    assert clean_question(raw) == cleaned


def test_whole_float_counts_accepted_as_integers():
    assert CaptionOptions(samples=4.0, beams=2).validated().samples == 4


def test_method_names_checked():
    assert check_method("tomcap") == "tomcap"
    with pytest.raises(ValueError, match="choose one of maccap, tomcap"):
        check_method("MacCap")
