"""What the auto convergence policy knows about a pre-copy, pass by pass.

The policy's escalation: line rate → XBZRLE where it pays → CPU throttling or post-copy.

XBZRLE (QEMU's delta encoding of re-sent pages against a cache of what was sent before) starts
on its own once QEMU's first scan of memory is done: the second scan fills the cache, from the
third pages that come back to it can go as deltas. Whether it pays depends on how the guest
writes: a guest that changes a few bytes per page sends a few bytes per page; a guest that
rewrites whole pages with new data gains nothing. :class:`PassWatch` judges it from QEMU's own
cache counters once 2,000 pages came back to the cache (or 0.5 s went by), and measures how
fast the source then gets through dirty memory (pages handled per second, whatever their
encoding). QEMU only knows the bytes it put on the wire, so with deltas it believes the link
is slow and never switches over; the engine hands it the measured rate as
``avail-switchover-bandwidth``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

#: Pages to see coming back to the cache before judging XBZRLE, or this long.
JUDGE_PAGES = 2000
JUDGE_S = 0.5
#: ... but not on fewer pages coming back than this before NO_HIT_S: right after the first
#: hit the cache may still be filling (misses) when a mid-scan bitmap sync let a few pages
#: come back early.
JUDGE_MIN_HITS = 200
#: A cache filled for this long (at least) with no page coming back: XBZRLE does not pay.
NO_HIT_S = 2.0
#: XBZRLE pays when most pages go as deltas ...
MIN_ENCODED_SHARE = 0.5
#: ... and a delta costs at most this share of a page on the wire.
MAX_WIRE_SHARE = 0.25
#: The share of the measured rate QEMU plans its switchover with, and the policy predicts
#: with (a rate guessed too high lengthens the downtime; too low keeps pre-copy going while
#: the guest re-dirties its working set, as a guest under TCG does within one pass).
SWITCHOVER_SAFETY = 0.8
#: Once XBZRLE pays, the flush rate is measured again this often (over the whole XBZRLE
#: period) and handed to QEMU again when it moved by this share.
REMEASURE_S = 0.1
REMEASURE_CHANGE = 0.2
#: Once XBZRLE pays, pre-copy gives up (for post-copy) after this many passes that each
#: started with more than fits in the downtime, or after this long.
STALL_PASSES = 3
GRACE_S = 2.0
#: The XBZRLE cache: a quarter of the guest's memory, within these bounds.
CACHE_MIN = 64 << 20
CACHE_MAX = 1 << 30


#: QEMU's downtime limit is the downtime target times the host's ``migration.downtime_aim``
#: (at least AIM_MIN_MS) until this many memory passes are done, then the whole target.
AIM_PASSES = 4
AIM_MIN_MS = 5


def aimed_downtime_ms(target_ms: int, aim: float) -> int:
    """QEMU's downtime limit for the first passes of a move with downtime target ``target_ms``.

    QEMU switches over once what is left fits in its limit at the rate it measured, and its
    pause overshoots the limit when the rate drops as it stops the guest; a guest that dirties
    little gets under a quarter of the target within a pass or two. A guest that does not by
    pass AIM_PASSES gets the whole target (the policy's predictions use the whole target)."""
    return min(target_ms, max(AIM_MIN_MS, round(target_ms * aim)))


#: The send queue of the migration sockets is bounded once what is left of the bulk copy
#: takes this long on the wire (it needs a moment to drain to the bound before the pause).
QUEUE_LEAD_S = 0.1


def bulk_copy_ending(
    passes: int, total: int, transferred: int, remaining: int, rate_bps: float
) -> bool:
    """True once the first scan of memory is nearly done or over.

    During the first scan ``remaining`` counts every page not yet scanned, zero pages too; the
    bytes it will put on the wire are estimated from the share the scanned part needed. The
    engine bounds the sockets' send queue from then on: a short queue costs the writer a
    little throughput (one wake-up per few records under TLS), a long one adds itself to the
    guest's pause at the switchover.
    """
    if passes >= 2:
        return True
    scanned = total - remaining
    if passes < 1 or scanned <= 0 or total <= 0:
        return False
    wire_left = remaining * (transferred / scanned)
    return wire_left <= rate_bps * QUEUE_LEAD_S


def xbzrle_cache_bytes(memory_bytes: int) -> int:
    """The cache size for a guest of ``memory_bytes`` (a power of two, as QEMU uses)."""
    want = max(CACHE_MIN, min(CACHE_MAX, memory_bytes // 4))
    return 1 << (want.bit_length() - 1)


@dataclass(frozen=True)
class Counters:
    """QEMU's running page counters (``query-migrate``), from the start of the move."""

    handled: int = 0  # pages dealt with: sent whole, found zero, or sent as a delta
    encoded: int = 0  # XBZRLE deltas sent
    overflow: int = 0  # deltas larger than the page (sent whole instead)
    miss: int = 0  # pages not in the cache (sent whole, cached)
    wire: int = 0  # bytes of deltas on the wire

    @classmethod
    def of(cls, info: dict[str, Any]) -> Counters:
        """Read them from a ``query-migrate`` answer."""
        ram = info.get("ram", {})
        xb = info.get("xbzrle-cache", {})
        encoded = int(xb.get("pages", 0))
        return cls(
            handled=int(ram.get("normal", 0)) + int(ram.get("duplicate", 0)) + encoded,
            encoded=encoded,
            overflow=int(xb.get("overflow", 0)),
            miss=int(xb.get("cache-miss", 0)),
            wire=int(xb.get("bytes", 0)),
        )

    def __sub__(self, other: Counters) -> Counters:
        return Counters(
            self.handled - other.handled,
            self.encoded - other.encoded,
            self.overflow - other.overflow,
            self.miss - other.miss,
            self.wire - other.wire,
        )


def xbzrle_pays(delta: Counters, page_size: int, *, final: bool) -> bool | None:
    """Whether XBZRLE paid over ``delta`` (None: too few pages seen yet, unless ``final``;
    none at all is no evidence either way)."""
    tried = delta.encoded + delta.overflow + delta.miss
    if tried == 0:
        return None
    # Pages that came back (deltas or overflows) are the evidence; misses while the cache
    # still fills are not, until the verdict is due.
    if delta.encoded + delta.overflow < JUDGE_PAGES and not final:
        return None
    if delta.encoded < MIN_ENCODED_SHARE * tried:
        return False
    return delta.wire <= MAX_WIRE_SHARE * delta.encoded * page_size


@dataclass
class PassWatch:
    """One move's pre-copy as the auto policy follows it (see the module's docstring)."""

    xbzrle: bool
    pass_no: int = 0
    #: What the current pass must send: what the guest dirtied during the last one.
    pass_remaining: int = 0
    began_at: float | None = None
    #: When QEMU began to fill the cache (its first miss).
    filling_since: float | None = None
    #: Counters when pages came back to the cache in numbers (the judging window's start).
    xbzrle_start: Counters | None = None
    xbzrle_started_at: float = 0.0
    #: When the first page came back to the cache.
    first_hit_at: float = 0.0
    #: XBZRLE pays (True), does not (False), not judged yet (None).
    verdict: bool | None = None
    judged_at: float = 0.0
    measured_at: float = 0.0
    #: What each pass since the verdict started with (sampled at its first poll).
    after_verdict: list[int] = field(default_factory=list)
    #: Raw bytes of dirty memory per second the source gets through with XBZRLE.
    flush_bps: float | None = None
    notes: list[str] = field(default_factory=list)
    #: QEMU's downtime limit now (ms; 0: not set by the engine, QEMU's defaults).
    limit_ms: int = 0

    def observe(
        self, passes: int, remaining: int, counters: Counters, now: float, page_size: int = 4096
    ) -> bool:
        """Take one ``query-migrate`` sample; True when the XBZRLE verdict was just reached."""
        if self.began_at is None:
            self.began_at = now
        if passes != self.pass_no:
            self.pass_no = passes
            self.pass_remaining = remaining
            if self.verdict:
                self.after_verdict.append(remaining)
        if self.verdict:
            return self._remeasure(counters, now, page_size)
        if not self.xbzrle or self.verdict is not None:
            return False
        # QEMU's bitmap syncs (``passes``) need not match its scans of memory, so the phases
        # are read off the cache's own counters: misses while it fills, hits (deltas or
        # overflows) once pages come back to it.
        if self.xbzrle_start is None:
            if counters.encoded + counters.overflow > 0:
                self.xbzrle_start, self.xbzrle_started_at = counters, now
                self.first_hit_at = now
                return False
            if counters.miss and self.filling_since is None:
                self.filling_since = now
            if self.filling_since is None:
                return False
            # A cache that pages never come back to (a working set larger than it): judge
            # it once filling took as long as the first scan of memory did, or 2 s.
            if now - self.filling_since <= max(NO_HIT_S, self.filling_since - self.began_at):
                return False
            return self._judge(False, Counters(), now, page_size, "no page came back to it")
        delta = counters - self.xbzrle_start
        waited = now - self.xbzrle_started_at
        late = now - self.first_hit_at > NO_HIT_S
        if waited > JUDGE_S and delta.encoded + delta.overflow < JUDGE_MIN_HITS and not late:
            # A few early hits while the cache still fills: start the window again.
            self.xbzrle_start, self.xbzrle_started_at = counters, now
            return False
        verdict = xbzrle_pays(delta, page_size, final=waited > JUDGE_S or late)
        if verdict is None:
            return False
        return self._judge(verdict, delta, now, page_size)

    def _judge(
        self, verdict: bool, delta: Counters, now: float, page_size: int, why: str = ""
    ) -> bool:
        self.verdict = verdict
        self.judged_at = self.measured_at = now
        seconds = now - self.xbzrle_started_at
        if verdict and seconds > 0:
            self.flush_bps = delta.handled * page_size / seconds
        tried = max(1, delta.encoded + delta.overflow + delta.miss)
        per_page = delta.wire / delta.encoded if delta.encoded else 0.0
        what = why or (
            f"{100 * delta.encoded / tried:.0f} % of pages as deltas of {per_page:.0f} B"
            + (f", dirty memory flushed at {self.flush_bps / 1e6:.0f} MB/s"
               if self.flush_bps else "")
        )  # fmt: skip
        self.notes.append(
            f"XBZRLE {'pays' if verdict else 'does not pay'} (pass {self.pass_no}): {what}"
        )
        return True

    def _remeasure(self, counters: Counters, now: float, page_size: int) -> bool:
        """Refine the flush rate over the whole XBZRLE period; True when it changed much."""
        if self.xbzrle_start is None or now - self.measured_at < REMEASURE_S:
            return False
        self.measured_at = now
        seconds = now - self.xbzrle_started_at
        if seconds <= 0:
            return False
        rate = (counters - self.xbzrle_start).handled * page_size / seconds
        old = self.flush_bps or 0.0
        if old and abs(rate - old) < REMEASURE_CHANGE * old:
            return False
        self.flush_bps = rate
        return True

    def rate_for(self, link_bps: float) -> float:
        """The rate at which dirty memory leaves the source: the link's, or XBZRLE's."""
        bps = self.switchover_bps()
        return link_bps if bps is None else max(link_bps, bps)

    def switchover_bps(self) -> int | None:
        """What to tell QEMU as ``avail-switchover-bandwidth`` (None: leave QEMU's estimate)."""
        if not (self.verdict and self.flush_bps):
            return None
        return math.floor(self.flush_bps * SWITCHOVER_SAFETY)

    def stalled(self, downtime_ms: int, now: float) -> bool:
        """XBZRLE pays, yet pre-copy cannot finish: for STALL_PASSES passes since the verdict
        the guest had re-dirtied more than fits in the downtime at the XBZRLE rate (a working
        set rewritten within every pass), or GRACE_S went by."""
        if not self.verdict:
            return False
        bps = self.switchover_bps() or 0
        fits = bps * downtime_ms / 1000
        recent = self.after_verdict[-STALL_PASSES:]
        if len(recent) >= STALL_PASSES and min(recent) > fits:
            return True
        return now - self.judged_at > GRACE_S

    def undecided(self) -> bool:
        """XBZRLE may still pay: hold post-copy back until pages coming back to the cache
        show whether it does."""
        return self.xbzrle and self.verdict is None
