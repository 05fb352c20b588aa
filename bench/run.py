"""``make bench``: benchmarks in a real lab: guest boot and save/restore, live migration,
storage moves, quick migration, the cost of TLS (``--only tls``); cluster placement
(``--only cluster-place``, no lab).

Reports go to bench/results/<name>.md and .json (migrate also .png) with the command that
produced them. Run as root:
``.venv/bin/python -m bench.run [--only boot|migrate|storage|quick] [--runs N]`` (``--runs``
defaults to 5 for boot, 3 for quick and 1 for migrate and storage; see :mod:`bench.migrate`,
:mod:`bench.storage`, :mod:`bench.quick`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from vmferry.lab import Lab
from vmferry.lab.lab import wait_answer

RESULTS = Path(__file__).parent / "results"


def boot_and_save(lab: Lab, runs: int) -> list[dict[str, float]]:
    """Per run: API start time, time to the guest's first answer, save and restore times."""
    topo = lab.topology()
    rows = []
    with lab.client("h1") as c:
        for i in range(runs):
            ip = topo.guest_ip(i + 1)
            name = f"bench{i}"
            c.create_vm(
                {"name": name, "memory_mib": 256, "nics": [{"switch": "external"}],
                 "probe": {"ip": f"{ip}/24"}}
            )  # fmt: skip
            t0 = time.monotonic()
            c.action(name, "start")
            t_api = time.monotonic() - t0
            wait_answer(lab, ip, 60)
            t_boot = time.monotonic() - t0
            t1 = time.monotonic()
            c.action(name, "save")
            t_save = time.monotonic() - t1
            t2 = time.monotonic()
            c.action(name, "restore")
            wait_answer(lab, ip, 30)
            t_restore = time.monotonic() - t2
            c.action(name, "stop")
            c.delete_vm(name)
            rows.append(
                {"start_api_s": t_api, "boot_to_answer_s": t_boot,
                 "save_s": t_save, "restore_to_answer_s": t_restore}
            )  # fmt: skip
            print(f"run {i + 1}/{runs}: " + ", ".join(f"{k}={v:.2f}" for k, v in rows[-1].items()))
    return rows


def _report(name: str, rows: list[dict[str, float]], command: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0])
    summary = {
        k: {"median": statistics.median(r[k] for r in rows), "max": max(r[k] for r in rows)}
        for k in keys
    }
    doc = {
        "benchmark": name,
        "command": command,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "accelerator": "tcg",
        "guest": "256 MiB, 1 vCPU, probe guest (Debian cloud kernel + busybox)",
        "runs": rows,
        "summary": summary,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        f"# {name}",
        "",
        f"Command: `{command}` — {doc['date']}, {os.cpu_count()} CPUs, TCG, {doc['guest']}.",
        "",
        "| measure | median (s) | max (s) |",
        "|---|---|---|",
        *(f"| {k} | {v['median']:.2f} | {v['max']:.2f} |" for k, v in summary.items()),
        "",
        "`boot_to_answer_s`: from the start request to the guest's first UDP STAT reply seen from",
        "the lab's client namespace. `restore_to_answer_s`: from the restore request to the same.",
    ]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / name}.md and .json")


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    """A scratch directory for one benchmark's lab and client config, removed when the
    benchmark ends normally (a failed one keeps its lab records for ``ferry lab down``)."""
    base = Path(tempfile.mkdtemp(prefix="vmferry-bench-"))
    os.environ["FERRY_CONFIG"] = str(base / "client.json")
    yield base
    shutil.rmtree(base, ignore_errors=True)


def run_boot(runs: int, command: str) -> None:
    """The boot and save/restore benchmark on a 1-host lab."""
    with _workdir() as base:
        lab = Lab(base / "lab")
        try:
            lab.up(1)
            rows = boot_and_save(lab, max(1, min(runs, 50)))
        finally:
            lab.down()
        _report("boot", rows, command)


def run_migrate(runs: int, budget: float, scenarios: list[str] | None, command: str) -> None:
    """The live-migration benchmark on a 2-host 1 Gbit/s lab."""
    from bench import migrate

    with _workdir() as base:
        runs = max(1, min(runs, 20))
        rows = migrate.run_all(base / "lab", runs, budget, scenarios)
        migrate.report(rows, command, budget, runs)


def run_storage(runs: int, command: str) -> None:
    """The storage-move benchmark on a 1-host lab."""
    from bench import storage

    with _workdir() as base:
        rows = storage.run_all(base / "lab", max(1, min(runs, 20)))
        storage.report(rows, command)


def run_quick(runs: int, command: str) -> None:
    """The quick-migration benchmark on a 2-host lab with a shared volume."""
    from bench import quick

    with _workdir() as base:
        runs = max(1, min(runs, 20))
        quick.report(quick.run_all(base / "lab", runs), command, runs)


