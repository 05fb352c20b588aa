"""Live-migration benchmark: vmferry's defaults against QEMU driven with its own defaults.

Six scenarios on a 2-host lab whose migration network is shaped to 1 Gbit/s (see
:data:`SCENARIOS`). Each run boots a fresh 1 GiB probe guest on h1, lets its dirtier warm up,
starts a 1 ms UDP blackout probe from the client namespace, moves the guest to h2 with a time
budget and collects the job's figures. Reports go to ``bench/results/migrate.{md,json,png}``.

Run as root: ``.venv/bin/python -m bench.run --only migrate [--runs N]``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vmferry.client import FerryClient, FerryError
from vmferry.lab import Lab
from vmferry.lab.lab import BackgroundProbe, probe, start_probe, wait_answer
from vmferry.lab.probe import GAP_LIST_LEN

RESULTS = Path(__file__).parent / "results"

LINK_RATE = "1gbit"
LINK_BYTES_PER_S = 125_000_000  # 1 Gbit/s
MIB = 1 << 20
GIB = 1 << 30
MEMORY_MIB = 1024
BUDGET_S = 90.0  # per move: the engine's timeout_s (on_timeout abort) ...
GRACE_S = 20.0  # ... and the bench stops waiting (and cancels) this long after it
BOOT_TIMEOUT_S = 120.0
WARMUP_S = 3.0
AFTER_S = 1.0  # the blackout probe keeps running this long after the job ends
TAIL_GAP_MS = 50.0  # no reply for this long at the end of the probe: the guest is not answering
SPAN_START = ("mirror", "precopy")
SPAN_END = "announce"
TERMINAL = ("completed", "failed", "cancelled")
SRC, DST = "h1", "h2"


@dataclass(frozen=True)
class Target:
    """What vmferry should achieve in a scenario."""

    ratio: float  # total time / physical limit, at most
    blackout_ms: float  # guest-observed blackout, at most (and every run must complete)


@dataclass(frozen=True)
class Scenario:
    """One guest set-up to move."""

    key: str
    what: str
    dirty: str | None = None  # the guest dirtier's working set (SIZE@RATE)
    shared: bool = True  # storage on the lab's shared volume (else host-local: shared-nothing)
    disk_mib: int = 64
    fill_mib: int = 0  # bytes written into the disk image before boot
    target: Target | None = None


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("idle", "idle guest, shared storage", target=Target(1.1, 50)),
    Scenario("ws32", "dirtier on a 32 MB working set, full speed, shared storage", "32M@0"),
    Scenario("ws128", "dirtier on a 128 MB working set (~ link rate), one byte per page "
             "changes each round (XBZRLE's best case), shared storage", "128M@0",
             target=Target(1.5, 150)),
    Scenario("ws128full", "dirtier rewriting whole pages of a 128 MB working set with new data "
             "(no delta gain: post-copy's case), shared storage", "128M@0:full",
             target=Target(1.5, 150)),
    Scenario("ws256", "dirtier on a 256 MB working set, shared storage", "256M@0"),
    Scenario("sn", "shared-nothing: host-local 1 GiB disk filled with data, idle guest",
             shared=False, disk_mib=1024, fill_mib=1024, target=Target(1.3, 100)),
)  # fmt: skip

#: Move options per variant (the time budget is added to both).
VARIANTS: dict[str, dict[str, Any]] = {
    "vmferry": {},
    "baseline": {"qemu_defaults": True},
}


# -- small helpers ---------------------------------------------------------------------------


def _median(values: Iterable[float | int | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return statistics.median(vals) if vals else None


def _stat_or_none(lab: Lab, ip: str) -> dict[str, Any] | None:
    try:
        r = probe(lab, "stat", ip, count=1, timeout=0.5)
    except FerryError:
        return None
    return None if "error" in r else r


def _tx_bytes(lab: Lab, host: str) -> int | None:
    """Bytes sent so far on ``host``'s migration interface (all moves, NBD included)."""
    h = lab.topology().host(host)
    done = subprocess.run(
        ["ip", "-n", h.netns, "-j", "-s", "link", "show", "dev", h.migration_if],
        capture_output=True, text=True, timeout=10, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        return None
    try:
        return int(json.loads(done.stdout)[0]["stats64"]["tx"]["bytes"])
    except (ValueError, LookupError, TypeError):
        return None


def _git_state() -> dict[str, str]:
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10, check=False)  # fmt: skip
        return done.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "src_changes": git("status", "--short", "src")}


