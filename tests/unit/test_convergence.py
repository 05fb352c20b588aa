"""The auto policy's prediction of whether pre-copy converges."""

import math
from typing import Any

import pytest

from vmferry.migration.converge import Counters, PassWatch, xbzrle_cache_bytes, xbzrle_pays
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


# -- XBZRLE where it pays (migration/converge.py) ----------------------------------------------

PAGE = 4096


def _info(normal: int, duplicate: int = 0, xb: dict[str, int] | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {"ram": {"normal": normal, "duplicate": duplicate, "page-size": PAGE}}
    if xb is not None:
        info["xbzrle-cache"] = xb
    return info


def _xb(pages: int, wire: int, overflow: int = 0, miss: int = 33000) -> dict[str, int]:
    return {"pages": pages, "bytes": wire, "overflow": overflow, "cache-miss": miss}


def test_counters_read_from_query_migrate() -> None:
    c = Counters.of(_info(100, 50, _xb(pages=30, wire=180, overflow=2, miss=7)))
    assert c == Counters(handled=180, encoded=30, overflow=2, miss=7, wire=180)
    assert Counters.of({}) == Counters()


def test_cache_is_a_quarter_of_memory_within_bounds() -> None:
    assert xbzrle_cache_bytes(1 << 30) == 256 << 20
    assert xbzrle_cache_bytes(128 << 20) == 64 << 20
    assert xbzrle_cache_bytes(64 << 30) == 1 << 30
    assert xbzrle_cache_bytes(3 << 30) == 512 << 20  # a power of two, not above a quarter


def test_small_deltas_pay_and_give_a_flush_rate() -> None:
    w = PassWatch(xbzrle=True)
    miss = _xb(0, 0, miss=33000)
    assert not w.observe(1, 1 << 30, Counters.of(_info(56000, 200000, miss)), 0.0)
    assert not w.observe(2, 130 << 20, Counters.of(_info(89000, 200000, miss)), 2.0)
    assert w.undecided()  # post-copy waits for the first delta pass
    start = Counters.of(_info(89000, 200000, _xb(0, 0)))
    assert not w.observe(3, 120 << 20, start, 3.0)
    # 32,000 pages as 6-byte deltas in 50 ms
    assert w.observe(3, 10 << 20, Counters.of(_info(89000, 200000, _xb(32000, 192000))), 3.05)
    assert w.verdict is True and not w.undecided()
    assert w.flush_bps == pytest.approx(32000 * PAGE / 0.05)
    assert w.flush_bps is not None and w.switchover_bps() == int(w.flush_bps * 0.8)
    assert w.rate_for(119e6) == w.switchover_bps()
    assert "pays" in w.notes[-1] and "6 B" in w.notes[-1]
    # the pre-copy keeps running: the rate is measured again, over the whole delta period
    later = Counters.of(_info(89000, 200000, _xb(96000, 576000)))
    assert w.observe(5, 8 << 20, later, 3.2)
    assert w.flush_bps == pytest.approx(96000 * PAGE / 0.2)
    assert not w.observe(6, 8 << 20, later, 3.25)  # not again within 100 ms


def test_whole_page_rewrites_do_not_pay() -> None:
    w = PassWatch(xbzrle=True)
    w.observe(2, 130 << 20, Counters.of(_info(89000, 0, _xb(0, 0))), 2.0)
    w.observe(3, 120 << 20, Counters.of(_info(89000, 0, _xb(0, 0))), 3.0)
    # deltas overflow: pages go whole
    assert w.observe(3, 100 << 20, Counters.of(_info(92000, 0, _xb(10, 9000, overflow=2990))), 3.2)
    assert w.verdict is False and not w.undecided()
    assert w.switchover_bps() is None and w.rate_for(119e6) == 119e6
    assert "does not pay" in w.notes[-1]


def test_large_deltas_do_not_pay() -> None:
    assert xbzrle_pays(Counters(encoded=3000, wire=3000 * 2048), PAGE, final=False) is False
    assert xbzrle_pays(Counters(encoded=3000, wire=3000 * 900), PAGE, final=False) is True


def test_too_few_pages_wait_unless_the_pass_ended() -> None:
    few = Counters(encoded=100, wire=600)
    assert xbzrle_pays(few, PAGE, final=False) is None
    assert xbzrle_pays(few, PAGE, final=True) is True
    assert xbzrle_pays(Counters(), PAGE, final=True) is False


def test_without_xbzrle_nothing_waits() -> None:
    w = PassWatch(xbzrle=False)
    for n in (1, 2, 3, 4):
        assert not w.observe(n, 1 << 20, Counters(), float(n))
    assert not w.undecided() and w.verdict is None and w.switchover_bps() is None
    assert w.pass_no == 4 and w.pass_remaining == 1 << 20
