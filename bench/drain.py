"""Drain benchmark: ``ferry cluster drain`` of a node running 6 clustered VMs.

A 3-host lab (migration links shaped to 1 Gbit/s, as in :mod:`bench.migrate`), one cluster of
h1..h3 with the lab's shared volume, six 256 MiB probe guests on h1 (clustered, files on the
shared volume). First each VM is moved alone (``cluster move --to`` h2 or h3, then back): the
single-move times. Then h1 is drained (a TCP session is held to every guest from the first
single move on): the total from the request to the drain record's end. Target (issue 5):
drain total <= 1.3 x (sum of single moves / drain concurrency). Finally ``resume --failback``
brings them home (timed too).

Times are wall-clock, from the API request to the moment etcd shows the new owner — what an
admin waits for. Beside the target the report gives the floor this machine puts under any
drain (:func:`resource_floor`): the CPU work and the link bytes of the single moves, which the
drain has to do too, over what the machine has. Reports go to ``bench/results/drain.{md,json}``.
Run as root: ``.venv/bin/python -m bench.run --only drain [--runs N]``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from bench.migrate import LINK_RATE, _git_state
from vmferry.client import FerryClient, FerryError
from vmferry.cluster.store import ClusterVMStore
from vmferry.lab import Lab
from vmferry.lab.lab import BackgroundProbe, start_probe, wait_answer
from vmferry.lab.net import parse_rate

RESULTS = Path(__file__).parent / "results"
VMS = 6
MEMORY_MIB = 256
CLUSTER = "bench"
HOSTS = ("h1", "h2", "h3")
MOVE_TIMEOUT_S = 180.0
TARGET = 1.3
#: Milliseconds between a held TCP session's lines (the session probe's own default).
SESSION_MS = 20.0
#: Seconds over which the machine's background load (idle guests, agents, etcd) is measured.
BACKGROUND_S = 5.0


def cpu_busy_s() -> float:
    """CPU-seconds the whole machine has spent busy since boot (``/proc/stat``, all CPUs)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle, iowait = fields[3], fields[4]
    return (sum(fields[:8]) - idle - iowait) / os.sysconf("SC_CLK_TCK")


def resource_floor(
    singles: list[dict[str, Any]],
    background_cpus: float,
    cpus: int,
    drain_bytes: int,
    link_bps: int | None,
) -> dict[str, float | None]:
    """The least time any drain of these VMs can take on this machine.

    CPU: each single move's CPU work (machine-wide CPU-seconds during the move less the
    background's share) has to be done again in the drain, on the CPUs the background leaves.
    Link: every move of the drain leaves the drained node through its one migration link, so
    the drain's bytes take at least bytes / rate. Both are lower bounds (perfect overlap, no
    per-move latency); the larger one is the floor.
    """
    work = sum(max(0.0, s["cpu_s"] - background_cpus * s["wall_s"]) for s in singles)
    spare = cpus - background_cpus
    cpu_floor = work / spare if spare > 0 else None
    link_floor = drain_bytes * 8 / link_bps if link_bps else None
    floors = [f for f in (cpu_floor, link_floor) if f is not None]
    return {
        "cpu_work_s": round(work, 3), "background_cpus": round(background_cpus, 3),
        "cpu_floor_s": None if cpu_floor is None else round(cpu_floor, 3),
        "link_floor_s": None if link_floor is None else round(link_floor, 3),
        "floor_s": round(max(floors), 3) if floors else None,
    }  # fmt: skip


def _owner(store: ClusterVMStore, vm: str) -> tuple[str, str | None]:
    got = store.vm_record(CLUSTER, vm)
    assert got is not None
    return got[0].node, got[0].moving_to