def phase_seconds(job: dict[str, Any]) -> dict[str, float]:
    """Seconds per phase of a job (a repeated phase is summed)."""
    out: dict[str, float] = {}
    for p in job.get("phases") or []:
        if p.get("ended_at") is not None:
            out[p["phase"]] = out.get(p["phase"], 0.0) + p["ended_at"] - p["started_at"]
    return {k: round(v, 3) for k, v in out.items()}


def span_seconds(job: dict[str, Any]) -> float | None:
    """From the start of the first copy phase (mirror or precopy) to the end of announce."""
    phases = job.get("phases") or []
    starts = [p["started_at"] for p in phases if p["phase"] in SPAN_START]
    ends = [p["ended_at"] for p in phases if p["phase"] == SPAN_END and p.get("ended_at")]
    if not starts or not ends:
        return None
    return round(float(max(ends)) - float(min(starts)), 3)


def _phases_during(job: dict[str, Any], start: float | None, length_ms: float | None) -> str | None:
    """The job phases a gap (wall-clock start, length) overlapped, as "first..last"."""
    if start is None or length_ms is None:
        return None
    stop = start + length_ms / 1000
    hit = [str(p["phase"]) for p in job.get("phases") or []
           if p["started_at"] < stop and (p.get("ended_at") or float("inf")) > start]  # fmt: skip
    if not hit:
        return "outside the job"
    return hit[0] if len(hit) == 1 else f"{hit[0]}..{hit[-1]}"


# -- one run ---------------------------------------------------------------------------------


class _Guests:
    """Hands out a fresh guest address per VM (the lab has .11 to .200)."""

    def __init__(self) -> None:
        self.n = 0

    def next(self, lab: Lab) -> str:
        self.n += 1
        return lab.topology().guest_ip(self.n)


def _create_guest(lab: Lab, sc: Scenario, name: str, ip: str) -> dict[str, Any]:
    roles = ["heartbeat", "udpecho", "tcpecho"] + (["dirty"] if sc.dirty else [])
    probe_spec: dict[str, Any] = {"ip": f"{ip}/24", "roles": roles}
    if sc.dirty:
        probe_spec["dirty"] = sc.dirty
    spec: dict[str, Any] = {
        "name": name,
        "memory_mib": MEMORY_MIB,
        "disks": [{"size_mib": sc.disk_mib}],
        "nics": [{"switch": "external"}],
        "probe": probe_spec,
    }
    if sc.shared:
        spec["storage_dir"] = str(lab.shared_dir / name)
    with lab.client(SRC) as c:
        vm = c.create_vm(spec)
        if sc.fill_mib:
            disk = Path(vm["storage_dir"], vm["disks"][0]["file"])
            subprocess.run(
                ["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {sc.fill_mib}M", str(disk)],
                check=True, capture_output=True, timeout=300,
            )  # fmt: skip
        c.action(name, "start")
    return spec


def _wait_job(
    c: FerryClient, job_id: str, deadline: float, on_poll: Callable[[dict[str, Any]], None]
) -> dict[str, Any] | None:
    """Poll until the job ends (returned) or ``deadline`` passes (None)."""
    while time.monotonic() < deadline:
        job = c.migration(job_id)
        on_poll(job)
        if job["state"] in TERMINAL:
            return job
        time.sleep(0.2)
    return None


