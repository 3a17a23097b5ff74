"""bench/timing.py: interleaved rounds with a rotating order, the warm-up dropped, median [min-max]."""

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import timing  # noqa: E402


def test_spread_is_the_median_with_min_and_max():
    assert timing.spread([3.0, 1.0, 2.0, 10.0, 4.0]) == "3.00 [1.00-10.00]"
    assert timing.spread([1500, 2500, 900], "{:,.0f}") == "1,500 [900-2,500]"
    assert timing.spread([2.0, 1.0], "{:.1f}x") == "1.5x [1.0x-2.0x]"


def test_rounds_take_turns_in_a_rotating_order_after_an_uncounted_warm_up():
    calls = []

    def candidate(name):
        def measure():
            calls.append(name)
            return float(len(calls))  # which call this was
        return measure

    values = timing.interleaved({n: candidate(n) for n in "abc"}, repeats=5)
    assert calls[:3] == ["a", "b", "c"]  # the warm-up, one call each
    rounds = [calls[3 + 3 * r: 6 + 3 * r] for r in range(5)]
    assert rounds == [list("abc"), list("bca"), list("cab"), list("abc"), list("bca")]
    assert all(len(v) == 5 for v in values.values())
    # The warm-up calls (1-3) are not among the figures.
    assert min(min(v) for v in values.values()) == 4.0
    assert values["a"] == [4.0, 9.0, 11.0, 13.0, 18.0]


def test_ratios_are_taken_within_each_round():
    assert timing.ratios([4.0, 9.0], [2.0, 3.0]) == [2.0, 3.0]
    with pytest.raises(ValueError):
        timing.ratios([1.0], [1.0, 2.0])


def test_a_deadline_stops_before_a_round_that_would_pass_it():
    def slow():
        time.sleep(0.02)
        return 1.0

    values = timing.interleaved({"a": slow}, repeats=50, warmup=False, until=time.monotonic() + 0.1)
    assert 2 <= len(values["a"]) < 50


def test_the_threads_line_names_the_cpus():
    assert "CPUs" in timing.threads() and "usable" in timing.threads()
