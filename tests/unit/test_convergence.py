"""The auto policy's prediction of whether pre-copy converges."""

import asyncio
import math
from typing import Any

import pytest

from vmferry.migration.converge import (
    AIM_MIN_MS,
    AIM_PASSES,
    Counters,
    PassWatch,
    aimed_downtime_ms,
    xbzrle_cache_bytes,
    xbzrle_pays,
)
from vmferry.migration.engine import MAX_PRECOPY_PASSES, Moves, predict_passes
from vmferry.migration.model import Job, MoveOptions

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
    assert not w.observe(1, 1 << 30, Counters.of(_info(20000, 100000)), 0.0)  # first scan
    assert not w.observe(2, 130 << 20, Counters.of(_info(56000, 200000, _xb(0, 0, miss=0))), 2.0)
    # the second scan fills the cache (misses only): post-copy waits for the verdict
    fill = Counters.of(_info(89000, 200000, _xb(0, 0, miss=33000)))
    assert not w.observe(3, 120 << 20, fill, 3.0)
    assert w.undecided() and w.filling_since == 3.0
    # pages come back: the window starts at the first hit ...
    first = Counters.of(_info(89000, 200000, _xb(10, 60)))
    assert not w.observe(4, 120 << 20, first, 3.1)
    # ... and 32,000 pages as 6-byte deltas in 50 ms settle it
    assert w.observe(4, 10 << 20, Counters.of(_info(89000, 200000, _xb(32010, 192060))), 3.15)
    assert w.verdict is True and not w.undecided()
    assert w.flush_bps == pytest.approx(32000 * PAGE / 0.05)
    assert w.flush_bps is not None and w.switchover_bps() == int(w.flush_bps * 0.8)
    assert w.rate_for(119e6) == w.switchover_bps()
    assert "pays" in w.notes[-1] and "6 B" in w.notes[-1]
    # the pre-copy keeps running: the rate is measured again, over the whole delta period
    later = Counters.of(_info(89000, 200000, _xb(96010, 576060)))
    assert w.observe(5, 8 << 20, later, 3.3)
    assert w.flush_bps == pytest.approx(96000 * PAGE / 0.2)
    assert not w.observe(6, 8 << 20, later, 3.35)  # not again within 100 ms


def test_whole_page_rewrites_do_not_pay() -> None:
    w = PassWatch(xbzrle=True)
    w.observe(2, 130 << 20, Counters.of(_info(89000, 0, _xb(0, 0, miss=33000))), 2.0)
    w.observe(3, 120 << 20, Counters.of(_info(89000, 0, _xb(0, 5000, overflow=1))), 3.0)
    # deltas overflow: pages go whole
    over = Counters.of(_info(92000, 0, _xb(10, 9000, overflow=2991)))
    assert w.observe(3, 100 << 20, over, 3.2)
    assert w.verdict is False and not w.undecided()
    assert w.switchover_bps() is None and w.rate_for(119e6) == 119e6
    assert "does not pay" in w.notes[-1]


def test_a_cache_nothing_comes_back_to_does_not_pay() -> None:
    w = PassWatch(xbzrle=True)
    w.observe(1, 1 << 30, Counters(), 0.0)
    w.observe(2, 900 << 20, Counters(miss=10), 3.0)  # the first scan took 3 s
    assert not w.observe(3, 900 << 20, Counters(miss=90000), 5.9)
    assert w.undecided()
    assert w.observe(4, 900 << 20, Counters(miss=200000), 6.1)  # filling as long as scan 1
    assert w.verdict is False and "no page came back" in w.notes[-1]


def test_a_small_working_set_is_judged_after_half_a_second() -> None:
    w = PassWatch(xbzrle=True)
    w.observe(2, 1 << 20, Counters(miss=300), 1.0)
    w.observe(3, 1 << 20, Counters(encoded=5, wire=30, miss=300), 1.1)
    assert not w.observe(4, 1 << 20, Counters(encoded=400, wire=2400, miss=300), 1.5)
    assert w.observe(5, 1 << 20, Counters(encoded=800, wire=4800, miss=300), 1.61)
    assert w.verdict is True