def _remove_everywhere(lab: Lab, name: str) -> None:
    """Cancel what still moves the VM, then stop and delete it wherever it is."""
    for host in (SRC, DST):
        with lab.client(host) as c:
            for j in c.migrations():
                if j["vm"] == name and j["state"] not in TERMINAL:
                    with contextlib.suppress(FerryError):
                        c.cancel_migration(j["id"])
                    _wait_job(c, j["id"], time.monotonic() + 120, lambda _j: None)
    for host in (SRC, DST):
        with lab.client(host) as c:
            if name not in {v["name"] for v in c.vms()}:
                continue
            if c.vm(name)["state"] not in ("off", "saved", "crashed"):
                c.action(name, "stop")
            c.delete_vm(name)


def run_one(
    lab: Lab, sc: Scenario, variant: str, repeat: int, guests: _Guests, budget: float
) -> dict[str, Any]:
    """Boot a fresh guest, move it h1 -> h2 under a blackout probe, return every figure."""
    name = f"mig-{sc.key}-{variant}-{repeat}"
    ip = guests.next(lab)
    options = {**VARIANTS[variant], "timeout_s": budget, "on_timeout": "abort"}
    run: dict[str, Any] = {
        "scenario": sc.key, "variant": variant, "repeat": repeat, "vm": name, "ip": ip,
        "options": options, "finished": False, "state": None, "bench_cancelled": False,
        "bench_error": None,
    }  # fmt: skip
    bo: BackgroundProbe | None = None
    try:
        t0 = time.monotonic()
        run["spec"] = _create_guest(lab, sc, name, ip)
        t_created = time.monotonic()
        wait_answer(lab, ip, BOOT_TIMEOUT_S)
        run["create_s"] = round(t_created - t0, 2)
        run["boot_s"] = round(time.monotonic() - t_created, 2)
        before = wait_answer(lab, ip, 10)
        time.sleep(WARMUP_S)
        warm = wait_answer(lab, ip, 10)
        run["stat_before"] = warm
        run["dirty_rounds_per_s"] = round(
            (warm.get("dirty_rounds", 0) - before.get("dirty_rounds", 0)) / WARMUP_S, 2
        )
        tx0 = _tx_bytes(lab, SRC)
        bo = start_probe(lab, "blackout", ip, duration=min(600.0, budget + GRACE_S + 150),
                         interval_ms=1)  # fmt: skip
        ep = lab.endpoint(DST)
        with lab.client(SRC) as c:
            t_move = time.monotonic()
            job = c.move(name, {"destination": {"name": DST, "url": ep.url}, "options": options})
            last: dict[str, Any] = job

            def keep(j: dict[str, Any]) -> None:
                nonlocal last
                last = j

            done = _wait_job(c, job["id"], t_move + budget + GRACE_S, keep)
            if done is None:  # over the budget: cancel (refused past the point of no return)
                run["bench_cancelled"] = True
                try:
                    c.cancel_migration(job["id"])
                except FerryError as exc:
                    run["cancel_refused"] = str(exc)
                done = _wait_job(c, job["id"], time.monotonic() + 180, keep)
            run["wait_s"] = round(time.monotonic() - t_move, 2)
            final = done if done is not None else last
        time.sleep(AFTER_S)
        run["blackout"] = bo.stop()
        bo = None
        tx1 = _tx_bytes(lab, SRC)
        run["wire_tx_bytes"] = tx1 - tx0 if tx0 is not None and tx1 is not None else None
        run["stat_after"] = _stat_or_none(lab, ip)
        run["job"] = final
        run["state"] = final["state"]
        run["finished"] = final["state"] == "completed"
    except Exception as exc:  # record and go on with the next run
        run["bench_error"] = f"{exc.__class__.__name__}: {exc}"
    finally:
        if bo is not None:
            with contextlib.suppress(Exception):
                run["blackout"] = bo.stop(timeout=5)
        try:
            _remove_everywhere(lab, name)
        except Exception as exc:
            run["cleanup_error"] = f"{exc.__class__.__name__}: {exc}"
    _derive(run, sc)
    return run


