"""A1111's learning-rate schedule grammar: same semantics, clear errors that say where."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tistudio.errors import OptionError
from tistudio.schedule import parse_schedule


def test_single_rate_runs_to_max_steps() -> None:
    schedule = parse_schedule("0.005", max_steps=3000)
    assert schedule.pairs == ((0.005, 3000),)
    assert schedule.rate_at(0) == 0.005 and schedule.rate_at(2999) == 0.005
    assert schedule.end_step == 3000


def test_the_documented_example() -> None:
    schedule = parse_schedule("0.005:100, 1e-3:1000, 1e-5", max_steps=3000)
    assert schedule.pairs == ((0.005, 100), (1e-3, 1000), (1e-5, 3000))
    assert schedule.rate_at(99) == 0.005
    assert schedule.rate_at(100) == 1e-3
    assert schedule.rate_at(999) == 1e-3
    assert schedule.rate_at(1000) == 1e-5


def test_training_stops_where_the_schedule_ends_as_in_a1111() -> None:
    assert parse_schedule("0.005:100", max_steps=1000).end_step == 100


def test_a_step_beyond_max_steps_is_cut_and_ends_parsing() -> None:
    schedule = parse_schedule("0.005:100, 1e-3:5000, 1e-5", max_steps=3000)
    assert schedule.pairs == ((0.005, 100), (1e-3, 3000))


def test_minus_one_means_max_steps_and_ends_parsing() -> None:
    assert parse_schedule("0.01:-1, 0.5", max_steps=700).pairs == ((0.01, 700),)


def test_anything_after_a_bare_rate_is_ignored() -> None:
    assert parse_schedule("0.002, 0.1:10", max_steps=50).pairs == ((0.002, 50),)


def test_resume_skips_the_items_already_done() -> None:
    schedule = parse_schedule("0.005:100, 1e-3:1000, 1e-5", max_steps=3000, start_step=500)
    assert schedule.pairs == ((1e-3, 1000), (1e-5, 3000))


def test_blank_items_are_skipped() -> None:
    assert parse_schedule(" 0.005:10 , , 0.001", max_steps=20).pairs == ((0.005, 10), (0.001, 20))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("fast", "item 1 'fast': the rate is not a number"),
        ("0.005:100, abc:200", "item 2 'abc:200'"),
        ("0.005:1e3", "write 1000, not 1e3"),
        ("0.005:100:5", "use RATE or RATE:STEP"),
        ("-0.1", "positive"),
        ("nan", "positive"),
        ("0.01:500, 0.001:100", "does not come after step 500"),
        ("0.01:0", "the step must be positive"),
    ],
)
def test_bad_schedules_say_what_and_where(text: str, fragment: str) -> None:
    with pytest.raises(OptionError) as error:
        parse_schedule(text, max_steps=3000)
    assert error.value.field == "learning_rate"
    assert fragment in str(error.value)


def test_resuming_past_the_last_step_asks_for_a_final_rate() -> None:
    with pytest.raises(OptionError, match="already done"):
        parse_schedule("0.005:100", max_steps=1000, start_step=100)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=60), st.integers(min_value=1, max_value=100_000), st.integers(min_value=0, max_value=10_000))
def test_any_text_gives_a_schedule_or_our_error(text: str, max_steps: int, start: int) -> None:
    try:
        schedule = parse_schedule(text, max_steps=max_steps, start_step=start)
    except OptionError:
        return
    assert schedule.pairs
    assert all(rate > 0 and start < end <= max_steps for rate, end in schedule.pairs)
