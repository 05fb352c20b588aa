"""Where an idle guest's blackout comes from: move one idle 1 GiB guest back and forth.

``python -m bench.handover --moves 6 --send-queue 0,8`` brings up a 2-host lab with the
migration link shaped to 1 Gbit/s, boots one idle probe guest and, for each value of the host
setting ``migration.send_queue_ms`` (0 = kernel default) and each of ``migration.downtime_aim``
(``--downtime-aim 1,0.25``: QEMU given the whole downtime target from the start, or a quarter
of it for the first passes), moves it ``--moves`` times between the hosts under a 1 ms UDP
echo probe, the variants taking turns. Per move it prints the gap at the hand-over, the longest
gap before it (the guest still on the source), QEMU's downtime and the pre-copy phase's length;
then the medians per variant. ``--quickack`` also makes both hosts acknowledge at once on the
migration route (``ip route ... quickack 1``; a lab-only comparison with Nagle's algorithm and
delayed acknowledgements out of the way). Results go to ``bench/results/handover.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.migrate import LINK_RATE, SCENARIOS, _create_guest, _Guests, _wait_job, split_gaps
from vmferry.lab import Lab
from vmferry.lab.lab import start_probe, wait_answer

RESULTS = Path(__file__).resolve().parent / "results"
HOSTS = ("h1", "h2")


def _set_migration(lab: Lab, send_queue_ms: float, downtime_aim: float) -> None:
    for h in HOSTS:
        with lab.client(h) as c:
            mig = dict(c.settings()["migration"])
            mig["send_queue_ms"] = send_queue_ms
            mig["downtime_aim"] = downtime_aim
            c.update_settings(migration=mig)


def _quickack(lab: Lab) -> None:
    """Acknowledge at once on each host's route to the lab's migration subnet."""
    topo = lab.topology()
    for h in HOSTS:
        ns = topo.host(h).netns
        routes = subprocess.run(
            ["ip", "-n", ns, "route", "show", topo.migration_cidr],
            capture_output=True, text=True, check=True,
        ).stdout.splitlines()  # fmt: skip
        for line in routes:
            subprocess.run(["ip", "-n", ns, "route", "replace", *line.split(), "quickack", "1"],
                           check=True)  # fmt: skip


def _move(lab: Lab, ip: str, src: str, dst: str) -> dict[str, Any]:
    bo = start_probe(lab, "blackout", ip, duration=60, interval_ms=1)
    with lab.client(src) as c:
        job = c.move("hand1", {"destination": {"name": dst, "url": lab.endpoint(dst).url},
                               "options": {"timeout_s": 60, "on_timeout": "abort"}})  # fmt: skip
        done = _wait_job(c, job["id"], time.monotonic() + 90, lambda _j: None)
    time.sleep(1.0)
    probe = bo.stop()
    if done is None:
        return {"from": src, "state": "timeout"}
    at, before = split_gaps(done, probe) if done["state"] == "completed" else (None, None)
    phases = {p["phase"]: p["ended_at"] - p["started_at"] for p in done["phases"]
              if p.get("ended_at")}  # fmt: skip
    return {
        "from": src, "state": done["state"], "handover_gap_ms": at, "before_gap_ms": before,
        "qemu_downtime_ms": done.get("qemu_downtime_ms"), "precopy_s": phases.get("precopy"),
    }  # fmt: skip


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(vals), 3) if vals else None


def run(moves: int, send_queues: list[float], aims: list[float], quickack: bool) -> dict[str, Any]:
    """Bring up the lab, move the guest ``moves`` times per variant, tear the lab down."""
    base = Path(tempfile.mkdtemp(prefix="vmferry-handover-"))
    os.environ["FERRY_CONFIG"] = str(base / "client.json")
    lab = Lab(base / "lab")
    idle = next(sc for sc in SCENARIOS if sc.key == "idle")
    variants: list[dict[str, Any]] = []
    try:
        lab.up(2, link_rate=LINK_RATE)
        if quickack:
            _quickack(lab)
        ip = _Guests().next(lab)
        _create_guest(lab, idle, "hand1", ip)
        wait_answer(lab, ip, 300)
        time.sleep(3)
        where = "h1"
        combos = [(ms, aim) for ms in send_queues for aim in aims]
        rows: dict[tuple[float, float], list[dict[str, Any]]] = {c: [] for c in combos}
        # the variants take turns, so a slow spell of the machine hits them alike; the order
        # flips every round, so each variant moves both ways
        for n in range(moves):
            for ms, aim in combos if n % 2 == 0 else combos[::-1]:
                _set_migration(lab, ms, aim)
                dst = "h2" if where == "h1" else "h1"
                row = _move(lab, ip, where, dst)
                print(json.dumps({"send_queue_ms": ms, "downtime_aim": aim, **row}), flush=True)
                rows[(ms, aim)].append(row)
                if row["state"] == "completed":
                    where = dst
                time.sleep(2)
        for (ms, aim), done in rows.items():
            variants.append({
                "send_queue_ms": ms, "downtime_aim": aim, "moves": done,
                **{f"median_{k}": _median(done, k) for k in
                   ("handover_gap_ms", "before_gap_ms", "qemu_downtime_ms", "precopy_s")},
            })  # fmt: skip
    finally:
        lab.down()
    shutil.rmtree(base, ignore_errors=True)  # kept after a failure: its lab records
    return {"quickack": quickack, "link": LINK_RATE, "variants": variants}


def main() -> None:
    """``python -m bench.handover``."""
    ap = argparse.ArgumentParser(prog="bench.handover", description=__doc__.split("\n")[0])
    ap.add_argument("--moves", type=int, default=6, help="moves per variant (1-40)")
    ap.add_argument("--send-queue", default="0,8",
                    help="comma-separated migration.send_queue_ms values to compare")  # fmt: skip
    ap.add_argument("--downtime-aim", default="0.25",
                    help="comma-separated migration.downtime_aim values to compare")  # fmt: skip
    ap.add_argument("--quickack", action="store_true",
                    help="acknowledge at once on the lab's migration route")  # fmt: skip
    args = ap.parse_args()
    queues = [float(v) for v in args.send_queue.split(",") if v.strip()]
    aims = [float(v) for v in args.downtime_aim.split(",") if v.strip()]
    doc = run(max(1, min(args.moves, 40)), queues, aims, args.quickack)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "handover.json").write_text(json.dumps(doc, indent=1) + "\n")
    for v in doc["variants"]:
        print({k: v[k] for k in v if k != "moves"})


if __name__ == "__main__":
    main()
