"""The auto policy's prediction of whether pre-copy converges."""

import math

from vmferry.migration.engine import MAX_PRECOPY_PASSES, predict_passes

LINK = 119e6  # bytes/s on a 1 Gbit/s link


def test_idle_guest_converges_at_once() -> None:
    assert predict_passes(2_000_000, 1e6, LINK, 50) == 0.0
    assert predict_passes(20_000_000, 1e6, LINK, 50) < 1


def test_working_set_at_link_rate_never_converges() -> None:
    assert predict_passes(128 * 2**20, 118e6, LINK, 50) == math.inf


def test_half_link_rate_takes_too_many_passes() -> None:
    assert predict_passes(128 * 2**20, 0.56 * LINK, LINK, 50) > MAX_PRECOPY_PASSES


def test_small_working_set_converges_in_a_few_passes() -> None:
    assert predict_passes(32 * 2**20, 0.27 * LINK, LINK, 50) < MAX_PRECOPY_PASSES


def test_no_link_rate_yet() -> None:
    assert predict_passes(10, 0, 0, 50) == math.inf
