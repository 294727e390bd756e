"""tests/records.py: the record comparison fails where it must."""

import pytest

from tests.records import assert_records_close


def test_equal_records_pass_within_tolerance():
    assert_records_close({"a": 1.0, "b": None, "c": [1, {"d": "x"}]},
                         {"a": 1.0 + 1e-9, "b": None, "c": [1, {"d": "x"}]}, rel=1e-6, abs=0)


@pytest.mark.parametrize("right", [
    {"a": 1.0},                               # key absent on one side
    {"a": 1.0, "b": 0.0},                     # None is not a number
    {"a": 1.1, "b": None},                    # outside the tolerance
    {"a": True, "b": None},                   # a bool is not a number
    {"a": 1.0, "b": None, "extra": 1},        # key absent on the other side
])
def test_differences_fail(right):
    with pytest.raises(AssertionError):
        assert_records_close({"a": 1.0, "b": None}, right, rel=1e-6, abs=0)