def run_tls(runs: int, command: str) -> None:
    """The cost of encryption: moves with and without TLS on a 2-host lab (bench.tls)."""
    from bench import tls

    with _workdir() as base:
        runs = max(1, min(runs, 10))
        tls.report(tls.run_all(base / "lab", runs), command, runs)


def run_cluster_place(runs: int, command: str) -> None:
    """Placement decisions for a 64-node, 4,000-VM cluster (pure; no lab)."""
    from bench import cluster_place

    cluster_place.report(cluster_place.run(max(1, min(runs, 50))), command)


def run_failover(runs: int, ttls: str | None, command: str) -> None:
    """Failover of a killed node's clustered VMs on a 3-host lab (see :mod:`bench.failover`)."""
    from bench import failover

    with _workdir() as base:
        rows = failover.run_all(base / "lab", max(1, min(runs, 10)), failover.parse_ttls(ttls))
        failover.report(rows, command, failover.DEFAULT_VMS)


def run_drain(
    runs: int, concurrency: int | None, link: str, command: str, session_ms: float | None = None
) -> None:
    """Drain of a node running 6 clustered VMs on a 3-host lab (see :mod:`bench.drain`).

    ``link``: the migration links' rate, or ``none`` (not shaped); a report for other settings
    than the defaults is named after them (``drain_concurrency1``, ``drain_link-none``,
    ``drain_session-1000``). ``session_ms``: how often each held TCP session echoes a line
    (None: every 20 ms; under TCG six sessions at 20 ms cost the guests about 0.7 CPU).
    """
    from bench import drain
    from bench.migrate import LINK_RATE

    rate = None if link == "none" else link
    name = "drain" + (f"_concurrency{concurrency}" if concurrency else "")
    name += "" if link == LINK_RATE else f"_link-{link}"
    name += f"_session-{session_ms:g}" if session_ms else ""
    with _workdir() as base:
        rows = drain.run_all(base / "lab", max(1, min(runs, 10)), concurrency, rate,
                             session_ms or drain.SESSION_MS)  # fmt: skip
        drain.report(rows, command, name, rate)


def run_cluster_scale(command: str) -> None:
    """64 nodes, 4,000 VMs on a real etcd with a SIMULATED hypervisor driver (no QEMU)."""
    from bench import cluster_scale

    cluster_scale.report(cluster_scale.run(), command)


def main(argv: list[str] | None = None) -> None:
    """Run every benchmark (or only one with ``--only``)."""
    from bench.migrate import BUDGET_S, LINK_RATE, SCENARIOS

    ap = argparse.ArgumentParser(prog="bench.run")
    ap.add_argument("--only", choices=("boot", "migrate", "storage", "quick", "cluster-place",
                                       "failover", "drain", "cluster-scale", "tls"),
                    help="run only this benchmark")  # fmt: skip
    ap.add_argument("--runs", type=int,
                    help="repeats (default: 5 for boot, 3 for quick, else 1)")  # fmt: skip
    ap.add_argument("--drain-concurrency", type=int,
                    help="drain: cluster.drain_concurrency on every host (default: 2)")  # fmt: skip
    ap.add_argument("--drain-link", default=LINK_RATE,
                    help="drain: migration link rate, or none (not shaped)")  # fmt: skip
    ap.add_argument("--drain-session-ms", type=float,
                    help="drain: ms between the TCP sessions' lines (default 20)")  # fmt: skip
    ap.add_argument("--lease-ttl", help="failover: comma-separated lease TTLs (s), e.g. 6,4")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="migrate: seconds per move")
    ap.add_argument("--scenarios", help="migrate: comma-separated subset of "
                    + ",".join(sc.key for sc in SCENARIOS))  # fmt: skip
    args = ap.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "bench.run", *given])
    if args.only in (None, "boot"):
        runs = args.runs or 5
        run_boot(runs, f"make bench  (python -m bench.run --runs {runs})"
                 if not given else command)  # fmt: skip
    if args.only in (None, "migrate"):
        scenarios = args.scenarios.split(",") if args.scenarios else None
        run_migrate(args.runs or 1, args.budget, scenarios, command)
    if args.only in (None, "storage"):
        run_storage(args.runs or 1, command)
    if args.only in (None, "quick"):
        run_quick(args.runs or 3, command)
    if args.only in (None, "tls"):
        run_tls(args.runs or 3, command)
    if args.only in (None, "cluster-place"):
        run_cluster_place(args.runs or 5, command)
    if args.only in (None, "failover"):
        run_failover(args.runs or 3, args.lease_ttl, command)
    if args.only in (None, "drain"):
        run_drain(args.runs or 1, args.drain_concurrency, args.drain_link, command,
                  args.drain_session_ms)  # fmt: skip
    if args.only in (None, "cluster-scale"):
        run_cluster_scale(command)


if __name__ == "__main__":
    main()
