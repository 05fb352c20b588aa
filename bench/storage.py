"""Storage-move benchmark: a running VM's 1 GiB disk moved while the guest's disk writer runs,
against ``qemu-img convert`` copying the same file on the same filesystem.

One 1-host lab. Per run: a fresh probe guest whose 1 GiB qcow2 disk is first filled with data
(``qemu-io``), so both copies move the same ~1 GiB; before the guest boots, ``qemu-img convert``
copies the image to the same filesystem (the baseline rate); the guest boots with its disk
writer (sequence-numbered, checksummed, fsynced 4 KiB blocks) and a 1 ms UDP echo probe; then
``move-storage`` moves the disk to another folder of the same root. Reported: the copy rate of
the move (bytes the mirror copied ÷ the mirror phase) and the whole job's rate, each divided by
the convert rate; the guest's write rate before and during the move; the longest echo gap (the
pivot is meant to be invisible); and the verifier's verdict after a reboot from the new file.
Each run also moves an idle guest (no disk writer) the same way, to show what the writer's
synchronous writes cost the copy.

Run as root: ``.venv/bin/python -m bench.run --only storage [--runs N]``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from vmferry.client import FerryError
from vmferry.lab import Lab
from vmferry.lab.lab import BackgroundProbe, probe, start_probe, wait_answer

RESULTS = Path(__file__).parent / "results"
HOST = "h1"
DISK_MIB = 1024
MEMORY_MIB = 256
ROLES = ["heartbeat", "udpecho", "tcpecho", "disk"]
BOOT_TIMEOUT_S = 180.0
WARMUP_S = 5.0
MOVE_TIMEOUT_S = 600.0
MB = 1e6


def _stat(lab: Lab, ip: str) -> dict[str, Any]:
    r = probe(lab, "stat", ip, count=1, timeout=1.0)
    if "error" in r:
        raise FerryError(f"guest {ip} does not answer: {r['error']}")
    return r


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def convert_rate(src: Path, dst: Path) -> dict[str, Any]:
    """Time ``qemu-img convert`` of ``src`` to ``dst`` (same filesystem), then remove ``dst``.

    Dirty data of earlier steps is written back first (``sync``), so no copy pays for another's.
    """
    os.sync()
    t0 = time.monotonic()
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", str(src), str(dst)],
                   check=True, capture_output=True, timeout=600)  # fmt: skip
    seconds = time.monotonic() - t0
    nbytes = _allocated(dst)
    dst.unlink()
    return {"seconds": round(seconds, 3), "bytes": nbytes, "mb_s": round(nbytes / seconds / MB, 1)}


def _phase_s(job: dict[str, Any], phase: str) -> float | None:
    secs = [p["ended_at"] - p["started_at"] for p in job.get("phases") or []
            if p["phase"] == phase and p.get("ended_at")]  # fmt: skip
    return round(sum(secs), 3) if secs else None


def _span_s(job: dict[str, Any]) -> float | None:
    """From the start of setup to the end of cleanup (the job without queue and checks)."""
    ph = {p["phase"]: p for p in job.get("phases") or []}
    if "setup" not in ph or not (ph.get("cleanup") or {}).get("ended_at"):
        return None
    return round(float(ph["cleanup"]["ended_at"]) - float(ph["setup"]["started_at"]), 3)


def _serial(lab: Lab, name: str, prefix: str) -> list[str]:
    with lab.client(HOST) as c:
        return [ln for ln in c.console(name, 2000) if ln.startswith(prefix)]


def run_one(lab: Lab, repeat: int, converts: int, writer: bool = True) -> dict[str, Any]:
    """One storage move of a fresh guest's filled 1 GiB disk, with its baseline.

    ``writer=False`` (the ``idle`` variant) boots the guest without its disk writer: it shows
    what the guest's synchronous writes cost the copy.
    """
    variant = "writer" if writer else "idle"
    name = f"bench-sm{repeat}-{variant}"
    ip = lab.topology().guest_ip(2 * repeat + (1 if writer else 2))
    roles = ROLES if writer else [r for r in ROLES if r != "disk"]
    run: dict[str, Any] = {"repeat": repeat, "variant": variant, "vm": name, "ip": ip,
                           "finished": False}  # fmt: skip
    bo: BackgroundProbe | None = None
    try:
        with lab.client(HOST) as c:
            vm = c.create_vm({"name": name, "memory_mib": MEMORY_MIB,
                              "disks": [{"size_mib": DISK_MIB}], "nics": [{"switch": "external"}],
                              "probe": {"ip": f"{ip}/24", "roles": roles}})  # fmt: skip
        src = Path(vm["storage_dir"], vm["disks"][0]["file"])
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {DISK_MIB}M", str(src)],
                       check=True, capture_output=True, timeout=600)  # fmt: skip
        run["image_bytes"] = _allocated(src)
        run["convert"] = [convert_rate(src, src.with_name("convert-copy.qcow2"))
                          for _ in range(converts)]  # fmt: skip
        with lab.client(HOST) as c:
            c.action(name, "start")
        wait_answer(lab, ip, BOOT_TIMEOUT_S)
        # The writer first verifies the whole disk; wait until it writes, then measure its rate.
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while writer and _stat(lab, ip).get("disk_ack", 0) == 0:
            if time.monotonic() > deadline:
                raise FerryError("the guest's disk writer never started")
            time.sleep(0.5)
        a0, t0 = _stat(lab, ip)["disk_ack"], time.monotonic()
        time.sleep(WARMUP_S)
        a1, t1 = _stat(lab, ip)["disk_ack"], time.monotonic()
        run["writes_per_s_before"] = round((a1 - a0) / (t1 - t0), 1)
        bo = start_probe(lab, "blackout", ip, duration=MOVE_TIMEOUT_S, interval_ms=1)
        target = lab.host_dir(HOST) / "storage" / "moved" / name
        os.sync()  # as before each convert: start with no dirty data in the page cache
        with lab.client(HOST) as c:
            t_move = time.monotonic()
            job = c.move_storage(name, {"to": str(target)})
            while True:
                job = c.migration(job["id"])
                if job["state"] in ("completed", "failed", "cancelled"):
                    break
                if time.monotonic() - t_move > MOVE_TIMEOUT_S:
                    c.cancel_migration(job["id"])
                time.sleep(0.2)
            a2, t2 = _stat(lab, ip)["disk_ack"], time.monotonic()
        run["writes_per_s_during"] = round((a2 - a1) / (t2 - t1), 1)
        run["blackout"] = bo.stop()
        bo = None
        run["job"] = job
        run["state"] = job["state"]
        run["finished"] = job["state"] == "completed"
        if not run["finished"]:
            run["error"] = job.get("error")
        if run["finished"] and writer:
            _verify(lab, name, run, a2)
    except Exception as exc:  # record and go on
        run["bench_error"] = f"{exc.__class__.__name__}: {exc}"
    finally:
        if bo is not None:
            with contextlib.suppress(Exception):
                run["blackout"] = bo.stop(timeout=5)
        try:
            with lab.client(HOST) as c:
                if c.vm(name)["state"] not in ("off", "saved", "crashed"):
                    c.action(name, "stop")
                c.delete_vm(name)
        except FerryError as exc:
            run["cleanup_error"] = str(exc)
    _derive(run)
    return run


def _verify(lab: Lab, name: str, run: dict[str, Any], acked: int) -> None:
    """Restart the guest from its moved disk; record the verifier's verdict of that boot."""
    seen = len(_serial(lab, name, "FERRY-DISK-VERIFY"))  # the console keeps every boot
    with lab.client(HOST) as c:
        c.action(name, "stop")
        c.action(name, "start")
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    lines: list[str] = []
    while len(lines) <= seen and time.monotonic() < deadline:
        lines = _serial(lab, name, "FERRY-DISK-VERIFY")
        time.sleep(0.5)
    verdict = lines[seen] if len(lines) > seen else None
    m = re.search(r"last=(\d+) gaps=(\d+) corrupt=(\d+)", verdict) if verdict else None
    run["verify"] = verdict
    run["verify_ok"] = (
        m is not None and int(m.group(1)) >= acked and m.group(2) == "0" and m.group(3) == "0"
    )