def test_a_few_early_hits_while_the_cache_fills_are_no_verdict() -> None:
    """A bitmap sync in the middle of the filling scan lets a few pages come back at once;
    half a second of misses after them says nothing about the deltas (seen in the lab)."""
    w = PassWatch(xbzrle=True)
    w.observe(2, 64 << 20, Counters(miss=1000), 1.0)
    w.observe(3, 64 << 20, Counters(encoded=3, wire=18, miss=1000), 1.1)  # first hits
    assert not w.observe(4, 64 << 20, Counters(encoded=3, wire=18, miss=16000), 1.7)
    assert w.verdict is None
    assert w.observe(5, 64 << 20, Counters(encoded=9000, wire=54000, miss=16384), 2.4)
    assert w.verdict is True


def test_large_deltas_do_not_pay() -> None:
    assert xbzrle_pays(Counters(encoded=3000, wire=3000 * 2048), PAGE, final=False) is False
    assert xbzrle_pays(Counters(encoded=3000, wire=3000 * 900), PAGE, final=False) is True


def test_too_few_pages_wait_unless_the_pass_ended() -> None:
    few = Counters(encoded=100, wire=600)
    assert xbzrle_pays(few, PAGE, final=False) is None
    assert xbzrle_pays(few, PAGE, final=True) is True
    assert xbzrle_pays(Counters(), PAGE, final=True) is None


def test_without_xbzrle_nothing_waits() -> None:
    w = PassWatch(xbzrle=False)
    for n in (1, 2, 3, 4):
        assert not w.observe(n, 1 << 20, Counters(), float(n))
    assert not w.undecided() and w.verdict is None and w.switchover_bps() is None
    assert w.pass_no == 4 and w.pass_remaining == 1 << 20


def _paying_watch() -> PassWatch:
    w = PassWatch(xbzrle=True)
    w.observe(2, 130 << 20, Counters.of(_info(89000, 0, _xb(0, 0))), 2.0)
    w.observe(3, 120 << 20, Counters.of(_info(89000, 0, _xb(1, 6))), 3.0)
    # 32,000 deltas in 0.1 s: 1.31 GB/s, 80 % of it for QEMU: 52 MB fit in 50 ms
    assert w.observe(3, 60 << 20, Counters.of(_info(89000, 0, _xb(32001, 192006))), 3.1)
    return w


def test_working_set_rewritten_every_pass_stalls_after_three_passes() -> None:
    w = _paying_watch()
    c = Counters.of(_info(89000, 0, _xb(32001, 192006)))
    for n, t in ((4, 3.15), (5, 3.2)):
        w.observe(n, 128 << 20, c, t)
        assert not w.stalled(50, t)
    w.observe(6, 128 << 20, c, 3.25)
    assert w.stalled(50, 3.25)  # each pass began with 128 MB: more than fits
    assert not w.stalled(500, 3.25)  # a 500 ms downtime would take it


def test_shrinking_remainder_is_not_stalled_until_the_grace_ends() -> None:
    w = _paying_watch()
    c = Counters.of(_info(89000, 0, _xb(32001, 192006)))
    for n, t in ((4, 3.15), (5, 3.2), (6, 3.25), (7, 3.3)):
        w.observe(n, (128 if n % 2 else 16) << 20, c, t)
    assert not w.stalled(50, 3.3)
    assert w.stalled(50, 3.1 + 2.01)
    assert not PassWatch(xbzrle=True).stalled(50, 100.0)  # no verdict: nothing to give up