def _derive(run: dict[str, Any], sc: Scenario) -> None:
    """Figures read from the raw job and probe results (no physical limit yet)."""
    job: dict[str, Any] = run.get("job") or {}
    stats: dict[str, Any] = job.get("qemu_stats") or {}
    ram: dict[str, Any] = stats.get("ram") or {}
    progress: dict[str, Any] = job.get("progress") or {}
    bo: dict[str, Any] = run.get("blackout") or {}
    ram_bytes = int(ram.get("transferred") or progress.get("ram_transferred") or 0)
    disk_bytes = int(progress.get("disk_transferred") or 0) if not sc.shared else 0
    run["span_s"] = span_seconds(job) if run["finished"] else None
    run["total_s"] = job.get("total_s")
    run["phase_s"] = phase_seconds(job)
    # QEMU fills total-time and downtime in only after it reports "completed"; a job whose
    # stats were read in between carries 0 for both: that 0 is no measurement.
    run["qemu_downtime_raw"] = job.get("qemu_downtime_ms")
    run["qemu_stats_incomplete"] = bool(stats) and not stats.get("total-time")
    run["qemu_downtime_ms"] = None if run["qemu_stats_incomplete"] else job.get("qemu_downtime_ms")
    # A guest that stopped answering and had not come back when the probe ended (1 s after
    # the job) was out at least that long: the tail counts as a gap.
    tail = bo.get("tail_gap_ms")
    run["no_answer_at_end"] = tail is not None and tail > TAIL_GAP_MS
    gaps = [g for g in (bo.get("longest_gap_ms"), tail) if g is not None]
    run["blackout_ms"] = max(gaps) if gaps else None
    run["blackout_phase"] = _phases_during(
        job, bo.get("longest_gap_start_epoch"), bo.get("longest_gap_ms")
    )
    run["handover_gap_ms"], run["before_gap_ms"] = split_gaps(job, bo) if run["finished"] else (
        None, None)  # fmt: skip
    run["ram_bytes"] = ram_bytes
    run["disk_bytes"] = disk_bytes
    run["bytes_sent"] = ram_bytes + disk_bytes
    run["passes"] = ram.get("dirty-sync-count", progress.get("passes"))
    run["postcopy_used"] = job.get("postcopy_used")
    run["escalations"] = job.get("escalations")
    run["error"] = (job.get("error") or {}).get("message") or run.get("bench_error")


def split_gaps(job: dict[str, Any], bo: dict[str, Any]) -> tuple[float | None, float | None]:
    """The longest echo gap that overlaps the hand-over (from the first of ``postcopy`` and
    ``switchover`` to the end of ``announce``), and the longest that ended before it (the guest
    still running on the source). From the probe's list of its longest gaps (over 5 ms)."""
    started = bo.get("started_epoch")
    phases = {p["phase"]: p for p in job.get("phases") or []}
    first = [phases[p]["started_at"] for p in ("postcopy", "switchover") if p in phases]
    end = (phases.get("announce") or phases.get("resume") or {}).get("ended_at")
    if started is None or not first or end is None:
        return None, None
    begin = min(first)
    gaps = bo.get("gaps") or []
    at_handover = [ms for at, ms in gaps
                   if started + at <= end and started + at + ms / 1000 >= begin]  # fmt: skip
    before = [ms for at, ms in gaps if started + at + ms / 1000 < begin]
    # Not among the longest listed: shorter than all of them, unknown how long (None).
    none = None if len(gaps) >= GAP_LIST_LEN else 0.0
    return (max(at_handover) if at_handover else none), (max(before) if before else none)


def memory_to_move(runs: Sequence[dict[str, Any]]) -> tuple[int, str]:
    """The guest's non-zero memory in one scenario, and where that figure came from.

    The largest ``first_pass_bytes`` of the scenario's runs (the same guest in every run; a
    reading taken too early can only be lower, a late one is at most one 20 ms poll higher);
    else the ``normal-bytes`` of a run that converged in one pass; else the memory size.
    """
    firsts = [int(fp) for r in runs if (fp := (r.get("job") or {}).get("first_pass_bytes"))]
    if firsts:
        return max(firsts), f"max first_pass_bytes of {len(firsts)} run(s)"
    for r in runs:
        stats = (r.get("job") or {}).get("qemu_stats") or {}
        ram = stats.get("ram") or {}
        if r["finished"] and int(ram.get("dirty-sync-count", 99)) <= 2 and ram.get("normal-bytes"):
            return int(ram["normal-bytes"]), f"normal-bytes of {r['vm']}"
    return MEMORY_MIB * MIB, "memory size"


