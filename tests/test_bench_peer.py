"""bench/peer.py's table: a ratio against a zero is shown as such, never a ZeroDivisionError that
loses a run's figures (a peer's time to first token once measured 0)."""

from bench.peer import ratio


def test_ratio_is_ours_over_theirs():
    assert ratio(3.0, 2.0) == "1.50x"


def test_a_zero_on_their_side_is_no_ratio():
    assert ratio(0.12, 0.0) == "n/a"
    assert ratio(0.0, 0.0) == "n/a"