def _derive(run: dict[str, Any]) -> None:
    job: dict[str, Any] = run.get("job") or {}
    conv = run.get("convert") or []
    run["convert_mb_s"] = statistics.median(c["mb_s"] for c in conv) if conv else None
    copied = int((job.get("progress") or {}).get("disk_total") or 0)
    run["mirror_bytes"] = copied
    run["mirror_s"] = _phase_s(job, "mirror")
    run["pivot_s"] = _phase_s(job, "switchover")
    run["span_s"] = _span_s(job)
    run["total_s"] = job.get("total_s")
    ok = run["finished"] and copied
    run["mirror_mb_s"] = round(copied / run["mirror_s"] / MB, 1) if ok and run["mirror_s"] else None
    run["span_mb_s"] = round(copied / run["span_s"] / MB, 1) if ok and run["span_s"] else None
    base = run["convert_mb_s"]
    run["ratio_mirror"] = (
        round(run["mirror_mb_s"] / base, 2) if run["mirror_mb_s"] and base else None
    )
    run["ratio_span"] = round(run["span_mb_s"] / base, 2) if run["span_mb_s"] and base else None
    bo: dict[str, Any] = run.get("blackout") or {}
    run["longest_echo_gap_ms"] = bo.get("longest_gap_ms")
    run["gap_phase"] = _gap_phase(job, bo.get("longest_gap_start_epoch"), bo.get("longest_gap_ms"))