def add_limits(runs: list[dict[str, Any]]) -> None:
    """Physical limit and ratio per run: bytes that had to move / link rate."""
    by_sc = {sc.key: sc for sc in SCENARIOS}
    for run in runs:
        sc = by_sc[run["scenario"]]
        mem, source = memory_to_move([r for r in runs if r["scenario"] == sc.key])
        must = mem + sc.fill_mib * MIB
        run["bytes_to_move"] = must
        run["bytes_to_move_source"] = source
        run["limit_s"] = round(must / LINK_BYTES_PER_S, 3)
        run["ratio"] = round(run["span_s"] / run["limit_s"], 3) if run["span_s"] else None


# -- summary and reports ---------------------------------------------------------------------

PHASE_COLUMNS = ("mirror", "precopy", "postcopy", "switchover", "resume", "announce")
FIGURES = ("span_s", "total_s", "ratio", "blackout_ms", "qemu_downtime_ms", "bytes_sent",
           "limit_s", "handover_gap_ms", "before_gap_ms")  # fmt: skip


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Medians over the finished runs of each scenario and variant."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for sc in SCENARIOS:
        for variant in VARIANTS:
            mine = [r for r in runs if r["scenario"] == sc.key and r["variant"] == variant]
            if not mine:
                continue
            ok = [r for r in mine if r["finished"]]
            s: dict[str, Any] = {f: _median(r.get(f) for r in ok) for f in FIGURES}
            s["limit_s"] = _median(r.get("limit_s") for r in mine)
            s["runs"], s["finished"] = len(mine), len(ok)
            phases = sorted({p for r in ok for p in r["phase_s"]})
            s["phase_s"] = {p: _median(r["phase_s"].get(p) for r in ok) for p in phases}
            s["passes"] = _median(r.get("passes") for r in ok)
            s["first_pass_bytes"] = _median(
                (r.get("job") or {}).get("first_pass_bytes") for r in mine
            )
            s["stats_incomplete"] = sum(1 for r in ok if r.get("qemu_stats_incomplete"))
            s["postcopy_runs"] = sum(1 for r in ok if r.get("postcopy_used"))
            s["escalations"] = sorted({e for r in mine for e in r.get("escalations") or []})
            s["errors"] = sorted({r["error"] for r in mine if r.get("error")})
            s["blackout_phase"] = sorted({r["blackout_phase"] for r in ok if r["blackout_phase"]})
            out.setdefault(sc.key, {})[variant] = s
    return out


def check_targets(summary: dict[str, dict[str, dict[str, Any]]]) -> list[tuple[str, bool, str]]:
    """(scenario, met, explanation) for every scenario with a target (vmferry's figures)."""
    res = []
    for sc in SCENARIOS:
        t = sc.target
        s = summary.get(sc.key, {}).get("vmferry")
        if t is None or s is None:
            continue
        parts, met = [], True
        met &= s["finished"] == s["runs"]
        parts.append(f"completed {s['finished']}/{s['runs']}")
        ratio, bo = s["ratio"], s["blackout_ms"]
        r_ok = ratio is not None and ratio <= t.ratio
        b_ok = bo is not None and bo <= t.blackout_ms
        met &= r_ok and b_ok
        parts.append(f"ratio {_fmt(ratio, '.2f', 'x')} {'<=' if r_ok else 'NOT <='} {t.ratio}x")
        parts.append(f"blackout {_fmt(bo, '.0f', ' ms')} {'<=' if b_ok else 'NOT <='} "
                     f"{t.blackout_ms:.0f} ms")  # fmt: skip
        res.append((sc.key, met, ", ".join(parts)))
    return res


def _fmt(v: float | None, spec: str, unit: str = "") -> str:
    return "—" if v is None else f"{v:{spec}}{unit}"