def _wait(cond: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")


def _setup(lab: Lab) -> tuple[list[str], dict[str, str]]:
    urls = {h: lab.endpoint(h).url for h in HOSTS}
    with lab.client("h1") as c:
        c.cluster_create(CLUSTER, urls)
        _wait(lambda: all(n["lease"] == "alive" for n in c.cluster_status(CLUSTER)["nodes"])
              and c.cluster_status(CLUSTER)["leader"], 30, "cluster up")  # fmt: skip
        c.cluster_volume_add(str(lab.shared_dir))
    names, ips = [], {}
    topo = lab.topology()
    with lab.client("h1") as c:
        for i in range(VMS):
            name, ip = f"dr{i}", topo.guest_ip(i + 1)
            c.create_vm({
                "name": name, "memory_mib": MEMORY_MIB, "disks": [{"size_mib": 16}],
                "nics": [{"switch": "external"}], "storage_dir": str(lab.shared_dir / name),
                "probe": {"ip": f"{ip}/24", "roles": ["heartbeat", "udpecho", "tcpecho"]},
            })  # fmt: skip
            c.action(name, "start")
            names.append(name)
            ips[name] = ip
        for name in names:
            wait_answer(lab, ips[name], 120)
            c.cluster_vm_add(name)
    return names, ips


def _move(c: FerryClient, store: ClusterVMStore, vm: str, to: str) -> dict[str, Any]:
    cpu0, t0 = cpu_busy_s(), time.monotonic()
    res = c.cluster_vm_move(vm, to, False, False, CLUSTER)
    _wait(lambda: _owner(store, vm) == (to, None), MOVE_TIMEOUT_S, f"{vm} owned by {to}")
    wall, cpu = time.monotonic() - t0, cpu_busy_s() - cpu0
    with lab_client_for(res["from"]) as src:
        job = src.migration(res["job"]["id"])
    if job["state"] != "completed":
        raise RuntimeError(f"move of {vm} to {to}: {job['state']}: {job.get('error')}")
    return {"vm": vm, "to": to, "wall_s": round(wall, 3), "job_total_s": job.get("total_s"),
            "cpu_s": round(cpu, 3), "bytes": int(job.get("bytes_sent") or 0)}  # fmt: skip


_LAB: Lab | None = None


def lab_client_for(host: str) -> FerryClient:
    assert _LAB is not None
    return _LAB.client(host)


def _drain_until_done(c: FerryClient, node: str, kind: str) -> tuple[float, dict[str, Any]]:
    t0 = time.monotonic()
    if kind == "drain":
        c.cluster_drain(CLUSTER, node)
    else:
        c.cluster_resume(CLUSTER, node, True)

    def done() -> dict[str, Any] | None:
        st = c.cluster_status(CLUSTER)
        d = next(n for n in st["nodes"] if n["name"] == node).get("drain") or {}
        return d if d.get("status") not in (None, "running") else None

    rec = _wait(done, MOVE_TIMEOUT_S * VMS, f"{kind} of {node}", interval=0.1)
    return time.monotonic() - t0, rec


def _timeline(lab: Lab, host: str, since: float) -> list[dict[str, Any]]:
    """The drain's moves as the source ran them: start and end (s after the request), phases."""
    rows = []
    with lab.client(host) as c:
        for j in c.migrations():
            if j["created_at"] < since:
                continue
            job = c.migration(j["id"])
            phases = {p["phase"]: round((p["ended_at"] or p["started_at"]) - p["started_at"], 2)
                      for p in job["phases"]}  # fmt: skip
            rows.append({
                "vm": job["vm"], "to": job["destination"], "state": job["state"],
                "start_s": round(job["created_at"] - since, 2),
                "end_s": round((job["finished_at"] or since) - since, 2), "phases": phases,
                "bytes": int(job.get("bytes_sent") or 0),
            })  # fmt: skip
    return sorted(rows, key=lambda r: r["start_s"])


def run_once(
    lab: Lab,
    names: list[str],
    ips: dict[str, str],
    link: str | None = LINK_RATE,
    session_ms: float = SESSION_MS,
) -> dict[str, Any]:
    """Single moves (there and back), then a drain with sessions held, then a failback."""
    etcd = lab.etcd_client()
    store = ClusterVMStore(etcd)
    try:
        # the TCP sessions are held through the single moves too: same load in both measures
        sessions: dict[str, BackgroundProbe] = {
            vm: start_probe(lab, "session", ips[vm], duration=300, interval_ms=session_ms)
            for vm in names
        }
        singles = []
        with lab.client("h2") as c:
            for to in ("h2", "h3", "h1"):  # warm-up: each agent's first QEMU launch is slower
                _move(c, store, names[0], to)
            cpu0 = cpu_busy_s()
            time.sleep(BACKGROUND_S)
            background = (cpu_busy_s() - cpu0) / BACKGROUND_S
            for i, vm in enumerate(names):
                singles.append(_move(c, store, vm, "h2" if i % 2 == 0 else "h3"))
                _move(c, store, vm, "h1")
        with lab.client("h2") as c:
            t_drain, cpu0 = time.time(), cpu_busy_s()
            drain_s, drain = _drain_until_done(c, "h1", "drain")
            drain_cpu = cpu_busy_s() - cpu0
            where = {vm: _owner(store, vm)[0] for vm in names}
            timeline = _timeline(lab, "h1", t_drain)
            back_s, back = _drain_until_done(c, "h1", "failback")
        away = {vm: node for vm in names if (node := _owner(store, vm)[0]) != "h1"}
        held = {vm: s.stop() for vm, s in sessions.items()}
    finally:
        etcd.close()
    with lab.client("h1") as c:
        concurrency = int(c.settings()["cluster"]["drain_concurrency"])
    total_single = sum(s["wall_s"] for s in singles)
    bound = total_single / concurrency
    cpus = os.cpu_count() or 1
    floor = resource_floor(singles, background, cpus, sum(t["bytes"] for t in timeline),
                           parse_rate(link) if link else None)  # fmt: skip
    return {
        "singles": singles, "sum_single_s": round(total_single, 3), "concurrency": concurrency,
        "drain_s": round(drain_s, 3), "drain": drain, "placed": where,
        "failback_s": round(back_s, 3), "failback": back, "not_home_after_failback": away,
        "ratio": round(drain_s / bound, 3), "target": TARGET,
        "sessions_kept": sum(1 for r in held.values() if r.get("ok") and not r.get("reset")),
        "sessions": len(held), "timeline": timeline, "floor": floor,
        "session_ms": session_ms,
        "best_ratio": round(floor["floor_s"] / bound, 3) if floor["floor_s"] else None,
        "drain_cpu_s": round(drain_cpu, 3),
        "drain_cpu_use": round(drain_cpu / (drain_s * cpus), 3),
    }  # fmt: skip


def _set_concurrency(lab: Lab, n: int | None) -> None:
    """Set ``cluster.drain_concurrency`` on every host (None: leave the default)."""
    if n is None:
        return
    for h in HOSTS:
        with lab.client(h) as c:
            cur = c.settings()["cluster"]
            c.update_settings(cluster={**cur, "drain_concurrency": n})


def run_all(
    lab_dir: Path,
    runs: int,
    concurrency: int | None = None,
    link: str | None = LINK_RATE,
    session_ms: float = SESSION_MS,
) -> list[dict[str, Any]]:
    """Bring up a 3-host lab (migration links shaped to ``link``; None: not shaped), run
    ``runs`` rounds (TCP session lines every ``session_ms``), tear the lab down."""
    global _LAB
    lab = Lab(lab_dir)
    _LAB = lab
    rows = []
    try:
        lab.up(len(HOSTS), link_rate=link)
        _set_concurrency(lab, concurrency)
        names, ips = _setup(lab)
        for i in range(runs):
            row = run_once(lab, names, ips, link, session_ms)
            rows.append(row)
            if row["not_home_after_failback"]:  # the next run's single moves need them home
                print(f"run {i + 1}: not back on h1 after the failback: "
                      f"{row['not_home_after_failback']}; drain record {row['drain']}; "
                      f"failback record {row['failback']}", flush=True)  # fmt: skip
                break
            print(f"run {i + 1}/{runs}: drain {row['drain_s']:.1f} s, sum of singles "
                  f"{row['sum_single_s']:.1f} s / {row['concurrency']} -> ratio {row['ratio']} "
                  f"(target <= {TARGET}); failback {row['failback_s']:.1f} s; sessions kept "
                  f"{row['sessions_kept']}/{row['sessions']}", flush=True)  # fmt: skip
        with lab.client("h1") as c:
            for vm in names:
                with contextlib.suppress(FerryError):
                    c.cluster_vm_remove(vm, CLUSTER)
    finally:
        lab.down()
        _LAB = None
    return rows


def report(
    rows: list[dict[str, Any]], command: str, name: str = "drain", link: str | None = LINK_RATE
) -> dict[str, Any]:
    """Write bench/results/<name>.{md,json}."""
    ratios = [r["ratio"] for r in rows]
    git = _git_state()
    doc: dict[str, Any] = {
        "command": command, "at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "git": git, "vms": VMS, "memory_mib": MEMORY_MIB, "link": link or "not shaped",
        "runs": rows, "median_ratio": statistics.median(ratios) if ratios else None,
    }  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    lines = [
        "# Drain benchmark", "",
        f"`{command}` — {doc['at']}, {os.cpu_count()} CPUs (TCG), commit "
        f"{git['commit'][:10]}.", "",
        f"A 3-host lab (migration links {link or 'not shaped (veth)'}), {VMS} clustered "
        f"{MEMORY_MIB} MiB probe guests on h1 (files on the shared volume). Single moves: "
        "each VM alone to h2 or h3 (`cluster move`), request to new owner in etcd. Drain: "
        "`cluster drain h1` with a TCP session held to every guest (through the single moves "
        f"too; a line every {rows[0]['session_ms'] if rows else SESSION_MS:g} ms), request "
        "to the drain "
        f"record's end. Target: drain <= {TARGET} x (sum of single moves / drain "
        "concurrency).", "",
        "| run | sum of singles (s) | concurrency | drain (s) | ratio | target | floor (s): "
        "CPU / link | best ratio here | CPU busy in drain | failback (s) | sessions kept "
        "| drain result |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip

    def num(v: float | None, fmt: str = ".1f") -> str:
        return "—" if v is None else format(v, fmt)

    for i, r in enumerate(rows):
        d, f = r["drain"], r.get("floor") or {}
        lines.append(
            f"| {i + 1} | {r['sum_single_s']:.1f} | {r['concurrency']} | {r['drain_s']:.1f} | "
            f"{r['ratio']:.2f} | <= {TARGET} | {num(f.get('cpu_floor_s'))} / "
            f"{num(f.get('link_floor_s'))} | {num(r.get('best_ratio'), '.2f')} | "
            f"{num(100 * r['drain_cpu_use'] if 'drain_cpu_use' in r else None, '.0f')} % | "
            f"{r['failback_s']:.1f} | {r['sessions_kept']}/{r['sessions']} | "
            f"{d.get('status')}, {len(d.get('moved', {}))} moved |"
        )
    lines += ["", "**Floor**: the least time any drain of these VMs can take here. CPU: the "
              "single moves' CPU work (machine-wide CPU-seconds during each move, less the "
              "background of idle guests, agents and etcd measured over "
              f"{BACKGROUND_S:.0f} s before them) spread over the CPUs the background leaves; "
              "link: the drain's bytes through the drained node's one migration link. "
              "**Best ratio here** = floor / (sum of singles / concurrency): when it is above "
              "the target, no scheduling can meet the target on this machine. **CPU busy in "
              "drain**: machine-wide CPU use during the drain."]  # fmt: skip
    for i, r in enumerate(rows):
        if r.get("not_home_after_failback"):
            fb = r["failback"]
            lines += ["", f"Run {i + 1}: not back on h1 after the failback: "
                      f"{r['not_home_after_failback']} (failback {fb.get('status')}, moved "
                      f"{sorted(fb.get('moved', {}))}, failed {fb.get('failed', {})}; drain moved "
                      f"{sorted(r['drain'].get('moved', {}))}, failed "
                      f"{r['drain'].get('failed', {})})."]  # fmt: skip
    if rows:
        lines += ["", "Single moves of the first run:", "",
                  "| VM | to | wall (s) | job total (s) | CPU-s (machine) | MB sent |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {s['vm']} | {s['to']} | {s['wall_s']:.2f} | {s['job_total_s']} | "
                  f"{num(s.get('cpu_s'), '.2f')} | {num(s.get('bytes', 0) / 1e6 or None)} |"
                  for s in rows[0]["singles"]]  # fmt: skip
        lines += ["", "The drain's moves (first run; seconds after the drain request):", "",
                  "| VM | to | start | end | phases (s) |", "|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {t['vm']} | {t['to']} | {t['start_s']} | {t['end_s']} | "
                  + ", ".join(f"{k} {v}" for k, v in t["phases"].items()) + " |"
                  for t in rows[0]["timeline"]]  # fmt: skip
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / name}.md and .json")
    return doc