def test_send_queue_is_bounded_near_the_end_of_the_first_scan() -> None:
    from vmferry.migration.converge import QUEUE_LEAD_S, bulk_copy_ending

    gib, rate = 1 << 30, 125e6
    left = int(rate * QUEUE_LEAD_S)  # wire bytes the lead allows
    # idle guest, a tenth of memory is data: 900 MiB left to scan is ~90 MB on the wire
    assert not bulk_copy_ending(1, gib, 12 << 20, 900 << 20, rate)
    # a tenth of what is left to scan, within the lead
    remaining = 9 * left
    scanned = gib - remaining
    assert bulk_copy_ending(1, gib, scanned // 10, remaining, rate)
    # the same pages left in a guest full of data are 9 leads on the wire
    assert not bulk_copy_ending(1, gib, scanned, remaining, rate)
    # before the scan started, and in every later pass
    assert not bulk_copy_ending(1, gib, 0, gib, rate)
    assert not bulk_copy_ending(0, 0, 0, 0, rate)
    assert bulk_copy_ending(2, gib, 824 << 20, 500 << 20, rate)


def test_qemu_aims_at_a_share_of_the_downtime_target() -> None:
    assert aimed_downtime_ms(50, 0.25) == 12  # rounded to the nearest ms
    assert aimed_downtime_ms(50, 1.0) == 50  # the whole target from the start
    assert aimed_downtime_ms(10, 0.25) == AIM_MIN_MS  # never below the floor ...
    assert aimed_downtime_ms(3, 0.25) == 3  # ... nor above the target itself


class _Params:
    """Stands in for a QMP session: keeps the migration parameters it was asked to set."""

    def __init__(self) -> None:
        self.set: list[dict[str, Any]] = []

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        assert cmd == "migrate-set-parameters", cmd
        self.set.append(args or {})
        return {}


def test_downtime_limit_goes_to_the_whole_target_once_the_aimed_passes_are_done() -> None:
    moves = Moves.__new__(Moves)  # only _converge's state is needed
    job = Job(vm="vm1", source="h1", destination="h2", destination_url="https://h2:7443",
              options=MoveOptions(downtime_target_ms=60))  # fmt: skip
    moves._watch = {job.id: PassWatch(xbzrle=False, limit_ms=aimed_downtime_ms(60, 0.25))}
    q = _Params()
    info = _info(1000)
    for passes in range(1, AIM_PASSES + 1):  # still aiming low: nothing changes
        job.progress.passes = passes
        asyncio.run(moves._converge(job, q, info, postcopy=False, policy="auto"))  # type: ignore[arg-type]
    assert q.set == [] and job.escalations == []
    job.progress.passes = AIM_PASSES + 1
    asyncio.run(moves._converge(job, q, info, postcopy=False, policy="auto"))  # type: ignore[arg-type]
    assert q.set == [{"downtime-limit": 60}]
    assert job.escalations == [f"downtime limit 15 -> 60 ms at pass {AIM_PASSES + 1}: the rest "
                               "stayed above the aim"]  # fmt: skip
    asyncio.run(moves._converge(job, q, info, postcopy=False, policy="auto"))  # type: ignore[arg-type]
    assert len(q.set) == 1  # once


def test_qemus_defaults_keep_their_downtime_limit() -> None:
    moves = Moves.__new__(Moves)
    job = Job(vm="vm1", source="h1", destination="h2", destination_url="https://h2:7443",
              options=MoveOptions(downtime_target_ms=60))  # fmt: skip
    moves._watch = {job.id: PassWatch(xbzrle=False)}  # limit_ms 0: the engine set none
    job.progress.passes = 10
    q = _Params()
    asyncio.run(moves._converge(job, q, _info(1000), postcopy=False, policy="auto"))  # type: ignore[arg-type]
    assert q.set == []


def test_a_working_set_xbzrle_pays_on_gets_the_whole_target_at_once() -> None:
    moves = Moves.__new__(Moves)
    job = Job(vm="vm1", source="h1", destination="h2", destination_url="https://h2:7443",
              options=MoveOptions(downtime_target_ms=60))  # fmt: skip
    watch = PassWatch(xbzrle=True, limit_ms=15, verdict=True)  # judged before this sample
    moves._watch = {job.id: watch}
    job.progress.passes = 3
    q = _Params()
    asyncio.run(moves._converge(job, q, _info(1000), postcopy=False, policy="auto"))  # type: ignore[arg-type]
    assert {"downtime-limit": 60} in q.set
    assert job.escalations[-1].startswith("downtime limit 15 -> 60 ms at pass 3: XBZRLE pays")
