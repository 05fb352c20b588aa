"""Placement benchmark: a 64-node, 4,000-VM cluster, decisions for a dead node's VMs.

Pure computation (no etcd, no QEMU): the controller's decision step as it runs on the leader —
:func:`vmferry.cluster.controller.plan` over the cluster's records, :func:`rooms` for the alive
nodes and :func:`vmferry.cluster.placement.place` — timed for each of the 64 nodes dying in
turn, plus the worst case of placing all 4,000 VMs at once. The cluster is generated from a
fixed seed: nodes of 256 GiB, VMs of 1-8 GiB in three priorities, a third with two preferred
owners, a fifth limited to 16 possible owners, half in one of 50 anti-affinity groups.
Run: ``python -m bench.run --only cluster-place [--runs N]``.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

from vmferry.cluster.controller import demand, plan, rooms
from vmferry.cluster.placement import PRIORITIES, NodeRoom, place
from vmferry.cluster.store import (
    AliveRecord,
    ClusteredVM,
    ClusterInfo,
    ClusterState,
    NodeRecord,
)

RESULTS = Path(__file__).parent / "results"
NODES, VMS, NODE_MIB = 64, 4000, 256 * 1024


def build(seed: int = 5) -> tuple[ClusterState, dict[str, int]]:
    """The cluster's records and each node's free memory."""
    rnd = random.Random(seed)
    names = [f"node{i:02d}" for i in range(NODES)]
    free = dict.fromkeys(names, NODE_MIB)
    vms: dict[str, ClusteredVM] = {}
    for i in range(VMS):
        node = names[i % NODES]
        vm = ClusteredVM(
            name=f"vm{i:04d}", node=node, uuid=f"u{i}", storage_dir=f"/shared/vm{i:04d}",
            memory_mib=rnd.choice([1024, 2048, 4096, 8192]), priority=rnd.choice(PRIORITIES[:3]),
            preferred=rnd.sample(names, 2) if i % 3 == 0 else [],
            possible=rnd.sample(names, 16) if i % 5 == 0 else [],
            anti_affinity=f"g{i % 50}" if i % 2 == 0 else None,
        )  # fmt: skip
        vms[vm.name] = vm
        free[node] -= vm.memory_mib
    state = ClusterState(
        info=ClusterInfo(name="bench", created_at=0), revision=1,
        nodes={n: NodeRecord(name=n, url=f"https://{n}:8443") for n in names},
        alive={n: AliveRecord(node=n, lease=1, ttl_s=6, since=0) for n in names}, vms=vms,
    )  # fmt: skip
    return state, free


def dead_node_decisions(state: ClusterState, free: dict[str, int]) -> list[dict[str, Any]]:
    """For each node in turn: its lease is gone; time plan + rooms + place for its VMs."""
    rows = []
    all_alive = dict(state.alive)
    for dead in sorted(state.nodes):
        state.alive = {n: a for n, a in all_alive.items() if n != dead}
        t0 = time.perf_counter()
        p = plan(state, ())
        t1 = time.perf_counter()
        res = place([demand(v) for v in p.orphans], rooms(state, free, ()))
        t2 = time.perf_counter()
        rows.append({
            "dead": dead, "vms": len(p.orphans), "placed": len(res.decisions),
            "unplaced": len(res.unplaced), "plan_ms": (t1 - t0) * 1000,
            "place_ms": (t2 - t1) * 1000, "total_ms": (t2 - t0) * 1000,
        })  # fmt: skip
    state.alive = all_alive
    return rows


def everything_at_once(state: ClusterState) -> dict[str, Any]:
    """Worst case: all 4,000 VMs placed on 64 empty nodes in one decision."""
    nodes = [NodeRoom(n, NODE_MIB) for n in sorted(state.nodes)]
    demands = [demand(v) for v in state.vms.values()]
    t0 = time.perf_counter()
    res = place(demands, nodes)
    took = (time.perf_counter() - t0) * 1000
    return {"vms": len(demands), "placed": len(res.decisions), "unplaced": len(res.unplaced),
            "place_ms": took}  # fmt: skip


def run(runs: int) -> dict[str, Any]:
    """``runs`` repetitions of both measurements."""
    state, free = build()
    dead_rows: list[dict[str, Any]] = []
    worst: list[dict[str, Any]] = []
    for i in range(runs):
        dead_rows += dead_node_decisions(state, free)
        worst.append(everything_at_once(state))
        print(f"run {i + 1}/{runs}: dead node max {max(r['total_ms'] for r in dead_rows):.1f} ms, "
              f"all {VMS} VMs {worst[-1]['place_ms']:.0f} ms")  # fmt: skip
    totals = sorted(r["total_ms"] for r in dead_rows)
    return {
        "dead_node": {
            "decisions": len(dead_rows),
            "vms_per_dead_node_median": statistics.median(r["vms"] for r in dead_rows),
            "unplaced_total": sum(r["unplaced"] for r in dead_rows),
            "total_ms_median": statistics.median(totals),
            "total_ms_p95": totals[int(0.95 * (len(totals) - 1))],
            "total_ms_max": totals[-1],
            "plan_ms_median": statistics.median(r["plan_ms"] for r in dead_rows),
            "place_ms_median": statistics.median(r["place_ms"] for r in dead_rows),
        },
        "all_at_once": {
            "vms": VMS,
            "place_ms_median": statistics.median(w["place_ms"] for w in worst),
            "place_ms_max": max(w["place_ms"] for w in worst),
            "unplaced": worst[-1]["unplaced"],
        },
        "runs": runs,
    }


def report(summary: dict[str, Any], command: str) -> None:
    """Write bench/results/cluster_place.{md,json}."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    date = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    doc = {"benchmark": "cluster_place", "command": command, "date": date,
           "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                       "python": platform.python_version()},
           "cluster": {"nodes": NODES, "vms": VMS, "node_mib": NODE_MIB}, **summary}  # fmt: skip
    (RESULTS / "cluster_place.json").write_text(json.dumps(doc, indent=2) + "\n")
    d, a = summary["dead_node"], summary["all_at_once"]
    lines = [
        "# cluster_place",
        "",
        f"Command: `{command}` — {date}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}. Pure decision time (no etcd, no agents): the controller's",
        "`plan` over 4,000 clustered-VM records, `rooms` for the alive nodes, `place`.",
        "",
        f"{NODES} nodes of 256 GiB, {VMS} VMs (1-8 GiB, priorities high/medium/low, 1/3 with",
        "preferred owners, 1/5 limited to 16 possible owners, 1/2 in 50 anti-affinity groups).",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| a dead node's VMs (each of the 64 nodes in turn, {summary['runs']} runs) | "
        f"{d['vms_per_dead_node_median']:.0f} VMs per node | |",
        f"| decision time, median | {d['total_ms_median']:.1f} ms | ≤ 1000 ms |",
        f"| decision time, p95 | {d['total_ms_p95']:.1f} ms | ≤ 1000 ms |",
        f"| decision time, max | {d['total_ms_max']:.1f} ms | ≤ 1000 ms |",
        f"| of which plan (scan of 4,000 records), median | {d['plan_ms_median']:.1f} ms | |",
        f"| of which place, median | {d['place_ms_median']:.1f} ms | |",
        f"| VMs left unplaced | {d['unplaced_total']} | |",
        f"| worst case: all {a['vms']} VMs at once, median | {a['place_ms_median']:.0f} ms | |",
        f"| worst case, max | {a['place_ms_max']:.0f} ms | |",
        "",
        "Not included: the etcd read of the cluster (one range request) and asking the alive",
        "nodes' agents for their free memory (in parallel); the failover integration test",
        "reports those end to end (tests/integration/test_failover.py).",
    ]
    (RESULTS / "cluster_place.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'cluster_place'}.md and .json")
