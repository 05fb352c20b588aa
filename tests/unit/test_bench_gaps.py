"""The migration benchmark's split of the guest's blackout: at the hand-over or before it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.migrate import split_gaps

T0 = 1000.0  # the probe's start (epoch)


def _job(**phases: tuple[float, float]) -> dict[str, Any]:
    return {"phases": [{"phase": p, "started_at": T0 + a, "ended_at": T0 + b}
                       for p, (a, b) in phases.items()]}  # fmt: skip


def test_gaps_are_split_at_the_hand_over() -> None:
    job = _job(precopy=(1.0, 5.0), switchover=(5.0, 5.05), resume=(5.05, 5.1),
               announce=(5.1, 5.12))  # fmt: skip
    gaps = [[2.0, 600.0], [5.02, 120.0], [0.5, 300.0], [7.0, 50.0]]
    assert split_gaps(job, {"started_epoch": T0, "gaps": gaps}) == (120.0, 600.0)


def test_a_gap_that_began_before_post_copy_counts_at_the_hand_over() -> None:
    job = _job(precopy=(1.0, 4.0), postcopy=(4.0, 5.0), switchover=(5.0, 5.01),
               announce=(5.02, 5.03))  # fmt: skip
    gaps = [[3.9, 400.0], [2.0, 90.0]]
    assert split_gaps(job, {"started_epoch": T0, "gaps": gaps}) == (400.0, 90.0)


def test_no_hand_over_no_split() -> None:
    assert split_gaps(_job(precopy=(1.0, 2.0)), {"started_epoch": T0, "gaps": []}) == (None, None)
    assert split_gaps({}, {}) == (None, None)


def test_a_hand_over_gap_missing_from_a_full_list_is_unknown() -> None:
    job = _job(precopy=(1.0, 5.0), switchover=(5.0, 5.05), announce=(5.1, 5.12))
    full = [[0.1 * i, 300.0 + i] for i in range(10)]  # ten long gaps, all early in pre-copy
    assert split_gaps(job, {"started_epoch": T0, "gaps": full}) == (None, 309.0)
    assert split_gaps(job, {"started_epoch": T0, "gaps": full[:3]}) == (0.0, 302.0)
