"""The drain benchmark's floor: the least time any drain can take on the machine it ran on."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.drain import cpu_busy_s, resource_floor


def _single(wall: float, cpu: float) -> dict[str, float]:
    return {"wall_s": wall, "cpu_s": cpu}


def test_cpu_floor_takes_out_the_background_and_spreads_the_work() -> None:
    # 2 CPUs, 0.25 of one busy with idle guests: 1.0 s moves using 1.5 CPU-s each do
    # 1.25 CPU-s of work apiece; 6 of them on 1.75 spare CPUs take at least 7.5 / 1.75 s.
    got = resource_floor([_single(1.0, 1.5)] * 6, 0.25, 2, 0, None)
    assert got["cpu_work_s"] == pytest.approx(7.5)
    assert got["cpu_floor_s"] == pytest.approx(7.5 / 1.75, abs=1e-3)
    assert got["link_floor_s"] is None
    assert got["floor_s"] == got["cpu_floor_s"]


def test_the_link_sets_the_floor_when_it_is_the_tighter_bound() -> None:
    # 600 MB through one 1 Gbit/s link: 4.8 s, more than the CPU needs
    got = resource_floor([_single(1.0, 0.5)] * 6, 0.1, 2, 600_000_000, 1_000_000_000)
    assert got["link_floor_s"] == pytest.approx(4.8)
    assert got["floor_s"] == pytest.approx(4.8)


def test_a_machine_busy_with_its_background_has_no_cpu_floor() -> None:
    got = resource_floor([_single(1.0, 2.0)], 2.0, 2, 0, None)
    assert got["cpu_floor_s"] is None and got["floor_s"] is None


def test_busy_cpu_seconds_grow_with_work() -> None:
    before = cpu_busy_s()
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:
        pass
    assert cpu_busy_s() - before >= 0.03