def _gap_phase(job: dict[str, Any], start: float | None, length_ms: float | None) -> str | None:
    """The job phases the longest echo gap overlapped."""
    if start is None or length_ms is None:
        return None
    stop = start + length_ms / 1000
    hit = [str(p["phase"]) for p in job.get("phases") or []
           if p["started_at"] < stop and (p.get("ended_at") or float("inf")) > start]  # fmt: skip
    if not hit:
        return "outside the job"
    return hit[0] if len(hit) == 1 else f"{hit[0]}..{hit[-1]}"


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [float(r[key]) for r in rows if r.get(key) is not None]
    return round(statistics.median(vals), 2) if vals else None


def _git_commit() -> str:
    root = str(Path(__file__).resolve().parent.parent)
    done = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                          text=True, timeout=10, check=False)  # fmt: skip
    return done.stdout.strip()


def report(rows: list[dict[str, Any]], command: str, out: Path = RESULTS) -> dict[str, Any]:
    """Write storage.json and storage.md."""
    keys = ("convert_mb_s", "mirror_mb_s", "ratio_mirror", "span_mb_s", "ratio_span", "mirror_s",
            "pivot_s", "span_s", "total_s", "writes_per_s_before", "writes_per_s_during",
            "longest_echo_gap_ms")  # fmt: skip
    done = [r for r in rows if r["finished"] and r.get("variant", "writer") == "writer"]
    summary = {k: _median(done, k) for k in keys}
    idle = [r for r in rows if r["finished"] and r.get("variant") == "idle"]
    summary_idle = {k: _median(idle, k) for k in keys}
    doc: dict[str, Any] = {
        "benchmark": "storage",
        "command": command,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "accelerator": "tcg",
        "engine_commit": _git_commit(),
        "disk_mib": DISK_MIB,
        "guest": f"{MEMORY_MIB} MiB, 1 vCPU probe guest, roles {','.join(ROLES)}",
        "finished": f"{len(done)}/{sum(1 for r in rows if r.get('variant') == 'writer')}",
        "finished_idle": f"{len(idle)}/{sum(1 for r in rows if r.get('variant') == 'idle')}",
        "verified": f"{sum(1 for r in done if r.get('verify_ok'))}/{len(done)}",
        "summary": summary,
        "summary_idle": summary_idle,
        "runs": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "storage.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")

    def f(v: Any, unit: str = "") -> str:
        return "—" if v is None else f"{v}{unit}"

    lines = [
        "# storage",
        "",
        f"Command: `{command}` — {doc['date']}, {os.cpu_count()} CPUs, TCG, engine commit "
        f"{doc['engine_commit'][:10]} (plus uncommitted changes at the time of the run).",
        "",
        f"A running VM's {DISK_MIB} MiB qcow2 disk, filled with data, moved by "
        "`ferry move-storage` to another folder of the same filesystem while the guest's disk "
        "writer runs (`blockdev-mirror`, write-blocking, then pivot). Baseline: "
        "`qemu-img convert` of the same image to the same filesystem, with the VM off, just "
        "before it boots.",
        "",
        f"Moves under the disk writer finished: {doc['finished']} (idle guest: "
        f"{doc['finished_idle']}); disk verified intact after a reboot from the new file: "
        f"{doc['verified']}. Medians of the moves under the writer:",
        "",
        "| measure | value |",
        "|---|---|",
        f"| qemu-img convert rate | {f(summary['convert_mb_s'], ' MB/s')} |",
        f"| move-storage copy rate (mirror bytes ÷ mirror phase) | "
        f"{f(summary['mirror_mb_s'], ' MB/s')} |",
        f"| **ratio copy rate ÷ convert rate** | **{f(summary['ratio_mirror'], 'x')}** |",
        f"| move-storage whole-job rate (mirror bytes ÷ setup..cleanup) | "
        f"{f(summary['span_mb_s'], ' MB/s')} |",
        f"| ratio whole-job rate ÷ convert rate | {f(summary['ratio_span'], 'x')} |",
        f"| mirror phase | {f(summary['mirror_s'], ' s')} |",
        f"| pivot (switchover phase) | {f(summary['pivot_s'], ' s')} |",
        f"| job total (incl. queue and checks) | {f(summary['total_s'], ' s')} |",
        f"| guest writes/s before the move | {f(summary['writes_per_s_before'])} |",
        f"| guest writes/s during the move | {f(summary['writes_per_s_during'])} |",
        f"| longest gap in the 1 ms UDP echo during the move | "
        f"{f(summary['longest_echo_gap_ms'], ' ms')} |",
        "",
        "The same move of an idle guest (no disk writer; `idle` rows below): copy rate "
        f"{f(summary_idle['mirror_mb_s'], ' MB/s')}, ratio {f(summary_idle['ratio_mirror'], 'x')}, "
        f"longest echo gap {f(summary_idle['longest_echo_gap_ms'], ' ms')}.",
        "",
        "Reading: the mirror copies at a fraction of `qemu-img convert`'s rate here. It runs in "
        "QEMU's main loop, which under TCG also emulates the guest's devices, and with the disk "
        "writer every guest write waits for both files. The longest echo gaps fall in the mirror "
        "phase (the main loop is busy copying), not at the pivot; the pivot itself is short.",
        "",
        "Per run:",
        "",
        "| run | guest | state | convert MB/s | mirror MB/s | ratio | mirror s | pivot s | "
        "total s | echo gap ms (phase) | verify |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {r['repeat'] + 1} | {r.get('variant')} | {r.get('state')} | "
            f"{f(r.get('convert_mb_s'))} | "
            f"{f(r.get('mirror_mb_s'))} | {f(r.get('ratio_mirror'))} | {f(r.get('mirror_s'))} | "
            f"{f(r.get('pivot_s'))} | {f(r.get('total_s'))} | "
            f"{f(r.get('longest_echo_gap_ms'))} ({r.get('gap_phase') or '—'}) | "
            f"{r.get('verify') or r.get('bench_error') or '—'} |"
            for r in rows
        ),
        "",
        "## Definitions",
        "",
        "- **mirror bytes**: what QEMU's mirror job had to copy (its `len`, the job's "
        "`progress.disk_total`): the image's allocated data plus what the guest wrote meanwhile.",
        "- **convert rate**: allocated bytes of the copy ÷ wall time of `qemu-img convert -f qcow2 "
        "-O qcow2` (median of 3 conversions per run, each after a `sync`; the move also starts "
        "after a `sync`). Both copies read a file that sits in the page cache (the machine has far "
        "more memory than the image) and write to it without waiting for the disk, so both "
        "measure the copy path; figures vary a lot between runs on this shared 2-CPU machine.",
        "- **guest writes/s**: the disk writer's acknowledged (fsynced) blocks per second, read "
        "from the probe's counters; once a mirror is in sync every guest write also waits for the "
        "new file (write-blocking), which is what makes the move converge under any write rate.",
        "- **verify**: after the move the guest is restarted from its new disk; the probe's "
        "verifier checks every block and reports the last sequence, gaps and corrupt blocks; "
        "it must cover every block acknowledged before the restart.",
    ]
    (out / "storage.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'storage'}.md and .json")
    return doc


def run_all(lab_dir: Path, runs: int, converts: int = 3) -> list[dict[str, Any]]:
    """Bring up a 1-host lab, run the storage moves, tear the lab down."""
    lab = Lab(lab_dir)
    rows = []
    try:
        lab.up(1)
        for i in range(runs):
            for writer in (True, False):
                t0 = time.monotonic()
                row = run_one(lab, i, converts, writer)
                rows.append(row)
                print(f"storage #{i + 1} {row['variant']}: {row.get('state')} "
                      f"convert={row.get('convert_mb_s')} MB/s mirror={row.get('mirror_mb_s')} "
                      f"MB/s ratio={row.get('ratio_mirror')} gap={row.get('longest_echo_gap_ms')} "
                      f"ms verify={row.get('verify_ok')} err={row.get('bench_error')} "
                      f"({time.monotonic() - t0:.0f} s)", flush=True)  # fmt: skip
    finally:
        lab.down()
    return rows