def _mb(v: float | None) -> str:
    return "—" if v is None else f"{v / 1e6:,.0f} MB"


def _target_text(sc: Scenario) -> str:
    t = sc.target
    if t is None:
        return "—"
    first = "completes, " if sc.key.startswith("ws128") else ""
    return f"{first}≤ {t.ratio}x, ≤ {t.blackout_ms:.0f} ms"


def write_markdown(doc: dict[str, Any], path: Path) -> None:
    summary: dict[str, dict[str, dict[str, Any]]] = doc["summary"]
    lines = [
        "# migrate",
        "",
        f"Command: `{doc['command']}` — {doc['date']}, {doc['machine']['cpus']} CPUs, TCG, "
        f"engine commit {doc['engine']['commit'][:10]}"
        f"{' (+ uncommitted src changes)' if doc['engine']['src_changes'] else ''}.",
        "",
        f"Lab: 2 hosts, migration link shaped to {LINK_RATE} (tbf, both directions). Guest: "
        f"{MEMORY_MIB} MiB, 1 vCPU probe guest. {doc['runs_per_variant']} run(s) per "
        f"scenario and variant, medians over the finished runs. Budget per move: "
        f"{doc['budget_s']:.0f} s (`timeout_s`, `on_timeout: abort`; the bench cancels "
        f"{GRACE_S:.0f} s later if the job is still going).",
        "",
        "| scenario | variant | finished | total s (span) | total_s (job) | ratio to limit "
        "| guest blackout ms | QEMU downtime ms | bytes sent | vmferry target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for sc in SCENARIOS:
        for variant in VARIANTS:
            s = summary.get(sc.key, {}).get(variant)
            if s is None:
                continue
            fin = f"{s['finished']}/{s['runs']}" + ("" if s["finished"] else " **not finished**")
            down = _fmt(s["qemu_downtime_ms"], ".0f")
            if s["stats_incomplete"]:
                down += f" ({s['stats_incomplete']} run(s) n/a†)"
            lines.append(
                f"| {sc.key} | {variant} | {fin} | {_fmt(s['span_s'], '.2f')} "
                f"| {_fmt(s['total_s'], '.2f')} | {_fmt(s['ratio'], '.2f', 'x')} "
                f"| {_fmt(s['blackout_ms'], '.0f')} | {down} "
                f"| {_mb(s['bytes_sent'])} | {_target_text(sc) if variant == 'vmferry' else ''} |"
            )
    lines += ["", "**Targets (vmferry):** " + "; ".join(
        f"{k} {'met' if ok else 'MISSED'} ({why})" for k, ok, why in doc["targets"]
    ) + "."]  # fmt: skip
    lines += [
        "",
        "## Phases and QEMU figures (medians of finished runs)",
        "",
        "| scenario | variant | mirror s | precopy s | postcopy s | switchover s | resume s "
        "| announce s | passes | post-copy runs | phases in longest gap | gap at hand-over ms "
        "| longest gap before ms | first pass | limit s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for sc in SCENARIOS:
        for variant in VARIANTS:
            s = summary.get(sc.key, {}).get(variant)
            if s is None:
                continue
            ph = s["phase_s"]
            cells = [_fmt(ph.get(p), ".2f") for p in PHASE_COLUMNS]
            lines.append(
                f"| {sc.key} | {variant} | {' | '.join(cells)} | {_fmt(s['passes'], '.0f')} "
                f"| {s['postcopy_runs']} | {', '.join(s['blackout_phase']) or '—'} "
                f"| {_fmt(s['handover_gap_ms'], '.0f')} | {_fmt(s['before_gap_ms'], '.0f')} "
                f"| {_mb(s['first_pass_bytes'])} | {_fmt(s['limit_s'], '.2f')} |"
            )
    notes = []
    for sc in SCENARIOS:
        for variant in VARIANTS:
            s = summary.get(sc.key, {}).get(variant)
            if s and (s["errors"] or s["escalations"]):
                what = s["escalations"] + [f"error: {e}" for e in s["errors"]]
                notes.append(f"- {sc.key}/{variant}: " + "; ".join(what))
    if notes:
        lines += ["", "Escalations and errors:", "", *notes]
    lines += [
        "",
        "## Definitions",
        "",
        "- **total s (span)**: from the start of the job's first copy phase (`mirror` for "
        "shared-nothing, else `precopy`) to the end of `announce`; `total_s (job)` is the "
        "engine's whole-job figure including queueing, checks, setup and cleanup.",
        "- **physical limit** = bytes that had to move ÷ link rate (1 Gbit/s = 125,000,000 B/s). "
        "Bytes that had to move = the guest's non-zero memory (the jobs' `first_pass_bytes`, "
        "i.e. QEMU's `ram.normal-bytes` once the first full pass is done, taking the largest "
        "over the scenario's runs so vmferry and the baseline are held to the same limit and "
        "a reading taken mid-pass cannot shrink it; else `normal-bytes` of a run that "
        "converged in one pass; else the memory size) + for sn the disk's data "
        "(1 GiB). Zero pages cost almost nothing on the wire and are not counted; pages the "
        "guest dirties again are not counted either, so a dirtying guest cannot reach 1.0x. "
        "**ratio to limit** = span ÷ physical limit.",
        "- **guest blackout**: the longest gap between consecutive echo replies of a 1 ms UDP "
        "stream sent from the lab's client namespace, running from before the move until "
        f"{AFTER_S:.0f} s after the job ended. **QEMU downtime**: QEMU's own `downtime` "
        "(source view, stop to completion); † = the job recorded QEMU's stats before QEMU had "
        "filled them in (`total-time` and `downtime` both 0): no figure. **gap at hand-over**: "
        "the longest echo gap overlapping the hand-over (from the start of `postcopy` or "
        "`switchover` to the end of `announce`); **longest gap before**: the longest that "
        "ended before it, while the guest still ran on the source (many short XBZRLE "
        "passes each stall a TCG guest a little). The guest blackout is the larger of the two "
        "(or of a gap after the hand-over). "
        "**bytes sent**: "
        "QEMU's `ram.transferred` + for sn the mirror's copied bytes "
        "(`progress.disk_transferred`).",
        "- **baseline**: the same plumbing with `qemu_defaults: true` (plain migrate, QEMU's "
        "128 MiB/s cap, 300 ms downtime limit, no post-copy, no auto-converge, QEMU's own "
        "socket options).",
        "- A run that did not complete within its budget, or failed, counts as not finished; "
        "its figures are left out of the medians (raw values in migrate.json).",
    ]
    path.write_text("\n".join(lines) + "\n")


def write_figure(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary: dict[str, dict[str, dict[str, Any]]] = doc["summary"]
    keys = [sc.key for sc in SCENARIOS if sc.key in summary]
    targets = {sc.key: sc.target for sc in SCENARIOS}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    width = 0.38
    colours = {"vmferry": "#1f77b4", "baseline": "#aaaaaa"}
    panels = (("blackout_ms", "guest blackout (ms, log)", "blackout_ms"),
              ("ratio", "total time ÷ physical limit", "ratio"))  # fmt: skip
    for ax, (field, title, tfield) in zip(axes, panels, strict=True):
        for i, variant in enumerate(VARIANTS):
            xs = [k + (i - 0.5) * width for k in range(len(keys))]
            vals = [summary[k].get(variant, {}).get(field) for k in keys]
            ax.bar([x for x, v in zip(xs, vals, strict=True) if v is not None],
                   [v for v in vals if v is not None], width, label=variant,
                   color=colours[variant])  # fmt: skip
            for x, v in zip(xs, vals, strict=True):
                if v is None:
                    ax.text(x, 0.02, "did not\nfinish", ha="center", va="bottom", fontsize=7,
                            rotation=90, transform=ax.get_xaxis_transform())  # fmt: skip
                else:
                    ax.text(x, v, f"{v:.0f}" if field == "blackout_ms" else f"{v:.2f}",
                            ha="center", va="bottom", fontsize=7)  # fmt: skip
        for k, key in enumerate(keys):
            t = targets.get(key)
            if t is not None:
                y = t.blackout_ms if tfield == "blackout_ms" else t.ratio
                ax.hlines(y, k - width, k + width, colors="red", linestyles="dashed")
        tops = [v for k in keys for var in VARIANTS
                if (v := summary[k].get(var, {}).get(field)) is not None]  # fmt: skip
        tops += [getattr(t, tfield) for k in keys if (t := targets.get(k)) is not None]
        if field == "blackout_ms":
            ax.set_yscale("log")
            ax.set_ylim(10, max(tops, default=100) * 4)
        else:
            ax.set_ylim(0, max(tops, default=1) * 1.2)
        ax.set_xticks(range(len(keys)), keys)
        ax.set_title(title)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=2, fontsize=8)
    fig.suptitle("vmferry live migration vs QEMU defaults, 1 Gbit/s link "
                 "(red dashes: vmferry targets)")  # fmt: skip
    fig.text(0.01, 0.01, f"{doc['command']} — {doc['date']}", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(runs: list[dict[str, Any]], command: str, budget: float, runs_per: int,
           out: Path = RESULTS) -> dict[str, Any]:  # fmt: skip
    """Write migrate.json, migrate.md and migrate.png; return the JSON document."""
    add_limits(runs)
    summary = summarize(runs)
    doc: dict[str, Any] = {
        "benchmark": "migrate",
        "command": command,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "accelerator": "tcg",
        "engine": _git_state(),
        "link_rate": LINK_RATE,
        "link_bytes_per_s": LINK_BYTES_PER_S,
        "budget_s": budget,
        "runs_per_variant": runs_per,
        "scenarios": [asdict(sc) for sc in SCENARIOS],
        "variants": VARIANTS,
        "summary": summary,
        "targets": check_targets(summary),
        "runs": runs,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "migrate.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    write_markdown(doc, out / "migrate.md")
    write_figure(doc, out / "migrate.png")
    print(f"wrote {out / 'migrate'}.md, .json and .png")
    return doc


# -- entry -----------------------------------------------------------------------------------


def run_all(
    lab_dir: Path, runs_per: int, budget: float = BUDGET_S, only: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Bring up a 2-host 1 Gbit/s lab, run every scenario and variant, tear the lab down."""
    lab = Lab(lab_dir)
    rows: list[dict[str, Any]] = []
    guests = _Guests()
    try:
        lab.up(2, link_rate=LINK_RATE)
        for sc in SCENARIOS:
            if only and sc.key not in only:
                continue
            for repeat in range(runs_per):
                for variant in VARIANTS:
                    t0 = time.monotonic()
                    row = run_one(lab, sc, variant, repeat, guests, budget)
                    rows.append(row)
                    print(
                        f"{sc.key}/{variant} #{repeat + 1}: {row['state']} "
                        f"span={row['span_s']} total={row['total_s']} "
                        f"blackout={row['blackout_ms']} downtime={row['qemu_downtime_ms']} "
                        f"sent={row['bytes_sent']} passes={row['passes']} "
                        f"err={row['error']} ({time.monotonic() - t0:.0f} s)",
                        flush=True,
                    )
    finally:
        lab.down()
    return rows


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.migrate``: the migration benchmark alone (see bench.run)."""
    import argparse
    import sys
    import tempfile

    ap = argparse.ArgumentParser(prog="bench.migrate")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--budget", type=float, default=BUDGET_S)
    ap.add_argument("--scenarios", help="comma-separated subset of: "
                    + ",".join(sc.key for sc in SCENARIOS))  # fmt: skip
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="vmferry-bench-"))
    os.environ["FERRY_CONFIG"] = str(base / "client.json")
    only = args.scenarios.split(",") if args.scenarios else None
    runs_per = max(1, min(args.runs, 20))
    rows = run_all(base / "lab", runs_per, args.budget, only)
    cmd = shlex.join(["python", "-m", "bench.migrate", *(sys.argv[1:] if argv is None else argv)])
    report(rows, cmd, args.budget, runs_per, args.out)


if __name__ == "__main__":
    main()
