"""Quick-migration benchmark: the guest outage of ``ferry move --quick`` for a 1 GiB VM.

A 2-host lab (migration link shaped to 1 Gbit/s, as in :mod:`bench.migrate`) with the lab's
shared volume. Each run boots a fresh 1 GiB probe guest on h1 with its files on the shared
volume, starts a 1 ms UDP blackout probe from the client namespace, moves the guest to h2 and
collects the job's figures: the outage vmferry reports (``downtime_ms``, pause → running on h2),
the outage the guest's network peers saw (the longest gap in the echo replies) and the size of
the saved state. The same guest is also moved live as a reference (what the quick move costs
compared with a live one). Reports go to ``bench/results/quick.{md,json}``.

Run as root: ``.venv/bin/python -m bench.run --only quick [--runs N]``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.migrate import (
    LINK_RATE,
    _git_state,
    _Guests,
    _median,
    _remove_everywhere,
    _wait_job,
    phase_seconds,
)
from vmferry.client import FerryError
from vmferry.lab import Lab
from vmferry.lab.lab import BackgroundProbe, start_probe, wait_answer
from vmferry.lab.probe import outages

RESULTS = Path(__file__).parent / "results"

MEMORY_MIB = 1024
BUDGET_S = 120.0
BOOT_TIMEOUT_S = 120.0
WARMUP_S = 3.0
AFTER_S = 1.0
OUTAGE_GAP_MS = 100.0  # echo gaps longer than this count as an outage ...
JOIN_MS = 250.0  # ... and gaps this close together as one (the guest answered once in between)
SRC, DST = "h1", "h2"


@dataclass(frozen=True)
class Scenario:
    """One guest set-up to move."""

    key: str
    what: str
    dirty: str | None = None  # the dirtier's working set and rate (SIZE@RATE), to fill memory


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("idle", "idle 1 GiB guest (little memory in use)"),
    Scenario("mem512", "1 GiB guest with 512 MB of memory in use (dirtier at 64 MB/s)",
             "512M@64M"),
)  # fmt: skip

#: Move options per variant.
VARIANTS: dict[str, dict[str, Any]] = {
    "quick": {"quick": True},
    "live": {},  # reference: the same guest moved live with vmferry's defaults
}


def _create_guest(lab: Lab, sc: Scenario, name: str, ip: str) -> None:
    roles = ["heartbeat", "udpecho", "tcpecho"] + (["dirty"] if sc.dirty else [])
    probe_spec: dict[str, Any] = {"ip": f"{ip}/24", "roles": roles}
    if sc.dirty:
        probe_spec["dirty"] = sc.dirty
    spec = {
        "name": name, "memory_mib": MEMORY_MIB, "disks": [{"size_mib": 64}],
        "nics": [{"switch": "external"}], "probe": probe_spec,
        "storage_dir": str(lab.shared_dir / name),
    }  # fmt: skip
    with lab.client(SRC) as c:
        c.create_vm(spec)
        c.action(name, "start")


def _warm_up(lab: Lab, sc: Scenario, ip: str) -> dict[str, Any]:
    """Let the guest settle; with a dirtier, until it has written its whole working set."""
    deadline = time.monotonic() + 120
    stat = wait_answer(lab, ip, 10)
    while sc.dirty and stat.get("dirty_rounds", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.5)
        stat = wait_answer(lab, ip, 10)
    time.sleep(WARMUP_S)
    return wait_answer(lab, ip, 10)


def run_one(lab: Lab, sc: Scenario, variant: str, repeat: int, guests: _Guests) -> dict[str, Any]:
    """Boot a fresh guest on the shared volume, move it h1 -> h2 under a blackout probe."""
    name = f"q-{sc.key}-{variant}-{repeat}"
    ip = guests.next(lab)
    options = VARIANTS[variant]
    run: dict[str, Any] = {"scenario": sc.key, "variant": variant, "repeat": repeat, "vm": name,
                           "ip": ip, "options": options, "finished": False, "state": None,
                           "bench_error": None}  # fmt: skip
    bo: BackgroundProbe | None = None
    try:
        _create_guest(lab, sc, name, ip)
        wait_answer(lab, ip, BOOT_TIMEOUT_S)
        before = _warm_up(lab, sc, ip)
        run["stat_before"] = before
        bo = start_probe(lab, "blackout", ip, duration=BUDGET_S + 60, interval_ms=1)
        ep = lab.endpoint(DST)
        with lab.client(SRC) as c:
            t0 = time.monotonic()
            job = c.move(name, {"destination": {"name": DST, "url": ep.url}, "options": options})
            done = _wait_job(c, job["id"], t0 + BUDGET_S, lambda _j: None)
            run["wait_s"] = round(time.monotonic() - t0, 2)
            final = done if done is not None else c.migration(job["id"])
        # Wait for the guest's answer (a timed-out move leaves it where it is).
        with contextlib.suppress(FerryError):
            run["stat_after"] = wait_answer(lab, ip, 30)
        time.sleep(AFTER_S)
        run["blackout"] = bo.stop()
        bo = None
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
    _derive(run)
    return run


def _derive(run: dict[str, Any]) -> None:
    job: dict[str, Any] = run.get("job") or {}
    bo: dict[str, Any] = run.get("blackout") or {}
    before, after = run.get("stat_before") or {}, run.get("stat_after") or {}
    run["downtime_ms"] = job.get("downtime_ms")
    run["qemu_downtime_ms"] = job.get("qemu_downtime_ms")
    run["total_s"] = job.get("total_s")
    run["phase_s"] = phase_seconds(job)
    run["state_bytes"] = job.get("bytes_sent") if run["variant"] == "quick" else None
    run["blackout_ms"] = bo.get("longest_gap_ms")
    run["outage_list"] = outages(bo.get("gaps") or [], OUTAGE_GAP_MS, JOIN_MS)
    run["outages"] = len(run["outage_list"])
    run["no_reboot"] = (
        bool(before) and bool(after) and int(after.get("hb", 0)) > int(before.get("hb", 0))
    )
    run["error"] = (job.get("error") or {}).get("message") or run.get("bench_error")


FIGURES = ("downtime_ms", "blackout_ms", "qemu_downtime_ms", "total_s", "state_bytes")


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
            s["blackout_max_ms"] = max((r["blackout_ms"] for r in ok if r["blackout_ms"]),
                                       default=None)  # fmt: skip
            s["runs"], s["finished"] = len(mine), len(ok)
            s["one_outage"] = sum(1 for r in ok if r["outages"] == 1)
            s["no_reboot"] = sum(1 for r in ok if r["no_reboot"])
            phases = sorted({p for r in ok for p in r["phase_s"]})
            s["phase_s"] = {p: _median(r["phase_s"].get(p) for r in ok) for p in phases}
            s["errors"] = sorted({r["error"] for r in mine if r.get("error")})
            out.setdefault(sc.key, {})[variant] = s
    return out


def _fmt(v: float | None, spec: str = ".0f", unit: str = "") -> str:
    return "—" if v is None else f"{v:{spec}}{unit}"


def write_markdown(doc: dict[str, Any], path: Path) -> None:
    """The human report."""
    summary: dict[str, dict[str, dict[str, Any]]] = doc["summary"]
    lines = [
        "# quick",
        "",
        f"Command: `{doc['command']}` — {doc['date']}, {doc['machine']['cpus']} CPUs, TCG, "
        f"commit {doc['engine']['commit'][:10]}"
        f"{' (+ uncommitted src changes)' if doc['engine']['src_changes'] else ''}.",
        "",
        f"Lab: 2 hosts, the lab's shared volume (a directory on this machine's disk), migration "
        f"link {LINK_RATE}. Guest: {MEMORY_MIB} MiB, 1 vCPU probe guest with every file on the "
        f"shared volume. {doc['runs_per_variant']} run(s) per scenario and variant, medians "
        "over the finished runs.",
        "",
        "| scenario | variant | finished | outage reported (downtime_ms) | guest blackout ms "
        "(median / max) | runs with one outage | heartbeat went on | state file | total s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for sc in SCENARIOS:
        for variant in VARIANTS:
            s = summary.get(sc.key, {}).get(variant)
            if s is None:
                continue
            reported = (_fmt(s["downtime_ms"]) if variant == "quick"
                        else f"QEMU {_fmt(s['qemu_downtime_ms'])}")  # fmt: skip
            size = "—" if s["state_bytes"] is None else f"{s['state_bytes'] / 2**20:,.0f} MiB"
            lines.append(
                f"| {sc.key} | {variant} | {s['finished']}/{s['runs']} | {reported} "
                f"| {_fmt(s['blackout_ms'])} / {_fmt(s['blackout_max_ms'])} "
                f"| {s['one_outage']}/{s['finished']} | {s['no_reboot']}/{s['finished']} "
                f"| {size} | {_fmt(s['total_s'], '.2f')} |"
            )
    lines += ["", "## Phases (medians, seconds)", "",
              "| scenario | variant | checks | switchover | resume | cleanup | precopy |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for sc in SCENARIOS:
        for variant in VARIANTS:
            s = summary.get(sc.key, {}).get(variant)
            if s is None:
                continue
            ph = s["phase_s"]
            cells = " | ".join(
                _fmt(ph.get(p), ".2f")
                for p in ("checks", "switchover", "resume", "cleanup", "precopy")
            )
            lines.append(f"| {sc.key} | {variant} | {cells} |")
    errors = [f"- {k}/{v}: {'; '.join(s['errors'])}" for k, by in summary.items()
              for v, s in by.items() if s["errors"]]  # fmt: skip
    if errors:
        lines += ["", "Errors:", "", *errors]
    lines += [
        "",
        "## Definitions",
        "",
        "- **outage reported**: the job's `downtime_ms`, from just before vmferry pauses the "
        "guest on h1 (the save begins) to h2's answer that the restored guest runs. For the live "
        "reference, QEMU's own `downtime` (source view).",
        "- **guest blackout**: the longest gap between consecutive replies of a 1 ms UDP echo "
        "stream from the lab's client namespace, from before the move until "
        f"{AFTER_S:.0f} s after the guest answered on h2. It also contains the switch learning "
        "the guest's new port (vmferry sends `announce-self` after the restore). **runs with "
        f"one outage**: runs whose echo stream had one outage: gaps over {OUTAGE_GAP_MS:.0f} ms, "
        f"those less than {JOIN_MS:.0f} ms apart counted as one.",
        "- **heartbeat went on**: the guest's heartbeat counter after the move is higher than "
        "before it (the guest resumed; a reboot would restart it at 1).",
        "- **state file**: the size of `saved.vmstate` (memory in use + device state; zero "
        "pages are not written). The quick move's outage grows with it: the state is written "
        "to the shared volume and read back while the guest is paused.",
        "- Before measuring, each agent starts and stops a small VM once: an agent's first "
        "launch of the lab guest resolves its image (an `apt-cache` query, seconds on a loaded "
        "machine), which would otherwise land inside the first quick move's outage.",
        "- The shared volume here is a local directory (page cache), so writing and reading the "
        "state runs at memory speed; on NFS or CephFS the outage grows by the state size ÷ "
        "the volume's throughput, twice.",
    ]
    path.write_text("\n".join(lines) + "\n")


def report(runs: list[dict[str, Any]], command: str, runs_per: int,
           out: Path = RESULTS) -> dict[str, Any]:  # fmt: skip
    """Write quick.json and quick.md; return the JSON document."""
    doc: dict[str, Any] = {
        "benchmark": "quick",
        "command": command,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "accelerator": "tcg",
        "engine": _git_state(),
        "link_rate": LINK_RATE,
        "memory_mib": MEMORY_MIB,
        "runs_per_variant": runs_per,
        "scenarios": [asdict(sc) for sc in SCENARIOS],
        "variants": VARIANTS,
        "summary": summarize(runs),
        "runs": runs,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "quick.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    write_markdown(doc, out / "quick.md")
    print(f"wrote {out / 'quick'}.md and .json")
    return doc


def warm_agents(lab: Lab) -> None:
    """Start and stop a small VM on each host once, before measuring.

    An agent's first QEMU launch resolves the lab guest image (an ``apt-cache`` query, seconds
    on a loaded machine); without this the first quick move to a host pays it inside the outage.
    Real hosts boot their own kernels or disks and have no such step.
    """
    for host in (SRC, DST):
        with lab.client(host) as c:
            c.create_vm({"name": f"warm-{host}", "memory_mib": 64})
            c.action(f"warm-{host}", "start")
            c.action(f"warm-{host}", "stop")
            c.delete_vm(f"warm-{host}")


def run_all(
    lab_dir: Path, runs_per: int, only: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Bring up a 2-host lab, run every scenario and variant, tear the lab down."""
    lab = Lab(lab_dir)
    rows: list[dict[str, Any]] = []
    guests = _Guests()
    try:
        lab.up(2, link_rate=LINK_RATE)
        warm_agents(lab)
        for sc in SCENARIOS:
            if only and sc.key not in only:
                continue
            for repeat in range(runs_per):
                for variant in VARIANTS:
                    t0 = time.monotonic()
                    row = run_one(lab, sc, variant, repeat, guests)
                    rows.append(row)
                    print(
                        f"{sc.key}/{variant} #{repeat + 1}: {row['state']} "
                        f"downtime={row['downtime_ms']} qemu={row['qemu_downtime_ms']} "
                        f"blackout={row['blackout_ms']} outages={row['outages']} "
                        f"state={row['state_bytes']} total={row['total_s']} "
                        f"no_reboot={row['no_reboot']} err={row['error']} "
                        f"({time.monotonic() - t0:.0f} s)",
                        flush=True,
                    )
    finally:
        lab.down()
    return rows


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.quick``: this benchmark alone (see bench.run)."""
    import argparse
    import sys
    import tempfile

    ap = argparse.ArgumentParser(prog="bench.quick")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--scenarios", help="comma-separated subset of: "
                    + ",".join(sc.key for sc in SCENARIOS))  # fmt: skip
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="vmferry-bench-"))
    os.environ["FERRY_CONFIG"] = str(base / "client.json")
    runs_per = max(1, min(args.runs, 20))
    only = args.scenarios.split(",") if args.scenarios else None
    rows = run_all(base / "lab", runs_per, only)
    cmd = shlex.join(["python", "-m", "bench.quick", *(sys.argv[1:] if argv is None else argv)])
    report(rows, cmd, runs_per, args.out)


if __name__ == "__main__":
    main()
