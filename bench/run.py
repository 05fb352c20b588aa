"""``make bench``: benchmarks in a real lab. Today: guest boot and save/restore.

Reports go to bench/results/<name>.md and .json with the command that produced them.
Run as root: ``.venv/bin/python -m bench.run [--runs N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vmferry.lab import Lab
from vmferry.lab.lab import probe

RESULTS = Path(__file__).parent / "results"


def _wait_stat(lab: Lab, ip: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = probe(lab, "stat", ip, count=1, timeout=0.2)
        if "error" not in r:
            return r
    raise RuntimeError(f"guest {ip} did not answer within {timeout} s")


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
            _wait_stat(lab, ip, 60)
            t_boot = time.monotonic() - t0
            t1 = time.monotonic()
            c.action(name, "save")
            t_save = time.monotonic() - t1
            t2 = time.monotonic()
            c.action(name, "restore")
            _wait_stat(lab, ip, 30)
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


def main(argv: list[str] | None = None) -> None:
    """Run every benchmark."""
    ap = argparse.ArgumentParser(prog="bench.run")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="vmferry-bench-"))
    os.environ["FERRY_CONFIG"] = str(base / "client.json")
    lab = Lab(base / "lab")
    try:
        lab.up(1)
        rows = boot_and_save(lab, max(1, min(args.runs, 50)))
    finally:
        lab.down()
    _report("boot", rows, f"make bench  (python -m bench.run --runs {args.runs})")


if __name__ == "__main__":
    sys.exit(main())
