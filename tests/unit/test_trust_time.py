"""ISO-8601 UTC text from epoch seconds in pure protocol code, checked against datetime."""

from __future__ import annotations

import datetime as dt

from hypothesis import given
from hypothesis import strategies as st

from p2pupd.protocol.trust import civil_from_days, format_utc

# 0001-01-01 .. 9999-12-31, the years datetime (the reference) can show.
FIRST = int(dt.datetime(1, 1, 1, tzinfo=dt.UTC).timestamp())
LAST = int(dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC).timestamp())


def reference(seconds: int) -> str:
    return (dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=seconds)).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )


@given(st.integers(FIRST, LAST))
def test_format_utc_agrees_with_datetime(seconds: int) -> None:
    assert format_utc(seconds) == reference(seconds).rjust(20, "0")


def test_known_instants_and_calendar_edges() -> None:
    assert format_utc(0) == "1970-01-01T00:00:00Z"
    assert format_utc(1_803_902_400) == "2027-03-01T12:00:00Z"
    assert format_utc(-1) == "1969-12-31T23:59:59Z"
    assert format_utc(951_782_400) == "2000-02-29T00:00:00Z"  # a leap day of a 400-year
    assert civil_from_days(-719_468) == (0, 3, 1)  # the algorithm's day zero
    assert civil_from_days(4_102_444_800 // 86_400 - 1) == (2099, 12, 31)
