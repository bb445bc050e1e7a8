"""bench/peer.py's table: each measure's median and range over the rounds, and a ratio against a
zero shown as such, never a ZeroDivisionError that loses a run's figures (a peer's time to first
token once measured 0)."""

from bench.peer import ratio, spread


def test_ratio_is_ours_over_theirs():
    assert ratio(3.0, 2.0) == "1.50x"


def test_a_zero_on_their_side_is_no_ratio():
    assert ratio(0.12, 0.0) == "n/a"
    assert ratio(0.0, 0.0) == "n/a"


def test_the_spread_is_the_median_and_the_range():
    assert spread([3.0, 1.0, 2.0]) == "2.0 (1.0-3.0)"
    assert spread([1234.5]) == "1,234.5"
